"""Nothing lost and every failure named (vgf_offline.py): one run per folder (an OS lock), --resume next to its
checkpoint, checkpoints and datasets checked on --resume and --eval-only, a full disk, out of memory, SIGTERM and Ctrl-C,
and no stub folder left by a failed or stopped run."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch

import vgf_offline as vgf
from conftest import ROOT, TINY, run_script, write_d4rl_hdf5

RUN = ["--env-id", "halfcheetah-medium-v2", *TINY, "--eval-episodes", "1", "--eval-transport-steps", "0"]


def start(*args):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "vgf_offline.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def wait_for(condition, proc, seconds=180):
    deadline = time.time() + seconds
    while not condition():
        if proc.poll() is not None or time.time() > deadline:
            out, err = proc.communicate(timeout=30) if proc.poll() is not None else ("", "")
            proc.kill()
            pytest.fail(f"condition not met (exit {proc.returncode}); stderr: {err[-2000:]}")
        time.sleep(0.2)


def holds_lock(run_dir):
    return vgf.run_folder_holder(str(run_dir)) is not None


@pytest.fixture(scope="module")
def trained(d4rl_dir, tmp_path_factory):
    """A 4-step run with a checkpoint at step 4 and its eval.jsonl."""
    out = tmp_path_factory.mktemp("trained")
    run_script(*RUN, "--dataset-dir", d4rl_dir, "--output-dir", str(out), "--total-steps", "4", "--eval-every", "2",
               "--save-model", "--run-name", "r")
    return out


def test_a_second_process_on_a_run_folder_is_refused_and_a_crash_frees_it(d4rl_dir, tmp_path):
    first = start(*RUN, "--dataset-dir", d4rl_dir, "--output-dir", str(tmp_path), "--total-steps", "1000000",
                  "--eval-every", "0", "--run-name", "r")
    wait_for(lambda: holds_lock(tmp_path / "r"), first)
    proc = run_script(*RUN, "--dataset-dir", d4rl_dir, "--output-dir", str(tmp_path), "--total-steps", "4",
                      "--run-name", "r", check=False)
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        f"error: the run folder {tmp_path / 'r'} is in use by another run (process {first.pid}); wait for it to "
        "finish or pass another --run-name"]
    first.kill()  # a crash: the OS releases the lock; the folder holds no evaluation and no checkpoint
    first.wait()
    assert os.listdir(tmp_path / "r") and not holds_lock(tmp_path / "r")
    run_script(*RUN, "--dataset-dir", d4rl_dir, "--output-dir", str(tmp_path), "--total-steps", "2",
               "--eval-every", "0", "--run-name", "r")  # the stub left by the crash does not block the name
    events = [name for name in os.listdir(tmp_path / "r") if name.startswith("events.out")]
    assert len(events) == 1 and os.path.exists(tmp_path / "r" / "eval.jsonl")  # the crashed run's events removed


def test_two_resumes_of_one_checkpoint_at_once(trained, tmp_path):
    folder = tmp_path / "r"
    shutil.copytree(trained / "r", folder)
    ckpt = folder / "checkpoint.pt"
    first = start("--resume", str(ckpt), "--total-steps", "1000000", "--eval-every", "0")
    wait_for(lambda: holds_lock(folder), first)
    proc = run_script("--resume", str(ckpt), "--total-steps", "8", check=False)
    first.send_signal(signal.SIGINT)
    first.communicate(timeout=120)
    assert proc.returncode == 2 and f"the run folder {folder} is in use by another run (process {first.pid})" in \
        proc.stderr
    steps = [json.loads(line)["step"] for line in open(folder / "eval.jsonl")]
    assert steps == sorted(steps) and len(steps) == len(set(steps))  # no evaluation twice, no mixed runs


def test_resume_of_a_copied_folder_continues_in_the_copy(trained, tmp_path):
    original = trained / "r"
    before = {p.name: p.read_bytes() for p in original.iterdir()}
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    proc = run_script("--resume", str(copy / "checkpoint.pt"), "--total-steps", "6", "--eval-every", "2")
    assert f"resuming from step 4 of 6 ({copy / 'checkpoint.pt'}) in {copy}" in proc.stdout
    assert torch.load(copy / "checkpoint.pt", weights_only=False)["step"] == 6
    assert [json.loads(line)["step"] for line in open(copy / "eval.jsonl")] == [2, 4, 6]
    assert {p.name: p.read_bytes() for p in original.iterdir()} == before  # the original is untouched


def test_resume_on_another_dataset_is_refused_unless_allowed(trained, d4rl_dir, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    write_d4rl_hdf5(str(other / "halfcheetah_medium-v2.hdf5"), length=600, seed=7)  # as the fixture, other rows
    copy = tmp_path / "r"
    shutil.copytree(trained / "r", copy)
    ckpt = copy / "checkpoint.pt"
    proc = run_script("--resume", str(ckpt), "--total-steps", "6", "--dataset-dir", str(other), check=False)
    assert proc.returncode == 2 and proc.stderr.startswith(
        f"error: checkpoint {ckpt} was trained on other data than this run loads (reward_scale ")
    assert "reward_scale" in proc.stderr and "--allow-other-dataset" in proc.stderr
    assert torch.load(ckpt, weights_only=False)["step"] == 4  # nothing was written
    proc = run_script("--resume", str(ckpt), "--total-steps", "6", "--dataset-dir", str(other),
                      "--allow-other-dataset")
    assert "warning: checkpoint" in proc.stdout and torch.load(ckpt, weights_only=False)["step"] == 6
    state = torch.load(ckpt, weights_only=False)
    assert state["dataset"]["transitions"] == 2396 and len(state["dataset"]["sha256_of_sampled_rows"]) == 64


@pytest.mark.parametrize("damage,message", [("nan", "holds non-finite weights (linears.0.weight)"),
                                            ("step", "is damaged: its step is -5")])
def test_damaged_checkpoints_are_refused(trained, tmp_path, damage, message):
    state = torch.load(trained / "r" / "checkpoint.pt", weights_only=False)
    if damage == "nan":
        state["nets"][0]["linears.0.weight"][0, 0] = float("nan")
    else:
        state["step"] = -5
    torch.save(state, tmp_path / "damaged.pt")
    for mode in (["--eval-only", "--checkpoint"], ["--resume"]):
        proc = run_script(*mode, str(tmp_path / "damaged.pt"), "--output-dir", str(tmp_path / "out"), check=False)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_while_saving_a_checkpoint_keeps_the_previous_one(d4rl_dir, tmp_path, monkeypatch):
    args = vgf.Args(env_id="halfcheetah-medium-v2", dataset_dir=d4rl_dir, output_dir=str(tmp_path), run_name="r",
                    hidden_dims=[32, 32], batch_size=32, num_particles=4, bc_flow_steps=3, train_transport_steps=2,
                    compile=False, cuda=False, total_steps=4, eval_every=2, eval_episodes=1, eval_transport_steps=[0],
                    save_model=True)
    saves = []
    real_save = torch.save

    def save_once_then_full(obj, f, *a, **k):
        saves.append(1)
        if len(saves) == 1:
            return real_save(obj, f, *a, **k)
        f.write(b"partial")  # as a disk that fills up half way
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(vgf.torch, "save", save_once_then_full)
    with pytest.raises(vgf.VGFError) as e:
        vgf.main(args)
    ckpt = tmp_path / "r" / "checkpoint.pt"
    assert str(e.value).startswith(f"no space left on the device while writing {ckpt}")
    assert torch.load(ckpt, weights_only=False)["step"] == 2  # the previous checkpoint, intact
    assert not [name for name in os.listdir(tmp_path / "r") if name.endswith(".tmp")]


@pytest.mark.parametrize("where", ["run folder", "plot", "eval.jsonl"])
def test_disk_full_elsewhere_is_one_error_and_leaves_no_partial_file(d4rl_dir, tmp_path, monkeypatch, where):
    args = vgf.Args(env_id="halfcheetah-medium-v2", dataset_dir=d4rl_dir, output_dir=str(tmp_path), run_name="r",
                    hidden_dims=[32, 32], batch_size=32, num_particles=4, bc_flow_steps=3, train_transport_steps=2,
                    compile=False, cuda=False, total_steps=2, eval_every=0, eval_episodes=1, eval_transport_steps=[0])
    real_open = open
    if where == "run folder":  # the disk is full when the run folder's first file (its lock) is created
        monkeypatch.setattr(vgf, "open", lambda path, *a, **k: no_space() if str(path).endswith(".lock")
                            else real_open(path, *a, **k), raising=False)
        path = tmp_path / "r"
    elif where == "plot":
        import matplotlib.figure

        monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, f, **k: (f.write(b"x"), no_space()))
        path = tmp_path / "r" / "eval_curve.png"
    else:
        class FillsUp:  # a file on a disk that is full after 3 characters
            def __init__(self, f):
                self.f = f

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

            def writelines(self, lines):
                self.f.write("".join(lines)[:3])
                no_space()

        def open_on_a_full_disk(path, mode="r", *a, **k):
            f = real_open(path, mode, *a, **k)
            return FillsUp(f) if str(path).endswith("eval.jsonl.tmp") else f

        monkeypatch.setattr(vgf, "open", open_on_a_full_disk, raising=False)
        path = tmp_path / "r" / "eval.jsonl"
    with pytest.raises(vgf.VGFError) as e:
        vgf.main(args)
    assert str(e.value).startswith(f"no space left on the device while writing {path}")
    leftovers = [name for name in os.listdir(tmp_path / "r")] if (tmp_path / "r").exists() else []
    assert not [n for n in leftovers if n.endswith(".tmp") or n.endswith(".png")]
    if where != "plot":  # no evaluation was written: no stub folder either
        assert not (tmp_path / "r").exists()


def test_disk_full_on_a_real_small_filesystem(d4rl_dir, tmp_path):
    """The same on a real 200 KiB tmpfs, where the first checkpoint (about 130 KiB) fits and a second copy beside it does not."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        proc = run_script(*RUN, "--dataset-dir", d4rl_dir, "--output-dir", str(mount), "--total-steps", "40",
                          "--eval-every", "2", "--save-model", "--run-name", "r", check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        line = proc.stderr.strip().splitlines()[-1]
        assert line.startswith("error: no space left on the device while writing"), line
        assert not [n for n in os.listdir(mount / "r") if n.endswith(".tmp")]
        state = torch.load(mount / "r" / "checkpoint.pt", weights_only=False)  # the last whole checkpoint
        assert state["step"] >= 2
    finally:
        subprocess.run(["umount", str(mount)])


def test_out_of_memory_is_one_error_with_the_size_and_what_to_lower(d4rl_dir, tmp_path):
    """A real allocation failure: the process's address space limited to 3 GB, N 100,000 particles."""
    code = ("import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30)); "
            f"sys.argv = sys.argv[1:]; runpy.run_path({os.path.join(ROOT, 'vgf_offline.py')!r}, run_name='__main__')")
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    args = [*RUN, "--dataset-dir", d4rl_dir, "--output-dir", str(tmp_path), "--total-steps", "2",
            "--num-particles", "100000", "--run-name", "r"]
    proc = subprocess.run([sys.executable, "-c", code, "vgf_offline.py", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: out of memory (an allocation of ") and "GiB failed): pass a smaller " \
        "--batch-size or --num-particles" in line
    assert not (tmp_path / "r").exists()


def test_sigterm_saves_the_last_step_and_resume_continues(d4rl_dir, tmp_path):
    """What Slurm sends before preemption: the run stops at the end of the step, saves it and exits 143; --resume
    continues from that step."""
    proc = start(*RUN, "--dataset-dir", d4rl_dir, "--output-dir", str(tmp_path), "--total-steps", "1000000",
                 "--eval-every", "0", "--save-model", "--run-name", "r", "--log-every", "5")
    wait_for(lambda: any(n.startswith("events.out") and os.path.getsize(tmp_path / "r" / n) > 2000
                         for n in os.listdir(tmp_path / "r")) if (tmp_path / "r").exists() else False, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    ckpt = tmp_path / "r" / "checkpoint.pt"
    held = torch.load(ckpt, weights_only=False)["step"]
    assert proc.returncode == 143 and "Traceback" not in err, err[-2000:]
    assert err.strip().splitlines()[-1] == (f"stopped by SIGTERM at step {held}; the checkpoint {ckpt} holds step "
                                            f"{held} (continue with --resume {ckpt})")
    assert held > 5
    out = run_script("--resume", str(ckpt), "--total-steps", str(held + 2), "--eval-every", "0").stdout
    assert f"resuming from step {held} of {held + 2}" in out
    assert torch.load(ckpt, weights_only=False)["step"] == held + 2


def test_a_stopped_run_without_results_leaves_no_folder(d4rl_dir, tmp_path):
    proc = start(*RUN, "--dataset-dir", d4rl_dir, "--output-dir", str(tmp_path), "--total-steps", "1000000",
                 "--eval-every", "0", "--run-name", "r")
    wait_for(lambda: holds_lock(tmp_path / "r") if (tmp_path / "r").exists() else False, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.strip().splitlines()[-1].endswith(
        "no checkpoint was saved (--save-model keeps one)")
    assert not (tmp_path / "r").exists()


def test_dataset_files_that_cannot_be_used(tmp_path):
    """A D4RL file with no rows, an OGBench file whose arrays differ in length, and a text file named .npz."""
    d4rl = tmp_path / "d4rl"
    d4rl.mkdir()
    write_d4rl_hdf5(str(d4rl / "halfcheetah_medium-v2.hdf5"), episodes=1, length=5)
    with h5py.File(d4rl / "halfcheetah_medium-v2.hdf5", "a") as f:
        for key in ("observations", "actions", "rewards", "terminals", "timeouts"):
            data = f[key][:0]
            del f[key]
            f[key] = data
    proc = run_script("--env-id", "halfcheetah-medium-v2", "--dataset-dir", str(d4rl), "--output-dir",
                      str(tmp_path / "out"), check=False)
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        f"error: {d4rl / 'halfcheetah_medium-v2.hdf5'} holds 0 rows; a dataset needs at least 2 (a transition needs "
        "its next row): repair the file or delete it to download it again"]

    ogbench = tmp_path / "ogbench"
    ogbench.mkdir()
    rng = np.random.default_rng(0)
    for suffix in ("", "-val"):
        np.savez(ogbench / f"cube-single-play-v0{suffix}.npz", observations=rng.normal(size=(30, 28)).astype(np.float32),
                 actions=rng.uniform(-1, 1, (20, 5)).astype(np.float32), terminals=np.zeros(30, bool),
                 qpos=rng.normal(size=(30, 20)), qvel=rng.normal(size=(30, 20)))
    proc = run_script("--env-id", "cube-single-play-singletask-v0", "--dataset-dir", str(ogbench), "--output-dir",
                      str(tmp_path / "out"), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{ogbench / 'cube-single-play-v0.npz'}: its arrays must hold the same number (>= 2) of rows, but hold " \
           "observations 30, actions 20, terminals 30" in proc.stderr

    (ogbench / "cube-single-play-v0.npz").write_text("oops\n")
    proc = run_script("--env-id", "cube-single-play-singletask-v0", "--dataset-dir", str(ogbench), "--output-dir",
                      str(tmp_path / "out"), check=False)
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        f"error: {ogbench / 'cube-single-play-v0.npz'} is not an npz file (a NumPy zip archive); delete it to "
        "download it again"]
    assert not (tmp_path / "out").exists()


def test_the_slurm_script_creates_its_log_folder():
    """Slurm opens --output before the job runs and does not create folders: the documented submit line must."""
    text = open(os.path.join(ROOT, "launch", "paper_runs.sbatch")).read()
    output = next(line.split("=", 1)[1] for line in text.splitlines() if line.startswith("#SBATCH --output="))
    folder = os.path.dirname(output)
    assert f"mkdir -p {folder} && sbatch launch/paper_runs.sbatch" in text
    assert f"mkdir -p {folder} && sbatch launch/paper_runs.sbatch" in open(os.path.join(ROOT, "README.md")).read()
