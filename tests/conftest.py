"""Small datasets in the real D4RL (HDF5) and OGBench (npz) formats, written from real environment rollouts."""
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
warnings.filterwarnings("ignore", category=DeprecationWarning)
torch.set_num_threads(1)  # the tests' networks are tiny: extra threads only add synchronisation overhead

# Settings small enough for a 2-core CPU, shared by the end-to-end tests.
TINY = ["--hidden-dims", "32", "32", "--batch-size", "32", "--num-particles", "4", "--bc-flow-steps", "3",
        "--train-transport-steps", "2", "--log-every", "10", "--no-cuda", "--no-compile"]


def rollouts(env, episodes: int, length: int, seed: int):
    """Noisy sinusoidal actions (more structure than uniform noise) from the real environment."""
    rng = np.random.default_rng(seed)
    out = []
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed + ep)
        phase = rng.uniform(0, 2 * np.pi, env.action_space.shape)
        steps = []
        for t in range(length):
            action = np.clip(0.6 * np.sin(0.3 * t + phase) + 0.3 * rng.standard_normal(env.action_space.shape), -1, 1)
            next_obs, reward, terminated, truncated, _ = env.step(action.astype(np.float32))
            buttons = getattr(env.unwrapped, "_cur_button_states", None)  # OGBench puzzle: the lights' states
            steps.append((obs, action, reward, terminated, env.unwrapped.data.qpos.copy(),
                          env.unwrapped.data.qvel.copy(), None if buttons is None else buttons.copy()))
            obs = next_obs
            if terminated:
                break
        out.append(steps)
    return out


def write_d4rl_hdf5(path: str, env_id: str = "HalfCheetah-v4", episodes: int = 4, length: int = 60, seed: int = 0,
                    **env_kwargs):
    """A D4RL-format HDF5: observations, actions, rewards, terminals, timeouts, infos/qpos, infos/qvel."""
    import gymnasium as gym
    import h5py

    env = gym.make(env_id, **env_kwargs)
    obs, act, rew, term, tout, qpos, qvel = [], [], [], [], [], [], []
    for steps in rollouts(env, episodes, length, seed):
        for t, (o, a, r, d, qp, qv, _) in enumerate(steps):
            obs.append(o), act.append(a), rew.append(r), term.append(d), qpos.append(qp), qvel.append(qv)
            tout.append(t == len(steps) - 1 and not d)
    with h5py.File(path, "w") as f:
        f["observations"] = np.array(obs, np.float32)
        f["actions"] = np.array(act, np.float32)
        f["rewards"] = np.array(rew, np.float32)
        f["terminals"] = np.array(term, bool)
        f["timeouts"] = np.array(tout, bool)
        f["infos/qpos"] = np.array(qpos, np.float64)
        f["infos/qvel"] = np.array(qvel, np.float64)
    return path


def write_ogbench_npz(folder: str, dataset_name: str = "cube-single-play-v0", episodes: int = 4, length: int = 40,
                      seed: int = 0):
    """OGBench's raw format: observations, actions, terminals (1 on each trajectory's last step), qpos, qvel."""
    import ogbench

    env = ogbench.make_env_and_datasets(dataset_name, env_only=True)  # the goal-conditioned env
    for suffix, s in (("", seed), ("-val", seed + 100)):
        obs, act, term, qpos, qvel, buttons = [], [], [], [], [], []
        for steps in rollouts(env, episodes, length, s):
            for t, (o, a, _, _, qp, qv, b) in enumerate(steps):
                obs.append(o), act.append(a), term.append(t == len(steps) - 1), qpos.append(qp), qvel.append(qv)
                buttons.append(b)
        extra = {} if buttons[0] is None else dict(button_states=np.array(buttons))
        np.savez(os.path.join(folder, f"{dataset_name}{suffix}.npz"), observations=np.array(obs, np.float32),
                 actions=np.array(act, np.float32), terminals=np.array(term, bool), qpos=np.array(qpos),
                 qvel=np.array(qvel), **extra)
    return folder


def bash_block(doc: str, heading: str) -> str:
    """The first ```bash block after `heading` in the repository file `doc` (README.md, docs/llm.md)."""
    section = open(os.path.join(ROOT, doc), encoding="utf-8").read()
    section = section[section.index(heading):]
    start = section.index("```bash\n") + len("```bash\n")
    return section[start: section.index("\n```", start)]


@pytest.fixture(scope="session")
def d4rl_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("d4rl")
    write_d4rl_hdf5(str(folder / "halfcheetah_medium-v2.hdf5"), length=600)  # 2 official 1000-row windows
    return str(folder)


@pytest.fixture(scope="session")
def ogbench_dir(tmp_path_factory):
    return write_ogbench_npz(str(tmp_path_factory.mktemp("ogbench")))


def run_script(*args, env=None, check=True, timeout=600):
    """Run vgf_offline.py through its real entry point."""
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "vgf_offline.py"), *args], capture_output=True,
                          text=True, env=full_env, timeout=timeout, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
    return proc
