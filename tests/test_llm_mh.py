"""The Metropolis-Hastings transport of vgf_llm.py on an enumerable problem: a bigram next-token table over 5 tokens
and a stop token, responses of at most 3 tokens, a reward that is a nonlinear function of token embeddings, and mu's
top-3 tokens as the candidates the value gradient tilts (below the vocabulary of 6). pi* ∝ mu exp(R / alpha) is
computed by enumeration. Chains started from mu's samples reach it; chains started from pi* stay there at the default
tau and kappa; each of five wrong acceptance ratios moves them away."""

import itertools
import os
import sys
from types import SimpleNamespace

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import vgf_llm  # noqa: E402

STOP, V, T = 0, 6, 3  # token 0 ends a response (and pads it); at most T tokens, then the stop token is forced
W = vgf_llm.response_width(T)
TOP_K = 3  # candidates the value gradient tilts: below the vocabulary, so half of mu's tokens lie outside them
ALPHA = 2.0
g0 = torch.Generator().manual_seed(0)
LOG_MU = (0.7 * torch.randn(V + 1, V, generator=g0)).log_softmax(-1)  # row V: the first token (after the prompt)
TABLE = torch.randn(V, 3, generator=g0)
WVEC = torch.randn(3, generator=g0)


def live(ids):
    return vgf_llm.through_first_stop(ids, torch.tensor([STOP])).long()


def reward(ids, embeddings=None, with_gradient=False):
    """R = Σ_s sin(2 e_s·w) + 0.3 Σ_s e_s·e_{s+1} over the live positions (the stop token included)."""
    e = (TABLE[ids] if embeddings is None else embeddings).detach().float().requires_grad_(with_gradient)
    m = live(ids).float()
    with torch.enable_grad():
        r = (torch.sin(2 * e @ WVEC) * m).sum(1) + 0.3 * ((e[:, :-1] * e[:, 1:]).sum(-1) * m[:, 1:]).sum(1)
    return (r.detach(), torch.autograd.grad(r.sum(), e)[0]) if with_gradient else r.detach()


def next_logp(ids):
    """log mu(v | y_<t) at every position t: (rows, W, V); the forced-stop column can only stop."""
    previous = torch.cat([torch.full_like(ids[:, :1], V), ids[:, :-1]], 1)
    lp = LOG_MU[previous].clone()
    lp[:, T] = torch.where(torch.arange(V) == STOP, 0.0, -torch.inf)
    return lp


def token_scores(ids, top_k=0):
    lp_all = next_logp(ids)
    logp = lp_all.gather(-1, ids[..., None]).squeeze(-1) * live(ids)
    if not top_k:
        return vgf_llm.TokenScores(logp)
    candidates = lp_all.topk(top_k, -1).indices
    outside = lp_all.scatter(-1, candidates, -torch.inf).logsumexp(-1)
    return vgf_llm.TokenScores(logp, candidates, lp_all.gather(-1, candidates), outside)


def complete(ids, start):
    """Samples the positions >= start (a number or one per row) from mu, up to the stop token or the budget."""
    ids, start = ids.clone(), torch.as_tensor(start).expand(len(ids))
    for s in range(W):
        stopped = (ids[:, :s] == STOP).any(1)
        draw = torch.multinomial(next_logp(ids)[:, s].exp(), 1)[:, 0]
        ids[:, s] = torch.where(s < start, ids[:, s], torch.where(stopped, STOP, draw))
    return ids


def resample_suffix(ids, positions, tokens, excluded):
    """y'_t = the token, or a draw from mu without the excluded tokens; y'_>t from mu."""
    rows = torch.arange(len(ids))
    at_t = next_logp(ids)[rows, positions].scatter(1, excluded, -torch.inf)
    outside_draw = torch.multinomial(at_t.softmax(-1), 1)[:, 0]
    ids = ids.clone()
    ids[rows, positions] = torch.where(tokens == vgf_llm.OUTSIDE, outside_draw, tokens)
    ids = complete(ids, positions + 1)
    return ids, live(ids).sum(1) - 1


def toy_models():
    allowed = torch.ones(V, dtype=torch.bool)
    return vgf_llm.TransportModels(reward, token_scores, resample_suffix, TABLE, allowed, torch.tensor([STOP]), STOP,
                                   vgf_llm.ComputeTally())


def target():
    """pi* over every response, by enumeration: (ids, probabilities)."""
    seqs = [list(c) + [STOP] * (W - len(c)) for m in range(T + 1) for c in itertools.product(range(1, V), repeat=m)]
    ids = torch.tensor(seqs)
    logp = token_scores(ids).logp.sum(1) + reward(ids) / ALPHA
    return ids, logp.softmax(0)


def exact_draws(chains, seed):
    seqs, p = target()
    return seqs[torch.multinomial(p, chains, replacement=True, generator=torch.Generator().manual_seed(seed))]


def run_chains(start, steps, tau=5.0, kappa=5.0, trace=None, seed=0):
    """Chains from `start` (ids) for max(steps) steps; the record of their snapshots."""
    torch.manual_seed(seed)
    args = vgf_llm.Args(transport="mh", alpha=ALPHA, mh_tau=tau, mh_kappa=kappa, top_k=TOP_K, transport_steps=steps)
    return vgf_llm.transport(start, live(start), toy_models(), args, trace)


def tv_to_target(ids):
    seqs, p = target()
    code = lambda x: (x * V ** torch.arange(W)).sum(1)
    counts = torch.bincount(code(ids), minlength=V**W).float()
    assert counts[code(seqs)].sum() == len(ids)  # every chain state is a valid response
    return 0.5 * (counts[code(seqs)] / len(ids) - p).abs().sum().item()


def test_the_problem_is_sharp():
    """pi* is far from mu, and 23 % of mu's first tokens lie outside its top-3 (a chain that cannot propose them
    cannot reach pi*)."""
    seqs, p = target()
    mu = token_scores(seqs).logp.sum(1).exp()
    assert 0.5 * (mu - p).abs().sum() > 0.3
    first = torch.zeros(1, W, dtype=torch.long)
    outside = 1 - next_logp(first)[0, 0].topk(TOP_K).values.exp().sum()
    assert outside > 0.2, outside


@pytest.mark.parametrize("tau,kappa", [(1.0, 1.0), (0.0, 0.0)])
def test_chains_from_mu_reach_pi_star(tau, kappa):
    torch.manual_seed(11)
    start = complete(torch.zeros(20000, W, dtype=torch.long), 0)  # mu's samples
    L = 48
    record = run_chains(start, [0, L], tau, kappa)
    before, after = tv_to_target(record.at[0].ids), tv_to_target(record.at[L].ids)
    print(f"tau {tau} kappa {kappa}: TV to pi* {before:.3f} at L = 0, {after:.3f} at L = {L}")
    assert before > 0.3 and after < 0.05, (before, after)


def drop_terms(position=False, tilt=False, normaliser=False, reward_sign=1.0):
    """A wrong acceptance ratio: mh_log_acceptance without some of its terms (or with -dR/alpha)."""
    def without(terms):
        zero = torch.zeros_like(terms.tilt)
        return vgf_llm.MoveTerms(zero if position else terms.log_position, zero if tilt else terms.tilt,
                                 zero if normaliser else terms.log_normaliser)

    def wrong(current, proposal, forward, reverse, alpha):
        reward_term = reward_sign * (proposal.reward - current.reward) / alpha
        return reward_term + without(reverse).log_density() - without(forward).log_density()

    return wrong


def reverse_at_y(monkeypatch):
    """A wrong ratio: the reverse move's terms taken at y (its weights and gradient) instead of at y'."""
    real = vgf_llm.move_terms
    forward = {}

    def terms(state, weights, positions, tokens, table, tau):
        if not forward:  # the forward move (first call of a step): remember y and its weights
            forward.update(state=state, weights=weights)
            return real(state, weights, positions, tokens, table, tau)
        at_y = forward.pop("state"), forward.pop("weights")
        return real(*at_y, positions, tokens, table, tau)

    monkeypatch.setattr(vgf_llm, "move_terms", terms)


WRONG_RATIOS = {
    "no position ratio": lambda mp: mp.setattr(vgf_llm, "mh_log_acceptance", drop_terms(position=True)),
    "no tau terms": lambda mp: mp.setattr(vgf_llm, "mh_log_acceptance", drop_terms(tilt=True)),
    "no log Z": lambda mp: mp.setattr(vgf_llm, "mh_log_acceptance", drop_terms(normaliser=True)),
    "reverse computed at y": reverse_at_y,
    "-dR/alpha": lambda mp: mp.setattr(vgf_llm, "mh_log_acceptance", drop_terms(reward_sign=-1.0)),
}


def test_pi_star_is_stationary_at_the_defaults_and_each_wrong_ratio_leaves_it(monkeypatch):
    """From exact pi* draws, the default sampler (tau = kappa = 5, top-3 of 6 tokens) stays at the TV of the draws
    themselves; each wrong ratio drifts measurably away."""
    defaults = vgf_llm.Args()
    tau, kappa = defaults.mh_tau, defaults.mh_kappa
    chains, L = 20000, 32
    start = exact_draws(chains, seed=5)
    noise = tv_to_target(start)
    record = run_chains(start, [L], tau, kappa, seed=1)
    correct = tv_to_target(record.at[L].ids)
    accepted = sum(m["accepted"] for m in record.moves_by_step) / sum(m["proposals"] for m in record.moves_by_step)
    outside = sum(m["outside"] for m in record.moves_by_step) / sum(m["proposals"] for m in record.moves_by_step)
    print(f"TV to pi*: exact draws {noise:.4f}; after {L} steps {correct:.4f} (accepted {accepted:.2f}, "
          f"outside the top-k {outside:.2f})")
    assert correct < noise + 0.01, (noise, correct)
    assert accepted > 0.05 and outside > 0.05  # moves happen, also outside the candidates
    for name, mutate in WRONG_RATIOS.items():
        with monkeypatch.context() as mp:
            mutate(mp)
            wrong = tv_to_target(run_chains(start, [L], tau, kappa, seed=1).at[L].ids)
        print(f"  {name}: {wrong:.4f}")
        assert wrong > correct + 0.03, (name, correct, wrong)


def test_zero_steps_is_best_of_n_and_moves_change_only_from_t_on():
    trace = []
    torch.manual_seed(3)
    start = complete(torch.zeros(400, W, dtype=torch.long), 0)
    record = run_chains(start, [0, 6], 2.0, 1.0, trace=trace)
    assert torch.equal(record.at[0].ids, start) and torch.equal(record.at[0].reward, reward(start))
    selected = vgf_llm.select(record.at[0], 4)
    r = reward(start).view(-1, 4)
    assert torch.equal(selected.reward, r.max(1).values)
    assert torch.equal(selected.ids, start.view(-1, 4, W)[torch.arange(100), r.argmax(1)])
    accepted = outside_accepted = 0
    for before, after in zip(trace, trace[1:]):
        prefix = torch.arange(W) < after.position[:, None]
        assert torch.equal(before.ids[prefix], after.ids[prefix])  # y_<t never changes
        assert torch.equal(before.ids[~after.accepted], after.ids[~after.accepted])  # a rejected move changes nothing
        assert (after.position <= vgf_llm.last_sampled_column(W)).all()  # the forced stop is never proposed
        assert (after.position <= before.live.sum(1) - 1).all()  # nor a column after the stop token
        accepted += int(after.accepted.sum())
        outside_accepted += int((after.accepted & after.outside).sum())
    assert accepted > 100 and outside_accepted > 10  # moves do happen, also to tokens outside the top-k
