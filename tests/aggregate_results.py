"""Aggregate eval.jsonl files of many vgf_offline.py runs into the paper's table layout (mean ± std over seeds).

    python tests/aggregate_results.py runs/                  # every runs/*/eval.jsonl
    python tests/aggregate_results.py runs/ --out table.md   # also write the markdown table

Per run, the last evaluation is taken. D4RL rows are tasks; OGBench rows are environments, each seed's score being
the mean over the environment's tasks (task1..task5), as the paper reports. Averages over the paper's 15 D4RL tasks
and 10 OGBench environments close each block when all of them are present.
"""
import argparse
import glob
import json
import os
import re
from collections import defaultdict

import numpy as np

D4RL_TASKS = [f"{e}-{d}-v2" for e in ("halfcheetah", "hopper", "walker2d")
              for d in ("medium", "medium-replay", "medium-expert")] + \
             [f"antmaze-{m}-v2" for m in ("umaze", "umaze-diverse", "medium-play", "medium-diverse", "large-play",
                                          "large-diverse")]
OGBENCH_ENVS = ["antmaze-large-navigate", "antmaze-giant-navigate", "humanoidmaze-medium-navigate",
                "humanoidmaze-large-navigate", "antsoccer-arena-navigate", "cube-single-play", "cube-double-play",
                "scene-play", "puzzle-3x3-play", "puzzle-4x4-play"]
PAPER = {"hopper-medium-v2": 97.9, "walker2d-medium-replay-v2": 97.8, "antmaze-umaze-diverse-v2": 94.3,
         "antmaze-medium-play-v2": 89.4, "antmaze-medium-diverse-v2": 86.7, "antmaze-large-diverse-v2": 83.8,
         "humanoidmaze-medium-navigate": 72, "cube-double-play": 70, "puzzle-3x3-play": 75, "puzzle-4x4-play": 45,
         "D4RL average": 89, "OGBench average": 55}


def final_scores(paths):
    """{(row, seed, L_test): score} from the last evaluation of every run; OGBench tasks become their environment."""
    per_task = defaultdict(list)  # (row, seed, L) -> scores of that row's tasks
    for path in paths:
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        if not rows:
            continue
        last = max(r["step"] for r in rows)
        for r in rows:
            if r["step"] == last:
                m = re.fullmatch(r"(.+)-singletask(?:-task[1-5])?-v0", r["env_id"])
                per_task[(m.group(1) if m else r["env_id"], r["seed"], r["L_test"])].append(r["score_mean"])
    return {key: float(np.mean(v)) for key, v in per_task.items()}


def table(scores, l_tests):
    rows = sorted({row for row, _, _ in scores}, key=lambda r: (D4RL_TASKS + OGBENCH_ENVS + [r]).index(r))
    lines = ["| task | " + " | ".join(f"L_test={L}" for L in l_tests) + " | paper |",
             "| --- |" + " --- |" * (len(l_tests) + 1)]

    def cell(values):
        return f"{np.mean(values):.1f} ± {np.std(values):.1f} ({len(values)})" if values else "–"

    for block, names in (("D4RL average", D4RL_TASKS), ("OGBench average", OGBENCH_ENVS)):
        present = [r for r in rows if r in names]
        for r in present:
            vals = [[s for (row, _, L), s in scores.items() if row == r and L == lt] for lt in l_tests]
            lines.append(f"| {r} | " + " | ".join(cell(v) for v in vals) + f" | {PAPER.get(r, '')} |")
        if present and set(present) == set(names):  # suite average per seed, then mean ± std over seeds
            vals = []
            for lt in l_tests:
                seeds = {seed for (row, seed, L) in scores if row in names and L == lt}
                vals.append([np.mean([scores[(r, seed, lt)] for r in names if (r, seed, lt) in scores])
                             for seed in seeds if all((r, seed, lt) in scores for r in names)])
            lines.append(f"| **{block}** | " + " | ".join(cell(v) for v in vals) + f" | {PAPER[block]} |")
    others = [r for r in rows if r not in D4RL_TASKS + OGBENCH_ENVS]
    for r in others:
        vals = [[s for (row, _, L), s in scores.items() if row == r and L == lt] for lt in l_tests]
        lines.append(f"| {r} | " + " | ".join(cell(v) for v in vals) + " | |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="+", help="folders searched recursively for eval.jsonl")
    parser.add_argument("--l-test", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--out", default=None, help="also write the markdown table here")
    args = parser.parse_args()
    paths = sorted({p for d in args.dirs for p in glob.glob(os.path.join(d, "**", "eval.jsonl"), recursive=True)})
    if not paths:
        raise SystemExit(f"error: no eval.jsonl under {args.dirs}")
    text = table(final_scores(paths), args.l_test)
    print(f"{len(paths)} runs; cells are mean ± std over seeds (number of seeds)\n\n{text}")
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
