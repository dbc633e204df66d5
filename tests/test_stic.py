"""STIC: the DPO objective against its formula, the image corruptions, every pass seeing the image, preference
generation sharded and resumed, bad input, and train_stic.py on the tiny preset and on a llava-hf checkpoint."""

import json
import math
import random
import shutil
import signal
import subprocess
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import eval as eval_script
import hub_models
import train_stic
from nanovlm.data import BadRecord
from nanovlm.dpo import ALPHA, BETA, DPOObjective, PreferenceDataset, dpo_loss, sequence_logps
from nanovlm.generate import Sampling
from nanovlm.image import ImageProcessor, load_image
from nanovlm.lora import adapters_disabled, add_lora, lora_layers
from nanovlm.stic import (
    PAPER_PROMPTS,
    colour_jitter,
    corrupt,
    describe_and_respond,
    downscale,
    infuse,
    make_descriptions,
    make_preferences,
)
from nanovlm.templates import IGNORE_INDEX, get_template, tokenize_conversation
from nanovlm.tokenizer import Tokenizer
from nanovlm.train import Distributed, TrainConfig, train
from nanovlm.vlm import VLM, load_pretrained
from test_train import ENV, command, run_script

LLM_TARGETS = train_stic.LLM_TARGETS


def write_pairs(world: Path, path: Path, n: int = 8) -> Path:
    """n preference pairs on the world's training images: its caption preferred, another image's rejected."""
    captions = json.loads((world / "captions.json").read_text())
    lines = [{"image": captions[i]["image"], "prompt": "Describe the image.",
              "chosen": captions[i]["conversations"][1]["value"],
              "rejected": captions[i + n]["conversations"][1]["value"]} for i in range(n)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def adapted_model(init: Path, r: int = 4) -> tuple[VLM, Tokenizer, ImageProcessor]:
    model, tokenizer, processor = load_pretrained(str(init))
    torch.manual_seed(0)
    add_lora(model.language_model, LLM_TARGETS, r, 2.0 * r, 0.0)
    return model, tokenizer, processor


def pair_batch(world, init, tmp_path, n=4):
    model, tokenizer, processor = adapted_model(init)
    pairs = PreferenceDataset(write_pairs(world, tmp_path / "pairs.jsonl", n), world, tokenizer,
                              get_template(model.cfg.template), processor, model.cfg.num_image_tokens(), 512)
    return model, tokenizer, processor, pairs, pairs.collate([pairs[i] for i in range(n)], tokenizer.pad_id)


def test_dpo_loss_is_the_formula():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-50 * torch.rand(16, generator=g, dtype=torch.float64) for _ in range(4))
    loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.1, alpha=1 / 1024)
    for i in range(16):
        z = 0.1 * ((pc[i] - rc[i]) - (pr[i] - rr[i])).item()
        expected = -math.log(1 / (1 + math.exp(-z))) - pc[i].item() / 1024
        assert loss[i].item() == pytest.approx(expected, rel=1e-12, abs=1e-12)
        assert chosen[i].item() == pytest.approx(0.1 * (pc[i] - rc[i]).item())
        assert rejected[i].item() == pytest.approx(0.1 * (pr[i] - rr[i]).item())
    assert (BETA, ALPHA) == (0.1, 1 / 1024)


def test_at_initialisation_the_reference_is_the_policy_and_the_loss_log_2_minus_the_nll(world, init, tmp_path):
    model, _, _, _, batch = pair_batch(world, init, tmp_path)
    objective = DPOObjective(model)
    loss = objective(batch)
    ids, labels, pixels = batch["input_ids"], batch["labels"], batch["pixel_values"]
    with torch.no_grad():
        policy = sequence_logps(model, ids, labels, pixels)
        with adapters_disabled(model):
            reference = sequence_logps(model, ids, labels, pixels)
    assert torch.equal(policy, reference) and objective.count(batch) == 4
    assert loss.item() == pytest.approx(4 * math.log(2) - ALPHA * policy[:4].sum().item(), rel=1e-6)
    assert objective.metrics()["reward_margin"] == 0 and objective.metrics()["reward_accuracy"] == 0


def token_logps_by_hand(model: VLM, tokenizer, template, image, prompt: str, answer: str, processor) -> float:
    """log pi(answer | image, prompt) from the full logits of one unpadded sequence, position by position."""
    conversation = [{"from": "human", "value": f"<image>\n{prompt}"}, {"from": "gpt", "value": answer}]
    ids, labels = tokenize_conversation(tokenizer, template, conversation, model.cfg.num_image_tokens())
    logits = model(torch.tensor([ids]), processor(image)[None])[0].log_softmax(-1)
    return sum(logits[t - 1, ids[t]].item() for t in range(1, len(ids)) if labels[t] != IGNORE_INDEX)


def test_both_terms_are_the_log_probabilities_of_the_answers_own_tokens(world, init, tmp_path):
    """The released trainer scores y_l with the model's own top tokens; here each term is the answer's log-prob,
    checked against a position-by-position computation with the adapters trained (B != 0)."""
    model, tokenizer, processor, pairs, batch = pair_batch(world, init, tmp_path, n=3)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_(std=0.2, generator=g)
    template = get_template(model.cfg.template)
    objective = DPOObjective(model)
    with torch.no_grad():
        loss = objective(batch)
        by_hand = {}
        for disabled in (False, True):
            with adapters_disabled(model) if disabled else nullcontext():
                by_hand[disabled] = [[token_logps_by_hand(model, tokenizer, template, load_image(world / r["image"]),
                                                          r["prompt"], r[side], processor)
                                      for r, _ in pairs.pairs] for side in ("chosen", "rejected")]
    (pc, pr), (rc, rr) = (torch.tensor(by_hand[False], dtype=torch.float64),
                          torch.tensor(by_hand[True], dtype=torch.float64))
    assert not torch.allclose(pr, rr)  # the adapters matter
    expected, chosen, rejected = dpo_loss(pc, pr, rc, rr)
    assert loss.item() == pytest.approx(expected.sum().item(), rel=1e-5)
    assert objective.metrics()["rejected_logp"] == pytest.approx(pr.sum().item(), rel=1e-5)
    assert objective.metrics()["chosen_logp"] == pytest.approx(pc.sum().item(), rel=1e-5)
    # the margin is a small difference of four float32 sums of log-probs: it is as exact as they are (about one
    # float32 rounding of their size), not relative to itself
    float32_error = torch.finfo(torch.float32).eps * BETA * sum(t.abs().sum().item() for t in (pc, pr, rc, rr))
    assert objective.metrics()["reward_margin"] == pytest.approx((chosen - rejected).sum().item(), abs=float32_error)


def test_one_optimizer_step_raises_the_margin(world, init, tmp_path):
    model, _, _, _, batch = pair_batch(world, init, tmp_path)
    objective = DPOObjective(model)
    params = [p for n, p in model.named_parameters() if ".lora_" in n]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    before = objective(batch)
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = objective(batch)
    assert objective.metrics()["reward_margin"] > 0 and objective.metrics()["reward_accuracy"] > 0
    assert after < before


def test_the_shared_loop_logs_rewards_summed_over_micro_batches(world, init, tmp_path):
    runs = {}
    for micro in (8, 4):
        model, tokenizer, processor = adapted_model(init)
        pairs = PreferenceDataset(write_pairs(world, tmp_path / "pairs.jsonl"), world, tokenizer,
                                  get_template(model.cfg.template), processor, model.cfg.num_image_tokens(), 512)
        cfg = TrainConfig(out_dir=str(tmp_path / f"micro{micro}"), global_batch_size=8, micro_batch_size=micro,
                          max_steps=3, lr={"llm_lora": 1e-3})
        train(cfg, DPOObjective(model), model.parameter_groups(), pairs, tokenizer.pad_id, Distributed())
        runs[micro] = [json.loads(line) for line in (tmp_path / f"micro{micro}" / "metrics.jsonl").open()]
    first, last = runs[8][0], runs[8][-1]
    assert first["targets"] == 8 and first["reward_margin"] == 0 and first["reward_accuracy"] == 0
    assert last["reward_margin"] > 0 and last["reward_accuracy"] > 0.5  # the same 8 pairs, two updates later
    for a, b in zip(runs[8], runs[4]):
        for name in ("loss", "reward_margin", "chosen_reward", "rejected_reward", "reward_accuracy", "chosen_logp"):
            assert a[name] == pytest.approx(b[name], rel=1e-4, abs=1e-6), name


def colourful(width: int = 96, height: int = 64) -> Image.Image:
    rng = np.random.default_rng(0)
    pixels = np.zeros((height, width, 3), np.uint8)
    for _ in range(12):  # coloured rectangles on black: edges and saturated hues
        x, y = rng.integers(0, width - 8), rng.integers(0, height - 8)
        pixels[y:y + rng.integers(4, 24), x:x + rng.integers(4, 24)] = rng.integers(40, 255, 3)
    return Image.fromarray(pixels)


def sharpness(pixels: torch.Tensor) -> float:
    """Mean squared difference of neighbouring pixels: blurring an edge over k pixels divides it by about k."""
    rows, columns = pixels[..., 1:, :] - pixels[..., :-1, :], pixels[..., 1:] - pixels[..., :-1]
    return float(rows.square().mean() + columns.square().mean())


def arrays(image: Image.Image) -> np.ndarray:
    return np.asarray(image, np.float64)


def test_each_corruption_changes_the_image():
    image = colourful()
    processor = ImageProcessor(size=96, crop_size=96, pad_to_square=True)
    small = downscale(image)
    assert small.size == (30, 20)  # the short side at 20 px, the aspect ratio kept
    clean, blurred = processor(image), processor(small)  # preprocessing scales it back up
    assert blurred.shape == clean.shape and sharpness(blurred) < 0.5 * sharpness(clean)
    brighter = colour_jitter(image, 1.4, 0.0)
    assert arrays(brighter).mean() > 1.2 * arrays(image).mean()
    shifted = arrays(colour_jitter(image, 1.0, 0.25))
    assert abs(shifted.mean() - arrays(image).mean()) < 0.1 * arrays(image).mean()  # brightness kept ...
    assert np.abs(shifted - arrays(image)).mean() > 10  # ... colours moved
    kinds = []
    for seed in range(40):
        corrupted, kind = corrupt(image, random.Random(seed))
        again, _ = corrupt(image, random.Random(seed))
        assert np.array_equal(arrays(corrupted), arrays(again))  # seeded
        assert not torch.allclose(processor(corrupted), clean, atol=1e-2), (seed, kind)
        kinds.append(kind)
    assert 12 <= kinds.count("downscale") <= 28 and set(kinds) == {"downscale", "colour_jitter"}


def test_infuse_puts_the_description_before_the_question():
    expected = "<image>\nImage description:\nA red cup.\n\nWhat colour is the cup?"
    assert infuse("<image>\nWhat colour is the cup?", "A red cup.") == expected
    assert infuse("What colour is the cup?\n<image>", "A red cup.") == expected + "\n"


class ImageTokenSpy:
    """Wraps VLM.embed: records, for every forward pass, each row's number of image-token positions, the number
    of images given, and the prompts (as text)."""

    def __init__(self, model: VLM, tokenizer: Tokenizer):
        self.calls, self.embed, self.model, self.tokenizer = [], model.embed, model, tokenizer
        model.embed = self

    def __call__(self, input_ids, pixel_values=None):
        per_row = (input_ids == self.model.cfg.image_token_id).sum(1).tolist()
        texts = [self.tokenizer.decode(row.tolist()) for row in input_ids]
        self.calls.append((per_row, 0 if pixel_values is None else len(pixel_values), pixel_values, texts))
        return self.embed(input_ids, pixel_values)

    def assert_every_row_has_its_image(self):
        assert self.calls
        tokens = self.model.cfg.num_image_tokens()
        for per_row, images, _, _ in self.calls:
            assert per_row == [tokens] * len(per_row) and images == len(per_row)


def test_every_generation_training_and_dar_pass_sees_the_image(world, init, tmp_path):
    model, tokenizer, processor = load_pretrained(str(init))
    template = get_template(model.cfg.template)
    names = [f"images/train_{i:06d}.png" for i in range(12)]
    sampling = Sampling(max_new_tokens=4, temperature=0.2)

    spy = ImageTokenSpy(model, tokenizer)
    records = make_preferences(model, tokenizer, processor, template, world, names, 0, sampling,
                               prompts=PAPER_PROMPTS)
    spy.assert_every_row_has_its_image()
    [(_, _, pixels, _)] = spy.calls  # one batch: chosen and rejected of each image, ordered by prompt length
    kinds = [r["corruption"] for r in records]
    assert {None, "downscale", "colour_jitter"} <= set(kinds)
    for record in records:
        clean = processor(load_image(world / record["image"]))
        seen_clean = sum(torch.equal(clean, row) for row in pixels)
        # the chosen answer saw the image; the dispreferred one saw it too, or its corruption
        assert seen_clean == (1 if record["corruption"] else 2), record
        assert record["prompt"] in PAPER_PROMPTS.describe and set(record) >= {"chosen", "rejected", "image"}

    spy = ImageTokenSpy(model, tokenizer)
    sft = {i: {"image": name} for i, name in enumerate(names[:3])}
    described = make_descriptions(model, tokenizer, processor, template, world, sft, [0, 1, 2], 0, sampling)
    spy.assert_every_row_has_its_image()
    assert [d["index"] for d in described] == [0, 1, 2]

    spy = ImageTokenSpy(model, tokenizer)
    questions = [(world / name, "<image>\nHow many objects are there?") for name in names[:3]]
    describe_and_respond(model, tokenizer, processor, template, questions, Sampling(max_new_tokens=3),
                         description_tokens=5)
    spy.assert_every_row_has_its_image()
    assert len(spy.calls) == 2 and all("Image description:" in text for text in spy.calls[1][3])

    model, tokenizer, processor, _, batch = pair_batch(world, init, tmp_path)
    spy = ImageTokenSpy(model, tokenizer)
    DPOObjective(model)(batch)
    spy.assert_every_row_has_its_image()
    assert len(spy.calls) == 2  # policy and reference, chosen and rejected in one batch each


def image_folder(world: Path, folder: Path, n: int) -> Path:
    folder.mkdir(parents=True)
    for i in range(n):
        shutil.copy(world / "images" / f"train_{i:06d}.png", folder / f"{i:03d}.png")
    return folder


def stic(init, out, *args, processes=1, wait=True):
    """train_stic.py from `init`: its stdout, or the running process if not `wait`."""
    line = ["--init", str(init), "--out_dir", str(out), *args]
    if not wait:
        return subprocess.Popen(command("train_stic.py", *line, processes=processes), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, env=ENV)
    return run_script("train_stic.py", *line, processes=processes).stdout


@pytest.mark.slow
def test_two_processes_write_the_same_preferences_as_one(world, init, tmp_path):
    images = image_folder(world, tmp_path / "images", 7)
    args = ["--step", "preferences", "--images", str(images), "--generation_batch_size", "2",
            "--max_new_tokens", "6", "--prompts", "paper"]
    stic(init, tmp_path / "one", *args)
    stic(init, tmp_path / "two", *args, processes=2)
    one = (tmp_path / "one" / "preferences.jsonl").read_text()
    assert one == (tmp_path / "two" / "preferences.jsonl").read_text()
    records = [json.loads(line) for line in one.splitlines()]
    assert [r["image"] for r in records] == [f"{i:03d}.png" for i in range(7)]
    assert not (tmp_path / "two" / "preferences.jsonl.parts").exists()


@pytest.mark.slow
def test_a_killed_generation_resumes_without_redoing_or_losing_images(world, init, tmp_path):
    images = image_folder(world, tmp_path / "images", 16)
    args = ["--step", "preferences", "--images", str(images), "--generation_batch_size", "1",
            "--max_new_tokens", "64"]
    out = tmp_path / "run"
    part = out / "preferences.jsonl.parts" / "rank0.jsonl"
    victim = stic(init, out, *args, wait=False)
    deadline = time.time() + 120
    while not part.exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    done = [json.loads(line) for line in part.read_text().splitlines()]
    assert 1 <= len(done) < 16
    stdout = stic(init, out, *args)
    assert f"{len(done)} of 16 already done, {16 - len(done)} to make" in stdout
    records = [json.loads(line) for line in (out / "preferences.jsonl").read_text().splitlines()]
    assert [r["image"] for r in records] == [f"{i:03d}.png" for i in range(16)]
    assert records[:len(done)] == done


def test_unreadable_images_are_named_or_counted_and_skipped(world, init, tmp_path, capsys):
    images = image_folder(world, tmp_path / "images", 3)
    (images / "001.png").write_bytes(b"not a png")
    args = ["--step", "preferences", "--init", str(init), "--images", str(images), "--max_new_tokens", "2"]
    with pytest.raises(SystemExit, match=r"001\.png.*--skip_bad_records"):  # found before generation starts
        train_stic.main([*args, "--out_dir", str(tmp_path / "strict")])
    assert not (tmp_path / "strict" / "preferences.jsonl").exists()
    train_stic.main([*args, "--out_dir", str(tmp_path / "lenient"), "--skip_bad_records", "true"])
    kept = [json.loads(line)["image"] for line in (tmp_path / "lenient" / "preferences.jsonl").open()]
    skipped = [json.loads(line) for line in (tmp_path / "lenient" / "preferences.skipped.jsonl").open()]
    assert kept == ["000.png", "002.png"] and [s["image"] for s in skipped] == ["001.png"]
    assert "skipped 1 unreadable inputs" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=f"{tmp_path / 'empty'}: no image files"):
        train_stic.main(["--step", "preferences", "--init", str(init), "--images", str(tmp_path / "empty"),
                         "--out_dir", str(tmp_path / "none")])


@pytest.mark.parametrize("line, message", [
    ({"image": "images/train_000000.png", "prompt": "Describe.", "chosen": "A cup."}, r"missing field\(s\) rejected"),
    ({"image": "images/missing.png", "prompt": "p", "chosen": "a", "rejected": "b"},
     "image .*missing.png does not exist"),
    ({"image": "images/train_000000.png", "prompt": "p", "chosen": 3, "rejected": "b"},
     r"field\(s\) chosen must be strings"),
    ("{broken", "not valid JSON"),
])
def test_a_bad_preference_line_is_named_by_file_and_line(world, init, tmp_path, line, message):
    path = write_pairs(world, tmp_path / "pairs.jsonl", 2)
    with path.open("a") as f:
        f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    _, tokenizer, processor = load_pretrained(str(init))

    def make(skip: bool) -> PreferenceDataset:
        return PreferenceDataset(path, world, tokenizer, get_template("vicuna_v1"), processor, 16, 512, skip_bad=skip)

    with pytest.raises(BadRecord, match=f"{path}:3: {message}"):
        make(False)
    assert len(make(True)) == 2 and make(True).skipped == {str(path): 1}


def test_eval_dar_answers_every_question(world, init, tmp_path):
    scores = eval_script.main([str(init), "--task", "shapes", "--data", str(world / "eval.json"), "--limit", "5",
                               "--dar", "--description_tokens", "4", "--out", str(tmp_path / "dar.json")])
    written = json.loads((tmp_path / "dar.json").read_text())
    assert written["dar"] and len(written["predictions"]) == 5 and written["scores"] == scores
    assert sum(split["n"] for split in scores.values()) == 5


@pytest.mark.slow
def test_all_three_steps_on_the_tiny_preset(world, init, tmp_path):
    images = image_folder(world, tmp_path / "images", 8)
    out = tmp_path / "stic"
    args = ["--images", str(images), "--sft_data", str(world / "instruct.json"), "--num_sft", "8",
            "--max_new_tokens", "6", "--sft_global_batch_size", "4", "--sft_micro_batch_size", "4"]
    stic(init, out, *args)
    dpo = [json.loads(line) for line in (out / "dpo" / "metrics.jsonl").open()]
    assert len(dpo) == 1 and {"reward_margin", "chosen_reward", "rejected_reward", "reward_accuracy"} <= set(dpo[0])
    assert len([json.loads(line) for line in (out / "metrics.jsonl").open()]) == 2  # 8 records, batch 4
    described = json.loads((out / "described.json").read_text())
    assert len(described) == 8 and all(r["conversations"][0]["value"].startswith("<image>\nImage description:\n")
                                       for r in described)
    config = json.loads((out / "adapter" / "language_model" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (8, 16.0, 0.05)
    dpo_config = out / "dpo" / "adapter" / "language_model" / "adapter_config.json"
    assert json.loads(dpo_config.read_text())["lora_dropout"] == 0.0
    base, final = VLM.from_pretrained(str(init)), VLM.from_pretrained(str(out))
    assert not torch.equal(base.language_model.layers[0].mlp.down_proj.weight,
                           final.language_model.layers[0].mlp.down_proj.weight)
    again = stic(init, out, *args)  # finished steps are not redone
    assert "skipping the DPO step" in again and "skipping stage 2" in again


@pytest.mark.slow
def test_the_real_preset_runs_on_a_llava_hf_checkpoint(tmp_path, llama_tokenizer_dir):
    """--preset llava15-7b from a local llava-hf checkpoint, with a folder of images and an SFT file whose image
    paths are relative to it, as data/coco_captions.py and data/llava_mix665k.py write them."""
    tokenizer = Tokenizer.from_dir(llama_tokenizer_dir)
    source = hub_models.llava(tmp_path / "source", image_token_id=tokenizer.image_token_id)
    VLM.from_pretrained(str(source)).save_pretrained(tmp_path / "llava", tokenizer, ImageProcessor(28, 28))
    photos = tmp_path / "data" / "photos"
    photos.mkdir(parents=True)
    for i, colour in enumerate(["red", "green", "blue", "white"]):
        Image.new("RGB", (40, 30), colour).save(photos / f"{i}.jpg")
    sft = [{"id": str(i), "image": f"photos/{i}.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "It is a colour."}]}
        for i in range(4)]
    (tmp_path / "data" / "mix.json").write_text(json.dumps(sft))
    out = tmp_path / "stic"
    stic(tmp_path / "llava", out, "--preset", "llava15-7b", "--images", str(photos), "--sft_data",
         str(tmp_path / "data" / "mix.json"), "--max_new_tokens", "4", "--generation_batch_size", "2",
         "--global_batch_size", "2", "--num_sft", "4", "--num_workers", "0", "--sft_micro_batch_size", "2",
         "--sft_global_batch_size", "2")
    config = json.loads((out / "adapter" / "language_model" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (128, 256.0)
    assert len(config["target_modules"]) == 7 * hub_models.TEXT["num_hidden_layers"]
    assert config["target_modules"][0].startswith("model.language_model.layers.")
    pairs = [json.loads(line) for line in (out / "preferences.jsonl").open()]
    assert [p["image"] for p in pairs] == [f"{i}.jpg" for i in range(4)]
    model, _, _ = load_pretrained(str(out))
    assert model.cfg.template == "vicuna_v1"
