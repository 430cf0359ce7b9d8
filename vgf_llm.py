# Value Gradient Flow (VGF) for language models: a base model + a learned reward model -> a generator that draws
# N responses from the base model and transports them toward pi* ∝ mu · exp(R / alpha): with SVGD on the token
# embeddings (the paper's described configuration) or by value-gradient Metropolis-Hastings (exact for pi*).
# Paper: "Reinforcement Learning via Value Gradient Flow", Xu, Hu, Sojoudi, Zhang (ICLR 2026), arXiv 2604.14265.
# Stages, in the paper's order: value learning -> reference sampler -> transport -> evaluation.
import contextlib
import importlib.util
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace
from typing import Annotated, Literal, Optional

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
    """folder name of this run under --output-dir (a folder that already holds files is refused)"""
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
    """transport budgets L evaluated (0 = best-of-N); one flow of max(L) steps is snapshotted at each L"""
    transport: Literal["embed", "mh", "topk"] = "embed"
    """embed: the paper's configuration as described (README), mh: value-gradient Metropolis-Hastings, topk: baseline"""
    mh_tau: float = 5.0
    """mh: weight τ of the first-order gain Δ_t(v) in the token proposal (0: mu's top-k; 1/(2 alpha) is balanced)"""
    mh_kappa: float = 5.0
    """mh: weight κ of max_v Δ_t(v) in the position proposal (0: uniform over the response's positions)"""
    step_size: float = 1.0
    """embed: epsilon in (0, 1000], the Adam learning rate, in nearest-neighbour distances of the embedding table"""
    alpha: float = 0.1
    """temperature (> 0, finite) of the target pi* ∝ mu · exp(R / alpha), in reward std units (R standardised)"""
    lm_coef: float = 0.0
    """topk: weight of log mu in its acceptance test R / alpha + lm_coef log mu"""
    top_k: int = 8
    """mh, topk: the candidate tokens at a position are mu's top-k next tokens after the response's prefix"""
    num_proposals: int = 4
    """topk transport: single-token moves per particle and step that are re-scored exactly"""
    save_trajectories: bool = False
    """write every particle's text, R and NLL/token after every transport step to trajectories.jsonl"""
    plot_runs: Annotated[list[str], shown_default("none")] = field(default_factory=list)
    """only draw judge_vs_compute.png into --output-dir from these run folders (one line per run), then exit"""
    max_new_tokens: int = 64
    """fixed generation length; responses are truncated after their first EOS"""
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


# TRY NOT TO MODIFY: loading models and data, with errors that say what to do
class VGFError(Exception):
    """A problem with the user's input or files, reported as `error: ...` (exit 2) without a traceback."""


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
    try:
        return cls.from_pretrained(name, **kw)
    except ImportError as e:  # GGUF files need gguf (and accelerate to load), hub data needs datasets
        raise VGFError(f"loading {name!r} needs a missing package: {str(e).splitlines()[0]}\n"
                       "install it, e.g. `pip install gguf accelerate` for a .gguf model") from None
    except (OSError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else ""
        if "pip install" in str(e):  # transformers names a missing package (gguf, accelerate) in a ValueError
            raise VGFError(f"loading {name!r} needs a missing package: {first}") from None
        raise VGFError(f"could not load {name!r} ({type(e).__name__}: {first}).\nWithout network access, download it "
                       "beforehand (`hf download <id>` on a connected machine, then copy the HF cache or set HF_HOME) "
                       "or pass a local folder: --model /path/to/folder (--gguf-file for GGUF).") from None


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
    rows = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
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
    k, rk = (t.rfind("\n\nAssistant:") + len("\n\nAssistant:") for t in (r["chosen"], r["rejected"]))
    return dict(prompt=r["chosen"][:k], chosen=r["chosen"][k:].strip(), rejected=r["rejected"][rk:].strip())


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
        try:
            rows = read_jsonl(args.dataset)
        except UnicodeDecodeError:
            raise VGFError(f"--dataset {args.dataset}: not a text JSONL file") from None
        n_test = max(1, int(len(rows) * args.eval_fraction))
        return usable_pairs(rows[:-n_test], "training", args), usable_pairs(rows[-n_test:], "held-out", args)
    import datasets
    try:
        ds = datasets.load_dataset(args.dataset, args.dataset_config, data_dir=args.dataset_subset)
    except ValueError as e:
        msg = str(e)
        if "Config name is missing" in msg or "BuilderConfig" in msg:
            configs = msg[msg.find("[") : msg.find("]") + 1] if "[" in msg else "see the dataset card"
            raise VGFError(f"--dataset {args.dataset} has several configurations {configs}: pick one with "
                           "--dataset-config (e.g. `comparisons` for openai/summarize_from_feedback)") from None
        raise VGFError(f"could not load dataset {args.dataset!r} ({msg.splitlines()[0]})") from None
    except Exception as e:
        raise VGFError(f"could not load dataset {args.dataset!r} ({type(e).__name__}: {str(e).splitlines()[0]}); "
                       "offline, pass a local JSONL or a downloaded dataset folder instead") from None
    if "train" not in ds:
        raise VGFError(f"--dataset {args.dataset}: no `train` split (found {sorted(ds)})")
    cols = set(ds["train"].column_names)
    if not ({"chosen", "rejected"} <= cols or {"info", "summaries", "choice"} <= cols):
        raise VGFError(f"--dataset {args.dataset}: unknown schema {sorted(cols)}; expected prompt/chosen/rejected, "
                       "HH-style chosen/rejected transcripts, or summarize_from_feedback's info/summaries/choice")
    test_split = next((s for s in ("test", "validation", "valid") if s in ds), None)
    if test_split is None:
        ds = ds["train"].train_test_split(test_size=args.eval_fraction, seed=args.seed)
        test_split = "test"

    def rows(split, n):  # a seeded random subset, so every part of the data (e.g. each HH subset) is represented
        d = ds[split].shuffle(seed=args.seed)
        return [preference_row(r) for r in d.select(range(min(n, len(d))))]

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


def response_ids(tok, text, max_tokens, eos_id):
    return tok(text, add_special_tokens=False)["input_ids"][: max_tokens - 1] + [eos_id]


def pad(seqs, value, left, length=None):
    length = length or max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), value, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        s = s[:length]
        sl = slice(length - len(s), length) if left else slice(0, len(s))
        ids[i, sl], mask[i, sl] = torch.tensor(s, dtype=torch.long), 1
    return ids, mask


# ALGO LOGIC: the value function R(x, y) = backbone of the base model + a scalar head
class RewardModel(nn.Module):
    def __init__(self, backbone, pooling="last"):
        super().__init__()
        self.backbone, self.pooling, self.head = backbone, pooling, nn.Linear(backbone.config.hidden_size, 1)
        nn.init.normal_(self.head.weight, std=1 / math.sqrt(self.head.in_features + 1))
        nn.init.zeros_(self.head.bias)

    def forward(self, inputs_embeds, attention_mask, num_response, past_key_values=None):
        """R from the last attended position's hidden state (or the response's mean); with past_key_values (the
        prompt's cache), inputs_embeds holds the response only."""
        position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)[:, -inputs_embeds.shape[1] :]
        h = self.backbone(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                          past_key_values=past_key_values, use_cache=past_key_values is not None).last_hidden_state
        h = h.float()
        if self.pooling == "mean":
            m = attention_mask[:, -num_response:, None].float()
            return self.head((h[:, -num_response:] * m).sum(1) / m.sum(1).clamp(min=1)).squeeze(-1)
        last = (torch.arange(attention_mask.shape[1], device=attention_mask.device) * attention_mask).argmax(1)
        last = last - (attention_mask.shape[1] - h.shape[1])  # index into h when the prompt came from the cache
        return self.head(h[torch.arange(len(last)), last]).squeeze(-1)

    def save(self, folder, tok, info, backbone_ref=None):
        os.makedirs(folder, exist_ok=True)
        if backbone_ref is None:  # trained backbone: save it; a frozen one is referenced by the base model's path
            self.backbone.save_pretrained(folder)
        tok.save_pretrained(folder)
        torch.save(self.head.state_dict(), os.path.join(folder, "value_head.pt"))
        with open(os.path.join(folder, "vgf_reward.json"), "w") as f:
            json.dump(dict(info, backbone=backbone_ref, pooling=self.pooling), f, indent=2)

    @classmethod
    def load(cls, folder, dtype, shared=None):
        """shared: (path, gguf_file, module) of the base model, reused when it is the reward model's frozen backbone."""
        from transformers import AutoModel
        if not os.path.isfile(os.path.join(folder, "vgf_reward.json")):
            raise VGFError(f"{folder!r} is not a reward model of this program (no vgf_reward.json / value_head.pt)")
        info = json.load(open(os.path.join(folder, "vgf_reward.json")))
        ref = info.get("backbone") or {"path": folder, "gguf_file": None}
        norm = lambda p: os.path.abspath(p) if os.path.exists(p) else p  # the same weights: same path and GGUF file
        same = shared is not None and (norm(ref["path"]), ref["gguf_file"]) == (norm(shared[0]), shared[1])
        backbone = shared[2] if same else from_pretrained(AutoModel, ref["path"], gguf_file=ref["gguf_file"],
                                                          dtype=dtype)
        rm = cls(backbone, info.get("pooling", "last"))
        rm.head.load_state_dict(torch.load(os.path.join(folder, "value_head.pt"), map_location="cpu"))
        return rm, info


def build_reward_model(model_path, gguf_file, lm, args, dtype):
    """A fresh R: the frozen base backbone itself, or a float32 copy to train (bf16 Adam would lose most updates)."""
    from transformers import AutoModel
    if not args.rm_train_backbone:
        return RewardModel(lm.base_model, args.rm_pooling)
    backbone = from_pretrained(AutoModel, model_path, gguf_file=gguf_file, dtype=torch.float32)
    return RewardModel(backbone, args.rm_pooling).to(lm.device)


def joint_embeds(embed, p_ids, p_mask, r_emb, r_mask):
    """[prompt; response] as embeddings: the prompt is fixed, the response embeddings are the particles."""
    x = torch.cat([embed(p_ids).to(r_emb.dtype), r_emb], 1)
    return x, torch.cat([p_mask, r_mask], 1)


@torch.no_grad()
def prompt_cache(model, embed, p_ids, p_mask):
    """Keys and values of the fixed prompts (and the logits after them), once per prompt batch for all particles."""
    from transformers import DynamicCache
    kw = dict(logits_to_keep=1) if model.get_output_embeddings() is not None else {}
    pos = (p_mask.cumsum(1) - 1).clamp(min=0)
    out = model(inputs_embeds=embed(p_ids), attention_mask=p_mask, position_ids=pos, use_cache=True, **kw)
    pkv = out.past_key_values
    kv = [(x.keys, x.values) for x in pkv.layers] if hasattr(pkv, "layers") else [tuple(x[:2]) for x in pkv]
    # rows(r): a fresh cache holding the prompts of rows r (index_select copies: the stored ones never change)
    rows = lambda r: DynamicCache([(k[r], v[r]) for k, v in kv])
    return dict(kv=kv, logits=out.logits[:, -1].float() if kw else None, rows=rows)


def chunked(fn, n, size, *tensors):
    pick = lambda t, i: t[i : i + size] if isinstance(t, torch.Tensor) else t
    outs = [fn(*(pick(t, i) for t in tensors)) for i in range(0, n, size)]
    return [torch.cat(o) for o in zip(*outs)] if isinstance(outs[0], tuple) else torch.cat(outs)


def rewards(rm, embed, p_ids, p_mask, r_ids, r_mask, mb, r_emb=None, grad=False, cache=None, rows=None):
    """R(x, y) of token ids or embeddings r_emb (dR/dr_emb too when grad); with cache and rows, responses only."""

    def one(pi, pm, ri, rm_, re, rw):
        re = embed(ri) if re is None else re.detach().to(embed.weight.dtype).requires_grad_(grad)
        with torch.enable_grad() if grad else contextlib.nullcontext():
            if cache is None:
                r = rm(*joint_embeds(embed, pi, pm, re, rm_), rm_.shape[1])
            else:
                r = rm(re, torch.cat([pm, rm_], 1), rm_.shape[1], past_key_values=cache["rows"](rw))
        return (r.detach(), torch.autograd.grad(r.sum(), re)[0].float()) if grad else r

    rows = torch.zeros(len(r_ids), dtype=torch.long, device=r_ids.device) if rows is None else rows
    return chunked(one, len(r_ids), mb, p_ids, p_mask, r_ids, r_mask, r_emb, rows)


def bradley_terry_loss(r_chosen, r_rejected):
    """-log sigmoid(R(x, y_w) - R(x, y_l)) and the pairwise accuracy."""
    return -F.logsigmoid(r_chosen - r_rejected).mean(), (r_chosen > r_rejected).float().mean()


def encode_pairs(tok, rows, args, eos_id):
    response = lambda key: [response_ids(tok, r[key], args.rm_max_response_tokens, eos_id) for r in rows]
    return [prompt_ids(tok, r["prompt"], args) for r in rows], response("chosen"), response("rejected")


def ids_rewards(rm, embed, p, r, pad_id, device, mb):
    """R of lists of prompt and response token ids (prompts left-padded, responses right-padded)."""
    (pi, pm), (ri, rmask) = pad(p, pad_id, left=True), pad(r, pad_id, left=False)
    return rewards(rm, embed, pi.to(device), pm.to(device), ri.to(device), rmask.to(device), mb)


def pair_rewards(rm, embed, p, c, j, pad_id, device, mb):
    """Chosen and rejected rewards of pairs, mb pairs at a time, one forward over both."""
    out = [ids_rewards(rm, embed, p[i : i + mb] * 2, c[i : i + mb] + j[i : i + mb], pad_id, device, mb).view(2, -1)
           for i in range(0, len(p), mb)]
    return torch.cat([r[0] for r in out]), torch.cat([r[1] for r in out])


def train_reward_model(rm, embed, tok, train_rows, test_rows, args, device, writer, eos_id, bf16=False):
    """Bradley-Terry training; bf16: the float32 backbone's forward runs under bfloat16 autocast."""
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16 and args.rm_train_backbone)
    rm.backbone.get_input_embeddings().weight.requires_grad_(False)  # particles live in the base embedding space
    if not args.rm_train_backbone:
        rm.backbone.requires_grad_(False)
    params = [p for p in rm.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=args.rm_lr if args.rm_train_backbone else 10 * args.rm_lr)
    p, c, j = encode_pairs(tok, train_rows[: args.rm_train_pairs], args, eos_id)
    if not args.rm_train_backbone:  # frozen backbone: pool the last-token features once, then train only the head
        head, rm.head = rm.head, nn.Identity()
        with torch.no_grad():
            fc, fr = pair_rewards(rm, embed, p, c, j, tok.pad_token_id, device, args.micro_batch_size)
        rm.head = head
    step, rng = 0, random.Random(args.seed)
    for epoch in range(args.rm_epochs):
        order = list(range(len(p)))
        rng.shuffle(order)
        rm.train()
        for i in range(0, len(order), args.rm_batch_size):
            b = order[i : i + args.rm_batch_size]
            if args.rm_train_backbone:
                with autocast:
                    rc, rr = pair_rewards(rm, embed, *([x[k] for k in b] for x in (p, c, j)), tok.pad_token_id, device,
                                          10**9)
            else:
                rc, rr = rm.head(fc[b]).squeeze(-1), rm.head(fr[b]).squeeze(-1)
            loss, acc = bradley_terry_loss(rc, rr)
            if not torch.isfinite(loss):
                raise VGFError(f"reward-model loss is {loss.item()} at step {step}: lower --rm-lr or pass --no-bf16")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % 10 == 0:
                writer.add_scalar("losses/rm_bt_loss", loss.item(), step)
                writer.add_scalar("losses/rm_train_accuracy", acc.item(), step)
                print(f"rm epoch {epoch} step {step}: bt loss {loss.item():.4f}, batch accuracy {acc.item():.2f}")
            step += 1
    return evaluate_reward_model(rm, embed, tok, test_rows, args, device, eos_id, standardise=True)


@torch.no_grad()
def evaluate_reward_model(rm, embed, tok, rows, args, device, eos_id, standardise=False):
    """Held-out pairwise accuracy; with standardise, fold (R - mean) / std of held-out rewards into the head."""
    rm.eval()
    p, c, j = encode_pairs(tok, rows[: args.rm_eval_pairs], args, eos_id)
    rc, rr = pair_rewards(rm, embed, p, c, j, tok.pad_token_id, device, args.micro_batch_size)
    loss, acc = bradley_terry_loss(rc, rr)
    if standardise:
        allr = torch.cat([rc, rr])
        if len(allr) > 1 and not allr.std() > 1e-6:
            raise VGFError(f"the reward model gives every held-out response the same reward (std {allr.std():.2g}), "
                           "so R cannot be standardised; check the --dataset responses or train longer (--rm-epochs)")
        mean, std = allr.mean(), allr.std().clamp(min=1e-6) if len(allr) > 1 else torch.tensor(1.0)
        rm.head.weight.div_(std), rm.head.bias.sub_(mean).div_(std)
    return dict(heldout_accuracy=acc.item(), heldout_bt_loss=loss.item(), heldout_pairs=len(p))


# ALGO LOGIC: reference sampler mu (sampling up to a length limit, then truncation after the first stop token)
@torch.no_grad()
def sample_responses(lm, p_ids, p_mask, num_new, temperature, stop_ids):
    """Sampling with a KV cache until every sequence holds a stop token; stop tokens fill the rest of num_new."""
    mask, pos = p_mask, (p_mask.cumsum(1) - 1).clamp(min=0)
    out = lm(input_ids=p_ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    tokens, done = [], torch.zeros(len(p_ids), dtype=torch.bool, device=p_ids.device)
    for t in range(num_new):
        logits = out.logits[:, -1].float()
        nxt = torch.multinomial((logits / temperature).softmax(-1), 1) if temperature else logits.argmax(-1, True)
        tokens.append(nxt)
        done |= torch.isin(nxt[:, 0], stop_ids)
        if t + 1 == num_new or bool(done.all()):
            break
        mask, pos = torch.cat([mask, torch.ones_like(nxt)], 1), pos[:, -1:] + 1
        out = lm(input_ids=nxt, attention_mask=mask, position_ids=pos, past_key_values=out.past_key_values,
                 use_cache=True)
    tokens = torch.cat(tokens, 1)
    return F.pad(tokens, (0, num_new - tokens.shape[1]), value=int(stop_ids[0]))


def truncate_at_eos(tokens, eos_ids, pad_id, eos_id):
    """Tokens through the first stop token, the rest masked padding; one that hit the limit gets eos_id appended."""
    tokens = torch.cat([tokens, torch.full_like(tokens[:, :1], eos_id)], 1)
    keep = through_first_stop(tokens, eos_ids)
    width = int(keep.sum(1).max())
    return tokens.masked_fill(~keep, pad_id)[:, :width], keep.long()[:, :width]


def through_first_stop(tokens, eos_ids):
    """True up to and including each row's first stop token (everywhere when it has none)."""
    is_eos = torch.isin(tokens, eos_ids)
    return (is_eos.cumsum(1) - is_eos.long()) == 0


@torch.no_grad()
def response_logprobs(lm, embed, p_ids, p_mask, r_ids, r_mask, allowed, top_k=0, cache=None, rows=None):
    """log mu(y_t | x, y_<t), the top-k allowed next tokens and their log mu; with cache and rows, responses only."""
    T, dtype = r_ids.shape[1], embed.weight.dtype
    if cache is None:
        x, m = joint_embeds(embed, p_ids, p_mask, embed(r_ids), r_mask)
        pos = (m.cumsum(1) - 1).clamp(min=0)
        logits = lm(inputs_embeds=x, attention_mask=m, position_ids=pos, logits_to_keep=T + 1).logits
        logits = logits[:, :-1].float()  # position P-1+t predicts response token t
    else:  # the prompt's last position (cached) predicts token 0; response positions 0..T-2 predict 1..T-1
        logits = cache["logits"][rows][:, None]
        if T > 1:
            m = torch.cat([p_mask, r_mask[:, :-1]], 1)
            pos = (m.cumsum(1) - 1).clamp(min=0)[:, -(T - 1) :]
            out = lm(inputs_embeds=embed(r_ids[:, :-1]).to(dtype), attention_mask=m, position_ids=pos,
                     past_key_values=cache["rows"](rows), use_cache=True)
            logits = torch.cat([logits, out.logits.float()], 1)
    logp_all = logits.log_softmax(-1)
    logp = logp_all.gather(-1, r_ids[..., None]).squeeze(-1) * r_mask
    cand, cand_lp = torch.zeros(0), torch.zeros(0)
    if top_k:
        cand = logits.masked_fill(~allowed[: logits.shape[-1]], -torch.inf).topk(top_k, -1).indices
        cand_lp = logp_all.gather(-1, cand)
    return logp, cand, cand_lp


def token_logprobs(lm, embed, p_ids, p_mask, r_ids, r_mask, allowed, mb, top_k=0, cache=None, rows=None):
    """response_logprobs in micro-batches."""
    rows = torch.zeros(len(r_ids), dtype=torch.long, device=r_ids.device) if rows is None else rows
    f = lambda a, b, c, d, e: response_logprobs(lm, embed, a, b, c, d, allowed, top_k, cache, e)
    return chunked(f, len(r_ids), mb, p_ids, p_mask, r_ids, r_mask, rows)


# ALGO LOGIC: SVGD, phi(x_i) = (1/N) sum_j [k(x_j, x_i) grad R(x_j) / alpha + grad_{x_j} k(x_j, x_i)]
def svgd_direction(x, score):
    """x, score: (B, N, D) particles of B prompts; RBF kernel with the median bandwidth h = med(d^2) / (2 log(N+1))."""
    n = x.shape[1]
    d2 = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist").pow(2)
    h = torch.quantile(d2.flatten(1), 0.5, dim=1)[:, None, None] / (2 * math.log(n + 1))
    k = torch.exp(-d2 / (2 * h + 1e-6))
    repulsion = (x * k.sum(-1, keepdim=True) - k @ x) * 2 / (2 * h + 1e-6)
    return (k @ score + repulsion) / n


def particle_direction(u, score, movable, n):
    """SVGD direction for response embeddings u (B*N, T, d), each particle its flattened movable embeddings."""
    mov = movable[..., None].to(u.dtype)
    flat = lambda t: (t * mov).reshape(len(u) // n, n, -1)
    return svgd_direction(flat(u), flat(score)).view_as(u) * mov


def nearest_tokens(u, table, allowed, chunk=4096):
    """Nearest allowed token of each embedding: argmin_v ||u - E_v||^2 = argmax_v 2 u.E_v - ||E_v||^2."""
    table = table.float()
    bias = table.pow(2).sum(-1).masked_fill(~allowed[: len(table)], torch.inf)
    flat = u.reshape(-1, u.shape[-1]).float()
    ids = [(2 * flat[i : i + chunk] @ table.T - bias).argmax(-1) for i in range(0, len(flat), chunk)]
    return torch.cat(ids).view(u.shape[:-1])


def table_spacing(table, allowed, sample=2048, chunk=256):
    """Median distance from an allowed token's embedding to its nearest allowed neighbour (the embed step's unit)."""
    idx = allowed[: len(table)].nonzero().flatten()
    pick = idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(0))[:sample].to(idx.device)]
    t, near = table.float(), []
    sq = t[idx].pow(2).sum(-1)
    for i in range(0, len(pick), chunk):
        a = t[pick[i : i + chunk]]
        d2 = (a.pow(2).sum(-1, keepdim=True) + sq - 2 * a @ t[idx].T).clamp(min=0)
        near.append(d2.topk(2, -1, largest=False).values[:, 1].sqrt())  # [0] is the token itself
    return torch.cat(near).median().item()


def first_eos(ids, eos_ids):
    """Index of each response's first EOS (its length - 1); the last position when it has none."""
    is_eos = torch.isin(ids, eos_ids)
    return torch.where(is_eos.any(1), is_eos.float().argmax(1), ids.shape[1] - 1)


def end_at_eos(ids, ends, eos_ids, eos_id):
    """A response ends at its first EOS; one whose EOS became another token grows by one (EOS after it), within T."""
    first = first_eos(ids, eos_ids)
    grow = first > ends
    new = torch.where(grow, (ends + 1).clamp(max=ids.shape[1] - 1), first)
    at_new = torch.arange(ids.shape[1], device=ids.device) == new[:, None]
    return torch.where(grow[:, None] & at_new, eos_id, ids), new


# ALGO LOGIC: transport. Particle spaces over one SVGD direction (embed, topk) and the MH chain (mh)
def transport(ref_ids, r_mask, movable, n, steps, reward_fn, logprob_fn, embed_table, allowed, args,
              eos_ids=None, eos_id=None, spacing=None, trace=None, suffix_fn=None, cost=None):
    """Moves the N reference particles (B*N, T) of each prompt for max(steps) steps; snapshots at every L in steps
    (and every step into `trace`). reward_fn(ids, emb, grad) -> R [, dR/demb]; logprob_fn(ids, emb, top_k, grad) ->
    (log mu per token, top-k next tokens, their log mu, d log mu / demb). Without eos_ids only `movable` moves."""
    cost = cost or (lambda: 0)
    if args.transport == "mh":
        return mh_transport(ref_ids, r_mask, steps, reward_fn, logprob_fn, suffix_fn, embed_table, args, trace, cost)
    flow = topk_search if args.transport == "topk" else embed_flow
    return flow(ref_ids, r_mask, movable, n, steps, reward_fn, logprob_fn, embed_table.float(), allowed, args,
                eos_ids, eos_id, spacing, trace, cost)


def snapshot(snaps, trace, steps, step, ids, R, lp, t0, live, cost, **info):
    """(tokens, R, sum log mu, seconds, mask, info) after `step`: kept when step is in steps, and in trace."""
    snap = (ids.clone(), R.clone(), lp.sum(1), time.time() - t0, live.long(), dict(info, forwards=cost()))
    if step in steps:
        snaps[step] = snap
    if trace is not None:
        trace.append(snap)


def movable_now(movable, ends, eos_ids, T):
    """Positions that may change: `movable` at fixed length; else the live ones (stop token too) before the last."""
    pos = torch.arange(T, device=ends.device)
    return movable.bool() if eos_ids is None else (pos <= ends[:, None]) & (pos < T - 1)


def embed_flow(ref_ids, r_mask, movable, n, steps, reward_fn, logprob_fn, table, allowed, args, eos_ids, eos_id,
               spacing, trace, cost):
    """The paper's configuration as a third-party summary describes it: token embeddings u moved by Adam(lr = ε ·
    spacing / √d) on −phi (SVGD of ∇R/α), decoded to the nearest allowed tokens only for scoring."""
    T, t0, snaps, ids, ends = ref_ids.shape[1], time.time(), {}, ref_ids.clone(), r_mask.sum(1) - 1
    live = lambda: r_mask if eos_ids is None else torch.arange(T, device=ids.device) <= ends[:, None]
    R, lp = reward_fn(ids, None, False), logprob_fn(ids, None, 0, False)[0]
    snapshot(snaps, trace, steps, 0, ids, R, lp, t0, live(), cost)
    u = table[ids].clone().requires_grad_(True)
    opt = torch.optim.Adam([u], lr=args.step_size * (spacing or table_spacing(table, allowed)) / math.sqrt(u.shape[-1]))
    for step in range(1, max(steps) + 1):
        mov, x = movable_now(movable, ends, eos_ids, T), u.detach()
        u.grad = -particle_direction(x, reward_fn(ids, x, True)[1] / args.alpha, mov, n)
        opt.step()
        ids = torch.where(mov, nearest_tokens(u.detach(), table, allowed), ids)
        if eos_ids is not None:
            ids, ends = end_at_eos(ids, ends, eos_ids, eos_id)
        R, lp = reward_fn(ids, None, False), logprob_fn(ids, None, 0, False)[0]
        snapshot(snaps, trace, steps, step, ids, R, lp, t0, live(), cost)
    return snaps


def topk_search(ref_ids, r_mask, movable, n, steps, reward_fn, logprob_fn, table, allowed, args, eos_ids, eos_id,
                spacing, trace, cost):
    """Baseline search: re-scores the --num-proposals top-k swaps of largest gain (E_v − u_t)·phi_t and keeps the
    best if it raises R/α + lm_coef log mu; rejected moves are remembered until the particle moves."""
    (BN, T), k, t0, snaps, ids, ends = ref_ids.shape, args.top_k, time.time(), {}, ref_ids.clone(), r_mask.sum(1) - 1
    live = lambda: r_mask if eos_ids is None else torch.arange(T, device=ids.device) <= ends[:, None]
    R, (lp, cand, _, _) = reward_fn(ids, None, False), logprob_fn(ids, None, k if max(steps) else 0, False)
    snapshot(snaps, trace, steps, 0, ids, R, lp, t0, live(), cost)
    tried = torch.zeros_like(cand, dtype=torch.bool) if max(steps) else None
    J = lambda r, logp: r / args.alpha + args.lm_coef * logp.sum(1)  # log pi* = R / alpha + lm_coef log mu (+ const)
    for step in range(1, max(steps) + 1):
        mov, u = movable_now(movable, ends, eos_ids, T), table[ids]
        phi = particle_direction(u, reward_fn(ids, u, True)[1] / args.alpha, mov, n)
        gain = ((table[cand] - u[:, :, None]) * phi[:, :, None]).sum(-1)  # (BN, T, k)
        gain = gain.masked_fill((cand == ids[..., None]) | ~mov[..., None] | tried, -torch.inf)
        m = min(args.num_proposals, T * k)
        best = gain.flatten(1).topk(m, -1)
        at_pos, kk = best.indices // k, best.indices % k
        prop, rows = ids.repeat_interleave(m, 0), torch.arange(BN * m, device=ids.device)
        prop[rows, at_pos.flatten()] = cand.flatten(0, 1)[(rows // m) * T + at_pos.flatten(), kk.flatten()]
        prop_ends = ends.repeat_interleave(m, 0)
        if eos_ids is not None:
            prop, prop_ends = end_at_eos(prop, prop_ends, eos_ids, eos_id)
        Rp, (lpp, candp, _, _) = reward_fn(prop, None, False), logprob_fn(prop, None, k, False)
        Jp = J(Rp, lpp).masked_fill(~torch.isfinite(best.values.flatten()), -torch.inf).view(BN, m)
        jbest, arg = Jp.max(1)
        accept = jbest > J(R, lp)
        pick = torch.arange(BN, device=ids.device) * m + arg
        ids, ends = torch.where(accept[:, None], prop[pick], ids), torch.where(accept, prop_ends[pick], ends)
        R, lp = torch.where(accept, Rp[pick], R), torch.where(accept[:, None], lpp[pick], lp)
        cand = torch.where(accept[:, None, None], candp[pick], cand)
        tried = tried.flatten(1).scatter(1, best.indices, True).view_as(tried) & ~accept[:, None, None]
        snapshot(snaps, trace, steps, step, ids, R, lp, t0, live(), cost, accepted=accept)
    return snaps


# ALGO LOGIC: value-gradient Metropolis-Hastings toward pi*(y|x) ∝ mu(y|x) exp(R(x, y) / alpha)
def mh_terms(ids, ends, g, cand, cand_lp, table, tau, kappa):
    """First-order gains Δ_t(v) = g_t·(E_v − E_{y_t}) over the candidates C_t (mu's top-k after y_<t), log q(t|y)
    ∝ κ max_v Δ_t(v) over the positions that may change (through the stop token, before the budget's forced stop),
    and log Z_t(y) = logsumexp_v [log mu(v|y_<t) + τ Δ_t(v)] of the token proposal."""
    delta = ((table[cand] - table[ids][:, :, None]) * g[:, :, None]).sum(-1)  # (BN, W, k)
    may = torch.arange(ids.shape[1], device=ids.device) <= ends.clamp(max=ids.shape[1] - 2)[:, None]
    log_q = (kappa * delta.max(-1).values).masked_fill(~may, -torch.inf).log_softmax(-1)
    return delta, log_q, (cand_lp + tau * delta).logsumexp(-1)


def mh_transport(ref_ids, r_mask, steps, reward_fn, logprob_fn, suffix_fn, table, args, trace=None,
                 cost=lambda: 0, hastings=True):
    """One Metropolis-Hastings chain per particle, started from the reference samples; snapshots at every L in steps.
    A step proposes t ~ q(t|y), v ~ mu(v|y_<t) e^{τΔ_t(v)} / Z_t(y) over C_t, then y'_>t ~ mu(·|y_<t, v) (suffix_fn
    -> (ids', stop positions)), and accepts with log A = (R(y') − R(y))/α + log q(t|y') − log q(t|y)
    + τ(Δ'_t(y_t) − Δ_t(v)) + log Z_t(y) − log Z_t(y'): with Q(y→y') = q(t|y) mu(v|y_<t) e^{τΔ_t(v)} / Z_t(y) ·
    mu(y'_>t|y_<t, v), every mu factor of π* ∝ mu e^{R/α} cancels in π*(y') Q(y'→y) / [π*(y) Q(y→y')]. The reverse
    move picks the same t (y'_<t = y_<t), so detailed balance holds for each t; it is impossible (rejected) when
    y_t ∉ C_t. Width W = budget + forced stop. hastings=False keeps only (R' − R)/α (exact only for τ = κ = 0)."""
    (BN, W), tau, kappa, k, t0 = ref_ids.shape, args.mh_tau, args.mh_kappa, args.top_k, time.time()
    ids, ends, table, snaps = ref_ids.clone(), r_mask.sum(1) - 1, table.float(), {}
    rows, pos = torch.arange(BN, device=ids.device), torch.arange(W, device=ids.device)
    R, g = reward_fn(ids, table[ids], True) if max(steps) else (reward_fn(ids, None, False), None)
    lp, cand, cand_lp, _ = logprob_fn(ids, None, k if max(steps) else 0, False)
    t, accept = torch.zeros_like(ends), torch.zeros_like(ends, dtype=torch.bool)
    for step in range(max(steps) + 1):
        if step:
            delta, log_q, log_z = mh_terms(ids, ends, g, cand, cand_lp, table, tau, kappa)
            t = torch.multinomial(log_q.exp(), 1)[:, 0]
            j = torch.multinomial((cand_lp + tau * delta)[rows, t].softmax(-1), 1)[:, 0]
            prop, prop_ends = suffix_fn(ids, t, cand[rows, t, j])
            (Rp, gp), (lpp, candp, candp_lp, _) = reward_fn(prop, table[prop], True), logprob_fn(prop, None, k, False)
            dp, log_qp, log_zp = mh_terms(prop, prop_ends, gp, candp, candp_lp, table, tau, kappa)
            back = candp[rows, t] == ids[rows, t, None]  # y_t among the reverse move's candidates
            log_a = (Rp - R) / args.alpha
            if hastings:
                rev = (dp[rows, t] * back).sum(-1)  # Δ'_t(y_t)
                log_a = log_a + log_qp[rows, t] - log_q[rows, t] + tau * (rev - delta[rows, t, j])
                log_a = log_a + log_z[rows, t] - log_zp[rows, t]
            accept = back.any(-1) & (torch.rand(BN, device=ids.device).log() < log_a)
            a2, a3 = accept[:, None], accept[:, None, None]
            ids, ends, R = torch.where(a2, prop, ids), torch.where(accept, prop_ends, ends), torch.where(accept, Rp, R)
            g, lp = torch.where(a3, gp, g), torch.where(a2, lpp, lp)
            cand, cand_lp = torch.where(a3, candp, cand), torch.where(a3, candp_lp, cand_lp)
        snapshot(snaps, trace, steps, step, ids, R, lp, t0, pos <= ends[:, None], cost, position=t, accepted=accept)
    return snaps


def select(snap, n):
    """Argmax of the re-scored reward over each prompt's particles (L = 0: best-of-N exactly)."""
    ids, R, lp_sum, _, mask = snap[:5]
    nll = -lp_sum / mask.sum(1).clamp(min=1)
    best = R.view(-1, n).argmax(1) + torch.arange(len(R) // n, device=R.device) * n
    return best, ids[best], R[best], nll[best], mask[best]


# Evaluation helpers: judges and distances
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
        p = [prompt_ids(self.tok, x, self.args) for x in prompts]
        r = [response_ids(self.tok, y, self.args.rm_max_response_tokens, self.end) for y in responses]
        return ids_rewards(self.rm, self.rm.backbone.get_input_embeddings(), p, r, self.tok.pad_token_id, self.device,
                           self.args.micro_batch_size).tolist()


def plot_runs(summaries, folder):
    """judge_vs_compute.png: each judge's score against token-forwards per prompt (log x) and against NLL/token."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    judges = [j for j in ("judge", "judge2") if all(j in s["transport"]["0"] for s in summaries)]
    fig, axes = plt.subplots(len(judges), 2, figsize=(10, 3.6 * len(judges)), squeeze=False)
    for s, label in zip(summaries, run_labels(summaries)):
        Ls = sorted(int(L) for L in s["transport"])
        res = [s["transport"][str(L)] for L in Ls]
        fr = [s["best_of_n"][k] for k in sorted(s.get("best_of_n", {}), key=int)]
        for row, j in zip(axes, judges):
            for ax, x in zip(row, ("forwards_per_prompt", "nll_per_token")):
                if max(Ls) > 0:
                    ax.plot([r[x] for r in res], [r[j] for r in res], marker="o", label=label)
                if fr:
                    ax.plot([r[x] for r in fr], [r[j] for r in fr], "k--s", ms=4, label="best-of-N frontier")
    for row, j in zip(axes, judges):
        row[0].set(xscale="log", xlabel="model token-forwards per prompt (backward = 2)", ylabel=f"{j} score")
        row[1].set(xlabel="NLL / token under mu", ylabel=f"{j} score")
        row[0].set_title(f"{j}: {summaries[0]['judges'][j]}", fontsize=9)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(folder, exist_ok=True)
    fig.savefig(os.path.join(folder, "judge_vs_compute.png"), dpi=80)
    plt.close(fig)


def matched_compute(summaries, folders):
    """--plot-runs: every L > 0 of every run against the frontier run's best-of-n with the fewest token-forwards at
    or above the run's: paired differences over prompts (each folder's samples.jsonl) ± their SE."""
    runs = [(s, [json.loads(x) for x in open(os.path.join(d, "samples.jsonl"))]) for s, d in zip(summaries, folders)]
    fs, fr = next(((s, r) for s, r in runs if s.get("best_of_n")), (None, None))
    if fs is None:
        return
    cols = list(fs["judges"]) + ["nll"]
    print(f"{'run':<26}{'L':>3}{'fwd/prompt':>11}{'vs best-of':>11}" + "".join(f"{c + ' diff':>18}" for c in cols))
    for s, recs in runs:
        if [r["prompt"] for r in recs] != [r["prompt"] for r in fr]:
            print(f"warning: {s['run_name']} was not run on the frontier run's prompts; skipped")
            continue
        for L, x in ((L, x) for L, x in s["transport"].items() if L != "0"):
            above = [m for m, y in fs["best_of_n"].items() if y["forwards_per_prompt"] >= x["forwards_per_prompt"]]
            m = min(above, key=int) if above else max(fs["best_of_n"], key=int)
            d = [np.array([r["vgf"][L].get(c, np.nan) - f["best_of_n"][m][c] for r, f in zip(recs, fr)]) for c in cols]
            print(f"{s['run_name']:<26}{L:>3}{x['forwards_per_prompt']:>11.0f}{m:>11}"
                  + "".join(f"{v.mean():>+10.3f} ± {se(v):.3f}" for v in d))


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


def edit_distance(a, b):
    """Levenshtein distance between two token lists."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


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
    """--output-dir must be (or can become) a writable folder; an explicit --run-name must not name a used folder."""
    run_dir = os.path.join(args.output_dir, args.run_name) if args.run_name else args.output_dir
    if args.run_name and os.path.isdir(run_dir) and os.listdir(run_dir):
        reuse = os.path.join(run_dir, "reward_model")
        hint = f" (reuse its reward model with --reward-model {reuse})" if os.path.isdir(reuse) else ""
        raise VGFError(f"--run-name {args.run_name}: {run_dir} already holds a run; pass another --run-name or delete "
                       f"the folder{hint}")
    folder = os.path.abspath(run_dir)
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


def synced(device, out=None):
    """CUDA runs asynchronously: wait for the queued work before reading a clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out


NEW_RUN_DIRS = []  # (run folder, its writer) this process created; removed when the run fails before results


def remove_unfinished_run_dirs():
    """After an error or Ctrl-C: remove the new run folders without results or a trained reward model (returned)."""
    kept = [d for d, _ in NEW_RUN_DIRS if os.path.exists(os.path.join(d, "reward_model"))]
    for d, writer in NEW_RUN_DIRS:
        writer.close()  # its thread creates the events file lazily: it would land in a folder being removed
        if d not in kept and not os.path.exists(os.path.join(d, "summary.json")):
            shutil.rmtree(d, ignore_errors=True)
    return kept


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


def setup(args):
    """Device (one process), seeding, dtype, tokenizer, preference data, the base model mu, stop tokens and the
    tokens the transport may propose. Returns (ctx, train rows, held-out rows)."""
    from transformers import AutoModelForCausalLM
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise VGFError("data-parallel evaluation over several processes (accelerate launch, torchrun) is not "
                       "provided: run `python vgf_llm.py ...` as one process")
    ctx = SimpleNamespace(device=torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu"))
    ctx.model_path, ctx.gguf_file = resolve_model(args.model, args.gguf_file)
    check_dataset(args)
    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    ctx.bf16 = args.bf16 and ctx.device.type == "cuda"
    ctx.dtype = torch.bfloat16 if ctx.bf16 else torch.float32
    ctx.tok = tok = load_tokenizer(ctx.model_path, ctx.gguf_file)
    check_prompt_room(tok, args)
    train_rows, test_rows = load_preferences(args)  # data problems surface before the model loads
    lm = from_pretrained(AutoModelForCausalLM, ctx.model_path, gguf_file=ctx.gguf_file, dtype=ctx.dtype)
    ctx.lm = lm.to(ctx.device).eval().requires_grad_(False)
    ctx.embed = embed = lm.get_input_embeddings()
    # a response ends at the tokenizer's or generation config's EOS or the chat template's end of turn
    stop_list, ctx.end_id = stop_tokens(tok, lm.generation_config, args.chat_template)
    ctx.eos_ids = torch.tensor(stop_list, device=ctx.device)
    ctx.allowed = torch.zeros(max(embed.weight.shape[0], len(tok)), dtype=torch.bool, device=ctx.device)
    ctx.allowed[: tok.vocab_size] = True  # transport never proposes special or added tokens, nor a stop token
    ctx.allowed[torch.tensor(tok.all_special_ids + stop_list, dtype=torch.long)] = False
    ctx.allowed[ctx.end_id] = True  # the stop token is a position like any other: lengths change
    ctx.base = (ctx.model_path, ctx.gguf_file, lm.base_model)  # the backbone module, shared by a frozen reward model
    ctx.spacing = table_spacing(embed.weight.detach(), ctx.allowed) if args.transport == "embed" else None
    return ctx, train_rows, test_rows


def open_run_folder(args, ctx):
    """The run's folder, its TensorBoard writer and, with --track, wandb."""
    name = os.path.basename(ctx.model_path.rstrip("/"))
    ctx.run_name = args.run_name or f"{args.exp_name}__{name}__{args.seed}__{int(time.time())}"
    ctx.run_dir = os.path.join(args.output_dir, ctx.run_name)
    if args.track:
        import wandb
        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                   config=vars(args), name=ctx.run_name, save_code=True)
    new = not os.path.exists(ctx.run_dir)
    ctx.writer = SummaryWriter(ctx.run_dir)
    NEW_RUN_DIRS.extend([(ctx.run_dir, ctx.writer)] * new)
    table = "\n".join(f"|{k}|{v}|" for k, v in vars(args).items())
    ctx.writer.add_text("hyperparameters", "|param|value|\n|-|-|\n%s" % table)


# ALGO LOGIC: value learning (Bradley-Terry reward model on the base backbone)
def value_learning(args, ctx, train_rows, test_rows):
    """The reward model R: loaded from --reward-model, or trained and saved in the run."""
    dtype, embed = ctx.dtype, ctx.embed
    if args.reward_model:
        rm, rm_info = RewardModel.load(args.reward_model, dtype, ctx.base)
        rm, rm_path = rm.to(ctx.device), args.reward_model
    else:
        rm_path = os.path.join(ctx.run_dir, "reward_model")
        rm = build_reward_model(ctx.model_path, ctx.gguf_file, ctx.lm, args, dtype)
        rm_info = train_reward_model(rm, rm.backbone.get_input_embeddings(), ctx.tok, train_rows, test_rows, args,
                                     ctx.device, ctx.writer, ctx.end_id, ctx.bf16)
        rm.backbone.to(dtype)  # a trained float32 backbone runs in the base model's dtype from here on
        path = os.path.abspath(ctx.model_path) if os.path.exists(ctx.model_path) else ctx.model_path
        ref = None if args.rm_train_backbone else {"path": path, "gguf_file": ctx.gguf_file}
        info = dict(rm_info, base_model=args.model, train_pairs=min(len(train_rows), args.rm_train_pairs))
        rm.save(rm_path, ctx.tok, info, ref)
    rm.eval().requires_grad_(False)
    rm_embed = rm.backbone.get_input_embeddings()
    if rm_embed.weight.shape != embed.weight.shape or not torch.equal(rm_embed.weight, embed.weight):
        raise VGFError("the reward model's token embeddings differ from the base model's: train it from --model")
    if "heldout_accuracy" not in rm_info or args.reward_model:
        rm_info = dict(rm_info, **evaluate_reward_model(rm, embed, ctx.tok, test_rows, args, ctx.device, ctx.end_id))
    print(f"reward model {rm_path}: held-out pairwise accuracy {rm_info['heldout_accuracy']:.3f}")
    ctx.writer.add_scalar("eval/rm_heldout_accuracy", rm_info["heldout_accuracy"], 0)
    ctx.rm, ctx.rm_info, ctx.rm_path = rm, rm_info, rm_path
    ctx.judges = [(name, Judge(spec, args, ctx.device, dtype, (ctx.tok, rm, ctx.end_id), ctx.base))
                  for name, spec in (("judge", args.judge), ("judge2", args.judge2)) if name == "judge" or spec]



def sample_counted(ctx, p_ids, p_mask, num_new, temperature, mb):
    """sample_responses in micro-batches; also the token-forwards run (the prompts' prefill + one per step)."""
    out, fwd = [], 0
    for i in range(0, len(p_ids), mb):
        gen = sample_responses(ctx.lm, p_ids[i : i + mb], p_mask[i : i + mb], num_new, temperature, ctx.eos_ids)
        out.append(gen)
        fwd += int(p_mask[i : i + mb].sum()) + len(gen) * (int(first_eos(gen, ctx.eos_ids).max()) + 1)
    return torch.cat(out), fwd


# ALGO LOGIC: reference sampler: N responses per prompt from mu
def reference_sampler(rows, args, ctx):
    B, n, T, t0 = len(rows), args.num_particles, args.max_new_tokens, time.time()
    prompts = [prompt_ids(ctx.tok, r["prompt"], args) for r in rows]
    p_ids, p_mask = (x.to(ctx.device) for x in pad(prompts, ctx.tok.pad_token_id, left=True))
    pr_ids, pr_mask = p_ids.repeat_interleave(n, 0), p_mask.repeat_interleave(n, 0)
    gen, fwd = sample_counted(ctx, pr_ids, pr_mask, T, args.temperature, args.micro_batch_size)
    ref_ids, r_mask = truncate_at_eos(gen, ctx.eos_ids, ctx.tok.pad_token_id, ctx.end_id)
    # room to grow up to max_new_tokens (+ the stop token)
    ref_ids = F.pad(ref_ids, (0, T + 1 - ref_ids.shape[1]), value=ctx.tok.pad_token_id)
    r_mask = F.pad(r_mask, (0, T + 1 - r_mask.shape[1]))
    synced(ctx.device)
    return SimpleNamespace(B=B, p_ids=p_ids, p_mask=p_mask, ref_ids=ref_ids, r_mask=r_mask,
                           t_sample=time.time() - t0, forwards=fwd)


def model_fns(batch, args, ctx, tally):
    """reward_fn, logprob_fn and suffix_fn over the prompts' KV cache; each adds the token-forwards it runs to
    tally[0] (a backward counts 2; NLL-only passes are evaluation, not counted)."""
    lm, rm, embed, eos_ids, mb = ctx.lm, ctx.rm, ctx.embed, ctx.eos_ids, args.micro_batch_size
    p_ids, p_mask, B = batch.p_ids, batch.p_mask, batch.B
    rm_cache, lm_cache = prompt_cache(rm.backbone, embed, p_ids, p_mask), prompt_cache(lm, embed, p_ids, p_mask)
    tally[0] += int(p_mask.sum()) * (1 + (max(args.transport_steps) > 0))  # the prompts' keys and values, once

    def expand(ids):  # prompts, masks and prompt index of ids holding several proposals per particle
        prow = torch.arange(len(ids), device=ids.device) // (len(ids) // B)
        return p_ids[prow], p_mask[prow], through_first_stop(ids, eos_ids).long(), prow

    def reward_fn(ids, emb, grad):
        e, (pi, pm, rmask, prow) = embed(ids).float() if emb is None else emb, expand(ids)
        tally[0] += ids.numel() * (3 if grad else 1)
        with torch.set_grad_enabled(grad):
            out = rewards(rm, embed, pi, pm, ids, rmask, mb, r_emb=e, grad=grad, cache=rm_cache, rows=prow)
            return synced(ctx.device, out)

    def logprob_fn(ids, emb, top_k, grad):  # (no transport differentiates log mu)
        pi, pm, rmask, prow = expand(ids)
        tally[0] += ids.numel() * (top_k > 0)
        lp, cand, cand_lp = token_logprobs(lm, embed, pi, pm, ids, rmask, ctx.allowed, mb, top_k, lm_cache, prow)
        return synced(ctx.device, (lp, cand, cand_lp, None))

    def suffix_fn(ids, t, v):  # y'_<t = y_<t, y'_t = v, y'_>t ~ mu(. | x, y_<t, v) to a stop token or the budget
        W, (pi, pm, _, _) = ids.shape[1], expand(ids)
        heads = [ids[i, : t[i]].tolist() + [int(v[i])] for i in range(len(ids))]
        seqs = [p[m.bool()].tolist() + h for p, m, h in zip(pi, pm, heads)]  # prompt without padding + y_<t, v
        ctx_ids, ctx_mask = pad(seqs, ctx.tok.pad_token_id, True)
        num_new = W - 2 - int(t.min())
        gen, fwd = sample_counted(ctx, ctx_ids.to(ids.device), ctx_mask.to(ids.device), max(num_new, 1), 1.0, mb)
        tally[0] += fwd
        full = torch.tensor([h + gen[i, : W - 1 - len(h)].tolist() for i, h in enumerate(heads)], device=ids.device)
        new, mask = truncate_at_eos(full, eos_ids, ctx.tok.pad_token_id, ctx.end_id)  # the budget forces a stop
        return F.pad(new, (0, W - new.shape[1]), value=ctx.tok.pad_token_id), mask.sum(1) - 1

    return reward_fn, logprob_fn, suffix_fn



# Evaluation: judges, NLL, compute and the KL estimate per prompt; aggregated with paired standard errors
def evaluate_batch(rows, batch, snaps, steps, args, ctx):
    """Per prompt: the sample (particle 0), the chosen response, at every L the particle of highest R (L = 0:
    best-of-N) and a uniform one (KL estimate E[R]/α − log Z, log Z = log mean exp(R/α) over mu's N); best-of-n."""
    tok, B, n, eos, ref = ctx.tok, batch.B, args.num_particles, ctx.eos_ids, snaps[0]
    chosen = [response_ids(tok, r["chosen"], args.rm_max_response_tokens, ctx.end_id) for r in rows]
    ch_ids, ch_mask = (x.to(ctx.device) for x in pad(chosen, tok.pad_token_id, left=False))
    ch_lp = token_logprobs(ctx.lm, ctx.embed, batch.p_ids, batch.p_mask, ch_ids, ch_mask, ctx.allowed,
                           args.micro_batch_size)[0].sum(1) / ch_mask.sum(1)
    words = lambda snap, i: snap[0][i][snap[4][i].bool() & ~torch.isin(snap[0][i], eos)]  # no padding, no stop
    text_of = lambda snap, i: tok.decode(words(snap, i), skip_special_tokens=True)
    nll_of = lambda snap, i: (-snap[2][i] / snap[4][i].sum()).item()
    prompts, single = [r["prompt"] for r in rows], torch.arange(B, device=ctx.device) * n
    judged = lambda texts: {name: judge(prompts, texts) for name, judge in ctx.judges}
    recs = [dict(prompt=r["prompt"], chosen=r["chosen"], sample=text_of(ref, i), nll_sample=nll_of(ref, i),
                 nll_chosen=-ch_lp[b].item(), vgf={}, best_of_n={}) for b, (r, i) in enumerate(zip(rows, single))]
    for key, texts in (("sample", [r["sample"] for r in recs]), ("chosen", [r["chosen"] for r in rows])):
        for name, scores in judged(texts).items():
            for rec, x in zip(recs, scores):
                rec[f"{name}_{key}"] = x
    log_z = (ref[1].view(B, n) / args.alpha).logsumexp(1) - math.log(n)
    uniform = torch.randint(n, (B,), generator=ctx.draws).to(ctx.device) + single
    live_ref = torch.where(ref[4].bool(), ref[0], -1)
    for L in steps:
        snap, best = snaps[L], select(snaps[L], n)[0]
        moved = (torch.where(snap[4].bool(), snap[0], -1) != live_ref).any(1).view(B, n).float().mean(1)
        texts = [text_of(snap, i) for i in best]
        scores = judged(texts)
        for b, i in enumerate(best):
            before, after, u = words(ref, i).tolist(), words(snap, i).tolist(), snap[1][uniform[b]]
            ed = edit_distance(before, after)
            recs[b]["vgf"][str(L)] = dict(
                text=texts[b], reward=snap[1][i].item(), nll=nll_of(snap, i), edit_distance=ed,
                changed=ed / max(1, len(before)), length=len(after), particles_moved=moved[b].item(),
                seconds=(batch.t_sample + snap[3]) / B, forwards=snap[5]["forwards"] / B, uniform_reward=u.item(),
                kl_estimate=(u / args.alpha - log_z[b]).item(), **{name: x[b] for name, x in scores.items()})
    for m in args.best_of_n:  # the first m samples: the frontier of one draw (compute: sampling and scoring m/N)
        best = ref[1].view(B, n)[:, :m].argmax(1) + single
        scores = judged([text_of(ref, i) for i in best])
        for b, i in enumerate(best):
            recs[b]["best_of_n"][str(m)] = dict(
                reward=ref[1][i].item(), nll=nll_of(ref, i), seconds=(batch.t_sample + ref[3]) / B * m / n,
                forwards=ref[5]["forwards"] / B * m / n, **{name: x[b] for name, x in scores.items()})
    stage = dict(sampling=batch.t_sample / B, scoring=ref[3] / B)  # seconds per prompt
    stage["transport_step"] = (snaps[max(steps)][3] - ref[3]) / B / max(steps) if max(steps) else 0.0
    return [dict(r, seconds_by_stage=stage) for r in recs]


def trajectory_rows(rows, trace, args, ctx):
    """Every particle after every step: text, R, NLL/token (--save-trajectories)."""
    n, eos = args.num_particles, ctx.eos_ids
    text_of = lambda x, m: ctx.tok.decode(x[m.bool() & ~torch.isin(x, eos)], skip_special_tokens=True)
    step = lambda t, s, i: dict(step=t, text=text_of(s[0][i], s[4][i]), reward=s[1][i].item(),
                                nll=(-s[2][i] / s[4][i].sum()).item())
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


def summarise(records, steps, args, ctx):
    judges, bon, results = [name for name, _ in ctx.judges], [r["vgf"]["0"] for r in records], {}
    for L in steps:
        v = [r["vgf"][str(L)] for r in records]
        res = results[str(L)] = dict(compare(v, bon, judges), kl_estimate_se=se([x["kl_estimate"] for x in v]))
        judge = np.array([x["judge"] for x in v])
        for key, other in (("best_of_n", [x["judge"] for x in bon]), ("sample", [r["judge_sample"] for r in records]),
                           ("chosen", [r["judge_chosen"] for r in records])):  # share of prompts won, ties half
            res[f"win_rate_vs_{key}"] = float(np.mean((judge > other) + 0.5 * (judge == np.array(other))))
        for k, val in res.items():
            if not isinstance(val, list):
                ctx.writer.add_scalar(f"eval/{k}", val, L)
    frontier = {str(m): dict(compare([r["best_of_n"][str(m)] for r in records], bon, judges),
                             kl_bound=math.log(m) - (m - 1) / m) for m in args.best_of_n}  # KL(best-of-m || mu) bound
    plain = lambda key: dict(**{j: float(np.mean([r[f"{j}_{key}"] for r in records])) for j in judges},
                             **{f"{j}_se": se([r[f"{j}_{key}"] for r in records]) for j in judges},
                             nll_per_token=float(np.mean([r[f"nll_{key}"] for r in records])))
    stages = {k: float(np.mean([r["seconds_by_stage"][k] for r in records])) for k in records[0]["seconds_by_stage"]}
    return dict(run_name=ctx.run_name, judge=ctx.judges[0][1].name, judges={n: j.name for n, j in ctx.judges},
                num_prompts=len(records), reward_model=dict(ctx.rm_info, path=ctx.rm_path), sample=plain("sample"),
                chosen=plain("chosen"), seconds_per_prompt_by_stage=stages, transport=results, best_of_n=frontier,
                args=asdict(args))


def report(summary, records, trajectories, steps, args, ctx):
    """Prints the table and writes summary.json, samples.jsonl, trajectories.jsonl and judge_vs_compute.png."""
    js = list(summary["judges"])
    print(f"\njudges: {summary['judges']}; {len(records)} prompts, N={args.num_particles}, transport={args.transport}")
    print(f"{'method':<14}" + "".join(f"{j:>14}{'diff vs BoN':>16}" for j in js)
          + f"{'NLL/tok':>9}{'KL est':>8}{'changed':>9}{'length':>8}{'s/prompt':>10}{'fwd/prompt':>11}")
    rows = [(k, summary[k]) for k in ("sample", "chosen")] + [
        (f"best-of-{m}", x) for m, x in summary["best_of_n"].items()] + [
        ("best-of-N" if L == 0 else f"VGF L={L}", summary["transport"][str(L)]) for L in steps]
    for label, x in rows:
        line = f"{label:<14}" + "".join(f"{x[j]:>8.3f}±{x[f'{j}_se']:.3f}" + (
            f"{x[f'{j}_diff_vs_best_of_n']:>+10.3f}±{x[f'{j}_diff_se']:.3f}" if f"{j}_diff_se" in x else " " * 16)
            for j in js) + f"{x['nll_per_token']:>9.2f}"
        if "forwards_per_prompt" in x:
            kl = x.get("kl_estimate", x.get("kl_bound"))
            line += (f"{kl:>8.2f}{x.get('tokens_changed', 0):>9.2f}{x.get('length', 0):>8.1f}"
                     f"{x['seconds_per_prompt']:>10.2f}{x['forwards_per_prompt']:>11.0f}")
        print(line)
    print("seconds per prompt: " + ", ".join(f"{k} {v:.3f}" for k, v in summary["seconds_per_prompt_by_stage"].items()))
    os.makedirs(ctx.run_dir, exist_ok=True)
    with open(os.path.join(ctx.run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    for name, lines in (("samples", records), ("trajectories", trajectories if args.save_trajectories else None)):
        if lines is not None:
            with open(os.path.join(ctx.run_dir, f"{name}.jsonl"), "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in lines)
    plot_runs([summary], ctx.run_dir)
    print(f"wrote {ctx.run_dir}/summary.json, samples.jsonl and judge_vs_compute.png")


def main(args):
    check_args(args)
    steps = sorted(set(args.transport_steps))
    ctx, train_rows, test_rows = setup(args)
    open_run_folder(args, ctx)
    value_learning(args, ctx, train_rows, test_rows)
    first = {}  # the first --num-eval-prompts distinct held-out prompts (conversational ones are lists of messages)
    for r in test_rows:
        first.setdefault(json.dumps(r["prompt"]), r)
    prompts, size = list(first.values())[: args.num_eval_prompts], args.prompt_batch_size
    batches = [prompts[i : i + size] for i in range(0, len(prompts), size)]
    records, trajectories = [], []
    torch.manual_seed(args.seed)  # the reference sampler's stream, the same whatever the transport draws
    ctx.draws = torch.Generator().manual_seed(args.seed)  # the uniformly chosen particle per prompt
    for k, rows in enumerate(batches):
        batch = reference_sampler(rows, args, ctx)  # reference sampler mu: N responses per prompt
        tally, trace = [batch.forwards], [] if args.save_trajectories else None  # token-forwards, per-step particles
        reward_fn, logprob_fn, suffix_fn = model_fns(batch, args, ctx, tally)
        # transport: one flow of max(L) steps, snapshotted at each L; its draws (mh) on a stream of their own
        with torch.random.fork_rng(devices=[ctx.device] if ctx.device.type == "cuda" else []):
            torch.manual_seed(args.seed + ((k + 1) << 32))
            snaps = transport(batch.ref_ids, batch.r_mask, None, args.num_particles, steps, reward_fn, logprob_fn,
                              ctx.embed.weight.detach(), ctx.allowed, args, eos_ids=ctx.eos_ids, eos_id=ctx.end_id,
                              spacing=ctx.spacing, trace=trace, suffix_fn=suffix_fn, cost=lambda: tally[0])
        records += evaluate_batch(rows, batch, snaps, steps, args, ctx)  # evaluation of each L
        if trace is not None:
            trajectories += trajectory_rows(rows, trace, args, ctx)
        print(f"prompt batch {k + 1}/{len(batches)}: " + ", ".join(
            f"L={L} judge {np.mean([r['vgf'][str(L)]['judge'] for r in records[-len(rows):]]):.3f}" for L in steps))
    report(summarise(records, steps, args, ctx), records, trajectories, steps, args, ctx)
    ctx.writer.close()
    return ctx.run_dir


if __name__ == "__main__":
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
    except VGFError as e:
        remove_unfinished_run_dirs()
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # one line, no traceback
        kept = remove_unfinished_run_dirs()
        print("\ninterrupted" + "".join(f"; the trained reward model is kept: reuse it with --reward-model "
                                       f"{os.path.join(d, 'reward_model')}" for d in kept), file=sys.stderr)
        sys.exit(130)
