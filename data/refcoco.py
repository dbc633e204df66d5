"""RefCOCO, RefCOCO+ and RefCOCOg (Kazemzadeh et al., EMNLP 2014; Mao et al., CVPR 2016): referring expression
comprehension, as grounding benchmark JSONL (`eval.py --task grounding`, Acc@IoU>=0.5).

Sources (Hugging Face Hub):
  GLIPModel/GLIP (a model repo)   mdetr_annotations/finetune_{refcoco,refcoco+,refcocog}_{split}.json
                  MDETR's conversion of the UNC (RefCOCO, RefCOCO+) and UMD (RefCOCOg) splits to COCO's format, one
                  "image" entry per expression: {"images": [{"id", "file_name": "COCO_train2014_<id>.jpg", "height",
                  "width", "caption": the expression, ...}], "annotations": [{"image_id", "bbox": [x, y, w, h] in
                  pixels, ...}]}, exactly one annotation per entry. Any repo holding these files can stand in
                  (--annotations_repo, --annotations_repo_type, --annotations_folder).
  nyanko7/coco-hosted             train2014.zip   13.5 GB (every RefCOCO image is a COCO train2014 image)
The Hub's RefCOCO datasets (lmms-lab/RefCOCO, jxu124/refcoco) are Parquet files, which need pyarrow, not among
nanovlm's dependencies; MDETR's files are plain JSON.

Output in OUT:
  {dataset}_{split}.jsonl   one expression a line, in the file's order:
                            {"id": "refcoco_testA-17", "image": "images/COCO_train2014_000000581857.jpg",
                             "expression": "the lady with the blue shirt", "box": [x1, y1, x2, y2],
                             "dataset": "refcoco", "split": "testA", "width": 640, "height": 480}
                            the box's corners normalised to 0-1 on the padded square image (LLaVA-1.5 pads with the
                            mean colour, the image centred; nanovlm/grounding.py's square_box), 4 decimals
  images/                   the train2014 images the expressions refer to (each checked to have the annotated size)
  build.json                the source files and their commits, the counts

Counts (expressions, checked on the whole files; --limit N then keeps the first N of each): RefCOCO val 10,834,
testA 5,657, testB 5,095; RefCOCO+ val 10,758, testA 5,726, testB 4,889; RefCOCOg val 4,896, test 9,602.

    python data/refcoco.py --out out/refcoco                       # all eight evaluation splits
    python data/refcoco.py --out out/refcoco --sets refcoco_testA refcocog_test
    python eval.py llava-hf/llava-1.5-7b-hf --task grounding --data out/refcoco/refcoco_testA.jsonl
"""

import sys
from collections import defaultdict
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python data/refcoco.py` then finds the packages
from data import hub  # noqa: E402
from nanovlm.grounding import is_valid, square_box  # noqa: E402

ANNOTATIONS = ("GLIPModel/GLIP", "model", "mdetr_annotations")
IMAGES = hub.HubFile("nyanko7/coco-hosted", "train2014.zip")
EXPECTED = {
    "refcoco_val": 10834, "refcoco_testA": 5657, "refcoco_testB": 5095,
    "refcoco+_val": 10758, "refcoco+_testA": 5726, "refcoco+_testB": 4889,
    "refcocog_val": 4896, "refcocog_test": 9602,
}


def padded_box(bbox, width, height) -> list[float] | None:
    """COCO's [x, y, w, h] in pixels -> [x1, y1, x2, y2] on the padded square, 4 decimals; None if it is no box
    inside a width x height image."""
    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if not (isinstance(bbox, list) and len(bbox) == 4 and all(map(number, [*bbox, width, height]))):
        return None
    if min(width, height, bbox[2], bbox[3]) <= 0:
        return None
    box = [round(v, 4) for v in square_box(*bbox, width, height)]
    return box if is_valid(box) else None


def read_set(path: Path, name: str) -> list[dict]:
    """The records of one MDETR file; a malformed entry is a BuildError naming the file and the entry."""
    data = hub.read_json(path)
    if not (isinstance(data, dict) and isinstance(data.get("images"), list)
            and isinstance(data.get("annotations"), list)):
        raise hub.BuildError(f"{path}: expected a COCO-style object with 'images' and 'annotations' lists")
    boxes = defaultdict(list)
    for i, annotation in enumerate(data["annotations"]):
        annotation = hub.require_fields(annotation, ("image_id", "bbox"), f"{path} annotations[{i}]")
        boxes[annotation["image_id"]].append((i, annotation["bbox"]))
    dataset, split = name.rsplit("_", 1)
    records = []
    for i, entry in enumerate(data["images"]):
        place = f"{path} images[{i}]"
        entry = hub.require_fields(entry, ("id", "file_name", "height", "width", "caption"), place)
        found = boxes.get(entry["id"], [])
        if len(found) != 1:
            raise hub.BuildError(f"{place} (id {entry['id']}): {len(found)} annotations, expected exactly one")
        index, bbox = found[0]
        width, height = entry["width"], entry["height"]
        box = padded_box(bbox, width, height)
        if box is None:
            raise hub.BuildError(f"{path} annotations[{index}] (image entry {entry['id']}): bbox {bbox!r} is not a "
                                 f"box inside its {width}x{height} image")
        if not (isinstance(entry["caption"], str) and entry["caption"].strip()):
            raise hub.BuildError(f"{place} (id {entry['id']}): empty expression")
        records.append({"id": f"{name}-{entry['id']}", "image": f"images/{Path(entry['file_name']).name}",
                        "expression": entry["caption"].strip(), "box": box, "dataset": dataset, "split": split,
                        "width": width, "height": height})
    return records


def check_sizes(records: list[dict], out: Path) -> None:
    """Each image has the size its annotations were made on (a box is a fraction of it)."""
    sizes = {}
    for record in records:
        if record["image"] not in sizes:
            with Image.open(out / record["image"]) as image:
                sizes[record["image"]] = image.size
        if sizes[record["image"]] != (record["width"], record["height"]):
            raise hub.BuildError(f"{record['id']}: {out / record['image']} is {sizes[record['image']]}, its "
                                 f"annotation says {(record['width'], record['height'])}")


def main(argv: list[str] | None = None) -> dict:
    parser = hub.build_parser(__doc__, "out/refcoco")
    parser.add_argument("--sets", nargs="+", choices=list(EXPECTED), default=list(EXPECTED),
                        help="which dataset_split files to build (default: all eight)")
    parser.add_argument("--annotations_repo", default=ANNOTATIONS[0], help="the Hub repo holding MDETR's files")
    parser.add_argument("--annotations_repo_type", default=ANNOTATIONS[1], choices=["model", "dataset"])
    parser.add_argument("--annotations_folder", default=ANNOTATIONS[2], help="their folder in that repo")
    args = parser.parse_args(argv)
    files = {name: hub.HubFile(args.annotations_repo, f"{args.annotations_folder}/finetune_{name}.json",
                               args.annotations_repo_type, args.revision) for name in args.sets}
    hub.check_disk_space([*files.values(), IMAGES], {IMAGES: args.out / "images"}, args.force)

    sets, counts, sources = {}, {}, []
    for name, file in files.items():
        path = hub.download(file)
        sources.append(hub.source(file, path))
        records = read_set(path, name)
        counts[name] = {"expressions": len(records), "images": len({r["image"] for r in records})}
        print(f"{name}: {len(records)} expressions on {counts[name]['images']} images")
        hub.check_count(f"{path} ({name})", len(records), EXPECTED[name], args.force)
        sets[name] = records[:args.limit or None]

    archive = hub.download(IMAGES)
    sources.append(hub.source(IMAGES, archive))
    wanted = {Path(r["image"]).name: r["image"] for records in sets.values() for r in records}
    missing = hub.extract(archive, wanted, args.out, force=args.force)
    if missing:
        raise hub.BuildError(f"{archive}: {len(missing)} RefCOCO images are not in the archive, "
                             f"e.g. {', '.join(sorted(missing)[:5])}")
    for name, records in sets.items():
        hub.require_images(records, args.out, f"{name}.jsonl")
        check_sizes(records, args.out)
        hub.write_jsonl(args.out / f"{name}.jsonl", records)
    build = {"sources": sources, "limit": args.limit, "expressions": {n: len(r) for n, r in sets.items()},
             "source_counts": counts}
    hub.write_json(args.out / "build.json", build, indent=2)
    print(f"{args.out}: {', '.join(f'{n}.jsonl ({len(r)})' for n, r in sets.items())} on {len(wanted)} images")
    return build


if __name__ == "__main__":
    hub.run(main)
