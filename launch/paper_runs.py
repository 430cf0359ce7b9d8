"""The paper's 225 offline runs as one numbered list, for a Slurm job array or GNU parallel (README, "Reproducing the
paper's tables"): 15 D4RL tasks x 5 seeds (indices 0-74), then 10 OGBench environments x 5 tasks x 3 seeds (75-224).

    python launch/paper_runs.py 17                  # run index 17 (resumes it if its checkpoint exists)
    python launch/paper_runs.py 17 --dry-run        # print the command only
    python launch/paper_runs.py --list              # every index with its command
    python launch/paper_runs.py 17 -- --alpha 0.05  # options after -- go to vgf_offline.py unchanged

Each run has a deterministic folder <output-dir>/<env-id>__vgf__seed<seed> and saves its checkpoint at every
evaluation (--save-model), so a job that is requeued or started again continues from its last checkpoint; a folder
without a checkpoint (stopped before its first evaluation) is started again from step 0.
"""
import argparse
import os
import shutil
import sys

D4RL_TASKS = [f"{env}-{data}-v2" for env in ("halfcheetah", "hopper", "walker2d")
              for data in ("medium", "medium-replay", "medium-expert")] + \
             [f"antmaze-{maze}-v2" for maze in ("umaze", "umaze-diverse", "medium-play", "medium-diverse",
                                                "large-play", "large-diverse")]
OGBENCH_ENVS = ["antmaze-large-navigate", "antmaze-giant-navigate", "humanoidmaze-medium-navigate",
                "humanoidmaze-large-navigate", "antsoccer-arena-navigate", "cube-single-play", "cube-double-play",
                "scene-play", "puzzle-3x3-play", "puzzle-4x4-play"]
RUNS = [(task, seed) for task in D4RL_TASKS for seed in range(5)] + \
       [(f"{env}-singletask-task{task}-v0", seed) for env in OGBENCH_ENVS for task in range(1, 6) for seed in range(3)]
SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "vgf_offline.py")


def command(index: int, output_dir: str, extra=()) -> list:
    """The vgf_offline.py command of run `index`: a fresh start, or --resume from the run's checkpoint."""
    env_id, seed = RUNS[index]
    run_name = f"{env_id}__vgf__seed{seed}"
    run_dir = os.path.join(output_dir, run_name)
    checkpoint = os.path.join(run_dir, "checkpoint.pt")
    cmd = [sys.executable, SCRIPT, "--env-id", env_id, "--seed", str(seed), "--output-dir", output_dir,
           "--run-name", run_name, "--save-model", *extra]
    if os.path.isfile(checkpoint):
        cmd += ["--resume", checkpoint]
    return cmd


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("index", type=int, nargs="?", help="run index, 0-224 (e.g. $SLURM_ARRAY_TASK_ID)")
    parser.add_argument("--output-dir", default="runs/paper", help="where the run folders go")
    parser.add_argument("--dry-run", action="store_true", help="print the command, run nothing")
    parser.add_argument("--list", action="store_true", help="print every index and its command")
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    cli = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if cli.list:
        for i in range(len(RUNS)):
            print(i, " ".join(command(i, cli.output_dir, extra)[1:]))
        return
    if cli.index is None:
        parser.error("give a run index (0-224) or --list")
    if not 0 <= cli.index < len(RUNS):
        parser.error(f"run index {cli.index} is outside 0-{len(RUNS) - 1}")
    cmd = command(cli.index, cli.output_dir, extra)
    print(" ".join(cmd), flush=True)
    if cli.dry_run:
        return
    run_dir = os.path.join(cli.output_dir, f"{RUNS[cli.index][0]}__vgf__seed{RUNS[cli.index][1]}")
    if "--resume" not in cmd and os.path.isdir(run_dir):
        print(f"{run_dir} holds no checkpoint (stopped before its first evaluation): starting it again", flush=True)
        shutil.rmtree(run_dir)
    os.execv(sys.executable, cmd)  # the run replaces this process: signals and the exit code are vgf_offline.py's


if __name__ == "__main__":
    main()
