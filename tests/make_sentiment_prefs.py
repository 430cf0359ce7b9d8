"""Builds the offline positive-sentiment preference set used by the vgf_llm.py demonstration.

For each prompt, K responses are sampled from the base model and labelled by VADER's compound sentiment score:
chosen = the most positive, rejected = the most negative (ties dropped). The same VADER scorer is then used by
`vgf_llm.py --judge vader` only for evaluation; the transport uses the reward model learned from these pairs.

    python tests/make_sentiment_prefs.py --model /path/to/folder --gguf-file model.gguf --out prefs.jsonl
"""

import argparse
import json
import os
import random
import sys

import torch
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import vgf_llm  # noqa: E402

TEMPLATES = [
    "Write one sentence about {}.",
    "Describe {} in a single sentence.",
    "What do you think about {}?",
    "Tell me briefly about your experience with {}.",
    "Give a short opinion on {}.",
]
TOPICS = [
    "Mondays",
    "the weather today",
    "public transport",
    "your neighbour's dog",
    "rainy weekends",
    "traffic jams",
    "airport queues",
    "homework",
    "the new phone update",
    "hospital food",
    "a long meeting",
    "winter mornings",
    "the local football team",
    "fast food",
    "social media",
    "cold coffee",
    "a delayed train",
    "online shopping",
    "the city centre",
    "waiting rooms",
    "a camping trip",
    "tax forms",
    "a concert last night",
    "the gym",
    "a job interview",
    "moving house",
    "a surprise party",
    "cooking dinner",
    "learning to drive",
    "the dentist",
    "a broken laptop",
    "summer holidays",
    "a noisy hotel",
    "group projects",
    "the old library",
    "a street market",
    "a rainy commute",
    "video games",
    "a crowded beach",
    "your first day at work",
    "a power cut",
    "gardening",
    "a school reunion",
    "customer service calls",
    "a lost suitcase",
    "a birthday dinner",
    "the morning news",
    "a traffic fine",
    "a long flight",
    "a new restaurant",
    "bus drivers",
    "exam results",
    "a hiking trail",
    "online meetings",
    "a leaking roof",
    "the weekend",
    "a movie sequel",
    "a flat tyre",
    "street musicians",
    "a hotel breakfast",
]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="base model: hub id, folder or .gguf file")
    ap.add_argument("--gguf-file", default=None, help="GGUF file inside --model")
    ap.add_argument("--out", required=True, help="output JSONL (prompt, chosen, rejected)")
    ap.add_argument("--samples", type=int, default=4, help="responses per prompt (K)")
    ap.add_argument("--max-new-tokens", type=int, default=24, help="tokens per response")
    ap.add_argument("--batch-size", type=int, default=64, help="sequences per generation batch")
    ap.add_argument("--seed", type=int, default=1, help="seed")
    ap.add_argument("--num-prompts", type=int, default=len(TEMPLATES) * len(TOPICS),
                    help="the first this many of the shuffled prompts (default: all 300)")
    a = ap.parse_args()

    random.seed(a.seed)
    torch.manual_seed(a.seed)
    from transformers import AutoModelForCausalLM

    path, gguf = vgf_llm.resolve_model(a.model, a.gguf_file)
    tok = vgf_llm.load_tokenizer(path, gguf)
    lm = vgf_llm.from_pretrained(AutoModelForCausalLM, path, gguf_file=gguf).eval()
    vader, args = SentimentIntensityAnalyzer(), vgf_llm.Args()
    prompts = [t.format(x) for x in TOPICS for t in TEMPLATES]
    random.shuffle(prompts)
    prompts = prompts[: a.num_prompts]
    eos_ids = torch.tensor([tok.eos_token_id])
    per = max(1, a.batch_size // a.samples)
    n_rows = 0
    with open(a.out, "w") as f:
        for i in range(0, len(prompts), per):
            batch = prompts[i : i + per]
            ids, mask = vgf_llm.pad([vgf_llm.prompt_ids(tok, p, args) for p in batch], tok.pad_token_id, left=True)
            gen, _ = vgf_llm.sample_responses(
                lm, ids.repeat_interleave(a.samples, 0), mask.repeat_interleave(a.samples, 0), a.max_new_tokens, 1.0,
                eos_ids,
            )
            gen, rmask = vgf_llm.close_responses(gen, eos_ids, tok.pad_token_id, tok.eos_token_id)
            texts = [tok.decode(g[m.bool()], skip_special_tokens=True).strip() for g, m in zip(gen, rmask)]
            for b, p in enumerate(batch):
                group = texts[b * a.samples : (b + 1) * a.samples]
                scores = [vader.polarity_scores(t)["compound"] for t in group]
                hi, lo = max(range(len(group)), key=scores.__getitem__), min(range(len(group)), key=scores.__getitem__)
                if scores[hi] > scores[lo]:
                    f.write(json.dumps(dict(prompt=p, chosen=group[hi], rejected=group[lo])) + "\n")
                    n_rows += 1
            print(f"{i + len(batch)}/{len(prompts)} prompts, {n_rows} pairs", flush=True)


if __name__ == "__main__":
    main()
