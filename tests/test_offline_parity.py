"""Parity with the official VGF code (github.com/ryanxhr/vgf at 3ec8f9b, JAX/flax) on golden arrays it produced.

tests/data/official_parity.npz was written by tests/make_official_parity.py, which ran the official agents
(agents/vgf.py, agents/a_vgf.py) in float64 on a small configuration and recorded their initial weights, every random
draw, the batches and the results. Here the same weights and noise go into our networks: in float64 every quantity
must agree to 1e-12 (only the order of floating-point operations differs: measured <= 3e-15; torch's
clip_grad_norm_, which divides by |g| + 1e-6, is already off by 7e-11 after five amortised updates), in float32 the
losses and the weights after five updates to 1e-5 of the official float64 values (measured <= 1e-6).
Regenerate the data with: python tests/make_official_parity.py /path/to/vgf-checkout (needs JAX; see that file).
"""
import json
import os

import numpy as np
import pytest
import torch

import vgf_offline as vgf

DATA = os.path.join(os.path.dirname(__file__), "data", "official_parity.npz")
TOL64, TOL32 = 1e-12, 1e-5


@pytest.fixture(scope="module")
def gold():
    with np.load(DATA) as f:
        return {k: f[k] for k in f.files}


def make_agent(gold, name, dtype=torch.float64, n=None, **overrides):
    """Our agent with the official configuration and the official initial weights of agent `name`."""
    c = json.loads(str(gold["config"]))
    args = vgf.Args(hidden_dims=list(c["hidden"]), batch_size=c["batch_size"], learning_rate=c["lr"],
                    num_particles=n or c["particles"], bc_flow_steps=c["bc_flow_steps"],
                    train_transport_steps=c["train_vgf_steps"], transport_step_size=c["vgf_lr"], alpha=c["vgf_alpha"],
                    discount=c["discount"], tau=c["tau"], target_q_agg=c["train_q_agg"],
                    amortised=name == "avgf", compile=False, cuda=False)
    for key, value in overrides.items():
        setattr(args, key, value)
    agent = vgf.Agent(c["obs_dim"], c["action_dim"], args).to(dtype)
    for ours, theirs in zip(our_params(agent), official_params(gold, f"{name}/init", agent)):
        with torch.no_grad():
            ours.copy_(torch.as_tensor(theirs).reshape(ours.shape))
    return agent, args


def our_params(agent):
    """Our parameters in the order of official_params."""
    out = []
    for net in [agent.critic, agent.target_critic] + ([agent.score_net] if agent.score_net is not None else []):
        for i, linear in enumerate(net.linears):
            out += [linear.weight, linear.bias]
            if i < len(net.norm_weights):
                out += [net.norm_weights[i], net.norm_biases[i]]
    linears = [m for m in agent.flow.net if isinstance(m, torch.nn.Linear)]
    for linear in linears:
        out += [linear.weight, linear.bias]
    return out


def official_params(gold, prefix, agent):
    """The official parameters in our layouts: flax Dense kernels are [in, out] (ensemble axis first), torch Linear
    weights [out, in]; our ensemble biases and LayerNorm parameters carry a broadcast axis [E, 1, d]."""
    out = []
    nets = [("critic", "value_net"), ("target_critic", "value_net")]
    nets += [("q_grad", "mlp")] * (agent.score_net is not None)
    for net, module in nets:
        layers = len(agent.args.hidden_dims) + 1
        for i in range(layers):
            p = f"{prefix}/{net}/{module}"
            out += [gold[f"{p}/Dense_{i}/kernel"], gold[f"{p}/Dense_{i}/bias"]]
            if i < layers - 1:
                out += [gold[f"{p}/LayerNorm_{i}/scale"], gold[f"{p}/LayerNorm_{i}/bias"]]
    for i in range(len(agent.args.hidden_dims) + 1):
        out += [gold[f"{prefix}/actor_bc/mlp/Dense_{i}/kernel"].T, gold[f"{prefix}/actor_bc/mlp/Dense_{i}/bias"]]
    return out


def batch_of(gold, name, k, dtype=torch.float64):
    """Batch k of agent `name` with the noise the official update k drew."""
    batch = {key: torch.as_tensor(gold[f"{name}/batch{k}/{key}"], dtype=dtype)
             for key in ("observations", "actions", "rewards", "next_observations", "masks")}
    for key in ("target_x0", "flow_x0", "flow_t"):
        batch[key] = torch.as_tensor(gold[f"{name}/update{k}/{key}"], dtype=dtype)
    return batch


def max_err(ours, theirs):
    ours = torch.as_tensor(ours).detach().to(torch.float64)
    return float((ours - torch.as_tensor(theirs).reshape(ours.shape)).abs().max())


def step_quantities(agent, args, batch):
    """Reference samples, transported particles, TD target and the losses from the agent's current weights."""
    b, n = batch["rewards"].shape[0], args.num_particles
    next_obs = batch["next_observations"]
    reference = vgf.sample_reference(agent.flow, next_obs.repeat_interleave(n, 0), args.bc_flow_steps,
                                     noise=batch["target_x0"]).view(b, n, -1)
    if args.amortised:
        particles = vgf.amortised_transport(agent.score_net, next_obs, reference, args.train_transport_steps,
                                            args.transport_step_size, per_state_clip=False)
    else:
        particles = vgf.transport(lambda o, x: agent.critic(o, x).mean(0), next_obs, reference,
                                  args.train_transport_steps, args.transport_step_size, args.alpha,
                                  args.fixed_bandwidth)
    target = vgf.td_target(agent.critic, agent.target_critic, agent.flow, batch, args, agent.score_net)
    with torch.no_grad():
        out = dict(reference=reference, particles=particles, td_target=target,
                   critic_loss=vgf.critic_loss_fn(agent.critic, target, batch),
                   bc_loss=vgf.flow_matching_loss(agent.flow, batch))
        if args.amortised:
            out["score_loss"] = vgf.score_matching_loss(agent.score_net, agent.critic, batch)
    return out


@pytest.mark.parametrize("name", ["vgf", "avgf"])
def test_float64_matches_the_official_update_and_acting(gold, name):
    agent, args = make_agent(gold, name)
    errors = {}
    # acting at L_test = 0..3 from the initial weights with the official noise
    obs = torch.as_tensor(gold[f"{name}/act/observations"])
    for steps in range(4):
        actions = vgf.act(agent.flow, agent.critic, obs, args, steps, score_net=agent.score_net,
                          noise=torch.as_tensor(gold[f"{name}/act/x0"]))
        errors[f"act L={steps}"] = max_err(actions, gold[f"{name}/act/L{steps}"])
    # five updates; before each, every intermediate quantity from the same weights and noise
    for k in range(1, 6):
        batch = batch_of(gold, name, k)
        for key, value in step_quantities(agent, args, batch).items():
            errors[f"{key} ({k})"] = max_err(value, gold[f"{name}/update{k}/{key}"])
        agent.update(batch)
        if k in (1, 5):
            errors[f"params after {k}"] = max(max_err(ours, theirs) for ours, theirs in zip(
                our_params(agent), official_params(gold, f"{name}/after{k}", agent)))
    print(name, {key: f"{e:.1e}" for key, e in errors.items()})
    assert max(errors.values()) < TOL64, errors
    assert all(key in errors for key in ("params after 1", "params after 5", "act L=3"))


def test_float64_matches_the_official_td_target_at_ten_particles(gold):
    agent, args = make_agent(gold, "vgf_n10", n=10)
    batch = batch_of(gold, "vgf_n10", 1)
    out = step_quantities(agent, args, batch)
    for key in ("reference", "particles", "td_target", "critic_loss", "bc_loss"):
        assert max_err(out[key], gold[f"vgf_n10/update1/{key}"]) < TOL64, key
    agent.update(batch)
    assert max(max_err(ours, theirs) for ours, theirs in zip(
        our_params(agent), official_params(gold, "vgf_n10/after1", agent))) < TOL64


def float32_updates(gold, name, **overrides):
    """Five float32 updates through Agent.update: max abs error of the losses and of the weights after them
    against the official float64 values, and the weights."""
    agent, args = make_agent(gold, name, dtype=torch.float32, **overrides)
    loss_err = 0.0
    for k in range(1, 6):
        metrics = agent.update(batch_of(gold, name, k, torch.float32))
        loss_err = max(loss_err, abs(metrics["losses/critic_loss"].item() - gold[f"{name}/update{k}/critic_loss"]),
                       abs(metrics["losses/bc_flow_loss"].item() - gold[f"{name}/update{k}/bc_loss"]))
        if args.amortised:
            loss_err = max(loss_err, abs(metrics["losses/score_loss"].item() - gold[f"{name}/update{k}/score_loss"]))
    params = [p.detach().clone() for p in our_params(agent)]
    param_err = max(max_err(ours, theirs)
                    for ours, theirs in zip(params, official_params(gold, f"{name}/after5", agent)))
    return loss_err, param_err, params


@pytest.mark.parametrize("name", ["vgf", "avgf"])
def test_float32_matches_the_official_float64_update(gold, name):
    loss_err, param_err, _ = float32_updates(gold, name)
    assert loss_err < TOL32 and param_err < TOL32, (loss_err, param_err)


def test_compiled_float32_update_matches_eager_and_the_official_update(gold, capsys):
    """--compile (torch.compile of the whole update): about 3 minutes of compilation on a busy 2-core CPU with a cold
    inductor cache (20 s with a warm one), the rest < 10 s."""
    torch._dynamo.reset()
    try:
        loss_err, param_err, compiled = float32_updates(gold, "vgf", compile=True)
    finally:
        torch._dynamo.reset()
    assert "compile failed" not in capsys.readouterr().out  # it really ran compiled
    _, _, eager = float32_updates(gold, "vgf")
    assert loss_err < TOL32 and param_err < TOL32, (loss_err, param_err)
    # compiled and eager differ by the order of float32 operations only: each of the 5 Adam steps (lr 3e-4) moves a
    # weight by ~lr, so rounding-level differences stay far below 1e-6 (measured 3e-8)
    assert max(float((a - b).abs().max()) for a, b in zip(compiled, eager)) < 1e-6


def test_fixed_bandwidth_differs_from_the_official_repulsion(gold):
    """The textbook SVGD (bandwidth held fixed) moves the particles differently: the parity test can fail."""
    agent, args = make_agent(gold, "vgf", fixed_bandwidth=True)
    out = step_quantities(agent, args, batch_of(gold, "vgf", 1))
    assert max_err(out["particles"], gold["vgf/update1/particles"]) > 1e-2  # measured 0.4
    assert max_err(out["reference"], gold["vgf/update1/reference"]) < TOL64  # same samples before the transport
