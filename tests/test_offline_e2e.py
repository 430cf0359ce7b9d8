"""End-to-end runs of vgf_offline.py through its real entry point, on small datasets in the real formats."""
import json
import os
import shutil

import h5py
import numpy as np
import pytest
import torch

from conftest import TINY, run_script, write_d4rl_hdf5

L_TESTS = [0, 1, 2, 3]


def read_eval(run_dir):
    with open(os.path.join(run_dir, "eval.jsonl")) as f:
        return [json.loads(line) for line in f]


def check_final_eval(rows, step, metric):
    final = [r for r in rows if r["step"] == step]
    assert sorted(r["L_test"] for r in final) == L_TESTS
    for r in final:
        assert r["metric"] == metric and r["episodes"] == 2
        assert np.isfinite(r["score_mean"]) and np.isfinite(r["score_std"]) and r["score_std"] >= 0
    return final


@pytest.mark.parametrize("env_id,metric", [("halfcheetah-medium-v2", "d4rl_normalized_score"),
                                           ("cube-single-play-singletask-v0", "success_rate_percent")])
def test_train_evaluate_checkpoint_and_eval_only(env_id, metric, d4rl_dir, ogbench_dir, tmp_path):
    dataset_dir = d4rl_dir if env_id.startswith("halfcheetah") else ogbench_dir
    common = ["--env-id", env_id, "--dataset-dir", dataset_dir, "--output-dir", str(tmp_path), *TINY]
    eval_every = 10 if env_id.startswith("halfcheetah") else 0  # 0: only at the end
    proc = run_script(*common, "--total-steps", "20", "--eval-every", str(eval_every), "--eval-episodes", "2",
                      "--save-model", "--run-name", "train")
    run_dir = tmp_path / "train"
    assert "[eval @ step 20]" in proc.stdout
    rows = read_eval(run_dir)
    assert sorted({r["step"] for r in rows}) == ([10, 20] if eval_every else [20])
    final = check_final_eval(rows, 20, metric)
    if metric == "success_rate_percent":
        assert all(r["score_mean"] in (0.0, 50.0, 100.0) for r in final)
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(run_dir))
    state = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert state["step"] == 20 and state["args"]["env_id"] == env_id

    run_script("--eval-only", "--checkpoint", str(run_dir / "checkpoint.pt"), "--output-dir", str(tmp_path),
               "--run-name", "again", "--no-cuda")
    again = read_eval(tmp_path / "again")
    key = lambda r: {k: r[k] for k in ("step", "L_test", "score_mean", "score_std", "return_mean")}
    assert [key(r) for r in again] == [key(r) for r in final]


def test_resume_continues_identically(d4rl_dir, tmp_path):
    common = ["--env-id", "halfcheetah-medium-v2", "--dataset-dir", d4rl_dir, "--output-dir", str(tmp_path), *TINY,
              "--eval-every", "10", "--eval-episodes", "1", "--eval-transport-steps", "0", "--save-model"]
    run_script(*common, "--total-steps", "20", "--run-name", "straight")
    run_script(*common, "--total-steps", "10", "--run-name", "first_half")
    shutil.copy(tmp_path / "first_half" / "checkpoint.pt", tmp_path / "half.pt")
    run_script("--resume", str(tmp_path / "first_half" / "checkpoint.pt"), "--total-steps", "20", "--no-cuda")
    straight = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)
    resumed = torch.load(tmp_path / "first_half" / "checkpoint.pt", weights_only=False)
    assert resumed["step"] == 20
    for saved, restored in zip(straight["nets"] + [straight["target_critic"]], resumed["nets"] + [resumed["target_critic"]]):
        for k, v in saved.items():
            assert torch.equal(v, restored[k]), f"{k} differs after resume"
    assert [r["score_mean"] for r in read_eval(tmp_path / "straight")] == \
           [r["score_mean"] for r in read_eval(tmp_path / "first_half")]
    # a different seed gives different weights: the comparison above is not vacuous
    run_script(*common, "--total-steps", "10", "--run-name", "other_seed", "--seed", "7")
    other = torch.load(tmp_path / "other_seed" / "checkpoint.pt", weights_only=False)
    half = torch.load(tmp_path / "half.pt", weights_only=False)
    assert not torch.equal(other["nets"][0]["linears.0.weight"], half["nets"][0]["linears.0.weight"])


def test_resume_rejects_an_incompatible_checkpoint(d4rl_dir, tmp_path):
    common = ["--dataset-dir", d4rl_dir, "--output-dir", str(tmp_path), "--no-cuda"]
    run_script("--env-id", "halfcheetah-medium-v2", *common, *TINY, "--total-steps", "2", "--eval-every", "0",
               "--eval-episodes", "1", "--eval-transport-steps", "0", "--save-model", "--run-name", "r")
    ckpt = str(tmp_path / "r" / "checkpoint.pt")
    proc = run_script("--resume", ckpt, "--env-id", "hopper-medium-v2", *common, check=False)
    assert proc.returncode == 2 and "incompatible" in proc.stderr and "halfcheetah-medium-v2" in proc.stderr
    proc = run_script("--resume", ckpt, "--hidden-dims", "64", "64", *common, check=False)
    assert proc.returncode == 2 and "--hidden-dims [32, 32]" in proc.stderr
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    proc = run_script("--eval-only", "--checkpoint", str(tmp_path / "junk.pt"), check=False)
    assert proc.returncode == 2 and "not a readable checkpoint" in proc.stderr
    proc = run_script("--eval-only", check=False)
    assert proc.returncode == 2 and "--eval-only needs --checkpoint" in proc.stderr


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(d4rl_dir, tmp_path):
    common = ["--env-id", "halfcheetah-medium-v2", "--output-dir", str(tmp_path), *TINY, "--eval-every", "1",
              "--eval-episodes", "1", "--eval-transport-steps", "0", "--save-model"]
    run_script(*common, "--dataset-dir", d4rl_dir, "--total-steps", "3", "--run-name", "nan")
    ckpt = tmp_path / "nan" / "checkpoint.pt"
    # a learning rate that blows the weights up (the data is checked when loaded, a checkpoint with non-finite weights
    # is refused): the update of step 4 starts from finite weights, step 5's loss is no longer finite
    proc = run_script("--resume", str(ckpt), "--total-steps", "8", "--learning-rate", "1e30", check=False)
    assert proc.returncode == 2 and "non-finite loss at step 5" in proc.stderr and str(ckpt) in proc.stderr
    state = torch.load(ckpt, weights_only=False)
    assert state["step"] == 4 and all(torch.isfinite(v).all() for v in state["nets"][0].values())


def test_missing_dataset_without_network_names_path_and_url(tmp_path):
    empty = tmp_path / "empty"
    proxy = {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}  # no network, fail fast
    proc = run_script("--env-id", "hopper-medium-replay-v2", "--dataset-dir", str(empty), "--output-dir",
                      str(tmp_path), "--eval-episodes", "1", check=False, env=proxy)
    assert proc.returncode == 2
    assert str(empty / "hopper_medium_replay-v2.hdf5") in proc.stderr
    assert "http://rail.eecs.berkeley.edu/datasets/offline_rl/gym_mujoco_v2/hopper_medium_replay-v2.hdf5" in proc.stderr
    assert not (empty / "hopper_medium_replay-v2.hdf5.part").exists()
    proc = run_script("--env-id", "cube-double-play-singletask-v0", "--dataset-dir", str(empty), "--output-dir",
                      str(tmp_path), "--eval-episodes", "1", check=False, env=proxy)
    assert proc.returncode == 2 and str(empty / "cube-double-play-v0.npz") in proc.stderr
    assert "D4RL_DATASET_DIR" not in proc.stderr
    assert not empty.exists() and os.listdir(tmp_path) == []  # no dataset folder, no run folder left behind


def test_unknown_env_id_exits_with_the_supported_list(tmp_path):
    proc = run_script("--env-id", "halfcheetah-medium-v3", "--output-dir", str(tmp_path), check=False)
    assert proc.returncode == 2 and "unknown --env-id 'halfcheetah-medium-v3'" in proc.stderr
    assert "Traceback" not in proc.stderr and "cube-double-play" in proc.stderr


@pytest.mark.parametrize("corruption,message", [
    ("drop_actions", "missing key(s) ['actions']"),
    ("short_rewards", "key 'rewards' has shape (10,)"),
    ("not_hdf5", "is not a readable HDF5 file"),
])
def test_malformed_d4rl_file_says_what_is_wrong(corruption, message, tmp_path):
    path = tmp_path / "halfcheetah_medium-v2.hdf5"
    if corruption == "not_hdf5":
        path.write_text("<html>404</html>")
    else:
        write_d4rl_hdf5(str(path), episodes=1, length=20)
        with h5py.File(path, "a") as f:
            if corruption == "drop_actions":
                del f["actions"]
            else:
                del f["rewards"]
                f["rewards"] = np.zeros(10, np.float32)
    proc = run_script("--env-id", "halfcheetah-medium-v2", "--dataset-dir", str(tmp_path), "--output-dir",
                      str(tmp_path), "--eval-episodes", "1", check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
