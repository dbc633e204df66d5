"""The shapes world generator: determinism, the hold-out split, answers that follow from the pixels, scoring."""

import hashlib
import json
import re
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from data import shapes_eval
from data.shapes import GRID, PLURALS, ShapesConfig, generate
from data.shapes_draw import COLOURS
from data.shapes_eval import format_table, normalize_answer, score

SMALL = ShapesConfig(num_train=300, num_unlabeled=50, num_eval=100)
FILES = ("captions.json", "instruct.json", "unlabeled.json", "eval.json", "objects.json", "world.json")


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    generate(out, SMALL)
    return out


def load(out: Path, name: str):
    return json.loads((out / name).read_text())


def digest(out: Path) -> str:
    pngs = sorted((out / "images").glob("*.png"))
    paths = [out / name for name in FILES] + pngs[:: max(1, len(pngs) // 20)]
    return hashlib.sha256(b"".join(path.read_bytes() for path in paths)).hexdigest()


def objects_of(out: Path) -> dict[str, list[dict]]:
    return load(out, "objects.json")


def find(objects: list[dict], pair: str) -> dict:
    [obj] = [o for o in objects if f"{o['colour']} {o['shape']}" == pair]  # questions name unique objects only
    return obj


def expected_answer(question: str, objects: list[dict], cell_size: int) -> str:
    """Answer a question from the stored objects alone, independently of the generator's own code."""
    if m := re.fullmatch(r"What colour is the (\w+)\?", question):
        [obj] = [o for o in objects if o["shape"] == m[1]]
        return obj["colour"]
    if m := re.fullmatch(r"What shape is the (\w+) object\?", question):
        [obj] = [o for o in objects if o["colour"] == m[1]]
        return obj["shape"]
    if m := re.fullmatch(r"Is the (\w+ \w+) small or large\?", question):
        return find(objects, m[1])["size"]
    if question == "How many objects are there?":
        return str(len(objects))
    if m := re.fullmatch(r"How many (\w+) objects are there\?", question):
        return str(sum(o["colour"] == m[1] for o in objects))
    if m := re.fullmatch(r"How many (\w+) are there\?", question):
        return str(sum(PLURALS[o["shape"]] == m[1] for o in objects))
    if m := re.fullmatch(r"Is there an? (\w+ \w+) in the image\?", question):
        return "yes" if any(f"{o['colour']} {o['shape']}" == m[1] for o in objects) else "no"
    relation = r"Which is (further left|further right|higher|lower), the (\w+ \w+) or the (\w+ \w+)\?"
    if m := re.fullmatch(relation, question):
        a, b = find(objects, m[2]), find(objects, m[3])
        axis, sign = {"further left": ("x", 1), "further right": ("x", -1), "higher": ("y", 1),
                      "lower": ("y", -1)}[m[1]]
        assert abs(a[axis] - b[axis]) >= cell_size / 2, "spatial questions compare different columns (rows)"
        answer = min(a, b, key=lambda o: sign * o[axis])
        return f"{answer['colour']} {answer['shape']}"
    raise AssertionError(f"unexpected question: {question!r}")


def test_deterministic_and_seeded(world_dir: Path, tmp_path: Path):
    generate(tmp_path / "again", SMALL)
    generate(tmp_path / "other", ShapesConfig(**(vars(SMALL) | {"seed": 1})))
    assert digest(tmp_path / "again") == digest(world_dir)
    assert digest(tmp_path / "other") != digest(world_dir)
    assert load(tmp_path / "other", "world.json")["holdout_pairs"] != load(world_dir, "world.json")["holdout_pairs"]


def test_reuses_a_world_with_the_same_config(world_dir: Path, capsys: pytest.CaptureFixture):
    before = (world_dir / "eval.json").stat().st_mtime_ns
    assert generate(world_dir, SMALL) == load(world_dir, "world.json")
    assert "reused" in capsys.readouterr().out
    assert (world_dir / "eval.json").stat().st_mtime_ns == before


def test_world_metadata(world_dir: Path):
    world = load(world_dir, "world.json")
    holdout = world["holdout_pairs"]
    assert len(holdout) == 4
    assert len({p.split()[0] for p in holdout}) == 4 and len({p.split()[1] for p in holdout}) == 4
    assert not set(holdout) & set(world["pair_frequency"])
    for name in ("captions", "instruct", "unlabeled", "eval"):
        assert world["counts"][name] == len(load(world_dir, f"{name}.json"))
    assert sum(world["counts"]["eval_questions"].values()) == world["counts"]["eval"]


def test_held_out_pairs_never_in_training(world_dir: Path):
    holdout = set(load(world_dir, "world.json")["holdout_pairs"])
    for path, objects in objects_of(world_dir).items():
        if not path.startswith("images/eval_"):
            assert not {f"{o['colour']} {o['shape']}" for o in objects} & holdout, path
    text = (world_dir / "captions.json").read_text() + (world_dir / "instruct.json").read_text()
    assert not [pair for pair in holdout if pair in text]  # nor are they named, even in "no" questions


def test_pixels_match_objects(world_dir: Path):
    objects = objects_of(world_dir)
    paths = list(objects)[:30] + [p for p in objects if p.startswith("images/eval_")][:30]
    for path in paths:
        image = Image.open(world_dir / path)
        for o in objects[path]:
            assert 0 <= o["x"] - o["r"] and o["x"] + o["r"] < image.width  # fully inside the image
            assert image.getpixel((o["x"], o["y"])) == tuple(COLOURS[o["colour"]]), (path, o)
        assert (40, 40, 40) in {colour for _, colour in image.getcolors()}  # some background shows


def test_one_object_per_grid_cell(world_dir: Path):
    cell = SMALL.image_size // GRID
    for objects in objects_of(world_dir).values():
        assert 1 <= len(objects) <= 4
        cells = {(o["x"] // cell, o["y"] // cell) for o in objects}
        assert len(cells) == len(objects)
        for o in objects:  # the box lies inside its cell with a free margin, so boxes never touch
            assert o["x"] // cell * cell < o["x"] - o["r"] and o["x"] + o["r"] < (o["x"] // cell + 1) * cell - 1
            assert o["y"] // cell * cell < o["y"] - o["r"] and o["y"] + o["r"] < (o["y"] // cell + 1) * cell - 1


def test_eval_splits_follow_the_holdout(world_dir: Path):
    holdout = set(load(world_dir, "world.json")["holdout_pairs"])
    objects = objects_of(world_dir)
    records = load(world_dir, "eval.json")
    assert Counter(r["split"] for r in records).keys() == {"in_distribution", "holdout"}
    for record in records:
        pairs = {f"{o['colour']} {o['shape']}" for o in objects[record["image"]]}
        assert bool(pairs & holdout) == (record["split"] == "holdout"), record


def test_answers_follow_from_the_objects(world_dir: Path):
    objects, cell_size = objects_of(world_dir), SMALL.image_size // GRID
    for record in load(world_dir, "eval.json"):
        assert record["answer"] == expected_answer(record["question"], objects[record["image"]], cell_size), record
    for record in load(world_dir, "instruct.json"):
        turns = record["conversations"]
        for human, gpt in zip(turns[::2], turns[1::2]):
            question = human["value"].removeprefix("<image>\n")
            if question != "Describe the image.":
                assert gpt["value"] == expected_answer(question, objects[record["image"]], cell_size), question


def test_captions_list_objects_column_by_column(world_dir: Path):
    objects, cell_size = objects_of(world_dir), SMALL.image_size // GRID
    for record in load(world_dir, "captions.json")[:50]:
        ordered = sorted(objects[record["image"]], key=lambda o: (o["x"] // cell_size, o["y"] // cell_size))
        phrases = [f"{o['size']} {o['colour']} {o['shape']}" for o in ordered]
        assert re.findall(r"(?:small|large) \w+ \w+", record["conversations"][1]["value"]) == phrases


@pytest.mark.parametrize("name", ["instruct.json", "eval.json"])
def test_yes_no_balanced(world_dir: Path, name: str):
    records = load(world_dir, name)
    if name == "eval.json":
        assert {r.get("pope") for r in records if r["type"] == "existence"} == {"random", "popular", "adversarial"}
        answers = [r["answer"] for r in records if r["type"] == "existence"]
        spatial = [(r["question"], r["answer"]) for r in records if r["type"] == "spatial"]
    else:
        turns = [t["value"].removeprefix("<image>\n") for r in records for t in r["conversations"]]
        answers = [a for q, a in zip(turns[::2], turns[1::2]) if q.startswith("Is there")]
        spatial = [(q, a) for q, a in zip(turns[::2], turns[1::2]) if q.startswith("Which is")]
    # a relation's answer is one of the two objects named: the first-named one about half of the time
    first_named = ["yes" if a == re.search(r"the (\w+ \w+) or", q)[1] else "no"
                   for q, a in spatial]
    for values in (answers, first_named):
        assert len(values) >= 20
        assert abs(values.count("yes") / len(values) - 0.5) <= 0.1


def test_eval_types_balanced(world_dir: Path):
    types = Counter(r["type"] for r in load(world_dir, "eval.json"))
    assert set(types) == {"colour", "shape", "count", "size", "spatial", "existence"}
    assert max(types.values()) <= 1.5 * min(types.values())


def test_instruct_turns_follow_the_type_weights(world_dir: Path):
    # colour 3.5 against shape 0.3 and existence 0.5 (existence always applies, so it gets more than its weight)
    turns = load(world_dir, "world.json")["counts"]["instruct_questions"]
    assert turns["colour"] > 3 * turns["shape"] and turns["colour"] > 2 * turns["existence"]


@pytest.mark.parametrize("name", ["captions.json", "instruct.json"])
def test_valid_llava_records(world_dir: Path, name: str):
    records = load(world_dir, name)
    assert len({r["id"] for r in records}) == len(records) == SMALL.num_train
    for record in records:
        turns = record["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2) and turns
        assert turns[0]["value"].startswith("<image>\n")
        assert sum(t["value"].count("<image>") for t in turns) == 1
        if name == "instruct.json":
            assert 3 <= len(turns) // 2 <= 6
            assert sum(t["value"] == "Describe the image." for t in turns) <= 1
            answers = [t["value"] for t in turns[1::2] if not t["value"].endswith(".")]  # captions end with "."
            assert all(re.fullmatch(r"[a-z0-9]+( [a-z]+)?", a) for a in answers)  # a word, or a colour and a shape


def test_images_exist_and_are_rgb(world_dir: Path):
    records = load(world_dir, "captions.json") + load(world_dir, "unlabeled.json") + load(world_dir, "eval.json")
    for image in {r["image"] for r in records}:
        with Image.open(world_dir / image) as opened:
            assert opened.size == (96, 96) and opened.mode == "RGB"


def test_normalize_answer():
    assert normalize_answer("  Yes.") == "yes"
    assert normalize_answer("Two!") == "2"
    assert normalize_answer("zero") == "0"
    assert normalize_answer("The Red") == "red"
    assert normalize_answer("a  large,  cross") == "large cross"


def test_score_and_table():
    records = [
        {"id": "a", "answer": "red", "type": "colour", "split": "in_distribution"},
        {"id": "b", "answer": "2", "type": "count", "split": "in_distribution"},
        {"id": "c", "answer": "yes", "type": "existence", "split": "holdout"},
        {"id": "d", "answer": "no", "type": "existence", "split": "holdout"},
    ]
    perfect = score(records, {"a": "Red.", "b": "two", "c": "Yes", "d": "no"})
    assert perfect["in_distribution"] == {"colour": 1.0, "count": 1.0, "overall": 1.0, "n": 2}
    assert perfect["holdout"] == {"existence": 1.0, "overall": 1.0, "n": 2}
    one_wrong = score(records, {"a": "red", "b": "2", "c": "yes", "d": "yes"})
    assert one_wrong["holdout"]["existence"] == 0.5 and one_wrong["holdout"]["overall"] == 0.5
    assert score(records, {"a": "red"})["in_distribution"]["overall"] == 0.5  # a missing prediction is wrong
    table = format_table(one_wrong)
    assert "| existence | - | 50.0 |" in table and "| overall | 100.0 | 50.0 |" in table


def test_curve_reads_the_accuracy_logged_during_training(tmp_path: Path):
    """`python -m data.shapes_eval --curve`: each variant's mean ± std over seeds at every evaluated step."""
    for seed, (a, b) in enumerate([(0.2, 0.5), (0.4, 0.7)]):
        log = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5, "eval": {"in_distribution": a, "holdout": 0.1}},
               {"step": 4, "loss": 1.0, "eval": {"in_distribution": b, "holdout": 0.3,
                                                  "in_distribution/spatial": b / 2}}]
        (tmp_path / "baseline" / f"seed{seed}").mkdir(parents=True)
        (tmp_path / "baseline" / f"seed{seed}" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    table = shapes_eval.main([str(tmp_path / "baseline"), "--curve"])
    assert table.splitlines()[2:] == ["| 2 | 30.0 ± 14.1 |", "| 4 | 60.0 ± 14.1 |"]
    holdout = shapes_eval.main([str(tmp_path / "baseline"), "--curve", "--split", "holdout"])
    assert holdout.endswith("| 4 | 30.0 ± 0.0 |")
    spatial = shapes_eval.main([str(tmp_path / "baseline"), "--curve", "--type", "spatial"])
    assert spatial.splitlines()[2:] == ["| 4 | 30.0 ± 7.1 |"]  # logged at step 4 only


def test_by_size_scores_the_questions_that_name_one_object_by_its_size(tmp_path: Path):
    """`python -m data.shapes_eval --by-size`: a question counts under the size of the one object it names."""
    objects = {"images/eval_0.png": [{"colour": "red", "shape": "circle", "size": "small"},
                                     {"colour": "blue", "shape": "circle", "size": "large"}]}
    (tmp_path / "world").mkdir()
    (tmp_path / "world" / "objects.json").write_text(json.dumps(objects))

    def asked(question: str, qtype: str, answer: str, prediction: str) -> dict:
        return {"image": "images/eval_0.png", "question": question, "type": qtype, "split": "in_distribution",
                "answer": answer, "prediction": prediction}

    predictions = [
        asked("What shape is the red object?", "shape", "circle", "circle"),  # the small circle
        asked("What shape is the blue object?", "shape", "circle", "square"),  # the large one, wrong
        asked("Is there a red circle in the image?", "existence", "yes", "Yes."),  # small, right
        asked("Is there a green square in the image?", "existence", "no", "no"),  # names nothing present
        asked("What colour is the circle?", "colour", "red", "red"),  # two circles: not one object
        asked("Which is further left, the red circle or the blue circle?", "spatial", "From the left: red circle.",
              "From the left: red circle."),  # names two
    ]
    assert shapes_eval.size_scores(predictions, objects) == {
        "in_distribution": {"shape, small": 1.0, "shape, large": 0.0, "existence, small": 1.0}}
    for seed, wrong in enumerate([False, True]):
        run = [p | {"prediction": "no"} if wrong and p["type"] == "existence" else p for p in predictions]
        (tmp_path / "A" / f"seed{seed}").mkdir(parents=True)
        (tmp_path / "A" / f"seed{seed}" / "eval_shapes.json").write_text(json.dumps({"predictions": run}))
    table = shapes_eval.main([str(tmp_path / "A"), "--by-size", "--world", str(tmp_path / "world")])
    assert "| shape, small | 100.0 ± 0.0 |" in table and "| shape, large | 0.0 ± 0.0 |" in table
    assert "| existence, small | 50.0 ± 70.7 |" in table and "| colour, small | - |" in table


def test_two_thousand_images_in_under_ten_seconds(tmp_path: Path):
    start = time.perf_counter()
    generate(tmp_path, ShapesConfig(num_train=1600, num_unlabeled=200, num_eval=200))
    assert time.perf_counter() - start < 10
    assert len(list((tmp_path / "images").glob("*.png"))) == 2000


def test_probe_finds_a_linear_code_and_not_noise():
    from data.shapes_probe import probe_accuracy

    torch.manual_seed(0)
    labels = torch.randint(0, 4, (400,))
    coded = torch.nn.functional.one_hot(labels, 4).float() @ torch.randn(4, 32) + 0.3 * torch.randn(400, 32)
    assert probe_accuracy(coded, labels) > 0.95
    assert probe_accuracy(torch.randn(400, 32), labels) < 0.45


def test_position_share_measures_the_size_of_a_cell_code():
    from data.shapes_probe import position_share

    generator = torch.Generator().manual_seed(0)
    cells = torch.arange(4000) % 16
    content, code = torch.randn(4000, 64, generator=generator), torch.randn(16, 64, generator=generator)
    code -= code.mean(0)  # what the cells share is not position
    for scale in (0.0, 0.3, 1.0):
        features = content + scale * code[cells]
        expected = (scale * code[cells]).pow(2).sum(1).mean().div(features.pow(2).sum(1).mean()).sqrt().item()
        assert abs(position_share(features, cells) - expected) < 0.01


def test_probe_reads_every_stage_of_a_tiny_model(init: Path, world: Path):
    from data.shapes_probe import probe

    results = probe(str(init), world, images=160)
    assert list(results) == ["vision tower", "projector"] + [f"llm layer {i}" for i in range(1, 5)]
    # The untrained tower's sine-cosine positions reach its output: columns are far above chance (25%).
    assert results["vision tower"]["column"] > 0.6 and results["vision tower"]["row"] > 0.6
    # Every empty cell of the untrained tower is the same background plus its position: read off perfectly.
    assert results["vision tower"]["background column"] > 0.9 and results["vision tower"]["background row"] > 0.9
    # The sine-cosine positions added to every patch are a sizeable part of the untrained tower's output.
    assert min(results["vision tower"]["background position share"], results["vision tower"]["position share"]) > 0.1


def test_named_cells_and_the_parts_of_the_image_follow_the_questions_references():
    from data.shapes_probe import named_cells, parts_of_image

    objects = [{"colour": "red", "shape": "circle", "x": 12, "y": 36}, {"colour": "blue", "shape": "square", "x": 84,
               "y": 12}, {"colour": "red", "shape": "square", "x": 36, "y": 84}]  # cells (0, 1), (3, 0), (1, 3)
    assert named_cells("Is the blue square to the left of the red circle?", objects, 24) == [[3], [4]]
    assert named_cells("What colour is the circle?", objects, 24) == [[4]]
    assert named_cells("What shape is the blue object?", objects, 24) == [[3]]
    assert named_cells("Is there a red square in the image?", objects, 24) == [[13]]
    assert named_cells("Is there a green cross in the image?", objects, 24) is None  # absent: nothing to look at
    assert named_cells("How many objects are there?", objects, 24) is None
    parts = parts_of_image([[3], [4]], objects, 24)
    assert parts[:3] == [[3], [4], [13]] and sorted(sum(parts, [])) == list(range(16))  # each token once
    assert parts_of_image([[4]], objects, 24)[:3] == [[4], [], [3, 13]]


def test_attention_probe_reproduces_each_layers_output(init: Path, world: Path):
    from data.shapes_probe import attention_shares, last_position_attention
    from nanovlm.templates import get_template, tokenize_conversation
    from nanovlm.vlm import load_pretrained

    model, tokenizer, processor = load_pretrained(str(init))
    model.eval()
    conversation = [{"from": "human", "value": "<image>\nIs the red circle to the left of the blue square?"}]
    ids, _ = tokenize_conversation(tokenizer, get_template(model.cfg.template), conversation,
                                   model.cfg.num_image_tokens(), generation_prompt=True)
    pixels = processor(Image.open(world / "images" / "eval_000000.png"))
    seen = []
    hooks = [block.self_attn.register_forward_hook(lambda m, args, out: seen.append((m, args[0], out)))
             for block in model.language_model.layers]
    probs = last_position_attention(model, ids, pixels)  # (layers, heads, T)
    for hook in hooks:
        hook.remove()
    assert probs.shape == (len(model.language_model.layers), model.cfg.llm.num_attention_heads, len(ids))
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:2]))
    for layer, (attention, x, out) in zip(probs, seen):
        v = attention.v_proj(x).view(1, len(ids), attention.n_kv, -1).transpose(1, 2)[0]  # (kv heads, T, head_dim)
        v = v.repeat_interleave(attention.n_head // attention.n_kv, dim=0)
        mixed = (layer[:, None, :] @ v).flatten()  # the heads' outputs at the last position, concatenated
        torch.testing.assert_close(attention.o_proj(mixed), out[0, -1].detach(), atol=1e-5, rtol=1e-4)

    shares = attention_shares(str(init), world, questions=4)
    assert shares["spatial"]["questions"] == 4 and "count" not in shares  # counts name no single object
    for result in shares.values():  # shares of attention, the image's part of it at most
        for layer in result["layers"]:
            parts = [layer[part] for part in ("first named", "second named", "other objects", "background")]
            assert min(parts) >= 0 and 0 < sum(parts) <= 1 + 1e-4


def test_show_draws_the_images_enlarged_and_a_model_answers(init: Path, world: Path, tmp_path: Path):
    from data.shapes_show import SCALE, model_answers, same, show

    picture = Image.open(show(world, 3, tmp_path / "truth.png")).convert("RGB")
    source = Image.open(world / "images" / "eval_000000.png").convert("RGB")
    side = SCALE * source.width
    enlarged = source.resize((side, side), Image.NEAREST)
    assert picture.crop((12, 12, 12 + side, 12 + side)).tobytes() == enlarged.tobytes()  # the first image, top left
    assert picture.width > 2 * side and picture.height > 2 * side  # two columns, two rows

    asked = [("images/eval_000000.png", "How many objects are there?"),
             ("images/eval_000001.png", "Describe the image.")]
    replies = model_answers(str(init), world, asked)
    assert len(replies) == 2 and all(isinstance(r, str) for r in replies)
    with_model = Image.open(show(world, 3, tmp_path / "model.png", str(init))).convert("RGB")
    assert with_model.tobytes() != picture.tobytes()  # the model's answers are drawn too
    assert same("A blue square and a red circle.", "A red circle and a blue square.") and same("Two.", "2")
    assert not same("A red circle.", "A red circle and a blue square.")
