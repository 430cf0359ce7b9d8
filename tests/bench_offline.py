"""Gradient updates per second, peak memory and achieved FLOP/s of vgf_offline.py's update, for each speed option
(not a test).

    python tests/bench_offline.py                      # paper and cube-single settings, on CPU and on CUDA if present
    python tests/bench_offline.py --quick              # CI-sized: tiny networks, a few updates
    python tests/bench_offline.py --interleave         # all options in one process, timed in alternating rounds
    python tests/bench_offline.py --official-repo DIR --official-python PY  # and the official JAX code beside them

By default every configuration runs in its own process (clean peak-memory numbers, no compile cache shared). With
--interleave the options of a setting are built in one process and timed round after round (median of --rounds),
so that on a shared machine they all see the same load; peak memory is then reported on CUDA only, as the memory
the update itself allocates.

With --official-repo (a checkout of github.com/ryanxhr/vgf; --official-python: an interpreter with jax, flax, optax
and ml_collections) the official agent, with the same hyperparameters, stays alive in a child process: each round
times it first, then each of our options (ABAB..., same load). On CPU everything runs on one thread and one core
(XLA's single-thread flags, torch.set_num_threads(1), both processes pinned to the same core); on CUDA, JAX uses the
GPU. Each round's ratio ours / official is reported (median, min-max), with the ratio of CPU seconds per update as
a check, and each side's CPU seconds per wall second (<= 1 on one core).

Prints a table and writes JSON (--out). Achieved GFLOP/s counts the matrix multiplies of one update (see
update_flops); h/1M is the hours one million updates take at that speed.
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = {  # name -> (obs_dim, act_dim, hidden_dims, batch, particles, flow_steps, transport_steps)
    "paper-4x512": (28, 5, [512] * 4, 256, 10, 10, 5),  # the paper's setting (L_train 5 as the D4RL scripts)
    "cube-single-4x512": (28, 5, [512] * 4, 256, 10, 10, 3),  # OGBench cube-single run-script settings
    "cube-single-2x256": (28, 5, [256] * 2, 256, 10, 10, 3),
    "quick": (11, 3, [32, 32], 32, 4, 3, 2),
}
OPTIONS = {  # name -> Args overrides; options with a CUDA-only part are skipped on the CPU. Exact float32 unless the
    # name says tf32 (CUDA)
    "eager": dict(tf32=False, compile=False),
    "compile": dict(tf32=False, compile=True),
    "eager+tf32": dict(tf32=True, compile=False),
    "compile+tf32": dict(tf32=True, compile=True),
    "compile+cudagraphs+tf32": dict(tf32=True, compile=True, cudagraphs=True),
}
DEVICE_ONLY = {"tf32": "cuda", "cudagraphs": "cuda"}


def update_flops(obs_dim, act_dim, hidden, batch, particles, flow_steps, transport_steps):
    """Matrix-multiply FLOPs of one update: flow sampling, transport (forward + input gradient of both critics),
    target critic, critic and flow losses (forward + backward)."""
    macs = lambda sizes: sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))
    critic, flow = macs([obs_dim + act_dim, *hidden, 1]), macs([obs_dim + act_dim + 1, *hidden, act_dim])
    m = batch * particles
    total = m * flow_steps * flow + transport_steps * 2 * m * critic * 2 + 2 * m * critic
    total += 3 * 2 * batch * critic + 3 * batch * flow
    return 2 * total


def make_update(setting, option, device):
    """A fresh agent (seed 0) for `setting` with `option`, and a function that samples a batch on the device (index
    tensor on the device, as vgf_offline.py's loop) and runs one update."""
    import torch

    sys.path.insert(0, ROOT)
    import vgf_offline as vgf

    obs_dim, act_dim, hidden, batch, n, k, L = SETTINGS[setting]
    torch.manual_seed(0)
    args = vgf.resolve_suite_defaults(vgf.Args(env_id="cube-single-play-singletask-v0", hidden_dims=hidden,
                                               batch_size=batch, num_particles=n, bc_flow_steps=k,
                                               train_transport_steps=L, **OPTIONS[option]))
    dev = torch.device(device)
    agent = vgf.Agent(obs_dim, act_dim, args).to(dev)
    size = 100_000
    data = {"observations": torch.randn(size, obs_dim, device=dev),
            "actions": torch.rand(size, act_dim, device=dev) * 2 - 1, "rewards": torch.randn(size, device=dev),
            "next_observations": torch.randn(size, obs_dim, device=dev), "masks": torch.ones(size, device=dev)}

    def step():
        if device == "cuda":  # a global switch: set for this option (options share a process)
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
        idx = torch.randint(0, size, (batch,), device=dev)
        return agent.update({key: v[idx] for key, v in data.items()})

    return agent, step


def result_row(setting, option, device, ups, warmup_s, peak_memory_mb):
    import torch

    flops = update_flops(*SETTINGS[setting])
    return dict(impl="ours-torch", setting=setting, option=option, device=device, updates_per_s=ups,
                hours_per_1m_updates=1e6 / ups / 3600, warmup_s=warmup_s, gflops_per_update=flops / 1e9,
                achieved_gflop_s=flops * ups / 1e9, peak_memory_mb=peak_memory_mb, torch=torch.__version__,
                threads=torch.get_num_threads(), device_name=torch.cuda.get_device_name() if device == "cuda" else
                "cpu", load_avg=os.getloadavg()[0])


def sync(device):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def run_one(setting, option, device, iters, warmup, threads=0):
    """Time `iters` updates after `warmup` ones (compilation and CUDA-graph capture included in warm-up)."""
    import resource

    import torch

    if threads:
        torch.set_num_threads(threads)

    agent, step = make_update(setting, option, device)
    start = time.time()
    for _ in range(warmup):
        step()
    sync(device)
    warmup_s = time.time() - start
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.time()
    for _ in range(iters):
        metrics = step()
    sync(device)
    elapsed = time.time() - start
    assert torch.isfinite(metrics["losses/critic_loss"]), "non-finite loss in the benchmark"
    return result_row(setting, option, device, iters / elapsed, warmup_s,
                      torch.cuda.max_memory_allocated() / 2**20 if device == "cuda"
                      else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def run_interleaved(setting, options, device, iters, warmup, rounds, official=None):
    """All `options` in this process: warm each up, then `rounds` rounds of `iters` updates of each in turn, the
    official agent's (`official`, an OfficialServer) first in each round when given."""
    import statistics

    import torch

    runs, rows = {}, []
    for option in options:
        start = time.time()
        agent, step = make_update(setting, option, device)
        for _ in range(warmup):
            step()
        sync(device)
        runs[option] = dict(step=step, warmup_s=time.time() - start, rates=[], cpu=[], peak=0.0)
    official_rates, official_cpu, loads = [], [], []
    for _ in range(rounds):
        loads.append(os.getloadavg()[0])
        if official is not None:
            wall, cpu = official.time(iters)
            official_rates.append(iters / wall)
            official_cpu.append(cpu / wall)
        for option, run in runs.items():
            base = torch.cuda.memory_allocated() if device == "cuda" else 0
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            start, cpu = time.perf_counter(), time.process_time()
            for _ in range(iters):
                metrics = run["step"]()
            sync(device)
            wall = time.perf_counter() - start
            run["rates"].append(iters / wall)
            run["cpu"].append((time.process_time() - cpu) / wall)
            assert torch.isfinite(metrics["losses/critic_loss"]), "non-finite loss in the benchmark"
            if device == "cuda":
                run["peak"] = max(run["peak"], (torch.cuda.max_memory_allocated() - base) / 2**20)
    if official is not None:
        flops = update_flops(*SETTINGS[setting])
        ups = statistics.median(official_rates)
        rows.append(dict(impl="official-jax", setting=setting, option="jit", device=device, updates_per_s=ups,
                         updates_per_s_rounds=official_rates, cpu_per_wall=max(official_cpu),
                         hours_per_1m_updates=1e6 / ups / 3600, warmup_s=official.info["compile_s"],
                         gflops_per_update=flops / 1e9, achieved_gflop_s=flops * ups / 1e9, peak_memory_mb=None,
                         jax=official.info["jax_version"], xla_flags=official.info["xla_flags"],
                         load_avg_rounds=loads, interleaved=True))
    for option, run in runs.items():
        row = dict(result_row(setting, option, device, statistics.median(run["rates"]), run["warmup_s"],
                              run["peak"] if device == "cuda" else None),
                   updates_per_s_rounds=run["rates"], cpu_per_wall=max(run["cpu"]), load_avg_rounds=loads,
                   interleaved=True)
        if official is not None:  # ours / official, round by round (same load)
            ratios = [a / b for a, b in zip(run["rates"], official_rates)]
            cpu_ratios = [a / c / (b / d) for a, b, c, d in zip(run["rates"], official_rates, run["cpu"], official_cpu)]
            row.update(ratio_rounds=ratios, ratio_median=statistics.median(ratios), ratio_min=min(ratios),
                       ratio_max=max(ratios), cpu_time_ratio_rounds=cpu_ratios,
                       cpu_time_ratio_median=statistics.median(cpu_ratios))
        rows.append(row)
    return rows


class OfficialServer:
    """The official agent alive in a child process (tests/official_vgf_bench.py --serve), timed on request."""

    def __init__(self, repo, python, setting, device):
        obs_dim, act_dim, hidden, batch, n, k, L = SETTINGS[setting]
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "official_vgf_bench.py")
        env = dict(os.environ, OMP_NUM_THREADS="1", JAX_PLATFORMS="cpu",  # XLA on one thread, as ours
                   XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1") \
            if device == "cpu" else dict(os.environ, JAX_PLATFORMS="cuda")
        self.proc = subprocess.Popen([python, script, "--serve", "--repo", repo, "--hidden-dims", *map(str, hidden),
                                      "--transport-steps", str(L), "--batch-size", str(batch), "--particles", str(n),
                                      "--flow-steps", str(k)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env)  # inherits this process's CPU affinity
        self.info = self._read()

    def _read(self):
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the official agent's process ended (exit code {self.proc.wait()}); see its stderr")
        return json.loads(line)

    def time(self, n):
        self.proc.stdin.write(f"{n}\n")
        self.proc.stdin.flush()
        result = self._read()
        return result["wall_s"], result["cpu_s"]

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.write("\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=["paper-4x512", "cube-single-4x512", "cube-single-2x256"],
                        choices=list(SETTINGS))
    parser.add_argument("--options", nargs="+", default=list(OPTIONS), choices=list(OPTIONS))
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu, and cuda when available")
    parser.add_argument("--iters", type=int, default=20, help="updates per timing (per round with --interleave)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--interleave", action="store_true", help="one process per setting, options in turns")
    parser.add_argument("--rounds", type=int, default=3, help="with --interleave: timing rounds per option")
    parser.add_argument("--quick", action="store_true", help="CI-sized: the tiny setting, eager options, 5 updates")
    parser.add_argument("--official-repo", default=None,
                        help="checkout of github.com/ryanxhr/vgf: time it beside ours in alternating rounds (CPU)")
    parser.add_argument("--official-python", default=sys.executable, help="interpreter that has jax/flax for it")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of PyTorch (0: PyTorch's default)")
    parser.add_argument("--cpu-core", type=int, default=None,
                        help="pin this process (and the official agent's) to this core; default with --official-repo: "
                             "the first allowed core; -1: no pinning")
    parser.add_argument("--out", default="bench_offline.json")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one configuration, JSON in/out
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(**json.loads(args.one))))
        return
    if args.quick:
        args.settings, args.options, args.iters, args.warmup = ["quick"], ["eager"], 5, 1
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.devices is None:
        args.devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if args.official_repo:
        args.interleave = True  # the official agent is timed in the same rounds, on the same device
        if args.cpu_core is None and args.devices == ["cpu"]:
            args.cpu_core = min(os.sched_getaffinity(0))
    if args.cpu_core is not None and args.cpu_core >= 0:
        os.sched_setaffinity(0, {args.cpu_core})
    results = []
    for setting in args.settings:
        for device in args.devices:
            options = [o for o in args.options
                       if not any(flag in o and device != only for flag, only in DEVICE_ONLY.items())]
            if args.interleave:
                official = OfficialServer(args.official_repo, args.official_python, setting, device) \
                    if args.official_repo else None
                try:
                    rows = run_interleaved(setting, options, device, args.iters, args.warmup, args.rounds, official)
                finally:
                    if official is not None:
                        official.close()
                results += rows
                print("\n".join(json.dumps(r) for r in rows), flush=True)
                continue
            for option in options:
                job = dict(setting=setting, option=option, device=device, iters=args.iters, warmup=args.warmup,
                           threads=args.threads)
                proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(job)], capture_output=True,
                                      text=True)
                if proc.returncode != 0:
                    results.append(dict(job, impl="ours-torch", error=proc.stderr[-500:]))
                else:
                    results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
                print(json.dumps(results[-1]))
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\n{'setting':20s} {'impl':13s} {'option':22s} {'device':6s} {'upd/s':>7s} {'h/1M':>6s} {'GFLOP/s':>7s} "
          f"{'peak MB':>7s} {'cpu/wall':>8s}  ours/official per round: median [min-max] (CPU-time ratio)")
    for r in results:
        if "error" in r:
            print(f"{r['setting']:20s} {r['impl']:13s} {r.get('option', ''):22s} {r.get('device', ''):6s}  error")
            continue
        memory = r.get("peak_memory_mb")
        ratio = f"  {r['ratio_median']:.2f}x [{r['ratio_min']:.2f}-{r['ratio_max']:.2f}] " \
            f"({r['cpu_time_ratio_median']:.2f}x)" if "ratio_median" in r else ""
        print(f"{r['setting']:20s} {r['impl']:13s} {r['option']:22s} {r.get('device', ''):6s} "
              f"{r['updates_per_s']:7.2f} {1e6 / r['updates_per_s'] / 3600:6.1f} "
              f"{r.get('achieved_gflop_s', float('nan')):7.1f} {'-' if memory is None else f'{memory:.0f}':>7s} "
              f"{r.get('cpu_per_wall', float('nan')):8.2f}{ratio}")
    loads = [x for r in results for x in r.get("load_avg_rounds", [])]
    if loads:
        print(f"load average (1 min) over the rounds: {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} cores; "
              f"torch threads {torch.get_num_threads()}, pinned to core {args.cpu_core}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
