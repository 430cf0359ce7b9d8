"""The tables of docs/llm.md's demonstration, from finished vgf_llm.py runs.

    python tests/llm_results_table.py --runs runs/bon runs/mh runs/mh0 --excerpt docs/llm_results.json
    python tests/llm_results_table.py --excerpt docs/llm_results.json

With --runs, the runs' summaries and per-prompt scores are first written to the excerpt (small: what the tables need);
then the tables are printed from the excerpt, in markdown:
  1. every method at every n or L: judges (mean ± SE over prompts), NLL/token, KL, compute, accepted moves;
  2. every transport at every L > 0 against the frontier run's best-of-n with the fewest token-forwards at or above
     its own (the largest n where even that costs less): paired differences over prompts ± SE, better / worse;
  3. the share of moves accepted at each step (mh: also the proposals outside mu's top-k).
The frontier run is the one with --best-of-n; every run must have been evaluated on the same prompts.
"""

import argparse
import hashlib
import json
import math
import os

import numpy as np


def se(values):
    values = np.asarray(values, dtype=float)
    return float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0


def label(summary):
    args = summary["args"]
    if len(summary["transport"]) == 1:
        return "best-of-n"
    extra = {"mh": f" τ {args['mh_tau']:g} κ {args['mh_kappa']:g}", "embed": f" ε {args['step_size']:g}",
             "topk": f", lm_coef {args['lm_coef']:g}"}[args["transport"]]
    return args["transport"] + extra


def excerpt_of(folder):
    """What the tables need of one run: its summary's fields and every prompt's scores at every n and L."""
    summary = json.load(open(os.path.join(folder, "summary.json")))
    records = [json.loads(line) for line in open(os.path.join(folder, "samples.jsonl"))]
    judges = list(summary["judges"])
    per_prompt = lambda entries: {key: [round(e[key], 4) for e in entries] for key in judges + ["nll", "reward"]}
    keep = ["forwards_per_prompt", "seconds_per_prompt", "nll_per_token", "kl_estimate", "kl_estimate_se",
            "kl_bound", "particles_moved", "tokens_changed"] + [f"{j}{s}" for j in judges for s in ("", "_se")]
    point = lambda result: {k: v for k, v in result.items() if k in keep}
    return dict(
        run=os.path.basename(os.path.normpath(folder)), label=label(summary), judges=summary["judges"],
        transport_name=summary["args"]["transport"] if len(summary["transport"]) > 1 else "best-of-n",
        uses_top_k=summary["args"]["transport"] == "topk" or summary["args"]["mh_tau"] + summary["args"]["mh_kappa"] > 0,
        num_prompts=summary["num_prompts"],
        prompts_sha256=hashlib.sha256(json.dumps([r["prompt"] for r in records]).encode()).hexdigest(),
        reward_model=summary["reward_model"], moves_by_step=summary.get("moves_by_step", []),
        forwards_per_prompt_by_term=summary.get("forwards_per_prompt_by_term", {}),
        transport={L: dict(point(x), per_prompt=per_prompt([r["vgf"][L] for r in records]))
                   for L, x in summary["transport"].items()},
        best_of_n={n: dict(point(x), per_prompt=per_prompt([r["best_of_n"][n] for r in records]))
                   for n, x in summary.get("best_of_n", {}).items()})


def tables(runs):
    frontier = next(run for run in runs if run["best_of_n"])
    judges = list(frontier["judges"])
    assert all(run["prompts_sha256"] == frontier["prompts_sha256"] for run in runs), "runs evaluated on other prompts"
    names = [frontier["judges"][j] for j in judges]
    lines = ["| method | n or L | " + " | ".join(names) + " | NLL/token | KL | fwd/prompt | s/prompt |",
             "|-|-|" + "-|" * (len(judges) + 4)]
    for run in runs:
        points = [(f"n = {n}", x, f"≤ {x['kl_bound']:.2f}") for n, x in sorted(run["best_of_n"].items(),
                                                                              key=lambda item: int(item[0]))]
        if run is not frontier:
            chains = run["transport_name"] == "mh"  # the KL estimate holds for draws of pi* only (mh's chains)
            points += [(f"L = {L}", x, f"{x['kl_estimate']:.2f} ± {x['kl_estimate_se']:.2f}" if chains and L != "0"
                        else "") for L, x in sorted(run["transport"].items(), key=lambda item: int(item[0]))]
        for where, x, kl in points:
            scores = " | ".join(f"{x[j]:.3f} ± {x[j + '_se']:.3f}" for j in judges)
            lines.append(f"| {run['label']} | {where} | {scores} | {x['nll_per_token']:.2f} | {kl} | "
                         f"{x['forwards_per_prompt']:.0f} | {x['seconds_per_prompt']:.1f} |")
    lines += ["", "| method | L | fwd/prompt | vs best-of | " + " | ".join(f"{j} diff" for j in names)
              + f" | NLL diff | better / worse ({names[0]}) |", "|-|-|-|-|" + "-|" * (len(judges) + 2)]
    costs = {n: x["forwards_per_prompt"] for n, x in frontier["best_of_n"].items()}
    for run in runs:
        if run is frontier:
            continue
        for L, x in sorted(run["transport"].items(), key=lambda item: int(item[0])):
            if L == "0":
                continue
            above = [n for n, cost in costs.items() if cost >= x["forwards_per_prompt"]]
            n = min(above, key=int) if above else max(costs, key=int)
            against = frontier["best_of_n"][n]["per_prompt"]
            diffs = {key: np.subtract(x["per_prompt"][key], against[key]) for key in judges + ["nll"]}
            cells = " | ".join(f"{diffs[key].mean():+.3f} ± {se(diffs[key]):.3f}" for key in judges + ["nll"])
            first = diffs[judges[0]]
            lines.append(f"| {run['label']} | {L} | {x['forwards_per_prompt']:.0f} | {n}"
                         f"{'' if above else ' (largest)'} | {cells} | {(first > 0).sum()} / {(first < 0).sum()} |")
    lines += ["", "| method | L | against | " + " | ".join(f"{j} diff" for j in names) + " | R diff | NLL diff |",
              "|-|-|-|" + "-|" * (len(judges) + 2)]
    transports = [run for run in runs if run is not frontier]
    for run in transports:  # against its own start: best-of-N of the same samples
        start = run["transport"]["0"]["per_prompt"]
        for L, x in sorted(run["transport"].items(), key=lambda item: int(item[0])):
            if L != "0":
                lines.append(paired_row(run["label"], L, "its own L = 0 (best-of-N)", x["per_prompt"], start, judges))
    for run in transports:  # a gradient-informed mh against the gradient-free one, from the same samples
        free = next((other for other in transports if other["transport_name"] == "mh" and other is not run
                     and other["label"].endswith("τ 0 κ 0")), None)
        if run["transport_name"] != "mh" or free is None or run["label"].endswith("τ 0 κ 0"):
            continue
        for L, x in sorted(run["transport"].items(), key=lambda item: int(item[0])):
            if L != "0":
                lines.append(paired_row(run["label"], L, free["label"], x["per_prompt"],
                                        free["transport"][L]["per_prompt"], judges))
    movers = [run for run in runs if run["moves_by_step"]]
    if movers:
        steps = max(len(run["moves_by_step"]) for run in movers)
        lines += ["", "| method | " + " | ".join(f"step {s}" for s in range(1, steps + 1)) + " |",
                  "|-|" + "-|" * steps]
        for run in movers:
            accepted = " | ".join(f"{m['accepted_share']:.2f}" for m in run["moves_by_step"])
            lines.append(f"| {run['label']}: accepted | {accepted} |")
            if "outside_share" in run["moves_by_step"][0] and run["uses_top_k"]:  # gradient-free: no top-k
                outside = " | ".join(f"{m['outside_share']:.2f} ({m['outside_accepted_share']:.2f})"
                                     for m in run["moves_by_step"])
                lines.append(f"| {run['label']}: outside the top-k (their acceptance) | {outside} |")
    return "\n".join(lines)


def paired_row(name, L, against, scores, other, judges):
    cells = []
    for key in judges + ["reward", "nll"]:
        diff = np.subtract(scores[key], other[key])
        cells.append(f"{diff.mean():+.3f} ± {se(diff):.3f}")
    return f"| {name} | {L} | {against} | " + " | ".join(cells) + " |"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="*", default=[], help="finished run folders (one with --best-of-n)")
    parser.add_argument("--excerpt", required=True, help="the excerpt file: written from --runs, then read")
    options = parser.parse_args()
    if options.runs:
        with open(options.excerpt, "w", encoding="utf-8") as f:
            json.dump([excerpt_of(folder) for folder in options.runs], f)
    print(tables(json.load(open(options.excerpt, encoding="utf-8"))))


if __name__ == "__main__":
    main()
