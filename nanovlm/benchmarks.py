"""Benchmarks: reading a benchmark file, the prompt each task asks, and its metric.

Tasks and their JSONL lines (one question per line; image paths relative to the file's folder):

- `shapes`: the shapes world's eval.json (data/shapes.py); read and prompted here, scored by data/shapes_eval.py
  (the world's own rules live beside its generator, outside the package).
- `vqa` (VQAv2, GQA, TextVQA, VizWiz): {"question_id", "image", "question", "answers": [10 human answers]};
  the official VQA accuracy (nanovlm/vqa_accuracy.py).
- `mc` (ScienceQA-IMG, MMBench): {"question_id", "image" (optional), "question", "options": [...],
  "answer": "B", "context" (optional)}; the option letter is read off the answer, accuracy.
- `pope`: {"question_id", "image", "question", "label": "yes" | "no", "category"}; accuracy, precision, recall,
  F1 and the share of "yes" answers, per category and overall (Li et al., EMNLP 2023).
- `caption` (COCO Karpathy, NoCaps, Flickr30k): {"image_id", "image", "references": [...]}; BLEU-4 and CIDEr-D
  (nanovlm/caption_metrics.py).
- `caption_ranking`: {"id", "image", "caption", "negatives": {kind: caption}}; no generation: the true caption
  against corrupted ones by log-likelihood, accuracy per corruption kind (nanovlm/caption_ranking.py).
- `grounding` (RefCOCO, RefCOCO+, RefCOCOg, the shapes world's): {"id", "image", "expression", "box": [x1, y1, x2,
  y2] normalised on the padded square image, and optional fields to group by: "size", "objects", "split",
  "dataset"}; Acc@IoU>=0.5 of the box parsed from the answer (nanovlm/grounding.py).

Every record is checked before anything runs, each problem named by file and line: missing fields, an image
that is not a path inside the file's folder (`allow_absolute_image_paths` allows others) or that does not
decode (nanovlm/image_check.py, cached), an empty question, an empty file. `mc` records may have no image.

The prompts are LLaVA-1.5's evaluation prompts, so a llava-hf checkpoint scores as in its paper's setting.
"""

import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from . import grounding
from .caption_metrics import caption_scores
from .data import BadRecord, check_image_path
from .generate import Sampling, answer
from .image import ImageProcessor
from .image_check import check_images
from .templates import get_template
from .tokenizer import Tokenizer
from .vlm import VLM
from .vqa_accuracy import vqa_accuracy

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
LETTER_ANSWER = "\nAnswer with the option's letter from the given choices directly."
CAPTION_PROMPT = "Provide a one-sentence caption for the provided image."
TASKS = ("shapes", "vqa", "mc", "pope", "caption", "caption_ranking", "grounding")
REQUIRED = {
    "shapes": ("id", "image", "question", "answer", "type", "split"),
    "vqa": ("question_id", "image", "question", "answers"),
    "mc": ("question_id", "question", "options", "answer"),
    "pope": ("question_id", "image", "question", "label"),
    "caption": ("image_id", "image", "references"),
    "caption_ranking": ("id", "image", "caption", "negatives"),
    "grounding": ("id", "image", "expression", "box"),
}


class BadBenchmarkRecord(ValueError):
    """A benchmark line that cannot be evaluated; the message names the file and the line."""


@dataclass
class Benchmark:
    task: str
    path: Path
    records: list[dict]
    places: list[str]  # "file:line" (JSONL) or "file[index]" (a JSON list) of each record, for errors

    @property
    def folder(self) -> Path:
        return self.path.parent

    def image(self, index: int) -> Path | None:
        return self.folder / self.records[index]["image"] if self.records[index].get("image") else None

    def key(self, index: int) -> str:
        record = self.records[index]
        return str(record.get("id", record.get("question_id", record.get("image_id"))))


def read_records(path: Path) -> tuple[list[dict], list[str]]:
    """Records of a JSONL file, or of a JSON file holding a list, with the place of each."""
    text = path.read_text()
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            raise BadBenchmarkRecord(f"{path}: not valid JSON: {error}") from None
        return records, [f"{path}[{i}]" for i in range(len(records))]
    records, places = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise BadBenchmarkRecord(f"{path}:{number}: not valid JSON: {error}") from None
        places.append(f"{path}:{number}")
    return records, places


def check(task: str, record, place: str, folder: Path, absolute_allowed: bool = False) -> None:
    if not isinstance(record, dict):
        raise BadBenchmarkRecord(f"{place}: expected a JSON object, got {type(record).__name__}")
    missing = [name for name in REQUIRED[task] if name not in record]
    if missing:
        raise BadBenchmarkRecord(f"{place}: missing field(s) {', '.join(missing)} for task {task}")
    if "image" in REQUIRED[task] or record.get("image") is not None:  # mc: no image, or a path
        try:
            check_image_path(record["image"], absolute_allowed)
        except BadRecord as error:
            raise BadBenchmarkRecord(f"{place}: {error}") from None
    if "question" in REQUIRED[task] and not (isinstance(record["question"], str) and record["question"].strip()):
        raise BadBenchmarkRecord(f"{place}: question must be a non-empty string, got {record['question']!r}")
    lists = {"vqa": "answers", "mc": "options", "caption": "references"}
    if task in lists:
        values = record[lists[task]]
        if not (isinstance(values, list) and values and all(isinstance(v, str) for v in values)):
            raise BadBenchmarkRecord(f"{place}: {lists[task]} must be a non-empty list of strings")
    if task == "mc" and not (isinstance(record["answer"], str) and len(record["answer"]) == 1
                             and 0 <= ord(record["answer"]) - ord("A") < len(record["options"])):
        raise BadBenchmarkRecord(f"{place}: answer {record['answer']!r} is not the letter of one of its options")
    if task == "caption_ranking" and not (isinstance(record["negatives"], dict) and record["negatives"] and all(
            isinstance(v, str) for v in [record["caption"], *record["negatives"].values()])):
        raise BadBenchmarkRecord(f"{place}: negatives must be a non-empty object of kind -> caption (strings)")
    if task == "grounding" and not (grounding.is_valid(record["box"]) and isinstance(record["expression"], str)
                                    and record["expression"].strip()):
        raise BadBenchmarkRecord(f"{place}: box must be [x1, y1, x2, y2], finite, within [0, 1], x1 < x2 and y1 < y2, "
                                 f"and expression a non-empty string; got box {record['box']!r}")
    if task == "pope" and record["label"] not in ("yes", "no"):
        raise BadBenchmarkRecord(f"{place}: label must be 'yes' or 'no', got {record['label']!r}")
    if record.get("image") and not (folder / record["image"]).is_file():
        raise BadBenchmarkRecord(f"{place}: image not found: {folder / record['image']}")


def load(task: str, path: str | Path, limit: int = 0, allow_absolute_image_paths: bool = False) -> Benchmark:
    """Read and check every record (the first `limit` if > 0) and decode every image before anything runs."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"benchmark file not found: {path}")
    records, places = read_records(path)
    if limit:
        records, places = records[:limit], places[:limit]
    if not records:
        raise BadBenchmarkRecord(f"{path}: no records")
    for record, place in zip(records, places):
        check(task, record, place, path.parent, allow_absolute_image_paths)
    bad = check_images(path.parent, [r["image"] for r in records if r.get("image")])
    for record, place in zip(records, places):
        if record.get("image") in bad:
            raise BadBenchmarkRecord(f"{place}: image {path.parent / record['image']}: {bad[record['image']]} "
                                     f"({len(bad)} unreadable images in {path})")
    benchmark = Benchmark(task, path, records, places)
    first_place = {}
    for i, place in enumerate(places):  # predictions are stored and joined by key, so keys must be unique
        if (key := benchmark.key(i)) in first_place:
            raise BadBenchmarkRecord(f"{place}: id {key} repeats {first_place[key]}")
        first_place[key] = place
    return benchmark


def predict(model: VLM, tokenizer: Tokenizer, processor: ImageProcessor, benchmark: Benchmark,
            sampling: Sampling = Sampling(max_new_tokens=64), batch_size: int = 32, progress: bool = True,
            respond=answer) -> list[str]:
    """The model's answer to every record, in order: batched generation with the model's chat template.
    `respond` is how a list of questions gets answered: `generate.answer`, or a drop-in such as STIC's
    describe-and-respond."""
    questions = [(benchmark.image(i), prompt(benchmark.task, r)) for i, r in enumerate(benchmark.records)]
    return respond(model, tokenizer, processor, get_template(model.cfg.template), questions, sampling, batch_size,
                   progress)


def prompt(task: str, record: dict) -> str:
    """The user turn for a record; "<image>\n" opens it when the record has an image."""
    image = "<image>\n" if record.get("image") else ""
    if task == "shapes":
        return image + record["question"]
    if task in ("vqa", "pope"):
        return image + record["question"] + SHORT_ANSWER
    if task == "caption":
        return image + CAPTION_PROMPT
    if task == "grounding":
        return image + grounding.REC_PROMPT.format(record["expression"])
    context = f"Context: {record['context']}\n" if record.get("context") else ""
    options = "\n".join(f"{chr(ord('A') + i)}. {option}" for i, option in enumerate(record["options"]))
    return image + context + record["question"] + "\n" + options + LETTER_ANSWER


def option_letter(text: str, options: list[str]) -> str | None:
    """The option a free-form answer picks: a standalone letter ("B", "(B)", "B.", "The answer is B"), else an
    option quoted in full; None when neither is there."""
    letters = "".join(chr(ord("A") + i) for i in range(len(options)))
    if match := re.search(rf"(?<![A-Za-z])([{letters}])(?![A-Za-z])", text):
        return match[1]
    named = [chr(ord("A") + i) for i, option in enumerate(options) if option.strip().lower() in text.lower()]
    return named[0] if len(named) == 1 else None


def pope_answer(text: str) -> str:
    """LLaVA's POPE parsing: the first sentence, read as "no" when any word is "no" or "not", else "yes"."""
    words = text.split(".")[0].replace(",", "").lower().split()
    return "no" if "no" in words or "not" in words else "yes"


def binary_metrics(pairs: list[tuple[str, str]]) -> dict:
    """(prediction, label) pairs of yes/no -> accuracy, precision, recall, F1 with "yes" as positive, yes-ratio."""
    tp = sum(p == "yes" and t == "yes" for p, t in pairs)
    fp = sum(p == "yes" and t == "no" for p, t in pairs)
    fn = sum(p == "no" and t == "yes" for p, t in pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "accuracy": sum(p == t for p, t in pairs) / len(pairs),
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": sum(p == "yes" for p, _ in pairs) / len(pairs),
        "n": len(pairs),
    }


def score(benchmark: Benchmark, predictions: list[str]) -> dict:
    """The task's metrics for one prediction per record, in record order (every task but shapes)."""
    task, records = benchmark.task, benchmark.records
    if task == "vqa":
        accuracies = [vqa_accuracy(p, r["answers"]) for r, p in zip(records, predictions)]
        return {"accuracy": sum(accuracies) / len(accuracies), "n": len(accuracies)}
    if task == "mc":
        picked = [option_letter(p, r["options"]) for r, p in zip(records, predictions)]
        return {"accuracy": sum(letter == r["answer"] for r, letter in zip(records, picked)) / len(records),
                "unparsed": sum(letter is None for letter in picked), "n": len(records)}
    if task == "pope":
        by_category = defaultdict(list)
        for r, p in zip(records, predictions):
            by_category[r.get("category", "all")].append((pope_answer(p), r["label"]))
        scores = {c: binary_metrics(pairs) for c, pairs in sorted(by_category.items())}
        everything = [pair for pairs in by_category.values() for pair in pairs]
        return scores | {"overall": binary_metrics(everything)}
    if task == "caption":
        hypotheses = {benchmark.key(i): p for i, p in enumerate(predictions)}
        references = {benchmark.key(i): r["references"] for i, r in enumerate(records)}
        return caption_scores(hypotheses, references) | {"n": len(records)}
    if task == "grounding":
        return grounding.score(records, predictions)
    raise ValueError(f"the {task} task is scored by its own module (data/shapes_eval.py for shapes)")


def format_scores(task: str, scores: dict) -> str:
    """A markdown table of a task's scores (every task but shapes), in percent where the metric is a fraction."""
    if task == "grounding":
        return grounding.format_table(scores)
    if task == "pope":
        columns = ("accuracy", "precision", "recall", "f1", "yes_ratio")
        rows = ["| category | " + " | ".join(columns) + " | n |", "|---|" + "---:|" * (len(columns) + 1)]
        for category, metrics in scores.items():
            cells = [f"{100 * metrics[c]:.2f}" for c in columns] + [str(metrics["n"])]
            rows.append(f"| {category} | " + " | ".join(cells) + " |")
        return "\n".join(rows)
    percent = task in ("vqa", "mc")
    rows = ["| metric | value |", "|---|---:|"]
    for name, value in scores.items():
        shown = f"{100 * value:.2f}" if percent and isinstance(value, float) else (
            f"{value:.4f}" if isinstance(value, float) else str(value))
        rows.append(f"| {name} | {shown} |")
    return "\n".join(rows)
