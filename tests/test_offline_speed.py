"""Speed options keep results equivalent (CPU): fused Adam and torch.compile against the plain eager update.
TF32 and CUDA graphs act on CUDA only and are checked by tests/bench_offline.py on a GPU."""
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


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="this CPU has no AVX512-BF16")
def test_onednn_matmul_matches_plain_float32():
    plain_losses, plain_params = run_updates(steps=5, hidden=256, cpu_onednn_matmul=False)
    fast_losses, fast_params = run_updates(steps=5, hidden=256, cpu_onednn_matmul=True)
    initial_params = run_updates(steps=0, hidden=256)[1]
    assert torch.allclose(plain_losses, fast_losses, rtol=1e-5)
    # the weights' change differs by a rounding-sized fraction (Adam amplifies rounding where gradients are ~0)
    change = (plain_params - initial_params).norm()
    assert (plain_params - fast_params).norm() < 1e-3 * change


def test_compiled_update_matches_the_eager_update():
    torch._dynamo.reset()
    torch._inductor.config.fallback_random = True  # inductor draws random numbers as eager does
    try:
        eager_losses, eager_params = run_updates(steps=3, fused_adam=False)
        compiled_losses, compiled_params = run_updates(steps=3, fused_adam=False, compile=True)
    finally:
        torch._inductor.config.fallback_random = False
        torch._dynamo.reset()
    assert torch.allclose(eager_losses, compiled_losses, rtol=1e-4)
    assert torch.allclose(eager_params, compiled_params, atol=1e-5)


def test_benchmark_script_runs_in_ci_size(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "bench_offline.py"), "--quick",
                           "--devices", "cpu", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json

    results = json.loads(out.read_text())
    assert [r["option"] for r in results] == ["eager", "eager+fused+onednn"]
    assert all(r["updates_per_s"] > 0 and r["gflops_per_update"] > 0 and r["peak_memory_mb"] > 0 for r in results)


def test_a_failing_compilation_falls_back_to_eager(capsys):
    torch.manual_seed(0)
    args = vgf.resolve_suite_defaults(vgf.Args(hidden_dims=[8], num_particles=2, bc_flow_steps=1, batch_size=4,
                                               compile=True))
    agent = vgf.Agent(3, 2, args)

    def broken(*a, **k):
        raise RuntimeError("no C++ compiler")

    agent.td_target = broken
    batch = {"observations": torch.randn(4, 3), "actions": torch.rand(4, 2) * 2 - 1, "rewards": torch.randn(4),
             "next_observations": torch.randn(4, 3), "masks": torch.ones(4)}
    metrics = agent.update(batch)
    assert torch.isfinite(metrics["losses/critic_loss"]) and agent.td_target is vgf.td_target
    assert "torch.compile failed (RuntimeError: no C++ compiler)" in capsys.readouterr().out
