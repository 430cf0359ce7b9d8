"""Time gradient updates of the official JAX VGF agent (github.com/ryanxhr/vgf) on a synthetic dataset, for a
side-by-side comparison with tests/bench_offline.py (which calls this script with --official-repo).

The official code is not part of this project: clone it yourself and pass its folder; it is imported at run time.

    git clone https://github.com/ryanxhr/vgf /tmp/vgf && pip install jax flax optax ml_collections
    python tests/official_vgf_bench.py --repo /tmp/vgf --hidden-dims 256 256 --iters 30 --json out.json
"""
import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

OBS_DIM, ACT_DIM, DATASET_SIZE = 28, 5, 100_000  # OGBench cube-single-play shapes


def _synthetic_dataset(size, seed=0):
    rng = np.random.default_rng(seed)
    f32 = np.float32
    terminals = (rng.random(size) < 0.005).astype(f32)
    return {
        'observations': rng.standard_normal((size, OBS_DIM)).astype(f32),
        'actions': rng.uniform(-1, 1, (size, ACT_DIM)).astype(f32),
        'rewards': rng.uniform(-1, 0, size).astype(f32),
        'masks': 1.0 - terminals,
        'next_observations': rng.standard_normal((size, OBS_DIM)).astype(f32),
        'terminals': terminals,
    }


def _sample(data, batch_size):
    """Like the official Dataset.sample: numpy random indices, numpy arrays handed to the jitted update."""
    idxs = np.random.randint(len(data['observations']), size=batch_size)
    return {k: v[idxs] for k, v in data.items()}


def make_official(repo, hidden_dims, batch_size=256, num_particles=10, flow_steps=10, transport_steps=3, seed=0):
    """The official agent (OGBench cube-single settings: mean aggregation, step size 0.05, alpha 0.2, L2 critic with
    LayerNorm, flow without) and a function that runs n updates and returns (wall seconds, CPU seconds); compiled and
    warmed up. The first update (trace + XLA compile) is timed separately."""
    repo = os.path.abspath(repo)
    if repo not in sys.path:
        sys.path.insert(0, repo)
    import jax

    try:
        import distrax  # noqa: F401
    except ImportError:  # utils/networks.py subclasses distrax.Transformed for its Gaussian actor only (unused here)
        import types

        sys.modules["distrax"] = types.SimpleNamespace(Transformed=object)
    from agents.vgf import VGFAgent, get_config

    config = get_config()
    config.update(dict(
        batch_size=batch_size, vgf_particles=num_particles, bc_flow_steps=flow_steps,
        train_vgf_steps=transport_steps, vgf_lr=0.05, vgf_alpha=0.2, discount=0.99,
        train_q_agg='mean', vgf_q_agg='mean', layer_norm=True, actor_layer_norm=False,
        bc_policy_type='flow', train_particle_select='mean', critic_loss='td',
        value_hidden_dims=tuple(hidden_dims), actor_hidden_dims=tuple(hidden_dims)))
    np.random.seed(seed)
    data = _synthetic_dataset(DATASET_SIZE, seed)
    state = {'agent': VGFAgent.create(seed, np.zeros((1, OBS_DIM), np.float32), np.zeros((1, ACT_DIM), np.float32),
                                      config)}

    def run(n):
        wall, cpu = time.perf_counter(), time.process_time()
        agent = state['agent']
        for _ in range(n):
            agent, info = agent.update(_sample(data, batch_size))
        jax.block_until_ready((agent, info))
        assert np.isfinite(float(info['critic_loss']))
        state['agent'] = agent
        return time.perf_counter() - wall, time.process_time() - cpu

    compile_s = run(1)[0]  # trace + XLA compile + one update
    run(3)  # extra warm-up
    return run, compile_s, jax


def time_official(repo, hidden_dims, batch_size=256, num_particles=10, flow_steps=10,
                  transport_steps=3, iters=30, repeats=3, seed=0):
    """Return updates/s (median of `repeats` runs of `iters` updates, compile excluded) of the official agent."""
    load_start = list(os.getloadavg())
    run, compile_s, jax = make_official(repo, hidden_dims, batch_size, num_particles, flow_steps, transport_steps,
                                        seed)
    rates = [iters / run(iters)[0] for _ in range(repeats)]
    return {
        'impl': 'official-jax', 'hidden_dims': list(hidden_dims), 'batch_size': batch_size,
        'num_particles': num_particles, 'flow_steps': flow_steps, 'transport_steps': transport_steps,
        'iters': iters, 'repeats': repeats,
        'updates_per_s': statistics.median(rates), 'updates_per_s_all': rates, 'compile_s': compile_s,
        'device': str(jax.devices()[0]), 'jax_version': jax.__version__,
        'load_avg': list(os.getloadavg()), 'load_avg_start': load_start,
    }


def serve(repo, hidden_dims, batch_size, num_particles, flow_steps, transport_steps):
    """Alternating timing (tests/bench_offline.py --official-repo): build and warm up the agent, print one JSON line
    (ready), then for every line "n" on stdin run n updates and print {"wall_s", "cpu_s"}; an empty line ends."""
    run, compile_s, jax = make_official(repo, hidden_dims, batch_size, num_particles, flow_steps, transport_steps)
    print(json.dumps({'ready': True, 'compile_s': compile_s, 'device': str(jax.devices()[0]),
                      'jax_version': jax.__version__, 'xla_flags': os.environ.get('XLA_FLAGS', '')}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            break
        wall, cpu = run(int(line))
        print(json.dumps({'wall_s': wall, 'cpu_s': cpu}), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--repo', required=True, help='a checkout of github.com/ryanxhr/vgf')
    p.add_argument('--hidden-dims', type=int, nargs='+', default=[512, 512, 512, 512])
    p.add_argument('--batch-size', type=int, default=256)
    p.add_argument('--particles', type=int, default=10)
    p.add_argument('--flow-steps', type=int, default=10)
    p.add_argument('--transport-steps', type=int, default=3)
    p.add_argument('--iters', type=int, default=30)
    p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--json', default=None, help='write the result here (- : one line on stdout)')
    p.add_argument('--serve', action='store_true', help='alternating timing for tests/bench_offline.py (stdin/stdout)')
    a = p.parse_args()
    if a.serve:
        serve(a.repo, a.hidden_dims, a.batch_size, a.particles, a.flow_steps, a.transport_steps)
        return
    res = time_official(a.repo, a.hidden_dims, a.batch_size, a.particles, a.flow_steps,
                        a.transport_steps, a.iters, a.repeats)
    if a.json == '-':
        print(json.dumps(res))
        return
    print(json.dumps(res, indent=1))
    if a.json:
        with open(a.json, 'w') as f:
            json.dump(res, f, indent=1)


if __name__ == '__main__':
    main()
