"""tests/aggregate_results.py on synthetic eval.jsonl files."""
import json
import os
import subprocess
import sys

import numpy as np

SCRIPT = os.path.join(os.path.dirname(__file__), "aggregate_results.py")


def write_run(folder, env_id, seed, scores_by_step):
    os.makedirs(folder)
    with open(os.path.join(folder, "eval.jsonl"), "w") as f:
        for step, scores in scores_by_step.items():
            for L, score in enumerate(scores):
                f.write(json.dumps(dict(env_id=env_id, seed=seed, step=step, L_test=L, score_mean=score)) + "\n")


def test_aggregates_last_evaluation_over_seeds_and_tasks(tmp_path):
    write_run(tmp_path / "a", "hopper-medium-v2", 0, {100: [0, 0, 0, 0], 200: [50, 60, 70, 80]})
    write_run(tmp_path / "b", "hopper-medium-v2", 1, {200: [70, 80, 90, 100]})
    for task, base in ((1, 10), (2, 30)):  # two puzzle tasks, one seed: the environment's score is their mean
        write_run(tmp_path / f"p{task}", f"puzzle-4x4-play-singletask-task{task}-v0", 0, {300: [base, base + 10, 0, 0]})
    out = tmp_path / "table.md"
    proc = subprocess.run([sys.executable, SCRIPT, str(tmp_path), "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lines = out.read_text().splitlines()
    hopper = next(line for line in lines if line.startswith("| hopper-medium-v2"))
    cells = [c.strip() for c in hopper.split("|")[2:-1]]
    assert cells[0] == f"60.0 ± {np.std([50, 70]):.1f} (2)" and cells[3] == "90.0 ± 10.0 (2)" and cells[4] == "97.9"
    puzzle = next(line for line in lines if line.startswith("| puzzle-4x4-play"))
    assert [c.strip() for c in puzzle.split("|")[2:4]] == ["20.0 ± 0.0 (1)", "30.0 ± 0.0 (1)"]
    assert "D4RL average" not in out.read_text()  # only 1 of the 15 tasks is present


def test_suite_average_when_all_tasks_are_present(tmp_path):
    sys.path.insert(0, os.path.dirname(__file__))
    import aggregate_results as agg

    for i, task in enumerate(agg.D4RL_TASKS):
        for seed in (0, 1):
            write_run(tmp_path / f"{task}_{seed}", task, seed, {10: [i + seed, 0, 0, 0]})
    text = agg.table(agg.final_scores([str(p) for p in tmp_path.glob("*/eval.jsonl")]), [0])
    average = next(line for line in text.splitlines() if "D4RL average" in line)
    per_seed = [np.mean([i + seed for i in range(15)]) for seed in (0, 1)]
    assert f"{np.mean(per_seed):.1f} ± {np.std(per_seed):.1f} (2)" in average


def test_no_runs_is_an_error(tmp_path):
    proc = subprocess.run([sys.executable, SCRIPT, str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode != 0 and "no eval.jsonl" in proc.stderr
