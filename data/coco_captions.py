"""COCO captions in Karpathy's split: a stage-1 caption set, the caption benchmark, and unlabeled images for STIC.

Sources (Hugging Face Hub dataset nyanko7/coco-hosted):
  caption_datasets.zip   36.7 MB   Karpathy's archive; its dataset_coco.json is {"images": [{"filepath":
                                   "val2014", "filename": "COCO_val2014_000000391895.jpg", "cocoid": 391895,
                                   "split": "test", "sentences": [{"raw": "A man with a red helmet ...", ...}]}]}
  train2014.zip          13.5 GB   train2014/COCO_train2014_<id>.jpg
  val2014.zip            6.65 GB   val2014/COCO_val2014_<id>.jpg (restval, val and test images)

Output in OUT:
  coco_karpathy_train.json   LLaVA JSON, one record per train + restval image (113,287): the human turn is
                             "<image>\\n" and a brief-description prompt (seeded), the answer its first caption:
                             {"id": "9", "image": "images/COCO_train2014_000000000009.jpg", "conversations":
                              [{"from": "human", "value": "<image>\\nDescribe the image concisely."},
                               {"from": "gpt", "value": "<its first caption>"}]}
  coco_karpathy_test.jsonl   the caption benchmark, one test image a line (5,000), all its captions as references:
                             {"image_id": 391895, "image": "images/COCO_val2014_000000391895.jpg",
                              "references": ["A man with a red helmet on a small moped on a dirt road.", ...]}
  coco_unlabeled.json        the same train + restval images without text, for STIC: [{"id": "9", "image": ...}]
  images/                    the images of both splits
  build.json                 the source files and their commits, the counts

Captions are the `raw` strings, stripped. --limit N keeps the first N train and the first N test images.

    python data/coco_captions.py --out out/coco
"""

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python data/coco_captions.py` then finds `data`
from data import hub  # noqa: E402

REPO = "nyanko7/coco-hosted"
ANNOTATIONS = "caption_datasets.zip"
ANNOTATION_MEMBER = "dataset_coco.json"
ZIPS = {"train2014": "train2014.zip", "val2014": "val2014.zip"}  # an image's filepath -> the zip holding it
TRAIN_SPLITS = ("train", "restval")
EXPECTED = {"train": 82783, "restval": 30504, "val": 5000, "test": 5000}
PROMPTS = (  # LLaVA's brief-description prompts for stage-1 captioning
    "Describe the image concisely.", "Provide a brief description of the given image.",
    "Offer a succinct explanation of the picture presented.", "Summarize the visual content of the image.",
    "Give a short and clear explanation of the subsequent image.",
    "Share a concise interpretation of the image provided.",
    "Present a compact description of the photo's key features.",
    "Relay a brief, clear account of the picture shown.", "Render a clear and concise summary of the photo.",
    "Write a terse but informative summary of the picture.",
    "Create a compact narrative representing the image presented.",
)


def read_images(archive: Path) -> list[dict]:
    data = hub.read_json_in_zip(archive, ANNOTATION_MEMBER)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise hub.BuildError(f"{archive}:{ANNOTATION_MEMBER}: expected an object with an 'images' list")
    images = []
    for i, image in enumerate(data["images"]):
        place = f"{archive}:{ANNOTATION_MEMBER} images[{i}]"
        image = hub.require_fields(image, ("filepath", "filename", "cocoid", "split", "sentences"), place)
        if image["filepath"] not in ZIPS:
            raise hub.BuildError(f"{place}: filepath {image['filepath']!r} is not one of {', '.join(ZIPS)}")
        captions = [s.get("raw", "").strip() if isinstance(s, dict) else "" for s in image["sentences"]]
        if not captions or not all(captions):
            raise hub.BuildError(f"{place} (cocoid {image['cocoid']}): a sentence without a 'raw' caption")
        images.append(image | {"captions": captions})
    return images


def main(argv: list[str] | None = None) -> dict:
    args = hub.build_parser(__doc__, "out/coco").parse_args(argv)
    annotations = hub.HubFile(REPO, ANNOTATIONS, revision=args.revision)
    zips = {folder: hub.HubFile(REPO, name, revision=args.revision) for folder, name in ZIPS.items()}
    hub.check_disk_space([annotations, *zips.values()], {z: args.out / "images" for z in zips.values()}, args.force)

    archive = hub.download(annotations)
    images = read_images(archive)
    splits = {name: [image for image in images if image["split"] == name] for name in EXPECTED}
    print("Karpathy split: " + ", ".join(f"{name} {len(split)}" for name, split in splits.items()))
    for name, expected in EXPECTED.items():
        hub.check_count(f"{archive}:{ANNOTATION_MEMBER} split {name}", len(splits[name]), expected, args.force)
    train = [image for name in TRAIN_SPLITS for image in splits[name]][:args.limit or None]
    test = splits["test"][:args.limit or None]

    sources = [hub.source(annotations, archive)]
    for folder, file in zips.items():
        wanted = {image["filename"]: f"images/{image['filename']}" for image in train + test
                  if image["filepath"] == folder}
        if not wanted:
            continue
        zip_path = hub.download(file)
        sources.append(hub.source(file, zip_path))
        missing = hub.extract(zip_path, wanted, args.out, force=args.force)
        if missing:
            raise hub.BuildError(f"{zip_path}: {len(missing)} Karpathy-split images are not in the archive, "
                                 f"e.g. {', '.join(sorted(missing)[:5])}")

    rng = random.Random(0)
    captions = [{"id": str(image["cocoid"]), "image": f"images/{image['filename']}",
                 "conversations": [{"from": "human", "value": f"<image>\n{rng.choice(PROMPTS)}"},
                                   {"from": "gpt", "value": image["captions"][0]}]} for image in train]
    benchmark = [{"image_id": image["cocoid"], "image": f"images/{image['filename']}",
                  "references": image["captions"]} for image in test]
    unlabeled = [{"id": r["id"], "image": r["image"]} for r in captions]
    for name, records in (("coco_karpathy_train.json", captions), ("coco_karpathy_test.jsonl", benchmark)):
        hub.require_images(records, args.out, name)
    hub.write_json(args.out / "coco_karpathy_train.json", captions)
    hub.write_jsonl(args.out / "coco_karpathy_test.jsonl", benchmark)
    hub.write_json(args.out / "coco_unlabeled.json", unlabeled)
    build = {"sources": sources, "limit": args.limit, "train": len(captions), "test": len(benchmark),
             "unlabeled": len(unlabeled), "splits": {name: len(split) for name, split in splits.items()}}
    hub.write_json(args.out / "build.json", build, indent=2)
    print(f"{args.out}: {len(captions)} train captions, {len(benchmark)} test images, {len(unlabeled)} unlabeled")
    return build


if __name__ == "__main__":
    hub.run(main)
