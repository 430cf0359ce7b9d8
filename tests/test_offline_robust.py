"""Data preprocessing as the official code, per-task defaults, input validation and what a user sees."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error

import h5py
import numpy as np
import pytest
import torch
import tyro

import vgf_offline as vgf
from conftest import ROOT, TINY, run_script, write_d4rl_hdf5


# ------------------------------------------------------------------------------------- D4RL reward scale
def official_return_range(rewards, terminals):
    """The official code's return_range (envs/d4rl_utils.py) written out as its loop."""
    returns, ep_ret, ep_len = [], 0.0, 0
    for r, d in zip(rewards, terminals):
        ep_ret += float(r)
        ep_len += 1
        if d or ep_len == 1000:
            returns.append(ep_ret)
            ep_ret, ep_len = 0.0, 0
    return min(returns), max(returns), len(returns)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_official_windows_match_the_official_loop(seed):
    rng = np.random.default_rng(seed)
    n = 4321
    rewards = rng.normal(size=n).astype(np.float32)
    terminals = rng.random(n) < [0.0, 0.0005, 0.003][seed]  # none / a few / many terminals
    terminals[[999, 1000, 2500]] |= seed == 2  # a terminal exactly at and next to a 1000-row cut
    low, high, count = vgf.episode_return_range(rewards, vgf.official_window_ends(terminals))
    ref_low, ref_high, ref_count = official_return_range(rewards, terminals)
    assert count == ref_count and low == pytest.approx(ref_low, abs=1e-9) and high == pytest.approx(ref_high, abs=1e-9)


def test_official_and_true_episode_scales_differ_and_say_which(tmp_path, capsys):
    """4 time-limited episodes of 600 rows: the official windows run across episode boundaries (timeouts are
    stripped), the true episodes do not."""
    path = write_d4rl_hdf5(str(tmp_path / "halfcheetah_medium-v2.hdf5"), episodes=4, length=600)
    with h5py.File(path) as f:
        raw_rewards, timeouts = f["rewards"][()], f["timeouts"][()]
    keep = ~timeouts[:-1]
    stripped = raw_rewards[:-1][keep]  # qlearning transitions: timeout rows and the last row dropped
    official = 1000.0 / (stripped[1000:2000].sum(dtype=np.float64) - stripped[:1000].sum(dtype=np.float64))
    episodes = raw_rewards.reshape(4, 600).sum(1, dtype=np.float64)
    true = 1000.0 / (episodes.max() - episodes.min())
    scales = {}
    for mode in ("official", "true"):
        args = vgf.Args(env_id="halfcheetah-medium-v2", dataset_dir=str(tmp_path), reward_scale_episodes=mode)
        data, scales[mode], shift = vgf.load_dataset(args)
        out = capsys.readouterr().out
        assert ("2 windows cut at terminals or every 1000 transitions (official" in out) == (mode == "official")
        assert ("4 true episodes" in out) == (mode == "true")
        np.testing.assert_allclose(data["rewards"], stripped * scales[mode], rtol=1e-6)
        assert shift == 0.0
    assert scales["official"] == pytest.approx(abs(official), rel=1e-6)
    assert scales["true"] == pytest.approx(true, rel=1e-6)
    assert abs(scales["official"] / scales["true"] - 1) > 0.1  # the file tells the two apart


def test_official_scale_without_a_complete_window_names_the_option(tmp_path):
    write_d4rl_hdf5(str(tmp_path / "halfcheetah_medium-v2.hdf5"), episodes=2, length=50)
    with pytest.raises(vgf.VGFError, match="--reward-scale-episodes true"):
        vgf.load_dataset(vgf.Args(env_id="halfcheetah-medium-v2", dataset_dir=str(tmp_path)))


# ------------------------------------------------------------------------------------- OGBench success timing
def cube_target(env):
    env.reset(seed=0)
    return env.unwrapped._data.mocap_pos[0].copy()


def test_ogbench_env_succeeds_after_the_step_as_ogbench_1_1_0():
    """1.1.0 computes success, reward and termination from the state after the step; >= 1.2 defaults to before."""
    import mujoco
    import ogbench

    def first_step(env):
        env.reset(seed=0)
        u = env.unwrapped
        u._data.qpos[14:17] = u._data.mocap_pos[0]  # put the cube on its target
        mujoco.mj_forward(u._model, u._data)
        _, reward, terminated, _, info = env.step(np.zeros(env.action_space.shape, np.float32))
        return info["success"], reward, terminated

    ours = vgf.make_eval_env("cube-single-play-singletask-v0")
    assert first_step(ours) == (True, 0.0, True)  # singletask reward: 0 on success, -1 otherwise (as the dataset)
    default = ogbench.make_env_and_datasets("cube-single-play-singletask-v0", env_only=True)
    success, _, terminated = first_step(default)  # ogbench >= 1.2's default: success as of before the step
    assert (success, terminated) == (False, False)


def test_ogbench_rewards_and_masks_relabel_the_state_before_the_action(ogbench_dir, tmp_path):
    """ogbench 1.1.0 (and later) relabel (s, a, s') from s: reward 0 and mask 0 where s is a success."""
    folder = tmp_path / "og"
    shutil.copytree(ogbench_dir, folder)
    raw = dict(np.load(folder / "cube-single-play-v0.npz"))
    target = cube_target(vgf.make_eval_env("cube-single-play-singletask-v0"))
    success_rows = [5, 47]  # raw rows inside a trajectory (40 rows each; the last row of each is a terminal)
    raw["qpos"][:, 14:17] = target + np.array([0.2, 0.0, 0.0])  # every cube away from its target (rollouts may end
    for row in success_rows:                                     # near it), then exactly these rows at it
        raw["qpos"][row, 14:17] = target
    np.savez(folder / "cube-single-play-v0.npz", **raw)
    data, scale, shift = vgf.load_dataset(vgf.Args(env_id="cube-single-play-singletask-v0", dataset_dir=str(folder)))
    assert (scale, shift) == (1.0, 0.0)
    success = np.linalg.norm(raw["qpos"][:, 14:17] - target, axis=1) <= 0.04  # cube within 4 cm of its target
    s_rows = np.flatnonzero(~raw["terminals"].astype(bool))  # raw row of each transition's s (s' is the next row)
    expected = success[s_rows].astype(np.float32) - 1.0
    np.testing.assert_array_equal(data["rewards"], expected)
    np.testing.assert_array_equal(data["masks"], -expected)  # 1 - success
    assert not np.array_equal(expected, success[s_rows + 1] - 1.0)  # labelling s' instead would differ here
    hits = np.searchsorted(s_rows, success_rows)
    assert (data["rewards"][hits] == 0).all()
    np.testing.assert_array_equal(data["observations"][hits], raw["observations"][success_rows])


# ------------------------------------------------------------------------------------- defaults
def defaults(env_id, **kw):
    return vgf.resolve_suite_defaults(vgf.Args(env_id=env_id, **kw))


def test_per_task_and_offline_to_online_defaults_of_the_run_scripts():
    a = defaults("antmaze-giant-navigate-singletask-v0")
    assert (a.discount, a.total_steps, a.target_q_agg) == (0.99, 3_000_000, "min")
    a = defaults("antmaze-large-navigate-singletask-task3-v0")
    assert (a.discount, a.total_steps, a.target_q_agg) == (0.995, 2_000_000, "min")
    a = defaults("pointmaze-medium-navigate-singletask-v0")  # not in the run scripts: the navigation row
    assert (a.discount, a.train_transport_steps, a.target_q_agg, a.total_steps) == (0.995, 3, "mean", 1_000_000)
    a = defaults("hopper-medium-replay-v2", online_steps=1000)
    assert (a.total_steps, a.train_transport_steps, a.transport_step_size, a.alpha) == (500_000, 5, 0.1, 0.1)
    a = defaults("cube-double-play-singletask-v0", online_steps=1000)
    assert (a.train_transport_steps, a.transport_step_size, a.alpha, a.total_steps) == (5, 0.1, 1.0, 1_000_000)
    a = defaults("cube-double-play-singletask-v0", online_steps=1000, alpha=0.3, train_transport_steps=2)
    assert (a.train_transport_steps, a.transport_step_size, a.alpha) == (2, 0.1, 0.3)  # explicit values win
    a = defaults("humanoidmaze-medium-navigate-singletask-v0", online_steps=10, amortised=True)
    assert (a.num_particles, a.train_transport_steps, a.transport_step_size) == (5, 1, 0.05)
    a = defaults("antmaze-giant-navigate-singletask-v0", online_steps=10, amortised=True)
    assert (a.discount, a.total_steps) == (0.995, 1_000_000)
    a = defaults("walker2d-medium-v2", online_steps=10, amortised=True)
    assert a.total_steps == 1_000_000


def test_readme_lists_every_suite():
    readme = open(os.path.join(ROOT, "README.md")).read()
    for suite in vgf.SUITE_DEFAULTS:
        assert f"`{suite}`" in readme


# ------------------------------------------------------------------------------------- validation
BAD_OPTIONS = [
    (["--num-particles", "0"], "--num-particles 0", ">= 1"),
    (["--batch-size", "0"], "--batch-size 0", ">= 1"),
    (["--eval-episodes", "0"], "--eval-episodes 0", ">= 1"),
    (["--total-steps", "0"], "--total-steps 0", ">= 1"),
    (["--train-transport-steps", "-1"], "--train-transport-steps -1", ">= 0"),
    (["--eval-transport-steps", "0", "-1"], "--eval-transport-steps 0 -1", "one or more values >= 0"),
    (["--alpha", "0"], "--alpha 0.0", "> 0"),
    (["--alpha", "-0.5"], "--alpha -0.5", "> 0"),
    (["--transport-step-size", "0"], "--transport-step-size 0.0", "> 0"),
    (["--transport-step-size", "-0.1"], "--transport-step-size -0.1", "> 0"),
    (["--hidden-dims"], "--hidden-dims (empty)", "one or more sizes >= 1"),
    (["--tau", "0"], "--tau 0.0", "in (0, 1]"),
    (["--tau", "1.5"], "--tau 1.5", "in (0, 1]"),
    (["--learning-rate", "0"], "--learning-rate 0.0", "> 0"),
    (["--learning-rate", "nan"], "--learning-rate nan", "> 0"),
    (["--bc-flow-steps", "0"], "--bc-flow-steps 0", ">= 1"),
    (["--discount", "1.01"], "--discount 1.01", "in [0, 1]"),
    (["--discount", "-0.1"], "--discount -0.1", "in [0, 1]"),
    (["--eval-every", "-1"], "--eval-every -1", ">= 0"),
    (["--log-every", "0"], "--log-every 0", ">= 1"),
    (["--online-steps", "-1"], "--online-steps -1", ">= 0"),
    (["--online-warmup", "-1"], "--online-warmup -1", ">= 0"),
    (["--buffer-size", "0"], "--buffer-size 0", ">= 1"),
    (["--threads", "0"], "--threads 0", ">= 1"),
    (["--seed", "-1"], "--seed -1", "in [0, 2**32 - 1]"),
    (["--seed", "4294967296"], "--seed 4294967296", "in [0, 2**32 - 1]"),
    (["--eval-transport-steps", "0", "0"], "--eval-transport-steps 0 0", "distinct values (each L_test once)"),
]


@pytest.mark.parametrize("option,shown,valid_range", BAD_OPTIONS, ids=[" ".join(o[0]) for o in BAD_OPTIONS])
def test_bad_option_is_rejected_before_anything_is_built(option, shown, valid_range, tmp_path, monkeypatch):
    """Through the command-line parser into main(); building an environment or reading data would fail the test."""
    def must_not_run(*_, **__):
        raise AssertionError("built before validation")

    monkeypatch.setattr(vgf, "make_eval_env", must_not_run)
    monkeypatch.setattr(vgf, "load_dataset", must_not_run)
    monkeypatch.setattr(vgf, "Agent", must_not_run)
    out, data = tmp_path / "runs", tmp_path / "data"
    args = tyro.cli(vgf.Args, args=["--output-dir", str(out), "--dataset-dir", str(data), *option])
    with pytest.raises(vgf.VGFError) as e:
        vgf.main(args)
    assert f"{shown} is out of range: must be {valid_range}" in str(e.value)
    assert not out.exists() and not data.exists()


def test_bad_options_exit_2_with_one_line_each_and_no_run_folder(tmp_path):
    proc = run_script("--num-particles", "0", "--tau", "2", "--output-dir", str(tmp_path / "runs"), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == ["error: --tau 2.0 is out of range: must be in (0, 1]",
                                        "  --num-particles 0 is out of range: must be >= 1"]
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------- bad data, downloads
def test_nan_in_a_d4rl_file_is_reported_with_key_and_row(tmp_path):
    path = write_d4rl_hdf5(str(tmp_path / "halfcheetah_medium-v2.hdf5"), episodes=2, length=600)
    with h5py.File(path, "a") as f:
        f["observations"][7, 3] = np.inf
        f["observations"][900, 0] = np.nan
    with pytest.raises(vgf.VGFError, match=r"key 'observations' holds NaN or inf at row 7 \(2 row\(s\) in all\)"):
        vgf.load_dataset(vgf.Args(env_id="halfcheetah-medium-v2", dataset_dir=str(tmp_path)))


def test_nan_in_an_ogbench_file_is_reported_with_key_and_row(ogbench_dir, tmp_path):
    shutil.copytree(ogbench_dir, tmp_path / "og")
    path = tmp_path / "og" / "cube-single-play-v0.npz"
    raw = dict(np.load(path))
    raw["qpos"][12, 15] = np.nan
    np.savez(path, **raw)
    with pytest.raises(vgf.VGFError, match=r"cube-single-play-v0.npz: key 'qpos' holds NaN or inf at row 12"):
        vgf.load_dataset(vgf.Args(env_id="cube-single-play-singletask-v0", dataset_dir=str(tmp_path / "og")))


@pytest.mark.parametrize("env_id,hint", [("hopper-medium-v2", "--dataset-dir / $D4RL_DATASET_DIR"),
                                         ("cube-double-play-singletask-v0", "--dataset-dir at")])
def test_failed_download_leaves_no_folder_and_names_the_right_option(env_id, hint, tmp_path, monkeypatch):
    def offline(*_, **__):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(vgf.urllib.request, "urlopen", offline)
    folder = tmp_path / "new" / "datasets"
    with pytest.raises(vgf.VGFError) as e:
        vgf.load_dataset(vgf.Args(env_id=env_id, dataset_dir=str(folder)))
    assert hint in str(e.value) and ("D4RL" in str(e.value)) == env_id.startswith("hopper")
    assert not (tmp_path / "new").exists()


# ------------------------------------------------------------------------------------- what a user sees
def test_cpu_threads_warning():
    assert vgf.cpu_threads_warning(load=4.0, cores=2, threads=2).endswith("run with OMP_NUM_THREADS=1 or --threads 1")
    assert vgf.cpu_threads_warning(load=0.2, cores=16, threads=16) is None  # idle machine
    assert vgf.cpu_threads_warning(load=9.0, cores=2, threads=1) is None  # already one thread


def start(*args, tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "vgf_offline.py"), *args, "--output-dir",
                             str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=ROOT)


def interrupt(proc):
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def test_compile_notice_then_ctrl_c_ends_with_one_line(d4rl_dir, tmp_path):
    proc = start("--env-id", "halfcheetah-medium-v2", "--dataset-dir", d4rl_dir, *TINY[:-1], "--compile",
                 "--total-steps", "1000", "--eval-episodes", "1", tmp_path=tmp_path)
    for line in proc.stdout:  # the notice comes before the first (compiling) update
        if line.startswith("compiling the update with torch.compile (about a minute on an idle core, minutes under "
                           "load; --no-compile skips it)"):
            break
    else:
        pytest.fail(f"no compile notice; stderr: {proc.stderr.read()[-2000:]}")
    rc, _, err = interrupt(proc)
    assert rc == 130 and "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("stopped by Ctrl-C at step ") and last.endswith("no checkpoint was saved (--save-model "
                                                                          "keeps one)")
    assert not any(tmp_path.iterdir())  # no evaluation, no checkpoint: no run folder left


def test_ctrl_c_names_the_last_checkpoint(d4rl_dir, tmp_path):
    proc = start("--env-id", "halfcheetah-medium-v2", "--dataset-dir", d4rl_dir, *TINY, "--total-steps", "100000",
                 "--eval-every", "3", "--eval-episodes", "1", "--eval-transport-steps", "0", "--save-model",
                 "--run-name", "r", tmp_path=tmp_path)
    ckpt = tmp_path / "r" / "checkpoint.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert ckpt.exists(), proc.stderr.read()[-2000:]
    rc, _, err = interrupt(proc)
    last = err.strip().splitlines()[-1]
    assert rc == 130 and "Traceback" not in err, err[-3000:]
    held = torch.load(ckpt, weights_only=False)["step"]  # with --save-model, the step it stopped at is saved first
    assert last == f"stopped by Ctrl-C at step {held}; the checkpoint {ckpt} holds step {held} (continue with " \
                   f"--resume {ckpt})"


def test_losses_are_logged_from_the_first_step(d4rl_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    proc = run_script("--env-id", "halfcheetah-medium-v2", "--dataset-dir", d4rl_dir, "--output-dir", str(tmp_path),
                      *TINY, "--log-every", "1000", "--total-steps", "3", "--eval-every", "0", "--eval-episodes", "1",
                      "--eval-transport-steps", "0", "--run-name", "r")
    assert "compiling" not in proc.stdout and "defaults: discount 0.99" in proc.stdout
    events = EventAccumulator(str(tmp_path / "r")).Reload()
    assert [e.step for e in events.Scalars("losses/critic_loss")] == [1, 3]  # first step, then the final evaluation
    assert [e.step for e in events.Scalars("charts/SPS")] == [3]  # the first step (compilation) is not timed


def d4rl_qlearning_rows(terminals, timeouts, max_episode_steps):
    """The rows d4rl.qlearning_dataset keeps (its loop written out; timeouts=None: a file without the key)."""
    kept, episode_step = [], 0
    for i in range(len(terminals) - 1):
        final = timeouts[i] if timeouts is not None else episode_step == max_episode_steps - 1
        if final:
            episode_step = 0
            continue
        if terminals[i]:
            episode_step = 0
        kept.append(i)
        episode_step += 1
    return kept


@pytest.mark.parametrize("with_timeouts", [True, False])
def test_qlearning_transitions_keep_the_rows_d4rl_keeps(with_timeouts):
    rng = np.random.default_rng(0)
    n = 500
    terminals, timeouts = rng.random(n) < 0.02, rng.random(n) < 0.02
    data = dict(observations=np.arange(n, dtype=np.float32)[:, None], actions=np.zeros((n, 1), np.float32),
                rewards=np.arange(n, dtype=np.float32), terminals=terminals)
    if with_timeouts:
        data["timeouts"] = timeouts
    out = vgf.qlearning_transitions(data, max_episode_steps=30)
    kept = d4rl_qlearning_rows(terminals, timeouts if with_timeouts else None, 30)
    assert out["rewards"].tolist() == kept and out["next_observations"][:, 0].tolist() == [i + 1 for i in kept]
    assert out["terminals"].tolist() == terminals[kept].tolist()



# ------------------------------------------------------------------------------------- inputs a new user tries
def must_not_run(*_, **__):
    raise AssertionError("built before the input was checked")


@pytest.fixture(scope="module")
def finished_run(d4rl_dir, tmp_path_factory):
    """A 2-step run with a checkpoint (step 2 of 2) and its eval.jsonl."""
    out = tmp_path_factory.mktemp("finished")
    run_script("--env-id", "halfcheetah-medium-v2", "--dataset-dir", d4rl_dir, "--output-dir", str(out), *TINY,
               "--total-steps", "2", "--eval-every", "0", "--eval-episodes", "1", "--eval-transport-steps", "0",
               "--save-model", "--run-name", "r")
    return out


def test_a_used_run_name_is_refused_and_nothing_is_touched(finished_run, d4rl_dir):
    before = {p: p.read_bytes() for p in (finished_run / "r").iterdir()}
    proc = run_script("--env-id", "halfcheetah-medium-v2", "--dataset-dir", d4rl_dir, "--output-dir",
                      str(finished_run), *TINY, "--total-steps", "2", "--eval-episodes", "1", "--seed", "2",
                      "--run-name", "r", check=False)
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        f"error: {finished_run / 'r'} already holds a run; pass another --run-name (or --output-dir), or delete it "
        "(--resume PATH continues a run in the folder of PATH)"]
    assert {p: p.read_bytes() for p in (finished_run / "r").iterdir()} == before
    # a second --eval-only of the same checkpoint would append to the first one's eval.jsonl: refused too
    ckpt = str(finished_run / "r" / "checkpoint.pt")
    run_script("--eval-only", "--checkpoint", ckpt, "--output-dir", str(finished_run), "--no-cuda")
    proc = run_script("--eval-only", "--checkpoint", ckpt, "--output-dir", str(finished_run), "--no-cuda", check=False)
    assert proc.returncode == 2 and "r__eval_step2 already holds a run" in proc.stderr


def test_resume_folder_rules(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    vgf.check_run_folder(str(run))  # an empty folder is free
    (run / "eval.jsonl").write_text(json.dumps(dict(step=10)) + "\n" + json.dumps(dict(step=20)) + "\n")
    with pytest.raises(vgf.VGFError, match="already holds a run"):
        vgf.check_run_folder(str(run))
    vgf.check_run_folder(str(run), continues_step=20)  # --resume of its own last checkpoint continues in place
    vgf.drop_evaluations_past(str(run), 20)
    assert [r["step"] for r in vgf.read_evaluations(str(run))] == [10, 20]
    vgf.check_run_folder(str(run), continues_step=10)  # stopped between the evaluation at 20 and its checkpoint
    vgf.drop_evaluations_past(str(run), 10)
    assert [r["step"] for r in vgf.read_evaluations(str(run))] == [10]
    (run / "eval.jsonl").write_text("not json\n")
    with pytest.raises(vgf.VGFError, match="is not a list of evaluations"):
        vgf.check_run_folder(str(run), continues_step=10)


def test_explicit_env_id_equal_to_the_default_is_checked_against_the_checkpoint(finished_run, tmp_path):
    state = torch.load(finished_run / "r" / "checkpoint.pt", weights_only=False)
    state["args"]["env_id"] = "hopper-medium-v2"
    torch.save(state, tmp_path / "hopper.pt")
    proc = run_script("--eval-only", "--checkpoint", str(tmp_path / "hopper.pt"), "--env-id", "halfcheetah-medium-v2",
                      "--output-dir", str(tmp_path / "runs"), check=False)
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        f"error: checkpoint {tmp_path / 'hopper.pt'} is incompatible: it was trained with --env-id hopper-medium-v2, "
        "but halfcheetah-medium-v2 was given"]
    assert not (tmp_path / "runs").exists()
    assert vgf.given_options(["--env-id", "x", "--batch-size=3", "--no-compile", "--hidden-dims", "8", "8"]) == \
        {"env_id", "batch_size", "compile", "hidden_dims"}
    merged = vgf.merge_checkpoint_args(vgf.Args(batch_size=256), dict(state["args"], batch_size=32), "c.pt",
                                       explicit={"batch_size"})
    assert merged.batch_size == 256  # given on the command line: wins although it equals the default


def test_resume_says_where_it_starts_and_that_a_finished_run_is_finished(finished_run):
    ckpt = finished_run / "r" / "checkpoint.pt"
    before = ckpt.read_bytes()
    proc = run_script("--resume", str(ckpt), "--no-cuda")
    assert f"{ckpt} holds a finished run: step 2 of 2" in proc.stdout and "compiling" not in proc.stdout
    assert ckpt.read_bytes() == before
    with open(finished_run / "r" / "eval.jsonl", "a") as f:  # as if stopped between an evaluation and its checkpoint
        f.write(json.dumps(dict(step=3, L_test=0)) + "\n")
    proc = run_script("--resume", str(ckpt), "--total-steps", "3", "--no-cuda")
    assert f"resuming from step 2 of 3 ({ckpt})" in proc.stdout
    assert "dropped 1 evaluation rows past the checkpoint's step 2" in proc.stdout
    steps = [json.loads(line)["step"] for line in open(finished_run / "r" / "eval.jsonl")]
    assert steps == [2, 3]  # continued in its own folder


def test_checkpoint_that_is_a_folder_names_the_file(finished_run):
    with pytest.raises(vgf.VGFError) as e:
        vgf.load_checkpoint(str(finished_run / "r"))
    assert str(e.value).endswith(f"is a folder, not a checkpoint file; pass {finished_run / 'r' / 'checkpoint.pt'}")


def main_until_checked(args_list, monkeypatch, build_envs=False):
    """main() on parsed options, failing the test if environments (or the agent) are built before the error."""
    if not build_envs:
        monkeypatch.setattr(vgf, "make_eval_env", must_not_run)
    monkeypatch.setattr(vgf, "Agent", must_not_run)
    with pytest.raises(vgf.VGFError) as e:
        vgf.main(tyro.cli(vgf.Args, args=args_list))
    return str(e.value)


def test_output_dir_that_is_a_file_or_not_writable(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    msg = main_until_checked(["--output-dir", str(tmp_path / "file" / "runs")], monkeypatch)
    assert msg == f"--output-dir: {tmp_path / 'file'} is a file, not a folder; pass a folder"
    real_access = os.access
    monkeypatch.setattr(vgf.os, "access", lambda p, mode: False if p == str(tmp_path / "ro") else real_access(p, mode))
    (tmp_path / "ro").mkdir()
    msg = main_until_checked(["--output-dir", str(tmp_path / "ro" / "runs")], monkeypatch)
    assert "cannot write into" in msg and "pass a writable --output-dir" in msg
    assert os.listdir(tmp_path / "ro") == []


def test_batch_larger_than_the_dataset_is_refused_before_envs(d4rl_dir, tmp_path, monkeypatch):
    msg = main_until_checked(["--env-id", "halfcheetah-medium-v2", "--dataset-dir", d4rl_dir, "--output-dir",
                              str(tmp_path / "runs"), "--batch-size", "100000"], monkeypatch)
    assert msg.startswith("--batch-size 100000 is larger than the dataset (") and "pass --batch-size" in msg
    assert not (tmp_path / "runs").exists()


def test_ogbench_id_without_data_fails_before_building_environments(tmp_path, monkeypatch):
    def offline(*_, **__):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(vgf.urllib.request, "urlopen", offline)
    msg = main_until_checked(["--env-id", "cube-double-play-singletask-v0", "--dataset-dir", str(tmp_path / "og"),
                              "--output-dir", str(tmp_path / "runs")], monkeypatch)
    assert str(tmp_path / "og" / "cube-double-play-v0.npz") in msg and not (tmp_path / "runs").exists()


def test_unreadable_data_file_is_not_downloaded_again(tmp_path, monkeypatch):
    path = str(tmp_path / "halfcheetah_medium-v2.hdf5")
    (tmp_path / "halfcheetah_medium-v2.hdf5").write_bytes(b"x")

    def no_permission(p, *a, **k):  # as for a non-root user after chmod 000
        raise PermissionError(13, "Permission denied", p)

    monkeypatch.setattr(vgf, "open", no_permission, raising=False)
    monkeypatch.setattr(vgf, "download", must_not_run)
    with pytest.raises(vgf.VGFError, match="cannot be read \\(permission denied on the file or a folder above it\\)"):
        vgf.load_dataset(vgf.Args(env_id="halfcheetah-medium-v2", dataset_dir=str(tmp_path)))
    monkeypatch.undo()
    assert vgf.must_download(str(tmp_path / "other.hdf5")) and not vgf.must_download(path)


def test_actions_outside_the_box_and_fractional_flags(tmp_path, capsys):
    path = write_d4rl_hdf5(str(tmp_path / "halfcheetah_medium-v2.hdf5"), episodes=2, length=600)
    args = vgf.Args(env_id="halfcheetah-medium-v2", dataset_dir=str(tmp_path), reward_scale_episodes="true")
    with h5py.File(path, "a") as f:
        actions = f["actions"][()]
        f["actions"][...] = actions * 10
    with pytest.raises(vgf.VGFError, match=r"% of the action entries lie outside \[-1, 1\] .*rescale the actions"):
        vgf.load_dataset(args)
    with h5py.File(path, "a") as f:
        actions[3, 0] = 1.2  # one entry slightly outside: clipped, with a warning
        f["actions"][...] = actions
    data, _, _ = vgf.load_dataset(args)
    assert "warning: " in capsys.readouterr().out and data["actions"].max() <= 1.0
    with h5py.File(path, "a") as f:
        del f["terminals"]
        f["terminals"] = np.full(1200, 0.5, np.float32)
    with pytest.raises(vgf.VGFError, match="key 'terminals' must hold 0 or 1 \\(booleans\\), but row 0 holds 0.5"):
        vgf.load_dataset(args)


def help_text(script):
    env = {**os.environ, "COLUMNS": "1000", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, os.path.join(ROOT, script), "--help"], capture_output=True, text=True,
                          env=env, cwd=ROOT).stdout


def help_entries(text):
    """option -> its whole help entry (the description may start on the line after a long option name)."""
    entries, name = {}, None
    for line in text.splitlines():
        body = line.strip("│ ")
        if body.startswith("--"):
            name = body.split()[0].rstrip(",")
            entries[name] = body
        elif name and line.startswith("│  ") and body:
            entries[name] += " " + body
    return entries


def fmt(value):
    """A per-task default as the help text writes it."""
    if isinstance(value, int) and value >= 1000:
        return f"{value // 1_000_000}M" if value % 1_000_000 == 0 else f"{value // 1000}k"
    return str(value)


def test_help_shows_the_per_task_defaults():
    lines = help_entries(help_text("vgf_offline.py"))
    cases = [("halfcheetah-medium-v2", {}), ("antmaze-large-diverse-v2", {}), ("pen-cloned-v1", {}),
             ("cube-double-play-singletask-v0", {}), ("antmaze-large-navigate-singletask-v0", {}),
             ("antmaze-giant-navigate-singletask-v0", {}), ("hopper-medium-v2", dict(online_steps=10)),
             ("cube-double-play-singletask-v0", dict(online_steps=10)),
             ("antmaze-giant-navigate-singletask-v0", dict(online_steps=10, amortised=True)),
             ("humanoidmaze-medium-navigate-singletask-v0", dict(online_steps=10, amortised=True)),
             ("antsoccer-arena-navigate-singletask-v0", dict(online_steps=10, amortised=True))]
    for name in [*vgf.SUITE_FIELDS, "num_particles"]:
        line = lines[f"--{name.replace('_', '-')}"]
        assert "(default: None)" not in line, line
        for env_id, kw in cases:
            value = vgf.task_defaults(vgf.Args(env_id=env_id, **kw))[name]
            assert fmt(value) in line.split("(default:")[1], (name, env_id, kw, value)


@pytest.mark.parametrize("script", ["vgf_offline.py", "vgf_llm.py"])
def test_help_has_one_default_per_option_and_whole_lines(script):
    import ast

    entries = help_entries(help_text(script))
    assert len(entries) > 20 and all(entry.count("(default:") == 1 for name, entry in entries.items()
                                     if name != "-h"), entries
    tree = ast.parse(open(os.path.join(ROOT, script)).read())
    args = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Args")
    docs = [(a.target.id, b.value.value) for a, b in zip(args.body, args.body[1:])
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)]
    assert len(docs) > 20
    # a docstring's line break becomes a line break mid-sentence in --help
    assert [name for name, doc in docs if "\n" in doc] == []


def test_plots_legend_beside_the_lines_title_and_integer_ticks(tmp_path, monkeypatch):
    import matplotlib.figure

    rows = [dict(env_id="hopper-medium-v2", seed=3, step=s, L_test=L, metric="d4rl_normalized_score",
                 score_mean=10.0 * L + s / 100, score_std=1.0, episodes=5) for s in (100, 200) for L in (0, 1, 2, 3)]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    seen, save = [], matplotlib.figure.Figure.savefig

    def save_and_measure(fig, *a, **k):
        save(fig, *a, **k)  # draws the figure: the extents below are those of the file
        ax = fig.axes[0]
        legend = ax.get_legend().get_window_extent() if ax.get_legend() else None
        seen.append((ax.get_title(), list(ax.get_xticks()), legend, ax.get_window_extent(), fig.bbox))

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", save_and_measure)
    vgf.write_plots(str(tmp_path))
    (title, _, legend, axes, page), (_, ticks, _, _, _) = seen
    assert legend.x0 >= axes.x1 and legend.x1 <= page.x1  # beside the axes (never over a line), inside the figure
    assert "hopper-medium-v2" in title and "seed 3" in title
    assert ticks == [0, 1, 2, 3]  # L_test is an integer


def test_steps_per_second_count_training_only(d4rl_dir, tmp_path, monkeypatch):
    """charts/SPS and the progress bar's rate leave evaluations out: a 6-second evaluation between two logs does not
    pull the measured rate of 5 tiny updates down to below 5 / 6 steps/s."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    evaluate_all = vgf.evaluate_all

    def slow_evaluation(*args, **kwargs):
        time.sleep(6.0)
        return evaluate_all(*args, **kwargs)

    monkeypatch.setattr(vgf, "evaluate_all", slow_evaluation)
    args = vgf.Args(env_id="halfcheetah-medium-v2", dataset_dir=d4rl_dir, output_dir=str(tmp_path), run_name="r",
                    hidden_dims=[32, 32], batch_size=32, num_particles=4, bc_flow_steps=3, train_transport_steps=2,
                    compile=False, cuda=False, total_steps=10, eval_every=5, eval_episodes=1, eval_transport_steps=[0],
                    log_every=5)
    vgf.main(args)
    sps = {e.step: e.value for e in EventAccumulator(str(tmp_path / "r")).Reload().Scalars("charts/SPS")}
    assert sorted(sps) == [5, 10] and sps[10] > 1.0  # 5 updates after the evaluation, in well under 5 s


def test_each_program_runs_copied_alone(d4rl_dir, tmp_path):
    """Each file copied alone into an empty folder (no tests/, no docs/) imports only pip packages and runs."""
    for script in ("vgf_offline.py", "vgf_llm.py"):
        shutil.copy(os.path.join(ROOT, script), tmp_path / script)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    out = subprocess.run([sys.executable, "vgf_offline.py", "--env-id", "halfcheetah-medium-v2", "--dataset-dir",
                          d4rl_dir, "--output-dir", "runs", "--run-name", "alone", *TINY, "--total-steps", "3",
                          "--eval-every", "0", "--eval-episodes", "1", "--eval-transport-steps", "0"],
                         cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "runs" / "alone" / "eval.jsonl").is_file()
    out = subprocess.run([sys.executable, "vgf_llm.py", "--help"], cwd=tmp_path, capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0 and "--transport" in out.stdout, out.stderr[-3000:]
