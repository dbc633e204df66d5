"""TextVQA 0.5.1 validation (Singh et al., CVPR 2019): questions that need reading text in the image, as VQA JSONL.

Sources (Hugging Face Hub dataset Dense-World/VLM, folder eval/textvqa/):
  TextVQA_0.5.1_val.json   3.12 MB  {"dataset_name": "textvqa", "data": [{"question_id": <int>,
                                     "image_id": "<16 hex digits>", "question": "...", "answers": [10 strings],
                                     ...}, ...]}
  train_val_images.zip     7.07 GB  train_images/<image_id>.jpg for train and val (val uses 3,166 of them)

Output in OUT:
  textvqa_val.jsonl   one question a line, in the file's order:
                      {"question_id": <int>, "image": "images/<image_id>.jpg", "question": "...",
                       "answers": [the 10 human answers]}
  images/             the val images
  build.json          the source files and their commits, the counts

The published split has 5,000 questions (checked on the whole file; --limit N then keeps the first N); each
must have 10 answers (the VQA accuracy compares a prediction with them). LLaVA-1.5's TextVQA prompt also lists
the image's OCR tokens; this file holds the question alone.

    python data/textvqa.py --out out/textvqa
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python data/textvqa.py` then finds the data package
from data import hub  # noqa: E402

REPO = "Dense-World/VLM"
QUESTIONS = "eval/textvqa/TextVQA_0.5.1_val.json"
IMAGES = "eval/textvqa/train_val_images.zip"
EXPECTED_QUESTIONS = 5000
NUM_ANSWERS = 10


def read_questions(path: Path) -> list[dict]:
    data = hub.read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise hub.BuildError(f"{path}: expected an object with a 'data' list of questions")
    records = []
    for i, item in enumerate(data["data"]):
        place = f"{path} data[{i}]"
        item = hub.require_fields(item, ("question_id", "image_id", "question", "answers"), place)
        answers = item["answers"]
        if not (isinstance(answers, list) and len(answers) == NUM_ANSWERS
                and all(isinstance(a, str) for a in answers)):
            raise hub.BuildError(f"{place} (question_id {item['question_id']}): expected {NUM_ANSWERS} answer "
                                 f"strings, got {answers!r}")
        records.append({"question_id": item["question_id"], "image": f"images/{item['image_id']}.jpg",
                        "question": item["question"].strip(), "answers": answers})
    return records


def main(argv: list[str] | None = None) -> dict:
    args = hub.build_parser(__doc__, "out/textvqa").parse_args(argv)
    questions, images = (hub.HubFile(REPO, name, revision=args.revision) for name in (QUESTIONS, IMAGES))
    hub.check_disk_space([questions, images], {images: args.out / "images"}, args.force)

    path = hub.download(questions)
    records = read_questions(path)
    hub.check_count(f"{path}: questions", len(records), EXPECTED_QUESTIONS, args.force)
    ids = [r["question_id"] for r in records]
    if len(set(ids)) != len(ids):  # the benchmark's predictions are joined to questions by id
        raise hub.BuildError(f"{path}: question_id repeats ({len(ids) - len(set(ids))} duplicates)")
    records = records[:args.limit or None]

    archive = hub.download(images)
    wanted = {Path(r["image"]).name: r["image"] for r in records}
    missing = hub.extract(archive, wanted, args.out, force=args.force)
    if missing:
        raise hub.BuildError(f"{archive}: {len(missing)} TextVQA images are not in the archive, "
                             f"e.g. {', '.join(sorted(missing)[:5])}")
    hub.require_images(records, args.out, "textvqa_val.jsonl")
    hub.write_jsonl(args.out / "textvqa_val.jsonl", records)
    build = {"sources": [hub.source(questions, path), hub.source(images, archive)], "limit": args.limit,
             "questions": len(records), "images": len(wanted)}
    hub.write_json(args.out / "build.json", build, indent=2)
    print(f"{args.out / 'textvqa_val.jsonl'}: {len(records)} questions on {len(wanted)} images")
    return build


if __name__ == "__main__":
    hub.run(main)
