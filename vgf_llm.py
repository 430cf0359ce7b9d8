# Value Gradient Flow (VGF) for language models: a base model mu + a learned reward model R -> N responses drawn
# from mu and transported toward pi* ∝ mu · exp(R / alpha). Three transports: `embed`, SVGD on the token embeddings
# (the paper's LLM experiments as a third-party summary describes them; the paper's LLM code and particle space were
# never published), `mh`, value-gradient Metropolis-Hastings (its chains leave pi* invariant and, started from mu's
# samples, tend to pi* as the steps grow), and `topk`, a greedy search baseline.
# Paper: "Reinforcement Learning via Value Gradient Flow", Xu, Hu, Sojoudi, Zhang (ICLR 2026), arXiv 2604.14265.
# Stages, in the paper's order, each algorithm beside the function that drives it: value learning -> reference
# sampler -> transport (embed, mh, topk) -> evaluation, then main. Below the banner after main: loading, checks, run
# folders and plots (nothing there changes the algorithm).
import contextlib
import errno
import fcntl
import importlib.util
import io
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Annotated, Callable, Literal, NamedTuple, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter


def shown_default(text: str):
    """--help shows this default instead of `None` (an option whose default is decided at run time)."""
    return tyro.conf.arg(help_behavior_hint=f"(default: {text})")


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    run_name: Annotated[Optional[str], shown_default("exp_name__model__seed__time")] = None
    """folder name of this run under --output-dir (a folder that holds results, or is in use, is refused)"""
    seed: int = 1
    """seed of the experiment (0 to 2**32 - 1)"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, a GPU is used when one is available"""
    bf16: bool = True
    """on CUDA, run base and reward models in bfloat16 (particles, value head, trained weights stay float32)"""
    track: bool = False
    """if toggled, this experiment will be tracked with Weights and Biases"""
    wandb_project_name: str = "vgf"
    """the wandb's project name"""
    wandb_entity: Optional[str] = None
    """the entity (team) of wandb's project"""
    output_dir: str = "runs"
    """where TensorBoard logs, summary.json, samples.jsonl and the trained reward model go"""

    # Data and models
    model: str = "Qwen2.5-1.5B"
    """base model mu: a hub id, a short name (`Qwen2.5-1.5B` = `Qwen/Qwen2.5-1.5B`), a local folder or a .gguf file"""
    gguf_file: Optional[str] = None
    """name of a GGUF file inside the --model folder (de-quantised on load)"""
    dataset: str = "Anthropic/hh-rlhf"
    """preference data: a hub dataset or folder (Anthropic HH, TL;DR), or a local JSONL of prompt, chosen, rejected"""
    dataset_config: Optional[str] = None
    """configuration of a hub dataset that has several (e.g. `comparisons` for openai/summarize_from_feedback)"""
    dataset_subset: Annotated[Optional[str], shown_default("all")] = None
    """data_dir of a hub dataset, e.g. `helpful-base` or `harmless-base` of Anthropic/hh-rlhf"""
    eval_fraction: float = 0.1
    """share of a local JSONL held out (its last lines) for RM accuracy and eval prompts (hub data: its test split)"""
    chat_template: bool = True
    """wrap prompts in the tokenizer's chat template when it has one"""
    max_prompt_tokens: int = 256
    """prompts longer than this many tokens lose their oldest text (the chat template's tokens are kept)"""

    # Value learning (Bradley-Terry reward model)
    reward_model: Annotated[Optional[str], shown_default("train one, saved to <run>/reward_model")] = None
    """a reward-model folder saved by this program, to reuse"""
    rm_train_pairs: int = 20000
    """at most this many training preference pairs"""
    rm_eval_pairs: int = 500
    """at most this many held-out pairs for the reported pairwise accuracy"""
    rm_epochs: int = 1
    """epochs of Bradley-Terry training"""
    rm_lr: float = 1e-5
    """Adam learning rate of the reward model (the head uses 10x this when the backbone is frozen)"""
    rm_batch_size: int = 8
    """preference pairs per reward-model step"""
    rm_max_response_tokens: int = 128
    """responses of the preference data are cut to this many tokens"""
    rm_pooling: Literal["last", "mean"] = "last"
    """R reads the hidden state of the last token, or the mean over the response tokens (better on a frozen backbone)"""
    rm_train_backbone: bool = True
    """train the backbone with the head (the token embedding table stays frozen so particles share its space)"""

    # Reference sampler and transport (the algorithm)
    num_particles: int = 8
    """N: responses drawn from the base model per prompt"""
    transport_steps: list[int] = field(default_factory=lambda: [0, 1, 2, 4, 8])
    """transport budgets L evaluated (0 = best-of-N); one transport of max(L) steps is snapshotted at each L"""
    transport: Literal["embed", "mh", "topk"] = "embed"
    """embed: the paper's configuration as described (docs/llm.md), mh: value-gradient Metropolis-Hastings, topk: baseline"""
    mh_tau: float = 5.0
    """mh: weight τ of the first-order gain Δ_t(v) on mu's top-k tokens in the token proposal (0: mu's own next token)"""
    mh_kappa: float = 5.0
    """mh: weight κ of max_v Δ_t(v) in the position proposal (0: uniform over the positions that may change)"""
    step_size: float = 1.0
    """embed: epsilon in (0, 1000], the Adam learning rate, in nearest-neighbour distances of the embedding table"""
    alpha: float = 0.1
    """temperature (> 0, finite) of the target pi* ∝ mu · exp(R / alpha), in reward std units (R standardised)"""
    lm_coef: float = 0.0
    """topk: weight of log mu in its acceptance test R / alpha + lm_coef log mu"""
    top_k: int = 8
    """mh: the tokens whose proposal weight the value gradient tilts (mu's top-k after y_<t); topk: the candidate swaps"""
    num_proposals: int = 4
    """topk transport: single-token moves per particle and step that are re-scored exactly"""
    save_trajectories: bool = False
    """write every particle's text, R and NLL/token after every transport step to trajectories.jsonl"""
    plot_runs: Annotated[list[str], shown_default("none")] = field(default_factory=list)
    """only draw judge_vs_compute.png into --output-dir from these run folders (one line per run), then exit"""
    max_new_tokens: int = 64
    """length budget: responses end at their first stop token or after this many tokens (a stop token is added)"""
    temperature: float = 1.0
    """sampling temperature of the reference sampler"""
    num_eval_prompts: int = 64
    """held-out prompts evaluated"""
    prompt_batch_size: int = 4
    """prompts generated and transported together (memory is bounded by this times num_particles)"""
    micro_batch_size: int = 32
    """sequences per forward pass"""
    judge: Annotated[Optional[str], shown_default("the transport reward model, flagged as not independent")] = None
    """scorer not used for transport: `vader`, `afinn`, a reward-model folder or a hub classifier id"""
    judge2: Annotated[Optional[str], shown_default("none")] = None
    """a second independent scorer, reported beside --judge (same choices), e.g. `afinn`"""
    best_of_n: Annotated[list[int], shown_default("none")] = field(default_factory=list)
    """also report best-of-n from the first n of the N samples for each n here (the best-of-N frontier of one draw)"""


class VGFError(Exception):
    """A problem with the user's input, files or machine, reported as `error: ...` (exit 2) without a traceback."""


# Token layout shared by every stage. Prompts are left-padded, responses right-padded; a response ends at its first
# stop token. LENGTH CONVENTION: a batch of responses is a (rows, W) tensor with W = max_new_tokens + 1. Columns
# 0 .. W - 2 hold the tokens mu sampled; the last column exists only for the stop token that closes a response which
# used all max_new_tokens (a forced stop: mu did not sample it, so no transport may change it).
def response_width(max_new_tokens):
    return max_new_tokens + 1


def last_sampled_column(width):
    """The last column whose token mu samples (the one after it holds only a forced stop)."""
    return width - 2


def changeable_columns(ends, width):
    """Columns a transport may change: through each response's stop token (its length may change there), never
    the forced-stop column."""
    columns = torch.arange(width, device=ends.device)
    return (columns <= ends[:, None]) & (columns <= last_sampled_column(width))


def live_columns(ends, width):
    """1 through each response's stop token (column `ends`), 0 on the padding after it."""
    return (torch.arange(width, device=ends.device) <= ends[:, None]).long()


def pad(seqs, value, left, length=None):
    """Token lists as one (rows, length) tensor and its mask, padded on the left (prompts) or the right."""
    length = length or max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), value, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for row, tokens in enumerate(seqs):
        tokens = tokens[:length]
        columns = slice(length - len(tokens), length) if left else slice(0, len(tokens))
        ids[row, columns], mask[row, columns] = torch.tensor(tokens, dtype=torch.long), 1
    return ids, mask


def through_first_stop(tokens, stop_ids):
    """True up to and including each row's first stop token (everywhere when it has none)."""
    is_stop = torch.isin(tokens, stop_ids)
    return (is_stop.cumsum(1) - is_stop.long()) == 0


def first_stop(ids, stop_ids):
    """Column of each response's first stop token (its last live column); the last column when it has none."""
    is_stop = torch.isin(ids, stop_ids)
    return torch.where(is_stop.any(1), is_stop.float().argmax(1), ids.shape[1] - 1)


def close_responses(tokens, stop_ids, pad_id, end_id, width=None):
    """Tokens through each row's first stop token, padding after it; a row without one is closed by end_id (a forced
    stop). Returns (ids, live mask), `width` columns wide (default: the longest response)."""
    tokens = torch.cat([tokens, torch.full_like(tokens[:, :1], end_id)], 1)
    live = through_first_stop(tokens, stop_ids)
    width = width or int(live.sum(1).max())
    ids, live = tokens.masked_fill(~live, pad_id)[:, :width], live.long()[:, :width]
    missing = width - ids.shape[1]
    return F.pad(ids, (0, missing), value=pad_id), F.pad(live, (0, missing))


def response_ids(tok, text, max_tokens, end_id):
    """A response text as tokens, cut to max_tokens with end_id as its last token."""
    return tok(text, add_special_tokens=False)["input_ids"][: max_tokens - 1] + [end_id]


PROGRESS_SECONDS = 30.0  # a loop that runs longer than this prints how far it is and how long it may still take


def micro_batches(rows, size, what):
    """Slices of `size` of `rows` rows; a long loop prints its progress (every PROGRESS_SECONDS)."""
    start = last_print = time.time()
    for begin in range(0, rows, size):
        yield slice(begin, begin + size)
        done, now = min(begin + size, rows), time.time()
        if now - last_print >= PROGRESS_SECONDS and done < rows:
            left = (now - start) / done * (rows - done)
            print(f"  {what}: {done}/{rows} sequences after {now - start:.0f} s, about {left:.0f} s left", flush=True)
            last_print = now


# ALGO LOGIC: value learning. R(x, y) = the base model's backbone + a scalar head, trained with the Bradley-Terry loss
# -log sigmoid(R(x, y_chosen) - R(x, y_rejected)). The token-embedding table never trains, so R accepts the base
# model's embeddings of any token (the particles of `embed` and the value gradients of every transport live there).
class RewardModel(nn.Module):
    def __init__(self, backbone, pooling="last"):
        super().__init__()
        self.backbone, self.pooling, self.head = backbone, pooling, nn.Linear(backbone.config.hidden_size, 1)
        nn.init.normal_(self.head.weight, std=1 / math.sqrt(self.head.in_features + 1))
        nn.init.zeros_(self.head.bias)

    def features(self, inputs_embeds, attention_mask, num_response, past_key_values=None):
        """The hidden state the head reads: the last live position's, or the mean over the response's live positions
        (the last num_response columns). With past_key_values (the prompts' cache) inputs_embeds holds the responses
        only."""
        positions = (attention_mask.cumsum(1) - 1).clamp(min=0)[:, -inputs_embeds.shape[1] :]
        hidden = self.backbone(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=positions,
                               past_key_values=past_key_values, use_cache=past_key_values is not None)
        hidden = hidden.last_hidden_state.float()
        if self.pooling == "mean":
            live = attention_mask[:, -num_response:, None].float()
            return (hidden[:, -num_response:] * live).sum(1) / live.sum(1).clamp(min=1)
        columns = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        last_live = (columns * attention_mask).argmax(1)
        cached_columns = attention_mask.shape[1] - hidden.shape[1]  # the prompt, when it came from the cache
        return hidden[torch.arange(len(hidden)), last_live - cached_columns]

    def forward(self, inputs_embeds, attention_mask, num_response, past_key_values=None):
        return self.head(self.features(inputs_embeds, attention_mask, num_response, past_key_values)).squeeze(-1)

    def save(self, folder, tok, info, backbone_ref=None):
        """The head, its settings and the tokenizer; the backbone too when it was trained (a frozen one is the base
        model's, referenced by its path)."""
        os.makedirs(folder, exist_ok=True)
        if backbone_ref is None:
            self.backbone.save_pretrained(folder)
        tok.save_pretrained(folder)
        head = io.BytesIO()
        torch.save(self.head.state_dict(), head)
        with open(os.path.join(folder, "value_head.pt"), "wb") as f:
            f.write(head.getvalue())
        with open(os.path.join(folder, "vgf_reward.json"), "w") as f:
            json.dump(dict(info, backbone=backbone_ref, pooling=self.pooling), f, indent=2)

    @classmethod
    def load(cls, folder, dtype, shared=None):
        """shared: (path, gguf_file, module) of the base model, reused when it is the reward model's frozen backbone."""
        from transformers import AutoModel
        info = read_reward_model_info(folder)
        ref = info.get("backbone") or {"path": folder, "gguf_file": None}
        same_path = lambda p: os.path.abspath(p) if os.path.exists(p) else p  # same weights: same path and GGUF file
        shares_base = shared is not None and (same_path(ref["path"]), ref["gguf_file"]) == (same_path(shared[0]),
                                                                                            shared[1])
        if shares_base:
            backbone = shared[2]
        else:
            backbone = from_pretrained(AutoModel, ref["path"], gguf_file=ref["gguf_file"], dtype=dtype)
        rm = cls(backbone, info.get("pooling", "last"))
        head_path = os.path.join(folder, "value_head.pt")
        try:
            rm.head.load_state_dict(torch.load(head_path, map_location="cpu"))
        except Exception as e:  # a truncated or foreign file
            raise VGFError(f"{head_path} is damaged or not a value head of this program ({type(e).__name__}: "
                           f"{first_line(e)}); train the reward model again") from None
        return rm, info


def build_reward_model(model_path, gguf_file, lm, args, dtype):
    """A fresh R: the frozen base backbone itself, or a float32 copy to train (bf16 Adam would lose most updates)."""
    from transformers import AutoModel
    if not args.rm_train_backbone:
        return RewardModel(lm.base_model, args.rm_pooling)
    backbone = from_pretrained(AutoModel, model_path, gguf_file=gguf_file, dtype=torch.float32)
    return RewardModel(backbone, args.rm_pooling).to(lm.device)


def bradley_terry_loss(r_chosen, r_rejected):
    """-log sigmoid(R(x, y_w) - R(x, y_l)) and the pairwise accuracy."""
    return -F.logsigmoid(r_chosen - r_rejected).mean(), (r_chosen > r_rejected).float().mean()


class PreferencePairs(NamedTuple):
    """Token ids of (prompt, chosen response, rejected response) triples, one list per field."""
    prompts: list
    chosen: list
    rejected: list

    def subset(self, indices):
        return PreferencePairs(*([column[i] for i in indices] for column in self))


def encode_pairs(tok, rows, args, end_id):
    response = lambda key: [response_ids(tok, r[key], args.rm_max_response_tokens, end_id) for r in rows]
    return PreferencePairs([prompt_ids(tok, r["prompt"], args) for r in rows], response("chosen"), response("rejected"))


def sequence_outputs(rm, prompts, responses, pad_id, device, features=False):
    """R of [prompt; response] token lists in one forward pass (with features: the hidden states the head reads)."""
    embed = rm.backbone.get_input_embeddings()
    prompt_tokens, prompt_mask = pad(prompts, pad_id, left=True)
    response_tokens, response_mask = pad(responses, pad_id, left=False)
    inputs = torch.cat([embed(prompt_tokens.to(device)), embed(response_tokens.to(device))], 1)
    mask = torch.cat([prompt_mask, response_mask], 1).to(device)
    return (rm.features if features else rm)(inputs, mask, response_tokens.shape[1])


def pair_outputs(rm, pairs, pad_id, device, micro_batch, features=False):
    """R of every chosen and rejected response (with features: the hidden states the head reads), micro_batch pairs
    per forward pass over both. Returns (chosen, rejected)."""
    chosen, rejected = [], []
    for part in micro_batches(len(pairs.prompts), micro_batch, "reward model on preference pairs"):
        prompts = pairs.prompts[part] * 2  # each prompt twice: with its chosen, then with its rejected response
        out = sequence_outputs(rm, prompts, pairs.chosen[part] + pairs.rejected[part], pad_id, device, features)
        half = len(prompts) // 2
        chosen.append(out[:half])
        rejected.append(out[half:])
    return torch.cat(chosen), torch.cat(rejected)


def train_reward_model(rm, tok, train_rows, test_rows, args, device, writer, end_id, bf16=False):
    """Bradley-Terry training. A frozen backbone's features are computed once and only the head trains; a trained
    backbone's forward runs under bfloat16 autocast when bf16."""
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16 and args.rm_train_backbone)
    rm.backbone.get_input_embeddings().weight.requires_grad_(False)  # particles live in the base embedding space
    if not args.rm_train_backbone:
        rm.backbone.requires_grad_(False)
    params = [p for p in rm.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=args.rm_lr if args.rm_train_backbone else 10 * args.rm_lr)
    pairs = encode_pairs(tok, train_rows[: args.rm_train_pairs], args, end_id)
    if not args.rm_train_backbone:
        with torch.no_grad():
            chosen_features, rejected_features = pair_outputs(rm, pairs, tok.pad_token_id, device,
                                                              args.micro_batch_size, features=True)
    step, rng = 0, random.Random(args.seed)
    for epoch in range(args.rm_epochs):
        order = list(range(len(pairs.prompts)))
        rng.shuffle(order)
        rm.train()
        for start in range(0, len(order), args.rm_batch_size):
            batch = order[start : start + args.rm_batch_size]
            if args.rm_train_backbone:
                with autocast:
                    r_chosen, r_rejected = pair_outputs(rm, pairs.subset(batch), tok.pad_token_id, device, len(batch))
            else:
                r_chosen = rm.head(chosen_features[batch]).squeeze(-1)
                r_rejected = rm.head(rejected_features[batch]).squeeze(-1)
            loss, accuracy = bradley_terry_loss(r_chosen, r_rejected)
            if not torch.isfinite(loss):
                raise VGFError(f"reward-model loss is {loss.item()} at step {step}: lower --rm-lr or pass --no-bf16")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % 10 == 0:
                writer.add_scalar("losses/rm_bt_loss", loss.item(), step)
                writer.add_scalar("losses/rm_train_accuracy", accuracy.item(), step)
                print(f"rm epoch {epoch} step {step}: bt loss {loss.item():.4f}, batch accuracy {accuracy.item():.2f}")
            step += 1
    return evaluate_reward_model(rm, tok, test_rows, args, device, end_id, standardise=True)


@torch.no_grad()
def evaluate_reward_model(rm, tok, rows, args, device, end_id, standardise=False):
    """Held-out pairwise accuracy; with standardise, fold (R - mean) / std of held-out rewards into the head."""
    rm.eval()
    pairs = encode_pairs(tok, rows[: args.rm_eval_pairs], args, end_id)
    r_chosen, r_rejected = pair_outputs(rm, pairs, tok.pad_token_id, device, args.micro_batch_size)
    loss, accuracy = bradley_terry_loss(r_chosen, r_rejected)
    if standardise:
        every = torch.cat([r_chosen, r_rejected])
        if len(every) > 1 and not every.std() > 1e-6:
            raise VGFError(f"the reward model gives every held-out response the same reward (std {every.std():.2g}), "
                           "so R cannot be standardised; check the --dataset responses or train longer (--rm-epochs)")
        mean, std = every.mean(), every.std().clamp(min=1e-6) if len(every) > 1 else torch.tensor(1.0)
        rm.head.weight.div_(std), rm.head.bias.sub_(mean).div_(std)
    return dict(heldout_accuracy=accuracy.item(), heldout_bt_loss=loss.item(), heldout_pairs=len(pairs.prompts))


def value_learning(args, run, train_rows, test_rows):
    """The reward model R: loaded from --reward-model, or trained and saved as <run>/reward_model."""
    if args.reward_model:
        rm, rm_info = RewardModel.load(args.reward_model, run.dtype, run.base)
        rm, rm_path = rm.to(run.device), args.reward_model
    else:
        rm_path = os.path.join(run.folder.path, "reward_model")
        rm = build_reward_model(run.model_path, run.gguf_file, run.lm, args, run.dtype)
        rm_info = train_reward_model(rm, run.tok, train_rows, test_rows, args, run.device, run.writer, run.end_id,
                                     run.bf16)
        rm.backbone.to(run.dtype)  # a trained float32 backbone runs in the base model's dtype from here on
        model_path = os.path.abspath(run.model_path) if os.path.exists(run.model_path) else run.model_path
        backbone_ref = None if args.rm_train_backbone else {"path": model_path, "gguf_file": run.gguf_file}
        info = dict(rm_info, base_model=args.model, train_pairs=min(len(train_rows), args.rm_train_pairs))
        with written_atomically(rm_path) as staging:  # reward_model/ appears only once complete
            rm.save(staging, run.tok, info, backbone_ref)
    rm.eval().requires_grad_(False)
    rm_embed = rm.backbone.get_input_embeddings()
    if rm_embed.weight.shape != run.embed.weight.shape or not torch.equal(rm_embed.weight, run.embed.weight):
        raise VGFError("the reward model's token embeddings differ from the base model's: train it from --model")
    if "heldout_accuracy" not in rm_info or args.reward_model:
        rm_info = dict(rm_info, **evaluate_reward_model(rm, run.tok, test_rows, args, run.device, run.end_id))
    print(f"reward model {rm_path}: held-out pairwise accuracy {rm_info['heldout_accuracy']:.3f}")
    run.writer.add_scalar("eval/rm_heldout_accuracy", rm_info["heldout_accuracy"], 0)
    run.rm, run.rm_info, run.rm_path = rm, rm_info, rm_path
    run.judges = [(name, Judge(spec, args, run.device, run.dtype, (run.tok, rm, run.end_id), run.base))
                  for name, spec in (("judge", args.judge), ("judge2", args.judge2)) if name == "judge" or spec]


# ALGO LOGIC: reference sampler mu. Each prompt runs through the base model once (its keys and values are reused by
# every particle); then N responses per prompt are sampled token by token until every one has a stop token or the
# length budget is spent (then a stop token is forced).
@dataclass
class PromptCache:
    """Keys and values of a batch of fixed prompts in one model, their mask, and (base model) the logits after them."""
    layers: list  # (keys, values) per layer, one row per prompt
    mask: torch.Tensor  # (prompts, P), left-padded
    last_logits: Optional[torch.Tensor]  # (prompts, vocabulary): mu's next token after each prompt

    def for_rows(self, prompt_of_row):
        """A fresh cache holding prompt_of_row[i] in row i (indexing copies: the stored tensors never change)."""
        from transformers import DynamicCache
        return DynamicCache([(keys[prompt_of_row], values[prompt_of_row]) for keys, values in self.layers])


@torch.no_grad()
def prompt_cache(model, prompt_ids, prompt_mask):
    """Runs the prompts through `model` once (a causal LM also yields its next-token logits after each prompt)."""
    causal_lm = model.get_output_embeddings() is not None
    positions = (prompt_mask.cumsum(1) - 1).clamp(min=0)
    out = model(inputs_embeds=model.get_input_embeddings()(prompt_ids), attention_mask=prompt_mask,
                position_ids=positions, use_cache=True, **(dict(logits_to_keep=1) if causal_lm else {}))
    cache = out.past_key_values
    if hasattr(cache, "layers"):
        layers = [(layer.keys, layer.values) for layer in cache.layers]
    else:  # older transformers: a tuple per layer
        layers = [tuple(layer[:2]) for layer in cache]
    return PromptCache(layers, prompt_mask, out.logits[:, -1].float() if causal_lm else None)


@torch.no_grad()
def continue_sampling(lm, cache, mask, next_logits, num_new, temperature, stop_ids, room=None):
    """Samples up to num_new tokens per row after a context whose keys and values are in `cache` (attention `mask`)
    and whose next-token logits are `next_logits`; a row is done at its first stop token or after room[row] tokens.
    Returns (tokens, filled with a stop token after the last step, and the token-forwards run)."""
    rows = len(next_logits)
    room = torch.full((rows,), num_new, device=next_logits.device) if room is None else room
    tokens, done, logits, forwards = [], torch.zeros(rows, dtype=torch.bool, device=next_logits.device), next_logits, 0
    for step in range(num_new):
        if temperature:
            token = torch.multinomial((logits / temperature).softmax(-1), 1)
        else:
            token = logits.argmax(-1, keepdim=True)
        tokens.append(token)
        done |= torch.isin(token[:, 0], stop_ids) | (room <= step + 1)
        if step + 1 == num_new or bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones_like(token)], 1)
        out = lm(input_ids=token, attention_mask=mask, position_ids=mask.sum(1, keepdim=True) - 1,
                 past_key_values=cache, use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1].float()
        forwards += rows
    tokens = torch.cat(tokens, 1)
    return F.pad(tokens, (0, num_new - tokens.shape[1]), value=int(stop_ids[0])), forwards


def sample_responses(lm, prompt_ids, prompt_mask, num_new, temperature, stop_ids):
    """One response per prompt row (`continue_sampling` after the prompts' own cache): (tokens, token-forwards)."""
    cache = prompt_cache(lm, prompt_ids, prompt_mask)
    every_row = torch.arange(len(prompt_ids), device=prompt_ids.device)
    return continue_sampling(lm, cache.for_rows(every_row), prompt_mask, cache.last_logits, num_new, temperature,
                             stop_ids)


@dataclass
class ReferenceBatch:
    """N reference responses for each of a batch of prompts, and what making them cost."""
    prompt_ids: torch.Tensor  # (prompts, P), left-padded
    prompt_mask: torch.Tensor
    lm_cache: PromptCache  # the base model's keys and values of the prompts, reused by the transport
    prompt_of_row: torch.Tensor  # (prompts * N,): the prompt of each particle
    ids: torch.Tensor  # (prompts * N, W) response tokens (length convention above)
    live: torch.Tensor  # (prompts * N, W): 1 through the stop token
    seconds: float
    compute: "ComputeTally"

    @property
    def num_prompts(self):
        return len(self.prompt_ids)


def reference_sampler(rows, args, run):
    """N responses per prompt from mu, each prompt's cache computed once and shared by its N samples."""
    start, tok = time.time(), run.tok
    prompts = [prompt_ids(tok, r["prompt"], args) for r in rows]
    prompt_tokens, prompt_mask = (x.to(run.device) for x in pad(prompts, tok.pad_token_id, left=True))
    compute = ComputeTally(prompt_prefill=int(prompt_mask.sum()))
    lm_cache = prompt_cache(run.lm, prompt_tokens, prompt_mask)
    prompt_of_row = torch.arange(len(rows), device=run.device).repeat_interleave(args.num_particles)
    sampled = []
    for part in micro_batches(len(prompt_of_row), args.micro_batch_size, "reference sampler"):
        prompt = prompt_of_row[part]
        tokens, forwards = continue_sampling(run.lm, lm_cache.for_rows(prompt), prompt_mask[prompt],
                                             lm_cache.last_logits[prompt], args.max_new_tokens, args.temperature,
                                             run.stop_ids)
        sampled.append(tokens)
        compute.sampling += forwards
    width = response_width(args.max_new_tokens)
    ids, live = close_responses(torch.cat(sampled), run.stop_ids, tok.pad_token_id, run.end_id, width)
    synced(run.device)
    return ReferenceBatch(prompt_tokens, prompt_mask, lm_cache, prompt_of_row, ids, live, time.time() - start, compute)


# ALGO LOGIC: transport. The N reference samples of each prompt are the initial particles; one transport of max(L)
# steps is snapshotted at every L of --transport-steps (L = 0 is best-of-N exactly). Three particle spaces:
# `embed` (SVGD on token embeddings), `mh` (Metropolis-Hastings chains toward pi*) and `topk` (greedy baseline).
@dataclass
class ComputeTally:
    """Model token-forwards run for one prompt batch: a position run through the base or the reward model counts 1,
    a backward pass through it 2 more. Passes whose only use is the evaluation's NLL are not counted."""
    prompt_prefill: int = 0  # each prompt once per model: every particle, proposal and step reuses its keys and values
    sampling: int = 0  # the reference sampler's decoding steps (the first token comes with the prompt prefill)
    reward_forward: int = 0  # R of responses (all W columns, as run)
    reward_backward: int = 0  # dR/d(response embeddings): 2 per position
    candidates: int = 0  # base-model passes over responses for mu's top-k next tokens (the first from the prefill)
    suffix_prefix: int = 0  # mh: y_<t run through the base model before a new suffix is sampled
    suffix_sampling: int = 0  # mh: decoding steps of the resampled suffixes

    def total(self):
        return sum(asdict(self).values())


class TokenScores(NamedTuple):
    """mu's view of responses at every column t: log mu(y_t | x, y_<t), and (when asked for) the top-k candidates."""
    logp: torch.Tensor  # (rows, W), 0 after the stop token
    candidates: Optional[torch.Tensor] = None  # (rows, W, k): mu's top-k allowed next tokens after y_<t
    candidate_logp: Optional[torch.Tensor] = None  # (rows, W, k): their log mu
    outside_logmass: Optional[torch.Tensor] = None  # (rows, W): log of mu's probability of every other token


@dataclass
class TransportModels:
    """What a transport may ask of the models. Each call adds the token-forwards it runs to `compute`."""
    reward: Callable  # reward(ids, embeddings=None, with_gradient=False) -> R, or (R, dR/d embeddings)
    token_scores: Callable  # token_scores(ids, top_k=0) -> TokenScores
    resample_suffix: Callable  # resample_suffix(ids, positions, tokens, excluded) -> (ids', stop columns)
    table: torch.Tensor  # the base model's token-embedding table, float32
    allowed: torch.Tensor  # tokens a transport may propose by name (no special tokens; the end token is allowed)
    stop_ids: torch.Tensor
    end_id: int
    compute: ComputeTally
    spacing: Optional[float] = None  # embed: median nearest-neighbour distance of the table


class Snapshot(NamedTuple):
    """The particles after a transport step."""
    ids: torch.Tensor  # (rows, W)
    live: torch.Tensor  # (rows, W): 1 through the stop token
    reward: torch.Tensor  # R of each particle, re-scored on its tokens
    logp_sum: torch.Tensor  # sum over its live tokens of log mu
    seconds: float  # since the transport started (scoring the samples included)
    compute: ComputeTally  # token-forwards of the prompt batch so far (sampling included)
    position: Optional[torch.Tensor] = None  # mh: the column each chain proposed to change
    accepted: Optional[torch.Tensor] = None  # mh, topk: whether each particle moved
    outside: Optional[torch.Tensor] = None  # mh: whether the proposed token was drawn outside mu's top-k


class TransportRecord:
    """Snapshots at the steps in `keep` (and at every step into `trace` when given) and each step's moves."""

    def __init__(self, keep, compute, trace=None):
        self.keep, self.compute, self.trace, self.at, self.start = set(keep), compute, trace, {}, time.time()
        self.moves_by_step = []  # per step: proposals, accepted, outside (mh), outside_accepted (mh)

    def take(self, step, ids, ends, reward, logp, position=None, accepted=None, outside=None):
        live = live_columns(ends, ids.shape[1])
        snapshot = Snapshot(ids.clone(), live, reward.clone(), (logp * live).sum(1), time.time() - self.start,
                            replace(self.compute), position, accepted, outside)
        if step in self.keep:
            self.at[step] = snapshot
        if self.trace is not None:
            self.trace.append(snapshot)
        if accepted is not None:
            moves = dict(proposals=len(accepted), accepted=int(accepted.sum()))
            if outside is not None:
                moves.update(outside=int(outside.sum()), outside_accepted=int((outside & accepted).sum()))
            self.moves_by_step.append(moves)


def transport(start_ids, start_live, models, args, trace=None):
    """Moves the N reference particles of each prompt (rows of start_ids, N consecutive rows per prompt) for
    max(--transport-steps) steps with --transport; returns the TransportRecord of the snapshots."""
    record = TransportRecord(args.transport_steps, models.compute, trace)
    ends = start_live.sum(1) - 1
    algorithm = dict(embed=embed_flow, mh=mh_transport, topk=topk_search)[args.transport]
    algorithm(start_ids.clone(), ends, models, args, record)
    return record


def transport_models(reference, args, run):
    """The reward, mu's token scores and mu's suffix sampler over the reference batch's prompts, each adding the
    token-forwards it runs to the batch's ComputeTally."""
    compute, micro_batch, stop_ids = reference.compute, args.micro_batch_size, run.stop_ids
    rm_cache = prompt_cache(run.rm.backbone, reference.prompt_ids, reference.prompt_mask)
    compute.prompt_prefill += int(reference.prompt_mask.sum())

    def prompt_of(ids):  # rows of ids hold several proposals per particle (topk): same order, same prompts
        rows_per_prompt = len(ids) // reference.num_prompts
        return torch.arange(len(ids), device=ids.device) // rows_per_prompt

    def reward(ids, embeddings=None, with_gradient=False):
        live = through_first_stop(ids, stop_ids).long()
        embeddings = run.embed(ids).float() if embeddings is None else embeddings
        compute.reward_forward += ids.numel()
        if with_gradient:
            compute.reward_backward += 2 * ids.numel()
        out = response_rewards(run.rm, rm_cache, prompt_of(ids), embeddings, live, micro_batch, with_gradient)
        return synced(run.device, out)

    def token_scores(ids, top_k=0):
        if top_k:  # a pass whose only use is the evaluation's NLL is not counted
            compute.candidates += len(ids) * (ids.shape[1] - 1)
        live = through_first_stop(ids, stop_ids).long()
        out = response_token_scores(run.lm, reference.lm_cache, prompt_of(ids), ids, live, run.allowed, top_k,
                                    micro_batch)
        return synced(run.device, out)

    def resample_suffix(ids, positions, tokens, excluded):
        new_ids, new_ends, prefix_forwards, sampling_forwards = resample_suffixes(
            run.lm, reference.lm_cache, prompt_of(ids), ids, positions, tokens, excluded, stop_ids, run.end_id,
            run.tok.pad_token_id, micro_batch)
        compute.suffix_prefix += prefix_forwards
        compute.suffix_sampling += sampling_forwards
        return synced(run.device, (new_ids, new_ends))

    return TransportModels(reward, token_scores, resample_suffix, run.embed.weight.detach().float(), run.allowed,
                           stop_ids, run.end_id, compute, run.spacing)


# Transport `embed`: SVGD, phi(x_i) = (1/N) sum_j [k(x_j, x_i) grad R(x_j) / alpha + grad_{x_j} k(x_j, x_i)]
def svgd_direction(x, score):
    """x, score: (B, N, D) particles of B prompts; RBF kernel with the median bandwidth h = med(d^2) / (2 log(N+1))."""
    n = x.shape[1]
    d2 = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist").pow(2)
    h = torch.quantile(d2.flatten(1), 0.5, dim=1)[:, None, None] / (2 * math.log(n + 1))
    k = torch.exp(-d2 / (2 * h + 1e-6))
    repulsion = (x * k.sum(-1, keepdim=True) - k @ x) * 2 / (2 * h + 1e-6)
    return (k @ score + repulsion) / n


def response_svgd_direction(embeddings, score, changeable, num_particles):
    """SVGD direction for response embeddings (rows, W, d): each particle is its flattened changeable embeddings."""
    keep = changeable[..., None].to(embeddings.dtype)
    per_prompt = lambda t: (t * keep).reshape(len(embeddings) // num_particles, num_particles, -1)
    return svgd_direction(per_prompt(embeddings), per_prompt(score)).view_as(embeddings) * keep


def nearest_tokens(u, table, allowed, chunk=4096):
    """Nearest allowed token of each embedding: argmin_v ||u - E_v||^2 = argmax_v 2 u.E_v - ||E_v||^2."""
    table = table.float()
    bias = table.pow(2).sum(-1).masked_fill(~allowed[: len(table)], torch.inf)
    flat = u.reshape(-1, u.shape[-1]).float()
    ids = [(2 * flat[i : i + chunk] @ table.T - bias).argmax(-1) for i in range(0, len(flat), chunk)]
    return torch.cat(ids).view(u.shape[:-1])


def table_spacing(table, allowed, sample=2048, chunk=256):
    """Median distance from an allowed token's embedding to its nearest allowed neighbour (the embed step's unit)."""
    allowed_ids = allowed[: len(table)].nonzero().flatten()
    shuffled = torch.randperm(len(allowed_ids), generator=torch.Generator().manual_seed(0))[:sample]
    picked = allowed_ids[shuffled.to(allowed_ids.device)]
    table, nearest = table.float(), []
    squared_norms = table[allowed_ids].pow(2).sum(-1)
    for start in range(0, len(picked), chunk):
        rows = table[picked[start : start + chunk]]
        squared_distances = rows.pow(2).sum(-1, keepdim=True) + squared_norms - 2 * rows @ table[allowed_ids].T
        second_smallest = squared_distances.clamp(min=0).topk(2, -1, largest=False).values[:, 1]  # [0]: the token
        nearest.append(second_smallest.sqrt())
    return torch.cat(nearest).median().item()


def end_at_stop(ids, ends, stop_ids, end_id):
    """After single-token swaps: a response ends at its first stop token; one whose stop token became another token
    grows by one (end_id after it), up to the forced-stop column."""
    first = first_stop(ids, stop_ids)
    grows = first > ends
    new_ends = torch.where(grows, (ends + 1).clamp(max=ids.shape[1] - 1), first)
    at_new_end = torch.arange(ids.shape[1], device=ids.device) == new_ends[:, None]
    return torch.where(grows[:, None] & at_new_end, end_id, ids), new_ends


def embed_flow(ids, ends, models, args, record):
    """The paper's configuration as a third-party summary describes it: token embeddings u moved by
    Adam(lr = ε · spacing / √d) on −phi (SVGD of ∇R/α, ∇R at the continuous embeddings), each changeable position
    decoded to the nearest allowed token for scoring only (the particles themselves are never projected)."""
    table, width = models.table, ids.shape[1]
    record.take(0, ids, ends, models.reward(ids), models.token_scores(ids).logp)
    particles = table[ids].clone().requires_grad_(True)
    spacing = models.spacing or table_spacing(table, models.allowed)
    optimizer = torch.optim.Adam([particles], lr=args.step_size * spacing / math.sqrt(particles.shape[-1]))
    for step in range(1, max(args.transport_steps) + 1):
        changeable, current = changeable_columns(ends, width), particles.detach()
        _, gradient = models.reward(ids, current, with_gradient=True)
        particles.grad = -response_svgd_direction(current, gradient / args.alpha, changeable, args.num_particles)
        optimizer.step()
        ids = torch.where(changeable, nearest_tokens(particles.detach(), table, models.allowed), ids)
        ids, ends = end_at_stop(ids, ends, models.stop_ids, models.end_id)
        record.take(step, ids, ends, models.reward(ids), models.token_scores(ids).logp)


# Transport `mh`: value-gradient Metropolis-Hastings toward pi*(y|x) ∝ mu(y|x) exp(R(x, y) / alpha).
OUTSIDE = -1  # a proposed token to be drawn from mu outside the top-k candidates (by the suffix sampler)


class ChainState(NamedTuple):
    """One Metropolis-Hastings chain per row: its response, R, dR/de at its tokens, and mu's candidates."""
    ids: torch.Tensor
    ends: torch.Tensor
    reward: torch.Tensor
    gradient: Optional[torch.Tensor]  # (rows, W, d); None for the gradient-free sampler
    scores: TokenScores  # with the top-k candidates (none for the gradient-free sampler)


class ProposalWeights(NamedTuple):
    """The proposal from a state y, at every column t."""
    log_position: torch.Tensor  # (rows, W): log q(t|y); -inf where nothing may change
    token_logits: torch.Tensor  # (rows, W, k + 1): log mu(v|y_<t) + τΔ_t(v) per candidate, then log mu(outside C_t)
    log_normaliser: torch.Tensor  # (rows, W): log Z_t(y)


class MoveTerms(NamedTuple):
    """The factors of one move's proposal density that do not cancel against pi* (see mh_transport)."""
    log_position: torch.Tensor  # log q(t|y)
    tilt: torch.Tensor  # τ Δ_t(v) 1[v ∈ C_t]
    log_normaliser: torch.Tensor  # log Z_t(y)

    def log_density(self):
        return self.log_position + self.tilt - self.log_normaliser


def gradient_free(args):
    """τ = κ = 0: a uniform column and mu's own next token, so the chain needs neither R's gradient nor mu's top-k."""
    return args.mh_tau == 0 and args.mh_kappa == 0


def chain_state(ids, ends, models, args):
    """R and its gradient at the tokens (one backward through R) and mu's top-k candidates at every column; the
    gradient-free sampler has R only, no candidates (every token lies outside the empty set) and log mu for the NLL."""
    if gradient_free(args):
        scores = models.token_scores(ids)  # log mu only, for the evaluation's NLL
        no_candidates = ids.new_zeros(*ids.shape, 0)
        scores = TokenScores(scores.logp, no_candidates, no_candidates.float(), torch.zeros(ids.shape))
        return ChainState(ids, ends, models.reward(ids), None, scores)
    reward, gradient = models.reward(ids, models.table[ids], with_gradient=True)
    return ChainState(ids, ends, reward, gradient, models.token_scores(ids, args.top_k))


def proposal_weights(state, table, tau, kappa):
    """Δ_t(v) = g_t·(E_v − E_{y_t}) over the candidates C_t (mu's top-k after y_<t), the position proposal
    q(t|y) ∝ exp(κ max_v Δ_t(v)) over the changeable columns, and the token proposal's log-weights
    log mu(v|y_<t) + τΔ_t(v) on C_t and log mu(V \\ C_t | y_<t) for the rest, whose log-sum is log Z_t(y)."""
    changeable = changeable_columns(state.ends, state.ids.shape[1])
    if state.gradient is None:  # gradient-free: every column the same weight, one token weight (all of mu)
        log_position = torch.zeros(changeable.shape).masked_fill(~changeable, -torch.inf).log_softmax(-1)
        token_logits = state.scores.outside_logmass[..., None]  # log 1: no candidates, so nothing is tilted
        return ProposalWeights(log_position, token_logits, token_logits.logsumexp(-1))
    current = table[state.ids]
    gain = ((table[state.scores.candidates] - current[:, :, None]) * state.gradient[:, :, None]).sum(-1)
    log_position = (kappa * gain.max(-1).values).masked_fill(~changeable, -torch.inf).log_softmax(-1)
    token_logits = torch.cat([state.scores.candidate_logp + tau * gain, state.scores.outside_logmass[..., None]], -1)
    return ProposalWeights(log_position, token_logits, token_logits.logsumexp(-1))


def move_terms(state, weights, positions, tokens, table, tau):
    """log q(t|y), τΔ_t(v)·1[v ∈ C_t] and log Z_t(y) of the move from state y that puts token v at column t."""
    rows = torch.arange(len(positions), device=positions.device)
    if state.gradient is None:  # gradient-free: nothing is tilted
        tilt = torch.zeros(len(positions), device=positions.device)
    else:
        gain = (state.gradient[rows, positions] * (table[tokens] - table[state.ids[rows, positions]])).sum(-1)
        in_candidates = (state.scores.candidates[rows, positions] == tokens[:, None]).any(-1)
        tilt = torch.where(in_candidates, tau * gain, 0.0)
    return MoveTerms(weights.log_position[rows, positions], tilt, weights.log_normaliser[rows, positions])


def mh_log_acceptance(current, proposal, forward, reverse, alpha):
    """log A = (R(y') − R(y))/α + log[q(t|y') e^{τΔ'_t(y_t)} / Z_t(y')] − log[q(t|y) e^{τΔ_t(v)} / Z_t(y)]."""
    return (proposal.reward - current.reward) / alpha + reverse.log_density() - forward.log_density()


def keep_accepted(accepted, proposal, current):
    """Each chain's proposal where it was accepted, else its current state, field by field."""
    def pick(new, old):
        return torch.where(accepted.view(-1, *[1] * (new.dim() - 1)), new, old)

    scores = TokenScores(*(pick(new, old) for new, old in zip(proposal.scores, current.scores)))
    gradient = None if current.gradient is None else pick(proposal.gradient, current.gradient)
    return ChainState(pick(proposal.ids, current.ids), pick(proposal.ends, current.ends),
                      pick(proposal.reward, current.reward), gradient, scores)


def mh_step(state, models, args):
    """One proposal and accept/reject per chain. Returns (new state, column t, accepted, drawn outside C_t)."""
    rows = torch.arange(len(state.ids), device=state.ids.device)
    weights = proposal_weights(state, models.table, args.mh_tau, args.mh_kappa)
    positions = torch.multinomial(weights.log_position.exp(), 1)[:, 0]  # t ~ q(t|y)
    choice = torch.multinomial(weights.token_logits[rows, positions].softmax(-1), 1)[:, 0]  # v | t
    candidates = state.scores.candidates[rows, positions]
    outside_option = torch.full((len(rows), 1), OUTSIDE, dtype=candidates.dtype, device=candidates.device)
    choices = torch.cat([candidates, outside_option], 1)  # the last weight: a token of mu outside C_t
    tokens = choices.gather(1, choice[:, None])[:, 0]
    outside = tokens == OUTSIDE
    new_ids, new_ends = models.resample_suffix(state.ids, positions, tokens, candidates)  # y'_>t ~ mu(·|x, y_<t, v)
    proposal = chain_state(new_ids, new_ends, models, args)
    proposed_tokens = new_ids[rows, positions]  # v, including the ones drawn outside C_t
    forward = move_terms(state, weights, positions, proposed_tokens, models.table, args.mh_tau)
    reverse_weights = proposal_weights(proposal, models.table, args.mh_tau, args.mh_kappa)
    reverse = move_terms(proposal, reverse_weights, positions, state.ids[rows, positions], models.table, args.mh_tau)
    log_accept = mh_log_acceptance(state, proposal, forward, reverse, args.alpha)
    accepted = torch.rand(len(rows), device=rows.device).log() < log_accept
    return keep_accepted(accepted, proposal, state), positions, accepted, outside


def mh_transport(ids, ends, models, args, record):
    """One Metropolis-Hastings chain per particle, started from the reference samples. A step from y proposes
      a column t ~ q(t|y) ∝ exp(κ max_{v ∈ C_t} Δ_t(v)) over the columns that may change (through the stop token,
        never the forced stop), Δ_t(v) = g_t·(E_v − E_{y_t}), g_t = dR/de_t at y (one backward through R),
      a token v ~ mu(v|y_<t) e^{τΔ_t(v)·1[v ∈ C_t]} / Z_t(y): the value gradient tilts mu's top-k tokens C_t and every
        other token keeps mu's probability (drawn from mu outside C_t by the suffix sampler),
      a suffix y'_>t ~ mu(·|x, y_<t, v) to a stop token or the length budget,
    and accepts with min(1, A), log A = (R(y') − R(y))/α + log q(t|y') − log q(t|y) + τ(Δ'_t(y_t)1[y_t ∈ C_t] −
    Δ_t(v)1[v ∈ C_t]) + log Z_t(y) − log Z_t(y'), the primed terms taken with the gradient at y'. With
    Q(y→y') = q(t|y) mu(v|y_<t) e^{τΔ_t(v)1[v ∈ C_t]} / Z_t(y) · mu(y'_>t|y_<t, v), every mu factor of
    pi* ∝ mu e^{R/α} cancels in pi*(y') Q(y'→y) / [pi*(y) Q(y→y')]; C_t and mu(·|y_<t) are the same from y and y'.
    What is exact: for any τ, κ ≥ 0 and top-k, each step satisfies detailed balance with pi* (for each t), so pi* is
    invariant; every token mu gives positive probability can be proposed at every changeable column and every move's
    reverse has positive probability, so the chain is irreducible on mu's support and a chain's distribution tends to
    pi* as the steps grow (tested by enumeration). Not exact: L finite (chains start from mu), the returned particle
    (the highest R of N chains, a best-of-N over chain states), and float error between model passes. τ = κ = 0 is
    the gradient-free sampler that resamples the suffix from a uniform column with mu's own next token; it runs
    neither R's backward pass nor mu's top-k pass (log A = (R(y') − R(y))/α + log q(t|y') − log q(t|y), q uniform
    over each response's changeable columns)."""
    record.take(0, ids, ends, models.reward(ids), models.token_scores(ids).logp)
    if max(args.transport_steps) == 0:
        return
    state = chain_state(ids, ends, models, args)
    for step in range(1, max(args.transport_steps) + 1):
        state, positions, accepted, outside = mh_step(state, models, args)
        record.take(step, state.ids, state.ends, state.reward, state.scores.logp, positions, accepted, outside)


# Transport `topk`: a greedy search baseline (not a sampler of pi*)
def topk_search(ids, ends, models, args, record):
    """Ranks single-token swaps to mu's top-k tokens by the first-order gain (E_v − u_t)·phi_t (phi: the SVGD
    direction of ∇R/α), re-scores the --num-proposals best exactly and keeps the best one if it raises
    R/α + lm_coef · log mu; rejected swaps are not proposed again until the particle moves."""
    table, (rows, width), k = models.table, ids.shape, args.top_k
    reward = models.reward(ids)
    record.take(0, ids, ends, reward, models.token_scores(ids).logp)
    if max(args.transport_steps) == 0:
        return
    scores = models.token_scores(ids, k)
    tried = torch.zeros_like(scores.candidates, dtype=torch.bool)  # swaps rejected since the particle last moved
    objective = lambda reward, logp: reward / args.alpha + args.lm_coef * logp.sum(1)  # log pi* + const at lm_coef 1
    num_moves = min(args.num_proposals, width * k)
    for step in range(1, max(args.transport_steps) + 1):
        changeable, embeddings = changeable_columns(ends, width), table[ids]
        _, gradient = models.reward(ids, embeddings, with_gradient=True)
        direction = response_svgd_direction(embeddings, gradient / args.alpha, changeable, args.num_particles)
        gain = ((table[scores.candidates] - embeddings[:, :, None]) * direction[:, :, None]).sum(-1)  # (rows, W, k)
        useless = (scores.candidates == ids[..., None]) | ~changeable[..., None] | tried
        best = gain.masked_fill(useless, -torch.inf).flatten(1).topk(num_moves, -1)
        move_column, move_choice = (best.indices // k).flatten(), (best.indices % k).flatten()
        proposal_rows = torch.arange(rows * num_moves, device=ids.device)
        particle = proposal_rows // num_moves
        proposals = ids.repeat_interleave(num_moves, 0)
        proposals[proposal_rows, move_column] = scores.candidates[particle, move_column, move_choice]
        proposals, proposal_ends = end_at_stop(proposals, ends.repeat_interleave(num_moves), models.stop_ids,
                                               models.end_id)
        proposal_reward, proposal_scores = models.reward(proposals), models.token_scores(proposals, k)
        proposal_objective = objective(proposal_reward, proposal_scores.logp)
        proposal_objective = proposal_objective.masked_fill(~torch.isfinite(best.values.flatten()), -torch.inf)
        best_objective, best_move = proposal_objective.view(rows, num_moves).max(1)
        accepted = best_objective > objective(reward, scores.logp)
        pick = torch.arange(rows, device=ids.device) * num_moves + best_move
        ids = torch.where(accepted[:, None], proposals[pick], ids)
        ends = torch.where(accepted, proposal_ends[pick], ends)
        reward = torch.where(accepted, proposal_reward[pick], reward)
        scores = TokenScores(*(torch.where(accepted.view(-1, *[1] * (new.dim() - 1)), new[pick], old)
                               for new, old in zip(proposal_scores, scores)))
        tried = tried.flatten(1).scatter(1, best.indices, True).view_as(tried) & ~accepted[:, None, None]
        record.take(step, ids, ends, reward, scores.logp, accepted=accepted)


# The transports' model calls over the prompts' caches (built by transport_models)
def response_rewards(rm, cache, prompt_of_row, embeddings, live, micro_batch, with_gradient):
    """R(x, y) of responses given as embeddings (rows, W, d), the prompts' keys and values from `cache`; with
    with_gradient also dR/d(embeddings)."""
    rewards, gradients = [], []
    dtype = rm.backbone.get_input_embeddings().weight.dtype
    for part in micro_batches(len(embeddings), micro_batch, "reward model"):
        prompts = prompt_of_row[part]
        inputs = embeddings[part].detach().to(dtype).requires_grad_(with_gradient)
        mask = torch.cat([cache.mask[prompts], live[part]], 1)
        with torch.set_grad_enabled(with_gradient):
            reward = rm(inputs, mask, inputs.shape[1], past_key_values=cache.for_rows(prompts))
        if with_gradient:
            gradients.append(torch.autograd.grad(reward.sum(), inputs)[0].float())
        rewards.append(reward.detach())
    return (torch.cat(rewards), torch.cat(gradients)) if with_gradient else torch.cat(rewards)


@torch.no_grad()
def response_token_scores(lm, cache, prompt_of_row, ids, live, allowed, top_k, micro_batch):
    """log mu(y_t | x, y_<t) at every column and, with top_k, mu's top-k allowed next tokens after y_<t, their log mu
    and the log-mass of all other tokens. The prompt's cached logits give column 0; one pass over y_0 .. y_{W-2}
    gives columns 1 .. W - 1."""
    width, parts = ids.shape[1], []
    for part in micro_batches(len(ids), micro_batch, "base model"):
        prompts, rows_ids = prompt_of_row[part], ids[part]
        logits = cache.last_logits[prompts][:, None]
        if width > 1:
            mask = torch.cat([cache.mask[prompts], live[part][:, :-1]], 1)
            positions = (mask.cumsum(1) - 1).clamp(min=0)[:, -(width - 1) :]
            out = lm(input_ids=rows_ids[:, :-1], attention_mask=mask, position_ids=positions,
                     past_key_values=cache.for_rows(prompts), use_cache=True)
            logits = torch.cat([logits, out.logits.float()], 1)
        logp_all = logits.log_softmax(-1)
        logp = logp_all.gather(-1, rows_ids[..., None]).squeeze(-1) * live[part]
        if not top_k:
            parts.append(TokenScores(logp))
            continue
        candidates = logits.masked_fill(~allowed[: logits.shape[-1]], -torch.inf).topk(top_k, -1).indices
        outside_logmass = logp_all.scatter(-1, candidates, -torch.inf).logsumexp(-1)
        parts.append(TokenScores(logp, candidates, logp_all.gather(-1, candidates), outside_logmass))
    if not top_k:
        return TokenScores(torch.cat([p.logp for p in parts]))
    return TokenScores(*(torch.cat(column) for column in zip(*parts)))


@torch.no_grad()
def resample_suffixes(lm, cache, prompt_of_row, ids, positions, tokens, excluded, stop_ids, end_id, pad_id,
                      micro_batch):
    """y'_<t = y_<t; y'_t = tokens[row], or where it is OUTSIDE a draw from mu(·|x, y_<t) without the tokens of
    excluded[row]; y'_>t ~ mu(·|x, y_<t, y'_t) to a stop token or the last sampled column (then a forced stop). The
    prompts come from `cache`; y_<t runs through the base model once. Returns (ids', stop columns, prefix
    token-forwards, sampling token-forwards)."""
    width = ids.shape[1]
    new_rows, prefix_forwards, sampling_forwards = [], 0, 0
    for part in micro_batches(len(ids), micro_batch, "suffix sampler"):
        prompts, rows_ids, t = prompt_of_row[part], ids[part], positions[part]
        mask, kv, logits = cache.mask[prompts], cache.for_rows(prompts), cache.last_logits[prompts]
        prefix_width = int(t.max())
        if prefix_width > 0:  # y_<t, right-padded to the longest prefix; the padding is masked out
            prefix_live = (torch.arange(prefix_width, device=ids.device) < t[:, None]).long()
            mask = torch.cat([mask, prefix_live], 1)
            out = lm(input_ids=rows_ids[:, :prefix_width], attention_mask=mask, use_cache=True, past_key_values=kv,
                     position_ids=(mask.cumsum(1) - 1).clamp(min=0)[:, -prefix_width:])
            kv = out.past_key_values
            after_prefix = out.logits[torch.arange(len(t), device=ids.device), (t - 1).clamp(min=0)].float()
            logits = torch.where((t > 0)[:, None], after_prefix, logits)
            prefix_forwards += len(t) * prefix_width
        given = tokens[part] != OUTSIDE
        only_given = torch.full_like(logits, -torch.inf).scatter(1, tokens[part].clamp(min=0)[:, None], 0.0)
        without_excluded = logits.scatter(1, excluded[part], -torch.inf)
        first_logits = torch.where(given[:, None], only_given, without_excluded)
        room = last_sampled_column(width) - t + 1  # tokens from column t through the last sampled column
        sampled, forwards = continue_sampling(lm, kv, mask, first_logits, int(room.max()), 1.0, stop_ids, room)
        sampling_forwards += forwards
        columns = torch.arange(width - 1, device=ids.device)
        from_sample = sampled.gather(1, (columns - t[:, None]).clamp(0, sampled.shape[1] - 1))
        new_rows.append(torch.where(columns < t[:, None], rows_ids[:, : width - 1], from_sample))
    new_ids, live = close_responses(torch.cat(new_rows), stop_ids, pad_id, end_id, width)
    return new_ids, live.sum(1) - 1, prefix_forwards, sampling_forwards


# ALGO LOGIC: evaluation. Per prompt, at every L: the particle of highest R (VGF's selection; L = 0 is best-of-N),
# scored by judges that never drove the transport, its NLL under mu, the compute spent, and a uniformly chosen
# particle for the KL estimate; best-of-n for n below N from the same samples (the frontier of one draw).
class Selected(NamedTuple):
    index: torch.Tensor  # row of the selected particle, one per prompt
    ids: torch.Tensor
    reward: torch.Tensor
    nll: torch.Tensor  # per token
    live: torch.Tensor


def select(snapshot, num_particles):
    """Argmax of the re-scored reward over each prompt's particles (L = 0: best-of-N exactly)."""
    reward = snapshot.reward
    nll = -snapshot.logp_sum / snapshot.live.sum(1).clamp(min=1)
    first_row = torch.arange(len(reward) // num_particles, device=reward.device) * num_particles
    best = reward.view(-1, num_particles).argmax(1) + first_row
    return Selected(best, snapshot.ids[best], reward[best], nll[best], snapshot.live[best])


class Judge:
    """Scores (prompt, response) texts with a model that did not drive the transport."""

    def __init__(self, spec, args, device, dtype, fallback, shared=None):
        self.kind, self.name = "fallback", spec or "transport reward model (not independent)"
        if spec == "vader":  # VADER's compound score (check_args made sure the package is there)
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
            analyzer = SentimentIntensityAnalyzer()
            self.kind, self.lexicon = "lexicon", lambda t: analyzer.polarity_scores(t)["compound"]
        elif spec == "afinn":  # the sum of the AFINN-165 valences of the words
            from afinn import Afinn
            self.kind, self.lexicon = "lexicon", lambda t, a=Afinn(): float(a.score(t))
        elif spec and os.path.isfile(os.path.join(spec, "vgf_reward.json")):
            self.kind, self.tok = "rm", load_tokenizer(spec)
            self.rm = RewardModel.load(spec, dtype, shared)[0].to(device).eval()
            self.end = stop_tokens(self.tok, None, args.chat_template)[1]
        elif spec:
            from transformers import AutoModelForSequenceClassification, AutoTokenizer
            self.kind, self.tok = "hub", from_pretrained(AutoTokenizer, spec)
            self.model = from_pretrained(AutoModelForSequenceClassification, spec, dtype=dtype).to(device).eval()
            self.label = judge_label(self.model.config, spec)
        else:
            self.tok, self.rm, self.end = fallback
        self.args, self.device = args, device

    @torch.no_grad()
    def __call__(self, prompts, responses):
        if self.kind == "lexicon":
            return [self.lexicon(r) for r in responses]
        if self.kind == "hub":
            if self.tok.chat_template:  # a chat reward model scores the conversation in its own template
                texts = [self.tok.apply_chat_template(to_turns(p) + [{"role": "assistant", "content": r}],
                                                      tokenize=False) for p, r in zip(prompts, responses)]
                enc = self.tok(texts, return_tensors="pt", padding=True, truncation=True, add_special_tokens=False)
            else:
                enc = self.tok([prompt_text(p) for p in prompts], responses, return_tensors="pt", padding=True,
                               truncation=True)
            logits = self.model(**enc.to(self.device)).logits.float()
            if logits.shape[1] == 1:
                return logits[:, 0].tolist()
            others = torch.cat([logits[:, : self.label], logits[:, self.label + 1 :]], 1)
            return (logits[:, self.label] - others.logsumexp(1)).tolist()  # log-odds of the positive label
        prompt_lists = [prompt_ids(self.tok, x, self.args) for x in prompts]
        response_lists = [response_ids(self.tok, y, self.args.rm_max_response_tokens, self.end) for y in responses]
        scores = []
        for part in micro_batches(len(prompts), self.args.micro_batch_size, "judge"):
            scores += sequence_outputs(self.rm, prompt_lists[part], response_lists[part], self.tok.pad_token_id,
                                       self.device).tolist()
        return scores


def edit_distance(a, b):
    """Levenshtein distance between two token lists."""
    previous_row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        row = [i]
        for j, y in enumerate(b, 1):
            substitution = 0 if x == y else 1
            row.append(min(previous_row[j] + 1, row[j - 1] + 1, previous_row[j - 1] + substitution))
        previous_row = row
    return previous_row[-1]


def evaluate_batch(rows, reference, record, args, run):
    """Per prompt: the plain sample (particle 0), the dataset's chosen response, at every L the particle of highest R
    (L = 0: best-of-N) and a uniformly chosen one (KL estimate E[R]/α − log Z, log Z = log mean exp(R/α) over mu's N
    samples), and best-of-n for every --best-of-n."""
    tok, num_prompts, n, stop_ids = run.tok, reference.num_prompts, args.num_particles, run.stop_ids
    start = record.at[0]
    chosen = [response_ids(tok, r["chosen"], args.rm_max_response_tokens, run.end_id) for r in rows]
    chosen_ids, chosen_live = (x.to(run.device) for x in pad(chosen, tok.pad_token_id, left=False))
    every_prompt = torch.arange(num_prompts, device=run.device)
    chosen_logp = response_token_scores(run.lm, reference.lm_cache, every_prompt, chosen_ids, chosen_live, run.allowed,
                                        0, args.micro_batch_size).logp.sum(1) / chosen_live.sum(1)

    def words(snapshot, row):  # the response's tokens without padding and stop tokens
        ids = snapshot.ids[row]
        return ids[snapshot.live[row].bool() & ~torch.isin(ids, stop_ids)]

    text_of = lambda snapshot, row: tok.decode(words(snapshot, row), skip_special_tokens=True)
    nll_of = lambda snapshot, row: (-snapshot.logp_sum[row] / snapshot.live[row].sum()).item()
    prompts, sample_row = [r["prompt"] for r in rows], every_prompt * n
    judged = lambda texts: {name: judge(prompts, texts) for name, judge in run.judges}
    records = [dict(prompt=r["prompt"], chosen=r["chosen"], sample=text_of(start, i), nll_sample=nll_of(start, i),
                    nll_chosen=-chosen_logp[b].item(), vgf={}, best_of_n={})
               for b, (r, i) in enumerate(zip(rows, sample_row))]
    for key, texts in (("sample", [r["sample"] for r in records]), ("chosen", [r["chosen"] for r in rows])):
        for name, scores in judged(texts).items():
            for rec, score in zip(records, scores):
                rec[f"{name}_{key}"] = score
    log_z = (start.reward.view(num_prompts, n) / args.alpha).logsumexp(1) - math.log(n)
    uniform = torch.randint(n, (num_prompts,), generator=run.draws).to(run.device) + sample_row
    start_tokens = torch.where(start.live.bool(), start.ids, -1)
    per_prompt = lambda x: x / num_prompts
    for L in sorted(record.at):
        snapshot = record.at[L]
        best = select(snapshot, n).index
        moved = (torch.where(snapshot.live.bool(), snapshot.ids, -1) != start_tokens).any(1)
        moved = moved.view(num_prompts, n).float().mean(1)
        texts = [text_of(snapshot, i) for i in best]
        scores = judged(texts)
        for b, i in enumerate(best):
            before, after = words(start, i).tolist(), words(snapshot, i).tolist()
            distance, uniform_reward = edit_distance(before, after), snapshot.reward[uniform[b]]
            records[b]["vgf"][str(L)] = dict(
                text=texts[b], reward=snapshot.reward[i].item(), nll=nll_of(snapshot, i), edit_distance=distance,
                changed=distance / max(1, len(before)), length=len(after), particles_moved=moved[b].item(),
                seconds=per_prompt(reference.seconds + snapshot.seconds),
                forwards=per_prompt(snapshot.compute.total()), uniform_reward=uniform_reward.item(),
                kl_estimate=(uniform_reward / args.alpha - log_z[b]).item(), **{k: x[b] for k, x in scores.items()})
    # best-of-m from the first m samples: the prompt prefills once, sampling and scoring m of the N samples
    prefill = start.compute.prompt_prefill
    for m in args.best_of_n:
        best = start.reward.view(num_prompts, n)[:, :m].argmax(1) + sample_row
        scores = judged([text_of(start, i) for i in best])
        for b, i in enumerate(best):
            records[b]["best_of_n"][str(m)] = dict(
                reward=start.reward[i].item(), nll=nll_of(start, i),
                seconds=per_prompt(reference.seconds + start.seconds) * m / n,
                forwards=per_prompt(prefill + (start.compute.total() - prefill) * m / n),
                **{k: x[b] for k, x in scores.items()})
    last = record.at[max(record.at)]
    stage = dict(sampling=per_prompt(reference.seconds), scoring=per_prompt(start.seconds))  # seconds per prompt
    steps = max(args.transport_steps)
    stage["transport_step"] = per_prompt(last.seconds - start.seconds) / steps if steps else 0.0
    forwards_by_term = {term: per_prompt(count) for term, count in asdict(last.compute).items()}
    return [dict(r, seconds_by_stage=stage, forwards_by_term=forwards_by_term) for r in records]


def trajectory_rows(rows, trace, args, run):
    """Every particle after every step: text, R, NLL/token (--save-trajectories)."""
    n, stop_ids = args.num_particles, run.stop_ids

    def step(t, snapshot, row):
        ids, live = snapshot.ids[row], snapshot.live[row]
        text = run.tok.decode(ids[live.bool() & ~torch.isin(ids, stop_ids)], skip_special_tokens=True)
        return dict(step=t, text=text, reward=snapshot.reward[row].item(),
                    nll=(-snapshot.logp_sum[row] / live.sum()).item())

    return [dict(prompt=row["prompt"], transport=args.transport,
                 particles=[[step(t, s, i) for t, s in enumerate(trace)] for i in range(b * n, (b + 1) * n)])
            for b, row in enumerate(rows)]


def se(x):
    return float(np.std(x, ddof=1) / math.sqrt(len(x))) if len(x) > 1 else 0.0


def compare(entries, bon, judges):
    """Means of entries (one dict per prompt) and, per judge and for NLL, the paired difference to best-of-N."""
    names = dict(nll="nll_per_token", changed="tokens_changed", seconds="seconds_per_prompt",
                 forwards="forwards_per_prompt")
    out = {names.get(k, k): float(np.mean([e[k] for e in entries])) for k in entries[0] if k != "text"}
    for j in judges + ["nll"]:
        x, diff = np.array([e[j] for e in entries]), np.array([e[j] - b[j] for e, b in zip(entries, bon)])
        out.update({f"{j}_se": se(x), f"{j}_diff_vs_best_of_n": float(diff.mean()), f"{j}_diff_se": se(diff),
                    f"{j}_better_worse_vs_best_of_n": [int((diff > 0).sum()), int((diff < 0).sum())]})
    return out


def summarise(records, moves_by_step, args, run):
    """summary.json: per L, per best-of-n and for the plain sample and the chosen response; moves per step."""
    judges, bon, results = [name for name, _ in run.judges], [r["vgf"]["0"] for r in records], {}
    for L in sorted(set(args.transport_steps)):
        at_L = [r["vgf"][str(L)] for r in records]
        result = results[str(L)] = dict(compare(at_L, bon, judges),
                                        kl_estimate_se=se([x["kl_estimate"] for x in at_L]))
        judge = np.array([x["judge"] for x in at_L])
        for key, other in (("best_of_n", [x["judge"] for x in bon]), ("sample", [r["judge_sample"] for r in records]),
                           ("chosen", [r["judge_chosen"] for r in records])):  # share of prompts won, ties half
            other = np.array(other)
            won = np.where(judge > other, 1.0, np.where(judge == other, 0.5, 0.0))
            result[f"win_rate_vs_{key}"] = float(won.mean())
        for name, value in result.items():
            if not isinstance(value, list):
                run.writer.add_scalar(f"eval/{name}", value, L)
    frontier = {str(m): dict(compare([r["best_of_n"][str(m)] for r in records], bon, judges),
                             kl_bound=math.log(m) - (m - 1) / m) for m in args.best_of_n}  # KL(best-of-m || mu) bound
    plain = lambda key: dict(**{j: float(np.mean([r[f"{j}_{key}"] for r in records])) for j in judges},
                             **{f"{j}_se": se([r[f"{j}_{key}"] for r in records]) for j in judges},
                             nll_per_token=float(np.mean([r[f"nll_{key}"] for r in records])))
    mean_of = lambda key: {k: float(np.mean([r[key][k] for r in records])) for k in records[0][key]}
    moves = [dict(step=step, accepted_share=m["accepted"] / m["proposals"],
                  **({} if "outside" not in m else dict(
                      outside_share=m["outside"] / m["proposals"],
                      outside_accepted_share=m["outside_accepted"] / max(1, m["outside"]))))
             for step, m in enumerate(moves_by_step, 1)]
    return dict(run_name=run.name, judge=run.judges[0][1].name, judges={n: j.name for n, j in run.judges},
                num_prompts=len(records), reward_model=dict(run.rm_info, path=run.rm_path), sample=plain("sample"),
                chosen=plain("chosen"), seconds_per_prompt_by_stage=mean_of("seconds_by_stage"),
                forwards_per_prompt_by_term=mean_of("forwards_by_term"), moves_by_step=moves, transport=results,
                best_of_n=frontier, args=asdict(args))


def report(summary, records, trajectories, args, run):
    """Prints the table and writes summary.json, samples.jsonl, trajectories.jsonl and judge_vs_compute.png."""
    js = list(summary["judges"])
    print(f"\njudges: {summary['judges']}; {len(records)} prompts, N={args.num_particles}, transport={args.transport}")
    print(f"{'method':<14}" + "".join(f"{j:>14}{'diff vs BoN':>16}" for j in js)
          + f"{'NLL/tok':>9}{'KL est':>8}{'changed':>9}{'length':>8}{'s/prompt':>10}{'fwd/prompt':>11}")
    rows = [(k, summary[k]) for k in ("sample", "chosen")] + [
        (f"best-of-{m}", x) for m, x in summary["best_of_n"].items()] + [
        ("best-of-N" if L == "0" else f"VGF L={L}", x) for L, x in summary["transport"].items()]
    for label, x in rows:
        line = f"{label:<14}" + "".join(f"{x[j]:>8.3f}±{x[f'{j}_se']:.3f}" + (
            f"{x[f'{j}_diff_vs_best_of_n']:>+10.3f}±{x[f'{j}_diff_se']:.3f}" if f"{j}_diff_se" in x else " " * 16)
            for j in js) + f"{x['nll_per_token']:>9.2f}"
        if "forwards_per_prompt" in x:
            kl = x.get("kl_estimate", x.get("kl_bound"))
            line += (f"{kl:>8.2f}{x.get('tokens_changed', 0):>9.2f}{x.get('length', 0):>8.1f}"
                     f"{x['seconds_per_prompt']:>10.2f}{x['forwards_per_prompt']:>11.0f}")
        print(line)
    if summary["moves_by_step"]:
        print("accepted per step: " + ", ".join(f"{m['accepted_share']:.2f}" for m in summary["moves_by_step"]))
    print("seconds per prompt: " + ", ".join(f"{k} {v:.3f}" for k, v in summary["seconds_per_prompt_by_stage"].items()))
    folder = run.folder.path
    plot_runs([summary], folder)
    write_text(os.path.join(folder, "samples.jsonl"), "".join(json.dumps(r) + "\n" for r in records))
    if args.save_trajectories:
        write_text(os.path.join(folder, "trajectories.jsonl"), "".join(json.dumps(r) + "\n" for r in trajectories))
    write_text(os.path.join(folder, "summary.json"), json.dumps(summary, indent=2))  # last: it marks a finished run
    print(f"wrote {folder}/summary.json, samples.jsonl and judge_vs_compute.png")


def evaluation_prompts(test_rows, args):
    """The first --num-eval-prompts distinct held-out prompts (conversational ones are lists of messages)."""
    distinct = {}
    for row in test_rows:
        distinct.setdefault(json.dumps(row["prompt"]), row)
    if len(distinct) < args.num_eval_prompts:
        print(f"warning: --num-eval-prompts {args.num_eval_prompts}: the held-out data has {len(distinct)} distinct "
              f"prompts; evaluating those {len(distinct)}")
    return list(distinct.values())[: args.num_eval_prompts]


LARGE_BATCH_ROWS = 4096  # a prompt batch with more responses than this gets a size estimate before it starts


def announce_size(batch_index, num_batches, num_prompts, args, run):
    """How much work and memory a large prompt batch needs, before it starts."""
    rows = num_prompts * args.num_particles
    if rows <= LARGE_BATCH_ROWS:
        return
    width, (vocabulary, hidden) = response_width(args.max_new_tokens), run.embed.weight.shape
    particles_gib = 3 * rows * width * hidden * 4 / 2**30  # the particles' embeddings, dR/de and a working copy
    logits_gib = min(rows, args.micro_batch_size) * width * vocabulary * 4 / 2**30  # a micro-batch's logits
    print(f"prompt batch {batch_index + 1}/{num_batches}: {rows} responses ({num_prompts} prompts x "
          f"{args.num_particles} particles) of up to {args.max_new_tokens} tokens: sampling runs up to "
          f"{rows * args.max_new_tokens:.3g} token-forwards; memory: about {particles_gib:.1f} GiB for the particles' "
          f"embeddings and gradients, {logits_gib:.1f} GiB for the logits of one micro-batch (--micro-batch-size "
          f"{args.micro_batch_size}). Progress is printed every {PROGRESS_SECONDS:.0f} s.", flush=True)


def main(args):
    check_args(args)
    run = setup(args)  # the run folder is claimed before any model loads; data problems surface before the model
    STAGE[0] = "training the reward model"
    value_learning(args, run, run.train_rows, run.test_rows)
    prompts, size = evaluation_prompts(run.test_rows, args), args.prompt_batch_size
    batches = [prompts[i : i + size] for i in range(0, len(prompts), size)]
    records, trajectories, moves_by_step = [], [], []
    torch.manual_seed(args.seed)  # the reference sampler's stream, the same whatever the transport draws
    run.draws = torch.Generator().manual_seed(args.seed)  # the uniformly chosen particle per prompt
    for k, rows in enumerate(batches):
        announce_size(k, len(batches), len(rows), args, run)
        STAGE[0] = "sampling from the base model"
        reference = reference_sampler(rows, args, run)  # reference sampler mu: N responses per prompt
        STAGE[0] = f"the {args.transport} transport"
        models = transport_models(reference, args, run)
        trace = [] if args.save_trajectories else None
        # transport: one run of max(L) steps, snapshotted at each L; its draws (mh) on a stream of their own
        with torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []):
            torch.manual_seed(args.seed + ((k + 1) << 32))
            record = transport(reference.ids, reference.live, models, args, trace)
        STAGE[0] = "evaluating"
        records += evaluate_batch(rows, reference, record, args, run)  # evaluation of each L
        for step, moves in enumerate(record.moves_by_step):
            if step == len(moves_by_step):
                moves_by_step.append(dict.fromkeys(moves, 0))
            for key, count in moves.items():
                moves_by_step[step][key] += count
        if trace is not None:
            trajectories += trajectory_rows(rows, trace, args, run)
        print(f"prompt batch {k + 1}/{len(batches)}: " + ", ".join(
            f"L={L} judge {np.mean([r['vgf'][str(L)]['judge'] for r in records[-len(rows):]]):.3f}"
            for L in sorted(record.at)), flush=True)
    STAGE[0] = "writing the results"
    report(summarise(records, moves_by_step, args, run), records, trajectories, args, run)
    run.writer.close()
    run.folder.finish()
    return run.folder.path


# ======================================================================================================================
# Everything below: loading models and data, checks, run folders, writing files, plots. Nothing below changes the
# algorithm.
# ======================================================================================================================
STAGE = ["starting"]  # what main is doing, named in an out-of-memory error


def first_line(error):
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def looks_local(name: str):
    """A path rather than a hub id (`org/name`): absolute, relative, home-based, nested, or a data/model file."""
    files = (".gguf", ".jsonl", ".json", ".parquet", ".csv", ".txt")
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or name.lower().endswith(files)


def resolve_model(name: str, gguf_file: Optional[str]):
    """(path, gguf_file) of --model; a local one must be a folder with config.json (or pass GGUF weights)."""
    if name.endswith(".gguf") and os.path.isfile(name):
        return os.path.dirname(os.path.abspath(name)), os.path.basename(name)
    if not os.path.exists(name) and looks_local(name):
        raise VGFError(f"--model {name}: no such file or folder")
    if os.path.isfile(name):
        raise VGFError(f"--model {name} is a file but not a .gguf model; pass a model folder (config.json and "
                       "weights), a .gguf file or a hub id")
    if os.path.isdir(name) and not gguf_file and not os.path.isfile(os.path.join(name, "config.json")):
        ggufs = sorted(f for f in os.listdir(name) if f.endswith(".gguf"))
        hint = f"; for its GGUF weights add --gguf-file {ggufs[0]}" if ggufs else ""
        raise VGFError(f"--model {name}: the folder holds no config.json, so it is not a model folder{hint}. Pass a "
                       "folder written by save_pretrained or `hf download`, a .gguf file or a hub id")
    if gguf_file and os.path.isdir(name) and not os.path.isfile(os.path.join(name, gguf_file)):
        raise VGFError(f"--gguf-file {gguf_file}: not found in the --model folder {name}")
    if not os.path.exists(name) and "/" not in name:
        short = {"Qwen": "Qwen/", "SmolLM": "HuggingFaceTB/", "Llama": "meta-llama/", "gemma": "google/"}
        prefix = next((p for k, p in short.items() if name.startswith(k)), None)
        if prefix is None:
            raise VGFError(f"--model {name!r}: not a folder and not a hub id; pass `org/name` or a local folder")
        name = prefix + name
    return name, gguf_file


def from_pretrained(cls, name, **kw):
    """cls.from_pretrained with one clear error line: a missing package, a damaged local file, or how to get a hub
    model without network access."""
    local = os.path.isdir(name)
    config = os.path.join(name, "config.json")
    if local and os.path.isfile(config):
        try:
            with open(config, encoding="utf-8") as f:
                json.load(f)
        except (ValueError, UnicodeDecodeError) as e:
            raise VGFError(f"{config} is not valid JSON ({first_line(e)}); repair it or save the model again") from None
    try:
        return cls.from_pretrained(name, **kw)
    except ImportError as e:  # GGUF files need gguf (and accelerate to load), hub data needs datasets
        raise VGFError(f"loading {name!r} needs a missing package: {first_line(e)}\n"
                       "install it, e.g. `pip install gguf accelerate` for a .gguf model") from None
    except (OSError, ValueError) as e:
        if "pip install" in str(e):  # transformers names a missing package (gguf, accelerate) in a ValueError
            raise VGFError(f"loading {name!r} needs a missing package: {first_line(e)}") from None
        if local:
            raise VGFError(f"could not load the model folder {name} ({type(e).__name__}: {first_line(e)})") from None
        raise VGFError(f"could not load {name!r} ({type(e).__name__}: {first_line(e)}).\nWithout network access, "
                       "download it beforehand (`hf download <id>` on a connected machine, then copy the HF cache or "
                       "set HF_HOME) or pass a local folder: --model /path/to/folder (--gguf-file for GGUF).") from None
    except Exception as e:  # a truncated or damaged weights file (safetensors raises its own error type)
        if "safetensor" not in type(e).__name__.lower():
            raise
        raise VGFError(f"the weights in {name} are damaged or incomplete ({first_line(e)}); copy or save them "
                       "again") from None


def read_reward_model_info(folder):
    path = os.path.join(folder, "vgf_reward.json")
    if not os.path.isfile(path):
        raise VGFError(f"{folder!r} is not a reward model of this program (no vgf_reward.json / value_head.pt)")
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
        if not isinstance(info, dict):
            raise ValueError("not a JSON object")
        return info
    except (ValueError, UnicodeDecodeError) as e:
        raise VGFError(f"{path} is not valid JSON ({first_line(e)}); train the reward model again") from None


def load_tokenizer(path, gguf_file=None):
    from transformers import AutoTokenizer
    tok = from_pretrained(AutoTokenizer, path, gguf_file=gguf_file)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def end_of_turn(tok):
    """The special token that closes an assistant turn in the chat template (`<|im_end|>` for ChatML), or None."""
    marker = "vgf-probe-7Q"
    try:
        text = tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}],
                                       tokenize=False)
    except Exception:
        return None
    ids = tok(text[text.rfind(marker) + len(marker) :].lstrip(), add_special_tokens=False)["input_ids"][:1]
    special = set(tok.all_special_ids) | set(getattr(tok, "added_tokens_decoder", {}))
    return ids[0] if ids and ids[0] in special else None


def stop_tokens(tok, generation_config, chat_template):
    """Ids that end a response (EOS of tokenizer and generation config; when templated, the template's end-of-turn
    token, e.g. `<|im_end|>` beside `<|endoftext|>`) and the id that closes responses (end of turn when templated)."""
    ids = {tok.eos_token_id} | set(np.atleast_1d(getattr(generation_config, "eos_token_id", None) or []).tolist())
    eot = end_of_turn(tok) if chat_template and tok.chat_template else None
    return sorted(i for i in ids | {eot} if i is not None), tok.eos_token_id if eot is None else eot


def read_jsonl(path):
    """Preference rows of a local JSONL: one JSON object with prompt, chosen and rejected strings per line."""
    rows = []
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise VGFError(f"{path}, line {i}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                               "save the file as UTF-8") from None
            if not line.strip():
                continue
            if i == 1 and line.lstrip().startswith("["):
                raise VGFError(f"{path} starts with `[`, a JSON array; JSONL is expected: one JSON object per line, "
                               "e.g. {\"prompt\": ..., \"chosen\": ..., \"rejected\": ...}")
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise VGFError(f"{path}, line {i}: invalid JSON ({e.msg}); expected one object per line") from None
            for key in ("prompt", "chosen", "rejected"):
                if not isinstance(row, dict) or not isinstance(row.get(key), str):
                    raise VGFError(f"{path}, line {i}: key {key!r} missing or not a string")
            rows.append(row)
    if len(rows) < 2:
        raise VGFError(f"{path}: needs at least 2 preference rows, found {len(rows)}")
    return rows


def to_turns(prompt):
    """Chat turns: conversational rows keep their roles, HH transcripts split at Human/Assistant, else one user turn."""
    if not isinstance(prompt, str):
        return [{"role": m["role"], "content": m["content"]} for m in prompt]
    turns, role = [], "user"
    if "\n\nHuman:" in prompt:
        for part in prompt.replace("\n\nAssistant:", "\n\nHuman:").split("\n\nHuman:")[1:]:
            if part.strip():
                turns.append({"role": role, "content": part.strip()})
            role = "assistant" if role == "user" else "user"
        turns = turns if turns and turns[-1]["role"] == "user" else turns[:-1]
    return turns or [{"role": "user", "content": prompt}]


def prompt_text(prompt):
    """A prompt as one string (for records and text judges)."""
    return prompt if isinstance(prompt, str) else "\n\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def preference_row(r):
    """One (prompt, chosen, rejected) from HH, TRL preference data (also messages) or summarize_from_feedback rows."""
    if "prompt" in r:  # a response: a string, or conversational messages (their contents joined)
        as_text = lambda x: x if isinstance(x, str) else "\n".join(m["content"] for m in x)
        return dict(prompt=r["prompt"], chosen=as_text(r["chosen"]), rejected=as_text(r["rejected"]))
    if "summaries" in r:  # the post in the TL;DR layout of trl-lib/tldr-preference
        k, texts, info = int(r["choice"]), [x["text"] for x in r["summaries"]], r["info"]
        head = f"SUBREDDIT: r/{info['subreddit']}\n" if info.get("subreddit") else ""
        body = info.get("post") or info.get("article") or ""
        return dict(prompt=f"{head}TITLE: {info.get('title') or ''}\nPOST: {body}\nTL;DR:", chosen=texts[k],
                    rejected=texts[1 - k])
    if not isinstance(r["chosen"], str):  # implicit prompt: the shared messages before the last one
        return dict(prompt=r["chosen"][:-1], chosen=r["chosen"][-1]["content"], rejected=r["rejected"][-1]["content"])
    # HH: the prompt is everything up to the last "\n\nAssistant:", the response what follows
    answer = "\n\nAssistant:"
    chosen_start, rejected_start = (t.rfind(answer) + len(answer) for t in (r["chosen"], r["rejected"]))
    return dict(prompt=r["chosen"][:chosen_start], chosen=r["chosen"][chosen_start:].strip(),
                rejected=r["rejected"][rejected_start:].strip())


def check_dataset(args):
    """Fails before any model loads when --dataset names a missing file or folder; True for a local JSONL."""
    if not os.path.exists(args.dataset) and looks_local(args.dataset):
        raise VGFError(f"--dataset {args.dataset}: no such file or folder (pass a JSONL, a dataset folder or a hub id)")
    local = os.path.isfile(args.dataset) and args.dataset.endswith((".jsonl", ".json")) and not args.dataset_config
    if not local and importlib.util.find_spec("datasets") is None:
        raise VGFError(f"--dataset {args.dataset}: hub datasets need the `datasets` package (`pip install datasets`)")
    return local


def load_preferences(args):
    """(train rows, held-out rows). A local JSONL holds out its last lines; hub data is shuffled with --seed."""
    if check_dataset(args):
        rows = read_jsonl(args.dataset)
        n_test = max(1, int(len(rows) * args.eval_fraction))
        return usable_pairs(rows[:-n_test], "training", args), usable_pairs(rows[-n_test:], "held-out", args)
    import datasets
    try:
        data = datasets.load_dataset(args.dataset, args.dataset_config, data_dir=args.dataset_subset)
    except ValueError as e:
        msg = str(e)
        if "Config name is missing" in msg or "BuilderConfig" in msg:
            configs = msg[msg.find("[") : msg.find("]") + 1] if "[" in msg else "see the dataset card"
            raise VGFError(f"--dataset {args.dataset} has several configurations {configs}: pick one with "
                           "--dataset-config (e.g. `comparisons` for openai/summarize_from_feedback)") from None
        raise VGFError(f"could not load dataset {args.dataset!r} ({first_line(e)})") from None
    except Exception as e:
        raise VGFError(f"could not load dataset {args.dataset!r} ({type(e).__name__}: {first_line(e)}); "
                       "offline, pass a local JSONL or a downloaded dataset folder instead") from None
    if "train" not in data:
        raise VGFError(f"--dataset {args.dataset}: no `train` split (found {sorted(data)})")
    columns = set(data["train"].column_names)
    if not ({"chosen", "rejected"} <= columns or {"info", "summaries", "choice"} <= columns):
        raise VGFError(f"--dataset {args.dataset}: unknown schema {sorted(columns)}; expected prompt/chosen/rejected, "
                       "HH-style chosen/rejected transcripts, or summarize_from_feedback's info/summaries/choice")
    test_split = next((s for s in ("test", "validation", "valid") if s in data), None)
    if test_split is None:
        data = data["train"].train_test_split(test_size=args.eval_fraction, seed=args.seed)
        test_split = "test"

    def rows(split, n):  # a seeded random subset, so every part of the data (e.g. each HH subset) is represented
        shuffled = data[split].shuffle(seed=args.seed)
        return [preference_row(r) for r in shuffled.select(range(min(n, len(shuffled))))]

    n_test = max(args.rm_eval_pairs, 4 * args.num_eval_prompts)
    return (usable_pairs(rows("train", args.rm_train_pairs), "training", args),
            usable_pairs(rows(test_split, n_test), "held-out", args))


def usable_pairs(rows, part, args):
    """Pairs with the same chosen and rejected text state no preference: left out with a warning; none left: error."""
    kept = [r for r in rows if r["chosen"].strip() != r["rejected"].strip()]
    if not kept:
        raise VGFError(f"--dataset {args.dataset}: every one of the {len(rows)} {part} pairs has the same chosen and "
                       "rejected text (e.g. both empty), so there is no preference to learn; check the file")
    if len(kept) < len(rows):
        print(f"warning: --dataset {args.dataset}: {len(rows) - len(kept)} of {len(rows)} {part} pairs have the same "
              "chosen and rejected text (no preference); they are left out")
    return kept


def template(tok, turns):
    ids = tok.apply_chat_template(turns, add_generation_prompt=True)
    return list(ids["input_ids"] if not isinstance(ids, list) else ids)


def prompt_ids(tok, prompt, args):
    """Chat template when the tokenizer has one, else the raw text. A prompt over --max-prompt-tokens loses its
    oldest text before templating (whole turns first), so the template's header and a system turn survive."""
    limit = args.max_prompt_tokens
    if args.chat_template and tok.chat_template:
        turns = [dict(t) for t in to_turns(prompt)]
        ids = template(tok, turns)
        first = 1 if turns[0]["role"] == "system" and len(turns) > 1 else 0
        count = lambda t: len(tok(t["content"], add_special_tokens=False)["input_ids"])
        while len(ids) > limit and len(turns) > first + 1 and count(turns[first]) <= len(ids) - limit:
            turns.pop(first)
            if turns[first]["role"] == "assistant" and len(turns) > first + 1:  # a conversation opens with the user
                turns.pop(first)
            ids = template(tok, turns)
        for _ in range(4):  # cut the oldest turn's text; token counts can shift by a few at the cut
            if len(ids) <= limit:
                break
            body = tok(turns[first]["content"], add_special_tokens=False)["input_ids"]
            turns[first]["content"] = tok.decode(body[len(ids) - limit :])
            ids = template(tok, turns)
        return ids[-limit:]
    text = prompt_text(prompt)
    ids = tok(text, add_special_tokens=True)["input_ids"]
    if len(ids) > limit:
        body = tok(text, add_special_tokens=False)["input_ids"]
        extra = len(ids) - len(body)  # BOS and the like
        ids = tok(tok.decode(body[-(limit - extra) :]), add_special_tokens=True)["input_ids"]
    return list(ids)[-limit:]


def judge_label(config, spec):
    """Index of the positive class of a hub classifier: the single output of a reward head, else the label whose
    id2label name reads positive (logit 0 of a 2-label classifier is usually the negative class)."""
    if config.num_labels == 1:
        return 0
    names = {i: str(n).lower() for i, n in config.id2label.items()}
    positive = ("positive", "pos", "chosen", "good", "preferred", "helpful", "acceptable", "yes", "true")
    hits = [int(i) for i, n in names.items() if n in positive]
    if len(hits) == 1:
        return hits[0]
    if config.num_labels == 2 and all(n.startswith("label_") for n in names.values()):
        return 1  # LABEL_0 / LABEL_1: class 1 is the positive one by convention
    raise VGFError(f"--judge {spec}: cannot tell which of its labels {config.id2label} is the positive one; use a "
                   "reward model with one output or a classifier with a `positive`-like label")


def check_args(args):
    """Nonsensical settings are refused before anything loads."""
    positive = ("num_particles", "max_new_tokens", "num_eval_prompts", "prompt_batch_size", "micro_batch_size",
                "rm_batch_size", "rm_train_pairs", "rm_eval_pairs", "max_prompt_tokens", "num_proposals", "top_k")
    for name, low in [(name, 1) for name in positive] + [("rm_max_response_tokens", 2), ("rm_epochs", 0)]:
        if getattr(args, name) < low:
            raise VGFError(f"--{name.replace('_', '-')} must be at least {low} (got {getattr(args, name)})")
    if not 0 < args.eval_fraction < 1:
        raise VGFError(f"--eval-fraction must lie in (0, 1) (got {args.eval_fraction})")
    if not 0 <= args.seed < 2**32:
        raise VGFError(f"--seed must lie in [0, 2**32 - 1] (got {args.seed})")
    for name in ("alpha", "rm_lr", "step_size"):
        if not 0 < getattr(args, name) < math.inf:
            raise VGFError(f"--{name.replace('_', '-')} must be positive and finite (got {getattr(args, name)})")
    for name in ("mh_tau", "mh_kappa"):
        if not 0 <= getattr(args, name) < math.inf:
            raise VGFError(f"--{name.replace('_', '-')} must be non-negative and finite (got {getattr(args, name)})")
    if args.step_size > 1000:
        raise VGFError(f"--step-size must be at most 1000 (got {args.step_size:g}): it is in nearest-neighbour "
                       "distances, and far larger steps overflow float32")
    if not args.temperature >= 0 or not math.isfinite(args.lm_coef):
        raise VGFError(f"--temperature must be >= 0 and --lm-coef finite (got {args.temperature}, {args.lm_coef})")
    if not args.transport_steps or min(args.transport_steps) < 0 or 0 not in args.transport_steps:
        raise VGFError("--transport-steps needs non-negative integers including 0 (best-of-N, the baseline), e.g. "
                       "0 1 2 4 8")
    if args.reward_model and not os.path.isfile(os.path.join(args.reward_model, "vgf_reward.json")):
        raise VGFError(f"--reward-model {args.reward_model}: not a reward-model folder of this program "
                       "(no vgf_reward.json)")
    for name, j in (("judge", args.judge), ("judge2", args.judge2)):
        package = {"vader": "vaderSentiment", "afinn": "afinn"}.get(j)
        if j and not package and not os.path.exists(j) and looks_local(j):
            raise VGFError(f"--{name} {j}: no such folder")
        if package and importlib.util.find_spec(package) is None:
            raise VGFError(f"--{name} {j} needs the {package} package: `pip install {package}`")
    if any(not 1 <= b <= args.num_particles for b in args.best_of_n):
        raise VGFError(f"--best-of-n needs values in 1..--num-particles ({args.num_particles}); got {args.best_of_n}")
    if args.transport == "mh" and args.temperature != 1:
        raise VGFError("--transport mh targets mu itself: its proposals sample at temperature 1 (pass --temperature 1)")
    check_output_dir(args)


def check_output_dir(args):
    """--output-dir must be (or can become) a writable folder."""
    folder = os.path.abspath(args.output_dir)
    while not os.path.isdir(folder):
        if os.path.exists(folder):
            raise VGFError(f"--output-dir {args.output_dir}: {folder} is a file, not a folder; pass a folder")
        folder = os.path.dirname(folder)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise VGFError(f"--output-dir {args.output_dir}: cannot write into {folder} (permission denied); pass a "
                       "writable folder")


def check_prompt_room(tok, args):
    """--max-prompt-tokens must leave room for the prompt's own text next to the tokens the template always adds."""
    templated = args.chat_template and tok.chat_template
    try:
        fixed = len(template(tok, [{"role": "user", "content": ""}]) if templated else tok("")["input_ids"])
    except Exception:  # a template that rejects an empty turn: prompt_ids applies it to the real prompts
        return
    if args.max_prompt_tokens <= fixed:
        what = "the chat template alone takes" if templated else "the special tokens take"
        raise VGFError(f"--max-prompt-tokens {args.max_prompt_tokens} leaves no room for the prompt's text: {what} "
                       f"{fixed} tokens; pass at least {fixed + 1} (default 256)"
                       + (" or --no-chat-template" if templated else ""))


def hub_offline():
    import huggingface_hub
    return bool(huggingface_hub.constants.HF_HUB_OFFLINE)


def in_local_cache(repo, kind):
    """A hub model or dataset already downloaded (the hub cache; for a dataset also the datasets library's cache)."""
    import huggingface_hub
    try:
        huggingface_hub.snapshot_download(repo, repo_type=kind, local_files_only=True)
        return True
    except Exception:
        pass
    if kind == "dataset":
        datasets_cache = os.environ.get("HF_DATASETS_CACHE") or os.path.join(
            os.environ.get("HF_HOME") or os.path.expanduser("~/.cache/huggingface"), "datasets")
        return os.path.isdir(os.path.join(datasets_cache, repo.replace("/", "___")))
    return False


def check_hub_inputs(args, model_name):
    """Every hub id (--model, --dataset, hub judges) that cannot be used is named in one error, before anything
    loads: offline, those not downloaded; online, those the hub does not have."""
    wanted = []
    if not os.path.exists(model_name):
        wanted.append(("--model", model_name, "model"))
    if not os.path.exists(args.dataset):
        wanted.append(("--dataset", args.dataset, "dataset"))
    for option, spec in (("--judge", args.judge), ("--judge2", args.judge2)):
        if spec and spec not in ("vader", "afinn") and not os.path.exists(spec):
            wanted.append((option, spec, "model"))
    if not wanted:
        return
    problems, downloads = [], []
    for option, repo, kind in wanted:
        if in_local_cache(repo, kind):
            continue
        download = f"`hf download {repo}" + (" --repo-type dataset`" if kind == "dataset" else "`")
        if hub_offline():
            problems.append(f"{option} {repo}")
            downloads.append(download)
            continue
        import huggingface_hub
        try:
            huggingface_hub.HfApi().repo_info(repo, repo_type=kind, timeout=20)
        except huggingface_hub.errors.RepositoryNotFoundError:
            problems.append(f"{option} {repo} (no such {kind} on the hub)")
        except Exception:  # no connection: the loader reports it, with its own hint
            continue
    if not problems:
        return
    if hub_offline():
        raise VGFError(f"offline (HF_HUB_OFFLINE=1) and not in the local cache: {', '.join(problems)}. On a connected "
                       f"machine run {' and '.join(downloads)}, then copy the HF cache here (or set HF_HOME), or pass "
                       "local paths (--model FOLDER or FILE.gguf, --dataset FILE.jsonl, --judge vader/afinn/FOLDER)")
    raise VGFError(f"not found: {', '.join(problems)}; check the ids (`org/name`) or pass local paths")


@dataclass
class Run:
    """Everything the stages share: the run folder, device, tokenizer, models, data and judges."""
    args: Args
    folder: "RunFolder"
    device: torch.device
    model_path: str = ""
    gguf_file: Optional[str] = None
    bf16: bool = False
    dtype: torch.dtype = torch.float32
    tok: object = None
    lm: object = None  # the base model mu
    embed: object = None  # its token-embedding module
    stop_ids: Optional[torch.Tensor] = None  # tokens that end a response
    end_id: Optional[int] = None  # the token that closes a response (a forced stop)
    allowed: Optional[torch.Tensor] = None  # tokens a transport may propose by name
    base: tuple = ()  # (path, gguf_file, backbone module) of mu, shared by a frozen reward model
    spacing: Optional[float] = None  # embed: the embedding table's nearest-neighbour distance
    train_rows: list = field(default_factory=list)
    test_rows: list = field(default_factory=list)
    writer: object = None
    rm: object = None
    rm_info: dict = field(default_factory=dict)
    rm_path: str = ""
    judges: list = field(default_factory=list)
    draws: object = None  # the generator of the uniformly chosen particle per prompt

    @property
    def name(self):
        return os.path.basename(self.folder.path)


def setup(args):
    """Run folder (claimed before anything loads), device, seeding, dtype, tokenizer, preference data, the base model
    mu, stop tokens, the tokens a transport may propose, and the judges' construction after value learning."""
    from transformers import AutoModelForCausalLM
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise VGFError("data-parallel evaluation over several processes (accelerate launch, torchrun) is not "
                       "provided: run `python vgf_llm.py ...` as one process")
    model_path, gguf_file = resolve_model(args.model, args.gguf_file)
    check_dataset(args)
    check_hub_inputs(args, model_path)
    folder = RunFolder.claim(args, model_path)
    run = Run(args, folder, torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu"), model_path,
              gguf_file)
    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    run.bf16 = args.bf16 and run.device.type == "cuda"
    run.dtype = torch.bfloat16 if run.bf16 else torch.float32
    run.writer = folder.open_writer(args)
    run.tok = tok = load_tokenizer(model_path, gguf_file)
    check_prompt_room(tok, args)
    run.train_rows, run.test_rows = load_preferences(args)  # data problems surface before the model loads
    lm = from_pretrained(AutoModelForCausalLM, model_path, gguf_file=gguf_file, dtype=run.dtype)
    run.lm = lm.to(run.device).eval().requires_grad_(False)
    run.embed = embed = lm.get_input_embeddings()
    # a response ends at the tokenizer's or generation config's EOS or the chat template's end of turn
    stop_list, run.end_id = stop_tokens(tok, lm.generation_config, args.chat_template)
    run.stop_ids = torch.tensor(stop_list, device=run.device)
    run.allowed = torch.zeros(max(embed.weight.shape[0], len(tok)), dtype=torch.bool, device=run.device)
    run.allowed[: tok.vocab_size] = True  # transports never propose special or added tokens by name, nor stop tokens
    run.allowed[torch.tensor(tok.all_special_ids + stop_list, dtype=torch.long)] = False
    run.allowed[run.end_id] = True  # except the end token: lengths change
    run.base = (model_path, gguf_file, lm.base_model)  # the backbone module, shared by a frozen reward model
    run.spacing = table_spacing(embed.weight.detach(), run.allowed) if args.transport == "embed" else None
    return run


def synced(device, out=None):
    """CUDA runs asynchronously: wait for the queued work before reading a clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out


class RunFolder:
    """A run's folder, owned by one process at a time: an exclusive lock on <folder>/.lock (released by the operating
    system when the process ends, however it ends) that holds the owner's process id."""
    claimed = []  # the folders this process claimed, cleaned after a failure

    def __init__(self, path, lock_file, created):
        self.path, self.lock_file, self.writer = path, lock_file, None
        self.created = created  # the folder and the parents it needed that did not exist, removed after a failure

    @classmethod
    def claim(cls, args, model_path):
        name = args.run_name or f"{args.exp_name}__{os.path.basename(model_path.rstrip('/'))}__{args.seed}__" \
                                f"{int(time.time())}"
        path = os.path.join(args.output_dir, name)
        created, missing = [], os.path.abspath(path)
        while not os.path.exists(missing):
            created.append(missing)
            missing = os.path.dirname(missing)
        try:
            os.makedirs(path, exist_ok=True)
            lock_file = open(os.path.join(path, ".lock"), "a+")
        except OSError as e:
            raise VGFError(f"cannot create the run folder {path} ({e.strerror})") from None
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = ""
            for _ in range(20):  # the owner writes its process id just after it takes the lock
                lock_file.seek(0)
                owner = lock_file.read().strip()
                if owner:
                    break
                time.sleep(0.05)
            lock_file.close()
            raise VGFError(f"the run folder {path} is in use by another run (process {owner or 'unknown'}); wait "
                           "for it to finish or pass another --run-name") from None
        folder = cls(path, lock_file, created)
        held = sorted(set(os.listdir(path)) - {".lock"})
        leftovers = [f for f in held if f.startswith("events.out.tfevents.") or ".tmp-" in f]
        if held != leftovers:  # results (summary.json, reward_model/) or files of someone else
            folder.release()
            reuse = os.path.join(path, "reward_model")
            hint = f" (reuse its reward model with --reward-model {reuse})" if os.path.isdir(reuse) else ""
            raise VGFError(f"--run-name {name}: {path} already holds a run; pass another --run-name or delete the "
                           f"folder{hint}")
        for stale in leftovers:  # what a killed run (no chance to clean up) left: its log and temporary files
            remove_path(os.path.join(path, stale))
        if leftovers:
            print(f"note: removed {len(leftovers)} file(s) an unfinished earlier run left in {path}")
        lock_file.seek(0)
        lock_file.truncate()
        lock_file.write(str(os.getpid()))
        lock_file.flush()
        cls.claimed.append(folder)
        return folder

    def open_writer(self, args):
        """TensorBoard (and, with --track, wandb) for this run."""
        if args.track:
            import wandb
            wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                       config=vars(args), name=os.path.basename(self.path), save_code=True)
        self.writer = SummaryWriter(self.path)
        table = "\n".join(f"|{k}|{v}|" for k, v in vars(args).items())
        self.writer.add_text("hyperparameters", "|param|value|\n|-|-|\n%s" % table)
        return self.writer

    def release(self):
        self.lock_file.close()  # closing the file releases the lock

    def finish(self):
        """The run is complete: its folder is no longer cleaned after a failure, and the lock is released."""
        RunFolder.claimed.remove(self)
        self.release()

    def clean_after_failure(self):
        """A failed or interrupted run leaves no folder behind, except a reward model it trained (returned)."""
        if self.writer is not None:
            self.writer.close()  # its thread creates the events file lazily: it must not land in a removed folder
        reward_model = os.path.join(self.path, "reward_model")
        if os.path.exists(os.path.join(self.path, "summary.json")):  # finished: it failed afterwards, keep it all
            self.release()
            return None
        for name in os.listdir(self.path):
            if name not in (".lock", "reward_model"):
                remove_path(os.path.join(self.path, name))
        if os.path.exists(reward_model):
            self.release()
            return reward_model
        if self.created:
            shutil.rmtree(self.path, ignore_errors=True)  # the lock goes with it (still held: nobody else can start)
            for parent in self.created[1:]:
                with contextlib.suppress(OSError):  # only when empty: another run may have written there meanwhile
                    os.rmdir(parent)
        else:
            os.remove(os.path.join(self.path, ".lock"))
        self.release()
        return None


def remove_path(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def disk_full(error):
    """An error from writing a file because the disk is full (libraries wrap ENOSPC in their own messages)."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return True
    return any(text in str(error) for text in ("No space left on device", "StorageFull", "ENOSPC"))


@contextlib.contextmanager
def written_atomically(path):
    """Yields a temporary name next to `path`; renamed to `path` once the block has written it completely, removed
    when the block fails. A full disk becomes one error line, and never leaves a partial file or folder."""
    temporary = f"{path}.tmp-{os.getpid()}"
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException as e:
        remove_path(temporary)
        if disk_full(e):
            raise VGFError(f"no space left on the device while writing {path}") from None
        if isinstance(e, OSError):
            raise VGFError(f"could not write {path} ({e.strerror or first_line(e)})") from None
        raise


def write_text(path, text):
    with written_atomically(path) as temporary:
        with open(temporary, "w", encoding="utf-8") as f:
            f.write(text)


def plot_runs(summaries, folder):
    """judge_vs_compute.png: each judge's score against token-forwards per prompt (log x) and against NLL/token."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    judges = [j for j in ("judge", "judge2") if all(j in s["transport"]["0"] for s in summaries)]
    fig, axes = plt.subplots(len(judges), 2, figsize=(10, 3.6 * len(judges)), squeeze=False)
    for summary, label in zip(summaries, run_labels(summaries)):
        budgets = sorted(int(L) for L in summary["transport"])
        at_budgets = [summary["transport"][str(L)] for L in budgets]
        frontier = [summary["best_of_n"][n] for n in sorted(summary.get("best_of_n", {}), key=int)]
        for row, j in zip(axes, judges):
            for ax, x in zip(row, ("forwards_per_prompt", "nll_per_token")):
                if max(budgets) > 0:
                    ax.plot([r[x] for r in at_budgets], [r[j] for r in at_budgets], marker="o", label=label)
                if frontier:
                    ax.plot([r[x] for r in frontier], [r[j] for r in frontier], "k--s", ms=4, label="best-of-N frontier")
    for row, j in zip(axes, judges):
        row[0].set(xscale="log", xlabel="model token-forwards per prompt (backward = 2)", ylabel=f"{j} score")
        row[1].set(xlabel="NLL / token under mu", ylabel=f"{j} score")
        row[0].set_title(f"{j}: {summaries[0]['judges'][j]}", fontsize=9)
    if axes[0][0].get_legend_handles_labels()[0]:  # a run of L = 0 alone without --best-of-n draws no line
        axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(folder, exist_ok=True)
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=80)
    plt.close(fig)
    with written_atomically(os.path.join(folder, "judge_vs_compute.png")) as temporary:
        with open(temporary, "wb") as f:
            f.write(image.getvalue())


def matched_compute(summaries, folders):
    """--plot-runs: every L > 0 of every run against the frontier run's best-of-n with the fewest token-forwards at
    or above the run's: paired differences over prompts (each folder's samples.jsonl) ± their SE."""
    runs = [(s, [json.loads(x) for x in open(os.path.join(d, "samples.jsonl"))]) for s, d in zip(summaries, folders)]
    frontier, frontier_records = next(((s, r) for s, r in runs if s.get("best_of_n")), (None, None))
    if frontier is None:
        return
    columns = list(frontier["judges"]) + ["nll"]
    print(f"{'run':<26}{'L':>3}{'fwd/prompt':>11}{'vs best-of':>11}" + "".join(f"{c + ' diff':>18}" for c in columns))
    for summary, records in runs:
        if [r["prompt"] for r in records] != [r["prompt"] for r in frontier_records]:
            print(f"warning: {summary['run_name']} was not run on the frontier run's prompts; skipped")
            continue
        for L, result in ((L, x) for L, x in summary["transport"].items() if L != "0"):
            cost = result["forwards_per_prompt"]
            above = [n for n, y in frontier["best_of_n"].items() if y["forwards_per_prompt"] >= cost]
            n = min(above, key=int) if above else max(frontier["best_of_n"], key=int)
            differences = [np.array([r["vgf"][L].get(c, np.nan) - f["best_of_n"][n][c]
                                     for r, f in zip(records, frontier_records)]) for c in columns]
            print(f"{summary['run_name']:<26}{L:>3}{cost:>11.0f}{n:>11}"
                  + "".join(f"{d.mean():>+10.3f} ± {se(d):.3f}" for d in differences))


def run_labels(summaries):
    """A label per run: transport and settings, plus the options (else run names) that tell apart equal labels."""
    extra = lambda a: {"mh": f" τ {a['mh_tau']:g} κ {a['mh_kappa']:g}", "embed": f" ε {a['step_size']:g}"}.get(
        a["transport"], f", lm_coef {a['lm_coef']:g}" if a["lm_coef"] and a["transport"] == "topk" else "")
    base = [s["args"]["transport"] + extra(s["args"]) if len(s["transport"]) > 1 else "best-of-N" for s in summaries]
    not_options = {"run_name", "output_dir", "plot_runs", "exp_name", "track", "wandb_project_name", "wandb_entity"}
    labels = []
    for s, label in zip(summaries, base):
        same = [t for t, b in zip(summaries, base) if b == label]
        values = lambda k: {json.dumps(t["args"].get(k)) for t in same}
        differ = [k for k in s["args"] if k not in not_options and len(values(k)) > 1]
        labels.append(label + "".join(f", {k} {s['args'][k]}" for k in differ[:3]) if len(same) > 1 else label)
    return [label + (f", {s['run_name']}" if labels.count(label) > 1 else "") for s, label in zip(summaries, labels)]


def read_summaries(folders):
    """summary.json of each --plot-runs folder."""
    runs = []
    for path in (os.path.join(d, "summary.json") for d in folders):
        if not os.path.isfile(path):
            raise VGFError(f"--plot-runs: no summary.json in {os.path.dirname(path)}; pass finished run folders")
        try:
            runs.append(json.load(open(path)))
            runs[-1]["transport"]["0"], runs[-1]["args"]["transport"]  # keys the plot reads
        except (ValueError, KeyError, TypeError) as e:
            raise VGFError(f"--plot-runs: {path} is not a summary of this program ({type(e).__name__}: {e})") from None
    return runs


def out_of_memory(error):
    """The bytes an allocation asked for when `error` is an out-of-memory error (0 when unknown), else None."""
    text = str(error)
    if isinstance(error, MemoryError):
        return 0
    cuda_oom = getattr(torch, "OutOfMemoryError", ())
    if not (isinstance(error, cuda_oom) or "can't allocate memory" in text or "out of memory" in text.lower()):
        return None
    asked = re.search(r"allocate (\d+) bytes", text)
    if asked:
        return int(asked.group(1))
    asked = re.search(r"[Tt]ried to allocate ([\d.]+) ([KMG]iB)", text)
    if asked:
        return int(float(asked.group(1)) * 2 ** {"KiB": 10, "MiB": 20, "GiB": 30}[asked.group(2)])
    return 0


def raise_keyboard_interrupt(signum, frame):
    """SIGTERM (what schedulers send before they stop a job) ends the run like Ctrl-C."""
    TERMINATED_BY[0] = signal.Signals(signum).name
    raise KeyboardInterrupt


TERMINATED_BY = [None]


def clean_after_failure():
    """Removes the run folders this process claimed (keeping a trained reward model); returns the reward models."""
    kept = []
    while RunFolder.claimed:
        kept.append(RunFolder.claimed.pop().clean_after_failure())
    return [path for path in kept if path]


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
    try:
        try:
            args = tyro.cli(Args)
            if args.plot_runs:  # only the comparison plot of finished runs
                runs = read_summaries(args.plot_runs)
                check_output_dir(args)
                plot_runs(runs, args.output_dir)
                print(f"wrote {os.path.join(args.output_dir, 'judge_vs_compute.png')}: " + "; ".join(
                    f"{d} as '{label}'" for d, label in zip(args.plot_runs, run_labels(runs))))
                matched_compute(runs, args.plot_runs)
            else:
                main(args)
        except (RuntimeError, MemoryError) as e:
            asked = out_of_memory(e)
            if asked is None:
                raise
            size = f" (tried to allocate {asked / 2**30:.1f} GiB)" if asked else ""
            raise VGFError(f"out of memory while {STAGE[0]}{size}; pass a smaller --num-particles, "
                           "--prompt-batch-size or --micro-batch-size") from None
    except VGFError as e:
        kept = clean_after_failure()
        reuse = "".join(f"; the trained reward model is kept: reuse it with --reward-model {path}" for path in kept)
        print(f"error: {e}{reuse}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: one line, no traceback
        kept = clean_after_failure()
        what = f"terminated ({TERMINATED_BY[0]})" if TERMINATED_BY[0] else "interrupted"
        print(f"\n{what}" + "".join(f"; the trained reward model is kept: reuse it with --reward-model {path}"
                                     for path in kept), file=sys.stderr)
        sys.exit(143 if TERMINATED_BY[0] else 130)
