"""The Metropolis-Hastings transport of vgf_llm.py on an enumerable problem: a bigram next-token table over 5 tokens
and a stop token, responses of at most 3 tokens, a reward that is a nonlinear function of token embeddings. Its
chains reach pi* ∝ mu exp(R / alpha) computed by enumeration; without the Hastings terms they do not."""

import itertools
import os
import sys
from types import SimpleNamespace

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import vgf_llm  # noqa: E402

STOP, V, T = 0, 6, 3  # token 0 ends a response (and pads it); at most T tokens, then the stop token is forced
W = T + 1
g0 = torch.Generator().manual_seed(0)
LOG_MU = (0.7 * torch.randn(V + 1, V, generator=g0)).log_softmax(-1)  # row V: the first token (after the prompt)
TABLE = torch.randn(V, 3, generator=g0)
WVEC = torch.randn(3, generator=g0)


def live(ids):
    return vgf_llm.through_first_stop(ids, torch.tensor([STOP])).long()


def reward_fn(ids, emb, grad):
    """R = Σ_s sin(2 e_s·w) + 0.3 Σ_s e_s·e_{s+1} over the live positions (the stop token included)."""
    e = (TABLE[ids] if emb is None else emb).detach().float().requires_grad_(grad)
    m = live(ids).float()
    with torch.enable_grad():
        r = (torch.sin(2 * e @ WVEC) * m).sum(1) + 0.3 * ((e[:, :-1] * e[:, 1:]).sum(-1) * m[:, 1:]).sum(1)
    return (r.detach(), torch.autograd.grad(r.sum(), e)[0]) if grad else r.detach()


def next_logp(ids):
    """log mu(v | y_<t) at every position t: (BN, W, V); the budget's last position can only stop."""
    prev = torch.cat([torch.full_like(ids[:, :1], V), ids[:, :-1]], 1)
    lp = LOG_MU[prev].clone()
    lp[:, T] = torch.where(torch.arange(V) == STOP, 0.0, -torch.inf)
    return lp


def logprob_fn(ids, emb, top_k, grad):
    lp_all = next_logp(ids)
    lp = lp_all.gather(-1, ids[..., None]).squeeze(-1) * live(ids)
    cand = lp_all.topk(top_k, -1).indices if top_k else torch.zeros(0)
    return lp, cand, lp_all.gather(-1, cand) if top_k else cand, None


def complete(ids, start):
    """Samples the positions >= start (a number or one per row) from mu, up to the stop token or the budget."""
    ids, start = ids.clone(), torch.as_tensor(start).expand(len(ids))
    for s in range(W):
        stopped = (ids[:, :s] == STOP).any(1)
        draw = torch.multinomial(next_logp(ids)[:, s].exp(), 1)[:, 0]
        ids[:, s] = torch.where(s < start, ids[:, s], torch.where(stopped, STOP, draw))
    return ids


def suffix_fn(ids, t, v):
    ids = ids.clone()
    ids[torch.arange(len(ids)), t] = v
    ids = complete(ids, t + 1)
    return ids, live(ids).sum(1) - 1


def target():
    """pi* over every response, by enumeration: (ids, probabilities)."""
    seqs = [list(c) + [STOP] * (W - len(c)) for m in range(T + 1) for c in itertools.product(range(1, V), repeat=m)]
    ids = torch.tensor(seqs)
    logp = logprob_fn(ids, None, 0, False)[0].sum(1) + reward_fn(ids, None, False) / ALPHA
    return ids, logp.softmax(0)


ALPHA = 2.0


def run_chains(tau, kappa, chains, steps, hastings=True, trace=None, seed=0):
    torch.manual_seed(seed)
    ref = complete(torch.zeros(chains, W, dtype=torch.long), 0)
    args = SimpleNamespace(alpha=ALPHA, mh_tau=tau, mh_kappa=kappa, top_k=V)
    snaps = vgf_llm.mh_transport(ref, live(ref), steps, reward_fn, logprob_fn, suffix_fn, TABLE, args, trace=trace,
                                 hastings=hastings)
    return ref, snaps


def tv_to_target(ids):
    seqs, p = target()
    code = lambda x: (x * V ** torch.arange(W)).sum(1)
    counts = torch.bincount(code(ids), minlength=V**W).float()
    assert counts[code(seqs)].sum() == len(ids)  # every chain state is a valid response
    emp = counts[code(seqs)] / len(ids)
    return 0.5 * (emp - p).abs().sum().item()


def test_chains_reach_pi_star_and_fail_without_the_hastings_terms():
    seqs, p = target()
    mu = logprob_fn(seqs, None, 0, False)[0].sum(1).exp()
    assert 0.5 * (mu - p).abs().sum() > 0.3  # pi* is far from mu: the test is sharp
    L, chains = 64, 20000  # TV of 20000 exact draws to pi*: about 0.02
    exact = tv_to_target(run_chains(1.0, 1.0, chains, [L])[1][L][0])
    plain = tv_to_target(run_chains(1.0, 1.0, chains, [L], hastings=False)[1][L][0])
    free = tv_to_target(run_chains(0.0, 0.0, chains, [L])[1][L][0])  # gradient-free suffix resampling
    print(f"TV to pi*: tau 1 kappa 1 {exact:.4f}, without Hastings terms {plain:.4f}, tau = kappa = 0 {free:.4f}")
    assert exact < 0.05 and free < 0.05, (exact, free)
    assert plain > 0.1, plain


def test_zero_steps_is_best_of_n_and_moves_change_only_from_t_on():
    trace = []
    ref, snaps = run_chains(2.0, 1.0, 400, [0, 6], trace=trace)
    assert torch.equal(snaps[0][0], ref) and torch.equal(snaps[0][1], reward_fn(ref, None, False))
    best, ids, R, _, _ = vgf_llm.select(snaps[0], 4)
    r = reward_fn(ref, None, False).view(-1, 4)
    assert torch.equal(R, r.max(1).values) and torch.equal(ids, ref.view(-1, 4, W)[torch.arange(100), r.argmax(1)])
    accepted = 0
    for before, after in zip(trace, trace[1:]):
        t, acc = after[5]["position"], after[5]["accepted"]
        prefix = torch.arange(W) < t[:, None]
        assert torch.equal(before[0][prefix], after[0][prefix])  # y_<t never changes
        assert torch.equal(before[0][~acc], after[0][~acc])  # a rejected move changes nothing
        accepted += int(acc.sum())
    assert accepted > 100  # moves do happen
