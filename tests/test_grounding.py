"""Grounding as text: box parsing, IoU, Acc@0.5 on hand-made cases, padded-square coordinates, bad input."""

import json
import math

import numpy as np
import pytest
from PIL import Image

from nanovlm.benchmarks import BadBenchmarkRecord, load, prompt
from nanovlm.grounding import format_box, format_table, iou, is_valid, parse_box, score, square_box
from nanovlm.image import expand_to_square


@pytest.mark.parametrize("text, box", [
    ("[0.12, 0.40, 0.31, 0.62]", (0.12, 0.40, 0.31, 0.62)),
    ("It is at [0.1,0.2,0.3,0.4].", (0.1, 0.2, 0.3, 0.4)),
    ("<p>Two circles</p> [0.1,0.2,0.3,0.4;0.5,0.5,0.6,0.6] and <p>a cross</p> [0.7,0.7,0.9,0.9]", (0.1, 0.2, 0.3, 0.4)),
    ("[left] then [0.1, 0.2, 0.3, 0.4]", (0.1, 0.2, 0.3, 0.4)),
    ("[1, 2, 3, 4]", (1.0, 2.0, 3.0, 4.0)),  # parsed; is_valid rejects it
    ("a red circle", None), ("[0.1, 0.2, 0.3]", None), ("[0.1, 0.2, 0.3, 0.4", None), ("", None),
    ("[a, b, c, d]", None),
])
def test_parse_box(text, box):
    assert parse_box(text) == box


def test_parse_box_reads_nan_and_infinity_and_validity_rejects_them():
    parsed = parse_box("[nan, 0.1, 0.2, 0.3]")
    assert math.isnan(parsed[0]) and not is_valid(parsed)
    assert not is_valid(parse_box("[0.1, 0.1, inf, 0.3]"))
    assert is_valid((0.0, 0.0, 1.0, 1.0)) and is_valid([0, 0.5, 1, 0.75])
    for bad in ((0.5, 0.1, 0.4, 0.3), (0.1, 0.1, 0.1, 0.3), (-0.1, 0.1, 0.5, 0.5), (0.1, 0.1, 1.2, 0.5),
                (0.1, 0.2, 0.3), "0.1, 0.2, 0.3, 0.4", (True, 0.1, 0.5, 0.5), None, ("0.1", 0.1, 0.5, 0.5)):
        assert not is_valid(bad), bad


def test_iou_by_hand():
    assert iou((0.1, 0.1, 0.5, 0.5), (0.1, 0.1, 0.5, 0.5)) == 1.0
    assert iou((0.0, 0.0, 0.5, 0.5), (0.25, 0.0, 0.75, 0.5)) == pytest.approx(0.125 / 0.375)
    assert iou((0.0, 0.0, 0.2, 0.2), (0.5, 0.5, 0.7, 0.7)) == 0.0
    assert iou((0.0, 0.0, 0.2, 0.2), (0.2, 0.0, 0.4, 0.2)) == 0.0  # touching edges
    assert iou((0.0, 0.0, 1.0, 1.0), (0.0, 0.0, 0.5, 0.5)) == pytest.approx(0.25)


def test_accuracy_at_half_iou_with_groups_and_bad_answers():
    truth = [0.2, 0.2, 0.4, 0.4]
    records = [{"box": truth, "size": "small", "objects": 1}, {"box": truth, "size": "small", "objects": 2},
               {"box": truth, "size": "large", "objects": 2}, {"box": truth, "size": "large", "objects": 2},
               {"box": truth, "size": "large", "objects": 3}, {"box": truth, "size": "large", "objects": 3},
               {"box": truth, "size": "large", "objects": 3}]
    predictions = [
        "[0.20, 0.20, 0.40, 0.40]",  # exact: right
        "[0.22, 0.20, 0.42, 0.40]",  # IoU 0.18 / 0.22 = 0.82: right
        "[0.30, 0.20, 0.50, 0.40]",  # IoU 1/3: wrong
        "a red circle",  # no box: wrong, invalid
        "[0.20, 0.20, 1.40, 0.40]",  # outside the image: wrong, invalid
        "[nan, 0.20, 0.40, 0.40]",  # NaN: wrong, invalid
        "[0.40, 0.40, 0.20, 0.20]",  # empty: wrong, invalid
    ]
    scores = score(records, predictions)
    assert scores["overall"]["accuracy"] == pytest.approx(2 / 7) and scores["overall"]["invalid"] == 4
    assert scores["overall"]["n"] == 7
    assert scores["overall"]["mean_iou"] == pytest.approx((1 + 0.18 / 0.22 + 1 / 3) / 7)
    assert scores["size"]["small"] == {"accuracy": 1.0, "mean_iou": pytest.approx((1 + 0.18 / 0.22) / 2),
                                       "invalid": 0, "n": 2}
    assert scores["size"]["large"]["accuracy"] == 0.0 and scores["size"]["large"]["invalid"] == 4
    assert {k: v["accuracy"] for k, v in scores["objects"].items()} == {"1": 1.0, "2": pytest.approx(1 / 3), "3": 0.0}
    assert "split" not in scores
    table = format_table(scores)
    assert "| overall | 28.6 |" in table and "| size small | 100.0 |" in table and "| objects 3 | 0.0 |" in table


def test_square_box_matches_the_padded_image():
    """A rectangle drawn on a wide and on a tall image lands, after LLaVA's pad-to-square, exactly where
    square_box says."""
    for width, height in ((30, 20), (20, 31)):
        image = Image.new("RGB", (width, height), (0, 0, 0))
        x, y, w, h = 5, 3, 10, 6
        image.paste((255, 0, 0), (x, y, x + w, y + h))
        padded = expand_to_square(image, (9, 9, 9))
        side = padded.width
        rows, columns = np.nonzero(np.all(np.asarray(padded) == (255, 0, 0), axis=-1))
        found = (columns.min(), rows.min(), columns.max() + 1, rows.max() + 1)
        assert tuple(v * side for v in square_box(x, y, w, h, width, height)) == pytest.approx(found)


def test_box_text_formats():
    assert format_box((0.123, 0.4, 0.31, 0.625)) == "[0.12, 0.40, 0.31, 0.62]"
    assert format_box((0.1, 0.2, 0.3, 0.4), compact=True) == "[0.10,0.20,0.30,0.40]"
    assert parse_box(format_box((0.1, 0.2, 0.3, 0.4), compact=True)) == (0.1, 0.2, 0.3, 0.4)


@pytest.mark.parametrize("box, shown", [
    ([0.1, 0.2, 0.3], "[0.1, 0.2, 0.3]"), ([0.5, 0.2, 0.1, 0.6], "[0.5, 0.2, 0.1, 0.6]"),
    ([0.1, 0.2, 1.5, 0.6], "1.5"), ("[0.1, 0.2, 0.3, 0.4]", "'[0.1, 0.2, 0.3, 0.4]'"), (None, "None"),
    ([float("nan"), 0.2, 0.3, 0.4], "nan"),
])
def test_a_benchmark_line_with_a_malformed_box_is_named(tmp_path, box, shown):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    good = {"id": "0", "image": "a.png", "expression": "the red circle", "box": [0.1, 0.2, 0.3, 0.4]}
    path = tmp_path / "grounding.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(good | {"id": "1", "box": box}) + "\n")
    with pytest.raises(BadBenchmarkRecord, match=r"grounding.jsonl:2: box must be \[x1, y1, x2, y2\]") as error:
        load("grounding", path)
    assert shown in str(error.value)
    path.write_text(json.dumps(good | {"expression": ""}) + "\n")
    with pytest.raises(BadBenchmarkRecord, match="grounding.jsonl:1: .*expression a non-empty string"):
        load("grounding", path)


def test_grounding_prompt_is_the_referring_expression_instruction():
    record = {"image": "a.png", "expression": "the small red circle"}
    assert prompt("grounding", record) == ("<image>\nPlease provide the bounding box coordinate of the region this "
                                           "sentence describes: the small red circle.")
