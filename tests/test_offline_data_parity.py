"""The data pipeline equals the official loader (github.com/ryanxhr/vgf at 3ec8f9b) on golden arrays it produced.

tests/data/official_data_parity.npz was written by tests/make_official_data_parity.py, which wrote small D4RL HDF5 and
OGBench npz files (episodes of several lengths, terminals, timeouts, an old file without timeouts, actions at and
beyond +-1, states at the goal) and ran the official envs/env_utils.make_env_and_datasets on them (D4RL: its
get_dataset with D4RL's own qlearning_dataset; OGBench: ogbench's loader with the singletask relabelling), keeping
the arrays the official code hands its agent. Here the same files are written again from the stored arrays and read
by load_dataset of vgf_offline.py: every array must be equal, bit for bit (measured: identical).
Regenerate the data with: python tests/make_official_data_parity.py <vgf-checkout> <D4RL-checkout>.
"""
import os

import numpy as np
import pytest

import vgf_offline as vgf
from make_official_data_parity import D4RL_CASES, OGBENCH_CASES, write_d4rl_hdf5, write_ogbench_npz

DATA = os.path.join(os.path.dirname(__file__), "data", "official_data_parity.npz")
KEYS = ("observations", "actions", "rewards", "masks", "next_observations")


@pytest.fixture(scope="module")
def gold():
    with np.load(DATA) as f:
        return {k: f[k] for k in f.files}


def inputs(gold, case):
    prefix = f"{case}/input/"
    return {k[len(prefix):]: v for k, v in gold.items() if k.startswith(prefix)}


def compare(gold, case, data, reward_scale):
    errors = {}
    for key in KEYS:
        theirs = gold[f"{case}/official/{key}"]
        assert data[key].shape == theirs.shape and data[key].dtype == theirs.dtype == np.float32, \
            (key, data[key].shape, data[key].dtype, theirs.shape, theirs.dtype)
        errors[key] = float(np.abs(data[key].astype(np.float64) - theirs).max())
    errors["reward_scale"] = abs(reward_scale - float(gold[f"{case}/reward_scale"]))
    print(case, errors)
    assert all(e == 0.0 for e in errors.values()), errors


@pytest.mark.parametrize("case", list(D4RL_CASES))
def test_d4rl_dataset_equals_the_official_get_dataset(gold, case, tmp_path):
    """hopper: timeouts, terminals, an episode longer than the official 1000-row reward-scale window, a trailing
    incomplete episode; walker2d: the same rows in an old file without timeouts (episodes cut every 1000 steps);
    antmaze: 0/1 rewards shifted to -1/0; pen (Adroit): 100-step episodes behind the reward scale."""
    data = inputs(gold, case)
    write_d4rl_hdf5(str(tmp_path / D4RL_CASES[case]), data)
    ours, reward_scale, reward_shift = vgf.load_dataset(vgf.Args(env_id=case, dataset_dir=str(tmp_path)))
    compare(gold, case, ours, reward_scale)
    assert reward_shift == (-1.0 if case.startswith("antmaze") else 0.0)
    # the golden data exercises what it claims to: bootstrapping stops at terminals, actions were clipped
    assert (gold[f"{case}/official/masks"] == 0).sum() == data["terminals"][:-1].sum()
    assert np.abs(data["actions"]).max() > 1 and np.abs(ours["actions"]).max() == np.float32(1 - 1e-5)


@pytest.mark.parametrize("case", list(OGBENCH_CASES))
def test_ogbench_dataset_equals_the_official_loader(gold, case, tmp_path):
    """A singletask npz: transitions within trajectories, rewards and masks relabelled from qpos, actions clipped."""
    write_ogbench_npz(str(tmp_path), OGBENCH_CASES[case], inputs(gold, case))
    ours, reward_scale, reward_shift = vgf.load_dataset(vgf.Args(env_id=case, dataset_dir=str(tmp_path)))
    compare(gold, case, ours, reward_scale)
    assert reward_shift == 0.0
    masks = gold[f"{case}/official/masks"]
    assert 0 < (masks == 0).sum() < len(masks)  # some states at the goal: success reward, no bootstrap
