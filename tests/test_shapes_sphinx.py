"""The shapes world for SPHINX: the second rendering domain (outline) and the task mix with grounding."""

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data import shapes, shapes_tasks
from data.shapes import ShapesConfig, generate
from data.shapes_draw import COLOURS, NOISE
from nanovlm.benchmarks import SHORT_ANSWER, load
from nanovlm.data import DataSource, check_record
from nanovlm.grounding import CAPTION_PROMPT, GROUNDED_CAPTION_PROMPT, REC_PROMPT, iou, is_valid, parse_box
from test_shapes import FILES, SMALL, digest, expected_answer

OUTLINE = ShapesConfig(**(vars(SMALL) | {"style": "outline"}))


@pytest.fixture(scope="module")
def solid(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("solid")
    generate(out, SMALL)
    return out


@pytest.fixture(scope="module")
def outline(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("outline")
    generate(out, OUTLINE)
    return out


def load_json(path: Path):
    return json.loads(path.read_text())


# --- domain B ---------------------------------------------------------------------------------------------------

def test_outline_world_is_deterministic_and_differs_from_the_solid_one(solid, outline, tmp_path):
    generate(tmp_path / "again", OUTLINE)
    assert digest(tmp_path / "again") == digest(outline)
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == sorted(p.name for p in outline.iterdir())
    a, b = load_json(solid / "world.json"), load_json(outline / "world.json")
    assert b["holdout_pairs"] == a["holdout_pairs"] and b["companions"] == a["companions"]  # one world's rules
    assert "style" not in a["config"] and b["config"]["style"] == "outline"
    assert load_json(solid / "objects.json") != load_json(outline / "objects.json")  # its own scenes
    assert (solid / "images" / "eval_000000.png").read_bytes() != (outline / "images" / "eval_000000.png").read_bytes()
    for name in FILES:
        assert (outline / name).is_file()


def test_outline_pixels_draw_each_object_on_noise(outline):
    objects = load_json(outline / "objects.json")
    for path in list(objects)[:40]:
        pixels = np.asarray(Image.open(outline / path).convert("RGB")).astype(int)
        drawn = np.zeros(pixels.shape[:2], dtype=bool)
        for o in objects[path]:
            colour = COLOURS[o["colour"]]
            assert tuple(pixels[o["y"] + o["r"], o["x"]]) == colour, (path, o)  # the bottom edge of every shape
            if o["shape"] in ("circle", "square") and o["size"] == "large":  # hollow: noise inside
                assert pixels[o["y"], o["x"]][0] == pixels[o["y"], o["x"]][1] == pixels[o["y"], o["x"]][2]
            drawn[o["y"] - o["r"]:o["y"] + o["r"] + 1, o["x"] - o["r"]:o["x"] + o["r"] + 1] = True
            box = pixels[o["y"] - o["r"]:o["y"] + o["r"] + 1, o["x"] - o["r"]:o["x"] + o["r"] + 1]
            assert (box == colour).all(axis=-1).sum() < (2 * o["r"] + 1) ** 2  # never a filled square of colour
        background = pixels[~drawn]
        assert (background[:, 0] == background[:, 1]).all() and (background[:, 1] == background[:, 2]).all()
        assert NOISE[0] <= background.min() and background.max() <= NOISE[1]
        assert len(np.unique(background[:, 0])) > 40  # noise, not a flat colour


def test_outline_answers_follow_from_the_objects(outline):
    objects, cell_size = load_json(outline / "objects.json"), OUTLINE.image_size // shapes.GRID
    for record in load_json(outline / "eval.json"):
        assert record["answer"] == expected_answer(record["question"], objects[record["image"]], cell_size), record


def test_styles_are_kept_apart_when_a_world_is_reused(tmp_path, capsys):
    generate(tmp_path, OUTLINE)
    generate(tmp_path, SMALL)  # another style: written again, not reused
    assert "reused" not in capsys.readouterr().out and "style" not in load_json(tmp_path / "world.json")["config"]
    generate(tmp_path, SMALL)
    assert "reused" in capsys.readouterr().out


def test_command_line_style(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["shapes.py", "--style", "outline", "--out", str(tmp_path), "--num-train", "20",
                                      "--num-unlabeled", "0", "--num-eval", "10"])
    shapes.main()
    assert load_json(tmp_path / "world.json")["config"] == vars(ShapesConfig(20, 0, 10, style="outline"))
    monkeypatch.setattr(sys, "argv", ["shapes.py", "--style", "textured", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        shapes.main()


# --- the task mix -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mix(solid, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mix")
    shapes_tasks.build(solid, out)
    return out


def obj_box(o: dict, size: int) -> tuple[float, ...]:
    x, y, r = o["x"], o["y"], o["r"]
    return (x - r) / size, (y - r) / size, (x + r + 1) / size, (y + r + 1) / size


def referred(expression: str, objects: list[dict]) -> list[dict]:
    """The objects an expression ("the small red circle", "the red object", "the circle") fits, read independently
    of the builder's code."""
    words = expression.removeprefix("the ").split()
    return [o for o in objects if all(w in (o["size"], o["colour"], o["shape"], "object") for w in words)]


def test_each_task_carries_its_own_instruction(solid, mix):
    world = {r["image"]: r for r in load_json(solid / "instruct.json")}
    objects, size = load_json(solid / "objects.json"), SMALL.image_size
    records = load_json(mix / "instruct.json")
    assert len(records) == len(world)  # same conversations per epoch: the same steps
    seen = {"short": 0, "caption": 0, "rec": 0, "grounded": 0}
    for record in records:
        image = str(Path(record["image"]).relative_to(solid.name))
        check_record(record, mix)  # a valid LLaVA record whose image resolves from OUT
        scene, turns = objects[image], record["conversations"]
        questions = [t["value"].removeprefix("<image>\n") for t in turns[::2]]
        answers = [t["value"] for t in turns[1::2]]
        assert turns[0]["value"].startswith("<image>\n")
        original = [(h["value"].removeprefix("<image>\n"), g["value"])
                    for h, g in zip(world[image]["conversations"][::2], world[image]["conversations"][1::2])]
        kept = []
        for question, answer in zip(questions, answers):
            if question.endswith(SHORT_ANSWER):
                seen["short"] += 1
                kept.append((question.removesuffix(SHORT_ANSWER), answer))
                assert answer == expected_answer(question.removesuffix(SHORT_ANSWER), scene, size // shapes.GRID)
            elif question == CAPTION_PROMPT:
                seen["caption"] += 1
                kept.append(("Describe the image.", answer))
            elif question == GROUNDED_CAPTION_PROMPT:
                seen["grounded"] += 1
                phrases = re.findall(r"<p>(.+?)</p> (\[[^\]]+\])", answer)
                assert len(phrases) == len(scene) and answer.endswith("].")
                for phrase, text in phrases:
                    [o] = [o for o in scene if phrase.lower() == f"a {o['size']} {o['colour']} {o['shape']}"
                           and iou(parse_box(text), obj_box(o, size)) > 0.8]
            else:
                seen["rec"] += 1
                expression = re.fullmatch(re.escape(REC_PROMPT).replace(r"\{\}", "(.+)"), question)[1]
                [o] = referred(expression, scene)  # the expression singles one object out
                assert re.fullmatch(r"\[\d\.\d\d, \d\.\d\d, \d\.\d\d, \d\.\d\d\]", answer)
                assert iou(parse_box(answer), obj_box(o, size)) > 0.8  # two decimals of a 96-pixel image
        assert kept == original  # every world turn is there, in order, with its instruction added
    assert min(seen.values()) > 0 and seen["rec"] >= 0.95 * len(records)
    assert 0.2 < seen["grounded"] / len(records) < 0.4


def test_grounding_eval_and_instructed_eval(solid, mix):
    objects, size = load_json(solid / "objects.json"), SMALL.image_size
    benchmark = load("grounding", mix / "grounding.jsonl")  # checked as eval.py checks it
    holdout = set(load_json(solid / "world.json")["holdout_pairs"])
    assert {r["size"] for r in benchmark.records} == {"small", "large"}
    assert {r["objects"] for r in benchmark.records} == {1, 2, 3, 4}
    for record in benchmark.records:
        scene = objects[str(Path(record["image"]).relative_to(solid.name))]
        [o] = referred(record["expression"], scene)
        assert is_valid(record["box"]) and record["box"] == pytest.approx(obj_box(o, size), abs=1e-4)
        assert (record["size"], record["objects"]) == (o["size"], len(scene))
        assert (record["split"] == "holdout") == any(f"{p['colour']} {p['shape']}" in holdout for p in scene)
    asked = load("shapes", mix / "eval.json").records
    original = load_json(solid / "eval.json")
    assert [r["question"] for r in asked] == [r["question"] + SHORT_ANSWER for r in original]
    assert [(r["id"], r["answer"], r["type"], r["split"]) for r in asked] == [
        (r["id"], r["answer"], r["type"], r["split"]) for r in original]


def test_control_mix_has_the_instructions_without_the_boxes(solid, mix, tmp_path):
    metadata = shapes_tasks.main(["--world", str(solid), "--out", str(tmp_path / "control"), "--no-grounding"])
    assert set(metadata["turns"]) == {"short answer", "caption"}
    control, grounded = load_json(tmp_path / "control" / "instruct.json"), load_json(mix / "instruct.json")
    for a, b in zip(control, grounded):
        kept = [t for t in b["conversations"] if "bounding box" not in t["value"] and not t["value"].startswith("[")
                and "<p>" not in t["value"]]
        assert [t["value"].removeprefix("<image>\n") for t in a["conversations"]] == [
            t["value"].removeprefix("<image>\n") for t in kept]
    assert [r["question"] for r in load_json(tmp_path / "control" / "eval.json")] == [
        r["question"] for r in load_json(mix / "eval.json")]
    shapes_tasks.build(solid, tmp_path / "again")
    for name in ("instruct.json", "eval.json", "grounding.jsonl"):  # seeded: the same files again
        assert (tmp_path / "again" / name).read_text() == (mix / name).read_text().replace("../", "../../")


def test_mixed_data_trains_through_the_loader(init, world, tmp_path):
    """The mix of the conftest world tokenises under the tiny preset's template, boxes and all."""
    from nanovlm.data import LLaVADataset
    from nanovlm.templates import get_template
    from nanovlm.vlm import load_pretrained

    shapes_tasks.build(world, tmp_path / "mix")
    model, tokenizer, processor = load_pretrained(str(init))
    data = LLaVADataset([DataSource(tmp_path / "mix" / "instruct.json")], tokenizer, get_template("vicuna_v1"),
                        processor, model.cfg.num_image_tokens(), max_length=1024, seed=0)
    sample = data[0]
    answer_text = tokenizer.decode([t for t in sample["labels"] if t != -100])
    assert "[0." in answer_text  # the box answer carries loss


def test_compare_tables_grounding_over_seeds(tmp_path, capsys):
    for arm, accuracy in (("control", 0.1), ("taskmix", 0.6)):
        for seed in range(3):
            run = {"overall": {"accuracy": accuracy + seed / 100}, "size": {"small": {"accuracy": accuracy}},
                   "objects": {"1": {"accuracy": 1.0}}}
            (tmp_path / arm / f"seed{seed}").mkdir(parents=True)
            predictions = [{"prediction": "[0.56, 0.33, 0.68, 0.45]" if arm == "taskmix" else "no box",
                            "box": [0.5625, 0.3333, 0.6771, 0.4479], "objects": 1}]
            (tmp_path / arm / f"seed{seed}" / "eval_grounding.json").write_text(json.dumps(
                {"scores": run, "predictions": predictions}))
    table = shapes_tasks.main(["--compare", str(tmp_path / "control"), str(tmp_path / "taskmix")])
    assert "| overall | 11.0 ± 1.0 | 61.0 ± 1.0 |" in table and "| size small | 10.0 ± 0.0 | 60.0 ± 0.0 |" in table
    assert "| objects 1 | 100.0 ± 0.0 | 100.0 ± 0.0 |" in table and "| seeds | 3 | 3 |" in table
    assert "| cell, 1 object | 0.0 ± 0.0 | 100.0 ± 0.0 |" in table


def test_box_parts_score_size_column_and_row_apart():
    truth = [0.5625, 0.3333, 0.6771, 0.4479]  # a small object in column 2, row 1 of the 4x4 grid
    predictions = [  # (predicted box, size right, column right, row right)
        ("[0.56, 0.33, 0.68, 0.45]", 1, 1, 1),
        ("[0.52, 0.29, 0.72, 0.49]", 0, 1, 1),  # a large box on the same cell
        ("[0.56, 0.83, 0.68, 0.95]", 1, 1, 0),  # the right column, the bottom row
        ("[0.06, 0.33, 0.18, 0.45]", 1, 0, 1),  # the right row, the first column
        ("the small circle", 0, 0, 0),
        ("[nan, 0.3, 0.6, 0.4]", 0, 0, 0),
    ]
    records = [{"prediction": p, "box": truth, "objects": 1 + i % 2} for i, (p, *_) in enumerate(predictions)]
    parts = shapes_tasks.box_parts(records)
    expected = [sum(p[i] for p in predictions) / len(predictions) for i in (1, 2, 3)]
    assert [parts["overall"][k] for k in ("size", "column", "row")] == pytest.approx(expected)
    assert parts["overall"]["cell"] == pytest.approx(2 / 6)
    assert parts["objects"]["1"] == pytest.approx({"size": 2 / 3, "column": 2 / 3, "row": 1 / 3, "cell": 1 / 3})


def test_domain_tables_read_each_domains_scores(tmp_path):
    from data import shapes_eval

    for arm, a, b in (("A", 0.9, 0.3), ("B", 0.4, 0.8)):
        for seed in range(2):
            folder = tmp_path / arm / f"seed{seed}"
            folder.mkdir(parents=True)
            for name, value in (("eval_shapes.json", a), ("eval_shapes_b.json", b)):
                scores = {"in_distribution": {t: value for t in (*shapes.EVAL_TYPES, "overall")} | {"n": 10}}
                (folder / name).write_text(json.dumps({"scores": scores}))
    on_b = shapes_eval.main([str(tmp_path / "A"), str(tmp_path / "B"), "--file", "eval_shapes_b.json"])
    assert "| overall | 30.0 ± 0.0 | 80.0 ± 0.0 |" in on_b
    assert "| overall | 90.0 ± 0.0 | 40.0 ± 0.0 |" in shapes_eval.main([str(tmp_path / "A"), str(tmp_path / "B")])
