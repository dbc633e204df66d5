"""A hostile user's inputs and faults (README, "What a bad input or a fault gets"): the output folder, numbers,
non-finite training, images checked up front, silent wrong results, and SIGKILL at random moments."""

import json
import random
import signal
import struct
import subprocess
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import eval as eval_script
import train_align
import train_iccc
import train_selfq
import train_sft
import train_stic
from nanovlm.benchmarks import BadBenchmarkRecord, load
from nanovlm.data import BadRecord, DataSource, LLaVADataset, collate
from nanovlm.image import ImageProcessor, load_image
from nanovlm.presets import tiny_model
from nanovlm.recipe import parse
from nanovlm.templates import get_template
from nanovlm.tokenizer import Tokenizer
from nanovlm.train import Distributed, Objective, TrainConfig, train
from nanovlm.vlm import VLM
from test_train import ENV, command, launch
from train_align import shapes_corpus

SCRIPTS = {"align": train_align, "sft": train_sft, "selfq": train_selfq, "iccc": train_iccc, "stic": train_stic}


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def sft(init, world, out, *args, data=None, script=train_sft) -> list[dict]:
    """A few steps of a train script in this process (no interpreter start-up); its metrics."""
    default = world / ("captions.json" if script is train_iccc else "instruct.json")
    script.main(["--init", str(init), "--data", str(data or default), "--out_dir", str(out),
                 "--global_batch_size", "8", "--micro_batch_size", "8", *args])
    return metrics(out)


def crashed(monkeypatch, *args, **kwargs) -> None:
    """A run that trains, then dies before it writes its finished model: its checkpoints stay."""
    def crash(*_, **__):
        raise RuntimeError("simulated crash")

    with monkeypatch.context() as patch:
        patch.setattr(VLM, "save_pretrained", crash)
        with pytest.raises(RuntimeError, match="simulated crash"):
            sft(*args, **kwargs)


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "model.safetensors")


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


# --- 1. the output folder ---------------------------------------------------------------------------------


def test_fresh_run_refuses_a_finished_or_crashed_run_unless_told(world, init, tmp_path, monkeypatch):
    finished = tmp_path / "finished"
    sft(init, world, finished, "--max_steps", "2")
    model = (finished / "model.safetensors").read_bytes()
    with pytest.raises(SystemExit, match=r"holds another run .*--resume.*--overwrite"):
        sft(init, world, finished, "--max_steps", "3", "--lr", "llm=1e-3")
    assert (finished / "model.safetensors").read_bytes() == model
    assert [r["step"] for r in metrics(finished)] == [1, 2]

    old = tmp_path / "old"  # an older run killed after step 6, then a new one with checkpoints every step
    crashed(monkeypatch, init, world, old, "--max_steps", "7", "--save_every", "3")
    with pytest.raises(SystemExit, match="holds another run"):
        sft(init, world, old, "--max_steps", "2", "--save_every", "1")
    assert sorted(p.name for p in old.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]

    sft(init, world, old, "--max_steps", "3", "--overwrite")  # told: the old run's state goes
    assert [r["step"] for r in metrics(old)] == [1, 2, 3]
    assert not list(old.glob("checkpoint-*")) and (old / "model.safetensors").is_file()


def test_resume_refuses_other_data_geometry_or_recipe_and_ignores_lr_key_order(world, init, tmp_path, monkeypatch):
    args = ["--max_steps", "5", "--save_every", "2", "--lr", "llm=1e-3,projector=2e-3"]
    sft(init, world, tmp_path / "whole", *args)
    out = tmp_path / "cut"
    crashed(monkeypatch, init, world, out, *args)
    other = tmp_path / "other.json"  # the same records but the first
    other.write_text(json.dumps(json.loads((world / "instruct.json").read_text())[1:]))
    changes = {"data": (["--image_folder", str(world)], other),
               "global_batch_size": (["--global_batch_size", "16"], None),
               "micro_batch_size": (["--micro_batch_size", "4"], None),
               "lr": (["--lr", "llm=1e-3,projector=3e-3"], None),
               "seed": (["--seed", "1"], None),
               "max_steps": (["--max_steps", "6"], None)}
    for name, (change, data) in changes.items():
        with pytest.raises(SystemExit, match="cannot resume") as error:
            sft(init, world, out, *args, *change, "--resume", data=data)
        first, *differences = str(error.value).splitlines()
        assert str(out) in first and "checkpoint-4" in first
        assert sum(f"{name}:" in line for line in differences) == 1, differences
    sft(init, world, out, *args[:-2], "--lr", "projector=2e-3,llm=1e-3", "--resume")  # the same mapping
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4, 5]
    assert_same_weights(out, tmp_path / "whole")


def test_resume_compares_the_method_settings(world, init, tmp_path, monkeypatch):
    out = tmp_path / "iccc"
    crashed(monkeypatch, init, world, out, "--max_steps", "3", "--save_every", "2", script=train_iccc)
    with pytest.raises(SystemExit, match=r"method.aug_ratio: checkpoint 0.5, now 0.25"):
        sft(init, world, out, "--max_steps", "3", "--save_every", "2", "--aug_ratio", "0.25", "--resume",
            script=train_iccc)


def test_corrupt_checkpoint_stale_temporaries_and_a_torn_log_line(world, init, tmp_path, monkeypatch, capsys):
    args = ["--max_steps", "5", "--save_every", "2"]
    sft(init, world, tmp_path / "whole", *args)
    out = tmp_path / "cut"
    crashed(monkeypatch, init, world, out, *args)
    optimizer = out / "checkpoint-4" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:1000])  # a disk that filled up, or a copy cut short
    (out / ".checkpoint-6.tmp").mkdir()  # a save killed half-way
    (out / ".checkpoint-6.tmp" / "trainable.safetensors").write_bytes(b"half")
    (out / ".model.safetensors.x1y2.tmp").write_bytes(b"half")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # killed while writing a line
    capsys.readouterr()
    sft(init, world, out, *args, "--resume")
    printed = capsys.readouterr()
    assert "checkpoint-4" in printed.out + printed.err and "corrupt" in printed.out + printed.err
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4, 5]
    assert_same_weights(out, tmp_path / "whole")
    assert not list(out.glob(".*tmp"))


# --- 2. numbers --------------------------------------------------------------------------------------------

BAD_NUMBERS = [
    ("sft", ["--max_steps", "-1"], "--max_steps", ">= 0"),
    ("sft", ["--global_batch_size", "0"], "--global_batch_size", ">= 1"),
    ("sft", ["--micro_batch_size", "-4"], "--micro_batch_size", ">= 1"),
    ("sft", ["--epochs", "0"], "--epochs", "> 0"),
    ("sft", ["--epochs", "nan"], "--epochs", "> 0"),
    ("sft", ["--epochs", "inf"], "--epochs", "> 0"),
    ("sft", ["--max_length", "0"], "--max_length", ">= 1"),
    ("sft", ["--save_every", "-1"], "--save_every", ">= 0"),
    ("sft", ["--keep_checkpoints", "0"], "--keep_checkpoints", ">= 1"),
    ("sft", ["--log_every", "0"], "--log_every", ">= 1"),
    ("sft", ["--lr", "llm=-1e-3"], "--lr", "> 0"),
    ("sft", ["--lr", "llm=0"], "--lr", "> 0"),
    ("sft", ["--lr", "llm=nan"], "--lr", "> 0"),
    ("sft", ["--lr", "projector=1e-3,llm=inf"], "--lr", "> 0"),
    ("sft", ["--warmup_ratio", "1.5"], "--warmup_ratio", "[0, 1]"),
    ("sft", ["--min_lr_ratio", "-0.5"], "--min_lr_ratio", "[0, 1]"),
    ("sft", ["--grad_clip", "0"], "--grad_clip", "> 0"),
    ("sft", ["--betas", "0.9,1.5"], "--betas", "[0, 1)"),
    ("sft", ["--weight_decay", "-0.1"], "--weight_decay", ">= 0"),
    ("sft", ["--data", "a.json:-1"], "--data", "> 0"),
    ("sft", ["--data", "a.json:nan"], "--data", "> 0"),
    ("sft", ["--data", "a.json:0"], "--data", "> 0"),
    ("sft", ["--data", "a.json:half"], "--data", "> 0"),
    ("align", ["--prototypes", "-1"], "--prototypes", ">= 0"),
    ("selfq", ["--sq_ratio", "1.5"], "--sq_ratio", "[0, 1]"),
    ("selfq", ["--sq_ratio", "nan"], "--sq_ratio", "[0, 1]"),
    ("selfq", ["--llm_lora", "0,16,0.05"], "--llm_lora", ">= 1"),
    ("selfq", ["--vit_lora", "4,8,1.0"], "--vit_lora", "[0, 1)"),
    ("iccc", ["--aug_ratio", "-0.1"], "--aug_ratio", "[0, 1]"),
    ("iccc", ["--swap_ratio", "2"], "--swap_ratio", "[0, 1]"),
    ("stic", ["--beta", "0"], "--beta", "> 0"),
    ("stic", ["--beta", "inf"], "--beta", "> 0"),
    ("stic", ["--sft_lr", "llm_lora=-1"], "--sft_lr", "> 0"),
    ("stic", ["--dpo_lora_dropout", "1"], "--dpo_lora_dropout", "[0, 1)"),
    ("stic", ["--num_sft", "0"], "--num_sft", ">= 1"),
]


@pytest.mark.parametrize("stage, argv, flag, allowed", BAD_NUMBERS)
def test_a_bad_number_is_one_line_naming_the_flag_and_its_range(stage, argv, flag, allowed):
    script = SCRIPTS[stage]
    with pytest.raises(SystemExit) as error:
        parse("", script.RECIPES, argv, getattr(script, "METHODS", None), stage=stage)
    message = str(error.value.code)
    assert flag in message and allowed in message and "\n" not in message, message


@pytest.mark.parametrize("argv, flag, allowed", [
    (["--limit", "-1"], "--limit", ">= 0"),
    (["--batch_size", "0"], "--batch_size", ">= 1"),
    (["--max_new_tokens", "0"], "--max_new_tokens", ">= 1"),
    (["--temperature", "nan"], "--temperature", ">= 0"),
])
def test_eval_refuses_bad_numbers(argv, flag, allowed, capsys):
    with pytest.raises(SystemExit):
        eval_script.parse(["some/model", *argv])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert flag in error and allowed in error, error


def test_a_run_that_would_train_no_step_never_touches_a_finished_model(world, init, tmp_path):
    out = tmp_path / "finished"
    sft(init, world, out, "--max_steps", "2")
    model = (out / "model.safetensors").read_bytes()
    for bad in (["--max_steps", "-1"], ["--epochs", "0"]):
        with pytest.raises(SystemExit, match=bad[0]):
            sft(init, world, out, *bad, "--overwrite")
    assert (out / "model.safetensors").read_bytes() == model


# --- 3. non-finite training --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(world):
    return tiny_model(shapes_corpus(world, "vicuna_v1"))


def tiny_run(world, tiny, out, objective=None, **cfg):
    model, tokenizer, processor = tiny
    data = LLaVADataset([DataSource(world / "instruct.json")], tokenizer, get_template("vicuna_v1"), processor,
                        model.cfg.num_image_tokens(), cfg.pop("max_length", 512))
    cfg = TrainConfig(out_dir=str(out), **{"global_batch_size": 8, "micro_batch_size": 8} | cfg)
    return train(cfg, objective or Objective(model), model.parameter_groups(), data, tokenizer.pad_id, Distributed())


def test_a_non_finite_gradient_is_not_applied_and_not_saved(world, tiny, tmp_path):
    model = tiny[0]
    poison = {"step": 0}
    victim = "language_model.layers.1.mlp.up_proj.weight"

    class Poisoned(Objective):
        def forward(self, batch):
            poison["step"] += 1
            return super().forward(batch)

    handle = dict(model.named_parameters())[victim].register_hook(
        lambda g: g * float("nan") if poison["step"] == 3 else g)
    out = tmp_path / "run"
    try:
        with pytest.raises(RuntimeError, match=rf"non-finite gradient at step 3 .*llm.*{victim}"):
            tiny_run(world, tiny, out, Poisoned(model), max_steps=5, save_every=1, lr={"llm": 1e-3, "projector": 1e-3})
    finally:
        handle.remove()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    saved = load_file(out / "checkpoint-2" / "trainable.safetensors")
    for name, p in model.named_parameters():  # the model holds step 2's weights, all finite
        if name in saved:
            assert torch.equal(p.detach(), saved[name]), name
    assert all(torch.isfinite(t).all() for t in saved.values())


def test_non_finite_weights_after_a_step_are_restored_and_named(world, tmp_path):
    model, tokenizer, processor = tiny = tiny_model(shapes_corpus(world, "vicuna_v1"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # AdamW multiplies each matrix by 1 - lr * weight_decay: -inf in float32, from finite settings and gradients
    with pytest.raises(RuntimeError, match=r"non-finite weights after step 1 .*projector"):
        tiny_run(world, tiny, tmp_path / "run", max_steps=3, lr={"projector": 1e30}, weight_decay=1e10)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


# --- 4. images, checked before training and evaluation start ---------------------------------------------


def png_with_size(path: Path, width: int, height: int) -> None:
    """A small PNG whose header claims width x height: a decompression bomb as far as a decoder knows."""
    Image.new("L", (8, 8)).save(path)
    data = bytearray(path.read_bytes())
    header = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + header))
    path.write_bytes(bytes(data))


@pytest.fixture
def image_folder(tmp_path):
    """One good image and one of each kind of bad one, with a record each."""
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (20, 12), (200, 10, 10)).save(folder / "good.png")
    whole = (folder / "good.png").read_bytes()
    (folder / "truncated.png").write_bytes(whole[:len(whole) // 2])
    (folder / "text.png").write_text("not an image")
    png_with_size(folder / "bomb.png", 100_000, 100_000)
    Image.new("RGB", (30_000, 20)).save(folder / "strip.png")
    Image.effect_noise((64, 64), 50).convert("RGB").save(folder / "photo.jpg", quality=90)
    jpeg = (folder / "photo.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(jpeg[:len(jpeg) // 2])
    return folder


BAD_IMAGES = ["truncated.png", "text.png", "bomb.png", "strip.png", "truncated.jpg"]


def record(image, i: int = 0) -> dict:
    return {"id": str(i), "image": image, "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is the circle?"}, {"from": "gpt", "value": "red"}]}


def dataset(path: Path, records: list, tokenizer_dir: Path, **kwargs) -> LLaVADataset:
    path.write_text(json.dumps(records))
    return LLaVADataset([DataSource(path, 1.0, kwargs.pop("image_folder", None))], Tokenizer.from_dir(tokenizer_dir),
                        get_template("vicuna_v1"), ImageProcessor(size=14, crop_size=14), 4,
                        kwargs.pop("max_length", 512), **kwargs)


@pytest.mark.parametrize("bad", BAD_IMAGES)
def test_a_bad_image_stops_the_run_before_training_with_its_record(image_folder, llama_tokenizer_dir, bad):
    records = [record("good.png", 0), record(bad, 1), record("good.png", 2)]
    with pytest.raises(BadRecord, match=rf"data.json record 1: .*{bad}"):
        dataset(image_folder / "data.json", records, llama_tokenizer_dir)


def test_bad_images_are_skipped_and_counted_up_front(image_folder, llama_tokenizer_dir):
    records = [record(name, i) for i, name in enumerate(["good.png", "photo.jpg", *BAD_IMAGES])]
    data = dataset(image_folder / "data.json", records, llama_tokenizer_dir, skip_bad=True)
    assert len(data) == 2 and sum(data.skipped.values()) == len(BAD_IMAGES)
    assert all(data[i] is not None for i in range(len(data)))  # nothing left to fail mid-run


def test_the_image_check_is_cached_by_size_and_mtime(image_folder, llama_tokenizer_dir, monkeypatch):
    from nanovlm import image_check

    records = [record(name, i) for i, name in enumerate(["good.png", "photo.jpg", *BAD_IMAGES])]
    dataset(image_folder / "data.json", records, llama_tokenizer_dir, skip_bad=True)
    checked = []
    original = image_check.check_image
    monkeypatch.setattr(image_check, "check_image", lambda path: checked.append(Path(path).name) or original(path))
    again = dataset(image_folder / "data.json", records, llama_tokenizer_dir, skip_bad=True)
    assert checked == [] and len(again) == 2  # a second run decodes nothing
    Image.new("RGB", (20, 12), (0, 200, 0)).save(image_folder / "truncated.png")  # repaired: new size and mtime
    repaired = dataset(image_folder / "data.json", records, llama_tokenizer_dir, skip_bad=True)
    assert checked == ["truncated.png"] and len(repaired) == 3


@pytest.mark.parametrize("image, message", [
    (5, "image must be a path"), (["a.png", "b.png"], "image must be a path"), ("", "image must be a path"),
    ("../outside.png", "image .* is outside the image folder"), ("ABSOLUTE", "image .* is outside the image folder"),
])
def test_image_fields_must_be_paths_inside_the_image_folder(tmp_path, llama_tokenizer_dir, image, message):
    folder = tmp_path / "data"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    image = str(tmp_path / "outside.png") if image == "ABSOLUTE" else image
    with pytest.raises(BadRecord, match=f"record 0: {message}"):
        dataset(folder / "data.json", [record(image)], llama_tokenizer_dir)
    if "outside" in message:  # the user may allow it
        data = dataset(folder / "data.json", [record(image)], llama_tokenizer_dir, allow_absolute_image_paths=True)
        assert data[0]["pixel_values"] is not None


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_high_bit_depth_images_are_scaled_not_saturated(tmp_path, mode):
    ramp = torch.linspace(0, 1, 256).repeat(8, 1).numpy()
    values = {"I;16": (ramp * 65535).astype("uint16"), "I": (ramp * 65535).astype("int32"), "F": ramp.astype("float32")}
    image = Image.fromarray(values[mode])
    assert image.mode == mode
    path = tmp_path / ("ramp.png" if mode == "I;16" else "ramp.tif")  # PNG holds 16 bits, TIFF 32
    image.save(path)
    rgb = torch.tensor(np.asarray(load_image(path))[0, :, 0], dtype=torch.float32)
    assert (rgb - torch.from_numpy(ramp[0]) * 255).abs().max() <= 1, rgb


def test_a_bad_benchmark_image_is_named_before_evaluation(image_folder):
    lines = [{"question_id": i, "image": name, "question": "What colour?", "answers": ["red"]}
             for i, name in enumerate(["good.png", "truncated.jpg"])]
    path = image_folder / "bench.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(BadBenchmarkRecord, match=r"bench.jsonl:2: .*truncated.jpg"):
        load("vqa", path)


# --- 5. silent wrong results -------------------------------------------------------------------------------


def test_a_record_whose_answer_is_cut_away_is_dropped_and_counted(tmp_path, llama_tokenizer_dir):
    Image.new("RGB", (8, 8)).save(tmp_path / "img.png")
    long_question = {"id": "1", "image": "img.png", "conversations": [
        {"from": "human", "value": "<image>\n" + "Describe every detail of the picture please. " * 20},
        {"from": "gpt", "value": "red"}]}
    records = [record("img.png"), long_question]
    length = len(dataset(tmp_path / "data.json", records, llama_tokenizer_dir)[0]["input_ids"])
    data = dataset(tmp_path / "data.json", records, llama_tokenizer_dir, max_length=length)  # the first one fits
    assert data[0] is not None and data[1] is None
    assert collate([data[0], data[1]], pad_id=0)["skipped"] == 1


def test_a_step_without_target_tokens_is_an_error(world, tiny, tmp_path):
    # 20 tokens hold the system prompt and part of the question, never an answer
    with pytest.raises(RuntimeError, match="step 1 has no target tokens"):
        tiny_run(world, tiny, tmp_path / "run", max_steps=2, max_length=20, lr={"projector": 1e-3})
    assert not (tmp_path / "run" / "checkpoint-1").exists()


@pytest.mark.parametrize("change, message", [
    ({"image": ""}, "image must be a path"), ({"image": None}, "image must be a path"),
    ({"question": 5}, "question must be a non-empty string"), ({"question": " "}, "question must be a non-empty"),
])
def test_bad_evaluation_records_are_named(image_folder, change, message):
    line = {"question_id": 0, "image": "good.png", "question": "What colour?", "answers": ["red"]} | change
    path = image_folder / "bench.jsonl"
    path.write_text(json.dumps(line) + "\n")
    with pytest.raises(BadBenchmarkRecord, match=f"bench.jsonl:1: {message}"):
        load("vqa", path)
    path.write_text("\n")
    with pytest.raises(BadBenchmarkRecord, match="bench.jsonl: no records"):
        load("vqa", path)


def test_eval_shapes_reads_the_data_file_it_is_given(world, init, tmp_path):
    few = tmp_path / "few.json"  # three questions, in a folder without eval.json, images by absolute path
    records = json.loads((world / "eval.json").read_text())[:3]
    few.write_text(json.dumps([r | {"image": str(world / r["image"])} for r in records]))
    out = tmp_path / "scores.json"
    eval_script.main([str(init), "--task", "shapes", "--data", str(few), "--allow_absolute_image_paths", "--out",
                      str(out), "--max_new_tokens", "2"])
    assert [p["id"] for p in json.loads(out.read_text())["predictions"]] == [r["id"] for r in records]


def test_a_missing_local_folder_is_named_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    from nanovlm.checkpoint import resolve

    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    for name in ("out/tiny/sft", "out/sft", "./sft", str(tmp_path / "sft")):
        with pytest.raises(FileNotFoundError, match=f"no folder {name}"):
            resolve(name)


def test_periodic_checkpoints_are_on_by_default_and_survive_a_crash(world, tiny, tmp_path):
    assert TrainConfig().save_every > 0
    for script in SCRIPTS.values():
        assert all(cfg.save_every == TrainConfig().save_every for cfg in script.RECIPES.values())
    model = tiny[0]

    class Crashing(Objective):
        calls = 0

        def forward(self, batch):
            Crashing.calls += 1
            if Crashing.calls == 4:
                raise RuntimeError("out of memory, say")
            return super().forward(batch)

    with pytest.raises(RuntimeError, match="out of memory"):
        tiny_run(world, tiny, tmp_path / "run", Crashing(model), max_steps=6, save_every=2, lr={"projector": 1e-3})
    assert [p.name for p in (tmp_path / "run").glob("checkpoint-*")] == ["checkpoint-2"]
    assert torch.isfinite(torch.cat([t.flatten() for t in load_file(
        tmp_path / "run" / "checkpoint-2" / "trainable.safetensors").values()])).all()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_run_saves_a_checkpoint_and_says_how_to_resume(world, init, tmp_path, sig):
    out = tmp_path / "run"
    args = ["--max_steps", "12", "--micro_batch_size", "8"]
    victim = launch(init, world, out, *args, wait=False)
    deadline = time.time() + 120
    while victim.poll() is None and time.time() < deadline:
        if (out / "metrics.jsonl").is_file() and len((out / "metrics.jsonl").read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    victim.send_signal(sig)
    stderr = victim.communicate(timeout=120)[1].decode()
    assert victim.returncode == 128 + sig, stderr[-2000:]
    [checkpoint] = out.glob("checkpoint-*")
    step = int(checkpoint.name.split("-")[1])
    assert 3 <= step < 12 and "--resume" in stderr, stderr[-2000:]
    resumed = launch(init, world, out, *args, "--resume")
    assert [r["step"] for r in resumed] == list(range(1, 13))


# --- SIGKILL at random moments -----------------------------------------------------------------------------


def newest_checkpoint(out: Path) -> int:
    return max((int(p.name.split("-")[1]) for p in out.glob("checkpoint-*")), default=0)


@pytest.mark.slow
def test_sigkill_at_ten_random_moments_ends_with_the_uninterrupted_weights(world, init, tmp_path):
    """The same command with --resume, killed ten times: in start-up after a random delay, in a step (a random
    moment after a checkpoint), in a save (as soon as a checkpoint's temporary folder appears), and last while
    it writes the finished model; then run to the end. The result is the uninterrupted run's model, bit for bit,
    with no temporary left behind."""
    args = ["--max_steps", "30", "--save_every", "1", "--global_batch_size", "8", "--micro_batch_size", "8"]
    launch(init, world, tmp_path / "whole", *args)
    out, rng, moments = tmp_path / "cut", random.Random(19), []
    line = ["--init", str(init), "--data", str(world / "instruct.json"), "--out_dir", str(out), *args, "--resume"]
    for kill in range(10):
        moment = "final write" if kill == 9 else ("start-up", "step", "save")[kill % 3]
        victim = subprocess.Popen(command("train_sft.py", *line), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  env=ENV)
        start, saved, delay = time.time(), newest_checkpoint(out), rng.uniform(0.2, 3.0)
        while victim.poll() is None and time.time() - start < 120:
            if moment == "start-up" and time.time() - start > delay:
                break
            if moment == "step" and newest_checkpoint(out) > saved:
                time.sleep(rng.uniform(0.0, 0.4))
                break
            if moment == "save" and list(out.glob(".checkpoint-*.tmp")):
                break
            if moment == "final write" and list(out.glob(".model.safetensors.*.tmp")):
                break
            time.sleep(0.001)
        victim.send_signal(signal.SIGKILL)
        stderr = victim.communicate()[1].decode()
        assert victim.returncode == -signal.SIGKILL, (moment, stderr[-3000:])
        moments.append((moment, saved, newest_checkpoint(out)))
    run = subprocess.run(command("train_sft.py", *line), capture_output=True, text=True, env=ENV, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert [r["step"] for r in metrics(out)] == list(range(1, 31)), moments
    assert_same_weights(out, tmp_path / "whole")
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_dataloader_workers_ignore_interrupts():
    """Ctrl-C reaches every process of the terminal's group: the loop's workers must leave it to the loop."""
    from nanovlm.train import ignore_interrupts

    ignore_interrupts(0)
    try:
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN == signal.getsignal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
