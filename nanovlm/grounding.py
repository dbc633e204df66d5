"""Grounding as text: boxes written into answers, read back, and scored as RefCOCO is (Acc@IoU>=0.5).

A box is [x1, y1, x2, y2], its corners as fractions of the side of the padded square image (LLaVA-1.5 pads every
image to a square with its mean colour before resizing it, so that is the frame the model sees), written with two
decimals, as SPHINX and LLaVA-1.5's RefCOCO data write them.

SPHINX's task mixing (Lin et al., 2023) gives every task of one instruction-tuning mix its own instruction, so that
a short answer, a caption and a box never compete for one prompt; the grounding ones are here:
- referring expression -> box: `REC_PROMPT` with the expression, answered "[0.12, 0.40, 0.31, 0.62]";
- grounded caption: `GROUNDED_CAPTION_PROMPT`, answered "<p>a red circle</p> [0.12,0.40,0.31,0.62] and ..." (one
  box per mentioned object; several boxes of one phrase are separated by ";");
- plain caption: `CAPTION_PROMPT`; short-answer VQA: the question and nanovlm/benchmarks.py's SHORT_ANSWER.

Scoring (`eval.py --task grounding`): the first bracketed group of four numbers in an answer is its box, right when
its IoU with the true box is at least 0.5, RefCOCO's accuracy. An answer without a box, a box with a NaN or
infinite coordinate, one outside the image (a coordinate outside [0, 1]) or an empty one (x2 <= x1 or y2 <= y1)
is wrong and counted as invalid. Records may carry fields to group by (`GROUPS`: object size, number of objects,
split, dataset); accuracy is reported per value of each.
"""

import math
import re
from collections import defaultdict

REC_PROMPT = "Please provide the bounding box coordinate of the region this sentence describes: {}."
CAPTION_PROMPT = "Describe the image concisely."
GROUNDED_CAPTION_PROMPT = CAPTION_PROMPT + " Include the bounding box for each mentioned object."
IOU_THRESHOLD = 0.5
GROUPS = ("size", "objects", "split", "dataset")

Box = tuple[float, float, float, float]


def format_box(box: Box, compact: bool = False) -> str:
    """"[0.12, 0.40, 0.31, 0.62]" (REC answers), or "[0.12,0.40,0.31,0.62]" with `compact` (grounded captions)."""
    return "[" + ("," if compact else ", ").join(f"{v:.2f}" for v in box) + "]"


def square_box(x: float, y: float, w: float, h: float, width: int, height: int) -> Box:
    """A pixel box (COCO's x, y, width, height) on a width x height image -> corners normalised on the padded
    square, which centres the image with integer offsets as nanovlm.image.expand_to_square does."""
    side = max(width, height)
    dx, dy = (side - width) // 2, (side - height) // 2
    return (x + dx) / side, (y + dy) / side, (x + w + dx) / side, (y + h + dy) / side


def is_valid(box) -> bool:
    """Four finite numbers inside [0, 1] with x1 < x2 and y1 < y2."""
    if not (isinstance(box, (list, tuple)) and len(box) == 4):
        return False
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box):
        return False
    x1, y1, x2, y2 = box
    return 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1


def parse_box(text: str) -> Box | None:
    """The first bracketed group of four comma-separated numbers in `text` (of a ";"-separated list, the first
    box); None if there is none. NaN and infinities parse, and `is_valid` rejects them."""
    for group in re.findall(r"\[([^\[\]]*)\]", text):
        parts = group.split(";")[0].split(",")
        if len(parts) != 4:
            continue
        try:
            return tuple(float(part) for part in parts)
        except ValueError:
            continue
    return None


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two valid boxes."""
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def judge(prediction: str, box: Box) -> tuple[float, bool]:
    """(IoU, valid) of an answer against the true box; an invalid answer has IoU 0."""
    predicted = parse_box(prediction)
    if predicted is None or not is_valid(predicted):
        return 0.0, False
    return iou(predicted, box), True


def summary(judged: list[tuple[float, bool]]) -> dict:
    return {"accuracy": sum(value >= IOU_THRESHOLD for value, _ in judged) / len(judged),
            "mean_iou": sum(value for value, _ in judged) / len(judged),
            "invalid": sum(not valid for _, valid in judged), "n": len(judged)}


def score(records: list[dict], predictions: list[str]) -> dict:
    """Acc@0.5, mean IoU and invalid answers overall, and per value of every `GROUPS` field the records carry."""
    judged = [judge(p, tuple(r["box"])) for r, p in zip(records, predictions)]
    scores = {"overall": summary(judged)}
    for field in GROUPS:
        groups = defaultdict(list)
        for record, result in zip(records, judged):
            if field in record:
                groups[str(record[field])].append(result)
        if groups:
            scores[field] = {value: summary(results) for value, results in sorted(groups.items())}
    return scores


def format_table(scores: dict) -> str:
    """A markdown table: overall, then each group's values, as rows; Acc@0.5 and mean IoU in percent."""
    rows = ["| records | Acc@0.5 | mean IoU | invalid | n |", "|---|---:|---:|---:|---:|"]
    lines = [("overall", scores["overall"])] + [(f"{field} {value}", result) for field in GROUPS
                                                 for value, result in scores.get(field, {}).items()]
    for name, s in lines:
        rows.append(f"| {name} | {100 * s['accuracy']:.1f} | {100 * s['mean_iou']:.1f} | {s['invalid']} | {s['n']} |")
    return "\n".join(rows)
