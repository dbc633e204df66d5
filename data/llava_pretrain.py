"""LLaVA's stage-1 (feature alignment) data, LCS-558K: LAION/CC/SBU images with BLIP captions, as LLaVA JSON.

Sources (Hugging Face Hub dataset liuhaotian/LLaVA-Pretrain):
  blip_laion_cc_sbu_558k.json   181 MB    LLaVA JSON, 558,128 records with one human/gpt turn each:
                                          {"id": "004539375", "image": "00453/004539375.jpg", "conversations":
                                           [{"from": "human", "value": "Render a clear and concise summary of the
                                             photo.\\n<image>"}, {"from": "gpt", "value": "select luxury ..."}]}
  images.zip                    27.4 GB   the images in 5-digit folders, 00000/ to 00659/

Output in OUT:
  blip_laion_cc_sbu_558k.json   the records, image paths relative to OUT ("images/00453/004539375.jpg"), so
                                that `train_align.py --data OUT/blip_laion_cc_sbu_558k.json` needs no --image_folder
  images/                       the images, in the JSON's sub-folders
  build.json                    the source files and their commits, the counts, the records dropped

A zip member is matched to a record by the last two parts of its path (folder and file), wherever the zip's
root is. Records whose image is not in the archive are dropped, counted, printed and listed in build.json.
The disk needs about 55 GB: the zip in the Hugging Face cache and the extracted images.

    python data/llava_pretrain.py --out out/llava_pretrain
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python data/llava_pretrain.py` then finds `data`
from data import hub  # noqa: E402

REPO = "liuhaotian/LLaVA-Pretrain"
RECORDS = "blip_laion_cc_sbu_558k.json"
IMAGES = "images.zip"
EXPECTED_RECORDS = 558128
DEPTH = 2  # "00453/004539375.jpg": a record's image path, and the end of its zip member's path


def read_records(path: Path) -> list[dict]:
    records = hub.read_json(path)
    if not isinstance(records, list):
        raise hub.BuildError(f"{path}: expected a JSON list of LLaVA records")
    for i, record in enumerate(records):
        hub.require_fields(record, ("id", "image", "conversations"), f"{path} record {i}")
    return records


def main(argv: list[str] | None = None) -> dict:
    args = hub.build_parser(__doc__, "out/llava_pretrain").parse_args(argv)
    data, images = (hub.HubFile(REPO, name, revision=args.revision) for name in (RECORDS, IMAGES))
    hub.check_disk_space([data, images], {images: args.out / "images"}, args.force)

    path = hub.download(data)
    records = read_records(path)
    hub.check_count(f"{path}: records", len(records), EXPECTED_RECORDS, args.force)
    records = records[:args.limit or None]

    archive = hub.download(images)
    wanted = {hub.path_key(r["image"], DEPTH): f"images/{r['image']}" for r in records}
    missing = hub.extract(archive, wanted, args.out, depth=DEPTH, force=args.force)
    kept = [r | {"id": str(r["id"]), "image": f"images/{r['image']}"} for r in records
            if hub.path_key(r["image"], DEPTH) not in missing]
    dropped = sorted(r["image"] for r in records if hub.path_key(r["image"], DEPTH) in missing)
    if dropped:
        print(f"warning: dropped {len(dropped)} records whose image is not in {archive.name}, "
              f"e.g. {', '.join(dropped[:5])} (all are listed in build.json)", file=sys.stderr)
    hub.require_images(kept, args.out, RECORDS)
    hub.write_json(args.out / RECORDS, kept)
    build = {"sources": [hub.source(data, path), hub.source(images, archive)], "limit": args.limit,
             "records": len(records), "kept": len(kept), "dropped_missing_image": len(dropped),
             "dropped_images": dropped}
    hub.write_json(args.out / "build.json", build, indent=2)
    print(f"{args.out / RECORDS}: {len(kept)} records ({len(dropped)} dropped: image not in the archive)")
    return build


if __name__ == "__main__":
    hub.run(main)
