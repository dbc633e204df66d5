"""A picture of a shapes world: its first eval images, enlarged, each with its caption and eval questions, and a
trained model's answers beside the truth (green when right, red when wrong).

`python data/shapes_show.py out/shapes 8 --model out/tiny/sft --png docs/shapes.png`; the world must exist
(`python data/shapes.py`, with `--style outline --out out/shapes_b` for domain B).
"""

import argparse
import json
import re
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: the repo's packages
from data.shapes import Obj, caption  # noqa: E402
from data.shapes_eval import normalize_answer  # noqa: E402
from nanovlm.generate import Sampling, answer  # noqa: E402
from nanovlm.templates import get_template  # noqa: E402
from nanovlm.vlm import load_pretrained  # noqa: E402

SCALE = 3  # a shown image is drawn 3x larger, each pixel a 3x3 block
SPLIT_NAMES = {"in_distribution": "in distribution", "holdout": "hold-out (a colour-shape pair never trained on)"}
Line = list[tuple[str, str]]  # a line of text as (text, colour) segments


def show(world_dir: Path, count: int, png: Path, model_dir: str | None = None) -> Path:
    """A PNG grid of the first `count` eval images, enlarged, each with its caption and eval questions and their
    answers; with a model, the model's greedy answers beside the truth, green when right and red when wrong."""
    records = json.loads((world_dir / "eval.json").read_text())
    objects = json.loads((world_dir / "objects.json").read_text())
    images = list(dict.fromkeys(r["image"] for r in records))[:count]
    questions = {image: [("Describe the image.", caption([Obj(**o) for o in objects[image]]))] for image in images}
    for r in records:
        if r["image"] in questions:
            questions[r["image"]].append((r["question"], r["answer"]))
    asked = [(image, question) for image in images for question, _ in questions[image]]
    replies = dict(zip(asked, model_answers(model_dir, world_dir, asked))) if model_dir else {}

    font = ImageFont.load_default(size=14)
    side = SCALE * Image.open(world_dir / images[0]).width
    text_width, line, pad = 440, 18, 12
    splits = {r["image"]: r["split"] for r in records}
    cells = []
    for image in images:
        lines = [[(f"{Path(image).stem}, {SPLIT_NAMES[splits[image]]}", "grey")]]
        for question, truth in questions[image]:
            answers = [("truth: " + truth, "dimgrey")]
            if replies:
                reply = replies[image, question]
                answers += [("  ", "black"), ("model: " + reply, "green" if same(reply, truth) else "red")]
            lines += [[(question, "black")], answers]
        cells.append(wrapped(lines, font, text_width))
    cell_w, cell_h = side + text_width + 3 * pad, max(side, max(len(c) for c in cells) * line) + 2 * pad
    columns = min(2, len(images))
    grid = Image.new("RGB", (columns * cell_w, -(-len(images) // columns) * cell_h), "white")
    pen = ImageDraw.Draw(grid)
    for i, (image, lines) in enumerate(zip(images, cells)):
        x, y = (i % columns) * cell_w + pad, (i // columns) * cell_h + pad
        grid.paste(Image.open(world_dir / image).convert("RGB").resize((side, side), Image.NEAREST), (x, y))
        for row, segments in enumerate(lines):
            left = x + side + pad
            for text, colour in segments:
                pen.text((left, y + row * line), text, fill=colour, font=font)
                left += pen.textlength(text, font=font)
    png.parent.mkdir(parents=True, exist_ok=True)
    # Few colours make a small file; an outline world's noise needs all 256 for the objects' colours to survive.
    solid = json.loads((world_dir / "world.json").read_text())["config"].get("style", "solid") == "solid"
    grid.convert("P", palette=Image.ADAPTIVE, colors=64 if solid else 256).save(png, optimize=True)
    return png


def wrapped(lines: list[Line], font: ImageFont.FreeTypeFont, width: int) -> list[Line]:
    """The lines, a segment too wide for `width` pixels broken at spaces."""
    out = []
    for segments in lines:
        if sum(font.getlength(text) for text, _ in segments) <= width:
            out.append(segments)
            continue
        for text, colour in segments:
            if not text.strip():
                continue
            current = ""
            for word in text.split(" "):
                if current and font.getlength(current + " " + word) > width:
                    out.append([(current, colour)])
                    current = "  " + word
                else:
                    current = f"{current} {word}" if current else word
            out.append([(current, colour)])
    return out


def same(reply: str, truth: str) -> bool:
    """Equal answers after the eval's normalisation; a caption may name its objects in any order."""
    def phrases(text: str) -> list[str]:
        return sorted(normalize_answer(phrase) for phrase in re.split(r",| and ", text))

    return phrases(reply) == phrases(truth)


def model_answers(model_dir: str, world_dir: Path, asked: list[tuple[str, str]]) -> list[str]:
    """A model's greedy answers to (image, question) pairs, asked as eval.py asks them."""
    model, tokenizer, processor = load_pretrained(model_dir)
    model.eval()
    questions = [(world_dir / image, "<image>\n" + question) for image, question in asked]
    return answer(model, tokenizer, processor, get_template(model.cfg.template), questions,
                  Sampling(max_new_tokens=48))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("world", nargs="?", default="out/shapes", help="the world's folder")
    parser.add_argument("count", nargs="?", type=int, default=8, help="how many eval images to draw")
    parser.add_argument("--model", metavar="DIR", help="a trained model whose answers are shown, e.g. out/tiny/sft")
    parser.add_argument("--png", metavar="FILE", help="the picture to write (default: WORLD/show.png)")
    args = parser.parse_args()
    world = Path(args.world)
    if not (world / "world.json").exists():
        sys.exit(f"{world}: no shapes world here (world.json is missing); write one with python data/shapes.py")
    print(show(world, args.count, Path(args.png or world / "show.png"), args.model))


if __name__ == "__main__":
    main()
