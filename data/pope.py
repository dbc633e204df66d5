"""POPE (Li et al., EMNLP 2023), object hallucination: yes/no questions about COCO val2014 images, as benchmark JSONL.

Sources (Hugging Face Hub datasets):
  Dense-World/VLM      eval/pope/coco_pope_{random,popular,adversarial}.json   about 370 kB each
                       a copy of POPE's label files; JSON Lines despite the name, one question a line:
                       {"question_id": 1, "image": "COCO_val2014_000000310196.jpg",
                        "text": "Is there a snowboard in the image?", "label": "yes"}
  nyanko7/coco-hosted  val2014.zip   6.65 GB (COCO val2014; POPE uses 500 of its images, about 80 MB)

Output in OUT:
  pope.jsonl   one question a line, in the label files' order, categories random, popular, adversarial:
               {"question_id": "random-1", "image": "images/COCO_val2014_000000310196.jpg",
                "question": "Is there a snowboard in the image?", "label": "yes", "category": "random"}
               question_id is the category and the label file's id, as each file numbers its questions from 1.
  images/      the val2014 images the questions ask about
  build.json   the source files and their commits, the counts

Counts: POPE's current files have 3000 questions per category (1500 yes, 1500 no). The older commit that
LLaVA-1.5 evaluated on (e3e39262) has 2910 in random, so published LLaVA-1.5 POPE numbers are over 8910
questions. The builder prints each category's count and yes/no split, and accepts 2910 or 3000 for random.
The counts are of the whole files; --limit N then keeps the first N questions of each category.

    python data/pope.py --out out/pope
"""

import sys
from collections import Counter
from pathlib import Path, PurePosixPath

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python data/pope.py` then finds the data package
from data import hub  # noqa: E402

REPO = "Dense-World/VLM"
LABEL_FILE = "eval/pope/coco_pope_{}.json"
IMAGES = hub.HubFile("nyanko7/coco-hosted", "val2014.zip")
CATEGORIES = ("random", "popular", "adversarial")
EXPECTED = {"random": (3000, 2910), "popular": 3000, "adversarial": 3000}


def read_category(path: Path, category: str) -> list[dict]:
    records = []
    for place, line in hub.read_jsonl(path):
        line = hub.require_fields(line, ("question_id", "image", "text", "label"), place)
        label = str(line["label"]).strip().lower()
        if label not in ("yes", "no"):
            raise hub.BuildError(f"{place}: label must be yes or no, got {line['label']!r}")
        records.append({"question_id": f"{category}-{line['question_id']}",
                        "image": f"images/{PurePosixPath(line['image']).name}",
                        "question": line["text"].strip(), "label": label, "category": category})
    return records


def main(argv: list[str] | None = None) -> dict:
    args = hub.build_parser(__doc__, "out/pope").parse_args(argv)
    labels = {c: hub.HubFile(REPO, LABEL_FILE.format(c), revision=args.revision) for c in CATEGORIES}
    hub.check_disk_space([*labels.values(), IMAGES], {IMAGES: args.out / "images"}, args.force)

    records, counts, sources = [], {}, []
    for category, file in labels.items():
        path = hub.download(file)
        sources.append(hub.source(file, path))
        questions = read_category(path, category)
        answers = Counter(r["label"] for r in questions)
        counts[category] = {"questions": len(questions), "yes": answers["yes"], "no": answers["no"],
                            "images": len({r["image"] for r in questions})}
        print(f"{category}: {len(questions)} questions ({answers['yes']} yes, {answers['no']} no) "
              f"on {counts[category]['images']} images")
        hub.check_count(f"{path} ({category})", len(questions), EXPECTED[category], args.force)
        records += questions[:args.limit or None]

    archive = hub.download(IMAGES)
    sources.append(hub.source(IMAGES, archive))
    wanted = {PurePosixPath(r["image"]).name: r["image"] for r in records}
    missing = hub.extract(archive, wanted, args.out, force=args.force)
    if missing:
        raise hub.BuildError(f"{archive}: {len(missing)} POPE images are not in the archive, "
                             f"e.g. {', '.join(sorted(missing)[:5])}")
    hub.require_images(records, args.out, "pope.jsonl")
    hub.write_jsonl(args.out / "pope.jsonl", records)
    build = {"sources": sources, "limit": args.limit, "questions": len(records), "source_counts": counts}
    hub.write_json(args.out / "build.json", build, indent=2)
    print(f"{args.out / 'pope.jsonl'}: {len(records)} questions on {len(wanted)} images")
    return build


if __name__ == "__main__":
    hub.run(main)
