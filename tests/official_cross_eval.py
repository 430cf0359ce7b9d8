"""Evaluate the same trained parameters with both programs' evaluation: ours (vgf_offline.evaluate) and the official
code's (utils/evaluation.evaluate_vgf_single, one environment, actions clipped to [-1, 1]). If both give the same
success rate and final positions for the same parameters, the acting path and the evaluation environments agree,
and a difference between learning curves comes from training.

Parameters travel as an npz in the official (flax) layout, with the configuration as json:
    python tests/official_cross_eval.py export-ours --checkpoint runs/x/checkpoint.pt --out ours.npz
    <official venv python> tests/official_cross_eval.py dump-official --checkout VGF \
        --params RUN/params_30000.pkl --flags RUN/flags.json --out official.npz
    <official venv python> tests/official_cross_eval.py evaluate-official --checkout VGF --params ours.npz
    python tests/official_cross_eval.py evaluate-ours --params official.npz [--dataset-dir DIR]
Each `evaluate-*` prints, for L_test 0..3, the success rate and the mean final x, y coordinate (OGBench's `xy`,
averaged over both coordinates and the episodes, as the official log reports it). The official side needs the
venv of tests/make_official_parity.py (jax, flax, optax, ml_collections, ogbench) with `wandb`, `gym`, `d4rl`
importable (stubs suffice); ours needs this project's requirements.
"""
import argparse
import json
import os
import sys

import numpy as np

KEYS = ("hidden_dims", "num_particles", "bc_flow_steps", "train_transport_steps", "transport_step_size", "alpha",
        "discount", "target_q_agg", "tau", "env_id", "obs_dim", "act_dim")


def flax_pairs(agent):
    """(our tensor, flax key, transposed) for the critic, the target critic and the behaviour flow."""
    import torch

    out = []
    for net, name in ((agent.critic, "critic"), (agent.target_critic, "target_critic")):
        for i, linear in enumerate(net.linears):
            p = f"{name}/value_net"
            out += [(linear.weight, f"{p}/Dense_{i}/kernel", False), (linear.bias, f"{p}/Dense_{i}/bias", False)]
            if i < len(net.norm_weights):
                out += [(net.norm_weights[i], f"{p}/LayerNorm_{i}/scale", False),
                        (net.norm_biases[i], f"{p}/LayerNorm_{i}/bias", False)]
    linears = [m for m in agent.flow.net if isinstance(m, torch.nn.Linear)]
    for i, linear in enumerate(linears):
        out += [(linear.weight, f"actor_bc/mlp/Dense_{i}/kernel", True),
                (linear.bias, f"actor_bc/mlp/Dense_{i}/bias", False)]
    return out


def ours(cli):
    import torch

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import vgf_offline as vgf

    if cli.mode == "export-ours":
        state = vgf.load_checkpoint(cli.checkpoint)
        args = vgf.Args(**{k: v for k, v in state["args"].items() if k in {f.name for f in vgf.fields(vgf.Args)}})
        agent = vgf.Agent(state["dims"]["obs_dim"], state["dims"]["act_dim"], args)
        vgf.restore_agent(agent, state, cli.checkpoint)
        config = {k: getattr(args, k) for k in KEYS[:-2]} | {k: state["dims"][k] for k in KEYS[-2:]}
        arrays = {}
        for tensor, key, transposed in flax_pairs(agent):
            a = tensor.detach().numpy()
            arrays[key] = a.T if transposed else a[:, 0] if a.ndim == 3 and a.shape[1] == 1 else a  # [E, 1, d] -> [E, d]
        np.savez(cli.out, config=json.dumps(config), **arrays)
        print(f"wrote {cli.out}: {len(arrays)} arrays, {config}")
        return
    with np.load(cli.params) as f:
        arrays, config = {k: f[k] for k in f.files if k != "config"}, json.loads(str(f["config"]))
    args = vgf.resolve_suite_defaults(vgf.Args(**{k: config[k] for k in KEYS[:-2]}, cuda=False, compile=False,
                                               dataset_dir=cli.dataset_dir))
    agent = vgf.Agent(config["obs_dim"], config["act_dim"], args)
    with torch.no_grad():
        for tensor, key, transposed in flax_pairs(agent):
            a = arrays.pop(key)
            tensor.copy_(torch.as_tensor(a.T if transposed else a).reshape(tensor.shape))
    assert not arrays, f"unused arrays: {sorted(arrays)}"
    envs = [vgf.make_eval_env(args.env_id) for _ in range(cli.episodes)]
    for L in (0, 1, 2, 3):
        row = vgf.evaluate(agent, envs, args, L, seed=cli.seed * 1_000_003 + 10_007 * L + 1, device="cpu")
        xy = float(np.mean([env.unwrapped.data.qpos[:2] for env in envs]))
        print(json.dumps(dict(program="ours", L_test=L, success=row["success_rate"], xy=round(xy, 3))))


def flatten(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        key = f"{prefix}/{k}" if prefix else k
        out.update(flatten(v, key) if hasattr(v, "items") else {key: v})
    return out


def official(cli):
    import pickle

    sys.path.insert(0, os.path.abspath(cli.checkout))
    if cli.mode == "dump-official":
        with open(cli.params, "rb") as f:
            state = flatten(pickle.load(f)["agent"])
        flags = json.load(open(cli.flags))
        a = flags["agent"]
        config = dict(hidden_dims=list(a["value_hidden_dims"]), num_particles=a["vgf_particles"],
                      bc_flow_steps=a["bc_flow_steps"], train_transport_steps=a["train_vgf_steps"],
                      transport_step_size=a["vgf_lr"], alpha=a["vgf_alpha"], discount=a["discount"],
                      target_q_agg=a["train_q_agg"], tau=a["tau"], env_id=flags["env_name"].split(":")[-1])
        arrays = {k.replace("/params/", "/"): np.asarray(v) for k, v in state.items()
                  if k.split("/")[0] in ("critic", "target_critic", "actor_bc") and "/params/" in k}
        out_dim = arrays[f"actor_bc/mlp/Dense_{len(config['hidden_dims'])}/bias"].shape[0]
        config |= dict(act_dim=int(out_dim), obs_dim=int(arrays["actor_bc/mlp/Dense_0/kernel"].shape[0]) - out_dim - 1)
        np.savez(cli.out, config=json.dumps(config), **arrays)
        print(f"wrote {cli.out}: {len(arrays)} arrays, {config}")
        return
    import importlib.util

    import flax
    import ogbench
    from envs.env_utils import EpisodeMonitor
    from utils.evaluation import evaluate_vgf_single

    with np.load(cli.params) as f:
        arrays, c = {k: f[k] for k in f.files if k != "config"}, json.loads(str(f["config"]))
    spec = importlib.util.spec_from_file_location("official_vgf", os.path.join(cli.checkout, "agents", "vgf.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.update(dict(value_hidden_dims=tuple(c["hidden_dims"]), actor_hidden_dims=tuple(c["hidden_dims"]),
                       vgf_particles=c["num_particles"], bc_flow_steps=c["bc_flow_steps"],
                       train_vgf_steps=c["train_transport_steps"], vgf_lr=c["transport_step_size"],
                       vgf_alpha=c["alpha"], discount=c["discount"], train_q_agg=c["target_q_agg"], tau=c["tau"]))
    agent = module.VGFAgent.create(0, np.zeros((1, c["obs_dim"]), np.float32), np.zeros((1, c["act_dim"]), np.float32),
                                   dict(config))
    state = flax.serialization.to_state_dict(agent)

    def put(tree, prefix=""):
        for k, v in tree.items():
            key = f"{prefix}/{k}" if prefix else k
            if hasattr(v, "items"):
                put(v, key)
            elif key.replace("/params/", "/") in arrays:
                new = arrays.pop(key.replace("/params/", "/"))
                assert new.shape == np.shape(v), (key, new.shape, np.shape(v))
                tree[k] = new

    put(state)
    assert not arrays, f"unused arrays: {sorted(arrays)}"
    agent = flax.serialization.from_state_dict(agent, state)
    env = EpisodeMonitor(ogbench.make_env_and_datasets(c["env_id"], env_only=True),
                         filter_regexes=[".*privileged.*", ".*proprio.*"])
    np.random.seed(cli.seed)  # the official evaluation draws its JAX key from numpy
    for L in (0, 1, 2, 3):
        stats = evaluate_vgf_single(agent, env, L, num_eval_episodes=cli.episodes)[0]
        print(json.dumps(dict(program="official", L_test=L, success=float(stats["success"]),
                              xy=round(float(np.mean(stats["xy"])), 3))))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["export-ours", "evaluate-ours", "dump-official", "evaluate-official"])
    parser.add_argument("--checkpoint", help="export-ours: our checkpoint.pt")
    parser.add_argument("--params", help="the npz to evaluate, or the official params_<step>.pkl to dump")
    parser.add_argument("--flags", help="dump-official: the official run's flags.json")
    parser.add_argument("--checkout", help="the official code's checkout (official modes)")
    parser.add_argument("--out", help="npz written by export-ours / dump-official")
    parser.add_argument("--dataset-dir", default=None, help="evaluate-ours: OGBench data folder")
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    cli = parser.parse_args()
    (official if cli.mode.endswith("official") else ours)(cli)
