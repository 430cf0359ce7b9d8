"""Speed options keep results equivalent: fused Adam, the whole update as one function, compiled
(CPU) and captured as a CUDA graph (CUDA only), each against the plain eager update. TF32 is timed by
tests/bench_offline.py on a GPU. The default CPU matmul is exact float32; --cpu-bf16-matmul is reduced precision."""
import os
import subprocess
import sys

import pytest
import torch

import vgf_offline as vgf


def run_updates(steps=4, hidden=16, **speed):
    speed.setdefault("compile", False)
    torch.manual_seed(0)
    args = vgf.resolve_suite_defaults(vgf.Args(hidden_dims=[hidden, hidden], num_particles=4, bc_flow_steps=3,
                                               batch_size=16, train_transport_steps=2, **speed))
    vgf.set_matmul_precision(args)
    agent = vgf.Agent(5, 2, args)
    gen = torch.Generator().manual_seed(1)
    data = {"observations": torch.randn(64, 5, generator=gen), "actions": torch.rand(64, 2, generator=gen) * 2 - 1,
            "rewards": torch.randn(64, generator=gen), "next_observations": torch.randn(64, 5, generator=gen),
            "masks": torch.ones(64)}
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, 64, (16,))
        metrics = agent.update({k: v[idx] for k, v in data.items()})
        losses.append([metrics["losses/critic_loss"].item(), metrics["losses/bc_flow_loss"].item()])
    torch.backends.mkldnn.matmul.fp32_precision = "none"
    return torch.tensor(losses), torch.cat([p.flatten() for p in agent.critic.parameters()])


def test_fused_adam_matches_the_plain_update():
    plain_losses, plain_params = run_updates(fused_adam=False)
    fused_losses, fused_params = run_updates(fused_adam=True)
    assert torch.allclose(plain_losses, fused_losses, rtol=1e-5)
    assert torch.allclose(plain_params, fused_params, atol=1e-6)
    assert not torch.equal(plain_params, run_updates(steps=5, fused_adam=False)[1])  # the updates do move weights


def matmul_relative_error(product=lambda a, b: a @ b):
    """Relative error of a float32 256x512 @ 512x512 product against float64, under the current matmul settings."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(256, 512, generator=gen), torch.randn(512, 512, generator=gen)
    exact = a.double() @ b.double()
    return (product(a, b).double() - exact).norm().item() / exact.norm().item()


def onednn_product(a, b):  # the update's no-gradient matmuls (oneDNN on CPU)
    with torch.no_grad():
        return vgf.linear_nograd(a, b.t())


def test_default_cpu_matmul_is_exact_float32():
    """Default options: every float32 CPU matmul is exact float32, whatever the CPU (fails if a reduced-precision mode
    became a default)."""
    args = vgf.resolve_suite_defaults(vgf.Args())
    assert not args.cpu_bf16_matmul  # holds on CPUs without AVX512-BF16 too, where the mode could not act
    vgf.set_matmul_precision(args)
    try:
        assert torch.backends.mkldnn.matmul.fp32_precision in ("none", "ieee")
        assert matmul_relative_error() < 1e-5
        assert matmul_relative_error(onednn_product) < 1e-5
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = "none"
    # a default update equals the update with the exact setting pinned explicitly, bit for bit
    default_losses, default_params = run_updates(steps=3, hidden=256)
    pinned_losses, pinned_params = run_updates(steps=3, hidden=256, cpu_bf16_matmul=False)
    assert torch.equal(default_losses, pinned_losses) and torch.equal(default_params, pinned_params)


@pytest.mark.skipif(not vgf.cpu_bf16_supported(), reason="this CPU has no AVX512-BF16")
def test_cpu_bf16_matmul_is_reduced_precision_and_reports_its_error():
    """--cpu-bf16-matmul is opt-in reduced precision: its error depends on the CPU (plain bfloat16 on Intel Xeon, about
    float32 on AMD EPYC). The test measures and prints it; it only asserts that training stays finite and close."""
    vgf.set_matmul_precision(vgf.resolve_suite_defaults(vgf.Args(cpu_bf16_matmul=True)))
    try:
        assert torch.backends.mkldnn.matmul.fp32_precision == "bf16"
        error = matmul_relative_error()
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = "none"
    exact_losses, _ = run_updates(steps=5, hidden=256)
    bf16_losses, _ = run_updates(steps=5, hidden=256, cpu_bf16_matmul=True)
    loss_error = ((bf16_losses - exact_losses).abs() / exact_losses.abs()).max().item()
    print(f"--cpu-bf16-matmul on this CPU: matmul relative error {error:.1e}, critic/flow losses {loss_error:.1e} "
          "relative after 5 updates")
    assert torch.isfinite(bf16_losses).all() and error < 1e-2 and loss_error < 5e-2


SMALL = dict(hidden_dims=[32, 32], num_particles=5, bc_flow_steps=4, batch_size=16, train_transport_steps=2,
             fused_adam=False)


def whole_vs_eager(mode, amortised, steps=5, device="cpu"):
    """Losses (every update) and all parameters (with the target critic's) after `steps` updates of the small
    config (obs 6, act 3): mode "eager" (Agent.update without options), "whole" (whole_update, not compiled),
    "compile" (--compile), "cudagraphs" (--cudagraphs --no-compile) or "compile+cudagraphs"."""
    torch.manual_seed(0)
    args = vgf.resolve_suite_defaults(vgf.Args(amortised=amortised, compile=mode.startswith("compile"),
                                               cudagraphs=mode.endswith("cudagraphs"), tf32=False, **SMALL))
    agent = vgf.Agent(6, 3, args).to(device)
    update = agent.update
    if mode == "whole":
        agent.prepare_optimisers()
        update = lambda batch: vgf.whole_update(agent, batch, agent.adam_states())
    gen = torch.Generator().manual_seed(1)
    data = {"observations": torch.randn(64, 6, generator=gen), "actions": torch.rand(64, 3, generator=gen) * 2 - 1,
            "rewards": torch.randn(64, generator=gen), "next_observations": torch.randn(64, 6, generator=gen),
            "masks": (torch.rand(64, generator=gen) > 0.1).float()}
    data = {k: v.to(device) for k, v in data.items()}
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, 64, (16,), device=device)
        metrics = update({k: v[idx] for k, v in data.items()})
        losses.append(torch.stack([metrics[k] for k in sorted(metrics)]))
    return (torch.stack(losses).cpu() if losses else None), flat(agent), agent


def assert_same_run(reference, other, initial):
    """float32, 5 updates: the paths differ only in the order of rounding (inductor's fused kernels, Adam's algebra
    written out), measured at <= 7e-7 relative on the losses (4e-7 absolute on a TD-target mean near zero) and
    <= 2e-4 relative on each network's change of weights. Tolerances of 1e-5 relative + 1e-6 absolute (losses) and
    1e-3 (weight changes) leave margin, and still fail for a wrong update: a Polyak step taken after Adam, a skipped
    clip or a different random draw changes the losses by more than 1e-3 relative."""
    (ref_losses, ref_params, ref_agent), (losses, params, agent) = reference, other
    assert torch.allclose(ref_losses, losses, rtol=1e-5, atol=1e-6)
    for name, start in initial[2].named_children():
        ref_change = flat(getattr(ref_agent, name)) - flat(start)
        change = flat(getattr(agent, name)) - flat(start)
        assert ref_change.norm() > 0 and (change - ref_change).norm() < 1e-3 * ref_change.norm(), name


def flat(module):
    return torch.cat([p.detach().flatten().cpu() for p in module.parameters()])


@pytest.mark.parametrize("amortised", [False, True])
def test_whole_update_function_matches_the_eager_update(amortised):
    initial, eager, whole = [whole_vs_eager(mode, amortised, steps) for mode, steps in
                             [("eager", 0), ("eager", 5), ("whole", 5)]]
    assert_same_run(eager, whole, initial)
    # the optimiser state stays torch.optim.Adam's: it saves and loads into an eager agent (checkpoints, --resume)
    fresh = initial[2]
    for saved, new in zip(whole[2].opts, fresh.opts):
        new.load_state_dict(saved.state_dict())
    assert all(torch.equal(s["step"], torch.tensor(5.0)) for opt in fresh.opts for s in opt.state.values())
    whole[2].opts[0].load_state_dict(whole[2].opts[0].state_dict())  # new state tensors: prepared (re-captured) again
    assert not whole[2]._prepared


@pytest.mark.parametrize("amortised", [False, True])
def test_compiled_whole_update_matches_the_eager_update(amortised):
    torch._dynamo.reset()
    torch._inductor.config.fallback_random = True  # inductor draws random numbers as eager does
    try:
        compiled = whole_vs_eager("compile", amortised)
    finally:
        torch._inductor.config.fallback_random = False
        torch._dynamo.reset()
    assert compiled[2].whole_update is not None, "compilation failed and the update fell back to eager"
    assert_same_run(whole_vs_eager("eager", amortised), compiled, whole_vs_eager("eager", amortised, steps=0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("amortised,compiled", [(False, False), (True, False), (False, True)])
def test_captured_cuda_graph_matches_the_eager_update(amortised, compiled):
    eager = whole_vs_eager("eager", amortised, device="cuda")
    torch._dynamo.reset()
    torch._inductor.config.fallback_random = compiled  # inductor draws random numbers as eager does
    try:  # a replayed CUDA graph draws the random numbers eager draws from the same generator state
        captured = whole_vs_eager("compile+cudagraphs" if compiled else "cudagraphs", amortised, device="cuda")
    finally:
        torch._inductor.config.fallback_random = False
        torch._dynamo.reset()
    assert captured[2].graph is not None, "the update was not captured"
    assert_same_run(eager, captured, whole_vs_eager("eager", amortised, steps=0, device="cuda"))


def test_benchmark_script_runs_in_ci_size(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "bench_offline.py"), "--quick",
                           "--devices", "cpu", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json

    results = json.loads(out.read_text())
    assert [r["option"] for r in results] == ["eager", "eager+fused"]
    assert all(r["updates_per_s"] > 0 and r["gflops_per_update"] > 0 and r["peak_memory_mb"] > 0 for r in results)


def test_a_failing_compilation_falls_back_to_eager(capsys):
    torch.manual_seed(0)
    args = vgf.resolve_suite_defaults(vgf.Args(hidden_dims=[8], num_particles=2, bc_flow_steps=1, batch_size=4,
                                               compile=True))
    agent = vgf.Agent(3, 2, args)

    def broken(*a, **k):
        raise RuntimeError("no C++ compiler")

    agent.whole_update = broken
    batch = {"observations": torch.randn(4, 3), "actions": torch.rand(4, 2) * 2 - 1, "rewards": torch.randn(4),
             "next_observations": torch.randn(4, 3), "masks": torch.ones(4)}
    metrics = agent.update(batch)
    assert torch.isfinite(metrics["losses/critic_loss"]) and agent.whole_update is None
    assert "warning: --compile failed (RuntimeError: no C++ compiler); continuing with the eager update" in \
        capsys.readouterr().out
