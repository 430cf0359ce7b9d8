"""Write an OGBench pointmaze 'navigate' dataset with OGBench's own data-generation procedure, in its raw npz format.

    python tests/make_ogbench_data.py DIR [--maze medium] [--episodes 1000] [--seed 0]

writes DIR/pointmaze-<maze>-navigate-v0.npz (train, --episodes episodes) and DIR/pointmaze-<maze>-navigate-v0-val.npz
(10% as many validation episodes), keys observations, actions (float32), terminals (bool), qpos, qvel, as the files
OGBench hosts; `ogbench.make_env_and_datasets(..., dataset_dir=DIR)` and `vgf_offline.py --dataset-dir DIR` read
them unchanged. The procedure follows the OGBench repository's data_gen_scripts (generate_locomaze.py, commands.sh:
`--dataset_type=navigate --max_episode_steps=1001 --noise=0.5` for pointmaze-medium / large):
  - the environment runs without termination at the goal, 1001 steps per episode;
  - each episode starts in a random empty cell with a goal in a random "vertex" cell (an empty cell that is not
    the middle of a straight corridor);
  - the oracle action is the unit vector from the point to the environment's oracle subgoal (BFS over the maze,
    env.unwrapped.get_oracle_subgoal), plus Gaussian noise of std 0.5, clipped to [-1, 1];
  - whenever the goal is reached a new goal is drawn from the vertex cells ('navigate').
The official datasets have 1000 train episodes (1M transitions); fewer keep generation and loading quick.
"""
import argparse
import os
import sys

import numpy as np

NOISE = 0.5  # commands.sh: --noise=0.5 for pointmaze
EPISODE_STEPS = 1001  # commands.sh: --max_episode_steps=1001 for pointmaze-medium / large


def maze_cells(maze_map: np.ndarray):
    """Empty cells, and the empty cells that are not inside a straight corridor (goal candidates)."""
    free, vertices = [], []
    for i in range(maze_map.shape[0]):
        for j in range(maze_map.shape[1]):
            if maze_map[i, j] != 0:
                continue
            free.append((i, j))
            vertical = maze_map[i - 1, j] == 0 and maze_map[i + 1, j] == 0 and maze_map[i, j - 1] == 1 \
                and maze_map[i, j + 1] == 1
            horizontal = maze_map[i, j - 1] == 0 and maze_map[i, j + 1] == 0 and maze_map[i - 1, j] == 1 \
                and maze_map[i + 1, j] == 1
            if not (vertical or horizontal):
                vertices.append((i, j))
    return free, vertices


def collect(maze: str, episodes: int, seed: int):
    import gymnasium
    import ogbench.locomaze  # noqa: F401  (registers pointmaze-*-v0)

    env = gymnasium.make(f"pointmaze-{maze}-v0", terminate_at_goal=False, max_episode_steps=EPISODE_STEPS)
    base = env.unwrapped
    rng = np.random.default_rng(seed)
    np.random.seed(seed)  # the maze env draws its start-position noise from the global NumPy generator
    free, vertices = maze_cells(base.maze_map)
    data = {k: [] for k in ("observations", "actions", "terminals", "qpos", "qvel")}
    goals_reached = 0
    for ep in range(episodes):
        start, goal = free[rng.integers(len(free))], vertices[rng.integers(len(vertices))]
        ob, _ = env.reset(seed=int(seed * 100_003 + ep), options=dict(task_info=dict(init_ij=start, goal_ij=goal)))
        done = False
        while not done:
            xy = base.get_xy()
            subgoal, _ = base.get_oracle_subgoal(xy, base.cur_goal_xy)
            direction = (subgoal - xy) / (np.linalg.norm(subgoal - xy) + 1e-6)
            action = np.clip(direction + rng.normal(0.0, NOISE, 2), -1.0, 1.0)
            next_ob, _, terminated, truncated, info = env.step(action)
            done = terminated or truncated
            if info["success"]:  # 'navigate': a new goal once the current one is reached
                goals_reached += 1
                base.set_goal(vertices[rng.integers(len(vertices))])
            data["observations"].append(ob)
            data["actions"].append(action)
            data["terminals"].append(done)
            data["qpos"].append(info["prev_qpos"])
            data["qvel"].append(info["prev_qvel"])
            ob = next_ob
    arrays = {k: np.asarray(v, dtype=bool if k == "terminals" else np.float32) for k, v in data.items()}
    return arrays, goals_reached


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="folder for the npz files (keep it outside the repository)")
    parser.add_argument("--maze", default="medium", choices=["medium", "large"])
    parser.add_argument("--episodes", type=int, default=1000, help="train episodes (the validation file gets 10%%)")
    parser.add_argument("--seed", type=int, default=0)
    cli = parser.parse_args()
    if cli.episodes < 10:
        print("error: --episodes must be >= 10 (the validation file holds episodes // 10 episodes)", file=sys.stderr)
        sys.exit(2)
    os.makedirs(cli.out_dir, exist_ok=True)
    name = f"pointmaze-{cli.maze}-navigate-v0"
    for suffix, episodes, seed in (("", cli.episodes, cli.seed), ("-val", cli.episodes // 10, cli.seed + 1)):
        data, goals = collect(cli.maze, episodes, seed)
        path = os.path.join(cli.out_dir, f"{name}{suffix}.npz")
        np.savez_compressed(path, **data)
        print(f"{path}: {episodes} episodes, {len(data['actions'])} transitions, {goals} goals reached")


if __name__ == "__main__":
    main()
