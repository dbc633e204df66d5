"""LLaVA-1.5's stage-2 (instruction tuning) mixture, mix665k, as LLaVA JSON with its images.

Sources (Hugging Face Hub datasets):
  liuhaotian/LLaVA-Instruct-150K   llava_v1_5_mix665k.json   1.03 GB   665,298 LLaVA records, multi-turn:
      {"id": "000000033471", "image": "coco/train2017/000000033471.jpg", "conversations": [{"from": "human",
       "value": "<image>\\nWhat are the colors of the bus in the image?"}, {"from": "gpt", "value": "..."}, ...]}
      of which 40,688 are text-only (ShareGPT; no "image" key)
  and the image zips of ARCHIVES below, about 72 GB in all: mirrors of the official COCO train2017, GQA,
  OCR-VQA, TextVQA and Visual Genome archives.

Output in OUT:
  llava_v1_5_mix665k.json   the records, image paths unchanged, which are relative to OUT (coco/train2017/...,
                            gqa/images/..., ocr_vqa/images/..., textvqa/train_images/..., vg/VG_100K{,_2}/...);
                            text-only records kept as they are; ids made strings
  coco/ gqa/ ocr_vqa/ textvqa/ vg/   the images the records use
  build.json                the source files and their commits, the counts per folder, the records dropped

Zip members are matched to records by file name, wherever the zip's root is. Records whose image is not in its
archive (some OCR-VQA images are known to be missing, LLaVA issue #835), or in a folder no archive covers, are
dropped, counted, printed and listed in build.json. The disk needs about 145 GB: the zips in the Hugging Face
cache and the extracted images. --limit N builds the first N records and downloads only the zips they use (the
disk check before it still counts every zip: --force if that stops a smoke build on a small disk).

    python data/llava_mix665k.py --out out/llava_mix665k
"""

import sys
from collections import Counter
from pathlib import Path, PurePosixPath

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python data/llava_mix665k.py` then finds `data`
from data import hub  # noqa: E402

REPO = "liuhaotian/LLaVA-Instruct-150K"
RECORDS = "llava_v1_5_mix665k.json"
EXPECTED_RECORDS = 665298
ARCHIVES = [  # (repo, file, repo type, the folder of the JSON's image paths that its images go to)
    ("BoyangZ/coco_train_2017", "train2017.zip", "dataset", "coco/train2017"),  # 19.3 GB
    ("BoyangZ/GQA_llava", "images.zip", "dataset", "gqa/images"),  # 21.8 GB
    ("BoyangZ/OCR_VQA", "ocr_vqa_images_llava_v15.zip", "dataset", "ocr_vqa/images"),  # 8.97 GB
    ("BoyangZ/text_vqa_train_val_images", "train_val_images.zip", "dataset", "textvqa/train_images"),  # 7.07 GB
    ("BoyangZ/VisualGenome_VG_100K_1_and_2", "images.zip", "dataset", "vg/VG_100K"),  # 9.73 GB
    ("BoyangZ/VisualGenome_VG_100K_1_and_2", "images2.zip", "dataset", "vg/VG_100K_2"),  # 5.47 GB
]


def read_records(path: Path) -> list[dict]:
    records = hub.read_json(path)
    if not isinstance(records, list):
        raise hub.BuildError(f"{path}: expected a JSON list of LLaVA records")
    for i, record in enumerate(records):
        hub.require_fields(record, ("id", "conversations"), f"{path} record {i}")
    return records


def folder_of(image: str) -> str | None:
    """The ARCHIVES folder an image path lies in, or None."""
    return next((folder for *_, folder in ARCHIVES if image.startswith(folder + "/")), None)


def wanted_images(records: list[dict], folder: str, path: Path) -> dict[str, str]:
    """File name -> image path of the records' images in `folder`; two paths with one file name cannot both be
    matched to a zip member by name, so that is an error."""
    wanted = {}
    for record in records:
        image = record.get("image")
        if image and folder_of(image) == folder:
            name = PurePosixPath(image).name
            if wanted.setdefault(name, image) != image:
                raise hub.BuildError(f"{path}: record {record['id']}: {image} and {wanted[name]} share a file name")
    return wanted


def main(argv: list[str] | None = None) -> dict:
    args = hub.build_parser(__doc__, "out/llava_mix665k").parse_args(argv)
    data = hub.HubFile(REPO, RECORDS, revision=args.revision)
    archives = {hub.HubFile(repo, name, repo_type): folder for repo, name, repo_type, folder in ARCHIVES}
    hub.check_disk_space([data, *archives], {file: args.out / folder for file, folder in archives.items()},
                         args.force)

    path = hub.download(data)
    records = read_records(path)
    hub.check_count(f"{path}: records", len(records), EXPECTED_RECORDS, args.force)
    records = records[:args.limit or None]

    sources, missing = [hub.source(data, path)], set()
    for file, folder in archives.items():
        wanted = wanted_images(records, folder, path)
        if not wanted:
            print(f"{folder}: no record uses it, {file} not needed")
            continue
        archive = hub.download(file)
        sources.append(hub.source(file, archive))
        missing |= {wanted[name] for name in hub.extract(archive, wanted, args.out, force=args.force)}

    kept, dropped = [], []
    for record in records:
        image = record.get("image")
        if image and (folder_of(image) is None or image in missing):
            dropped.append(image)
        else:
            kept.append(record | {"id": str(record["id"])})
    text_only = sum("image" not in r for r in kept)
    per_folder = Counter(folder_of(r["image"]) for r in kept if "image" in r)
    dropped_per_folder = Counter(folder_of(image) or PurePosixPath(image).parts[0] for image in dropped)
    print(f"kept {len(kept)} of {len(records)} records: {text_only} text-only, "
          + ", ".join(f"{folder} {n}" for folder, n in per_folder.items()))
    if dropped:
        print(f"warning: dropped {len(dropped)} records whose image is missing: "
              + ", ".join(f"{folder} {n}" for folder, n in dropped_per_folder.items())
              + f", e.g. {', '.join(dropped[:5])} (all are listed in build.json)", file=sys.stderr)

    hub.require_images(kept, args.out, RECORDS)
    hub.write_json(args.out / RECORDS, kept)
    build = {"sources": sources, "limit": args.limit, "records": len(records), "kept": len(kept),
             "text_only": text_only, "images_per_folder": dict(per_folder), "dropped_missing_image": len(dropped),
             "dropped_per_folder": dict(dropped_per_folder), "dropped_images": dropped}
    hub.write_json(args.out / "build.json", build, indent=2)
    print(f"{args.out / RECORDS}: {len(kept)} records ({len(dropped)} dropped: image missing)")
    return build


if __name__ == "__main__":
    hub.run(main)
