"""Transport of vgf_llm.py on a tiny random Qwen2 base model: every mode moves text up a known reward, L = 0 is
best-of-N, lengths change, the kernel's repulsion keeps particles apart, and the prompts' KV caches (reward, mu's
token scores, mu's suffix sampler) give what a full pass over the whole sequence gives."""

import os
import sys
from dataclasses import asdict

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import vgf_llm  # noqa: E402

VOCAB, PAD, EOS, TARGET = 40, 0, 1, 7
MODES = ["embed", "topk", "mh"]
STOP_IDS = torch.tensor([EOS])


def tiny_lm():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    return Qwen2ForCausalLM(cfg).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def setup():
    """Base model, 2 left-padded prompts, N = 4 sampled responses each (6 new tokens: W = 7), the prompts' cache."""
    lm = tiny_lm()
    p_ids, p_mask = vgf_llm.pad([[3, 4, 5, 6, 8], [9, 10]], PAD, left=True)
    n, B = 4, 2
    pr_ids, pr_mask = p_ids.repeat_interleave(n, 0), p_mask.repeat_interleave(n, 0)
    torch.manual_seed(1)
    gen, _ = vgf_llm.sample_responses(lm, pr_ids, pr_mask, 6, 1.0, STOP_IDS)
    gen = torch.where(gen == EOS, 2, gen)  # lengths change only through the transport
    gen[::2, 3] = EOS  # every other response ends early: room to grow within the 7 columns
    ref_ids, live = vgf_llm.close_responses(gen, STOP_IDS, PAD, EOS, vgf_llm.response_width(6))
    allowed = torch.ones(VOCAB, dtype=torch.bool)
    allowed[PAD] = False  # padding is never proposed
    cache = vgf_llm.prompt_cache(lm, p_ids, p_mask)
    return dict(lm=lm, p_ids=p_ids, p_mask=p_mask, n=n, B=B, ref_ids=ref_ids, live=live, allowed=allowed, cache=cache)


def models_for(s, per_token):
    """TransportModels as vgf_llm.py builds them, with R = sum over live positions of per_token(embedding)."""
    table = s["lm"].get_input_embeddings().weight

    def prompt_of(ids):
        return torch.arange(len(ids)) // (len(ids) // s["B"])

    def reward(ids, embeddings=None, with_gradient=False):
        e = (table[ids] if embeddings is None else embeddings).detach().float().requires_grad_(with_gradient)
        with torch.enable_grad():
            r = (per_token(e) * vgf_llm.through_first_stop(ids, STOP_IDS)).sum(1)
        return (r.detach(), torch.autograd.grad(r.sum(), e)[0]) if with_gradient else r.detach()

    def token_scores(ids, top_k=0):
        live = vgf_llm.through_first_stop(ids, STOP_IDS).long()
        return vgf_llm.response_token_scores(s["lm"], s["cache"], prompt_of(ids), ids, live, s["allowed"], top_k, 64)

    def resample_suffix(ids, positions, tokens, excluded):
        new_ids, ends, _, _ = vgf_llm.resample_suffixes(s["lm"], s["cache"], prompt_of(ids), ids, positions, tokens,
                                                        excluded, STOP_IDS, EOS, PAD, 64)
        return new_ids, ends

    return vgf_llm.TransportModels(reward, token_scores, resample_suffix, table.float(), s["allowed"], STOP_IDS, EOS,
                                   vgf_llm.ComputeTally(), spacing=None)


def wants(token, s, scale=1.0):
    """A reward with one optimum: every live position wants `token` (per-token score at most `scale`)."""
    target = s["lm"].get_input_embeddings().weight[token].float()
    return lambda e: scale - (e - target).pow(2).sum(-1) / target.pow(2).sum()


def args_for(mode, steps, **kw):
    base = dict(transport=mode, top_k=10, alpha=0.1, lm_coef=0.0, num_proposals=4, step_size=0.25, num_particles=4,
                transport_steps=steps)
    return vgf_llm.Args(**{**base, **kw})


def run(s, args, reward, trace=None, seed=0):
    torch.manual_seed(seed)
    return vgf_llm.transport(s["ref_ids"], s["live"], models_for(s, reward), args, trace)


@pytest.mark.parametrize("mode", MODES)
def test_each_mode_moves_text_up_a_reward_that_wants_a_token(setup, mode):
    record = run(setup, args_for(mode, [0, 2, 6]), wants(TARGET, setup))
    r0, r2, r6 = (record.at[L].reward.mean().item() for L in (0, 2, 6))
    assert r2 > r0 and r6 > r0, (mode, r0, r2, r6)  # the decoded reward rises
    if mode != "mh":  # the searches never step down (a sampler may rest)
        assert r6 > r2, (mode, r2, r6)
    count = lambda snap: ((snap.ids == TARGET) & snap.live.bool()).sum()
    assert count(record.at[6]) > count(record.at[0])


@pytest.mark.parametrize("mode", MODES)
def test_zero_steps_is_best_of_n_exactly(setup, mode):
    trace = []
    record = run(setup, args_for(mode, [0, 3]), wants(TARGET, setup), trace=trace)
    start = record.at[0]
    assert torch.equal(start.ids, setup["ref_ids"]) and torch.equal(start.live, setup["live"])
    selected = vgf_llm.select(start, setup["n"])
    r = start.reward.view(setup["B"], setup["n"])
    first = setup["ref_ids"].view(setup["B"], setup["n"], -1)[torch.arange(setup["B"]), r.argmax(1)]
    assert torch.equal(selected.ids, first) and torch.equal(selected.reward, r.max(1).values)
    assert len(trace) == 4 and torch.equal(trace[3].ids, record.at[3].ids)


@pytest.mark.parametrize("mode", MODES)
def test_lengths_change_through_the_stop_token(setup, mode):
    """A reward that wants the stop token shortens responses in every mode; one that wants more of a token makes
    them longer. Every response keeps exactly one stop token, at the end of its live part, within W columns."""
    args = args_for(mode, [0, 4], top_k=VOCAB - 1, step_size=1.0)
    start_length = setup["live"].sum(1).float()
    short = run(setup, args, wants(EOS, setup)).at[4]
    assert short.live.sum(1).float().mean() < start_length.mean()
    grow = run(setup, args_for(mode, [0, 2], top_k=VOCAB - 1, step_size=1.0), wants(TARGET, setup, scale=4.0)).at[2]
    assert grow.live.sum(1).float().mean() > start_length.mean(), mode
    for snap in (short, grow):
        ends = snap.live.sum(1) - 1
        assert ((snap.ids == EOS) & snap.live.bool()).sum(1).eq(1).all()
        assert (snap.ids[torch.arange(len(ends)), ends] == EOS).all()
    if mode != "mh":  # one token per step at most (mh resamples whole suffixes)
        assert (grow.live.sum(1) <= setup["live"].sum(1) + 2).all()


def test_kernel_repulsion_keeps_particles_apart(setup, monkeypatch):
    """One optimum (every position wants the same token): without the kernel's repulsion the particles of a prompt
    collapse onto fewer texts than with it."""
    def distinct(snapshot):
        ids = torch.where(snapshot.live.bool(), snapshot.ids, -1).view(setup["B"], setup["n"], -1)
        return sum(len({tuple(x.tolist()) for x in p}) for p in ids)

    args = args_for("embed", [8], alpha=10.0, step_size=1.0, top_k=VOCAB - 1)
    with_repulsion = distinct(run(setup, args, wants(TARGET, setup)).at[8])
    plain = vgf_llm.svgd_direction
    monkeypatch.setattr(vgf_llm, "svgd_direction", lambda x, score: plain(x, score) - plain(x, torch.zeros_like(score)))
    without = distinct(run(setup, args, wants(TARGET, setup)).at[8])
    assert with_repulsion >= without + 2, (with_repulsion, without)


def full_logits(lm, prompt, response):
    """Logits of one unpadded [prompt; response] sequence, without any cache."""
    ids = torch.tensor([prompt + response])
    return lm(input_ids=ids).logits[0].float()


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_kv_cached_reward_and_token_scores_equal_full_passes(setup, pooling):
    from transformers import Qwen2Model

    torch.manual_seed(2)
    rm = vgf_llm.RewardModel(Qwen2Model(setup["lm"].config), pooling).eval().requires_grad_(False)
    rm_embed = rm.backbone.get_input_embeddings()
    p_ids, p_mask, n = setup["p_ids"], setup["p_mask"], setup["n"]
    r_ids = torch.randint(2, VOCAB, (2 * n, 5))
    live = torch.ones_like(r_ids)
    live[1, 2:], live[6, 4:] = 0, 0
    prompt_of = torch.arange(2 * n) // n
    e = rm_embed(r_ids).detach() + 0.1 * torch.randn(2 * n, 5, 32)  # continuous particles, off the token table
    rm_cache = vgf_llm.prompt_cache(rm.backbone, p_ids, p_mask)
    kept = [(k.clone(), v.clone()) for k, v in rm_cache.layers]
    inputs = torch.cat([rm_embed(p_ids[prompt_of]), e], 1).requires_grad_(False)
    e_full = e.clone().requires_grad_(True)
    full = rm(torch.cat([rm_embed(p_ids[prompt_of]), e_full], 1), torch.cat([p_mask[prompt_of], live], 1), 5)
    full_gradient = torch.autograd.grad(full.sum(), e_full)[0]
    for _ in range(2):  # twice: the stored cache is never written to
        cached, gradient = vgf_llm.response_rewards(rm, rm_cache, prompt_of, e, live, 3, with_gradient=True)
        assert torch.allclose(full, cached, atol=1e-5) and torch.allclose(full_gradient, gradient, atol=1e-5)
    assert all(torch.equal(k, k2) and torch.equal(v, v2) for (k, v), (k2, v2) in zip(rm_cache.layers, kept))
    assert inputs.shape[1] == p_ids.shape[1] + 5
    scores = vgf_llm.response_token_scores(setup["lm"], setup["cache"], prompt_of, r_ids, live, setup["allowed"], 6, 3)
    for row in range(2 * n):
        prompt = p_ids[prompt_of[row]][p_mask[prompt_of[row]].bool()].tolist()
        length = int(live[row].sum())
        logits = full_logits(setup["lm"], prompt, r_ids[row, :length].tolist())[len(prompt) - 1 :]
        logp_all = logits.log_softmax(-1)
        expected = logp_all[torch.arange(length), r_ids[row, :length]]
        assert torch.allclose(scores.logp[row, :length], expected, atol=1e-5)
        allowed_logits = logits.masked_fill(~setup["allowed"], -torch.inf)
        assert torch.equal(scores.candidates[row, :length], allowed_logits.topk(6, -1).indices[:length])
        outside = logp_all.scatter(-1, scores.candidates[row, :length], -torch.inf).logsumexp(-1)[:length]
        assert torch.allclose(scores.outside_logmass[row, :length], outside, atol=1e-5)
        total = torch.logaddexp(scores.candidate_logp[row, :length].logsumexp(-1), outside)
        assert torch.allclose(total, torch.zeros(length), atol=1e-5)  # candidates and the rest: all of mu


def test_suffix_resampling_over_the_prompt_cache_equals_full_passes(setup, monkeypatch):
    """With draws made greedy, the cached suffix sampler (prompt from the cache, y_<t run once, padded prefixes
    masked) gives, row by row, what greedy decoding over the whole unpadded sequence gives: the given token or the
    best token outside the excluded ones at t, then mu's continuation to a stop token or the last sampled column."""
    monkeypatch.setattr(torch, "multinomial", lambda probs, n: probs.argmax(-1, keepdim=True))
    lm, ids, B, n = setup["lm"], setup["ref_ids"], setup["B"], setup["n"]
    prompt_of = torch.arange(len(ids)) // n
    positions = torch.tensor([0, 1, 2, 3, 0, 5, 3, 2])
    tokens = torch.tensor([vgf_llm.OUTSIDE, 12, vgf_llm.OUTSIDE, EOS, 20, vgf_llm.OUTSIDE, 9, 30])
    excluded = torch.randint(2, VOCAB, (len(ids), 3), generator=torch.Generator().manual_seed(4))
    new_ids, ends, prefix_forwards, sampling_forwards = vgf_llm.resample_suffixes(
        lm, setup["cache"], prompt_of, ids, positions, tokens, excluded, STOP_IDS, EOS, PAD, 3)
    width = ids.shape[1]
    for row in range(len(ids)):
        prompt = setup["p_ids"][prompt_of[row]][setup["p_mask"][prompt_of[row]].bool()].tolist()
        t = int(positions[row])
        response = ids[row, :t].tolist()
        for column in range(t, vgf_llm.last_sampled_column(width) + 1):
            logits = full_logits(lm, prompt, response)[-1]
            if column == t and tokens[row] != vgf_llm.OUTSIDE:
                token = int(tokens[row])
            elif column == t:
                token = int(logits.scatter(0, excluded[row], -torch.inf).argmax())
            else:
                token = int(logits.argmax())
            response.append(token)
            if token == EOS:
                break
        if response[-1] != EOS:
            response.append(EOS)  # the forced stop
        assert new_ids[row, : len(response)].tolist() == response, row
        assert int(ends[row]) == len(response) - 1 and (new_ids[row, len(response) :] == PAD).all()
        assert tokens[row] != vgf_llm.OUTSIDE or int(new_ids[row, t]) not in excluded[row].tolist()
    micro_batches = [positions[i : i + 3] for i in range(0, len(ids), 3)]
    assert prefix_forwards == sum(len(t) * int(t.max()) for t in micro_batches)  # y_<t, padded per micro-batch
    assert sampling_forwards > 0


def test_compute_is_counted_by_named_terms(setup):
    """The program's model calls (transport_models) add what they run to named terms: L = 0 costs the prompts'
    prefill in both models and the samples' scoring; a step of mh its chains' first state (once), a prefix and a
    suffix per chain, a reward forward and backward and a pass for the candidates (the gradient-free mh: no backward,
    no candidates); topk the candidates (once), a gradient and its re-scored proposals; embed a gradient and the
    re-scoring."""
    from types import SimpleNamespace

    from transformers import Qwen2Model

    lm, ids, live = setup["lm"], setup["ref_ids"], setup["live"]
    rows, width, prompt_tokens = len(ids), ids.shape[1], int(setup["p_mask"].sum())
    torch.manual_seed(3)
    run_like = SimpleNamespace(lm=lm, rm=vgf_llm.RewardModel(Qwen2Model(lm.config)).eval(),
                               embed=lm.get_input_embeddings(), allowed=setup["allowed"], stop_ids=STOP_IDS,
                               end_id=EOS, tok=SimpleNamespace(pad_token_id=PAD), spacing=None,
                               device=torch.device("cpu"))
    run_like.rm.requires_grad_(False)
    for mode, extra in [("embed", {}), ("topk", {}), ("mh", {}), ("mh", dict(mh_tau=0.0, mh_kappa=0.0))]:
        reference = vgf_llm.ReferenceBatch(setup["p_ids"], setup["p_mask"], setup["cache"],
                                           torch.arange(rows) // setup["n"], ids, live, 0.0,
                                           vgf_llm.ComputeTally(prompt_prefill=prompt_tokens))
        args = args_for(mode, [0, 1], micro_batch_size=3, **extra)
        models = vgf_llm.transport_models(reference, args, run_like)
        torch.manual_seed(0)
        record = vgf_llm.transport(ids, live, models, args)
        start, step = asdict(record.at[0].compute), asdict(record.at[1].compute)
        assert start == dict(prompt_prefill=2 * prompt_tokens, sampling=0, reward_forward=rows * width,
                             reward_backward=0, candidates=0, suffix_prefix=0, suffix_sampling=0), (mode, start)
        added = {term: step[term] - start[term] for term in step}
        if mode == "mh" and extra:  # gradient-free: the proposals' R and suffixes only (no backward, no top-k)
            positions = record.at[1].position
            prefix = sum(len(p) * int(p.max()) for p in positions.split(3))
            assert added == dict(prompt_prefill=0, sampling=0, reward_forward=2 * rows * width, reward_backward=0,
                                 candidates=0, suffix_prefix=prefix, suffix_sampling=added["suffix_sampling"]), added
            assert record.at[1].outside.all()  # every token is mu's own draw
        elif mode == "mh":
            positions = record.at[1].position
            prefix = sum(len(p) * int(p.max()) for p in positions.split(3))  # y_<t, padded per micro-batch
            assert added == dict(prompt_prefill=0, sampling=0, reward_forward=2 * rows * width,
                                 reward_backward=2 * 2 * rows * width, candidates=2 * rows * (width - 1),
                                 suffix_prefix=prefix, suffix_sampling=added["suffix_sampling"]), added
            assert 0 < added["suffix_sampling"] <= rows * vgf_llm.last_sampled_column(width)
        elif mode == "topk":
            assert added == dict(prompt_prefill=0, sampling=0, reward_forward=rows * width + 4 * rows * width,
                                 reward_backward=2 * rows * width, candidates=rows * (width - 1) + 4 * rows * (width - 1),
                                 suffix_prefix=0, suffix_sampling=0), added
        else:
            assert added == dict(prompt_prefill=0, sampling=0, reward_forward=2 * rows * width,
                                 reward_backward=2 * rows * width, candidates=0, suffix_prefix=0,
                                 suffix_sampling=0), added
