"""Are SDFT's self-generated questions about their documents? A rough count, for reading the SDFT pilot.

    python scripts/sdft_questions.py docs/powered/runs/pilot_sdft/runs/sdft_lr0.001_s1/generations.jsonl

SDFT (`--method sdft`) has the initial model write one question per document, then distils the model
answering it with the document in context into the model answering without. A question that names
nothing of its document teaches nothing about it. This script counts the questions that share at least
one capitalised word of three or more letters (a name, a place, an organisation: the facts the probes
ask about) with their document, minus sentence-initial function words. It reads the corpus the run
trained on (`run.json` beside the generations) and prints the count, the share, and a few questions of
each kind. A heuristic: a question can name an entity and still be useless, or paraphrase one without
naming it.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from ctxdistill.inputs.corpus import load_corpus

FUNCTION_WORDS = {"The", "This", "That", "These", "Those", "What", "Which", "Who", "Whom", "Whose", "When", "Where",
                  "Why", "How", "And", "But", "For", "With", "From", "Its", "Their", "His", "Her", "Can", "Does",
                  "Did", "Was", "Were", "Are", "Answer", "Question"}


def capitalised(text: str) -> set[str]:
    return set(re.findall(r"\b[A-Z][A-Za-z]{2,}\b", text)) - FUNCTION_WORDS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("generations", help="a run's generations.jsonl (sdft)")
    parser.add_argument("--corpus", default="", help="the corpus it trained on (default: run.json's `corpus`)")
    parser.add_argument("--show", type=int, default=3, help="questions of each kind to print")
    args = parser.parse_args()
    path = Path(args.generations)
    corpus = args.corpus or json.loads((path.parent / "run.json").read_text())["config"]["corpus"]
    documents = {doc.id: doc.text for doc in load_corpus(corpus)[0]}
    about, not_about = [], []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        shared = capitalised(record["question"]) & capitalised(documents[record["document_id"]])
        (about if shared else not_about).append(record["question"])
    total = len(about) + len(not_about)
    print(json.dumps({"generations": str(path), "questions": total, "naming_their_document": len(about),
                      "share": round(len(about) / total, 3) if total else None}))
    for label, questions in (("names its document", about), ("names nothing of it", not_about)):
        for question in questions[: args.show]:
            print(f"  {label}: {question!r}")


if __name__ == "__main__":
    main()
