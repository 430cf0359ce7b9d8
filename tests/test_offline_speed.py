"""Speed options keep results equivalent: the update through torch.compile (CPU) and replayed as CUDA graphs (CUDA
only), each against the plain eager update. TF32 is timed by tests/bench_offline.py on a GPU. The CPU matmuls are exact
float32."""
import os
import subprocess
import sys

import pytest
import torch

import vgf_offline as vgf


def matmul_relative_error(product=lambda a, b: a @ b):
    """Relative error of a float32 256x512 @ 512x512 product against float64, under the current matmul settings."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(256, 512, generator=gen), torch.randn(512, 512, generator=gen)
    exact = a.double() @ b.double()
    return (product(a, b).double() - exact).norm().item() / exact.norm().item()


def test_default_cpu_matmul_is_exact_float32(tmp_path):
    """A default run leaves every float32 CPU matmul exact float32, whatever the CPU (fails if a reduced-precision
    mode, e.g. oneDNN's bf16 mode on CPUs with AVX512-BF16, became a default)."""
    args = vgf.resolve_suite_defaults(vgf.Args(hidden_dims=[32], num_particles=2, bc_flow_steps=1, batch_size=4,
                                               compile=False, eval_only=True))
    vgf.Run(args, str(tmp_path / "run"), None, None)  # start-up: seeding, device, precision settings
    assert torch.backends.mkldnn.matmul.fp32_precision in ("none", "ieee")
    assert torch.get_float32_matmul_precision() == "highest"
    assert matmul_relative_error() < 1e-5
    with torch.no_grad():
        assert matmul_relative_error(lambda a, b: torch.nn.functional.linear(a, b.t())) < 1e-5


SMALL = dict(hidden_dims=[32, 32], num_particles=5, bc_flow_steps=4, batch_size=16, train_transport_steps=2)


def run_updates(mode, amortised, steps=5, device="cpu"):
    """Losses (every update) and all parameters (with the target critic's) after `steps` updates of the small
    config (obs 6, act 3): mode "eager" (Agent.update without options), "compile" (--compile) or "cudagraphs"
    (--compile --cudagraphs, CUDA only)."""
    torch.manual_seed(0)
    args = vgf.resolve_suite_defaults(vgf.Args(amortised=amortised, compile=mode != "eager",
                                               cudagraphs=mode == "cudagraphs", tf32=False, **SMALL))
    agent = vgf.Agent(6, 3, args).to(device)
    gen = torch.Generator().manual_seed(1)
    data = {"observations": torch.randn(64, 6, generator=gen), "actions": torch.rand(64, 3, generator=gen) * 2 - 1,
            "rewards": torch.randn(64, generator=gen), "next_observations": torch.randn(64, 6, generator=gen),
            "masks": (torch.rand(64, generator=gen) > 0.1).float()}
    data = {k: v.to(device) for k, v in data.items()}
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, 64, (16,), device=device)
        metrics = agent.update({k: v[idx] for k, v in data.items()})
        losses.append(torch.stack([metrics[k] for k in sorted(metrics)]))
    return (torch.stack(losses).cpu() if losses else None), flat(agent), agent


def assert_same_run(reference, other, initial):
    """float32, 5 updates: the paths differ only in the order of rounding (inductor's fused kernels, Adam's bias
    corrections from float32 step counts), measured at <= 7e-7 relative on the losses (4e-7 absolute on a TD-target mean near zero) and
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
def test_compiled_update_matches_the_eager_update(amortised):
    torch._dynamo.reset()
    torch._inductor.config.fallback_random = True  # inductor draws random numbers as eager does
    try:
        compiled = run_updates("compile", amortised)
    finally:
        torch._inductor.config.fallback_random = False
        torch._dynamo.reset()
    assert compiled[2].compiled_update is not None and not compiled[2].compile_failed, "it did not run compiled"
    assert_same_run(run_updates("eager", amortised), compiled, run_updates("eager", amortised, steps=0))
    # the optimiser state stays torch.optim.Adam's: it saves and loads into an eager agent (checkpoints, --resume)
    fresh = run_updates("eager", amortised, steps=0)[2]
    for saved, new in zip(compiled[2].opts, fresh.opts):
        new.load_state_dict(saved.state_dict())
    assert all(float(s["step"]) == 5.0 for opt in fresh.opts for s in opt.state.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("amortised", [False, True])
def test_cuda_graphs_match_the_eager_update(amortised):
    eager = run_updates("eager", amortised, device="cuda")
    torch._dynamo.reset()
    torch._inductor.config.fallback_random = True  # inductor draws random numbers as eager does
    try:  # a replayed CUDA graph draws the random numbers eager draws from the same generator state
        captured = run_updates("cudagraphs", amortised, device="cuda")
    finally:
        torch._inductor.config.fallback_random = False
        torch._dynamo.reset()
    assert captured[2].compiled_update is not None and not captured[2].compile_failed
    assert_same_run(eager, captured, run_updates("eager", amortised, steps=0, device="cuda"))


def test_benchmark_script_runs_in_ci_size(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "bench_offline.py"), "--quick",
                           "--devices", "cpu", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json

    results = json.loads(out.read_text())
    assert [r["option"] for r in results] == ["eager"]
    assert all(r["updates_per_s"] > 0 and r["gflops_per_update"] > 0 and r["peak_memory_mb"] > 0 for r in results)


def test_a_failing_compilation_falls_back_to_eager(capsys, monkeypatch):
    """A compilation that fails (no C++ compiler, for example) after the first graph ran leaves nothing half-updated:
    the networks and optimisers are restored, then the eager update runs; the result equals a plain eager update."""
    def fresh_agent():
        torch.manual_seed(0)
        args = vgf.resolve_suite_defaults(vgf.Args(hidden_dims=[8], num_particles=2, bc_flow_steps=1, batch_size=4,
                                                   compile=True))
        return vgf.Agent(3, 2, args)

    def half_done_then_broken(agent, batch):  # as a compilation failing after the critic's Adam step
        vgf.update(agent, batch)
        raise RuntimeError("no C++ compiler")

    batch = {"observations": torch.randn(4, 3), "actions": torch.rand(4, 2) * 2 - 1, "rewards": torch.randn(4),
             "next_observations": torch.randn(4, 3), "masks": torch.ones(4)}
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: half_done_then_broken)
    agent = fresh_agent()
    rng = torch.get_rng_state()
    metrics = agent.update(batch)
    assert torch.isfinite(metrics["losses/critic_loss"]) and agent.compile_failed
    assert "warning: --compile failed (RuntimeError: no C++ compiler); continuing with the eager update" in \
        capsys.readouterr().out
    reference = fresh_agent()
    reference.args.compile = False
    torch.set_rng_state(rng)
    reference.update(batch)
    assert all(torch.equal(a, b) for a, b in zip(agent.state_dict().values(), reference.state_dict().values()))
    assert torch.equal(agent.opts[0].state_dict()["state"][0]["step"], torch.tensor(1.0))  # one Adam step, not two
