"""Regenerate tests/data/official_parity.npz by running the official VGF code (github.com/ryanxhr/vgf, JAX/flax).

    python tests/make_official_parity.py /path/to/vgf-checkout [--out tests/data/official_parity.npz]

Needs jax, jaxlib, flax, optax, ml_collections and numpy (CPU JAX is enough; `distrax` is stubbed when missing, as
the agents do not use it with the flow policy). The official agents are imported from the checkout at run time and
driven through their own functions (`create`, `update`, `sample_actions`), in float64 (jax_enable_x64) and with JIT
disabled so that every random draw (jax.random.normal / uniform) and the inputs of the target critic can be
recorded as they happen. What is stored:
  <agent>/init/<net>/<flax path>      initial parameters (default init + N(0, 0.1^2), so no tensor is trivial)
  <agent>/batch<k>/<key>              the batch of update k (k = 1..5)
  <agent>/update<k>/target_x0         x_0 of the reference sampler at s' [B * N, A] (row b * N + i), flow_x0 [B, A],
                                      flow_t [B, 1]: what update k drew
  <agent>/update<k>/reference         reference samples at s' [B, N, A]; particles: after L_train transport steps;
                                      target_q: Q_target(s', particles) [E, B * N]; td_target [B];
                                      critic_loss, bc_loss (and score_loss for the amortised agent)
  <agent>/after<k>/<net>/<flax path>  parameters after k = 1 and k = 5 updates (critic, target_critic, actor_bc,
                                      q_grad)
  <agent>/act/observations, x0, L<l>  acting at L_test = l in 0..3 with the initial parameters and fixed noise
  config                              json: CONFIG, with AGENTS (each agent's changes to it) under "agents"
Agents (AGENTS): vgf (N 5, the D4RL setting: min aggregation), vgf_n10 (N 10: N^2 = 100 pairwise distances, so
the median bandwidth is the mean of two middle values), vgf_ogbench (the OGBench setting of the run scripts: mean
aggregation, L_train 3, eps 0.05, alpha 0.2, discount 0.995, N 10), all from the same initial parameters, and avgf
(amortised, N 5).
"""
import argparse
import json
import os
import sys
import types

import numpy as np

CONFIG = dict(obs_dim=6, action_dim=3, hidden=(32, 32), batch_size=16, particles=5, bc_flow_steps=4,
              train_vgf_steps=2, vgf_lr=0.1, vgf_alpha=0.1, discount=0.99, tau=0.005, lr=3e-4, train_q_agg="min",
              vgf_q_agg="mean", updates=5, act_states=4, act_steps=(0, 1, 2, 3), init_noise=0.1)
AGENTS = dict(vgf={}, vgf_n10=dict(particles=10),
              vgf_ogbench=dict(particles=10, train_q_agg="mean", train_vgf_steps=3, vgf_lr=0.05, vgf_alpha=0.2,
                               discount=0.995),
              avgf={})


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkout", help="path of a checkout of github.com/ryanxhr/vgf (commit 3ec8f9b)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "data", "official_parity.npz"))
    cli = parser.parse_args()
    if not os.path.isfile(os.path.join(cli.checkout, "agents", "vgf.py")):
        sys.exit(f"error: {cli.checkout} holds no agents/vgf.py; pass the root of a checkout of ryanxhr/vgf")
    try:
        import jax
        import jax.numpy as jnp
    except ImportError:
        sys.exit("error: this script needs JAX: pip install jax jaxlib flax optax ml_collections")
    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_platforms", "cpu")
    import flax
    from flax import traverse_util

    try:
        import distrax  # noqa: F401
    except ImportError:  # utils/networks.py subclasses distrax.Transformed for its Gaussian actor only
        sys.modules["distrax"] = types.SimpleNamespace(Transformed=object)
    sys.path.insert(0, os.path.abspath(cli.checkout))
    import agents.a_vgf as a_vgf
    import agents.vgf as vgf
    from utils.flax_utils import TrainState

    c = CONFIG
    rng = np.random.default_rng(0)
    out = {"config": np.array(json.dumps({**c, "agents": AGENTS}))}

    def make_batch():
        b, s, a = c["batch_size"], c["obs_dim"], c["action_dim"]
        return dict(observations=rng.normal(size=(b, s)), actions=rng.uniform(-0.9, 0.9, (b, a)),
                    rewards=rng.normal(size=b), next_observations=rng.normal(size=(b, s)),
                    masks=(rng.uniform(size=b) > 0.2).astype(np.float64))

    batches = [make_batch() for _ in range(c["updates"])]
    act_obs = rng.normal(size=(c["act_states"], c["obs_dim"]))

    # Recorders: every random draw and every call of the target critic, while JIT is disabled.
    draws, target_calls, inits = [], [], []
    normal, uniform = jax.random.normal, jax.random.uniform

    def recorder(kind, draw):
        def rec(*a, **k):
            x = draw(*a, **k)
            if not isinstance(x, jax.core.Tracer):  # parameter initialisers may run under a trace
                draws.append((kind, np.asarray(x)))
            return x
        return rec

    rec_normal, rec_uniform = recorder("normal", normal), recorder("uniform", uniform)

    jax.random.normal, jax.random.uniform = rec_normal, rec_uniform
    ts_call = TrainState.__call__
    current = {}

    def rec_call(self, *a, **k):
        y = ts_call(self, *a, **k)
        if self is current.get("target"):
            target_calls.append((np.asarray(k["actions"]), np.asarray(y)))
        return y

    TrainState.__call__ = rec_call
    for module in (vgf, a_vgf):
        init = module.SVGD_VGF.init

        def rec_init(self, particles, _init=init):
            inits.append(np.asarray(particles))
            return _init(self, particles)

        module.SVGD_VGF.init = rec_init

    def flat(params):
        return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/").items()}

    def store_params(prefix, agent, nets):
        for net in nets:
            for k, v in flat(getattr(agent, net).params).items():
                out[f"{prefix}/{net}/{k}"] = v

    def official_config(name):
        a = {**c, **AGENTS[name]}
        return dict(value_hidden_dims=a["hidden"], actor_hidden_dims=a["hidden"], vgf_particles=a["particles"],
                    bc_flow_steps=a["bc_flow_steps"], train_vgf_steps=a["train_vgf_steps"], vgf_lr=a["vgf_lr"],
                    vgf_alpha=a["vgf_alpha"], discount=a["discount"], tau=a["tau"], value_lr=a["lr"],
                    actor_lr=a["lr"], train_q_agg=a["train_q_agg"], vgf_q_agg=a["vgf_q_agg"])

    def create(module, cls, name):
        config = {**module.get_config(), **official_config(name)}
        agent = cls.create(0, jnp.asarray(batches[0]["observations"][:1]), jnp.asarray(batches[0]["actions"][:1]),
                           config)
        # float64 parameters (flax keeps float32 parameters otherwise), perturbed so that biases and LayerNorm
        # scales are not 0 / 1; optimiser states re-initialised for them
        key = jax.random.PRNGKey(1)
        nets = [name for name in ("critic", "actor_bc", "q_grad") if hasattr(agent, name)]
        for net in nets:
            leaves, tree = jax.tree_util.tree_flatten(getattr(agent, net).params)
            keys = jax.random.split(key, len(leaves) + 1)
            key = keys[0]
            leaves = [jnp.asarray(x, jnp.float64) + c["init_noise"] * normal(k, x.shape, jnp.float64)
                      for x, k in zip(leaves, keys[1:])]
            params = jax.tree_util.tree_unflatten(tree, leaves)
            state = getattr(agent, net)
            agent = agent.replace(**{net: state.replace(params=params, opt_state=state.tx.init(params))})
        agent = agent.replace(target_critic=agent.target_critic.replace(params=agent.critic.params))
        return agent, nets + ["target_critic"]

    def run_updates(name, agent, nets):
        cfg = {**c, **AGENTS[name]}
        n = cfg["particles"]
        store_params(f"{name}/init", agent, nets)
        for k in range(1, c["updates"] + 1):
            batch = batches[k - 1]
            draws.clear(), target_calls.clear(), inits.clear()
            current["target"] = agent.target_critic
            q1, q2 = agent.critic(jnp.asarray(batch["observations"]), actions=jnp.asarray(batch["actions"]))
            with jax.disable_jit():
                agent, info = agent.update({key: jnp.asarray(v) for key, v in batch.items()})
            (_, x0_target), (_, x0_flow), (_, t_flow) = draws  # critic loss first, then the flow loss
            (actions, target_q), = target_calls
            b, a = c["batch_size"], c["action_dim"]
            assert x0_target.shape == (b * n, a) and x0_flow.shape == (b, a) and t_flow.shape == (b, 1)
            agg = target_q.min(0) if cfg["train_q_agg"] == "min" else target_q.mean(0)
            td_target = batch["rewards"] + cfg["discount"] * batch["masks"] * agg.reshape(b, n).mean(1)
            # the TD target rebuilt from the recorded Q_target values reproduces the official critic loss
            loss = ((td_target - np.asarray(q1)) ** 2 + (td_target - np.asarray(q2)) ** 2).mean()
            assert abs(loss - float(info["critic_loss"])) < 1e-12, (loss, info["critic_loss"])
            u = f"{name}/update{k}"
            for key, v in batch.items():
                out[f"{name}/batch{k}/{key}"] = v
            out.update({f"{u}/target_x0": x0_target, f"{u}/flow_x0": x0_flow, f"{u}/flow_t": t_flow,
                        f"{u}/reference": inits[0], f"{u}/particles": actions.reshape(b, n, a),
                        f"{u}/target_q": target_q, f"{u}/td_target": td_target,
                        f"{u}/critic_loss": np.asarray(info["critic_loss"]),
                        f"{u}/bc_loss": np.asarray(info["bc_loss"])})
            if "q_grad_loss" in info:
                out[f"{u}/score_loss"] = np.asarray(info["q_grad_loss"])
            if k in (1, 5):
                store_params(f"{name}/after{k}", agent, nets)
            print(f"{name} update {k}: critic loss {float(info['critic_loss']):.6f}, "
                  f"bc loss {float(info['bc_loss']):.6f}")
        return agent

    def run_acting(name, agent):
        n = agent.config["vgf_particles"]
        out[f"{name}/act/observations"] = act_obs
        noise = None
        for steps in c["act_steps"]:
            actions = []
            draws.clear()
            with jax.disable_jit():
                for i, obs in enumerate(act_obs):  # the official sampler acts on one state at a time
                    actions.append(np.asarray(agent.sample_actions(jnp.asarray(obs), seed=jax.random.PRNGKey(100 + i),
                                                                   eval_vgf_steps=steps)))
            x0 = np.concatenate([d for _, d in draws])
            assert x0.shape == (len(act_obs) * n, c["action_dim"])
            assert noise is None or np.array_equal(noise, x0)  # the same noise at every L_test
            noise = x0
            out[f"{name}/act/L{steps}"] = np.stack(actions)
        out[f"{name}/act/x0"] = noise

    agent, nets = create(vgf, vgf.VGFAgent, "vgf")
    for name in ("vgf", "vgf_n10", "vgf_ogbench"):  # the same initial parameters, each agent's configuration
        variant = agent.replace(config=flax.core.FrozenDict({**agent.config, **official_config(name)}))
        if name != "vgf_n10":
            run_acting(name, variant)
        run_updates(name, variant, nets)
    agent, nets = create(a_vgf, a_vgf.AVGFAgent, "avgf")
    run_acting("avgf", agent)
    run_updates("avgf", agent, nets)

    os.makedirs(os.path.dirname(os.path.abspath(cli.out)), exist_ok=True)
    np.savez_compressed(cli.out, **out)
    print(f"wrote {cli.out} ({os.path.getsize(cli.out) / 1024:.0f} KiB, {len(out)} arrays)")


if __name__ == "__main__":
    main()
