"""Transport of vgf_llm.py on a tiny random Qwen2 base model: every mode moves text up a known reward, L = 0 is
best-of-N, lengths change, the kernel's repulsion keeps particles apart, the prompt KV cache changes nothing."""

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import vgf_llm  # noqa: E402

VOCAB, EOS, TARGET = 40, 1, 7
MODES = [("embed", {}), ("topk", {})]


def tiny_lm():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    return Qwen2ForCausalLM(cfg).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def setup():
    """Base model, 2 left-padded prompts, N = 4 sampled responses each (T = 6 + stop token), cached closures."""
    lm = tiny_lm()
    embed = lm.get_input_embeddings()
    p_ids, p_mask = vgf_llm.pad([[3, 4, 5, 6, 8], [9, 10]], 0, left=True)
    n, B = 4, 2
    pr_ids, pr_mask = p_ids.repeat_interleave(n, 0), p_mask.repeat_interleave(n, 0)
    torch.manual_seed(1)
    gen = vgf_llm.sample_responses(lm, pr_ids, pr_mask, 6, 1.0, torch.tensor([EOS]))
    gen = torch.where(gen == EOS, 2, gen)  # lengths change only through the transport
    full_ids, full_mask = vgf_llm.truncate_at_eos(gen, torch.tensor([EOS]), 0, EOS)
    gen[::2, 3] = EOS  # every other response ends early: room to grow within the 7 positions
    ref_ids, r_mask = vgf_llm.truncate_at_eos(gen, torch.tensor([EOS]), 0, EOS)
    allowed = torch.ones(VOCAB, dtype=torch.bool)
    allowed[0] = False  # padding is never proposed
    cache = vgf_llm.prompt_cache(lm, embed, p_ids, p_mask)
    return dict(lm=lm, embed=embed, p_ids=p_ids, p_mask=p_mask, n=n, B=B, ref_ids=ref_ids, r_mask=r_mask,
                allowed=allowed, cache=cache, full=(full_ids, full_mask))


def live_mask(ids):
    is_eos = ids == EOS
    return ((is_eos.cumsum(1) - is_eos.long()) == 0).long()


def closures(s, per_token):
    """reward_fn / logprob_fn as vgf_llm.py builds them; R = sum over live positions of per_token(embedding)."""
    table = s["embed"].weight

    def reward_fn(ids, emb, grad):
        e = (table[ids] if emb is None else emb).detach().float().requires_grad_(grad)
        with torch.enable_grad():
            r = (per_token(e) * live_mask(ids)).sum(1)
        return (r.detach(), torch.autograd.grad(r.sum(), e)[0]) if grad else r.detach()

    def logprob_fn(ids, emb, top_k, grad):
        prow = torch.arange(len(ids)) // (len(ids) // s["B"])
        pi, pm, m = s["p_ids"][prow], s["p_mask"][prow], live_mask(ids)
        lp, cand, cand_lp = vgf_llm.token_logprobs(s["lm"], s["embed"], pi, pm, ids, m, s["allowed"], 64, top_k,
                                                   s["cache"], prow)
        return lp, cand, cand_lp, None

    return reward_fn, logprob_fn


def wants(token, s, scale=1.0):
    """A reward with one optimum: every live position wants `token` (per-token score in [scale - ..., scale])."""
    target = s["embed"].weight[token].float()
    return lambda e: scale - (e - target).pow(2).sum(-1) / target.pow(2).sum()


def args_for(mode, **kw):
    base = dict(transport=mode, top_k=10, alpha=0.1, lm_coef=0.0, num_proposals=4,
                step_size=0.25)
    return vgf_llm.Args(**{**base, **kw})


def run(s, args, reward, steps, variable_length=True, full=False, **kw):
    reward_fn, logprob_fn = closures(s, reward)
    eos = dict(eos_ids=torch.tensor([EOS]), eos_id=EOS) if variable_length else {}
    ref_ids, r_mask = s["full"] if full else (s["ref_ids"], s["r_mask"])
    movable = r_mask.bool() & (ref_ids != EOS)
    return vgf_llm.transport(ref_ids, r_mask, movable, s["n"], steps, reward_fn, logprob_fn, s["embed"].weight,
                             s["allowed"], args, **eos, **kw)


@pytest.mark.parametrize("mode,extra", MODES)
def test_each_mode_moves_text_up_a_reward_that_wants_a_token(setup, mode, extra):
    snaps = run(setup, args_for(mode, **extra), wants(TARGET, setup), [0, 2, 6], variable_length=False)
    r0, r2, r6 = (snaps[L][1].mean().item() for L in (0, 2, 6))
    assert r2 > r0 and r6 > r2, (mode, extra, r0, r2, r6)  # the decoded reward rises over steps
    assert (snaps[6][0] == TARGET).sum() > (snaps[0][0] == TARGET).sum()
    assert torch.equal(snaps[6][4], setup["r_mask"])  # fixed length: masks stay


@pytest.mark.parametrize("mode,extra", MODES)
def test_zero_steps_is_best_of_n_exactly(setup, mode, extra):
    trace = []
    snaps = run(setup, args_for(mode, **extra), wants(TARGET, setup), [0, 3], trace=trace)
    assert torch.equal(snaps[0][0], setup["ref_ids"]) and torch.equal(snaps[0][4], setup["r_mask"])
    best, ids, R, nll, mask = vgf_llm.select(snaps[0], setup["n"])
    r = snaps[0][1].view(setup["B"], setup["n"])
    assert torch.equal(ids, setup["ref_ids"].view(setup["B"], setup["n"], -1)[torch.arange(setup["B"]), r.argmax(1)])
    assert torch.equal(R, r.max(1).values)
    assert len(trace) == 4 and all(torch.equal(a, b) for a, b in zip(trace[3], snaps[3]) if isinstance(a, torch.Tensor))


@pytest.mark.parametrize("mode,extra", MODES)
def test_lengths_change_through_the_stop_token(setup, mode, extra):
    """A reward that wants the stop token shortens responses in every mode; one that wants more of a token makes
    them grow by one token per step at most."""
    args = args_for(mode, top_k=VOCAB - 1, **extra, step_size=1.0)
    ref_len = setup["r_mask"].sum(1)
    short = run(setup, args, wants(EOS, setup), [0, 4])
    assert (short[4][4].sum(1) <= ref_len).all() and short[4][4].sum(1).float().mean() < ref_len.float().mean()
    # shortened: still exactly one stop token, at the end of each live part
    ids, mask = short[4][0], short[4][4].bool()
    assert ((ids == EOS) & mask).sum(1).eq(1).all() and (ids[torch.arange(len(ids)), mask.sum(1) - 1] == EOS).all()
    grow = run(setup, args, wants(TARGET, setup, scale=4.0), [0, 2])
    assert grow[2][4].sum(1).float().mean() > ref_len.float().mean(), mode
    assert (grow[2][4].sum(1) <= ref_len + 2).all() and (grow[2][0][grow[2][4].bool()] == EOS).sum() == len(ids)


@pytest.mark.parametrize("mode", ["embed"])
def test_kernel_repulsion_keeps_particles_apart(setup, mode, monkeypatch):
    """One optimum (every position wants the same token): without the kernel's repulsion the particles of a prompt
    collapse onto fewer texts than with it."""
    def distinct(snap):
        ids = snap[0].view(setup["B"], setup["n"], -1)
        return sum(len({tuple(x.tolist()) for x in p}) for p in ids)

    args = args_for(mode, alpha=10.0, step_size=1.0, top_k=VOCAB - 1)
    with_rep = distinct(run(setup, args, wants(TARGET, setup), [8], variable_length=False, full=True)[8])
    plain = vgf_llm.svgd_direction
    monkeypatch.setattr(vgf_llm, "svgd_direction", lambda x, score: plain(x, score) - plain(x, torch.zeros_like(score)))
    without = distinct(run(setup, args, wants(TARGET, setup), [8], variable_length=False, full=True)[8])
    assert with_rep >= without + 2, (with_rep, without)


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_kv_cached_reward_and_logprobs_equal_uncached(setup, pooling):
    from transformers import Qwen2Model

    torch.manual_seed(2)
    rm = vgf_llm.RewardModel(Qwen2Model(setup["lm"].config), pooling).eval().requires_grad_(False)
    rm_embed = rm.backbone.get_input_embeddings()
    p_ids, p_mask, n = setup["p_ids"], setup["p_mask"], setup["n"]
    r_ids = torch.randint(2, VOCAB, (2 * n, 5))
    r_mask = torch.ones_like(r_ids)
    r_mask[1, 2:], r_mask[6, 4:] = 0, 0
    prow = torch.arange(2 * n) // n
    e = rm_embed(r_ids).detach() + 0.1 * torch.randn(2 * n, 5, 32)  # continuous particles, off the token table
    rm_cache = vgf_llm.prompt_cache(rm.backbone, rm_embed, p_ids, p_mask)
    kept = [(k.clone(), v.clone()) for k, v in rm_cache["kv"]]
    plain = vgf_llm.rewards(rm, rm_embed, p_ids[prow], p_mask[prow], r_ids, r_mask, 3, r_emb=e, grad=True)
    for _ in range(2):  # twice: the stored cache is never written to
        cached = vgf_llm.rewards(rm, rm_embed, p_ids[prow], p_mask[prow], r_ids, r_mask, 3, r_emb=e, grad=True,
                                 cache=rm_cache, rows=prow)
        assert torch.allclose(plain[0], cached[0], atol=1e-5) and torch.allclose(plain[1], cached[1], atol=1e-5)
    assert all(torch.equal(k, k2) and torch.equal(v, v2) for (k, v), (k2, v2) in zip(rm_cache["kv"], kept))
    lm, embed = setup["lm"], setup["embed"]
    args = (lm, embed, p_ids[prow], p_mask[prow], r_ids, r_mask, setup["allowed"], 6)
    a = vgf_llm.response_logprobs(*args)
    b = vgf_llm.response_logprobs(*args, cache=setup["cache"], rows=prow)
    assert torch.equal(a[1], b[1])  # the same top-k candidates
    for x, y in ((a[0], b[0]), (a[2], b[2])):
        assert torch.allclose(x, y, atol=1e-5), (x - y).abs().max()
