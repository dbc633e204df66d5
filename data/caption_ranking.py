"""Caption ranking benchmarks (scored by nanovlm/caption_ranking.py, `eval.py --task caption_ranking`): each image
with its true caption and corrupted ones, one per kind, made by ICCC's corruptions (nanovlm/iccc.py).

From any LLaVA caption JSON (one human turn with the image, the caption as its answer); the concept bank, which
says what a replacement may be, is built over --bank (the training captions; by default the same file):

    python -m data.caption_ranking --captions out/coco/coco_karpathy_train.json --limit 5000 --out out/coco/rank.jsonl
    python -m data.caption_ranking --world out/shapes       # the shapes world, eval.py's default
    python -m data.caption_ranking --compare out/iccc/control out/iccc/iccc    # runs with several seeds

For the shapes world the true captions are those of the eval images, rendered from objects.json (the ground truth
of every image) by data/shapes.py's `caption`, and the bank is built over the training captions; the file is
WORLD/caption_ranking.jsonl and records which split (in-distribution or hold-out) each image belongs to.

A caption and its corruptions are normalised as ICCC normalises them (lowercase, ":" as a space, at most 50
words), then start with a capital letter as captions are written: candidates differ only by the corruption. A
caption that allows no corruption at all is left out and counted. Seeded per record (--seed).
Image paths are relative to --out's folder; images outside it are named through a link there to their
folder, so that they stay inside the benchmark's folder as its image paths must.
"""

import argparse
import json
import os
import random
import sys
from pathlib import Path

from nanovlm.benchmarks import load
from nanovlm.caption_ranking import evaluate, format_table
from nanovlm.checkpoint import atomic_write, write_json
from nanovlm.data import image_root
from nanovlm.iccc import ConceptBank, negatives, normalize
from nanovlm.image import ImageProcessor
from nanovlm.tokenizer import Tokenizer
from nanovlm.vlm import VLM

from .shapes import Obj, caption
from .shapes_eval import seed_scores, seeds_table


def capitalised(text: str) -> str:
    return text[:1].upper() + text[1:]


def build(items: list[tuple[str, str, str]], bank: ConceptBank, seed: int = 0) -> tuple[list[dict], int]:
    """Records from (id, image, caption) triples, and how many captions allowed no corruption."""
    records, left_out = [], 0
    for key, image, text in items:
        corrupted = negatives(text, bank, random.Random(f"ranking-{seed}-{key}"))
        if not corrupted:
            left_out += 1
            continue
        records.append({"id": key, "image": image, "caption": capitalised(normalize(text)),
                        "negatives": {kind: capitalised(c) for kind, c in corrupted.items()}})
    return records, left_out


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in records)))


def caption_records(path: Path) -> list[dict]:
    records = json.loads(path.read_text())
    for i, record in enumerate(records):
        conversation = record.get("conversations") if isinstance(record, dict) else None
        if not (isinstance(conversation, list) and len(conversation) == 2 and record.get("image")
                and isinstance(conversation[1].get("value"), str)):
            raise ValueError(f"{path} record {i}: not a caption record (an image, one human turn, the caption)")
    return records


def shapes_benchmark(world: Path, seed: int = 0) -> Path:
    """WORLD/caption_ranking.jsonl from the eval images' ground truth, rebuilt on every call (it takes about a
    second) so that it always follows the world's captions."""
    objects = json.loads((world / "objects.json").read_text())
    bank = ConceptBank.build(r["conversations"][1]["value"] for r in caption_records(world / "captions.json"))
    eval_images = [path for path in objects if Path(path).name.startswith("eval_")]
    items = [(Path(path).stem, path, caption([Obj(**o) for o in objects[path]])) for path in eval_images]
    records, _ = build(items, bank, seed)
    for record in records:  # odd eval images hold a held-out colour-shape pair (data/shapes.py)
        record["split"] = "holdout" if int(record["id"].rsplit("_", 1)[1]) % 2 else "in_distribution"
    write_jsonl(world / "caption_ranking.jsonl", records)
    return world / "caption_ranking.jsonl"


def report(model: VLM, tokenizer: Tokenizer, processor: ImageProcessor, world: Path, out_dir: Path) -> dict:
    """What train_iccc.py prints at the end on the shapes world: the caption ranking table, with every score kept
    beside the model in eval_caption_ranking.json (as `eval.py --task caption_ranking` writes it)."""
    path = shapes_benchmark(world)
    scores, predictions = evaluate(model, tokenizer, processor, load("caption_ranking", path))
    print("\nshapes world, caption ranking:\n" + format_table(scores))
    write_json(out_dir / "eval_caption_ranking.json", {"model": str(out_dir), "task": "caption_ranking",
                                                       "data": str(path), "scores": scores, "predictions": predictions})
    return scores


def compare(variants: dict[str, list[dict]]) -> str:
    """Every corruption kind's accuracy over seeds, per variant (mean ± standard deviation)."""
    kinds = {kind for runs in variants.values() for run in runs for kind in run}
    kinds = sorted(k for k in kinds if "-" in k) + [k for k in ("replace", "swap", "all") if k in kinds]
    return seeds_table("corruption", kinds, variants, lambda run, kind: run[kind]["accuracy"] if kind in run else None)


def main(argv: list[str] | None = None) -> Path | str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare", type=Path, nargs="+", help="variant folders whose subfolders (one per seed) "
                        "hold eval_caption_ranking.json: print mean ± std per corruption kind")
    parser.add_argument("--world", type=Path, help="a shapes world folder: rank its eval images' captions")
    parser.add_argument("--captions", type=Path, help="LLaVA caption JSON whose records to rank")
    parser.add_argument("--bank", type=Path, help="LLaVA caption JSON the concept bank is built over (default: "
                        "--captions)")
    parser.add_argument("--image_folder", type=Path, help="image root of --captions (default: its folder)")
    parser.add_argument("--limit", type=int, default=0, help="rank only the first N captions")
    parser.add_argument("--out", type=Path, help="output JSONL (with --captions)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.compare:
        table = compare(seed_scores(args.compare, "eval_caption_ranking.json"))
        print(f"caption ranking, true caption ranked higher (%), mean ± std over seeds:\n{table}")
        return table
    if args.world:
        path = shapes_benchmark(args.world, args.seed)
        print(f"{path}: {sum(1 for _ in path.open())} images")
        return path
    if not (args.captions and args.out):
        parser.error("give --world, or --captions and --out")
    source = caption_records(args.captions)
    bank = ConceptBank.build(r["conversations"][1]["value"] for r in caption_records(args.bank or args.captions))
    folder = args.image_folder or args.captions.parent
    root = image_root(folder, args.out.parent)
    items = [(str(r.get("id", i)), os.path.normpath(os.path.join(root, r["image"])), r["conversations"][1]["value"])
             for i, r in enumerate(source[:args.limit or None])]
    records, left_out = build(items, bank, args.seed)
    write_jsonl(args.out, records)
    print(f"{args.out}: {len(records)} images ({left_out} captions left out: no concept to corrupt); concept bank "
          f"over {bank.captions} captions: {bank.summary()}")
    return args.out


if __name__ == "__main__":
    main(sys.argv[1:])
