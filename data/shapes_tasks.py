"""The shapes world as a SPHINX task mix (Lin et al., 2023): each task with its own instruction, grounding included.

SPHINX trains one model on many tasks at once and gives each task its own instruction, so that tasks whose answers
differ in form (a word, a sentence, a box) do not compete for the same prompt. From a shapes world (data/shapes.py;
every object's box is known) this writes, into OUT (image paths run through OUT/WORLD, a link to the world's
folder, so that they stay inside OUT as a data file's image paths must):

  instruct.json    one conversation per training image, as many as the world's instruct.json (so an epoch is the
                   same number of steps): the world's turns, each with its task's instruction (short-answer
                   questions end in "\\nAnswer the question using a single word or phrase.", LLaVA-1.5's; the
                   caption turn asks "Describe the image concisely."), plus one referring-expression turn
                   ("Please provide the bounding box coordinate of the region this sentence describes: the small red
                   circle." -> "[0.07, 0.07, 0.19, 0.19]") and, in GROUNDED_CAPTION_SHARE of the conversations, a
                   grounded caption ("Describe the image concisely. Include the bounding box for each mentioned
                   object." -> "<p>A small red circle</p> [0.07,0.07,0.19,0.19] and <p>a large ...</p> [...]."), at
                   seeded places in the conversation. With --no-grounding the two grounding turns are left out: the
                   control, same instructions, no boxes.
  eval.json        the world's eval questions with the short-answer instruction, so the model is asked as it was
                   trained: `python eval.py MODEL --task shapes --data OUT/eval.json`
  grounding.jsonl  a referring expression for every object of every eval image that some expression picks out
                   alone, with its true box and the object's size, the number of objects in the image and the split:
                   `python eval.py MODEL --task grounding --data OUT/grounding.jsonl` (Acc@0.5 per size and count)
  build.json       the world, the options and the counts

Boxes are normalised to 0-1 on the (square) image: an object drawn around (x, y) with half-side r covers pixels
x - r .. x + r, so its box is [(x - r) / S, (y - r) / S, (x + r + 1) / S, (y + r + 1) / S] (nanovlm/grounding.py
writes them with two decimals). A referring expression names the fewest attributes among shape, colour and size
that single the object out ("the circle", "the red object", "the small red circle", ...), one drawn at random per
object and seed; an object that no expression singles out (two identical ones) is never asked about. Image paths
point into the world's folder.

    python data/shapes_tasks.py --world out/shapes --out out/shapes_mix
    python data/shapes_tasks.py --world out/shapes --out out/shapes_mix_control --no-grounding
    python data/shapes_tasks.py --compare out/sphinx/taskmix-control out/sphinx/taskmix   # grounding over seeds

--compare also says what the predicted boxes get right, part by part, which Acc@0.5 alone hides: the object's size
(is the box wider than halfway between a small and a large object's width?), its grid column and its grid row
(the cell the box's centre falls in; 1 in GRID by chance), over all records and on one-object images.
"""

import argparse
import json
import random
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python data/shapes_tasks.py` finds the packages
from data.shapes import GRID, SIZES, Obj, caption  # noqa: E402
from data.shapes_eval import seed_scores, seeds_table  # noqa: E402
from nanovlm.benchmarks import SHORT_ANSWER  # noqa: E402
from nanovlm.checkpoint import atomic_write, write_json  # noqa: E402
from nanovlm.data import image_root  # noqa: E402
from nanovlm.grounding import CAPTION_PROMPT, GROUNDED_CAPTION_PROMPT, REC_PROMPT, format_box, is_valid, parse_box  # noqa: E402

GROUNDED_CAPTION_SHARE = 0.3
TASKS = {  # how a question opens -> its task, for the counts in build.json (the grounded caption before the caption)
    GROUNDED_CAPTION_PROMPT: "grounded caption", CAPTION_PROMPT: "caption",
    REC_PROMPT.split("{}")[0]: "referring expression",
}
# The attributes a referring expression may name, fewest first; "object" stands in for a shape left unnamed.
EXPRESSION_FORMS = (("shape",), ("colour",), ("size",), ("size", "shape"), ("colour", "shape"),
                    ("size", "colour", "shape"))


def box(o: Obj, image_size: int) -> tuple[float, float, float, float]:
    left, top, right, bottom = o.x - o.r, o.y - o.r, o.x + o.r + 1, o.y + o.r + 1  # pixel edges
    return left / image_size, top / image_size, right / image_size, bottom / image_size


def expressions(target: Obj, objects: list[Obj]) -> list[str]:
    """Every expression that picks `target` out of `objects` alone, with the fewest attributes that do."""
    def matches(o: Obj, form: tuple[str, ...]) -> bool:
        return all(getattr(o, a) == getattr(target, a) for a in form)

    unique = [form for form in EXPRESSION_FORMS if sum(matches(o, form) for o in objects) == 1]
    if not unique:
        return []
    fewest = min(len(form) for form in unique)
    words = {"size": target.size, "colour": target.colour, "shape": target.shape}
    return ["the " + " ".join([words[a] for a in form if a != "shape"] + [words["shape"] if "shape" in form
                                                                           else "object"])
            for form in unique if len(form) == fewest]


def grounded_caption(objects: list[Obj], image_size: int) -> str:
    """The caption's phrases, left to right, each in <p></p> and followed by its box."""
    ordered = sorted(objects, key=lambda o: (o.x, o.y))
    phrases = [f"<p>{'a' if i else 'A'} {o.size} {o.pair}</p> {format_box(box(o, image_size), compact=True)}"
               for i, o in enumerate(ordered)]
    return (phrases[-1] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]) + "."


def instructed(question: str, answer: str, objects: list[Obj]) -> str:
    """A world turn's question with its task's instruction: the caption turn (its answer is the caption) asks for
    a concise description; every other turn is a short-answer question."""
    return CAPTION_PROMPT if answer == caption(objects) else question + SHORT_ANSWER


def conversation(record: dict, objects: list[Obj], image_size: int, grounding: bool, seed: int) -> dict:
    rng = random.Random(f"task-mix-{seed}-{record['image']}")
    turns = record["conversations"]
    pairs = [(instructed(h["value"].replace("<image>\n", ""), g["value"], objects), g["value"])
             for h, g in zip(turns[::2], turns[1::2])]
    if grounding:
        named = [(o, found) for o in objects if (found := expressions(o, objects))]
        extra = []
        if named:
            target, options = rng.choice(named)
            extra.append((REC_PROMPT.format(rng.choice(options)), format_box(box(target, image_size))))
        if rng.random() < GROUNDED_CAPTION_SHARE:
            extra.append((GROUNDED_CAPTION_PROMPT, grounded_caption(objects, image_size)))
        for turn in extra:
            pairs.insert(rng.randint(0, len(pairs)), turn)
    conversation = []
    for i, (question, answer) in enumerate(pairs):
        conversation += [{"from": "human", "value": ("<image>\n" if i == 0 else "") + question},
                         {"from": "gpt", "value": answer}]
    return record | {"conversations": conversation}


def grounding_records(world: dict, objects: dict[str, list[Obj]], image: str, image_size: int,
                      seed: int) -> list[dict]:
    rng = random.Random(f"grounding-{seed}-{image}")
    scene = objects[image]
    split = "holdout" if {o.pair for o in scene} & set(world["holdout_pairs"]) else "in_distribution"
    records = []
    for i, o in enumerate(scene):
        if options := expressions(o, scene):
            records.append({"id": f"{Path(image).stem}_{i}", "image": image, "expression": rng.choice(options),
                            "box": [round(v, 4) for v in box(o, image_size)], "size": o.size,
                            "objects": len(scene), "split": split})
    return records


def build(world_dir: Path, out: Path, grounding: bool = True, seed: int = 0) -> dict:
    """Write OUT's files (module docstring) from the world at `world_dir`; returns build.json's content."""
    world = json.loads((world_dir / "world.json").read_text())
    image_size = world["config"]["image_size"]
    objects = {path: [Obj(**o) for o in objs] for path, objs in json.loads((world_dir / "objects.json").read_text())
               .items()}
    relative = image_root(world_dir, out)  # image paths are relative to OUT

    def moved(record: dict) -> dict:
        return record | {"image": f"{relative}/{record['image']}"}

    instruct = [moved(conversation(r, objects[r["image"]], image_size, grounding, seed))
                for r in json.loads((world_dir / "instruct.json").read_text())]
    eval_set = [moved(r | {"question": r["question"] + ("" if r["type"] == "caption" else SHORT_ANSWER)})
                for r in json.loads((world_dir / "eval.json").read_text())]
    eval_images = list(dict.fromkeys(r["image"] for r in json.loads((world_dir / "eval.json").read_text())))
    grounding_set = [moved(r) for image in eval_images for r in grounding_records(world, objects, image, image_size,
                                                                                  seed)]
    tasks = Counter(next((task for opening, task in TASKS.items() if turn["value"].removeprefix("<image>\n")
                          .startswith(opening)), "short answer")
                    for record in instruct for turn in record["conversations"][::2])
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "instruct.json", instruct)
    write_json(out / "eval.json", eval_set)
    atomic_write(out / "grounding.jsonl", lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n"
                                                                              for r in grounding_set)))
    metadata = {"world": str(world_dir), "world_config": world["config"], "grounding": grounding, "seed": seed,
                "conversations": len(instruct), "turns": dict(tasks.most_common()), "eval_questions": len(eval_set),
                "grounding_records": len(grounding_set),
                "grounding_by_size": dict(Counter(r["size"] for r in grounding_set).most_common()),
                "grounding_by_objects": dict(sorted(Counter(r["objects"] for r in grounding_set).items()))}
    write_json(out / "build.json", metadata)
    return metadata


def compare(variants: dict[str, list[dict]]) -> str:
    """Grounding Acc@0.5 over seeds, per variant: overall, per object size, per number of objects, per split."""
    rows = sorted({f"{field} {value}" for runs in variants.values() for run in runs
                   for field in ("size", "objects", "split") for value in run.get(field, {})})

    def value(run: dict, row: str) -> float | None:
        if row == "overall":
            return run["overall"]["accuracy"]
        field, _, key = row.partition(" ")
        return run.get(field, {}).get(key, {}).get("accuracy")

    return seeds_table("records", ["overall", *rows], variants, value)


def box_parts(predictions: list[dict]) -> dict[str, dict[str, float]]:
    """The share of records (a missing or invalid box counts as wrong) whose predicted box has the true size class, grid
    column, grid row and cell; over all records and per number of objects in the image."""
    size_split = sum(SIZES.values()) / GRID  # box width / image width halfway between the two sizes

    def right(prediction: str, truth: list[float]) -> tuple[bool, bool, bool, bool]:
        if (box := parse_box(prediction)) is None or not is_valid(box):
            return False, False, False, False
        cells = [[int((b[i] + b[i + 2]) / 2 * GRID) for i in (0, 1)] for b in (box, truth)]
        column, row = cells[0][0] == cells[1][0], cells[0][1] == cells[1][1]
        return (box[2] - box[0] > size_split) == (truth[2] - truth[0] > size_split), column, row, column and row

    def shares(records: list[dict]) -> dict[str, float]:
        hits = [right(r["prediction"], r["box"]) for r in records]
        return {part: sum(h[i] for h in hits) / len(hits) for i, part in enumerate(("size", "column", "row", "cell"))}

    counts = sorted({r["objects"] for r in predictions})
    return {"overall": shares(predictions),
            "objects": {str(n): shares([r for r in predictions if r["objects"] == n]) for n in counts}}


def compare_box_parts(folders: list[Path]) -> str:
    """`box_parts` over seeds, per variant folder (one subfolder per seed holding eval_grounding.json)."""
    variants = {folder.name: [box_parts(json.loads(f.read_text())["predictions"])
                              for f in sorted(folder.glob("*/eval_grounding.json"))] for folder in folders}
    rows = [f"{part}{where}" for where in ("", ", 1 object") for part in ("size", "column", "row", "cell")]

    def value(run: dict, row: str) -> float | None:
        part, _, where = row.partition(", ")
        return run["overall"][part] if not where else run["objects"].get("1", {}).get(part)

    return seeds_table("the box's ...", rows, variants, value)


def main(argv: list[str] | None = None) -> dict | str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=Path, default=Path("out/shapes"), help="the shapes world to read")
    parser.add_argument("--out", type=Path, default=Path("out/shapes_mix"), help="the folder to write")
    parser.add_argument("--grounding", action=argparse.BooleanOptionalAction, default=True,
                        help="add the grounding turns (--no-grounding: the control mix)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compare", type=Path, nargs="+", metavar="VARIANT", help="variant folders whose "
                        "subfolders (one per seed) hold eval_grounding.json: print Acc@0.5, mean ± std")
    args = parser.parse_args(argv)
    if args.compare:
        table = compare(seed_scores(args.compare, "eval_grounding.json"))
        parts = compare_box_parts(args.compare)
        print(f"grounding, Acc@IoU>=0.5 (%), mean ± std over seeds:\n{table}\n\n"
              f"what the boxes get right (%; column, row: chance {100 / GRID:.0f}):\n{parts}")
        return table + "\n\n" + parts
    if not (args.world / "world.json").is_file():
        raise SystemExit(f"{args.world} is not a shapes world (no world.json): run python data/shapes.py first")
    metadata = build(args.world, args.out, args.grounding, args.seed)
    print(f"{args.out}: {metadata['conversations']} conversations, turns {metadata['turns']}; "
          f"{metadata['eval_questions']} eval questions; {metadata['grounding_records']} grounding records")
    return metadata


if __name__ == "__main__":
    main(sys.argv[1:])
