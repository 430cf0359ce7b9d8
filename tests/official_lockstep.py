"""Train vgf_offline.py and the official VGF code (github.com/ryanxhr/vgf at 3ec8f9b, JAX/flax) side by side, in
lockstep, in float64: the same initial parameters, the same batches and the same noise for every update, and each
program's own evaluation interleaved where asked. Reports how far the two drift apart.

    <python with torch, jax, flax, optax, ml_collections, ogbench> tests/official_lockstep.py --checkout VGF \
        --dataset-dir DATA --updates 5000 --eval-at 1000 5000 --out lockstep.json

The official update runs jitted, as in its main.py; its three random draws per update (x_0 of the reference sampler
at s' [B * N, A], the flow-matching x_0 [B, A] and t [B, 1]) are replaced by ours through `jax.random.normal` /
`jax.random.uniform` while it is traced, and its TD-target particles and Q_target values are read back with
`jax.debug.callback`. Ours gets the same draws through the batch (`target_x0`, `flow_x0`, `flow_t`), as in the
golden parity test. Batches are drawn uniformly with replacement from the dataset, as both programs do.

Chaos control: a second copy of our agent, its initial parameters perturbed by --perturb (relative), trained on the
same batches and noise. Round-off differences between the programs grow at most like that perturbation does if the
two compute the same function; a bug grows faster and shows in the losses and TD targets at once.

At every --eval-at step both programs evaluate (ours: `evaluate_all`, official: `evaluate_vgf_multiple`, L_test 0-3,
--eval-episodes each), and the parameters and our global random states must be unchanged by it.

Settings (default): the README's pointmaze setting: 64x64 networks, batch 256, N 10, K 5, L_train 5, eps 0.1,
alpha 0.05, gamma 0.99, mean aggregation, tau 0.05. The official side needs `wandb`, `gym`, `d4rl`, `distrax`
importable (stubs suffice: see tests/make_official_parity.py) and ogbench; ours needs this project's requirements.
"""
import argparse
import copy
import json
import os
import sys
import time
import types

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

SETTING = dict(env_id="pointmaze-medium-navigate-singletask-v0", hidden_dims=[64, 64], batch_size=256,
               num_particles=10, bc_flow_steps=5, train_transport_steps=5, transport_step_size=0.1, alpha=0.05,
               discount=0.99, target_q_agg="mean", tau=0.05, learning_rate=3e-4)


def official_config(module):
    s = SETTING
    return {**module.get_config(), **dict(
        value_hidden_dims=tuple(s["hidden_dims"]), actor_hidden_dims=tuple(s["hidden_dims"]),
        batch_size=s["batch_size"], vgf_particles=s["num_particles"], bc_flow_steps=s["bc_flow_steps"],
        train_vgf_steps=s["train_transport_steps"], vgf_lr=s["transport_step_size"], vgf_alpha=s["alpha"],
        discount=s["discount"], train_q_agg=s["target_q_agg"], tau=s["tau"], value_lr=s["learning_rate"],
        actor_lr=s["learning_rate"])}


def expanded_distance_svgd_direction(particles, score, alpha, fixed_bandwidth=False):
    """vgf_offline.svgd_direction with the official code's squared distances |x|^2 + |y|^2 - 2 x.y floored at 0 by
    jnp.maximum, whose gradient is 0 where the unfloored value is negative and 1/2 where it is 0."""
    import vgf_offline as vgf

    x = particles.detach()
    sq_norms = x.pow(2).sum(-1, keepdim=True)
    raw = sq_norms + sq_norms.transpose(1, 2) - 2.0 * x @ x.transpose(1, 2)
    sq_dists = raw.clamp_min(0.0)
    gamma, d_gamma = vgf.median_bandwidth(sq_dists)
    kernel = (-gamma * sq_dists).exp()
    weights = gamma * kernel if fixed_bandwidth else \
        gamma * kernel + (kernel * sq_dists).sum((1, 2), keepdim=True) * d_gamma
    weights = weights * ((raw > 0).to(x.dtype) + 0.5 * (raw == 0).to(x.dtype))
    repulsion = 2.0 * (weights.sum(2, keepdim=True) * x - weights @ x)  # the autodiff of the expanded form
    return (kernel @ score / alpha + repulsion) / x.shape[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkout", required=True, help="root of a checkout of github.com/ryanxhr/vgf")
    parser.add_argument("--dataset-dir", required=True, help="folder with pointmaze-medium-navigate-v0.npz")
    parser.add_argument("--updates", type=int, default=5000)
    parser.add_argument("--report-at", type=int, nargs="*", default=[1, 10, 100, 1000, 2000, 5000])
    parser.add_argument("--eval-at", type=int, nargs="*", default=[])
    parser.add_argument("--eval-episodes", type=int, default=5)
    parser.add_argument("--perturb", type=float, default=1e-12, help="relative perturbation of the control copy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--our-distances", choices=["difference", "expanded"], default="difference",
                        help="ours computes |x_i - x_j|^2 from differences (default) or, as the official code, as "
                             "|x_i|^2 + |x_j|^2 - 2 x_i.x_j floored at 0 (its gradient 0 below the floor, 1/2 at it)")
    parser.add_argument("--sync-until", type=int, default=0,
                        help="copy the official parameters and Adam states into ours before each of the first K "
                             "updates (and into the perturbed copies), then let both run free")
    parser.add_argument("--no-controls", dest="controls", action="store_false",
                        help="skip the chaos controls and the teacher-forced copy (2.5x fewer updates per step)")
    parser.add_argument("--out", default=None, help="json file for the drift table")
    cli = parser.parse_args()

    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_platforms", "cpu")
    import flax
    import torch
    from flax import traverse_util

    for name in ("wandb", "gym", "d4rl"):  # imported by the official modules, not used here
        sys.modules.setdefault(name, types.ModuleType(name))
    try:
        import distrax  # noqa: F401
    except ImportError:
        sys.modules["distrax"] = types.SimpleNamespace(Transformed=object)
    sys.path.insert(0, os.path.abspath(cli.checkout))
    import agents.vgf as official
    from utils.evaluation import evaluate_vgf_multiple
    from utils.flax_utils import TrainState

    import vgf_offline as vgf
    from official_cross_eval import flax_pairs

    torch.set_num_threads(1)
    if cli.our_distances == "expanded":
        vgf.svgd_direction = expanded_distance_svgd_direction
    args = vgf.resolve_suite_defaults(vgf.Args(**SETTING, dataset_dir=cli.dataset_dir, cuda=False, compile=False,
                                               eval_episodes=cli.eval_episodes, seed=cli.seed))
    data, _, _ = vgf.load_dataset(args)
    size, obs_dim, act_dim = len(data["observations"]), data["observations"].shape[1], data["actions"].shape[1]
    b, n = args.batch_size, args.num_particles
    print(f"{size} transitions, obs {obs_dim}, act {act_dim}")

    # --- the official agent: its own initialisation, in float64, jitted update with our draws fed in
    config = official_config(official)
    agent = official.VGFAgent.create(cli.seed, np.zeros((1, obs_dim)), np.zeros((1, act_dim)), config)
    for net in ("critic", "actor_bc"):
        state = getattr(agent, net)
        params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), state.params)
        agent = agent.replace(**{net: state.replace(params=params, opt_state=state.tx.init(params))})
    agent = agent.replace(target_critic=agent.target_critic.replace(params=agent.critic.params))

    feed, records = {}, {}
    real_normal, real_uniform = jax.random.normal, jax.random.uniform
    fed_shapes = {("normal", (b * n, act_dim)): "target_x0", ("normal", (b, act_dim)): "flow_x0",
                  ("uniform", (b, 1)): "flow_t"}

    def fed(kind, real):
        def draw(key, shape=(), dtype=None, *rest, **kwargs):
            name = fed_shapes.get((kind, tuple(shape)))
            if feed and name:
                return feed[name]
            return real(key, shape, *((dtype,) if dtype is not None else ()), *rest, **kwargs)
        return draw

    jax.random.normal, jax.random.uniform = fed("normal", real_normal), fed("uniform", real_uniform)
    call = TrainState.__call__

    def recording_call(self, *a, **k):  # the TD target's Q_target(s', particles): the only call with actions=[B*N]
        y = call(self, *a, **k)
        if feed and k.get("params") is None and "actions" in k and k["actions"].shape[0] == b * n:
            jax.debug.callback(lambda x, q: records.update(particles=np.asarray(x), target_q=np.asarray(q)),
                               k["actions"], y)
        return y

    TrainState.__call__ = recording_call
    official.VGFAgent.sample_bc_actions = official.VGFAgent.sample_bc_actions.__wrapped__  # traced inside the update
    update_body = official.VGFAgent.update.__wrapped__

    def fed_update(agent, batch, noise):
        feed.update(noise)
        try:
            return update_body(agent, batch)
        finally:
            feed.clear()

    official_update = jax.jit(fed_update)

    def perturbed_official(agent, initial=True):
        """The official chaos control: the critic's parameters perturbed by --perturb (relative); initial: a fresh
        agent (its target and Adam state follow the perturbed parameters), else a copy of a trained one."""
        keys = iter(jax.random.split(jax.random.PRNGKey(1), 1000))
        state = agent.critic
        params = jax.tree_util.tree_map(
            lambda x: x * (1 + cli.perturb * real_uniform(next(keys), x.shape, jnp.float64, -1.0, 1.0)), state.params)
        if not initial:
            return agent.replace(critic=state.replace(params=params))
        return agent.replace(critic=state.replace(params=params, opt_state=state.tx.init(params)),
                             target_critic=agent.target_critic.replace(params=params))

    def run_official(agent, batch, noise):
        agent, info = official_update(agent, {k: jnp.asarray(v) for k, v in batch.items()},
                                      {k: jnp.asarray(v) for k, v in noise.items()})
        jax.block_until_ready((agent, info))  # the debug callback has filled `records` once the outputs exist
        td = batch["rewards"] + args.discount * batch["masks"] * records["target_q"].mean(0).reshape(b, n).mean(1)
        return agent, info, td, records["particles"].reshape(b, n, act_dim)

    # --- ours, from the same initial parameters
    def flat(params):
        return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/").items()}

    def official_arrays(agent):
        out = {}
        for net in ("critic", "target_critic", "actor_bc"):
            out.update({f"{net}/{k}": v for k, v in flat(getattr(agent, net).params).items()})
        return out

    def load_into(ours, arrays):
        with torch.no_grad():
            for tensor, key, transposed in flax_pairs(ours):
                a = arrays[key]
                tensor.copy_(torch.as_tensor(a.T if transposed else a).reshape(tensor.shape))

    def load_state_into(ours, official_agent):
        """Parameters, target and Adam states (count, first and second moments) of the official agent into ours."""
        load_into(ours, official_arrays(official_agent))
        for net, opt in (("critic", ours.opts[0]), ("actor_bc", ours.opts[1])):
            adam = getattr(official_agent, net).opt_state[0]
            moments = {name: flat(getattr(adam, name)) for name in ("mu", "nu")}
            for tensor, key, transposed in flax_pairs(ours):
                if not key.startswith(net + "/"):
                    continue
                state = opt.state[tensor]
                for name, ours_name in (("mu", "exp_avg"), ("nu", "exp_avg_sq")):
                    a = moments[name][key[len(net) + 1:]]
                    state[ours_name] = torch.as_tensor(a.T if transposed else a).reshape(tensor.shape).clone()
                state["step"] = torch.tensor(float(adam.count), dtype=torch.float64)

    def param_distance(ours, arrays):
        worst = 0.0
        for tensor, key, transposed in flax_pairs(ours):
            a = arrays[key]
            theirs = torch.as_tensor(a.T if transposed else a).reshape(tensor.shape)
            worst = max(worst, float((tensor.detach() - theirs).abs().max()))
        return worst

    def official_distance(first, second):
        one, two = official_arrays(first), official_arrays(second)
        return max(float(np.abs(one[k] - two[k]).max()) for k in one)

    def make_ours(arrays):
        ours = vgf.Agent(obs_dim, act_dim, args).to(torch.float64)
        load_into(ours, arrays)
        return ours

    control_agent = perturbed_official(agent)
    ours, ours_control = make_ours(official_arrays(agent)), make_ours(official_arrays(control_agent))
    teacher = make_ours(official_arrays(agent))  # reloaded with the official parameters before every update
    assert param_distance(ours, official_arrays(agent)) == 0.0

    def our_params(a):
        return torch.cat([p.detach().flatten() for p in a.parameters()])

    def run_ours(ours, batch):
        with torch.no_grad():
            particles = vgf.vgf_particles(ours, batch["next_observations"], args.train_transport_steps, acting=False,
                                          noise=batch["target_x0"])
        td = vgf.td_target(ours, batch)
        return particles.numpy(), td.numpy()

    rng = np.random.default_rng(cli.seed)
    envs = [vgf.make_eval_env(args.env_id) for _ in range(cli.eval_episodes)] if cli.eval_at else None
    official_env = None
    if cli.eval_at:
        import ogbench

        official_env = ogbench.make_env_and_datasets(args.env_id, env_only=True)
    names = ("critic_loss", "bc_loss", "td_target", "particles")
    free, teacher_forced = {k: 0.0 for k in names}, {k: 0.0 for k in names[2:]}
    chaos = dict(official_td_target=0.0, ours_td_target=0.0)
    teacher_steps_off = 0  # updates whose teacher-forced TD target differs by more than 1e-9
    window = {k: 0.0 for k in teacher_forced}  # teacher-forced errors since the last reported row
    rows, start = [], time.time()
    for step in range(1, cli.updates + 1):
        idx = rng.integers(0, size, b)
        batch = {k: data[k][idx].astype(np.float64) for k in ("observations", "actions", "rewards",
                                                              "next_observations", "masks")}
        noise = dict(target_x0=rng.standard_normal((b * n, act_dim)), flow_x0=rng.standard_normal((b, act_dim)),
                     flow_t=rng.uniform(size=(b, 1)))
        torch_batch = {k: torch.as_tensor(v) for k, v in {**batch, **noise}.items()}
        if step <= cli.sync_until and step > 1:
            load_state_into(ours, agent)
            load_state_into(ours_control, control_agent)
        if step == cli.sync_until + 1:  # the chaos controls start from here: perturbed copies of the synced state
            control_agent = perturbed_official(agent, initial=False)
            load_state_into(ours_control, control_agent)
            free = {k: 0.0 for k in names}
            chaos = dict(official_td_target=0.0, ours_td_target=0.0)
        if cli.controls:
            load_into(teacher, official_arrays(agent))
            teacher_particles, teacher_td = run_ours(teacher, torch_batch)
        agent, info, official_td, official_particles = run_official(agent, batch, noise)
        our_particles, our_td = run_ours(ours, torch_batch)
        metrics = ours.update(torch_batch)
        if cli.controls:
            control_agent, _, control_td, _ = run_official(control_agent, batch, noise)
            _, our_control_td = run_ours(ours_control, torch_batch)
            ours_control.update(torch_batch)
        errors = dict(critic_loss=abs(metrics["losses/critic_loss"].item() - float(info["critic_loss"])),
                      bc_loss=abs(metrics["losses/bc_flow_loss"].item() - float(info["bc_loss"])),
                      td_target=float(np.abs(our_td - official_td).max()),
                      particles=float(np.abs(our_particles - official_particles).max()))
        for k, v in errors.items():
            free[k] = max(free[k], v)
        if cli.controls:
            teacher_error = dict(td_target=float(np.abs(teacher_td - official_td).max()),
                                 particles=float(np.abs(teacher_particles - official_particles).max()))
            if teacher_error["td_target"] > 1e-9:
                teacher_steps_off += 1
            for k, v in teacher_error.items():
                teacher_forced[k] = max(teacher_forced[k], v)
                window[k] = max(window[k], v)
            chaos["official_td_target"] = max(chaos["official_td_target"],
                                              float(np.abs(official_td - control_td).max()))
            chaos["ours_td_target"] = max(chaos["ours_td_target"], float(np.abs(our_td - our_control_td).max()))
        if step in cli.report_at or step == cli.updates:
            row = dict(update=step, params=param_distance(ours, official_arrays(agent)),
                       **{f"{k}_max_so_far": v for k, v in free.items()})
            if cli.controls:
                row.update(
                    official_vs_perturbed_official_params=official_distance(agent, control_agent),
                    ours_vs_perturbed_ours_params=float((our_params(ours) - our_params(ours_control)).abs().max()),
                    **{f"chaos_{k}_max_so_far": v for k, v in chaos.items()},
                    **{f"teacher_forced_{k}_max_so_far": v for k, v in teacher_forced.items()},
                    **{f"teacher_forced_{k}_max_since_last_row": v for k, v in window.items()},
                    teacher_forced_updates_off=teacher_steps_off)
            row.update(critic_loss=metrics["losses/critic_loss"].item(), td_target_mean=float(our_td.mean()),
                       seconds=round(time.time() - start, 1))
            rows.append(row)
            window = {k: 0.0 for k in window}
            print(json.dumps(row), flush=True)
        if step in cli.eval_at:
            before = (our_params(ours).clone(), torch.get_rng_state().clone(), copy.deepcopy(np.random.get_state()))
            official_before = official_arrays(agent)
            ours_eval = vgf.evaluate_all(ours, envs, args, step, "cpu")
            official_eval, _, _ = evaluate_vgf_multiple(agent=agent, env=official_env, eval_step_list=[0, 1, 2, 3],
                                                        config=config, num_eval_episodes=cli.eval_episodes)
            assert torch.equal(our_params(ours), before[0]) and torch.equal(torch.get_rng_state(), before[1])
            assert all(np.array_equal(official_before[k], v) for k, v in official_arrays(agent).items())
            rows.append(dict(evaluation=step, ours=[r["success_rate"] for r in ours_eval],
                             official=[float(s["success"]) for s in official_eval]))
            print(json.dumps(rows[-1]), flush=True)
    if cli.out:
        with open(cli.out, "w") as f:
            json.dump(dict(setting=SETTING, updates=cli.updates, seed=cli.seed, perturb=cli.perturb, rows=rows), f,
                      indent=1)
        print(f"wrote {cli.out}")


if __name__ == "__main__":
    main()
