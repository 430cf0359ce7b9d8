"""Learning curves of vgf_offline.py beside the official VGF code (github.com/ryanxhr/vgf), from their own logs.

    python tests/plot_learning_curves.py --ours RUN_DIR [RUN_DIR ...] --official SAVE_DIR [SAVE_DIR ...] \
        [--out docs/learning_curves_pointmaze.png] [--title TEXT]

--ours: run folders of vgf_offline.py (each holds eval.jsonl; the seed is read from its rows).
--official: folders given to the official main.py as --save_dir (its eval.csv is found below them; the seed is read
from the flags.json beside it). Success is in percent at each L_test in 0..3 (official columns
evaluation_<L>/success, ours score_mean of metric success_rate_percent). One panel per L_test: every seed as a thin
line, the mean over seeds as a thick one. A markdown table of every seed's numbers at every evaluation is printed.
"""
import argparse
import csv
import glob
import json
import os
import sys
from collections import defaultdict

import numpy as np

L_TESTS = (0, 1, 2, 3)


def read_ours(run_dir: str):
    """{L_test: [(step, success %)]} and the seed of one vgf_offline.py run."""
    path = os.path.join(run_dir, "eval.jsonl")
    if not os.path.isfile(path):
        sys.exit(f"error: {path} not found; --ours takes run folders of vgf_offline.py (they hold eval.jsonl)")
    curves, seed = defaultdict(list), None
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            if row.get("metric") != "success_rate_percent":
                sys.exit(f"error: {path} holds {row.get('metric')}, not OGBench success rates")
            curves[row["L_test"]].append((row["step"], row["score_mean"]))
            seed = row["seed"]
    return dict(curves), seed


def read_official(save_dir: str):
    """{L_test: [(step, success %)]} and the seed of one official main.py run (eval.csv below save_dir)."""
    found = sorted(glob.glob(os.path.join(save_dir, "**", "eval.csv"), recursive=True))
    if len(found) != 1:
        sys.exit(f"error: expected one eval.csv below {save_dir}, found {len(found)}; give each official run its own "
                 "--save_dir")
    with open(os.path.join(os.path.dirname(found[0]), "flags.json")) as f:
        seed = json.load(f)["seed"]
    curves = defaultdict(list)
    with open(found[0]) as f:
        for row in csv.DictReader(f):
            for L in L_TESTS:
                value = row.get(f"evaluation_{L}/success", "")
                if value != "":
                    curves[L].append((int(row["step"]), 100.0 * float(value)))
    return dict(curves), seed


def read_ours_training(run_dir: str):
    """{step: (critic loss, mean TD target)} from the tensorboard events of a vgf_offline.py run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    events.Reload()
    loss = {e.step: e.value for e in events.Scalars("losses/critic_loss")}
    target = {e.step: e.value for e in events.Scalars("charts/td_target_mean")}
    return {s: (loss[s], target[s]) for s in sorted(loss) if s in target}


def read_official_training(save_dir: str):
    """{step: (critic loss, mean Q of the batch)} from the train.csv of an official run."""
    found = sorted(glob.glob(os.path.join(save_dir, "**", "train.csv"), recursive=True))
    if len(found) != 1:
        sys.exit(f"error: expected one train.csv below {save_dir}, found {len(found)}")
    with open(found[0]) as f:
        return {int(r["step"]): (float(r["training/critic_loss"]), float(r["training/q_mean"]))
                for r in csv.DictReader(f)}


def training_table(rows, every: int) -> str:
    """Markdown: critic loss and value level every `every` updates, one column pair per run."""
    steps = sorted(set.intersection(*(set(s for s in t if s % every == 0) for _, t in rows)))
    lines = ["| update | " + " | ".join(name for name, _ in rows) + " |",
             "| --- | " + " | ".join("---" for _ in rows) + " |"]
    for step in steps:
        lines.append(f"| {step} | " + " | ".join(f"{t[step][0]:.3f} / {t[step][1]:.1f}" for _, t in rows) + " |")
    return "\n".join(lines)


def table(runs) -> str:
    """Markdown: one row per implementation, seed and evaluation step, success % at each L_test."""
    lines = ["| implementation | seed | step | " + " | ".join(f"L_test = {L}" for L in L_TESTS) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in L_TESTS) + " |"]
    for name, seed, curves in runs:
        steps = sorted({s for L in L_TESTS for s, _ in curves.get(L, [])})
        for step in steps:
            cells = []
            for L in L_TESTS:
                values = [v for s, v in curves.get(L, []) if s == step]
                cells.append(f"{values[0]:.0f}" if values else "-")
            lines.append(f"| {name} | {seed} | {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ours", nargs="+", default=[], help="vgf_offline.py run folders")
    parser.add_argument("--official", nargs="+", default=[], help="official main.py --save_dir folders")
    parser.add_argument("--out", default="docs/learning_curves_pointmaze.png")
    parser.add_argument("--title", default="pointmaze-medium-navigate-singletask-v0")
    parser.add_argument("--training-every", type=int, default=0,
                        help="also print critic loss / value level every this many updates (ours: mean TD target, "
                             "official: mean Q of the batch)")
    cli = parser.parse_args()
    if not cli.ours and not cli.official:
        sys.exit("error: nothing to plot; give --ours and/or --official folders")
    runs = [("vgf_offline.py", *reversed(read_ours(d))) for d in cli.ours]
    runs += [("official (JAX)", *reversed(read_official(d))) for d in cli.official]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"vgf_offline.py": "tab:blue", "official (JAX)": "tab:orange"}
    styles = {"vgf_offline.py": dict(ls="-", marker="o"), "official (JAX)": dict(ls="--", marker="s")}
    fig, axes = plt.subplots(1, len(L_TESTS), figsize=(4 * len(L_TESTS), 3.6), sharey=True)
    for ax, L in zip(axes, L_TESTS):
        for name, color in colors.items():
            curves = [dict(c.get(L, [])) for n, _, c in runs if n == name]
            if not curves:
                continue
            for c in curves:
                ax.plot(sorted(c), [c[s] for s in sorted(c)], color=color, alpha=0.35, lw=1)
            common = sorted(set.intersection(*(set(c) for c in curves)))
            mean = [np.mean([c[s] for c in curves]) for s in common]
            ax.plot(common, mean, color=color, lw=2.5, ms=5, mfc="none", **styles[name],
                    label=f"{name}, mean of {len(curves)} seed(s)")
        ax.set_title(f"L_test = {L}" + (" (best-of-N)" if L == 0 else ""))
        ax.set_xlabel("gradient steps")
        ax.set_ylim(-4, 104)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("success rate (%)")
    axes[0].legend(loc="upper left", fontsize=8)
    fig.suptitle(cli.title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(cli.out) or ".", exist_ok=True)
    fig.savefig(cli.out, dpi=110)
    print(f"wrote {cli.out}")
    print(table(runs))
    if cli.training_every:
        rows = [(f"vgf_offline.py seed {read_ours(d)[1]}", read_ours_training(d)) for d in cli.ours]
        rows += [(f"official seed {read_official(d)[1]}", read_official_training(d)) for d in cli.official]
        print("\ncritic loss / value level (ours: mean TD target; official: mean Q(s, a) of the batch)")
        print(training_table(rows, cli.training_every))


if __name__ == "__main__":
    main()
