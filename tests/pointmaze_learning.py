"""Learning beside the official program on OGBench pointmaze-medium-navigate (task 1), with power: both programs at
the README's pointmaze setting on the same data file, several seeds, success and final distance to the goal at every
L_test (not a test).

    python tests/pointmaze_learning.py ours --seed 0 --dataset-dir DATA --out RUNS/ours_s0
    <official venv python> tests/pointmaze_learning.py official --checkout VGF --seed 0 --dataset-dir DATA \
        --out RUNS/official_s0
    python tests/pointmaze_learning.py table RUNS/ours_s* RUNS/official_s* --markdown docs/x.md --plot docs/x.png

Each program trains unchanged through its own entry point (ours: vgf_offline.main, eager, float32; official: its
main.py with absl flags). The only addition is a recorder around each program's evaluation environment that writes,
for every evaluation episode, the final x, y position, the goal and whether the episode succeeded, to
OUT/episodes.jsonl (`program`, `seed`, `step`, `L_test`, `success`, `distance`). Evaluations: ours every 10,000
updates; the official program at update 1 and every 10,000 (its main.py), 30 episodes per L_test in both.

`table` reads those files: per program, update and L_test the mean over seeds of each seed's success rate and mean
final distance, with standard errors over seeds, and at the last update Welch's t-test and an exact permutation
test of the difference between the programs (seeds as the unit); then each seed at the last update, and Fisher's exact
test of how many seeds of each program succeed there at L_test 0.
"""
import argparse
import itertools
import json
import math
import os
import sys
import types

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
SETTING = dict(hidden_dims=[64, 64], batch_size=256, num_particles=10, bc_flow_steps=5, train_transport_steps=5,
               transport_step_size=0.1, alpha=0.05, discount=0.99, target_q_agg="mean", tau=0.05)
ENV_ID = "pointmaze-medium-navigate-singletask-v0"


class EpisodeRecorder:
    """Wraps an evaluation environment; at the end of each episode appends (success, final x, y, goal x, y)."""

    def __init__(self, env):
        self.env, self.finished = env, []

    def __getattr__(self, name):
        return getattr(self.env, name)

    def reset(self, *args, **kwargs):
        return self.env.reset(*args, **kwargs)

    def step(self, action):
        out = self.env.step(action)
        terminated, truncated, info = out[2], out[3], out[4]
        if terminated or truncated:
            base = self.env.unwrapped
            xy, goal = np.asarray(base.get_xy(), float), np.asarray(base.cur_goal_xy, float)
            self.finished.append(dict(success=float(info.get("success", 0.0)), xy=xy.tolist(), goal=goal.tolist(),
                                      distance=float(np.linalg.norm(xy - goal))))
        return out


def write_episodes(out, program, seed, step, L_test, episodes):
    with open(os.path.join(out, "episodes.jsonl"), "a") as f:
        for episode in episodes:
            f.write(json.dumps(dict(program=program, seed=seed, step=step, L_test=L_test, **episode)) + "\n")


def run_ours(cli):
    sys.path.insert(0, os.path.dirname(HERE))
    import vgf_offline as vgf

    os.makedirs(cli.out, exist_ok=True)
    make_eval_env, evaluate = vgf.make_eval_env, vgf.evaluate
    vgf.make_eval_env = lambda env_id: EpisodeRecorder(make_eval_env(env_id))

    def recorded_evaluate(agent, envs, args, transport_steps, seed, device):
        for env in envs:
            env.finished.clear()
        row = evaluate(agent, envs, args, transport_steps, seed, device)
        write_episodes(cli.out, "vgf_offline.py", cli.seed, current["step"], transport_steps,
                       [env.finished[-1] for env in envs])
        return row

    evaluate_all = vgf.evaluate_all
    current = {}

    def recorded_evaluate_all(agent, envs, args, step, device, writer=None, run_dir=None):
        current["step"] = step
        return evaluate_all(agent, envs, args, step, device, writer, run_dir)

    vgf.evaluate, vgf.evaluate_all = recorded_evaluate, recorded_evaluate_all
    args = vgf.Args(env_id=ENV_ID, seed=cli.seed, dataset_dir=cli.dataset_dir, output_dir=cli.out, run_name="run",
                    total_steps=cli.steps, eval_every=cli.eval_every, eval_episodes=cli.episodes, cuda=False,
                    compile=False, threads=1, **SETTING)
    vgf.main(args)


def run_official(cli):
    """The official main.py, its flags as the README's command; its evaluation environment wrapped by the recorder."""
    for name in ("wandb", "gym", "d4rl"):  # imported, not used for OGBench (wandb: init/log do nothing)
        sys.modules.setdefault(name, types.ModuleType(name))
    wandb = sys.modules["wandb"]
    wandb.run = types.SimpleNamespace(project="vgf")
    wandb.init = lambda *a, **k: wandb.run
    wandb.log = lambda *a, **k: None
    wandb.Settings = lambda *a, **k: None
    wandb.Image = wandb.Video = wandb.Histogram = type("Media", (), {})
    sys.modules["gym"].envs = types.SimpleNamespace(registry=types.SimpleNamespace(all=lambda: []))
    try:
        import distrax  # noqa: F401
    except ImportError:
        sys.modules["distrax"] = types.SimpleNamespace(Transformed=object)
    os.makedirs(cli.out, exist_ok=True)
    os.environ["HOME"] = os.path.abspath(os.path.join(cli.out, "home"))  # ~/.ogbench/data -> the data folder
    os.makedirs(os.path.join(os.environ["HOME"], ".ogbench"), exist_ok=True)
    link = os.path.join(os.environ["HOME"], ".ogbench", "data")
    if not os.path.exists(link):
        os.symlink(os.path.abspath(cli.dataset_dir), link)
    sys.path.insert(0, os.path.abspath(cli.checkout))
    os.chdir(cli.checkout)
    sys.argv = ["main.py", f"--env_name=ogbench:{ENV_ID}", f"--seed={cli.seed}", f"--offline_steps={cli.steps}",
                f"--eval_interval={cli.eval_every}", f"--eval_episodes={cli.episodes}",
                f"--save_interval={cli.eval_every}", f"--save_dir={os.path.abspath(cli.out)}", "--agent=agents/vgf.py",
                "--agent.value_hidden_dims=(64,64)", "--agent.actor_hidden_dims=(64,64)",
                f"--agent.batch_size={SETTING['batch_size']}", f"--agent.discount={SETTING['discount']}",
                f"--agent.vgf_particles={SETTING['num_particles']}", f"--agent.bc_flow_steps={SETTING['bc_flow_steps']}",
                f"--agent.train_vgf_steps={SETTING['train_transport_steps']}",
                f"--agent.vgf_lr={SETTING['transport_step_size']}", f"--agent.vgf_alpha={SETTING['alpha']}",
                f"--agent.train_q_agg={SETTING['target_q_agg']}", f"--agent.tau={SETTING['tau']}"]
    import main as official
    import utils.evaluation as evaluation
    from absl import app

    make_env_and_datasets = official.make_env_and_datasets
    recorders = []

    def recorded_make(*args, **kwargs):
        env, eval_env, *rest = make_env_and_datasets(*args, **kwargs)
        recorders.append(EpisodeRecorder(eval_env))
        return (env, recorders[-1], *rest)

    official.make_env_and_datasets = recorded_make
    schedule = iter([1] + list(range(cli.eval_every, cli.steps + 1, cli.eval_every)))  # main.py's evaluations
    evaluate_single, evaluate_multiple = evaluation.evaluate_vgf_single, official.evaluate_vgf_multiple
    current = {}

    def recorded_single(agent, env, eval_vgf_step, **kwargs):
        env.finished.clear()
        out = evaluate_single(agent=agent, env=env, eval_vgf_step=eval_vgf_step, **kwargs)
        write_episodes(cli.out, "official", cli.seed, current["step"], eval_vgf_step, env.finished)
        return out

    def recorded_multiple(*args, **kwargs):
        current["step"] = next(schedule)
        return evaluate_multiple(*args, **kwargs)

    evaluation.evaluate_vgf_single, official.evaluate_vgf_multiple = recorded_single, recorded_multiple
    app.run(official.main)


def read_episodes(folders):
    rows = []
    for folder in folders:
        with open(os.path.join(folder, "episodes.jsonl")) as f:
            rows += [json.loads(line) for line in f]
    return rows


def welch(a, b):
    """Welch's t statistic and two-sided p-value (t distribution, Welch-Satterthwaite degrees of freedom)."""
    from scipy import stats

    if np.var(a, ddof=1) + np.var(b, ddof=1) == 0:
        return float("nan"), 1.0 if np.mean(a) == np.mean(b) else 0.0
    t, p = stats.ttest_ind(a, b, equal_var=False)
    return float(t), float(p)


def permutation_p(a, b):
    """Exact two-sided permutation test of the difference of means (every split of the pooled seeds)."""
    pooled, n = np.concatenate([a, b]), len(a)
    observed = abs(np.mean(a) - np.mean(b))
    count = total = 0
    for chosen in itertools.combinations(range(len(pooled)), n):
        mask = np.zeros(len(pooled), bool)
        mask[list(chosen)] = True
        count += abs(pooled[mask].mean() - pooled[~mask].mean()) >= observed - 1e-12
        total += 1
    return count / total


def table(cli):
    rows = read_episodes(cli.folders)
    programs = sorted({r["program"] for r in rows}, key=lambda p: p != "vgf_offline.py")
    steps = sorted({r["step"] for r in rows if r["step"] > 1})
    per_seed = {}  # (program, step, L) -> {seed: (success rate, mean distance, episodes)}
    for r in rows:
        per_seed.setdefault((r["program"], r["step"], r["L_test"]), {}).setdefault(r["seed"], []).append(r)
    lines = ["| program | update | L_test | seeds | success % (mean ± SE over seeds) | final distance to goal |",
             "| --- | --- | --- | --- | --- | --- |"]
    summary = {}
    for program in programs:
        for step in steps:
            for L in range(4):
                seeds = per_seed.get((program, step, L), {})
                if not seeds:
                    continue
                success = np.array([100 * np.mean([e["success"] for e in eps]) for eps in seeds.values()])
                distance = np.array([np.mean([e["distance"] for e in eps]) for eps in seeds.values()])
                episodes = sorted({len(eps) for eps in seeds.values()})
                se = lambda x: x.std(ddof=1) / math.sqrt(len(x)) if len(x) > 1 else float("nan")
                summary[(program, step, L)] = (success, distance)
                lines.append(f"| {program} | {step:,} | {L} | {len(seeds)} ({'/'.join(map(str, episodes))} episodes) | "
                             f"{success.mean():.1f} ± {se(success):.1f} | {distance.mean():.2f} ± {se(distance):.2f} |")
    tests = ["", "| L_test | update | success: ours - official | Welch p | permutation p | distance: ours - official | "
                 "Welch p | permutation p |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    if len(programs) == 2:
        for step in steps:
            for L in range(4):
                if (programs[0], step, L) not in summary or (programs[1], step, L) not in summary:
                    continue
                (s0, d0), (s1, d1) = summary[(programs[0], step, L)], summary[(programs[1], step, L)]
                tests.append(f"| {L} | {step:,} | {s0.mean() - s1.mean():+.1f} | {welch(s0, s1)[1]:.2f} | "
                             f"{permutation_p(s0, s1):.2f} | {d0.mean() - d1.mean():+.2f} | {welch(d0, d1)[1]:.2f} | "
                             f"{permutation_p(d0, d1):.2f} |")
    last = steps[-1] if steps else None
    by_seed = ["", f"Each seed at update {last:,}: success % / mean final distance to the goal, per L_test", "",
               "| program | seed | L_test = 0 | 1 | 2 | 3 |", "| --- | --- | --- | --- | --- | --- |"]
    succeeded = {}  # program -> [seeds with any success at L_test 0 at the last update, seeds]
    for program in programs:
        for seed in sorted(per_seed.get((program, last, 0), {})):
            cells = []
            for L in range(4):
                episodes = per_seed.get((program, last, L), {}).get(seed, [])
                success = 100 * np.mean([e["success"] for e in episodes]) if episodes else float("nan")
                cells.append(f"{success:.0f} / {np.mean([e['distance'] for e in episodes]):.1f}" if episodes else "")
                if L == 0:
                    count = succeeded.setdefault(program, [0, 0])
                    count[0] += 1 if success > 0 else 0
                    count[1] += 1
            by_seed.append(f"| {program} | {seed} | " + " | ".join(cells) + " |")
    if len(programs) == 2 and all(program in succeeded for program in programs):
        from scipy import stats

        (k0, n0), (k1, n1) = succeeded[programs[0]], succeeded[programs[1]]
        p_value = stats.fisher_exact([[k0, n0 - k0], [k1, n1 - k1]], alternative="two-sided")[1]
        by_seed += ["", f"Seeds with any success at L_test 0 at update {last:,}: {programs[0]} {k0} of {n0}, "
                        f"{programs[1]} {k1} of {n1} (Fisher's exact test, two-sided: p = {p_value:.2f})."]
    text = "\n".join(lines + tests + by_seed) + "\n"
    print(text)
    if cli.markdown:
        with open(cli.markdown, "w") as f:
            f.write(text)
    if cli.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(2, 4, figsize=(14, 6), sharex=True)
        for L in range(4):
            for program, style in zip(programs, ("-o", "--s")):
                points = [(step, *summary[(program, step, L)]) for step in steps if (program, step, L) in summary]
                if not points:
                    continue
                x = [p[0] for p in points]
                for row, index, label in ((0, 1, "success (%)"), (1, 2, "final distance to goal")):
                    values = [p[index] for p in points]
                    mean = [v.mean() for v in values]
                    err = [v.std(ddof=1) / math.sqrt(len(v)) if len(v) > 1 else 0 for v in values]
                    axes[row, L].errorbar(x, mean, yerr=err, fmt=style, capsize=3, label=program)
                    axes[row, L].set_ylabel(label if L == 0 else "")
            axes[0, L].set_title(f"L_test = {L}")
            axes[0, L].set_ylim(-5, 105)
            axes[1, L].set_xlabel("update")
        axes[0, 0].legend()
        fig.suptitle("pointmaze-medium-navigate task 1: mean ± SE over seeds")
        fig.tight_layout()
        fig.savefig(cli.plot, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    for mode in ("ours", "official"):
        p = sub.add_parser(mode)
        p.add_argument("--seed", type=int, required=True)
        p.add_argument("--dataset-dir", required=True, help="folder with pointmaze-medium-navigate-v0(-val).npz")
        p.add_argument("--out", required=True)
        p.add_argument("--steps", type=int, default=30000)
        p.add_argument("--eval-every", type=int, default=10000)
        p.add_argument("--episodes", type=int, default=30)
        if mode == "official":
            p.add_argument("--checkout", required=True, help="a checkout of github.com/ryanxhr/vgf")
    p = sub.add_parser("table")
    p.add_argument("folders", nargs="+")
    p.add_argument("--markdown", default=None)
    p.add_argument("--plot", default=None)
    cli = parser.parse_args()
    {"ours": run_ours, "official": run_official, "table": table}[cli.mode](cli)


if __name__ == "__main__":
    main()
