"""The LLaVA data pipeline: bad records named by file and index, truncation, padding, the batch plan."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from nanovlm.data import BadRecord, DataSource, LLaVADataset, batch_geometry, collate, step_batches, truncate
from nanovlm.image import ImageProcessor
from nanovlm.templates import get_template
from nanovlm.tokenizer import Tokenizer

N_IMAGE = 4


def good_record(i: int) -> dict:
    return {"id": str(i), "image": "img.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is the circle?"}, {"from": "gpt", "value": "red"},
        {"from": "human", "value": "How many objects?"}, {"from": "gpt", "value": "two"}]}


@pytest.fixture
def make_dataset(tmp_path, llama_tokenizer_dir):
    Image.new("RGB", (20, 12), (200, 10, 10)).save(tmp_path / "img.png")
    tokenizer = Tokenizer.from_dir(llama_tokenizer_dir)

    def make(records, skip_bad=False, max_length=512, weight=1.0, raw=None):
        path = tmp_path / "data.json"
        path.write_text(raw if raw is not None else json.dumps(records))
        return LLaVADataset([DataSource(path, weight)], tokenizer, get_template("vicuna_v1"),
                            ImageProcessor(size=14, crop_size=14), N_IMAGE, max_length, skip_bad=skip_bad)
    return make


BAD = {
    "missing image": (lambda r: r | {"image": "nope.png"}, "nope.png does not exist"),
    "not alternating": (lambda r: r | {"conversations": r["conversations"][:1] * 2 + r["conversations"][1:2]},
                        "turn 1: expected a 'gpt' turn"),
    "no answer at the end": (lambda r: r | {"conversations": r["conversations"][:3]}, "ends with a human turn"),
    "empty answer": (lambda r: r | {"conversations": r["conversations"][:1] + [{"from": "gpt", "value": " "}]},
                     "turn 1 has an empty answer"),
    "no conversations": (lambda r: {"id": "x", "image": "img.png"}, "not an object with 'conversations'"),
    "image without placeholder": (lambda r: r | {"conversations": [{"from": "human", "value": "Hi"},
                                                                   {"from": "gpt", "value": "Hello"}]},
                                  "exactly one <image>"),
    "placeholder without image": (lambda r: {k: v for k, v in r.items() if k != "image"}, "<image> in a record"),
}


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_record_is_named_by_file_and_index(make_dataset, kind):
    change, message = BAD[kind]
    records = [good_record(0), good_record(1), change(good_record(2))]
    with pytest.raises(BadRecord) as e:
        make_dataset(records)
    assert "data.json record 2" in str(e.value) and message in str(e.value)


def test_bad_records_can_be_skipped_and_counted(make_dataset):
    records = [good_record(0)] + [change(good_record(i)) for i, (change, _) in enumerate(BAD.values())]
    data = make_dataset(records, skip_bad=True)
    assert len(data) == 1 and sum(data.skipped.values()) == len(BAD)


def test_malformed_json_file_is_named(make_dataset):
    with pytest.raises(ValueError, match="data.json"):
        make_dataset(None, raw="[{\"id\": 1,")


def test_image_spoilt_after_the_check_is_named_when_loaded(make_dataset, tmp_path):
    data, skipping = make_dataset([good_record(0)]), make_dataset([good_record(0)], skip_bad=True)
    (tmp_path / "img.png").write_bytes(b"not a png")  # after the up-front check passed it
    with pytest.raises(BadRecord, match="data.json record 0.*img.png"):
        data[0]
    assert skipping[0] is None


def test_sample_has_image_tokens_pixels_and_answer_labels(make_dataset):
    sample = make_dataset([good_record(0)])[0]
    image_id = make_dataset([good_record(0)]).tokenizer.image_token_id
    assert sample["input_ids"].count(image_id) == N_IMAGE
    assert sample["pixel_values"].shape == (1, 3, 14, 14)
    labelled = [t for t, label in zip(sample["input_ids"], sample["labels"]) if label != -100]
    tokenizer = make_dataset([good_record(0)]).tokenizer
    assert tokenizer.decode(labelled).split() == ["red", "two"]


def test_weights_draw_a_seeded_share_of_a_file(make_dataset):
    records = [good_record(i) for i in range(10)]
    assert len(make_dataset(records, weight=2.0)) == 20
    half = make_dataset(records, weight=0.5)
    assert len(half) == 5 and len({r[0]["id"] for r in half.records}) == 5


def test_truncation_never_cuts_through_an_image():
    img = 9
    ids = [1, 2] + [img] * 4 + [3, 4] + [img] * 4 + [5, 6]
    labels = list(range(len(ids)))
    pixels = torch.zeros(2, 3, 4, 4)
    for max_length, kept_images, length in [(100, 2, 14), (12, 2, 12), (11, 1, 8), (9, 1, 8), (5, 0, 2), (3, 0, 2)]:
        out = truncate(ids, labels, pixels, max_length, img, 4)
        assert len(out["input_ids"]) == length, max_length
        assert out["input_ids"].count(img) == 4 * kept_images
        assert (0 if out["pixel_values"] is None else len(out["pixel_values"])) == kept_images
        assert out["labels"] == labels[:length]


def test_collate_pads_right_with_ignored_labels():
    samples = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "pixel_values": None},
               {"input_ids": [1, 2], "labels": [-100, 5], "pixel_values": torch.ones(1, 3, 2, 2)}, None]
    batch = collate(samples, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [1, 2, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [-100, 5, -100]]
    assert batch["pixel_values"].shape == (1, 3, 2, 2) and batch["skipped"] == 1


@pytest.mark.parametrize("world,micro", [(1, 8), (2, 4), (4, 2), (2, 2)])
def test_every_world_size_sees_the_same_records_per_step(world, micro):
    lengths = [(i * 7) % 13 for i in range(100)]
    single = step_batches(100, batch_geometry(16, 16, 1), 0, epoch=3, seed=5)
    plans = [step_batches(100, batch_geometry(16, micro, world), r, epoch=3, seed=5, lengths=lengths)
             for r in range(world)]
    assert len(single) == 6 == len(plans[0])
    for step, chosen in enumerate(single):
        union = sorted(i for plan in plans for mb in plan[step] for i in mb)
        assert union == sorted(chosen[0])
        for plan in plans:  # grouped by length: each micro-batch is a run of the step's sorted lengths
            for mb in plan[step]:
                assert [lengths[i] for i in mb] == sorted((lengths[i] for i in mb), reverse=True)
    assert step_batches(100, batch_geometry(16, 16, 1), 0, epoch=4, seed=5) != single


@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_batch_geometry_fits_any_world_size_that_divides_the_global_batch(world):
    for global_batch, micro in [(32, 32), (128, 16), (256, 32), (24, 5), (48, 7)]:
        if global_batch % world:
            with pytest.raises(ValueError, match=rf"{global_batch} records cannot be split over {world} processes"):
                batch_geometry(global_batch, micro, world)
            continue
        g = batch_geometry(global_batch, micro, world)
        per_process = global_batch // world
        assert g.world_size * g.micro_batch * g.accumulation == global_batch and g.micro_batch <= micro
        # the fewest accumulation steps under the micro-batch bound: one fewer would need a larger micro-batch
        assert all(per_process % a or per_process // a > micro for a in range(1, g.accumulation))
    assert (batch_geometry(32, 32, 8).micro_batch, batch_geometry(32, 32, 8).accumulation) == (4, 1)
    assert (batch_geometry(24, 5, 2).micro_batch, batch_geometry(24, 5, 2).accumulation) == (4, 3)


def test_impossible_split_names_a_global_batch_that_works():
    with pytest.raises(ValueError) as error:
        batch_geometry(32, 32, 3)
    message = str(error.value)
    assert "--global_batch_size 33 or 30" in message and "--nproc_per_node in [1, 2, 4, 8, 16]" in message


def test_image_folder_can_differ_from_the_json_folder(tmp_path, llama_tokenizer_dir):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "img.png")
    path = tmp_path / "d.json"
    path.write_text(json.dumps([good_record(0)]))
    data = LLaVADataset([DataSource(path, 1.0, Path(tmp_path / "images"))], Tokenizer.from_dir(llama_tokenizer_dir),
                        get_template("vicuna_v1"), ImageProcessor(size=14, crop_size=14), N_IMAGE, 512)
    assert data[0]["pixel_values"] is not None
