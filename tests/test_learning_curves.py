"""The OGBench data generator (tests/make_ogbench_data.py) and the learning-curve reader (tests/plot_learning_curves.py)."""
import csv
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))


def test_pointmaze_oracle_data_loads_in_ogbench_and_reaches_goals(tmp_path):
    import ogbench
    from make_ogbench_data import EPISODE_STEPS, collect, maze_cells

    # goal candidates exclude the middle of straight corridors: (1, 2) and (2, 1) here, not the corner (1, 1)
    free, vertices = maze_cells(np.array([[1, 1, 1, 1, 1], [1, 0, 0, 0, 1], [1, 0, 1, 1, 1], [1, 0, 1, 1, 1],
                                        [1, 1, 1, 1, 1]]))
    assert free == [(1, 1), (1, 2), (1, 3), (2, 1), (3, 1)] and vertices == [(1, 1), (1, 3), (3, 1)]
    data, goals = collect("medium", episodes=2, seed=3)
    assert data["observations"].shape == (2 * EPISODE_STEPS, 2) and data["actions"].dtype == np.float32
    assert data["terminals"].dtype == bool and data["terminals"].sum() == 2 and data["terminals"][-1]
    assert np.abs(data["actions"]).max() <= 1.0
    assert goals >= 2  # the noisy oracle reaches its goals (about one per ~150 steps)
    np.savez_compressed(tmp_path / "pointmaze-medium-navigate-v0.npz", **data)
    np.savez_compressed(tmp_path / "pointmaze-medium-navigate-v0-val.npz", **data)
    from vgf_offline import ogbench_env_kwargs

    _, train, _ = ogbench.make_env_and_datasets("pointmaze-medium-navigate-singletask-v0", dataset_dir=str(tmp_path),
                                               **ogbench_env_kwargs())
    assert len(train["rewards"]) == 2 * (EPISODE_STEPS - 1)  # ogbench drops each episode's last transition
    again, _ = collect("medium", episodes=2, seed=3)
    assert all(np.array_equal(data[k], again[k]) for k in data)  # --seed makes the file reproducible


def test_plot_reads_both_logs_and_tables_every_seed(tmp_path):
    from plot_learning_curves import read_official, read_official_training, read_ours, table, training_table

    ours = tmp_path / "ours"
    ours.mkdir()
    with open(ours / "eval.jsonl", "w") as f:
        for step in (500, 1000):
            for L in range(4):
                f.write(json.dumps(dict(step=step, L_test=L, seed=7, metric="success_rate_percent",
                                        score_mean=10.0 * L + step / 100)) + "\n")
    official = tmp_path / "official" / "project" / "Debug" / "sd007_x"
    official.mkdir(parents=True)
    (official / "flags.json").write_text(json.dumps({"seed": 7}))
    with open(official / "eval.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([f"evaluation_{L}/success" for L in range(4)] + ["step"])
        writer.writerow([0.0, 0.1, 0.2, 0.3, 1])
        writer.writerow([0.5, 0.6, 0.7, 0.8, 1000])
    curves, seed = read_ours(str(ours))
    assert seed == 7 and curves[2] == [(500, 25.0), (1000, 30.0)]
    curves_off, seed_off = read_official(str(tmp_path / "official"))
    assert seed_off == 7 and curves_off[3] == [(1, 30.0), (1000, 80.0)]
    text = table([("ours", seed, curves), ("official", seed_off, curves_off)])
    assert "| official | 7 | 1000 | 50 | 60 | 70 | 80 |" in text and "| ours | 7 | 500 | 5 | 15 | 25 | 35 |" in text
    with open(official / "train.csv", "w", newline="") as f:
        f.write("training/critic_loss,training/q_mean,step\n0.5,-10.0,1000\n0.25,-20.0,2000\n")
    text = training_table([("official", read_official_training(str(tmp_path / "official"))),
                           ("other", {2000: (1.0, -3.0), 4000: (0.1, -1.0)})], every=2000)
    assert text.splitlines()[2:] == ["| 2000 | 0.250 / -20.0 | 1.000 / -3.0 |"]  # only updates both runs logged


def test_pointmaze_learning_runs_ours_and_tables_the_difference(tmp_path):
    """tests/pointmaze_learning.py: `ours` trains vgf_offline.py unchanged and records every evaluation episode's
    success and final distance to the goal; `table` averages per seed and tests the difference between programs."""
    import subprocess

    from make_ogbench_data import collect

    data, _ = collect("medium", episodes=2, seed=3)
    for suffix in ("", "-val"):
        np.savez_compressed(tmp_path / f"pointmaze-medium-navigate-v0{suffix}.npz", **data)
    script = os.path.join(os.path.dirname(__file__), "pointmaze_learning.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    subprocess.run([sys.executable, script, "ours", "--seed", "0", "--dataset-dir", str(tmp_path), "--out",
                    str(tmp_path / "ours_s0"), "--steps", "2", "--eval-every", "2", "--episodes", "1"], check=True,
                   env=env, capture_output=True, timeout=600)
    rows = [json.loads(line) for line in open(tmp_path / "ours_s0" / "episodes.jsonl")]
    assert [(r["step"], r["L_test"]) for r in rows] == [(2, 0), (2, 1), (2, 2), (2, 3)]
    assert all(r["goal"] == [20.0, 20.0] and r["distance"] > 0.5 and r["success"] == 0.0 for r in rows)
    assert all(abs(r["distance"] - np.hypot(r["xy"][0] - 20, r["xy"][1] - 20)) < 1e-9 for r in rows)
    # two programs of 5 seeds whose success differs at every seed: the exact permutation test gives 2 / 252
    for program, success in (("vgf_offline.py", 1.0), ("official", 0.0)):
        folder = tmp_path / program
        folder.mkdir()
        with open(folder / "episodes.jsonl", "w") as f:
            for seed in range(5):
                for L in range(4):
                    f.write(json.dumps(dict(program=program, seed=seed, step=10, L_test=L, success=success,
                                            xy=[0, 0], goal=[1, 0], distance=1.0 + seed)) + "\n")
    out = subprocess.run([sys.executable, script, "table", str(tmp_path / "vgf_offline.py"),
                          str(tmp_path / "official"), "--markdown", str(tmp_path / "t.md")], check=True, env=env,
                         capture_output=True, text=True, timeout=300).stdout
    assert "| vgf_offline.py | 10 | 0 | 5 (1 episodes) | 100.0 ± 0.0 | 3.00 ± 0.71 |" in out
    assert "| 0 | 10 | +100.0 | 0.00 | 0.01 | +0.00 | 1.00 | 1.00 |" in out
    assert "| official | 4 | 0 / 5.0 | 0 / 5.0 | 0 / 5.0 | 0 / 5.0 |" in out  # each seed at the last update
    # 5 of 5 seeds against 0 of 5: Fisher's exact test, two-sided, p = 2 / 252
    assert "vgf_offline.py 5 of 5, official 0 of 5 (Fisher's exact test, two-sided: p = 0.01)" in out
