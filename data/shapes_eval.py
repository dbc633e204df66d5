"""Scoring a model on the shapes world's eval split: exact match per question type, in-distribution and on the
compositional hold-out (colour-shape pairs never seen in training); during training, an accuracy curve
(`--eval_every`); across runs, tables of variants over seeds (`python -m data.shapes_eval`), also by the size of
the object a question names (`--by-size`)."""

import argparse
import json
import re
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from nanovlm import benchmarks
from nanovlm.checkpoint import write_json
from nanovlm.generate import Sampling, answer
from nanovlm.image import ImageProcessor
from nanovlm.recipe import Run
from nanovlm.tokenizer import Tokenizer
from nanovlm.vlm import VLM

from .shapes import EVAL_TYPES, SIZES, named_objects

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


# The question types that name one object of the image (existence only when answered "yes"), by its size.
SIZE_ROWS = [f"{qtype}, {size}" for qtype in ("colour", "shape", "size", "existence") for size in SIZES]


def size_scores(predictions: list[dict], objects: dict[str, list[dict]]) -> dict:
    """Exact match of the questions that name exactly one object of their image, per split, by question type
    and that object's size: {split: {"colour, small": accuracy, ...}}. Small objects are where a finer view of
    the image should help; `objects` is the world's objects.json (image -> objects)."""
    hits = defaultdict(lambda: defaultdict(list))  # split -> "type, size" -> [1 or 0]
    for p in predictions:
        named = named_objects(p["question"], objects[p["image"]])
        if named is not None and len(named) == 1 and len(named[0]) == 1:
            correct = normalize_answer(p["prediction"]) == normalize_answer(p["answer"])
            hits[p["split"]][f"{p['type']}, {named[0][0]['size']}"].append(correct)
    return {split: {row: sum(v) / len(v) for row, v in by_row.items()} for split, by_row in hits.items()}


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
             limit: int = 0, respond=answer) -> tuple[dict, list[dict]]:
    """Greedy answers to every eval question (the first `limit` if > 0), through the same benchmark path as
    `eval.py --task shapes` (`respond`: as for benchmarks.predict); returns the scores and the records with their
    predictions."""
    return evaluate_benchmark(model, tokenizer, processor, benchmarks.load("shapes", world_dir / "eval.json", limit),
                              batch_size, respond=respond)


def evaluate_benchmark(model: VLM, tokenizer: Tokenizer, processor: ImageProcessor, benchmark: benchmarks.Benchmark,
                       batch_size: int = 64, progress: bool = True, respond=answer) -> tuple[dict, list[dict]]:
    model.eval()
    answers = benchmarks.predict(model, tokenizer, processor, benchmark, Sampling(max_new_tokens=40), batch_size,
                                 progress, respond)
    predictions = [r | {"prediction": a} for r, a in zip(benchmark.records, answers)]
    return score(benchmark.records, {r["id"]: r["prediction"] for r in predictions}), predictions


def tracker_for(run: Run, model: VLM, tokenizer: Tokenizer, processor: ImageProcessor) -> Callable[[], dict] | None:
    """A train script's evaluation during training: with --eval_every, the tracker of the shapes world its data
    comes from (the folder of its first data file, if that folder holds eval.json); None otherwise."""
    world = run.data[0].path.parent if run.data else None
    if not run.cfg.eval_every or world is None or not (world / "eval.json").is_file():
        return None
    return tracker(model, tokenizer, processor, world, run.cfg.eval_questions)


def tracker(model: VLM, tokenizer: Tokenizer, processor: ImageProcessor, world_dir: Path,
            questions: int) -> Callable[[], dict]:
    """What the training loop calls every --eval_every steps: the accuracy per split ("in_distribution"), overall,
    and per question type ("in_distribution/spatial"), on `questions` eval questions taken at an even stride
    through the eval split (so every split and question type is in it)."""
    full = benchmarks.load("shapes", world_dir / "eval.json")
    stride = max(1, len(full.records) // questions)
    part = benchmarks.Benchmark("shapes", full.path, full.records[::stride][:questions],
                                full.places[::stride][:questions])

    def accuracy() -> dict:
        scores, _ = evaluate_benchmark(model, tokenizer, processor, part, progress=False)
        per_type = {f"{split}/{qtype}": round(v, 4) for split, s in scores.items() for qtype, v in s.items()
                    if qtype not in ("overall", "n")}
        return {split: round(s["overall"], 4) for split, s in scores.items()} | per_type | {"n": len(part.records)}

    return accuracy


def report(model: VLM, tokenizer: Tokenizer, processor: ImageProcessor, world_dir: Path, out_dir: Path,
           samples: int = 6) -> dict:
    """What a training script prints at the end: the eval table and a few answers; every prediction is kept
    beside the model in eval_shapes.json."""
    scores, predictions = evaluate(model, tokenizer, processor, world_dir)
    print("\nshapes world, greedy answers, exact match (%):\n" + format_table(scores))
    for p in predictions[:samples]:
        print(f"  [{p['split']}] {p['question']}  ->  {p['prediction']!r}  (answer: {p['answer']})")
    write_json(out_dir / "eval_shapes.json", {"scores": scores, "predictions": predictions})
    return scores


def seeds_table(header: str, rows: list[str], variants: dict[str, list[dict]], value) -> str:
    """A markdown table comparing training variants, each run with several seeds: per row, the mean ± standard
    deviation (over seeds, n - 1 in the denominator) of value(run, row), a fraction shown in percent (runs where
    it is None are left out); variants as columns."""
    lines = [f"| {header} | " + " | ".join(variants) + " |", "|---|" + "---:|" * len(variants)]
    for row in rows:
        cells = []
        for runs in variants.values():
            cells.append(mean_std([100 * v for run in runs if (v := value(run, row)) is not None]))
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines.append("| seeds | " + " | ".join(str(len(runs)) for runs in variants.values()) + " |")
    return "\n".join(lines)


def seed_files(folders: list[Path], file: str) -> dict[str, list[Path]]:
    """Each variant folder's runs, one subfolder per seed: folder name -> every */`file`."""
    variants = {}
    for folder in folders:
        variants[folder.name] = sorted(folder.glob(f"*/{file}"))
        if not variants[folder.name]:
            raise SystemExit(f"{folder}: no */{file} (one subdirectory per seed)")
    return variants


def seed_scores(folders: list[Path], file: str) -> dict[str, list[dict]]:
    """Each variant folder's runs: folder name -> the "scores" of every */`file`."""
    return {name: [json.loads(f.read_text())["scores"] for f in files]
            for name, files in seed_files(folders, file).items()}


def mean_std(values: list[float]) -> str:
    """"mean ± standard deviation" (n - 1 in the denominator; 0 for one value); "-" for none."""
    if not values:
        return "-"
    mean = sum(values) / len(values)
    spread = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return f"{mean:.1f} ± {spread:.1f}"


def compare(variants: dict[str, list[dict]], split: str = "in_distribution") -> str:
    """Every question type's accuracy over seeds, per variant (`seeds_table`)."""
    return seeds_table("question", [*EVAL_TYPES, "overall"], variants, lambda run, qtype: run[split][qtype])


def curve(variants: dict[str, list[list[dict]]], split: str = "in_distribution", qtype: str = "overall") -> str:
    """A markdown table of accuracy curves: each variant's mean ± std over seeds at every step where its runs
    logged an evaluation (metrics.jsonl records with "eval", from --eval_every) of `qtype`; steps as rows."""
    key = split if qtype == "overall" else f"{split}/{qtype}"
    logged = {name: [{r["step"]: r["eval"][key] for r in run if key in r.get("eval", {})} for run in runs]
              for name, runs in variants.items()}
    steps = sorted({step for runs in logged.values() for run in runs for step in run})
    rows = ["| step | " + " | ".join(variants) + " |", "|---:|" + "---:|" * len(variants)]
    for step in steps:
        cells = [mean_std([100 * run[step] for run in runs if step in run]) for runs in logged.values()]
        rows.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description="Compare training variants on the shapes eval: each VARIANT is a "
                                     "directory whose subdirectories (one per seed) hold eval_shapes.json, or with "
                                     "--curve metrics.jsonl with the evaluations of --eval_every.")
    parser.add_argument("variants", nargs="+", type=Path)
    parser.add_argument("--split", default="in_distribution", choices=["in_distribution", "holdout"])
    parser.add_argument("--file", default="eval_shapes.json", help="the scores file in each seed's folder, e.g. "
                        "eval_shapes_b.json for another domain's eval (eval.py --out)")
    parser.add_argument("--curve", action="store_true", help="accuracy against step, from */metrics.jsonl")
    parser.add_argument("--type", default="overall", choices=["overall", *EVAL_TYPES],
                        help="the question type of --curve")
    parser.add_argument("--by-size", action="store_true", help="the questions that name one object, by its size "
                        "(from the predictions in each seed's --file and the world's objects.json)")
    parser.add_argument("--world", type=Path, default=Path("out/shapes"), help="the world of --by-size")
    args = parser.parse_args(argv)
    if args.curve:
        variants = {name: [[json.loads(line) for line in f.read_text().splitlines()] for f in files]
                    for name, files in seed_files(args.variants, "metrics.jsonl").items()}
        table = curve(variants, args.split, args.type)
        print(f"shapes world, {args.split}, {args.type}, exact match (%) during training, mean ± std over seeds:\n"
              f"{table}")
    elif args.by_size:
        objects = json.loads((args.world / "objects.json").read_text())
        variants = {name: [size_scores(json.loads(f.read_text())["predictions"], objects) for f in files]
                    for name, files in seed_files(args.variants, args.file).items()}
        table = seeds_table("question, named object", SIZE_ROWS, variants,
                            lambda run, row: run.get(args.split, {}).get(row))
        print(f"shapes world, {args.split}, exact match (%) by the size of the object the question names, "
              f"mean ± std over seeds:\n{table}")
    else:
        table = compare(seed_scores(args.variants, args.file), args.split)
        print(f"shapes world, {args.split}, exact match (%), mean ± std over seeds:\n{table}")
    return table


if __name__ == "__main__":
    main(sys.argv[1:])
