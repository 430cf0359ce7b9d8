# Value Gradient Flow (VGF) for offline RL on D4RL and OGBench, in one file.
# Paper: "Reinforcement Learning via Value Gradient Flow", Xu, Hu, Sojoudi, Zhang (ICLR 2026), arXiv 2604.14265.
#
# Behaviour-regularised RL as optimal transport. N particles (candidate actions) are drawn from a reference policy mu
# (a flow-matching model of the dataset's actions) and moved along the value gradient grad_a Q by Stein variational
# gradient descent, a discretised Wasserstein gradient flow toward pi* ∝ mu · exp(Q / alpha). The transport budget
# (steps x step size) is the only regulariser. L_test transport steps at test time trade compute for quality;
# L_test = 0 is best-of-N from mu.
#
# Read top to bottom: Args, the networks, the reference sampler, the SVGD transport, acting, the TD target and the
# losses, the update, the training loop. Below the PLUMBING banner: datasets, environments, evaluation, checks,
# checkpoints and plots; nothing there changes the algorithm.
import contextlib
import copy
import errno
import fcntl
import json
import math
import os
import random
import re
import signal
import sys
import tempfile
import time
import urllib.request
import warnings
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import asdict, dataclass, field, fields
from typing import Annotated, Callable, Dict, List, Literal, Optional

import gymnasium as gym
import mujoco
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro


def shown_default(text: str):
    """--help shows this default instead of `None` (such options are filled per task: SUITE_DEFAULTS)."""
    return tyro.conf.arg(help_behavior_hint=f"(default: {text})")


@dataclass
class Args:
    # Algorithm (None: the per-task default of the official run scripts, SUITE_DEFAULTS below)
    env_id: str = "halfcheetah-medium-v2"
    """D4RL id (hopper-medium-replay-v2, antmaze-large-diverse-v2, pen-cloned-v1) or OGBench singletask id"""
    total_steps: Annotated[Optional[int], shown_default(
        "1M; OGBench antmaze-large 2M, antmaze-giant 3M; 500k D4RL with --online-steps, 1M with --amortised "
        "--online-steps")] = None
    """number of (offline) gradient steps"""
    batch_size: int = 256
    """transitions per gradient step"""
    learning_rate: float = 3e-4
    """Adam learning rate of the critic and of the behaviour flow"""
    hidden_dims: List[int] = field(default_factory=lambda: [512, 512, 512, 512])
    """hidden layer sizes of the critic and of the behaviour flow"""
    discount: Annotated[Optional[float], shown_default(
        "0.99 D4RL, OGBench manipulation and antmaze-giant; 0.995 other OGBench navigation, and antmaze-giant with "
        "--amortised --online-steps")] = None
    """discount factor gamma"""
    tau: float = 0.005
    """Polyak rate of the target critic"""
    num_particles: Annotated[Optional[int], shown_default("10; 5 with --amortised")] = None
    """N, particles (candidate actions) drawn from the reference policy mu per state"""
    bc_flow_steps: int = 10
    """K, Euler steps of the flow-matching reference sampler"""
    train_transport_steps: Annotated[Optional[int], shown_default(
        "5 D4RL, 3 OGBench; 5 OGBench with --online-steps; with --amortised --online-steps: humanoidmaze, cube, "
        "scene 1, antsoccer 2, antmaze and puzzle 5")] = None
    """L_train, SVGD steps applied to the particles of the TD target"""
    transport_step_size: Annotated[Optional[float], shown_default(
        "0.1 D4RL, 0.05 OGBench; 0.1 OGBench with --online-steps; with --amortised --online-steps: humanoidmaze, "
        "antsoccer, cube 0.05, antmaze, scene, puzzle 0.1")] = None
    """eps, SVGD step size (the learning rate of the Adam that moves the particles)"""
    alpha: Annotated[Optional[float], shown_default("0.1 D4RL, 0.2 OGBench; 1.0 OGBench with --online-steps "
                                                    "(not --amortised)")] = None
    """temperature of the Boltzmann target pi* ∝ mu exp(Q / alpha); the score is grad_a Q / alpha"""
    target_q_agg: Annotated[Optional[Literal["min", "mean"]],
                            shown_default("min D4RL and OGBench antmaze, mean other OGBench")] = None
    """aggregation of the two critics in the TD target and for action selection"""
    action_selection: Literal["max", "softmax", "random"] = "max"
    """how the acting particle is picked among the N transported ones"""
    eval_transport_steps: List[int] = field(default_factory=lambda: [0, 1, 2, 3])
    """L_test values evaluated at every evaluation, each once (0 = best-of-N from the reference policy)"""
    amortised: bool = False
    """amortised VGF: a network f(s, a) trained to match grad_a Q at dataset actions drives the transport (no kernel)"""
    fixed_bandwidth: bool = False
    """textbook SVGD: hold the median bandwidth fixed in the repulsion (the official code differentiates through it)"""

    # Evaluation and offline-to-online fine-tuning
    eval_every: Annotated[Optional[int], shown_default("50k D4RL, 100k OGBench")] = None
    """evaluate every this many gradient steps (and at the end); 0 = only at the end"""
    eval_episodes: Annotated[Optional[int], shown_default("50")] = None
    """episodes per evaluation and per L_test, run as one batch of environments"""
    online_steps: int = 0
    """offline-to-online: environment steps of online fine-tuning after the offline steps (one update per step)"""
    online_warmup: int = 5000
    """online steps collected (acting with best-of-N, L = 0) before the updates resume"""
    buffer_size: int = 2_000_000
    """offline-to-online: replay buffer rows, at least the dataset's + 1 (official); when full, the oldest rows go"""

    # Run: seeding, files, logging
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment (0 to 2**32 - 1)"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, cuda is used when available"""
    track: bool = False
    """if toggled, the run is tracked with Weights and Biases (tensorboard is always written)"""
    wandb_project_name: str = "vgf"
    """the wandb project name"""
    wandb_entity: Optional[str] = None
    """the entity (team) of the wandb project"""
    output_dir: str = "runs"
    """runs are written to <output-dir>/<run-name>/ (tensorboard events, eval.jsonl, checkpoint.pt)"""
    run_name: Annotated[Optional[str], shown_default("<env-id>__<exp-name>__<seed>__<unix time>")] = None
    """name of the run folder (a folder that already holds a run is refused)"""
    dataset_dir: Annotated[Optional[str], shown_default("$D4RL_DATASET_DIR or ~/.d4rl/datasets (D4RL), "
                                                        "~/.ogbench/data (OGBench)")] = None
    """where datasets are read from / downloaded to"""
    reward_scale_episodes: Literal["official", "true"] = "official"
    """episodes of the D4RL reward scale 1000 / (max - min return): official code's 1000-row windows, or true ones"""
    log_every: int = 1000
    """write losses to tensorboard (and the progress bar) at the first step and every this many steps"""
    save_model: bool = False
    """save <run>/checkpoint.pt (networks, optimisers, RNG states) at every evaluation, at the end and when stopped"""
    resume: Optional[str] = None
    """checkpoint to continue training from, in the folder that holds it (its options, unless given here)"""
    allow_other_dataset: bool = False
    """let --resume continue on other data than the checkpoint was trained on (a warning instead of an error)"""
    eval_only: bool = False
    """only evaluate the checkpoint given by --checkpoint, for every --eval-transport-steps"""
    checkpoint: Optional[str] = None
    """checkpoint to evaluate with --eval-only"""

    # Speed (results stay equal up to float32 rounding: tests/test_offline_speed.py)
    compile: bool = True
    """torch.compile the update (a minute or more to compile; the eager update if it fails)"""
    cudagraphs: bool = False
    """on CUDA, replay the compiled update as CUDA graphs (torch.compile's "reduce-overhead" mode)"""
    tf32: bool = True
    """allow TF32 matrix multiplies on CUDA (JAX's default precision on GPUs)"""
    threads: Annotated[Optional[int], shown_default("one per core")] = None
    """CPU threads of PyTorch (1 is fastest when other programs keep the cores busy)"""


# =====================================================================================================================
# ALGO LOGIC: networks. mu's velocity field v(s, x_t, t) and the critic ensemble Q_1, Q_2 (the official architectures)
# =====================================================================================================================
def mlp(sizes: List[int]) -> nn.Sequential:
    """Linear layers with ReLU between them; Xavier-uniform weights and zero biases, as flax's default_init."""
    layers = []
    for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        linear = nn.Linear(d_in, d_out)
        nn.init.xavier_uniform_(linear.weight)
        nn.init.zeros_(linear.bias)
        layers += [linear, nn.ReLU()] if i < len(sizes) - 2 else [linear]
    return nn.Sequential(*layers)


class BehaviourFlow(nn.Module):
    """The reference distribution mu: a flow-matching velocity field v(s, x_t, t), an MLP without LayerNorm."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dims: List[int]):
        super().__init__()
        self.act_dim = act_dim
        self.net = mlp([obs_dim + act_dim + 1, *hidden_dims, act_dim])

    def forward(self, obs, x_t, t):
        return self.net(torch.cat([obs, x_t, t], -1))


class EnsembleLinear(nn.Module):
    """E independent linear layers applied as one batched matrix multiply: [E, B, d_in] -> [E, B, d_out]."""

    def __init__(self, members: int, d_in: int, d_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(members, d_in, d_out))
        self.bias = nn.Parameter(torch.zeros(members, 1, d_out))
        for member_weight in self.weight.data:
            nn.init.xavier_uniform_(member_weight)

    def forward(self, x):
        return torch.baddbmm(self.bias, x, self.weight)


class CriticEnsemble(nn.Module):
    """Q_1 .. Q_E(s, a), E = 2: MLP on concat(s, a) with LayerNorm (eps 1e-6) before each ReLU, all members at once.
    With members=1 and out_dim=act_dim it is the amortised score network f(s, a) ≈ grad_a Q(s, a)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dims: List[int], members: int = 2,
                 out_dim: Optional[int] = None):
        super().__init__()
        sizes = [obs_dim + act_dim, *hidden_dims, out_dim or 1]
        self.members, self.vector_output = members, out_dim is not None
        self.linears = nn.ModuleList(EnsembleLinear(members, a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.norm_weights = nn.ParameterList(nn.Parameter(torch.ones(members, 1, h)) for h in hidden_dims)
        self.norm_biases = nn.ParameterList(nn.Parameter(torch.zeros(members, 1, h)) for h in hidden_dims)

    def forward(self, obs, act):  # [B, obs_dim], [B, act_dim] -> [E, B] (or [E, B, out_dim] with out_dim)
        x = torch.cat([obs, act], -1).expand(self.members, -1, -1)
        for linear, scale, shift in zip(self.linears[:-1], self.norm_weights, self.norm_biases):
            x = F.relu(F.layer_norm(linear(x), (scale.shape[-1],), eps=1e-6) * scale + shift)
        x = self.linears[-1](x)
        return x if self.vector_output else x.squeeze(-1)


def aggregate(qs: torch.Tensor, how: str) -> torch.Tensor:
    """Combine the ensemble's values [E, ...]: their minimum or their mean."""
    return qs.min(0).values if how == "min" else qs.mean(0)


# =====================================================================================================================
# ALGO LOGIC: the reference sampler mu (flow matching, K Euler steps)
# =====================================================================================================================
def sample_reference(flow: BehaviourFlow, obs: torch.Tensor, num_particles: int, flow_steps: int,
                     noise: Optional[torch.Tensor] = None, generator=None) -> torch.Tensor:
    """N particles per state from mu(.|s): K Euler steps of dx/dt = v(s, x, t) from x_0 ~ N(0, I) (or the given
    noise [B * N, A]), then clipped to [-1, 1]. obs [B, S] -> particles [B, N, A]; particle i of state b starts
    from noise row b * N + i."""
    obs = obs.repeat_interleave(num_particles, 0)
    x = noise if noise is not None else torch.randn(obs.shape[0], flow.act_dim, device=obs.device,
                                                    dtype=obs.dtype, generator=generator)
    for k in range(flow_steps):
        t = torch.full((obs.shape[0], 1), k / flow_steps, device=obs.device, dtype=obs.dtype)
        x = x + flow(obs, x, t) / flow_steps
    return x.clamp(-1.0, 1.0).view(-1, num_particles, flow.act_dim)


# =====================================================================================================================
# ALGO LOGIC: the transport. SVGD steps on the particles toward pi* ∝ mu exp(Q / alpha) (the value gradient flow)
#   phi(x_i) = (1/N) sum_j [ k(x_j, x_i) grad_a Q(s, x_j) / alpha + grad_{x_j} k(x_j, x_i) ]
# =====================================================================================================================
def median_bandwidth(sq_dists: torch.Tensor):
    """The RBF kernel's gamma = 1 / (2h + 1e-6), h = median(d^2) / (2 log(N + 1)) over all N^2 pairs of each state,
    and d gamma / d d_ij (nonzero only at the one or two entries that make the median): [B, N, N] -> [B, 1, 1],
    [B, N, N]."""
    b, n = sq_dists.shape[0], sq_dists.shape[-1]
    # stable sort, as jnp.median: d_ij = d_ji tie, and the copy that lands at the median index (so the particle that
    # receives d median / d x in the official repulsion) must follow the flat order as it does there
    flat, order = sq_dists.flatten(1).sort(dim=1, stable=True)
    middle = [(n * n - 1) // 2, n * n // 2]
    median = flat[:, middle].mean(1)  # the mean of the two middle values, as jnp.median
    h = median / (2.0 * math.log(n + 1.0))
    gamma = 1.0 / (1e-6 + 2.0 * h.clamp_min(1e-12))
    slope = torch.where(h > 1e-12, -gamma.pow(2) / math.log(n + 1.0), 0.0)  # d gamma / d median
    d_gamma = torch.zeros_like(flat).scatter_add(1, order[:, middle], 0.5 * slope[:, None].expand(b, 2))
    return gamma.view(-1, 1, 1), d_gamma.view_as(sq_dists)


def svgd_direction(particles: torch.Tensor, score: torch.Tensor, alpha: float,
                   fixed_bandwidth: bool = False) -> torch.Tensor:
    """phi(x_i) = (1/N) sum_j [k(x_j, x_i) score_j / alpha + grad_{x_j} k(x_j, x_i)], RBF kernel with the median
    bandwidth; particles and score [B, N, A]. The repulsion is differentiated through the bandwidth too, as the
    official code does by automatic differentiation, unless fixed_bandwidth (the textbook SVGD)."""
    x = particles.detach()
    diff = x.unsqueeze(2) - x.unsqueeze(1)  # [B, N, N, A]: x_i - x_j
    sq_dists = diff.pow(2).sum(-1)
    gamma, d_gamma = median_bandwidth(sq_dists)
    kernel = torch.exp(-gamma * sq_dists)  # [B, N, N], symmetric
    # repulsion_i = -d/dx_i sum_jk k(x_j, stop(x_k)) = 2 sum_j w_ij (x_i - x_j), with w = gamma K for a fixed
    # bandwidth; differentiating through the median adds (sum_jk K_jk d_jk) d gamma / d d_ij
    weights = gamma * kernel
    if not fixed_bandwidth:
        weights = weights + (kernel * sq_dists).sum((1, 2), keepdim=True) * d_gamma
    repulsion = 2.0 * (weights.unsqueeze(-1) * diff).sum(2)
    return (kernel @ score / alpha + repulsion) / x.shape[1]


def adam_flow(x: torch.Tensor, velocity: Callable, steps: int, step_size: float, max_norm: Optional[float] = None,
              norm_dims=None) -> torch.Tensor:
    """`steps` times: x <- clip(x + an Adam step along velocity(x), -1, 1). The Adam (lr step_size, betas 0.9 /
    0.999, eps 1e-8) is freshly initialised for every transport, as the official code's optax.adam, so each
    coordinate moves about step_size per step. max_norm: clip the global norm of -velocity first (over norm_dims)."""
    x = x.detach()
    first_moment, second_moment = torch.zeros_like(x), torch.zeros_like(x)
    beta1, beta2 = 0.9, 0.999
    for t in range(1, steps + 1):
        grad = -velocity(x)
        if max_norm is not None:  # optax.clip_by_global_norm
            norm = grad.pow(2).sum(norm_dims, keepdim=True).sqrt()
            grad = torch.where(norm < max_norm, grad, grad / norm * max_norm)
        first_moment = beta1 * first_moment + (1 - beta1) * grad
        second_moment = beta2 * second_moment + (1 - beta2) * grad * grad
        step = (first_moment / (1 - beta1 ** t)) / ((second_moment / (1 - beta2 ** t)).sqrt() + 1e-8)
        x = (x - step_size * step).clamp(-1.0, 1.0)
    return x


def transport(q_fn: Callable, obs: torch.Tensor, particles: torch.Tensor, steps: int, step_size: float,
              alpha: float, fixed_bandwidth: bool = False) -> torch.Tensor:
    """Value gradient flow: `steps` SVGD steps on particles [B, N, A] at states obs [B, S]; the score is grad_a of
    q_fn(obs [B * N, S], actions [B * N, A]) -> [B * N]. steps = 0 returns the particles unchanged."""
    if steps == 0:
        return particles
    b, n, a = particles.shape
    obs = obs.repeat_interleave(n, 0)
    score = torch.func.grad(lambda x: q_fn(obs, x.view(b * n, a)).sum())  # x -> grad_a Q(s, x_j), [B, N, A]
    return adam_flow(particles, lambda x: svgd_direction(x, score(x), alpha, fixed_bandwidth), steps, step_size)


def amortised_transport(score_net: "CriticEnsemble", obs: torch.Tensor, particles: torch.Tensor, steps: int,
                        step_size: float, per_state_clip: bool) -> torch.Tensor:
    """Amortised VGF: the learned f(s, a) ≈ grad_a Q(s, a) is the velocity (no kernel), the update's norm clipped to
    1 (over the whole batch in training, per state when acting, as the official code acts one state at a time)."""
    if steps == 0:
        return particles
    b, n, a = particles.shape
    obs = obs.repeat_interleave(n, 0)
    return adam_flow(particles, lambda x: score_net(obs, x.view(b * n, a))[0].view(b, n, a), steps, step_size,
                     max_norm=1.0, norm_dims=(1, 2) if per_state_clip else (0, 1, 2))


def vgf_particles(agent: "Agent", obs: torch.Tensor, steps: int, acting: bool, noise=None, generator=None):
    """N particles per state from mu, moved `steps` transport steps on the online critic (or by the amortised score
    network): [B, S] -> [B, N, A]."""
    args = agent.args
    particles = sample_reference(agent.flow, obs, args.num_particles, args.bc_flow_steps, noise, generator)
    if args.amortised:
        return amortised_transport(agent.score_net, obs, particles, steps, args.transport_step_size, acting)

    def mean_q(obs, actions):  # the online critics' mean, as the official code
        return agent.critic(obs, actions).mean(0)

    return transport(mean_q, obs, particles, steps, args.transport_step_size, args.alpha, args.fixed_bandwidth)


# =====================================================================================================================
# ALGO LOGIC: acting. The best of the N transported particles under the online critic
# =====================================================================================================================
@torch.no_grad()
def act(agent: "Agent", obs: torch.Tensor, transport_steps: int, generator=None, noise=None) -> torch.Tensor:
    """pi(s): N particles from mu, L_test transport steps, then pick one (argmax Q by default): [B, S] -> [B, A].
    noise: optional x_0 [B * N, A] of mu's sampler."""
    args = agent.args
    particles = vgf_particles(agent, obs, transport_steps, acting=True, noise=noise, generator=generator)
    b, n, a = particles.shape
    q = aggregate(agent.critic(obs.repeat_interleave(n, 0), particles.view(b * n, a)), args.target_q_agg).view(b, n)
    if args.action_selection == "max":
        choice = q.argmax(1)
    elif args.action_selection == "softmax":
        choice = torch.multinomial(torch.softmax(q - q.max(1, keepdim=True).values, 1), 1, generator=generator)[:, 0]
    else:
        choice = torch.randint(0, n, (b,), device=obs.device, generator=generator)
    return particles[torch.arange(b, device=obs.device), choice]


# =====================================================================================================================
# ALGO LOGIC: value learning. TD target from transported particles, critic loss, flow-matching loss for mu
# =====================================================================================================================
@torch.no_grad()
def td_target(agent: "Agent", batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """y = r + gamma * mask * mean_i Q_target(s', a_i), a_i ~ mu(.|s') moved L_train steps on the online critic,
    Q_target aggregated over the ensemble (min or mean). batch["target_x0"] [B * N, A], when present, is x_0 of
    mu's sampler."""
    args, next_obs = agent.args, batch["next_observations"]
    particles = vgf_particles(agent, next_obs, args.train_transport_steps, acting=False, noise=batch.get("target_x0"))
    b, n, a = particles.shape
    next_q = aggregate(agent.target_critic(next_obs.repeat_interleave(n, 0), particles.view(b * n, a)),
                       args.target_q_agg)
    return batch["rewards"] + args.discount * batch["masks"] * next_q.view(b, n).mean(1)


def critic_loss_fn(critic: CriticEnsemble, target: torch.Tensor, batch) -> torch.Tensor:
    """Squared TD error of both ensemble members (summed), averaged over the batch."""
    return (target - critic(batch["observations"], batch["actions"])).pow(2).sum(0).mean()


def flow_matching_loss(flow: BehaviourFlow, batch) -> torch.Tensor:
    """||v(s, x_t, t) - (a - x_0)||^2 with x_t = (1 - t) x_0 + t a, x_0 ~ N(0, I), t ~ U[0, 1] (batch["flow_x0"]
    [B, A] and batch["flow_t"] [B, 1] when present)."""
    actions = batch["actions"]
    x0 = batch["flow_x0"] if "flow_x0" in batch else torch.randn_like(actions)
    t = batch["flow_t"] if "flow_t" in batch else torch.rand(actions.shape[0], 1, device=actions.device,
                                                             dtype=actions.dtype)
    return (flow(batch["observations"], (1 - t) * x0 + t * actions, t) - (actions - x0)).pow(2).mean()


def score_matching_loss(score_net: CriticEnsemble, critic: CriticEnsemble, batch) -> torch.Tensor:
    """Amortised VGF: regress f(s, a) onto grad_a mean(Q_1, Q_2)(s, a) at the dataset's actions."""
    obs, actions = batch["observations"], batch["actions"]
    with torch.no_grad():
        score = torch.func.grad(lambda a: critic(obs, a).mean(0).sum())(actions)
    return (score_net(obs, actions)[0] - score).pow(2).mean()


# =====================================================================================================================
# ALGO LOGIC: the update. One gradient step on every network, as the official agent's update
# =====================================================================================================================
class Agent(nn.Module):
    """Everything that is trained: the behaviour flow (mu), the critic ensemble, its target, the amortised score
    network (with --amortised) and one Adam per network. agent.update(batch) runs `update`, compiled with --compile."""

    def __init__(self, obs_dim: int, act_dim: int, args: Args):
        super().__init__()
        self.args = args
        self.flow = BehaviourFlow(obs_dim, act_dim, args.hidden_dims)
        self.critic = CriticEnsemble(obs_dim, act_dim, args.hidden_dims)
        self.target_critic = CriticEnsemble(obs_dim, act_dim, args.hidden_dims)
        self.target_critic.load_state_dict(self.critic.state_dict())
        self.target_critic.requires_grad_(False)
        self.score_net = CriticEnsemble(obs_dim, act_dim, args.hidden_dims, 1, act_dim) if args.amortised else None
        self.nets = [self.critic, self.flow] + ([self.score_net] if args.amortised else [])
        self.opts = [torch.optim.Adam(net.parameters(), lr=args.learning_rate) for net in self.nets]
        self.compiled_update, self.compile_failed = None, False

    def update(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """`update` below, or with --compile the same function through torch.compile (and CUDA graphs with
        --cudagraphs); compiled at the first call (first_compiled_update), the eager update if that fails."""
        if not self.args.compile or self.compile_failed:
            return update(self, batch)
        if self.compiled_update is None:
            return first_compiled_update(self, batch)
        return self.compiled_update(self, batch)


def update(agent: Agent, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """TD target from the pre-update networks, the losses, one Adam step per network, the Polyak update of the target
    critic from the pre-update critic (official order). Returns detached metrics (no host sync)."""
    args = agent.args
    target = td_target(agent, batch)
    losses = {"losses/critic_loss": critic_loss_fn(agent.critic, target, batch),
              "losses/bc_flow_loss": flow_matching_loss(agent.flow, batch)}
    if args.amortised:
        losses["losses/score_loss"] = score_matching_loss(agent.score_net, agent.critic, batch)
    for opt in agent.opts:
        opt.zero_grad()
    sum(losses.values()).backward()  # the losses share no parameters (the score target is detached)
    with torch.no_grad():
        for target_param, param in zip(agent.target_critic.parameters(), agent.critic.parameters()):
            target_param.lerp_(param, args.tau)  # target <- tau * critic + (1 - tau) * target
    for net, opt in zip(agent.nets, agent.opts):
        if args.amortised:  # the amortised variant clips every optimiser's gradient to global norm 1 (optax)
            clip_global_norm_([p.grad for p in net.parameters()], 1.0)
        opt.step()
    return {**{name: loss.detach() for name, loss in losses.items()}, "charts/td_target_mean": target.mean()}


def clip_global_norm_(grads: List[torch.Tensor], max_norm: float):
    """optax.clip_by_global_norm: scale by max_norm / |g| when the global norm |g| >= max_norm (torch's
    clip_grad_norm_ divides by |g| + 1e-6 instead)."""
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    scale = torch.where(norm < max_norm, 1.0, max_norm / norm)
    for grad in grads:
        grad.mul_(scale)


# =====================================================================================================================
# ALGO LOGIC: training. Sample a batch, update, log, evaluate, checkpoint
# =====================================================================================================================
def main(args: Args, explicit: Optional[set] = None) -> str:
    """explicit: the options named on the command line (given_options); they win over a checkpoint's values."""
    # PLUMBING: options, run folder, seeding, dataset, environments, agent, logging; on leaving the block the plots,
    # or after Ctrl-C / SIGTERM / an error a checkpoint of the last whole step (--save-model) and no stub folder
    with start_run(args, explicit) as run:
        args, agent = run.args, run.agent
        if args.eval_only:
            return run.evaluate_checkpoint()
        for step in range(run.start_step + 1, run.last_step + 1):
            metrics = None
            with run.whole_step(step):  # a Ctrl-C or SIGTERM during the step stops the run at its end
                if step > args.total_steps:  # offline-to-online: one environment step (best-of-N, L = 0) per update
                    run.online_step(step)
                if step <= args.total_steps or step - args.total_steps >= args.online_warmup:
                    batch = run.buffer.sample(args.batch_size)
                    metrics = agent.update(batch)
                run.log(step, metrics)
            if run.is_eval_step(step):
                run.evaluate(step)
                run.save_checkpoint(step)
    return run.run_dir


# =====================================================================================================================
# PLUMBING: everything below (per-task defaults, option checks, datasets, the replay buffer, environments, evaluation,
# the run folder, checkpoints, logging, plots) feeds the algorithm above and reports on it; none of it changes it.
# =====================================================================================================================

# ---------------------------------------------------------------------------------------------------------------------
# Per-task defaults (the official run scripts) and option checks
# ---------------------------------------------------------------------------------------------------------------------
# Per-suite defaults from the released run scripts (run_scripts/*.sh of the official code); task_defaults adds their
# per-task and offline-to-online values. An explicit command-line value always wins. README: "Defaults".
SUITE_DEFAULTS = {
    #                   gamma  L_train  eps   alpha  q_agg   steps      eval_every  episodes
    "d4rl-locomotion": (0.99, 5, 0.1, 0.1, "min", 1_000_000, 50_000, 50),
    "d4rl-antmaze": (0.99, 5, 0.1, 0.1, "min", 1_000_000, 50_000, 50),
    "d4rl-adroit": (0.99, 5, 0.1, 0.1, "min", 1_000_000, 50_000, 50),
    "ogbench-navigation": (0.995, 3, 0.05, 0.2, "mean", 1_000_000, 100_000, 50),
    "ogbench-manipulation": (0.99, 3, 0.05, 0.2, "mean", 1_000_000, 100_000, 50),
}

SUITE_FIELDS = ("discount", "train_transport_steps", "transport_step_size", "alpha", "target_q_agg", "total_steps",
                "eval_every", "eval_episodes")

AMORTISED_ONLINE_OGBENCH = {  # run_a_vgf_off2on_ogbench.sh: environment -> (L_train, eps)
    "antmaze": (5, 0.1), "humanoidmaze": (1, 0.05), "antsoccer": (2, 0.05), "cube": (1, 0.05), "scene": (1, 0.1),
    "puzzle": (5, 0.1)}


class VGFError(Exception):
    """A problem with the user's input or files, reported without a traceback."""


D4RL_LOCOMOTION = {  # env -> (gymnasium id, extra kwargs, D4RL random score, D4RL expert score)
    "halfcheetah": ("HalfCheetah-v4", {}, -280.178953, 12135.0),
    "hopper": ("Hopper-v4", {}, -20.272305, 3234.3),
    "walker2d": ("Walker2d-v4", {}, 1.629008, 4592.3),
    "ant": ("Ant-v4", {"use_contact_forces": True}, -325.6, 3879.7),  # 111-dim observation, as D4RL's ant
}

D4RL_LOCOMOTION_DATASETS = ("random", "medium", "expert", "medium-replay", "medium-expert", "full-replay")

D4RL_ANTMAZE_FILES = {  # antmaze-<name>-v2 -> (maze file name, multistart, multigoal)
    "umaze": ("u-maze", False, False), "umaze-diverse": ("u-maze", True, True),
    "medium-play": ("big-maze", True, False), "medium-diverse": ("big-maze", True, True),
    "large-play": ("hardest-maze", True, False), "large-diverse": ("hardest-maze", True, True)}

D4RL_ADROIT_SCORES = {"pen": (96.262799, 3076.8331017826877), "door": (-56.512833, 2880.5693087298737),
                      "hammer": (-274.856578, 12794.134825156867), "relocate": (-6.425911, 4233.877797728884)}

D4RL_URL = "http://rail.eecs.berkeley.edu/datasets/offline_rl"

OGBENCH_NAVIGATION = ("antmaze-medium-navigate", "antmaze-large-navigate", "antmaze-giant-navigate",
                      "antmaze-teleport-navigate", "humanoidmaze-medium-navigate", "humanoidmaze-large-navigate",
                      "humanoidmaze-giant-navigate", "antsoccer-arena-navigate", "antsoccer-medium-navigate",
                      "pointmaze-medium-navigate", "pointmaze-large-navigate", "pointmaze-giant-navigate")

OGBENCH_MANIPULATION = ("cube-single-play", "cube-double-play", "cube-triple-play", "cube-quadruple-play",
                        "scene-play", "puzzle-3x3-play", "puzzle-4x4-play", "puzzle-4x5-play", "puzzle-4x6-play")


def supported_env_ids() -> str:
    return (f"D4RL: {{{','.join(D4RL_LOCOMOTION)}}}-{{{','.join(D4RL_LOCOMOTION_DATASETS)}}}-v2\n  "
            f"D4RL: antmaze-{{{','.join(D4RL_ANTMAZE_FILES)}}}-v2\n  "
            f"D4RL: {{{','.join(D4RL_ADROIT_SCORES)}}}-{{human,cloned,expert}}-v1\n  "
            f"OGBench: <env>-singletask-v0 or <env>-singletask-task{{1..5}}-v0 with <env> one of\n      "
            + "\n      ".join(OGBENCH_NAVIGATION + OGBENCH_MANIPULATION))


def parse_env_id(env_id: str) -> Dict:
    """Suite, dataset and evaluation facts of an env id; raises VGFError listing the supported ids."""
    m = re.fullmatch(r"(halfcheetah|hopper|walker2d|ant)-(" + "|".join(D4RL_LOCOMOTION_DATASETS) + r")-v2", env_id)
    if m:
        env, dataset = m.groups()
        gym_id, kwargs, random_score, expert_score = D4RL_LOCOMOTION[env]
        file_name = f"{env}_{dataset.replace('-', '_')}-v2.hdf5"
        return dict(suite="d4rl-locomotion", file_name=file_name, url=f"{D4RL_URL}/gym_mujoco_v2/{file_name}",
                    gym_id=gym_id, gym_kwargs=kwargs, ref_scores=(random_score, expert_score))
    m = re.fullmatch(r"antmaze-(" + "|".join(D4RL_ANTMAZE_FILES) + r")-v2", env_id)
    if m:
        maze, multistart, multigoal = D4RL_ANTMAZE_FILES[m.group(1)]
        file_name = f"Ant_maze_{maze}_noisy_multistart_{multistart}_multigoal_{multigoal}_sparse_fixed.hdf5"
        return dict(suite="d4rl-antmaze", file_name=file_name, url=f"{D4RL_URL}/ant_maze_v2/{file_name}",
                    ref_scores=(0.0, 1.0))
    m = re.fullmatch(r"(pen|door|hammer|relocate)-(human|cloned|expert)-v1", env_id)
    if m:
        return dict(suite="d4rl-adroit", file_name=f"{env_id}.hdf5", url=f"{D4RL_URL}/hand_dapg_v1/{env_id}.hdf5",
                    ref_scores=D4RL_ADROIT_SCORES[m.group(1)])
    m = re.fullmatch(r"(.+)-singletask(-task[1-5])?-v0", env_id)
    if m and m.group(1) in OGBENCH_NAVIGATION + OGBENCH_MANIPULATION:
        suite = "ogbench-navigation" if m.group(1) in OGBENCH_NAVIGATION else "ogbench-manipulation"
        return dict(suite=suite, dataset_name=f"{m.group(1)}-v0")
    raise VGFError(f"unknown --env-id '{env_id}'. Supported ids:\n  " + supported_env_ids())


def task_defaults(args: Args) -> Dict:
    """Default values for args.env_id: the suite's row, then the run scripts' per-task and offline-to-online values."""
    suite, name = parse_env_id(args.env_id)["suite"], args.env_id
    d = dict(zip(SUITE_FIELDS, SUITE_DEFAULTS[suite]), num_particles=5 if args.amortised else 10)
    if suite == "ogbench-navigation" and name.startswith("antmaze"):  # run_vgf_off_ogbench.sh
        d["target_q_agg"] = "min"
        if name.startswith("antmaze-large"):
            d["total_steps"] = 2_000_000
        if name.startswith("antmaze-giant"):
            d.update(total_steps=3_000_000, discount=0.99)
    if args.online_steps > 0 and not args.amortised:  # run_vgf_off2on_{d4rl,ogbench}.sh
        if suite.startswith("d4rl"):
            d["total_steps"] = 500_000
        else:
            d.update(train_transport_steps=5, transport_step_size=0.1, alpha=1.0)
    elif args.online_steps > 0 and suite.startswith("ogbench"):  # run_a_vgf_off2on_ogbench.sh
        suite_values = (d["train_transport_steps"], d["transport_step_size"])
        steps, eps = AMORTISED_ONLINE_OGBENCH.get(name.split("-")[0], suite_values)
        d.update(train_transport_steps=steps, transport_step_size=eps, total_steps=1_000_000)
        if name.startswith("antmaze-giant"):
            d["discount"] = 0.995
    return d


def resolve_suite_defaults(args: Args) -> Args:
    """Fill the None fields of args from task_defaults."""
    for name, value in task_defaults(args).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def validate(args: Args):
    """Reject out-of-range options before anything is built or written (exit 2 with every problem named)."""
    rules = [  # (field, valid, range); comparisons are written so that NaN fails them
        ("total_steps", args.total_steps >= 1, ">= 1"),
        ("batch_size", args.batch_size >= 1, ">= 1"),
        ("learning_rate", 0 < args.learning_rate < math.inf, "> 0"),
        ("hidden_dims", len(args.hidden_dims) >= 1 and min(args.hidden_dims) >= 1, "one or more sizes >= 1"),
        ("discount", 0 <= args.discount <= 1, "in [0, 1]"),
        ("tau", 0 < args.tau <= 1, "in (0, 1]"),
        ("num_particles", args.num_particles >= 1, ">= 1"),
        ("bc_flow_steps", args.bc_flow_steps >= 1, ">= 1"),
        ("train_transport_steps", args.train_transport_steps >= 0, ">= 0"),
        ("transport_step_size", 0 < args.transport_step_size < math.inf, "> 0"),
        ("alpha", 0 < args.alpha < math.inf, "> 0"),
        ("eval_every", args.eval_every >= 0, ">= 0 (0: evaluate only at the end)"),
        ("eval_episodes", args.eval_episodes >= 1, ">= 1"),
        ("eval_transport_steps", len(args.eval_transport_steps) >= 1 and min(args.eval_transport_steps) >= 0,
         "one or more values >= 0"),
        ("eval_transport_steps", len(set(args.eval_transport_steps)) == len(args.eval_transport_steps),
         "distinct values (each L_test once)"),
        ("seed", 0 <= args.seed < 2**32, "in [0, 2**32 - 1]"),
        ("log_every", args.log_every >= 1, ">= 1"),
        ("online_steps", args.online_steps >= 0, ">= 0"),
        ("online_warmup", args.online_warmup >= 0, ">= 0"),
        ("buffer_size", args.buffer_size >= 1, ">= 1"),
        ("threads", args.threads is None or args.threads >= 1, ">= 1"),
    ]
    bad = []
    for name, valid, valid_range in rules:
        if not valid:
            value = getattr(args, name)
            shown = (" ".join(map(str, value)) or "(empty)") if isinstance(value, list) else value
            bad.append(f"--{name.replace('_', '-')} {shown} is out of range: must be {valid_range}")
    if bad:
        raise VGFError("\n  ".join(bad))


def given_options(argv: List[str]) -> set:
    """The Args fields named on the command line (`--env-id X`, `--env-id=X`, `--no-compile`), even when the value
    given equals the default: those win over a checkpoint's values."""
    known, names = {f.name for f in fields(Args)}, set()
    for word in argv:
        if word.startswith("--"):
            name = word[2:].split("=")[0].replace("-", "_")
            name = name[3:] if name not in known and name.startswith("no_") else name
            names |= {name} & known
    return names


# ---------------------------------------------------------------------------------------------------------------------
# Datasets: D4RL HDF5 and OGBench npz files, with the official preprocessing
# ---------------------------------------------------------------------------------------------------------------------
def download(url: str, path: str, where_hint: str):
    """Download url to path with a progress bar. A partial file never remains under the final name, and a folder is
    created only once the server answers (and removed again if the download still fails)."""
    from tqdm import tqdm

    tmp, created = path + ".part", []
    target = folder = os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(folder):  # the folders a download would create, innermost first
        created.append(folder)
        folder = os.path.dirname(folder)
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            os.makedirs(target, exist_ok=True)
            total = int(response.headers.get("Content-Length") or 0) or None
            with open(tmp, "wb") as f, tqdm(total=total, unit="B", unit_scale=True, desc=os.path.basename(path)) as bar:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
    except BaseException as e:  # URLError, timeouts and HTTP errors are OSErrors; Ctrl-C cleans up too
        if os.path.exists(tmp):
            os.remove(tmp)
        for folder in created:
            if os.path.isdir(folder) and not os.listdir(folder):
                os.rmdir(folder)
        if not isinstance(e, (OSError, ValueError)):
            raise
        raise VGFError(f"dataset file {path} is missing and downloading it from {url} failed ({e}).\n"
                       f"Download it on a machine with network access and copy it to {path} "
                       f"(or point {where_hint} at the folder that holds it).") from None
    os.replace(tmp, path)


def must_download(path: str) -> bool:
    """True when the dataset file does not exist. A file that exists but cannot be read (or sits in a folder that
    cannot be entered) is an error, never a reason to download it again."""
    try:
        with open(path, "rb"):
            return False
    except FileNotFoundError:
        return True
    except PermissionError:
        raise VGFError(f"dataset file {path} cannot be read (permission denied on the file or a folder above it); "
                       "fix the permissions or pass another --dataset-dir") from None
    except OSError as e:
        raise VGFError(f"dataset file {path} cannot be read ({e.strerror or e}); pass another --dataset-dir") from None


def check_binary(arrays: Dict[str, np.ndarray], path: str):
    """terminals / timeouts must be 0 or 1: a fractional flag would silently become 'true' (every row an end)."""
    for key, value in arrays.items():
        bad = ~np.isin(value, (0, 1))
        if bad.any():
            row = np.flatnonzero(bad)[0]
            raise VGFError(f"{path}: key '{key}' must hold 0 or 1 (booleans), but row {row} holds {value[row]} "
                           f"({bad.sum()} row(s) in all); repair the file")


def check_action_range(actions: np.ndarray, path: str, tolerance: float = 1e-3):
    """The policy acts in [-1, 1] and dataset actions are clipped to it (official code). Actions outside are clipped
    with a warning; a dataset in other units (more than 1 % of the entries beyond +-1.5) is refused."""
    outside = np.abs(actions) > 1 + tolerance
    if outside.any():
        share, largest = 100.0 * outside.mean(), float(np.abs(actions).max())
        if (np.abs(actions) > 1.5).mean() > 0.01:
            raise VGFError(f"{path}: {share:.1f} % of the action entries lie outside [-1, 1] (largest |a| "
                           f"{largest:.3g}); the policy acts in [-1, 1]: rescale the actions to it")
        print(f"warning: {path}: {share:.3f} % of the action entries lie outside [-1, 1] (largest |a| {largest:.3g}); "
              "they are clipped to [-1, 1]")


def check_finite(arrays: Dict[str, np.ndarray], path: str):
    """A NaN or inf in the data would only surface much later as a non-finite loss: name the key and the first row."""
    for key, value in arrays.items():
        if np.issubdtype(value.dtype, np.floating):
            bad = ~np.isfinite(value.reshape(len(value), -1)).all(1)
            if bad.any():
                raise VGFError(f"{path}: key '{key}' holds NaN or inf at row {np.flatnonzero(bad)[0]} ({bad.sum()} "
                               f"row(s) in all); repair the file or delete it to download it again")


def read_d4rl_hdf5(path: str) -> Dict[str, np.ndarray]:
    """Read the keys of a D4RL HDF5 file that VGF needs, checking names and shapes."""
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise VGFError(f"{path} is not a readable HDF5 file ({e}); delete it to download it again.") from None
    with f:
        missing = [k for k in ("observations", "actions", "rewards", "terminals") if k not in f]
        if missing:
            raise VGFError(f"{path} is not a D4RL dataset: missing key(s) {missing} (found {sorted(f.keys())})")
        data = {k: f[k][()] for k in ("observations", "actions", "rewards", "terminals", "timeouts") if k in f}
    n = len(data["observations"])
    if n < 2:
        raise VGFError(f"{path} holds {n} rows; a dataset needs at least 2 (a transition needs its next row): repair "
                       "the file or delete it to download it again")
    for k, v in data.items():
        if len(v) != n or (k in ("rewards", "terminals", "timeouts") and v.ndim != 1) or \
                (k in ("observations", "actions") and v.ndim != 2):
            raise VGFError(f"{path}: key '{k}' has shape {v.shape}; expected {n} rows like 'observations' "
                           f"{data['observations'].shape}, 1-D for rewards/terminals/timeouts and 2-D otherwise")
    check_finite(data, path)
    check_binary({k: data[k] for k in ("terminals", "timeouts") if k in data}, path)
    check_action_range(data["actions"], path)
    return data


def qlearning_transitions(data: Dict[str, np.ndarray], max_episode_steps: int = 1000) -> Dict[str, np.ndarray]:
    """(s, a, r, s', done) as d4rl.qlearning_dataset builds them: s' = observations[i+1], and the last step of an
    episode cut by a time limit (timeouts) is dropped, because its s' belongs to the next episode."""
    n = len(data["observations"])
    if "timeouts" in data:
        timeouts = data["timeouts"].astype(bool)
    else:  # old files: episodes are cut every max_episode_steps, counted as d4rl does (1 after a terminal row)
        timeouts = np.zeros(n, bool)
        step = 0
        for i in range(n):
            timeouts[i] = step == max_episode_steps - 1
            step = 0 if timeouts[i] else 1 if data["terminals"][i] else step + 1
    keep = np.flatnonzero(~timeouts[:-1])
    return dict(observations=data["observations"][keep].astype(np.float32),
                actions=data["actions"][keep].astype(np.float32),
                rewards=data["rewards"][keep].astype(np.float32),
                next_observations=data["observations"][keep + 1].astype(np.float32),
                terminals=data["terminals"][keep].astype(np.float32))


def official_window_ends(terminals: np.ndarray, window: int = 1000) -> np.ndarray:
    """Ends of the official code's 'episodes' for the reward scale: a row of the timeout-stripped transitions ends one
    if it is a terminal or the window-th row since the last end (so time-limited episodes run together)."""
    terminals = terminals.astype(bool)
    rows = np.arange(len(terminals))
    start = np.maximum.accumulate(np.where(np.r_[True, terminals[:-1]], rows, 0))  # first row after the last terminal
    return terminals | ((rows - start + 1) % window == 0)


def episode_return_range(rewards: np.ndarray, episode_ends: np.ndarray):
    """Min and max return over the complete episodes (rows up to each end); a trailing incomplete one is ignored."""
    ends = np.flatnonzero(episode_ends)
    if len(ends) == 0:
        raise VGFError("the dataset holds no complete episode; cannot scale rewards")
    returns = np.add.reduceat(rewards[: ends[-1] + 1].astype(np.float64), np.r_[0, ends[:-1] + 1])
    return float(returns.min()), float(returns.max()), len(returns)


def ogbench_env_kwargs() -> Dict:
    """ogbench >= 1.2 computes singletask success, reward and termination before the step; the official code pins
    1.1.0, which computes them after it: ask for that. The datasets' relabelled rewards and masks (from the state s of
    each (s, a, s') transition) are the same in both versions."""
    from importlib.metadata import version

    major, minor = (int(x) for x in version("ogbench").split(".")[:2])
    return {"success_timing": "post"} if (major, minor) >= (1, 2) else {}


def load_dataset(args: Args):
    """Transitions (observations, actions, rewards, next_observations, masks) with the official preprocessing, and the
    reward transform r -> r * scale + shift that was applied (online transitions get the same)."""
    spec = parse_env_id(args.env_id)
    reward_scale, reward_shift = 1.0, 0.0
    if spec["suite"].startswith("d4rl"):
        folder = args.dataset_dir or os.environ.get("D4RL_DATASET_DIR") or os.path.expanduser("~/.d4rl/datasets")
        path = os.path.join(folder, spec["file_name"])
        if must_download(path):
            print(f"downloading {spec['url']} -> {path}")
            download(spec["url"], path, "--dataset-dir / $D4RL_DATASET_DIR")
        raw = read_d4rl_hdf5(path)
        data = qlearning_transitions(raw)
        if len(data["observations"]) == 0:
            raise VGFError(f"{path}: no transitions are left once the rows that end an episode by a time limit are "
                           "dropped (d4rl.qlearning_dataset's rule); the file holds too few rows")
        if spec["suite"] == "d4rl-antmaze":  # sparse 0/1 reward shifted to -1/0, as the official code
            reward_shift = -1.0
        else:  # rewards scaled by 1000 / (max return - min return)
            if args.reward_scale_episodes == "official":
                ends = official_window_ends(data["terminals"])
                if not ends.any():
                    raise VGFError(f"{path}: no terminal and fewer than 1000 transitions, so the official reward scale "
                                   "is undefined; use --reward-scale-episodes true (the dataset's episodes)")
                low, high, count = episode_return_range(data["rewards"], ends)
                what = "windows cut at terminals or every 1000 transitions (official; --reward-scale-episodes true: " \
                       "true episodes)"
            else:
                low, high, count = episode_return_range(raw["rewards"], raw["terminals"] | raw.get("timeouts", False))
                what = "true episodes (--reward-scale-episodes true)"
            if not high - low > 1e-6:
                raise VGFError(f"{path}: all {count} {what.split(' (')[0]} have the same return {low:.4g}, so the "
                               "reward scale 1000 / (max - min return) is undefined; try the other "
                               "--reward-scale-episodes")
            reward_scale = 1000.0 / (high - low)
            print(f"returns in [{low:.1f}, {high:.1f}] over {count} {what}; rewards scaled by {reward_scale:.4f}")
        data["rewards"] = (data["rewards"] * reward_scale + reward_shift).astype(np.float32)
        data["masks"] = 1.0 - data.pop("terminals")  # bootstrap unless a true terminal
    else:
        import ogbench

        folder = os.path.expanduser(args.dataset_dir or "~/.ogbench/data")
        for name in (spec["dataset_name"], spec["dataset_name"] + "-val"):
            path = os.path.join(folder, name + ".npz")
            if must_download(path):
                print(f"downloading {ogbench.utils.DATASET_URL}/{name}.npz -> {path}")
                download(f"{ogbench.utils.DATASET_URL}/{name}.npz", path, "--dataset-dir")
        path = os.path.join(folder, spec["dataset_name"] + ".npz")
        for name in (spec["dataset_name"], spec["dataset_name"] + "-val"):
            with open(os.path.join(folder, name + ".npz"), "rb") as f:
                if f.read(4) != b"PK\x03\x04":  # an npz file is a zip archive
                    raise VGFError(f"{os.path.join(folder, name + '.npz')} is not an npz file (a NumPy zip archive); "
                                   "delete it to download it again")
        try:
            with np.load(path) as raw:  # one key at a time; qpos gives the relabelled rewards
                lengths = {}
                for key in raw.files:
                    value = raw[key]
                    lengths[key] = len(value)
                    if key in ("observations", "actions", "qpos", "qvel"):
                        check_finite({key: value}, path)
                    if key == "actions":
                        check_action_range(value, path)
                if len(set(lengths.values())) > 1 or not lengths or min(lengths.values()) < 2:
                    raise VGFError(f"{path}: its arrays must hold the same number (>= 2) of rows, but hold "
                                   f"{', '.join(f'{k} {n}' for k, n in lengths.items())}; repair the file or delete "
                                   "it to download it again")
            _, train, _ = ogbench.make_env_and_datasets(args.env_id, dataset_dir=folder, **ogbench_env_kwargs())
        except (KeyError, ValueError, OSError, zipfile.BadZipFile) as e:
            raise VGFError(f"could not read the OGBench dataset {spec['dataset_name']} in {folder}: {e!r}. The npz "
                           f"must hold observations, actions, terminals, qpos, qvel (+ button_states).") from None
        data = {k: train[k].astype(np.float32) for k in ("observations", "actions", "rewards", "next_observations",
                                                         "masks")}
    data["actions"] = np.clip(data["actions"], -1 + 1e-5, 1 - 1e-5)
    return data, reward_scale, reward_shift


# ---------------------------------------------------------------------------------------------------------------------
# Environments. D4RL AntMaze v2 and Adroit v1 without the `d4rl` package: thin adapters over gymnasium-robotics'
# AntMaze v5 and AdroitHand v1 that reproduce D4RL's observations, action mapping, goals, rewards, termination and
# horizons (checked by replaying dataset states in tests/test_d4rl_envs.py; differences are listed in the README)
# ---------------------------------------------------------------------------------------------------------------------
# The maps antmaze-*-v2 registers (D4RL maze_env.U_MAZE_TEST, BIG_MAZE_TEST, HARDEST_MAZE_TEST);
# '#' wall, 'r' start (origin of D4RL's frame), 'g' goal cell. Row i is D4RL's y = 4 (i - i_r).
ANTMAZE_MAPS = {
    "umaze": ["#####", "#r..#", "###.#", "#g..#", "#####"],
    "medium": ["########", "#r.##..#", "#..#...#", "##...###", "#..#...#", "#.#..#.#", "#...#.g#",
               "########"],
    "large": ["############", "#r...#.....#", "#.##.#.#.#.#", "#......#...#", "#.####.###.#",
              "#..#.#.....#", "##.#.#.#.###", "#..#...#.g.#", "############"]}

ANTMAZE_HORIZON = {"umaze": 700, "medium": 1000, "large": 1000}

GOAL_RADIUS = 0.5  # D4RL GoalReachingEnv: reward 1 and done when |xy - goal| <= 0.5 (gymnasium-robotics: 0.45)


def _d4rl_ant_xml():
    """gymnasium's ant.xml edited to D4RL's ant (d4rl/locomotion/assets/ant.xml); returns a temp path."""
    src = os.path.join(os.path.dirname(gym.__file__), "envs", "mujoco", "assets", "ant.xml")
    tree = ET.parse(src)
    tree.find("option").set("timestep", "0.02")  # D4RL: 0.02 (control step 0.1 s); gymnasium 0.01
    geom_default = tree.find("default/geom")
    geom_default.set("solref", ".02 1")
    geom_default.set("solimp", ".8 .8 .01")  # D4RL's contact softness; gymnasium uses MuJoCo's default
    for motor in tree.iter("motor"):  # D4RL: gear 1, torque range +-30; gymnasium: gear 150, +-1
        motor.set("gear", "1")
        motor.set("ctrlrange", "-30 30")
    fd, path = tempfile.mkstemp(suffix=".xml")
    os.close(fd)
    tree.write(path)
    return path


class D4RLAntMaze(gym.Wrapper):
    """D4RL antmaze-*-v2 (eval mode) on gymnasium-robotics' AntMaze. Observations, goals and states
    are in D4RL's frame; gymnasium-robotics' frame is D4RL's + `offset` once the map rows are reversed
    (it builds the y-mirror image of the same map)."""

    def __init__(self, maze):
        rows = ANTMAZE_MAPS[maze]
        gr_map = [[{"#": 1, ".": 0}.get(c, c) for c in row] for row in reversed(rows)]
        from gymnasium_robotics.envs.maze.ant_maze_v5 import AntMazeEnv

        xml = _d4rl_ant_xml()
        env = AntMazeEnv(maze_map=gr_map, xml_file=xml, continuing_task=True,
                         include_cfrc_ext_in_observation=False)
        os.remove(xml)
        os.remove(env.tmp_xml_file_path)
        super().__init__(env)
        cells = {c: [(i, j) for i, row in enumerate(rows) for j, ch in enumerate(row) if ch == c] for c in "rg"}
        (ri, rj), = cells["r"]
        self.goal_cells = [np.array([4.0 * (j - rj), 4.0 * (i - ri)]) for i, j in cells["g"]]
        self.offset = env.maze.cell_rowcol_to_xy(np.array([len(rows) - 1 - ri, rj]))  # D4RL origin in gr frame
        self.ant = env.ant_env
        self.model, self.data = self.ant.model, self.ant.data
        self.init_qpos = np.array([0, 0, 0.75, 1] + [0.0] * 11)  # D4RL frame, ant at the start cell
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (29,), np.float64)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (8,), np.float32)
        self.goal = self.goal_cells[0].copy()

    def _obs(self):
        qpos, qvel = self.data.qpos[:15].copy(), self.data.qvel[:14].copy()
        qpos[:2] -= self.offset
        return np.concatenate([qpos, qvel])

    def xy(self):
        return self.data.qpos[:2] - self.offset

    def _set_sim(self, qpos, qvel):
        """Simulator state (D4RL frame) -> observation."""
        qpos = np.array(qpos, dtype=np.float64)
        qpos[:2] += self.offset
        qpos[3:7] /= np.linalg.norm(qpos[3:7])  # as mj_forward did in D4RL (3.1.6 still does; newer may not)
        self.data.qpos[:], self.data.qvel[:] = qpos, np.asarray(qvel, np.float64)
        self.data.qacc_warmstart[:] = 0
        mujoco.mj_forward(self.model, self.data)
        return self._obs()

    def reset(self, *, seed=None, options=None):
        self.env.reset(seed=seed)  # seeds np_random, resets the simulator
        rng = self.env.unwrapped.np_random
        # D4RL maze_env.goal_sampler: goal cell + U(0, 1) + U(0, 0.5) per axis, clipped at 0
        cell = self.goal_cells[rng.integers(len(self.goal_cells))]
        self.goal = np.maximum(cell + rng.uniform(0, 1, 2) + rng.uniform(0, 0.5, 2), 0.0)
        if options and "goal" in options:  # D4RL set_target(goal)
            self.goal = np.array(options["goal"], dtype=np.float64)
        # D4RL AntEnv.reset_model: qpos noise U(-0.1, 0.1) on all 15 entries, qvel 0.1 N(0, 1)
        obs = self._set_sim(self.init_qpos + rng.uniform(-0.1, 0.1, 15), 0.1 * rng.standard_normal(14))
        self.model.site_pos[self.env.unwrapped.target_site_id, :2] = self.goal + self.offset  # rendering
        return obs, {"success": False, "goal": self.goal.copy()}

    def step(self, action):
        # D4RL NormalizedBoxEnv in float32: lb + (a + 1) * 0.5 * (ub - lb), clipped to [lb, ub]
        a = np.asarray(action, dtype=np.float32)
        lb, ub = np.float32(-30.0), np.float32(30.0)
        self.ant.do_simulation(np.clip(lb + (a + 1) * np.float32(0.5) * (ub - lb), lb, ub), self.ant.frame_skip)
        success = bool(np.linalg.norm(self.xy() - self.goal) <= GOAL_RADIUS)
        return self._obs(), float(success), success, False, {"success": success, "goal": self.goal.copy()}


def make_antmaze_env(env_id):
    """antmaze-{umaze,umaze-diverse,medium-*,large-*}-v2 -> D4RL-equivalent gymnasium env."""
    maze = env_id.split("-")[1]
    return gym.wrappers.TimeLimit(D4RLAntMaze(maze), max_episode_steps=ANTMAZE_HORIZON[maze])


ADROIT_HORIZON = {"pen": 100, "door": 200, "hammer": 200, "relocate": 200}


class D4RLAdroit(gym.Wrapper):
    """D4RL {pen,door,hammer,relocate}-v1: gymnasium-robotics' physics and observations (identical models),
    reward / done / goal_achieved recomputed with D4RL's formulas (gymnasium-robotics 1.2.1-1.4.2 flips the
    sign of the first distance term of door, hammer, relocate, and pen never terminates)."""

    def __init__(self, task):
        from gymnasium_robotics.envs import adroit_hand

        super().__init__(getattr(adroit_hand, f"AdroitHand{task.capitalize()}Env")())
        self.task = task
        self.model, self.data = self.env.unwrapped.model, self.env.unwrapped.data
        self.body = lambda name: mujoco.mj_name2id(self.model, mujoco.mjtObj.mjOBJ_BODY, name)
        self.site = lambda name: mujoco.mj_name2id(self.model, mujoco.mjtObj.mjOBJ_SITE, name)
        if task == "pen":  # D4RL measures the (rigid) pen lengths once at construction
            mujoco.mj_forward(self.model, self.data)
            u, sx = self.env.unwrapped, self.data.site_xpos
            u.pen_length = np.linalg.norm(sx[self.site("object_top")] - sx[self.site("object_bottom")])
            u.tar_length = np.linalg.norm(sx[self.site("target_top")] - sx[self.site("target_bottom")])

    def reward(self):
        """D4RL's (reward, done, goal_achieved) for the current simulator state."""
        d, sx, norm, task = self.data, self.data.site_xpos, np.linalg.norm, self.task
        if task == "pen":
            u = self.env.unwrapped
            obj, loc = d.xpos[self.body("Object")], sx[self.site("eps_ball")]
            obj_orien = (sx[self.site("object_top")] - sx[self.site("object_bottom")]) / u.pen_length
            tar_orien = (sx[self.site("target_top")] - sx[self.site("target_bottom")]) / u.tar_length
            dist, sim = norm(obj - loc), float(obj_orien @ tar_orien)
            r = -dist + sim + 10.0 * (dist < 0.075 and sim > 0.9) + 50.0 * (dist < 0.075 and sim > 0.95)
            dropped = bool(obj[2] < 0.075)  # pen fell: -5 and episode end
            return r - 5.0 * dropped, dropped, bool(dist < 0.075 and sim > 0.95)
        if task == "door":
            joint = mujoco.mj_name2id(self.model, mujoco.mjtObj.mjOBJ_JOINT, "door_hinge")
            hinge = d.qpos[self.model.jnt_dofadr[joint]]  # D4RL indexes qpos by the dof address (same here)
            r = -0.1 * norm(sx[self.site("S_grasp")] - sx[self.site("S_handle")]) - 0.1 * (hinge - 1.57) ** 2
            r += -1e-5 * np.sum(d.qvel ** 2) + 2.0 * (hinge > 0.2) + 8.0 * (hinge > 1.0) + 10.0 * (hinge > 1.35)
            return r, False, bool(hinge >= 1.35)
        if task == "hammer":
            obj, palm = d.xpos[self.body("Object")], sx[self.site("S_grasp")]
            tool, nail, goal = sx[self.site("tool")], sx[self.site("S_target")], sx[self.site("nail_goal")]
            nd = norm(nail - goal)
            r = -0.1 * norm(palm - obj) - norm(tool - nail) - 10.0 * nd - 1e-2 * norm(d.qvel)
            r += 2.0 * (obj[2] > 0.04 and tool[2] > 0.04) + 25.0 * (nd < 0.02) + 75.0 * (nd < 0.01)
            return r, False, bool(nd < 0.01)
        obj, palm, target = d.xpos[self.body("Object")], sx[self.site("S_grasp")], sx[self.site("target")]
        od = norm(obj - target)
        r = -0.1 * norm(palm - obj)
        if obj[2] > 0.04:  # object lifted
            r += 1.0 - 0.5 * norm(palm - target) - 0.5 * od
        return r + 10.0 * (od < 0.1) + 20.0 * (od < 0.05), False, bool(od < 0.1)

    def step(self, action):
        obs, *_ = self.env.step(np.asarray(action, dtype=np.float32))  # physics + observation only
        r, done, achieved = self.reward()
        return obs, float(r), done, False, {"success": achieved, "goal_achieved": achieved}


def make_adroit_env(env_id):
    """{pen,door,hammer,relocate}-{human,cloned,expert}-v1 -> D4RL-equivalent gymnasium env."""
    task = env_id.split("-")[0]
    return gym.wrappers.TimeLimit(D4RLAdroit(task), max_episode_steps=ADROIT_HORIZON[task])


def make_eval_env(env_id: str) -> gym.Env:
    spec = parse_env_id(env_id)
    if spec["suite"] == "d4rl-locomotion":
        # gymnasium warns that v4 is "out of date": v4 on purpose. It keeps D4RL's rewards and observations; v5 gives
        # Hopper's, Walker2d's and Ant's healthy reward only while healthy, always charges Ant's contact cost and drops
        # a row of Ant's contact forces from the observation
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*is out of date\. You should consider upgrading to version")
            return gym.make(spec["gym_id"], **spec["gym_kwargs"])
    if spec["suite"] == "d4rl-antmaze":
        return make_antmaze_env(env_id)
    if spec["suite"] == "d4rl-adroit":
        return make_adroit_env(env_id)
    import ogbench

    return ogbench.make_env_and_datasets(env_id, env_only=True, **ogbench_env_kwargs())


def episode_score(env_id: str, episode_return: float, success: float) -> float:
    """D4RL normalised score x100, or OGBench success rate in percent."""
    spec = parse_env_id(env_id)
    if "ref_scores" in spec:
        low, high = spec["ref_scores"]
        return 100.0 * (episode_return - low) / (high - low)
    return 100.0 * success


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation: all episodes of one L_test run as a batch of environments, one forward pass per step; plots
# ---------------------------------------------------------------------------------------------------------------------
def evaluate(agent: Agent, envs: List[gym.Env], args: Args, transport_steps: int, seed: int, device) -> Dict:
    generator = torch.Generator(device=device).manual_seed(seed)
    obs = np.stack([env.reset(seed=seed + i)[0] for i, env in enumerate(envs)]).astype(np.float32)
    returns, successes = np.zeros(len(envs)), np.zeros(len(envs))
    running = np.ones(len(envs), bool)
    while running.any():
        idx = np.flatnonzero(running)
        obs_tensor = torch.as_tensor(obs[idx], device=device, dtype=agent.critic.linears[0].weight.dtype)
        actions = act(agent, obs_tensor, transport_steps, generator).cpu().numpy()
        for a, i in zip(actions, idx):
            o, r, terminated, truncated, info = envs[i].step(a)
            obs[i], returns[i] = o, returns[i] + r
            if terminated or truncated:
                running[i], successes[i] = False, float(info.get("success", 0.0))
    scores = np.array([episode_score(args.env_id, r, s) for r, s in zip(returns, successes)])
    return dict(score_mean=float(scores.mean()), score_std=float(scores.std()), return_mean=float(returns.mean()),
                success_rate=float(successes.mean()), episodes=len(envs))


def evaluate_all(agent, envs, args: Args, step: int, device, writer=None, run_dir=None) -> List[Dict]:
    metric = "success_rate_percent" if parse_env_id(args.env_id)["suite"].startswith("ogbench") else \
        "d4rl_normalized_score"
    rows = []
    for L in args.eval_transport_steps:
        start = time.time()
        row = dict(env_id=args.env_id, seed=args.seed, step=step, L_test=L, metric=metric,
                   **evaluate(agent, envs, args, L, seed=args.seed * 1_000_003 + 10_007 * L + 1, device=device))
        row["time_s"] = round(time.time() - start, 3)
        rows.append(row)
        if writer is not None:
            writer.add_scalar(f"eval/score_L{L}", row["score_mean"], step)
            writer.add_scalar(f"eval/score_std_L{L}", row["score_std"], step)
            writer.add_scalar(f"eval/return_L{L}", row["return_mean"], step)
    if run_dir is not None:  # the file rewritten whole (write_file): a full disk leaves the earlier rows intact
        lines = [json.dumps(r) + "\n" for r in read_evaluations(run_dir) + rows]
        write_file(os.path.join(run_dir, "eval.jsonl"), lambda f: f.writelines(lines), "w")
    print(f"\n[eval @ step {step}] {metric} over {rows[0]['episodes']} episodes")
    print("  L_test |   mean |    std | return\n" + "\n".join(
        f"  {r['L_test']:6d} | {r['score_mean']:6.1f} | {r['score_std']:6.1f} | {r['return_mean']:.1f}" for r in rows))
    return rows


def read_evaluations(run_dir: str) -> List[Dict]:
    """The rows of run_dir/eval.jsonl (none if it does not exist yet), each checked to name its update step."""
    eval_path = os.path.join(run_dir, "eval.jsonl")
    if not os.path.isfile(eval_path):
        return []
    try:
        with open(eval_path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        for row in rows:
            int(row["step"])
    except (ValueError, KeyError, TypeError):
        raise VGFError(f"{eval_path} is not a list of evaluations; pass --run-name NEW to continue in a new "
                       "folder") from None
    return rows


def write_plots(run_dir: str):
    """eval_curve.png: score over gradient steps, one line per L_test; test_time_scaling.png: final score vs L_test."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_evaluations(run_dir)
    if not rows:
        return
    label = "success rate (%)" if rows[0]["metric"] == "success_rate_percent" else "D4RL normalised score"
    name = f"{rows[0]['env_id']}, seed {rows[0]['seed']}" if "env_id" in rows[0] else os.path.basename(run_dir)
    fig, ax = plt.subplots(figsize=(7.5, 4))
    for L in sorted({r["L_test"] for r in rows}):
        points = sorted((r["step"], r["score_mean"]) for r in rows if r["L_test"] == L)
        ax.plot(*zip(*points), marker="o", label=f"L_test = {L}")
    ax.set(xlabel="gradient step", ylabel=label, title=name)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)  # beside the axes, never over a line
    fig.tight_layout()
    write_file(os.path.join(run_dir, "eval_curve.png"), lambda f: fig.savefig(f, format="png", dpi=120))
    final = sorted((r for r in rows if r["step"] == rows[-1]["step"]), key=lambda r: r["L_test"])
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.errorbar([r["L_test"] for r in final], [r["score_mean"] for r in final], marker="o", capsize=3,
                yerr=[r["score_std"] / math.sqrt(r["episodes"]) for r in final])  # standard error over episodes
    ax.set_xticks([r["L_test"] for r in final])  # L_test is an integer: a tick at each evaluated value only
    ax.set(xlabel="test-time transport steps L_test", ylabel=label,
           title=f"{name}\ntest-time scaling at step {final[0]['step']}")
    fig.tight_layout()
    write_file(os.path.join(run_dir, "test_time_scaling.png"), lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close("all")


# ---------------------------------------------------------------------------------------------------------------------
# The replay buffer: the whole dataset on the device, with room for the transitions of offline-to-online fine-tuning
# ---------------------------------------------------------------------------------------------------------------------
class ReplayBuffer:
    """Transitions (observations, actions, rewards, next_observations, masks) as tensors on the device, batches drawn
    uniformly with replacement from the rows filled so far (torch's global generator). Online transitions follow the
    dataset; as in the official ReplayBuffer (max(buffer_size, N + 1) rows), once the last row is written they wrap
    around to row 0 and overwrite the oldest rows, offline ones first."""

    def __init__(self, data: Dict[str, np.ndarray], online_steps: int, buffer_size: int, device):
        self.offline_size = len(data["observations"])
        # the official buffer's rows, max(buffer_size, N + 1), but no more than this run can write
        self.capacity = min(max(buffer_size, self.offline_size + 1), self.offline_size + online_steps + 1)
        self.data = {k: torch.zeros((self.capacity, *v.shape[1:]), dtype=torch.float32, device=device)
                     for k, v in data.items()}
        for k, v in data.items():
            self.data[k][:self.offline_size] = torch.as_tensor(v, device=device)
        self.size = self.pointer = self.offline_size  # rows that batches are drawn from; the next row written
        self.added = 0  # online transitions added in all

    def sample(self, batch_size: int) -> Dict[str, torch.Tensor]:
        rows = torch.randint(0, self.size, (batch_size,), device=self.data["rewards"].device)
        return {k: v[rows] for k, v in self.data.items()}

    def add(self, transition: Dict[str, np.ndarray]):
        for k, v in transition.items():
            self.data[k][self.pointer] = torch.as_tensor(v, dtype=torch.float32)
        self.pointer = (self.pointer + 1) % self.capacity
        self.size = max(self.size, self.pointer)  # as the official code: once wrapped, the last row is never drawn
        self.added += 1

    def state_dict(self) -> Dict:
        """The online part, for checkpoints: the rows online transitions were written to (in the order written), their
        contents, and the write position."""
        writes = range(max(0, self.added - self.capacity), self.added)
        rows = torch.tensor([(self.offline_size + i) % self.capacity for i in writes], dtype=torch.long)
        return dict(rows=rows, data={k: v[rows.to(v.device)].cpu() for k, v in self.data.items()},
                    pointer=self.pointer, size=self.size, added=self.added)

    def load_state_dict(self, state: Dict):
        for k, v in self.data.items():
            v[state["rows"].to(v.device)] = state["data"][k].to(v.device)
        self.pointer, self.size, self.added = state["pointer"], state["size"], state["added"]


# ---------------------------------------------------------------------------------------------------------------------
# The run: what main() uses. Start-up (options, run folder, seeding, data, environments, agent, logging), online steps,
# logging, evaluation, checkpoints, and the end of a run: finished, stopped (Ctrl-C, SIGTERM) or failed
# ---------------------------------------------------------------------------------------------------------------------
def start_run(args: Args, explicit: Optional[set] = None) -> "Run":
    """Resolve the options (a checkpoint's, for --resume and --eval-only), check them and the run folder before
    anything is built or written, then build the run."""
    state, path = None, None
    if args.eval_only or args.resume:
        path = args.checkpoint if args.eval_only else args.resume
        if args.eval_only and not path:
            raise VGFError("--eval-only needs --checkpoint PATH")
        state = load_checkpoint(path)
        given = explicit if explicit is not None else \
            {name for name in ("run_name", "output_dir") if getattr(args, name) != getattr(Args(), name)}
        run_name, output_dir = args.run_name, args.output_dir
        args = merge_checkpoint_args(args, state["args"], path, explicit)
        # The folder: where the checkpoint is (never where the checkpoint says it was written), under its own name
        # (--resume: the same folder; --eval-only: a folder beside it), unless --run-name / --output-dir say otherwise
        parent, folder = os.path.split(os.path.dirname(os.path.abspath(path)))
        args.output_dir = output_dir if "output_dir" in given else parent
        if "run_name" in given and run_name:
            args.run_name = run_name
        elif args.eval_only:
            args.run_name = f"{folder}__eval_step{state['step']}"
        else:
            args.run_name = folder
    unset = [name for name in task_defaults(args) if getattr(args, name) is None]
    args = resolve_suite_defaults(args)
    validate(args)
    if unset:  # where they come from: README, "Defaults"
        print(f"{args.env_id} ({parse_env_id(args.env_id)['suite']}) defaults: "
              + ", ".join(f"{name} {getattr(args, name)}" for name in unset))
    if args.resume and state["step"] >= args.total_steps + args.online_steps:
        raise FinishedRun(f"{path} holds a finished run: step {state['step']} of {args.total_steps + args.online_steps}"
                          f" (--total-steps {args.total_steps}, --online-steps {args.online_steps}); nothing to train. "
                          "Pass a larger --total-steps to train on, or evaluate it with --eval-only --checkpoint "
                          f"{path}")
    args.run_name = args.run_name or f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = os.path.join(args.output_dir, args.run_name)
    in_place = args.resume and os.path.abspath(run_dir) == os.path.dirname(os.path.abspath(path))
    check_run_folder(run_dir, state["step"] if in_place else None)
    return Run(args, run_dir, state, path, in_place)


class FinishedRun(Exception):
    """--resume of a run that has no steps left: a note, not an error."""


class Stopped(KeyboardInterrupt):
    """Ctrl-C or SIGTERM: args (message, exit code); 130 for Ctrl-C, 143 for SIGTERM."""


class Run:
    def __init__(self, args: Args, run_dir: str, state: Optional[Dict], checkpoint_path: Optional[str],
                 in_place: bool = False):
        self.args, self.run_dir, self.resumed_from, self.in_place = args, run_dir, checkpoint_path, in_place
        self.last_step = args.total_steps + args.online_steps
        self.start_step = self.step = state["step"] if state else 0  # self.step: the last step fully done
        self.checkpoint_path = os.path.join(run_dir, "checkpoint.pt")
        self.lock, self.writer, self.progress, self.saved_step = None, None, None, None
        self.stop_signal, self.in_step, self.torn = None, False, False

        # TRY NOT TO MODIFY: seeding, device and threads
        self.device = device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
        random.seed(args.seed)
        np.random.seed(args.seed)
        torch.manual_seed(args.seed)
        torch.backends.cudnn.deterministic = args.torch_deterministic
        if device.type == "cuda":  # TF32: JAX's default precision on GPUs; CPU matmuls stay exact float32
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
        if args.threads:
            torch.set_num_threads(args.threads)
        elif device.type == "cpu":
            warning = cpu_threads_warning(os.getloadavg()[0], os.cpu_count() or 1, torch.get_num_threads())
            if warning:
                print(warning)

        if not args.eval_only:  # the dataset first: a missing or bad file is reported before environments are built
            data, self.reward_scale, self.reward_shift = load_dataset(args)
            if args.batch_size > len(data["observations"]):
                raise VGFError(f"--batch-size {args.batch_size} is larger than the dataset "
                               f"({len(data['observations'])} transitions); pass --batch-size "
                               f"{len(data['observations'])} or less")
            self.fingerprint = dataset_fingerprint(args, data, self.reward_scale)
            if state:
                check_same_dataset(state, self.fingerprint, checkpoint_path, args.allow_other_dataset)
        self.eval_envs = [make_eval_env(args.env_id) for _ in range(args.eval_episodes)]
        obs_dim, act_dim = self.eval_envs[0].observation_space.shape[0], self.eval_envs[0].action_space.shape[0]
        self.dims = dict(obs_dim=obs_dim, act_dim=act_dim)
        self.agent = Agent(obs_dim, act_dim, args).to(device)
        if state:
            if state["dims"] != self.dims:
                raise VGFError(f"checkpoint {checkpoint_path} has dimensions {state['dims']}, the environment "
                               f"{self.dims}")
            restore_agent(self.agent, state, checkpoint_path)
        if args.eval_only:
            return
        if data["observations"].shape[1] != obs_dim or data["actions"].shape[1] != act_dim:
            raise VGFError(f"dataset dimensions obs {data['observations'].shape[1]}, act {data['actions'].shape[1]} "
                           f"do not match the environment's obs {obs_dim}, act {act_dim}")
        self.buffer = ReplayBuffer(data, args.online_steps, args.buffer_size, device)
        del data
        print(f"{args.env_id}: {self.buffer.offline_size} transitions, obs {obs_dim}, act {act_dim}, device {device}")
        self.online_env = make_eval_env(args.env_id) if args.online_steps else None
        self.online_obs, self.online_return = None, 0.0
        if state:  # RNG states last, so that sampling continues exactly where the checkpoint left off
            restore_online_transitions(self.buffer, state)
            torch.set_rng_state(state["rng"]["torch"])
            np.random.set_state(state["rng"]["numpy"])
            random.setstate(state["rng"]["python"])
            if state["rng"]["cuda"] is not None and device.type == "cuda":
                torch.cuda.set_rng_state_all(state["rng"]["cuda"])

    # -- start and end: `with start_run(...) as run:` in main ----------------------------------------------------------
    def __enter__(self) -> "Run":
        """Take the run folder (an OS lock: one process per folder), open the logs, and turn SIGTERM (what Slurm sends
        before preemption) into the same clean stop as Ctrl-C."""
        self.lock = lock_run_folder(self.run_dir, self.in_place)
        self.previous_handlers = {sig: signal.signal(sig, self.on_stop_signal)
                                  for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            if not self.args.eval_only:
                self.open_logs()
        except BaseException:  # stopped or failed while opening the logs: the same ending as inside the block
            self.__exit__(*sys.exc_info())
            raise
        return self

    def __exit__(self, kind, error, traceback):
        for sig, handler in self.previous_handlers.items():
            signal.signal(sig, handler)
        try:
            if self.progress is not None:
                self.progress.close()
            if kind is None:
                self.finish()
            elif issubclass(kind, KeyboardInterrupt):
                raise Stopped(self.stopped_message(), 143 if self.stop_signal == signal.SIGTERM else 130) from None
        finally:
            if kind is not None:
                self.close_quietly()
                remove_unfinished_run(self.run_dir)  # a run that left no evaluation and no checkpoint leaves no folder
            self.lock.close()  # releases the OS lock

    def on_stop_signal(self, signum, frame):
        """Ctrl-C or SIGTERM: during a training step the run stops at the end of the step (so that a checkpoint saved
        then is whole); a second signal, or one outside a step (evaluation, start-up), stops at once."""
        first = self.stop_signal is None
        self.stop_signal = signum
        if self.in_step and first:
            print("\nstopping at the end of this step (Ctrl-C again to stop at once)", file=sys.stderr)
            return
        raise Stopped

    @contextlib.contextmanager
    def whole_step(self, step: int):
        """One training step (online step, update, logging): a stop signal during it takes effect at its end, and a
        step left half done (a second signal, an error) is never saved."""
        self.in_step = True
        try:
            yield
        except BaseException:
            self.torn = True
            raise
        finally:
            self.in_step = False
        self.step = step
        if self.stop_signal is not None:
            raise Stopped

    def stopped_message(self) -> str:
        """Stopped by Ctrl-C or SIGTERM: with --save-model the last whole step is saved first (unless saved already)."""
        name = "SIGTERM" if self.stop_signal == signal.SIGTERM else "Ctrl-C"
        if self.args.eval_only:
            return f"stopped by {name} while evaluating {self.resumed_from}; nothing was written"
        if self.args.save_model and not self.torn and self.step > self.start_step and self.saved_step != self.step:
            self.save_checkpoint(self.step)
        if self.saved_step is not None:
            return (f"stopped by {name} at step {self.step}; the checkpoint {self.checkpoint_path} holds step "
                    f"{self.saved_step} (continue with --resume {self.checkpoint_path})")
        hint = "" if self.args.save_model else " (--save-model keeps one)"
        return f"stopped by {name} at step {self.step}; no checkpoint was saved{hint}"

    def close_quietly(self):
        try:
            if self.writer is not None:
                self.writer.close()
        except OSError:
            pass

    # -- logging ------------------------------------------------------------------------------------------------------
    def open_logs(self):
        """Tensorboard (always), wandb (--track) and the progress bar, once the inputs are known good."""
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        args = self.args
        if args.resume:
            print(f"resuming from step {self.start_step} of {self.last_step} ({self.resumed_from}) in {self.run_dir}")
            if self.in_place:
                drop_evaluations_past(self.run_dir, self.start_step)
        if args.track:
            import wandb

            wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                       config=vars(args), name=args.run_name, save_code=True)
        self.writer = SummaryWriter(self.run_dir)
        table = "\n".join(f"|{k}|{v}|" for k, v in vars(args).items())
        self.writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table}")
        if os.path.exists(self.checkpoint_path):
            self.saved_step = self.start_step if self.in_place else load_checkpoint(self.checkpoint_path)["step"]
        self.first_bad_step = torch.tensor(-1, device=self.device)  # first non-finite loss, tracked without host sync
        # the rate and the remaining time count training only: evaluations pause the bar (progress.unpause)
        self.progress = tqdm(total=self.last_step, initial=self.start_step, dynamic_ncols=True, smoothing=0.05)
        self.last_log_time, self.last_log_step, self.timed_from_step = time.time(), self.start_step, None
        if args.compile:
            self.progress.write("compiling the update with torch.compile (about a minute on an idle core, minutes "
                                "under load; --no-compile skips it)")

    def log(self, step: int, metrics: Optional[Dict[str, torch.Tensor]]):
        """Tracks non-finite losses at every update (no host sync); writes the losses to tensorboard and the progress
        bar at the first step, every --log-every steps and at every evaluation; steps per second count updates only."""
        self.progress.update(1)
        if metrics is None:
            return
        finite = torch.isfinite(metrics["losses/critic_loss"]) & torch.isfinite(metrics["losses/bc_flow_loss"])
        self.first_bad_step = torch.where((self.first_bad_step < 0) & ~finite, step, self.first_bad_step)
        first = self.timed_from_step is None
        if first or step % self.args.log_every == 0 or self.is_eval_step(step):
            if self.first_bad_step.item() >= 0:
                self.args.save_model = False  # never overwrite the last good checkpoint with non-finite weights
                kept = f"The last good checkpoint is {self.checkpoint_path}. " \
                    if os.path.exists(self.checkpoint_path) else ""
                raise VGFError(f"non-finite loss at step {self.first_bad_step.item()}; stopped. {kept}"
                               "Try a smaller --transport-step-size or --learning-rate.")
            values = {k: v.item() for k, v in metrics.items()}
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)
            postfix = dict(critic=f"{values['losses/critic_loss']:.3g}", bc=f"{values['losses/bc_flow_loss']:.3g}")
            if not first:
                sps = (step - self.last_log_step) / max(time.time() - self.last_log_time, 1e-9)
                self.writer.add_scalar("charts/SPS", sps, step)
                postfix["sps"] = f"{sps:.1f}"
            self.progress.set_postfix(postfix)
            self.last_log_time, self.last_log_step = time.time(), step
        if first:  # keep the first step (torch.compile's compilation) out of steps per second and the remaining time
            self.timed_from_step = step
            self.progress.reset(total=self.last_step)
            self.progress.initial = self.progress.n = self.progress.last_print_n = step
            self.last_log_time = time.time()

    def is_eval_step(self, step: int) -> bool:
        return step == self.last_step or bool(self.args.eval_every and step % self.args.eval_every == 0)

    # -- online steps, evaluation, checkpoints ------------------------------------------------------------------------
    def online_step(self, step: int):
        """Offline-to-online: one step of the online environment, acting with best-of-N (L = 0); the transition (its
        reward transformed as the dataset's) goes into the replay buffer; finished episodes are logged."""
        args, env = self.args, self.online_env
        if self.online_obs is None:
            self.online_obs, self.online_return = env.reset(seed=args.seed + step)[0], 0.0
        obs = torch.as_tensor(self.online_obs, dtype=torch.float32, device=self.device)[None]
        action = act(self.agent, obs, 0)[0].cpu().numpy()
        next_obs, reward, terminated, truncated, info = env.step(action)
        self.buffer.add(dict(observations=self.online_obs, actions=action,
                             rewards=reward * self.reward_scale + self.reward_shift, next_observations=next_obs,
                             masks=1.0 - float(terminated)))
        self.online_return += reward
        self.online_obs = next_obs
        if terminated or truncated:
            success, online_steps = float(info.get("success", 0.0)), step - args.total_steps
            self.writer.add_scalar("online/episode_return", self.online_return, online_steps)
            self.writer.add_scalar("online/episode_score", episode_score(args.env_id, self.online_return, success),
                                   online_steps)
            self.writer.add_scalar("online/success", success, online_steps)
            self.online_obs = None

    def evaluate(self, step: int):
        evaluate_all(self.agent, self.eval_envs, self.args, step, self.device, self.writer, self.run_dir)
        self.progress.unpause()  # the evaluation's time is not training time (rate, remaining time)
        self.last_log_time = time.time()

    def save_checkpoint(self, step: int):
        if self.args.save_model:
            save_checkpoint(self.checkpoint_path, self.agent, self.args, step, self.dims, self.buffer.state_dict(),
                            self.fingerprint)
            self.saved_step = step
            self.progress.write(f"checkpoint saved to {self.checkpoint_path} (step {step})")
            self.progress.unpause()  # not training time either
            self.last_log_time = time.time()

    def evaluate_checkpoint(self) -> str:
        print(f"evaluating {self.resumed_from} (step {self.start_step}) on {self.args.env_id}")
        evaluate_all(self.agent, self.eval_envs, self.args, self.start_step, self.device, run_dir=self.run_dir)
        write_plots(self.run_dir)
        return self.run_dir

    def finish(self):
        if self.writer is not None:
            self.writer.close()
            write_plots(self.run_dir)
        if self.args.track:
            import wandb

            wandb.finish()


def first_compiled_update(agent: Agent, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Compile `update` (torch.compile; mode "reduce-overhead", i.e. CUDA graphs, with --cudagraphs on CUDA) and run
    it once. If compilation fails (no C++ compiler, for example), the networks, optimisers and random state are
    restored to what they were and the eager update is used from then on."""
    cuda_graphs = agent.args.cudagraphs and agent.critic.linears[0].weight.is_cuda
    agent.compiled_update = torch.compile(update, mode="reduce-overhead" if cuda_graphs else None)
    saved = copy.deepcopy((agent.state_dict(), [opt.state_dict() for opt in agent.opts]))
    rng = torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        return agent.compiled_update(agent, batch)
    except Exception as e:
        print(f"warning: --compile failed ({type(e).__name__}: {' '.join(str(e).split())[:200]}); continuing with "
              "the eager update")
        agent.load_state_dict(saved[0])
        for opt, opt_state in zip(agent.opts, saved[1]):
            opt.load_state_dict(opt_state)
        torch.set_rng_state(rng[0])
        if rng[1] is not None:
            torch.cuda.set_rng_state_all(rng[1])
        agent.compiled_update, agent.compile_failed = None, True
        return update(agent, batch)


def restore_online_transitions(buffer: ReplayBuffer, state: Dict):
    if state.get("replay_buffer"):
        buffer.load_state_dict(state["replay_buffer"])
    elif state.get("online_transitions"):  # checkpoints written before the buffer wrapped around: rows after the data
        rows = state["online_transitions"]
        for i in range(len(rows["rewards"])):
            buffer.add({k: v[i] for k, v in rows.items()})


# ---------------------------------------------------------------------------------------------------------------------
# Run folders: one run per folder, nothing half-written
# ---------------------------------------------------------------------------------------------------------------------
RUN_FILES = ("eval.jsonl", "checkpoint.pt")  # a folder with either holds a run (results worth keeping)
LOCK_FILE = ".lock"


def is_leftover(name: str) -> bool:
    """Files a run writes before its first evaluation or checkpoint: its lock, tensorboard events, temporary files."""
    return name == LOCK_FILE or name.startswith("events.out.tfevents.") or name.endswith(".tmp")


def check_run_folder(run_dir: str, continues_step: Optional[int] = None):
    """Two runs never share a folder (their eval.jsonl and events would merge into one curve): a folder in use by a
    running process, or holding a run's results or other files, is refused. --resume continues in place
    (continues_step: the checkpoint's step). The folder's nearest existing parent must be a writable folder."""
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise VGFError(f"the run folder {run_dir} is a file; pass another --run-name or --output-dir")
    if os.path.isdir(run_dir):
        holder = run_folder_holder(run_dir)
        if holder is not None:
            raise VGFError(f"the run folder {run_dir} is in use by another run ({holder}); wait for it to finish or "
                           "pass another --run-name")
        files = [name for name in os.listdir(run_dir) if not is_leftover(name)]
        if files and continues_step is None:
            what = "a run" if set(files) & set(RUN_FILES) else f"other files ({', '.join(sorted(files)[:3])})"
            raise VGFError(f"{run_dir} already holds {what}; pass another --run-name (or --output-dir), or delete it "
                           f"(--resume PATH continues a run in the folder of PATH)")
        if continues_step is not None:
            read_evaluations(run_dir)
    folder = os.path.abspath(run_dir)
    while not os.path.isdir(folder):
        if os.path.exists(folder):
            raise VGFError(f"--output-dir: {folder} is a file, not a folder; pass a folder")
        folder = os.path.dirname(folder)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise VGFError(f"--output-dir: cannot write into {folder} (permission denied); pass a writable --output-dir")


def run_folder_holder(run_dir: str) -> Optional[str]:
    """'process PID' when a running process holds run_dir's lock (None when free: a crashed run's lock is free)."""
    path = os.path.join(run_dir, LOCK_FILE)
    if not os.path.exists(path):
        return None
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            return f"process {f.read().strip() or 'unknown'}"
        fcntl.flock(f, fcntl.LOCK_UN)
    return None


def lock_run_folder(run_dir: str, continues: bool):
    """Create run_dir if needed and hold an exclusive OS lock on run_dir/.lock for as long as the run lives (the OS
    releases it when the process ends, even by a crash). A fresh run first removes what an earlier run that never
    evaluated nor saved left there (its events, its lock)."""
    created = not os.path.isdir(run_dir)
    try:
        os.makedirs(run_dir, exist_ok=True)
        lock = open(os.path.join(run_dir, LOCK_FILE), "a+")
    except OSError as e:
        if created and os.path.isdir(run_dir) and not os.listdir(run_dir):
            os.rmdir(run_dir)
        raise_write_error(e, run_dir)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        lock.close()
        raise VGFError(f"the run folder {run_dir} is in use by another run (process {holder}); wait for it to finish "
                       "or pass another --run-name") from None
    if not continues:
        for name in os.listdir(run_dir):
            if name != LOCK_FILE and is_leftover(name):
                os.remove(os.path.join(run_dir, name))
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


def remove_unfinished_run(run_dir: str):
    """After a failure or a stop: a folder with no evaluation and no checkpoint is removed (its events and lock), so
    that the same --run-name starts afresh next time."""
    if not os.path.isdir(run_dir) or any(os.path.exists(os.path.join(run_dir, name)) for name in RUN_FILES):
        return
    for name in os.listdir(run_dir):
        if is_leftover(name):
            os.remove(os.path.join(run_dir, name))
    if not os.listdir(run_dir):
        os.rmdir(run_dir)


def raise_write_error(error: OSError, path: str):
    """A failed write as one error line: a full disk (ENOSPC) named as such, other errors with their reason."""
    if error.errno == errno.ENOSPC:
        raise VGFError(f"no space left on the device while writing {path}; free some space or pass another "
                       "--output-dir") from None
    raise VGFError(f"cannot write {path} ({error.strerror or error}); pass another --output-dir") from None


def write_file(path: str, write: Callable, mode: str = "wb"):
    """Write path through a temporary file that replaces it once complete: a failure (full disk, Ctrl-C) leaves the
    previous file intact and no partial file behind."""
    temporary = path + ".tmp"
    try:
        with open(temporary, mode) as f:
            write(f)
        os.replace(temporary, path)
    except BaseException as e:
        if os.path.exists(temporary):
            os.remove(temporary)
        if isinstance(e, OSError):
            raise_write_error(e, path)
        raise


def drop_evaluations_past(run_dir: str, step: int):
    """A run stopped between an evaluation and its checkpoint (e.g. a preempted job) resumes from the previous
    checkpoint: the evaluations of the lost updates are dropped and repeated, so the curve has no duplicates."""
    rows = read_evaluations(run_dir)
    kept = [row for row in rows if row["step"] <= step]
    if len(kept) < len(rows):
        write_file(os.path.join(run_dir, "eval.jsonl"), lambda f: f.writelines(json.dumps(row) + "\n" for row in kept),
                   "w")
        print(f"note: dropped {len(rows) - len(kept)} evaluation rows past the checkpoint's step {step} from "
              f"{run_dir}/eval.jsonl (they are repeated as training continues)")


def cpu_threads_warning(load: float, cores: int, threads: int) -> Optional[str]:
    """PyTorch starts one thread per core; when other programs keep the cores busy, its threads wait on each other
    and a step can be tens of times slower."""
    if threads > 1 and load + threads > cores + 0.5:
        return (f"warning: the CPU is busy (load {load:.1f} on {cores} cores) and PyTorch uses {threads} threads, "
                "which can make each step many times slower; run with OMP_NUM_THREADS=1 or --threads 1")
    return None


def out_of_memory_message(error: BaseException) -> Optional[str]:
    """An allocation that cannot be served (CUDA, CPU or NumPy) as one line with the size asked and what to lower;
    None for other errors."""
    text = " ".join(str(error).split())
    if not (isinstance(error, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in text):
        return None
    asked = re.search(r"(?:allocate|allocating) ([\d.]+) ?(bytes|[KMGT]iB)", text)
    size = ""
    if asked:
        amount = float(asked.group(1)) * {"bytes": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30,
                                          "TiB": 2**40}[asked.group(2)]
        size = f" (an allocation of {amount / 2**30:.2f} GiB failed)"
    return (f"out of memory{size}: pass a smaller --batch-size or --num-particles (the transport holds batch x "
            "particles actions and batch x particles^2 kernel entries), or a smaller --eval-episodes")


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints: everything needed to resume bit for bit or to evaluate, checked when read
# ---------------------------------------------------------------------------------------------------------------------
CHECKPOINT_FORMAT = "vgf_offline/1"


def save_checkpoint(path: str, agent: Agent, args: Args, step: int, dims: Dict, replay_buffer: Optional[Dict] = None,
                    dataset: Optional[Dict] = None):
    """Options, step, networks, optimisers, the online part of the replay buffer, the dataset's fingerprint and the
    random states; written whole or not at all (write_file)."""
    state = dict(format=CHECKPOINT_FORMAT, args=asdict(args), step=step, dims=dims, replay_buffer=replay_buffer,
                 dataset=dataset, nets=[net.state_dict() for net in agent.nets],
                 opts=[opt.state_dict() for opt in agent.opts], target_critic=agent.target_critic.state_dict(),
                 rng=dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate(),
                          cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None))
    write_file(path, lambda f: torch.save(state, f))


def dataset_fingerprint(args: Args, data: Dict[str, np.ndarray], reward_scale: float) -> Dict:
    """What identifies the training data: the env id, the number of transitions, the reward scale and a hash of 1,000
    evenly spaced rows of every array (after preprocessing)."""
    import hashlib

    rows = np.linspace(0, len(data["observations"]) - 1, min(1000, len(data["observations"]))).astype(np.int64)
    digest = hashlib.sha256()
    for key in sorted(data):
        digest.update(key.encode() + np.ascontiguousarray(data[key][rows], dtype=np.float32).tobytes())
    return dict(env_id=args.env_id, transitions=len(data["observations"]), reward_scale=float(reward_scale),
                sha256_of_sampled_rows=digest.hexdigest())


def check_same_dataset(state: Dict, fingerprint: Dict, path: str, allowed: bool):
    """--resume on other data than the checkpoint was trained on is refused, unless --allow-other-dataset."""
    saved = state.get("dataset")
    if saved is None or saved == fingerprint:  # checkpoints written before fingerprints: nothing to compare
        return
    differs = ", ".join(f"{key} {saved.get(key)} -> {value}" for key, value in fingerprint.items()
                        if saved.get(key) != value and key != "sha256_of_sampled_rows") or "other rows, same size"
    if allowed:
        print(f"warning: checkpoint {path} was trained on other data than this run loads ({differs}); continuing "
              "(--allow-other-dataset)")
        return
    raise VGFError(f"checkpoint {path} was trained on other data than this run loads ({differs}); pass the dataset "
                   "it was trained on (--dataset-dir), or --allow-other-dataset to continue on this one")


def load_checkpoint(path: str) -> Dict:
    """A checkpoint written by save_checkpoint, refused with the reason when it is not one, is damaged, holds
    non-finite weights or a negative step."""
    if os.path.isdir(path):
        inside = os.path.join(path, "checkpoint.pt")
        hint = f"pass {inside}" if os.path.isfile(inside) else "pass the checkpoint.pt file (--save-model writes one)"
        raise VGFError(f"checkpoint {path} is a folder, not a checkpoint file; {hint}")
    if not os.path.isfile(path):
        raise VGFError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise VGFError(f"{path} is not a readable checkpoint ({' '.join(str(e).split())[:200]})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise VGFError(f"{path} is not a vgf_offline.py checkpoint (expected format '{CHECKPOINT_FORMAT}')")
    if not isinstance(state.get("step"), int) or state["step"] < 0:
        raise VGFError(f"checkpoint {path} is damaged: its step is {state.get('step')!r}, not a count of updates")
    for net_index, net in enumerate([state.get("target_critic", {}), *state.get("nets", [])]):
        for name, tensor in net.items():
            if torch.is_tensor(tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise VGFError(f"checkpoint {path} holds non-finite weights ({name}); it cannot be trained on or "
                               "evaluated: use an earlier checkpoint")
    return state


STRUCTURAL_FIELDS = ("env_id", "hidden_dims", "amortised")  # a checkpoint cannot be loaded if these differ


def merge_checkpoint_args(cli: Args, saved: Dict, path: str, explicit: Optional[set] = None) -> Args:
    """Fields given on the command line (explicit; default: those set away from their defaults) win, except
    structural ones, which must match."""
    if explicit is None:
        defaults = Args()
        explicit = {name for name, value in asdict(cli).items() if value != getattr(defaults, name)}
    for name in STRUCTURAL_FIELDS:
        if name in explicit and getattr(cli, name) != saved[name]:
            raise VGFError(f"checkpoint {path} is incompatible: it was trained with --{name.replace('_', '-')} "
                           f"{saved[name]}, but {getattr(cli, name)} was given")
    saved = dict(saved)
    if "kernel_grad_through_bandwidth" in saved:  # checkpoints written before the option was renamed
        saved["fixed_bandwidth"] = not saved.pop("kernel_grad_through_bandwidth")
    if saved.pop("cpu_onednn_matmul", False):  # the former default, reduced precision on some CPUs
        print(f"note: checkpoint {path} was trained with bf16 CPU matmuls; this run uses exact float32 unless "
              "--cpu-bf16-matmul is given")
    known = {f.name for f in fields(Args)}
    unknown = sorted(set(saved) - known)
    if unknown:
        print(f"warning: checkpoint {path} has options this version does not know, ignored: {unknown}")
    saved = {k: v for k, v in saved.items() if k in known}
    merged = Args(**saved)
    for name in explicit & set(saved):
        setattr(merged, name, getattr(cli, name))
    return merged


def restore_agent(agent: Agent, state: Dict, path: str):
    """Networks and optimisers from a checkpoint; the learning rate is this run's (--learning-rate), not the one saved
    in the optimiser's state."""
    try:
        agent.target_critic.load_state_dict(state["target_critic"])
        for module, saved in zip(agent.nets + agent.opts, state["nets"] + state["opts"], strict=True):
            module.load_state_dict(saved)
    except (RuntimeError, KeyError, ValueError) as e:
        raise VGFError(f"checkpoint {path} does not fit this configuration: {e}") from None
    for opt in agent.opts:
        for group in opt.param_groups:
            group["lr"] = agent.args.learning_rate


if __name__ == "__main__":
    try:
        main(tyro.cli(Args), given_options(sys.argv[1:]))
    except FinishedRun as note:
        print(note)
    except VGFError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:  # one line, no traceback; 130 for Ctrl-C, 143 for SIGTERM
        print(f"\n{e.args[0] if e.args else 'interrupted'}", file=sys.stderr)
        sys.exit(e.args[1] if len(e.args) > 1 else 130)
    except OSError as e:  # a write that no check could foresee (the disk filled up during tensorboard's writes)
        if e.errno != errno.ENOSPC:
            raise
        print(f"error: no space left on the device while writing {e.filename or 'the run folder'}", file=sys.stderr)
        sys.exit(2)
    except (RuntimeError, MemoryError) as e:
        message = out_of_memory_message(e)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
