"""Which tokens carry the chat drift? KL(initial ‖ updated) per response token, broken down.

    python scripts/drift_tokens.py --responses runs/study/continual/baseline/reference_responses.jsonl \\
        --model disc=runs/study/continual/disc/round1/model --model ft=runs/study/continual/ft/round1/model \\
        --out docs/study_v1/results/drift_tokens.json

For each updated model: the mean KL per response token (fp32, full vocabulary, teacher-forced on the
initial model's greedy replies), the share of the summed KL by position in the reply, on the end-of-turn
token, on punctuation / formatting tokens, on tokens where the two models' top-1 predictions differ,
and the tokens with the largest summed KL.
"""

from __future__ import annotations

import argparse
import json
import string
from collections import defaultdict
from pathlib import Path

import torch

from ctxdistill.evaluate.drift import _teacher_forced_batches, load_responses
from ctxdistill.losses import forward_kl_per_position
from ctxdistill.models import load_model, load_tokenizer

POSITION_BUCKETS = ((0, 5), (5, 20), (20, 10_000))


@torch.no_grad()
def per_token_kl(reference, model, tokenizer, prompts, responses):
    """[(position in reply, target token id, kl, top-1 differs)] over every reply token."""
    rows = []
    for _, lengths, input_ids, attention, keep, targets in _teacher_forced_batches(tokenizer, prompts, responses, 8):
        kwargs = dict(input_ids=input_ids, attention_mask=attention, logits_to_keep=keep, use_cache=False)
        ref = reference(**kwargs).logits.float().reshape(-1, reference.config.vocab_size)
        new = model(**kwargs).logits.float().reshape(-1, model.config.vocab_size)
        kl = forward_kl_per_position(ref, new)
        flips = ref.argmax(-1) != new.argmax(-1)
        offset = 0
        for n in lengths:
            for pos in range(n):
                i = offset + pos
                rows.append((pos, int(targets[i]), float(kl[i]), bool(flips[i])))
            offset += n
    return rows


def token_kind(text: str) -> str:
    stripped = text.strip()
    if not stripped:
        return "whitespace/newline"
    if all(c in string.punctuation for c in stripped):
        return "punctuation/markup"
    return "word"


def breakdown(rows, tokenizer, eos_ids: set[int]) -> dict:
    total = sum(r[2] for r in rows) or 1.0
    by_position = {f"{a}-{b - 1 if b < 10_000 else 'end'}": sum(r[2] for r in rows if a <= r[0] < b) / total for a, b in POSITION_BUCKETS}
    by_kind = defaultdict(float)
    by_token = defaultdict(lambda: [0.0, 0])
    for _, tok, kl, _ in rows:
        text = tokenizer.decode([tok])
        by_kind["end of turn" if tok in eos_ids else token_kind(text)] += kl / total
        by_token[text][0] += kl
        by_token[text][1] += 1
    top = sorted(by_token.items(), key=lambda kv: -kv[1][0])[:15]
    flipped = [r for r in rows if r[3]]
    return {
        "mean_kl_per_token": total / max(len(rows), 1), "tokens": len(rows),
        "share_by_position": by_position, "share_by_kind": dict(by_kind),
        "top1_flips": {"share_of_tokens": len(flipped) / max(len(rows), 1), "share_of_kl": sum(r[2] for r in flipped) / total},
        "share_of_kl_in_top_10pct_tokens": sum(sorted((r[2] for r in rows), reverse=True)[: max(1, len(rows) // 10)]) / total,
        "top_tokens": [{"token": t, "kl_share": v[0] / total, "count": v[1]} for t, v in top],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", default="smollm2-135m-instruct", help="the initial model")
    parser.add_argument("--responses", required=True, help="the initial model's replies (a reference_responses.jsonl)")
    parser.add_argument("--model", action="append", required=True, metavar="NAME=PATH", help="an updated model (repeatable)")
    parser.add_argument("--out", default="", help="write the breakdown as JSON here")
    args = parser.parse_args()

    tokenizer = load_tokenizer(args.reference)
    prompts, responses = load_responses(Path(args.responses))
    reference = load_model(args.reference, dtype=torch.float32)
    eos_ids = {i for i in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")) if isinstance(i, int)}
    result = {"reference": args.reference, "responses": args.responses, "models": {}}
    for spec in args.model:
        name, path = spec.split("=", 1)
        model = load_model(path, dtype=torch.float32)
        result["models"][name] = {"path": path} | breakdown(per_token_kl(reference, model, tokenizer, prompts, responses), tokenizer, eos_ids)
        del model
    text = json.dumps(result, indent=2, ensure_ascii=False)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
