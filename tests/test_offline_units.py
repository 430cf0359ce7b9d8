"""Unit tests of vgf_offline.py's pieces: SVGD transport, reference flow, TD targets, data processing, determinism."""
import math
from dataclasses import asdict

import numpy as np
import pytest
import torch

import vgf_offline as vgf


def concave_q(target):
    """Q(s, a) = -||a - target||^2, maximised at `target` for every state."""
    return lambda obs, act: -(act - target).pow(2).sum(-1)


def test_transport_zero_steps_is_identity():
    particles = torch.rand(3, 5, 2) * 2 - 1
    out = vgf.transport(concave_q(0.5), torch.zeros(3, 4), particles, steps=0, step_size=0.1, alpha=1.0)
    assert torch.equal(out, particles)


def test_particles_climb_a_concave_q():
    torch.manual_seed(0)
    obs, particles = torch.zeros(4, 3), torch.rand(4, 8, 2) * 2 - 1
    q = concave_q(torch.tensor([0.5, -0.3]))
    out = vgf.transport(q, obs, particles, steps=30, step_size=0.05, alpha=0.1)
    before, after = q(None, particles).mean(), q(None, out).mean()
    assert after > before + 0.1
    assert (out.mean(1) - torch.tensor([0.5, -0.3])).norm(dim=-1).max() < 0.15


def test_repulsion_spreads_particles_when_q_is_flat():
    torch.manual_seed(0)
    particles = 0.01 * torch.randn(2, 6, 3)
    out = vgf.transport(lambda o, a: 0.0 * a.sum(-1), torch.zeros(2, 1), particles, steps=10, step_size=0.05, alpha=1.0)
    spread = lambda x: torch.cdist(x, x).mean()
    assert spread(out) > 5 * spread(particles)


def test_repulsion_keeps_particles_apart_at_a_maximum():
    torch.manual_seed(0)
    particles = torch.rand(1, 8, 2) * 2 - 1
    q = concave_q(torch.zeros(2))
    out = vgf.transport(q, torch.zeros(1, 1), particles, steps=200, step_size=0.02, alpha=1.0)
    dists = torch.cdist(out[0], out[0]) + torch.eye(8) * 10
    assert dists.min() > 0.05  # gradient ascent alone would collapse them onto the maximum


def test_transport_clips_to_action_bounds():
    particles = torch.rand(2, 4, 3) * 2 - 1
    out = vgf.transport(lambda o, a: 10 * a.sum(-1), torch.zeros(2, 1), particles, steps=40, step_size=0.2, alpha=0.1)
    assert out.max() <= 1.0 and out.min() >= -1.0
    assert torch.allclose(out, torch.ones_like(out), atol=0.05)


def test_first_transport_step_matches_the_adam_update():
    """A freshly initialised Adam moves every coordinate by step_size * sign(phi) on its first step."""
    torch.manual_seed(0)
    particles, step = torch.rand(2, 5, 3) * 1.6 - 0.8, 0.01
    q = concave_q(torch.tensor([0.2, 0.1, -0.4]))
    out = vgf.transport(q, torch.zeros(2, 1), particles, steps=1, step_size=step, alpha=0.5)
    score = -2 * (particles - torch.tensor([0.2, 0.1, -0.4]))
    phi = vgf.svgd_direction(particles, score, 0.5)
    expected = particles + step * phi / (phi.abs() + 1e-8)
    assert torch.allclose(out, expected, atol=1e-6)


def reference_svgd(x, score, alpha):
    """The SVGD equation written as loops: phi(x_i) = 1/N sum_j [k(x_j,x_i) score_j / alpha + grad_{x_j} k(x_j,x_i)]."""
    b, n, _ = x.shape
    phi = torch.zeros_like(x)
    for s in range(b):
        d2 = torch.stack([torch.stack([((x[s, i] - x[s, j]) ** 2).sum() for j in range(n)]) for i in range(n)])
        h = float(np.median(d2.numpy())) / (2 * math.log(n + 1))
        gamma = 1.0 / (1e-6 + 2 * max(h, 1e-12))
        for i in range(n):
            for j in range(n):
                k = math.exp(-gamma * float(d2[j, i]))
                grad_k = -2 * gamma * (x[s, j] - x[s, i]) * k  # d k(x_j, x_i) / d x_j
                phi[s, i] += (k * score[s, j] / alpha + grad_k) / n
    return phi


def test_fixed_bandwidth_svgd_direction_matches_the_equation():
    torch.manual_seed(1)
    x, score = torch.rand(3, 6, 2, dtype=torch.float64), torch.randn(3, 6, 2, dtype=torch.float64)
    fixed = vgf.svgd_direction(x, score, 0.3, fixed_bandwidth=True)
    assert torch.allclose(fixed, reference_svgd(x, score, 0.3), atol=1e-10)


def autodiff_repulsion(x, detach_bandwidth: bool):
    """-d/dx_i sum_jk k(x_j, stop(x_k)) by autodiff, the bandwidth from the stably sorted median (jnp.median)."""
    xr = x.clone().requires_grad_(True)
    d2 = (xr.unsqueeze(2) - x.unsqueeze(1)).pow(2).sum(-1)
    flat = (d2.detach() if detach_bandwidth else d2).flatten(1).sort(dim=1, stable=True).values
    m, n = flat.shape[1], x.shape[1]
    h = (0.5 * (flat[:, (m - 1) // 2] + flat[:, m // 2]) / (2 * math.log(n + 1))).clamp_min(1e-12)
    return -torch.autograd.grad(torch.exp(-d2 / (1e-6 + 2 * h).view(-1, 1, 1)).sum(), xr)[0]


@pytest.mark.parametrize("n", [5, 6])  # N^2 odd: one middle value; even: the mean of two
def test_repulsion_equals_autodiff_through_and_without_the_bandwidth(n):
    torch.manual_seed(2)
    x, score = torch.rand(3, n, 2, dtype=torch.float64), torch.zeros(3, n, 2, dtype=torch.float64)
    fixed = vgf.svgd_direction(x, score, 1.0, fixed_bandwidth=True)
    through = vgf.svgd_direction(x, score, 1.0)
    assert not torch.allclose(fixed, through)
    assert torch.allclose(fixed, autodiff_repulsion(x, detach_bandwidth=True) / n, atol=1e-12)
    assert torch.allclose(through, autodiff_repulsion(x, detach_bandwidth=False) / n, atol=1e-12)


def test_median_is_the_mean_of_the_two_middle_values():
    d2 = torch.tensor([[[0.0, 1.0], [4.0, 0.0]]])  # N=2: values 0, 0, 1, 4 -> median 0.5
    gamma, _ = vgf.median_bandwidth(d2)
    assert torch.allclose(gamma, torch.tensor(1.0 / (1e-6 + 2 * 0.5 / (2 * math.log(3)))))


def test_behaviour_flow_learns_a_bimodal_action_distribution():
    torch.manual_seed(0)
    flow = vgf.BehaviourFlow(obs_dim=1, act_dim=1, hidden_dims=[64, 64])
    opt = torch.optim.Adam(flow.parameters(), lr=3e-3)
    for _ in range(1500):
        actions = torch.where(torch.rand(256, 1) < 0.5, -0.6, 0.6) + 0.05 * torch.randn(256, 1)
        loss = vgf.flow_matching_loss(flow, {"observations": torch.zeros(256, 1), "actions": actions})
        opt.zero_grad()
        loss.backward()
        opt.step()
    samples = vgf.sample_reference(flow, torch.zeros(2000, 1), num_particles=1, flow_steps=10)[:, 0, 0]
    left, right, middle = (samples < -0.3).float().mean(), (samples > 0.3).float().mean(), (samples.abs() < 0.2).float().mean()
    assert 0.35 < left < 0.65 and 0.35 < right < 0.65  # both modes kept
    assert middle < 0.1  # a unimodal fit would put most mass between the modes


def test_td_target_respects_masks():
    torch.manual_seed(0)
    args = vgf.resolve_suite_defaults(vgf.Args(hidden_dims=[16], num_particles=4, bc_flow_steps=2))
    agent = vgf.Agent(3, 2, args)
    batch = {"observations": torch.randn(5, 3), "actions": torch.rand(5, 2) * 2 - 1, "rewards": torch.arange(5.0),
             "next_observations": torch.randn(5, 3), "masks": torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0])}
    with torch.no_grad():  # a large critic bias makes bootstrapped targets unmistakable
        agent.target_critic.linears[-1].bias.fill_(100.0)
    target = vgf.td_target(agent, batch)
    done = batch["masks"] == 0
    assert torch.equal(target[done], batch["rewards"][done])
    assert (target[~done] - batch["rewards"][~done] > 0.99 * 100 * 0.9).all()


def test_critic_ensemble_members_are_independent():
    torch.manual_seed(0)
    critic = vgf.CriticEnsemble(3, 2, [8, 8])
    obs, act = torch.randn(4, 3), torch.randn(4, 2)
    qs = critic(obs, act)
    assert qs.shape == (2, 4) and not torch.allclose(qs[0], qs[1])
    qs[0].sum().backward()
    assert critic.linears[0].weight.grad[1].abs().sum() == 0 and critic.linears[0].weight.grad[0].abs().sum() > 0


def make_agent_and_data(seed):
    torch.manual_seed(seed)
    args = vgf.resolve_suite_defaults(vgf.Args(hidden_dims=[16, 16], num_particles=4, bc_flow_steps=2, batch_size=8,
                                               compile=False))
    agent = vgf.Agent(3, 2, args)
    gen = torch.Generator().manual_seed(123)
    data = {"observations": torch.randn(50, 3, generator=gen), "actions": torch.rand(50, 2, generator=gen) * 2 - 1,
            "rewards": torch.randn(50, generator=gen), "next_observations": torch.randn(50, 3, generator=gen),
            "masks": torch.ones(50)}
    return agent, data


def test_same_seed_gives_identical_losses_and_another_seed_does_not():
    def losses(seed):
        agent, data = make_agent_and_data(seed)
        out = []
        for _ in range(5):
            idx = torch.randint(0, 50, (8,))
            out.append(agent.update({k: v[idx] for k, v in data.items()})["losses/critic_loss"].item())
        return out

    assert losses(0) == losses(0)
    assert losses(0) != losses(1)


def test_target_critic_follows_the_pre_update_critic():
    agent, data = make_agent_and_data(0)
    before = [p.clone() for p in agent.critic.parameters()]
    target_before = [p.clone() for p in agent.target_critic.parameters()]
    agent.update({k: v[:8] for k, v in data.items()})
    for p_old, t_old, t_new in zip(before, target_before, agent.target_critic.parameters()):
        assert torch.allclose(t_new, t_old + 0.005 * (p_old - t_old), atol=1e-7)


def test_qlearning_transitions_follow_d4rl():
    obs = np.arange(12, dtype=np.float32).reshape(6, 2)
    data = {"observations": obs, "actions": np.zeros((6, 1), np.float32), "rewards": np.arange(6, dtype=np.float32),
            "terminals": np.array([0, 1, 0, 0, 0, 0], bool), "timeouts": np.array([0, 0, 0, 1, 0, 0], bool)}
    out = vgf.qlearning_transitions(data)
    # row 3 is a time-limit cut (dropped); the last row has no successor (dropped)
    assert out["rewards"].tolist() == [0, 1, 2, 4]
    assert np.array_equal(out["next_observations"], obs[[1, 2, 3, 5]])
    assert out["terminals"].tolist() == [0, 1, 0, 0]


def test_episode_return_range_uses_terminals_and_timeouts():
    rewards = np.array([1, 2, 3, 4, 5, 6], np.float32)
    ends = np.array([0, 1, 0, 0, 1, 0], bool)  # episodes [1,2], [3,4,5]; the trailing 6 is incomplete
    assert vgf.episode_return_range(rewards, ends) == (3.0, 12.0, 2)


def test_unknown_env_id_lists_the_supported_ones():
    with pytest.raises(vgf.VGFError, match=r"(?s)unknown --env-id 'halfcheetah-mediun-v2'.*medium-replay.*puzzle-4x4-play"):
        vgf.parse_env_id("halfcheetah-mediun-v2")
    with pytest.raises(vgf.VGFError, match=r"(?s)singletask-task\{1..5\}-v0.*cube-double-play"):
        vgf.parse_env_id("cube-double-play-v0")


def test_suite_defaults_fill_only_unset_fields():
    args = vgf.resolve_suite_defaults(vgf.Args(env_id="antmaze-large-navigate-singletask-v0", alpha=0.7))
    assert (args.alpha, args.discount, args.target_q_agg, args.total_steps) == (0.7, 0.995, "min", 2_000_000)
    args = vgf.resolve_suite_defaults(vgf.Args(env_id="puzzle-4x4-play-singletask-task4-v0"))
    assert (args.discount, args.target_q_agg, args.train_transport_steps, args.eval_every) == (0.99, "mean", 3, 100_000)
    args = vgf.resolve_suite_defaults(vgf.Args(env_id="hopper-medium-v2"))
    assert (args.discount, args.target_q_agg, args.train_transport_steps, args.transport_step_size) == (0.99, "min", 5, 0.1)


def test_vgf_learns_a_bandit_and_more_transport_buys_reward():
    """End to end in-process on a contextual bandit (masks 0, so Q = r): r = -||a - a*(s)||^2, dataset actions uniform.
    Best-of-N (L = 0) from the learned reference beats the data; each further transport step improves on it."""
    torch.manual_seed(0)
    args = vgf.resolve_suite_defaults(vgf.Args(hidden_dims=[64, 64], num_particles=8, bc_flow_steps=5, batch_size=128,
                                               train_transport_steps=2, compile=False, alpha=0.1,
                                               transport_step_size=0.1))
    agent = vgf.Agent(2, 2, args)
    best = lambda obs: 0.6 * torch.tanh(2 * obs).flip(-1)
    obs, actions = torch.rand(5000, 2) * 2 - 1, torch.rand(5000, 2) * 2 - 1
    rewards = -(actions - best(obs)).pow(2).sum(-1)
    data = dict(observations=obs, actions=actions, rewards=rewards, next_observations=obs, masks=torch.zeros(5000))
    for _ in range(800):
        idx = torch.randint(0, 5000, (128,))
        agent.update({k: v[idx] for k, v in data.items()})
    test_obs = torch.rand(512, 2) * 2 - 1
    reward = {L: -(vgf.act(agent, test_obs, L, torch.Generator().manual_seed(0))
                   - best(test_obs)).pow(2).sum(-1).mean().item() for L in (0, 1, 3)}
    assert rewards.mean() < -0.9 and reward[0] > -0.25  # best-of-N from mu already far above the data
    assert reward[1] > reward[0] + 0.01 and reward[3] > reward[1] + 0.01  # test-time scaling


def test_checkpoint_args_from_an_older_version_load():
    """A checkpoint written before --kernel-grad-through-bandwidth became --fixed-bandwidth keeps its meaning; options
    this version does not know are ignored, not a traceback."""
    saved = asdict(vgf.Args(env_id="hopper-medium-v2"))
    saved.pop("fixed_bandwidth")
    for through, fixed in ((True, False), (False, True)):
        old = {**saved, "kernel_grad_through_bandwidth": through, "an_option_from_the_future": 1}
        merged = vgf.merge_checkpoint_args(vgf.Args(), old, "old.pt")
        assert merged.fixed_bandwidth is fixed and merged.env_id == "hopper-medium-v2"


def test_evaluation_leaves_training_untouched():
    """Evaluation draws its noise from its own generator: the global random states (batch sampling, the update's
    noise), the networks and the optimisers are what they were, so evaluating does not change training."""
    torch.manual_seed(0)
    args = vgf.resolve_suite_defaults(vgf.Args(hidden_dims=[16], num_particles=4, bc_flow_steps=2, compile=False,
                                               eval_transport_steps=[0, 2], eval_episodes=1))
    env = vgf.make_eval_env(args.env_id)
    agent = vgf.Agent(env.observation_space.shape[0], env.action_space.shape[0], args)
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), [p.clone() for p in agent.parameters()])
    rows = vgf.evaluate_all(agent, [env], args, step=1, device="cpu")
    assert [r["L_test"] for r in rows] == [0, 2]
    assert torch.equal(torch.get_rng_state(), before[0]) and np.array_equal(np.random.get_state()[1], before[1])
    assert all(torch.equal(p, q) for p, q in zip(agent.parameters(), before[2]))
