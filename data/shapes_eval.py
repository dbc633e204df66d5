"""Scoring a model on the shapes world's eval split: exact match per question type, in-distribution and on the
compositional hold-out (colour-shape pairs never seen in training)."""

import re
from collections import defaultdict
from pathlib import Path

from nanovlm import benchmarks
from nanovlm.generate import Sampling
from nanovlm.image import ImageProcessor
from nanovlm.tokenizer import Tokenizer
from nanovlm.vlm import VLM

from .shapes import EVAL_TYPES

NUMBER_WORDS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation and articles, squeeze spaces, number words to digits: "Two." -> "2"."""
    words = re.sub(r"[^\w\s]", " ", text.lower()).split()
    return " ".join(NUMBER_WORDS.get(w, w) for w in words if w not in ("a", "an", "the"))


def score(records: list[dict], predictions: dict[str, str]) -> dict:
    """Exact-match accuracy after `normalize_answer`, per split and question type.

    `predictions` maps record id to the model's answer; a missing one counts as wrong.
    Returns {split: {type: accuracy, ..., "overall": accuracy, "n": number of questions}}.
    """
    hits = defaultdict(lambda: defaultdict(list))  # split -> type -> [1 or 0]
    for r in records:
        correct = normalize_answer(predictions.get(r["id"], "")) == normalize_answer(r["answer"])
        hits[r["split"]][r["type"]].append(correct)
    scores = {}
    for split, by_type in sorted(hits.items()):
        everything = [hit for results in by_type.values() for hit in results]
        scores[split] = {t: sum(v) / len(v) for t, v in sorted(by_type.items())}
        scores[split] |= {"overall": sum(everything) / len(everything), "n": len(everything)}
    return scores


def format_table(scores: dict) -> str:
    """A markdown table: question types and overall as rows, in-distribution and hold-out accuracy as columns."""
    splits = {"in_distribution": "in-distribution", "holdout": "hold-out"}
    rows = ["| question | " + " | ".join(splits.values()) + " |", "|---|" + "---:|" * len(splits)]
    for qtype in EVAL_TYPES + ("overall",):
        cells = [f"{100 * scores[s][qtype]:.1f}" if qtype in scores.get(s, {}) else "-" for s in splits]
        rows.append(f"| {qtype} | " + " | ".join(cells) + " |")
    rows.append("| n | " + " | ".join(str(scores.get(s, {}).get("n", 0)) for s in splits) + " |")
    return "\n".join(rows)


def evaluate(model: VLM, tokenizer: Tokenizer, processor: ImageProcessor, world_dir: Path, batch_size: int = 64,
             limit: int = 0) -> tuple[dict, list[dict]]:
    """Greedy answers to every eval question (the first `limit` if > 0), through the same benchmark path as
    `eval.py --task shapes`; returns the scores and the records with their predictions."""
    benchmark = benchmarks.load("shapes", world_dir / "eval.json", limit)
    model.eval()
    answers = benchmarks.predict(model, tokenizer, processor, benchmark, Sampling(max_new_tokens=24), batch_size)
    predictions = [r | {"prediction": a} for r, a in zip(benchmark.records, answers)]
    return score(benchmark.records, {r["id"]: r["prediction"] for r in predictions}), predictions
