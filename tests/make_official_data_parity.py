"""Regenerate tests/data/official_data_parity.npz: what the official VGF code's data pipeline hands its agent.

    python tests/make_official_data_parity.py /path/to/vgf-checkout /path/to/D4RL-checkout \
        [--out tests/data/official_data_parity.npz]

Run it with the official code's environment (jax, flax, ogbench 1.1.0 with mujoco, h5py, tqdm). It writes small
dataset files itself, from fixed seeds, and feeds them to the official loader, envs/env_utils.make_env_and_datasets
of github.com/ryanxhr/vgf (commit 3ec8f9b), as main.py calls it (normalize_r=1 as in the released run scripts):
  D4RL: HDF5 files (observations, actions, rewards, terminals, timeouts, next_observations) with episodes of several
        lengths, cut by terminals, by time limits (timeouts) or left incomplete; actions at and beyond +-1. The official
        envs/d4rl_utils.get_dataset runs unchanged; the `d4rl` package it imports is replaced by the two functions of
        D4RL (github.com/Farama-Foundation/D4RL, used at 89141a6) that it uses, taken from the checkout's source:
        d4rl.qlearning_dataset and OfflineEnv.get_dataset (the file found under $D4RL_DATASET_DIR by its URL's name).
        `gym` (only its environment registry is read) and the environment construction are stubbed.
  OGBench: npz files in OGBench's raw format (observations, actions, terminals on each trajectory's last row, qpos,
        qvel), some states at the task's goal; the official path calls ogbench.make_env_and_datasets (singletask
        reward and mask relabelling) and then clips the actions.
What is stored, per case <c> (an env id):
  <c>/input/<key>     the arrays the file was written from (tests/test_offline_data_parity.py writes the same file)
  <c>/official/<key>  observations, actions, rewards, masks, next_observations of the official training dataset
  <c>/reward_scale    the official reward scale (1 where the official code does not scale)
"""
import argparse
import ast
import os
import sys
import tempfile
import types

import numpy as np

# (env id, file written): D4RL ids as main.py receives them after 'd4rl:'; OGBench ids after 'ogbench:'
D4RL_CASES = {"hopper-medium-v2": "hopper_medium-v2.hdf5",
              "walker2d-medium-replay-v2": "walker2d_medium_replay-v2.hdf5",  # an old file: no timeouts key
              "antmaze-umaze-v2": "Ant_maze_u-maze_noisy_multistart_False_multigoal_False_sparse_fixed.hdf5",
              "pen-cloned-v1": "pen-cloned-v1.hdf5"}
OGBENCH_CASES = {"antmaze-medium-navigate-singletask-task2-v0": "antmaze-medium-navigate-v0",
                 "cube-single-play-singletask-v0": "cube-single-play-v0"}


def d4rl_episodes(case):
    """(length, how it ends) per episode: 'terminal', 'timeout' or None (the file's trailing incomplete episode)."""
    if case in ("hopper-medium-v2", "walker2d-medium-replay-v2"):
        # > 1000 rows in one episode and time-limited episodes run together: several official 1000-row windows
        return [(1150, "timeout"), (640, "terminal"), (3, "terminal"), (1, "terminal"), (420, "timeout"),
                (260, "timeout"), (9, None)]
    if case == "antmaze-umaze-v2":
        return [(700, "timeout"), (350, "terminal"), (2, "terminal"), (300, "timeout"), (7, None)]
    return [(100, "timeout")] * 20 + [(60, "terminal"), (5, None)]  # pen: 100-step episodes


def quantised(rng, shape, scale):
    """Normal values on a 1/256 grid: exact in float32, and the npz compresses them."""
    return (np.round(rng.normal(size=shape) * scale * 256) / 256).astype(np.float32)


def make_actions(rng, n, dim):
    """Uniform actions in [-1.5, 1.5], with rows at exactly +-1, just inside +-1 and beyond it."""
    actions = (np.round(rng.uniform(-1.5, 1.5, (n, dim)) * 256) / 256).astype(np.float32)
    special = np.array([1.0, -1.0, 1 - 1e-6, -1 + 1e-6, 1 - 2e-5, 1.0001, -1.25, 3.0], np.float32)
    rows = rng.choice(n, size=len(special), replace=False)
    actions[rows, rng.integers(dim, size=len(special))] = special
    return actions


def d4rl_input(case, seed):
    rng = np.random.default_rng(seed)
    episodes = d4rl_episodes(case)
    n = sum(length for length, _ in episodes)
    obs_dim, act_dim = (3, 2) if case != "antmaze-umaze-v2" else (4, 2)
    observations = quantised(rng, (n, obs_dim), 1.0)
    terminals, timeouts = np.zeros(n, bool), np.zeros(n, bool)
    row = 0
    for length, end in episodes:
        row += length
        if end == "terminal":
            terminals[row - 1] = True
        elif end == "timeout":
            timeouts[row - 1] = True
    if case == "antmaze-umaze-v2":  # sparse 0/1 reward, terminal where the goal is reached
        rewards = (rng.uniform(size=n) < 0.02).astype(np.float32)
        rewards[terminals] = 1.0
    else:  # episode-dependent mean, so that the returns differ; full float32 precision, so that the returns
        # depend on the order of the summation
        ep = np.repeat(np.arange(len(episodes)), [length for length, _ in episodes])
        rewards = (rng.normal(size=n) + ep / 8).astype(np.float32)
    # next_observations: the true next state (the next row within an episode, a fresh state after its last row)
    next_observations = np.concatenate([observations[1:], quantised(rng, (1, obs_dim), 1.0)])
    ends = terminals | timeouts
    next_observations[ends] = quantised(rng, (int(ends.sum()), obs_dim), 1.0)
    data = dict(observations=observations, actions=make_actions(rng, n, act_dim), rewards=rewards,
                terminals=terminals, timeouts=timeouts, next_observations=next_observations)
    if case == "walker2d-medium-replay-v2":
        del data["timeouts"]
    return data


def write_d4rl_hdf5(path, data):
    import h5py

    with h5py.File(path, "w") as f:
        for key, value in data.items():
            f[key] = value


def ogbench_input(case, seed, goal):
    """A train and a val file: observations, actions, terminals (1 on each trajectory's last row), qpos, qvel; the
    qpos of some rows at `goal` (xy of the ant, or xyz of the cube) so that rewards and masks are not constant."""
    rng = np.random.default_rng(seed)
    obs_dim, act_dim, qpos_dim, qvel_dim, at = ((29, 8, 15, 14, slice(0, 2)) if "antmaze" in case else
                                                (28, 5, 21, 20, slice(14, 17)))
    out = {}
    for split, lengths in (("train", (30, 12, 5, 2)), ("val", (6, 3))):
        n = sum(lengths)
        terminals = np.zeros(n, bool)
        terminals[np.cumsum(lengths) - 1] = True
        qpos = rng.normal(size=(n, qpos_dim))
        hits = rng.choice(n, size=n // 4, replace=False)
        qpos[hits, at] = goal + rng.uniform(-0.01, 0.01, (len(hits), len(goal)))
        out.update({f"{split}/observations": quantised(rng, (n, obs_dim), 1.0),
                    f"{split}/actions": make_actions(rng, n, act_dim), f"{split}/terminals": terminals,
                    f"{split}/qpos": qpos, f"{split}/qvel": rng.normal(size=(n, qvel_dim))})
    return out


def write_ogbench_npz(folder, dataset_name, data):
    for split, suffix in (("train", ""), ("val", "-val")):
        np.savez(os.path.join(folder, f"{dataset_name}{suffix}.npz"),
                 **{k.split("/")[1]: v for k, v in data.items() if k.startswith(split + "/")})


def d4rl_functions(d4rl_checkout):
    """d4rl.qlearning_dataset and OfflineEnv (with get_dataset), from the D4RL checkout's source."""
    with open(os.path.join(d4rl_checkout, "d4rl", "__init__.py")) as f:
        tree = ast.parse(f.read())
    namespace = {"np": np}
    func, = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "qlearning_dataset"]
    exec(compile(ast.Module(body=[func], type_ignores=[]), "d4rl/__init__.py", "exec"), namespace)
    offline_env = types.ModuleType("d4rl.offline_env")  # imports gym (stubbed), h5py, tqdm
    with open(os.path.join(d4rl_checkout, "d4rl", "offline_env.py")) as f:
        exec(compile(f.read(), "d4rl/offline_env.py", "exec"), offline_env.__dict__)
    return namespace["qlearning_dataset"], offline_env


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkout", help="path of a checkout of github.com/ryanxhr/vgf (commit 3ec8f9b)")
    parser.add_argument("d4rl_checkout", help="path of a checkout of github.com/Farama-Foundation/D4RL")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "data", "official_data_parity.npz"))
    cli = parser.parse_args()
    if not os.path.isfile(os.path.join(cli.checkout, "envs", "env_utils.py")):
        sys.exit(f"error: {cli.checkout} holds no envs/env_utils.py; pass the root of a checkout of ryanxhr/vgf")
    if not os.path.isfile(os.path.join(cli.d4rl_checkout, "d4rl", "offline_env.py")):
        sys.exit(f"error: {cli.d4rl_checkout} holds no d4rl/offline_env.py; pass the root of a checkout of D4RL")
    os.environ.setdefault("MUJOCO_GL", "egl")  # ogbench 1.1.0's maze environments render once when built
    work = tempfile.mkdtemp()
    os.environ["D4RL_DATASET_DIR"] = os.path.join(work, "d4rl")  # read by d4rl/offline_env.py when executed
    os.environ["HOME"] = work  # ogbench.make_env_and_datasets(name) reads ~/.ogbench/data, as main.py calls it
    os.makedirs(os.path.join(work, ".ogbench", "data"))

    # stubs: `gym` (the registry of D4RL ids; Env, Wrapper and utils.colorize for offline_env.py) and `d4rl`
    gym = types.ModuleType("gym")
    gym.envs = types.SimpleNamespace(registry=types.SimpleNamespace(
        all=lambda: [types.SimpleNamespace(id=name) for name in D4RL_CASES]))
    gym.Env = type("Env", (), {})
    gym.Wrapper = type("Wrapper", (gym.Env,), {})
    gym.utils = types.ModuleType("gym.utils")
    gym.utils.colorize = lambda text, *a, **k: text
    sys.modules.update({"gym": gym, "gym.utils": gym.utils})
    qlearning_dataset, offline_env = d4rl_functions(cli.d4rl_checkout)
    sys.modules["d4rl"] = types.SimpleNamespace(qlearning_dataset=qlearning_dataset)
    sys.path.insert(0, os.path.abspath(cli.checkout))
    import gymnasium
    import ogbench
    from envs import d4rl_utils, env_utils

    class D4RLEnv(offline_env.OfflineEnv):
        """What qlearning_dataset and get_dataset use of a D4RL environment: the dataset URL (its file is found under
        $D4RL_DATASET_DIR), the spaces, the time limit (1000 for locomotion and AntMaze; 100 for pen)."""

        def __init__(self, name, data):
            super().__init__(dataset_url=f"http://rail.eecs.berkeley.edu/datasets/offline_rl/x/{D4RL_CASES[name]}")
            self.observation_space = gymnasium.spaces.Box(-np.inf, np.inf, data["observations"].shape[1:])
            self.action_space = gymnasium.spaces.Box(-1.0, 1.0, data["actions"].shape[1:])
            self._max_episode_steps = 100 if name.startswith("pen") else 1000

        def reset(self, *args, **kwargs):
            return np.zeros(self.observation_space.shape), {}

    out = {}

    def record(case, data):
        """The official loader's arrays for `case` (its file already written from `data`), stored with the input."""
        _, _, train, _, reward_scale = env_utils.make_env_and_datasets(case, normalize_r=1)
        out.update({f"{case}/input/{k}": v for k, v in data.items()})
        out[f"{case}/reward_scale"] = np.float64(reward_scale)
        for key in ("observations", "actions", "rewards", "masks", "next_observations"):
            out[f"{case}/official/{key}"] = np.asarray(train[key])
        return train

    for seed, (case, file_name) in enumerate(D4RL_CASES.items()):
        data = d4rl_input(case, seed)
        write_d4rl_hdf5(os.path.join(os.environ["D4RL_DATASET_DIR"], file_name), data)
        d4rl_utils.make_env = lambda name, data=data: D4RLEnv(name, data)
        train = record(case, data)
        print(f"{case}: {len(data['rewards'])} rows -> {len(train['rewards'])} transitions, reward scale "
              f"{out[f'{case}/reward_scale']:.6f}, masks 0 at {int((train['masks'] == 0).sum())}")
    for seed, (case, dataset_name) in enumerate(OGBENCH_CASES.items(), start=len(D4RL_CASES)):
        env = ogbench.make_env_and_datasets(case, env_only=True)
        env.reset()
        u = env.unwrapped
        goal = np.asarray(u.cur_goal_xy if "maze" in case else u._data.mocap_pos[0]).copy()
        data = ogbench_input(case, seed, goal)
        write_ogbench_npz(os.path.join(work, ".ogbench", "data"), dataset_name, data)
        train = record(case, data)
        print(f"{case}: {len(train['rewards'])} transitions, rewards {np.unique(train['rewards'])}, "
              f"masks 0 at {int((train['masks'] == 0).sum())}")

    os.makedirs(os.path.dirname(os.path.abspath(cli.out)), exist_ok=True)
    np.savez_compressed(cli.out, **out)
    print(f"wrote {cli.out} ({os.path.getsize(cli.out) / 1024:.0f} KiB, {len(out)} arrays)")


if __name__ == "__main__":
    main()
