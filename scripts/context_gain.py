"""How much does the context move the teacher on a corpus? DiSC's pull on the student, before training.

    python scripts/context_gain.py --corpus news=bundled:news_updates \\
        --corpus pubmedqa=runs/study/data/pubmedqa/corpus.jsonl --out docs/study_v1/results/context_gain.json

DiSC distils, at every suffix position, the frozen model reading the preceding segments into the same
model reading the suffix alone. At step 0 the student *is* that model, so the initial DiSC loss per
position is T² · KL(teacher with context ‖ teacher alone) at temperature T: how hard the corpus pulls the
student's distribution. FT's initial loss is the document tokens' negative log-likelihood. This script
measures both on each corpus, with DiSC's default splits (the same planning as `ctxdistill train`), in
fp32 on the initial model: mean context KL at T = 1 and T = 2, the share of positions above the
context-sensitive variant's threshold (0.05 nats), the entropies, the NLL with and without context,
and the distilled positions per document.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from ctxdistill.config import TrainConfig
from ctxdistill.inputs.corpus import load_corpus
from ctxdistill.losses import context_kl_per_position
from ctxdistill.methods import PrepareContext
from ctxdistill.methods.disc import Disc, per_split_teacher_logits
from ctxdistill.models import DEFAULT_MODEL, load_model, load_tokenizer


def entropy(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


@torch.no_grad()
def corpus_gain(model, tokenizer, spec: str, cfg: TrainConfig, threshold: float) -> dict:
    documents, _ = load_corpus(spec)
    method = Disc(cfg)
    prepared = method.prepare(documents, PrepareContext(tokenizer, cfg))
    rng = random.Random(cfg.seed)
    columns: dict[str, list[torch.Tensor]] = {k: [] for k in ("kl_t1", "kl_t2", "entropy_with", "entropy_alone", "nll_with", "nll_alone")}
    positions_per_doc = []
    for example in prepared.examples:
        planned = method.plan(example, rng)
        if not planned:
            continue
        [item] = planned
        ids, spans = item.doc.token_ids, item.spans
        with_context = per_split_teacher_logits(model, ids, spans, "cpu").float()
        alone = torch.cat([model(input_ids=torch.tensor([ids[s:e]]), use_cache=False).logits[0, : e - s - 1] for s, e in spans]).float()
        targets = torch.tensor([t for s, e in spans for t in ids[s + 1 : e]])
        columns["kl_t1"].append(context_kl_per_position(with_context, alone, 1.0))
        columns["kl_t2"].append(context_kl_per_position(with_context, alone, 2.0))
        columns["entropy_with"].append(entropy(with_context, 1.0))
        columns["entropy_alone"].append(entropy(alone, 1.0))
        columns["nll_with"].append(torch.nn.functional.cross_entropy(with_context, targets, reduction="none"))
        columns["nll_alone"].append(torch.nn.functional.cross_entropy(alone, targets, reduction="none"))
        positions_per_doc.append(len(targets))
    flat = {k: torch.cat(v) for k, v in columns.items()}
    kl_t2 = flat["kl_t2"]
    top = kl_t2.sort(descending=True).values
    return {
        "corpus": spec, "documents": len(documents), "distilled_documents": len(positions_per_doc),
        "positions": int(kl_t2.numel()), "positions_per_document": sum(positions_per_doc) / max(len(positions_per_doc), 1),
        "mean_context_kl_t1": float(flat["kl_t1"].mean()), "mean_context_kl_t2": float(kl_t2.mean()),
        "initial_disc_loss_t2": float(4.0 * kl_t2.mean()),  # T² · KL at T = 2: DiSC's loss at step 0
        "share_above_threshold_t2": float((kl_t2 > threshold).float().mean()),
        "share_of_kl_in_top_10pct_positions": float(top[: max(1, len(top) // 10)].sum() / top.sum()),
        "mean_entropy_with_context": float(flat["entropy_with"].mean()), "mean_entropy_alone": float(flat["entropy_alone"].mean()),
        "mean_nll_with_context": float(flat["nll_with"].mean()), "mean_nll_alone": float(flat["nll_alone"].mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--corpus", action="append", required=True, metavar="NAME=SPEC")
    parser.add_argument("--threshold", type=float, default=0.05, help="the context-sensitive variant's threshold, nats at T = 2")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, dtype=torch.float32).eval()
    cfg = TrainConfig(model=args.model)
    report = {"model": args.model, "settings": {"split_strategy": cfg.disc.split_strategy, "seed": cfg.seed, "max_length": cfg.max_length,
                                                "threshold": args.threshold, "precision": "fp32"}, "corpora": {}}
    for entry in args.corpus:
        name, _, spec = entry.partition("=")
        report["corpora"][name] = corpus_gain(model, tokenizer, spec, cfg, args.threshold)
        print(name, json.dumps(report["corpora"][name], indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
