"""SPHINX's visual side: towers mixed along channels, five views per image, and the presets that use them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from PIL import Image
from safetensors import safe_open

import hub_models
import train_align
import train_sft
from nanovlm.data import DataSource, LLaVADataset
from nanovlm.generate import Sampling, generate
from nanovlm.image import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, ImageProcessor
from nanovlm.presets import PRESETS, tiny_model
from nanovlm.templates import get_template
from nanovlm.tokenizer import Tokenizer
from nanovlm.train import Distributed, Objective, TrainConfig, train
from nanovlm.vlm import VLM, load_pretrained

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return hub_models.clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory, llama_tokenizer_dir):
    path = hub_models.llama(tmp_path_factory.mktemp("llm"))
    for f in llama_tokenizer_dir.iterdir():
        (path / f.name).write_bytes(f.read_bytes())
    return path


def dinov2_dir(tmp_path_factory, patch_size: int = 7) -> Path:
    return hub_models.dinov2(tmp_path_factory.mktemp(f"dinov2_{patch_size}"), patch_size=patch_size)


@pytest.fixture(scope="module")
def dinov2_7(tmp_path_factory):
    return dinov2_dir(tmp_path_factory)


def stats(values):
    return torch.tensor(values)[:, None, None]


@pytest.mark.parametrize("select_feature", ["patch", "cls_patch"])
@pytest.mark.parametrize("patch_size", [7, 4, 14])  # DINOv2's grid at 28 px: 4x4 as CLIP's, 7x7 (finer), 2x2
def test_two_towers_concatenate_each_tower_run_alone(tmp_path_factory, clip_dir, llm_dir, select_feature,
                                                     patch_size):
    """Each tower as transformers runs it (DINOv2 on ImageNet-normalised pixels), brought to CLIP's 4x4 grid by
    hand, concatenated along channels and projected, equals the two-tower model's image embeddings."""
    dino = dinov2_dir(tmp_path_factory, patch_size)
    model = VLM.from_parts(str(clip_dir), str(llm_dir), extra_vision=(str(dino),), select_feature=select_feature)
    x = torch.randn(2, 3, 28, 28)  # normalised with CLIP's statistics, as the image processor does
    dino_x = (x * stats(CLIP_STD) + stats(CLIP_MEAN) - stats(IMAGENET_MEAN)) / stats(IMAGENET_STD)
    with torch.no_grad():
        clip = transformers.CLIPVisionModel.from_pretrained(clip_dir).eval()
        clip = clip(pixel_values=x, output_hidden_states=True, interpolate_pos_encoding=True).hidden_states[-2]
        dinov2 = transformers.Dinov2Model.from_pretrained(dino).eval()
        dinov2 = dinov2(pixel_values=dino_x, output_hidden_states=True).hidden_states[-2]
        side = 28 // patch_size
        grid = dinov2[:, 1:].reshape(2, side, side, -1).permute(0, 3, 1, 2)  # (2, C, side, side)
        if side > 4:  # each of CLIP's cells takes the mean of the DINOv2 patches that cover it
            grid = F.adaptive_avg_pool2d(grid, 4)
        elif side < 4:  # each DINOv2 patch is repeated over the CLIP cells it covers
            grid = grid.repeat_interleave(4 // side, dim=2).repeat_interleave(4 // side, dim=3)
        dinov2 = torch.cat([dinov2[:, :1], grid.flatten(2).transpose(1, 2)], dim=1)
        cls = select_feature == "cls_patch"
        features = torch.cat([clip[:, 1 - cls:], dinov2[:, 1 - cls:]], dim=-1)  # (2, [1 +] 16, 32 + 32)
        projector = model.multi_modal_projector
        want = projector.linear_2(F.gelu(projector.linear_1(features)))
        got = model.encode_images(x)
    assert got.shape == (2, 16 + cls, hub_models.TEXT["hidden_size"]) == want.shape
    assert (got - want).abs().max() <= TOL
    assert model.cfg.num_image_tokens() == 16 + cls


def test_five_views_are_crops_of_the_padded_image(tmp_path):
    """Pad to square, resize to twice the view size, then the whole downsampled and the four quadrants, in
    that order: each view equals the single-scale processor's output for a crop cut by hand with PIL."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8))  # wider than tall: padded
    views = ImageProcessor(size=16, crop_size=16, multi_scale=True)(image)
    square = Image.new("RGB", (50, 50), tuple(int(m * 255) for m in CLIP_MEAN))
    square.paste(image, (0, 10))
    big = square.resize((32, 32), Image.Resampling.BICUBIC, reducing_gap=None)
    crops = [big.resize((16, 16), Image.Resampling.BICUBIC, reducing_gap=None),
             big.crop((0, 0, 16, 16)), big.crop((16, 0, 32, 16)), big.crop((0, 16, 16, 32)), big.crop((16, 16, 32, 32))]
    one_view = ImageProcessor(size=16, crop_size=16, pad_to_square=False)  # a 16x16 crop passes unchanged
    assert views.shape == (5, 3, 16, 16)
    for view, crop in zip(views, crops):
        assert torch.equal(view, one_view(crop))
    assert not any(torch.equal(views[i], views[j]) for i in range(5) for j in range(i))
    # without padding: the short side to 32, the centre 32x32, then the same five views
    views = ImageProcessor(size=16, crop_size=16, pad_to_square=False, multi_scale=True)(image)
    big = image.resize((53, 32), Image.Resampling.BICUBIC, reducing_gap=None).crop((10, 0, 42, 32))
    assert torch.equal(views[2], one_view(big.crop((16, 0, 32, 16))))
    assert torch.equal(views[0], one_view(big.resize((16, 16), Image.Resampling.BICUBIC, reducing_gap=None)))


def sphinx_model(clip_dir, dinov2_dir, llm_dir, **settings) -> VLM:
    model = VLM.from_parts(str(clip_dir), str(llm_dir), extra_vision=(str(dinov2_dir),), multi_scale=True,
                           **settings).eval()
    hub_models.perturb(model.multi_modal_projector, 4)
    return model


def test_every_view_of_every_image_goes_through_a_tower_in_one_call(clip_dir, dinov2_7, llm_dir):
    """An image's tokens are its five views' tokens in order, each view's as the one-view model gives them."""
    model = sphinx_model(clip_dir, dinov2_7, llm_dir)
    one_view = VLM.from_parts(str(clip_dir), str(llm_dir), extra_vision=(str(dinov2_7),)).eval()
    one_view.load_state_dict(model.state_dict())
    calls = []
    for tower in model.vision_towers:
        tower.register_forward_hook(lambda _m, args, _out: calls.append(len(args[0])))
    pixels = torch.randn(3, 5, 3, 28, 28)
    with torch.no_grad():
        got = model.encode_images(pixels)  # (3, 80, D)
        want = torch.cat([one_view.encode_images(pixels[:, v]) for v in range(5)], dim=1)
    assert calls == [15, 15]  # each tower once, for 3 images x 5 views
    assert got.shape == want.shape == (3, 80, hub_models.TEXT["hidden_size"]) and model.cfg.num_image_tokens() == 80
    assert (got - want).abs().max() <= 1e-5
    with pytest.raises(ValueError, match=r"\(N, 5, 3, S, S\)"):
        model.encode_images(pixels[:, 0])


@torch.no_grad()
def greedy_without_cache(model, prompt, images, steps, eos):
    ids = list(prompt)
    for _ in range(steps):
        logits = model(torch.tensor([ids]), images)[0, -1]
        logits[model.cfg.image_token_id] = float("-inf")
        token = int(logits.argmax())
        if token == eos:
            break
        ids.append(token)
    return ids[len(prompt):]


def test_multi_scale_generation_in_a_batch_equals_one_at_a_time(clip_dir, dinov2_7, llm_dir):
    model = sphinx_model(clip_dir, dinov2_7, llm_dir)
    tokenizer = Tokenizer.from_dir(llm_dir)
    image, n = model.cfg.image_token_id, model.cfg.num_image_tokens()
    g = torch.Generator().manual_seed(0)
    text = lambda k: [t if t != image else 5 for t in torch.randint(3, 390, (k,), generator=g).tolist()]  # noqa: E731
    prompts = [[1] + text(4) + [image] * n + text(6), [1] + text(9),
               [1] + [image] * n + text(2) + [image] * n + text(3)]
    images = [torch.randn(1, 5, 3, 28, 28, generator=g), None, torch.randn(2, 5, 3, 28, 28, generator=g)]
    alone = [generate(model, tokenizer, [p], im, Sampling(max_new_tokens=12))[0] for p, im in zip(prompts, images)]
    together = generate(model, tokenizer, prompts, torch.cat([images[0], images[2]]), Sampling(max_new_tokens=12))
    assert together == alone and all(len(out) > 3 for out in alone)
    assert alone[2] == greedy_without_cache(model, prompts[2], images[2], 12, tokenizer.eos_id)


def test_save_and_load_round_trip_every_tower(tmp_path, clip_dir, dinov2_7, llm_dir):
    model = sphinx_model(clip_dir, dinov2_7, llm_dir, projector="linear_ln", select_layer=-1,
                         select_feature="cls_patch", select_norm=True)
    model.add_prototype_extractor(4)
    tokenizer = Tokenizer.from_dir(llm_dir)
    model.save_pretrained(tmp_path, tokenizer, ImageProcessor(size=28, crop_size=28, multi_scale=True))
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        keys = set(f.keys())
    towers = {k.split(".")[0] for k in keys}
    assert towers == {"language_model", "vision_tower", "multi_modal_projector", "prototype_extractor",
                      "extra_vision_towers"}
    assert "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight" in keys  # the first: llava-hf's names
    assert "extra_vision_towers.0.layers.0.layer_scale1.lambda1" in keys  # the others: nanovlm's module names
    again, _, processor = load_pretrained(str(tmp_path))
    assert again.cfg == model.cfg and processor.multi_scale and processor.pad_to_square
    loaded, saved = again.state_dict(), model.state_dict()
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
    ids = torch.tensor([[1, 7, 8] + [model.cfg.image_token_id] * model.cfg.num_image_tokens() + [9]])
    pixels = torch.randn(1, 5, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(again(ids, pixels), model(ids, pixels))
    assert hub_models.config(tmp_path)["image_seq_length"] == 5 * 17


def test_a_dinov2_first_tower_round_trips(tmp_path, dinov2_7, llm_dir):
    model = VLM.from_parts(str(dinov2_7), str(llm_dir)).eval()
    model.save_pretrained(tmp_path)
    again = VLM.from_pretrained(str(tmp_path)).eval()
    assert again.cfg == model.cfg and again.cfg.vision.family == "dinov2" and model.cfg.num_image_tokens() == 25
    ids = torch.tensor([[1, 7] + [model.cfg.image_token_id] * 25 + [9]])
    pixels = torch.randn(1, 3, 35, 35)
    with torch.no_grad():
        assert torch.equal(again(ids, pixels), model(ids, pixels))


def test_towers_train_together_or_each_alone(world, tmp_path):
    corpus = train_align.shapes_corpus(world, "vicuna_v1")
    model, tokenizer, processor = tiny_model(corpus, preset=PRESETS["sphinx-tiny"])
    groups = model.parameter_groups()
    names = {group: {name for name, _ in params} for group, params in groups.items()}
    assert names["vision"] == names["vision0"] | names["vision1"] and not names["vision0"] & names["vision1"]
    assert all(name.startswith("extra_vision_towers.0.") for name in names["vision1"])
    data = LLaVADataset([DataSource(world / "instruct.json")], tokenizer, get_template("vicuna_v1"), processor,
                        model.cfg.num_image_tokens(), 512)
    assert data[0]["pixel_values"].shape == (1, 5, 3, 96, 96) and model.cfg.num_image_tokens() == 80
    with pytest.raises(ValueError, match="share parameters"):
        train(TrainConfig(lr={"vision": 1e-3, "vision1": 1e-3}), Objective(model), groups, data, 0, Distributed())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(out_dir=str(tmp_path), global_batch_size=8, micro_batch_size=8, max_steps=1, lr={"vision1": 1e-3})
    train(cfg, Objective(model), groups, data, tokenizer.pad_id, Distributed())
    changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    unused = {"extra_vision_towers.0.post_layernorm.weight", "extra_vision_towers.0.post_layernorm.bias",
              "extra_vision_towers.0.embeddings.mask_token"}
    assert changed == {name for name in names["vision1"]} - unused


def test_sphinx_7b_preset_builds_from_the_hub(tmp_path, clip_dir, dinov2_7, llm_dir):
    """The real preset's recipe, on tiny stand-ins cached under its repo ids: both towers read as SPHINX reads
    them, five views, the Linear + LayerNorm projector, and a processor for 2x-size images."""
    preset = PRESETS["sphinx-7b"]
    for repo, source in ((preset.vision, clip_dir), (preset.extra_vision[0], dinov2_7), (preset.llm, llm_dir)):
        hub_models.hub_cache(tmp_path / "hf", repo, source)
    script = ("import json, torch\nfrom PIL import Image\nfrom nanovlm.presets import PRESETS, pretrained_model\n"
              "model, tokenizer, processor = pretrained_model(PRESETS['sphinx-7b'], torch.float32, 'cpu')\n"
              "towers = [(t.cfg.family, t.cfg.select_layer, t.cfg.select_feature, t.cfg.select_norm) "
              "for t in model.vision_towers]\n"
              "pixels = processor(Image.new('RGB', (40, 30)))[None]\n"
              "print(json.dumps({'towers': towers, 'tokens': model.cfg.num_image_tokens(), "
              "'projector': model.multi_modal_projector.kind, 'pixels': list(pixels.shape), "
              "'features': list(model.encode_images(pixels).shape)}))\n")
    env = os.environ | {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                        "PYTHONPATH": str(ROOT)}
    env.pop("HF_HUB_CACHE", None)
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    facts = json.loads(run.stdout.splitlines()[-1])
    assert facts["towers"] == [["clip", -1, "cls_patch", True], ["dinov2", -1, "cls_patch", True]]
    assert facts["tokens"] == 5 * 17 and facts["projector"] == "linear_ln"
    assert facts["pixels"] == [1, 5, 3, 28, 28] and facts["features"] == [1, 85, hub_models.TEXT["hidden_size"]]


@pytest.mark.slow
def test_sphinx_tiny_trains_through_both_stages(world, tmp_path, monkeypatch):
    """train_align.py then train_sft.py with --preset sphinx-tiny, on the small world, to the shapes report."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(train_align.shapes, "generate", lambda out: None)  # the small world is there already
    monkeypatch.setattr(train_align, "SHAPES_DIR", world)
    monkeypatch.setattr(train_sft, "SHAPES_DIR", world)
    args = ["--preset", "sphinx-tiny", "--max_steps", "2", "--global_batch_size", "16", "--micro_batch_size", "8"]
    train_align.main(args)
    train_sft.main(args)
    model, tokenizer, processor = load_pretrained("out/sphinx-tiny/sft")
    assert len(model.extra_vision_towers) == 1 and model.cfg.multi_scale and processor.multi_scale
    assert model.cfg.extra_vision[0].family == "dinov2" and model.cfg.num_image_tokens() == 80
    report = json.loads(Path("out/sphinx-tiny/sft/eval_shapes.json").read_text())
    assert len(report["predictions"]) > 20
