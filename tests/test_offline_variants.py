"""Offline-to-online fine-tuning, amortised VGF and the plots of vgf_offline.py."""
import json

import numpy as np
import pytest
import torch

import vgf_offline as vgf
from conftest import TINY, run_script


def test_offline_to_online_appends_transitions_and_logs_episodes(ogbench_dir, tmp_path):
    run_script("--env-id", "cube-single-play-singletask-v0", "--dataset-dir", ogbench_dir, "--output-dir",
               str(tmp_path), "--run-name", "o2o", *TINY, "--total-steps", "20", "--online-steps", "250",
               "--online-warmup", "50", "--eval-every", "0", "--eval-episodes", "1", "--eval-transport-steps", "0",
               "--save-model")
    state = torch.load(tmp_path / "o2o" / "checkpoint.pt", weights_only=False)
    online, offline_rows = state["replay_buffer"]["data"], 4 * 39  # the fixture: 4 episodes of 40 steps
    assert state["step"] == 270 and len(online["rewards"]) == 250 and state["replay_buffer"]["added"] == 250
    assert state["replay_buffer"]["rows"].tolist() == list(range(offline_rows, offline_rows + 250))  # after the data
    assert set(online["rewards"].tolist()) <= {-1.0, 0.0}  # OGBench singletask rewards, unscaled
    assert set(online["masks"].tolist()) <= {0.0, 1.0}
    assert (online["actions"].abs() <= 1).all()
    # consecutive online transitions chain s' -> s within an episode (cube-single episodes last 200 steps)
    assert torch.equal(online["next_observations"][:199], online["observations"][1:200])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "o2o")).Reload()
    returns = events.Scalars("online/episode_return")
    assert len(returns) >= 1 and returns[0].step == 200  # logged against environment steps
    assert {"online/success", "online/episode_score", "losses/critic_loss"} <= set(events.Tags()["scalars"])


def official_replay_buffer(offline_rows: int, capacity: int, added: int):
    """The official ReplayBuffer's write positions and size (utils/datasets.py: add_transition), replayed."""
    pointer = size = offline_rows
    rows = []
    for _ in range(added):
        rows.append(pointer)
        pointer = (pointer + 1) % capacity
        size = max(pointer, size)
    return rows, pointer, size


@pytest.mark.parametrize("buffer_size,online_steps", [(12, 9), (12, 20), (2_000_000, 9)])
def test_online_transitions_fill_and_overwrite_the_buffer_as_the_official_one(buffer_size, online_steps):
    """max(buffer_size, N + 1) rows: online transitions go after the N offline ones, then wrap around to row 0 and
    overwrite the oldest rows (offline ones first); batches come from the rows the official size rule admits. The
    buffer holds no more rows than the run can fill."""
    offline = 10
    data = {"observations": np.arange(offline, dtype=np.float32)[:, None], "actions": np.zeros((offline, 1)),
            "rewards": np.full(offline, -1.0), "next_observations": np.zeros((offline, 1)), "masks": np.ones(offline)}
    buffer = vgf.ReplayBuffer(data, online_steps, buffer_size, "cpu")
    capacity = max(buffer_size, offline + 1)
    assert buffer.capacity == min(capacity, offline + online_steps + 1)
    for i in range(online_steps):
        buffer.add(dict(observations=[100.0 + i], actions=[0.0], rewards=float(i), next_observations=[0.0],
                        masks=1.0))
    rows, pointer, size = official_replay_buffer(offline, capacity, online_steps)
    assert (buffer.pointer % capacity, buffer.size) == (pointer, size)
    newest = {row: i for i, row in enumerate(rows)}  # a row written twice holds its last transition
    for row in range(buffer.capacity):
        expected = 100.0 + newest[row] if row in newest else float(row) if row < offline else 0.0  # 0: not yet written
        assert buffer.data["observations"][row, 0] == expected, row
    torch.manual_seed(0)
    drawn = buffer.sample(4000)["observations"][:, 0]
    allowed = {100.0 + newest[row] if row in newest else float(row) for row in range(size)}
    assert set(drawn.tolist()) == allowed  # every admitted row, and no other, is drawn
    restored = vgf.ReplayBuffer(data, online_steps, buffer_size, "cpu")  # checkpoint -> resume
    restored.load_state_dict(buffer.state_dict())
    assert all(torch.equal(restored.data[k], buffer.data[k]) for k in data)
    assert (restored.pointer, restored.size, restored.added) == (buffer.pointer, buffer.size, buffer.added)


def test_amortised_variant_end_to_end(d4rl_dir, tmp_path):
    run_script("--env-id", "halfcheetah-medium-v2", "--dataset-dir", d4rl_dir, "--output-dir", str(tmp_path),
               "--run-name", "amortised", "--amortised", *TINY, "--total-steps", "20", "--eval-every", "0",
               "--eval-episodes", "1", "--save-model")
    rows = [json.loads(line) for line in open(tmp_path / "amortised" / "eval.jsonl")]
    assert [r["L_test"] for r in rows] == [0, 1, 2, 3] and all(np.isfinite(r["score_mean"]) for r in rows)
    state = torch.load(tmp_path / "amortised" / "checkpoint.pt", weights_only=False)
    assert len(state["nets"]) == 3 and state["args"]["amortised"]
    score_net = state["nets"][2]
    assert score_net["linears.2.weight"].shape == (1, 32, 6)  # f(s, a) outputs an action-sized gradient


def test_amortised_transport_follows_the_score_and_clips_its_norm():
    target = torch.tensor([0.4, -0.2])
    exact_score = lambda obs, act: (-2 * (act - target))[None]  # f = grad_a of -(a - target)^2
    particles = torch.rand(3, 5, 2) * 2 - 1
    out = vgf.amortised_transport(exact_score, torch.zeros(3, 1), particles, 60, 0.05, per_state_clip=True)
    assert (out - target).norm(dim=-1).max() < 0.1
    # clipping the update's norm to 1 makes a velocity whose size jumps from 1 to 100 move like a constant one
    def jumping_velocity():
        calls = []

        def velocity(x):
            calls.append(1)
            return (1.0 if len(calls) == 1 else 100.0) * torch.ones_like(x)
        return velocity

    start = torch.zeros(3, 5, 2)
    clipped = vgf.adam_flow(start, jumping_velocity(), 2, 0.01, max_norm=1.0, norm_dims=(1, 2))
    unclipped = vgf.adam_flow(start, jumping_velocity(), 2, 0.01)
    assert torch.allclose(clipped, torch.full_like(start, 0.02), atol=1e-6)
    assert torch.allclose(unclipped, torch.full_like(start, 0.01 + 0.01 * 0.7508), atol=1e-5)


def test_score_network_learns_the_critic_gradient():
    torch.manual_seed(0)
    critic = vgf.CriticEnsemble(2, 2, [32, 32])
    score_net = vgf.CriticEnsemble(2, 2, [64, 64], members=1, out_dim=2)
    opt = torch.optim.Adam(score_net.parameters(), lr=1e-3)
    batch = {"observations": torch.randn(256, 2), "actions": torch.rand(256, 2) * 2 - 1}
    first = vgf.score_matching_loss(score_net, critic, batch).item()
    for _ in range(300):
        loss = vgf.score_matching_loss(score_net, critic, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * first


def test_plots_are_written_from_eval_jsonl(tmp_path):
    rows = [dict(step=s, L_test=L, metric="d4rl_normalized_score", score_mean=10.0 * L + s / 100, score_std=1.0,
                 episodes=5) for s in (100, 200) for L in (0, 1, 2, 3)]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    vgf.write_plots(str(tmp_path))
    for name in ("eval_curve.png", "test_time_scaling.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
