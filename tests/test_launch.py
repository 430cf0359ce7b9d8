"""launch/paper_runs.py: the index -> run mapping of the paper's 225 runs, and a rerun of an index resumes."""
import json
import os
import subprocess
import sys

from conftest import ROOT, TINY

sys.path.insert(0, os.path.join(ROOT, "launch"))
import paper_runs  # noqa: E402

LAUNCHER = os.path.join(ROOT, "launch", "paper_runs.py")


def launch(*args):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, LAUNCHER, *args], capture_output=True, text=True, env=env, timeout=600,
                          cwd=ROOT)


def test_the_225_runs_are_the_papers_tasks_and_seeds():
    assert len(paper_runs.RUNS) == 225 and len(set(paper_runs.RUNS)) == 225
    assert paper_runs.RUNS[0] == ("halfcheetah-medium-v2", 0) and paper_runs.RUNS[74] == ("antmaze-large-diverse-v2", 4)
    assert paper_runs.RUNS[75] == ("antmaze-large-navigate-singletask-task1-v0", 0)
    assert paper_runs.RUNS[224] == ("puzzle-4x4-play-singletask-task5-v0", 2)
    d4rl = [seed for task, seed in paper_runs.RUNS if task.endswith("-v2")]
    assert len(d4rl) == 75 and sorted(set(d4rl)) == [0, 1, 2, 3, 4]
    ogbench = {task.split("-singletask")[0] for task, _ in paper_runs.RUNS[75:]}
    assert ogbench == set(paper_runs.OGBENCH_ENVS)
    listed = launch("--list", "--output-dir", "out").stdout.splitlines()
    assert len(listed) == 225 and listed[150].startswith("150 ")
    assert "--env-id cube-single-play-singletask-task1-v0 --seed 0" in listed[150]
    bad = launch("225", "--dry-run")
    assert bad.returncode == 2 and "outside 0-224" in bad.stderr


def test_rerunning_an_index_resumes_from_its_checkpoint(d4rl_dir, tmp_path):
    """Index 0 (halfcheetah-medium-v2, seed 0) with a tiny configuration: a folder left without a checkpoint is started
    again; stopped at step 10, the same index started again continues from that checkpoint to step 20."""
    tiny = ["--", "--dataset-dir", d4rl_dir, *TINY, "--eval-every", "10", "--eval-episodes", "1",
            "--eval-transport-steps", "0"]
    out = str(tmp_path)
    run_dir = tmp_path / "halfcheetah-medium-v2__vgf__seed0"
    run_dir.mkdir()
    (run_dir / "eval.jsonl").write_text(json.dumps({"step": 999}) + "\n")  # stopped before its first checkpoint
    first = launch("0", "--output-dir", out, *tiny, "--total-steps", "10")
    assert first.returncode == 0, first.stderr[-2000:]
    assert "starting it again" in first.stdout and "--resume" not in first.stdout.splitlines()[0] and (run_dir / "checkpoint.pt").is_file()
    second = launch("0", "--output-dir", out, *tiny, "--total-steps", "20")
    assert second.returncode == 0, second.stderr[-2000:]
    assert f"--resume {run_dir / 'checkpoint.pt'}" in second.stdout.splitlines()[0]
    with open(run_dir / "eval.jsonl") as f:
        steps = [json.loads(line)["step"] for line in f]
    assert steps == [10, 20]  # one evaluation each, no second run from step 0 in the same folder
    import torch

    assert torch.load(run_dir / "checkpoint.pt", weights_only=False)["step"] == 20
    table = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "aggregate_results.py"), out],
                           capture_output=True, text=True)  # reads the launcher's folders as they are
    assert table.returncode == 0 and "1 runs" in table.stdout and "| halfcheetah-medium-v2 |" in table.stdout


def test_a_run_folder_without_checkpoint_starts_again(tmp_path):
    run_dir = tmp_path / "hopper-medium-v2__vgf__seed1"  # index 16
    run_dir.mkdir()
    (run_dir / "eval.jsonl").write_text("")
    cmd = paper_runs.command(16, str(tmp_path))
    assert "--resume" not in cmd and cmd[cmd.index("--run-name") + 1] == run_dir.name
    dry = launch("16", "--output-dir", str(tmp_path), "--dry-run")
    assert dry.returncode == 0 and run_dir.is_dir()  # a dry run touches nothing
