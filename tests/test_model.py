"""Parity of the hand-written model with transformers, and the loading paths a Hub download takes."""

import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import hub_models
from nanovlm.llm import LLM, KVCache, LLMConfig, rope_inv_freq, rotate
from nanovlm.tokenizer import Tokenizer
from nanovlm.vision import VisionConfig, VisionTower
from nanovlm.vlm import VLM, VLMConfig

TOL = 1e-4


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return hub_models.clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def dinov2_dir(tmp_path_factory):
    return hub_models.dinov2(tmp_path_factory.mktemp("dinov2"))


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return hub_models.llava(tmp_path_factory.mktemp("llava"), layout="hub_original")


def llava_batch(image_token_id: int = 1023, seed: int = 0):
    """Three samples of one length: one image, two images, and text only; their 3 images in reading order."""
    g = torch.Generator().manual_seed(seed)
    n = hub_models.VISION["image_size"] // hub_models.VISION["patch_size"]
    ids = torch.randint(3, 1000, (3, 3 * n * n), generator=g)
    ids[0, 5:5 + n * n] = image_token_id
    ids[1, 1:1 + n * n] = image_token_id
    ids[1, 2 * n * n:3 * n * n] = image_token_id
    return ids, torch.randn(3, 3, 28, 28, generator=g)


@pytest.mark.parametrize("select_layer,select_feature", [(-2, "patch"), (-1, "cls_patch"), (1, "patch")])
@pytest.mark.parametrize("size", [(28, 28), (35, 42)])
def test_vision_features_match_transformers(clip_dir, select_layer, select_feature, size):
    ours = VisionTower.from_pretrained(str(clip_dir), select_layer=select_layer, select_feature=select_feature)
    ref = transformers.CLIPVisionModel.from_pretrained(clip_dir).eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        want = ref(pixel_values=x, output_hidden_states=True, interpolate_pos_encoding=True).hidden_states[select_layer]
        got = ours(x)
    want = want[:, 1:] if select_feature == "patch" else want
    assert got.shape == want.shape
    assert (got - want).abs().max() <= TOL


@pytest.mark.parametrize("select_layer,select_feature", [(-2, "patch"), (-1, "cls_patch"), (0, "patch")])
@pytest.mark.parametrize("size", [(35, 35), (28, 28), (42, 35)])  # native 5x5 grid; 4x4; 6x5, not square
def test_dinov2_features_match_transformers(dinov2_dir, select_layer, select_feature, size):
    ours = VisionTower.from_pretrained(str(dinov2_dir), select_layer=select_layer, select_feature=select_feature)
    ref = transformers.Dinov2Model.from_pretrained(dinov2_dir).eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        want = ref(pixel_values=x, output_hidden_states=True).hidden_states[select_layer]
        got = ours(x)
    want = want[:, 1:] if select_feature == "patch" else want
    assert got.shape == want.shape
    assert (got - want).abs().max() <= TOL


@pytest.mark.parametrize("family", ["clip", "dinov2"])
def test_select_norm_gives_the_normed_last_layer(clip_dir, dinov2_dir, family):
    """SPHINX's reading: the last layer through CLIP's post_layernorm / DINOv2's layernorm, class token kept."""
    path = clip_dir if family == "clip" else dinov2_dir
    ours = VisionTower.from_pretrained(str(path), select_layer=-1, select_feature="cls_patch", select_norm=True)
    unnormed = VisionTower.from_pretrained(str(path), select_layer=-1, select_feature="cls_patch")
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        if family == "clip":
            ref = transformers.CLIPVisionModel.from_pretrained(path).eval()
            want = ref.post_layernorm(ref(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state)
        else:
            want = transformers.Dinov2Model.from_pretrained(path).eval()(pixel_values=x).last_hidden_state
        got = ours(x)
        assert not torch.allclose(got, unnormed(x))
    assert (got - want).abs().max() <= TOL


def test_unsupported_dinov2_variants_are_errors(tmp_path):
    path = hub_models.dinov2(tmp_path / "swiglu", use_swiglu_ffn=True)
    with pytest.raises(ValueError, match="unsupported DINOv2 variant"):
        VisionTower.from_pretrained(str(path))


def test_dinov2_loads_by_repo_id_from_offline_hub_cache(tmp_path, dinov2_dir):
    hub_models.hub_cache(tmp_path / "hf", "tiny-org/tiny-dinov2", dinov2_dir)
    script = ("import torch\nfrom nanovlm.vision import VisionTower\n"
              "tower = VisionTower.from_pretrained('tiny-org/tiny-dinov2')\n"
              "print(sum(p.double().sum().item() for p in tower.parameters()))\n")
    env = os.environ | {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("HF_HUB_CACHE", None)
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    want = sum(p.double().sum().item() for p in VisionTower.from_pretrained(str(dinov2_dir)).parameters())
    assert float(run.stdout.split()[0]) == want


@pytest.mark.parametrize("variant", list(hub_models.LLM_VARIANTS))
def test_llm_logits_match_transformers(tmp_path, variant):
    path = hub_models.llama(tmp_path, variant)
    ours = LLM.from_pretrained(str(path)).eval()
    ref = transformers.LlamaForCausalLM.from_pretrained(path).eval()
    ids = torch.randint(0, 1024, (2, 64))
    with torch.no_grad():
        got = ours.lm_head(ours(ours.embed_tokens(ids)))
        want = ref(ids).logits
    assert (got - want).abs().max() <= TOL
    if variant == "tied":
        assert ours.lm_head.weight is ours.embed_tokens.weight


def test_token_by_token_decoding_with_a_cache_equals_one_full_pass():
    """LLM.forward with a KVCache and no position_ids: each new token takes position cache.length, so feeding a
    sequence one token at a time gives the hidden states of one pass over all of it."""
    torch.manual_seed(0)
    cfg = LLMConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=64)
    llm = LLM(cfg).eval()
    embeds = torch.randn(2, 12, 32)
    with torch.no_grad():
        whole = llm(embeds)
        cache = KVCache(cfg, 2, 12, "cpu", torch.float32)
        prefill = llm(embeds[:, :5], cache=cache)  # a prompt, then one token at a time
        steps = [llm(embeds[:, t:t + 1], cache=cache) for t in range(5, 12)]
    assert cache.length == 12
    assert (torch.cat([prefill, *steps], dim=1) - whole).abs().max() <= 1e-5


def test_grid_rope_turns_image_keys_by_their_cell_not_by_the_distance():
    """With grid_rope, a text query meets an image key through pairs turned by the key's row and column: moving
    the query along the text leaves those scores alone, moving the key to another cell changes them; and with no
    image in the batch the model is plain RoPE on the sequence pairs (row and column pairs never turn)."""
    cfg = LLMConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=1,
                    num_key_value_heads=1, grid_rope=True)
    llm = LLM(cfg)
    axis = (torch.arange(cfg.head_dim // 2) + 1) % 3  # 1 row, 2 column, 0 sequence, as LLM.rope assigns them
    grid_pairs = (axis != 0).repeat(2)  # the rotate-half layout: pair i is dims i and i + head_dim / 2
    q = k = grid_pairs.float()  # the score is then the sum of cos(angle) over the grid's pairs, twice

    def score(query_position, key_position, cell):
        positions = torch.tensor([[key_position, query_position]])
        grid = torch.tensor([[cell, [0, 0]]])
        cos, sin = llm.rope(positions, torch.float32, grid)  # (1, 1, 2, head_dim)
        return float(rotate(q, cos[0, 0, 1], sin[0, 0, 1]) @ rotate(k, cos[0, 0, 0], sin[0, 0, 0]))

    assert score(20, 3, [1, 2]) == pytest.approx(score(90, 3, [1, 2]), abs=1e-5)
    assert score(20, 3, [1, 2]) == pytest.approx(score(20, 7, [1, 2]), abs=1e-5)
    assert abs(score(20, 3, [1, 2]) - score(20, 3, [1, 3])) > 0.1
    assert abs(score(20, 3, [1, 2]) - score(20, 3, [2, 2])) > 0.1
    text = torch.arange(10)[None]
    cos, sin = llm.rope(text, torch.float32)
    plain_cos, plain_sin = LLM(replace(cfg, grid_rope=False)).rope(text, torch.float32)
    sequence = (axis == 0).repeat(2)
    assert torch.equal(cos[..., sequence], plain_cos[..., sequence]) and (cos[..., ~sequence] == 1).all()


def test_llama3_rope_scaling_is_applied():
    plain = LLMConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=4)
    scaled = LLMConfig(**{**plain.__dict__, "extra": {}, **hub_models.LLM_VARIANTS["llama3_rope"]})
    assert not torch.allclose(rope_inv_freq(plain), rope_inv_freq(scaled))


@pytest.mark.parametrize("layout", ["saved", "hub_original", "transformers_4_52"])
def test_llava_logits_match_transformers(tmp_path, layout):
    path = hub_models.llava(tmp_path, layout=layout)
    ours = VLM.from_pretrained(str(path)).eval()
    ref = transformers.LlavaForConditionalGeneration.from_pretrained(path).eval()
    ids, pixels = llava_batch()
    with torch.no_grad():
        got, want = ours(ids, pixels), ref(input_ids=ids, pixel_values=pixels).logits
    assert (got - want).abs().max() <= TOL


def test_loss_matches_transformers(llava_dir):
    ours = VLM.from_pretrained(str(llava_dir)).eval()
    ref = transformers.LlavaForConditionalGeneration.from_pretrained(llava_dir).eval()
    ids, pixels = llava_batch()
    labels = ids.clone()
    labels[ids == 1023] = -100
    labels[:, :40] = -100
    with torch.no_grad():
        want = ref(input_ids=ids, pixel_values=pixels, labels=labels).loss
        got = ours.loss(ids, labels, pixels)
    assert abs(got.item() - want.item()) <= TOL


@pytest.mark.slow
def test_compiled_blocks_train_as_eager(llava_dir):
    """LLM.compile_blocks (torch.compile'd decoder blocks) gives the eager loss and gradients to 1e-5, for two
    sequence lengths (the second compiles with symbolic lengths)."""
    models = [VLM.from_pretrained(str(llava_dir)) for _ in range(2)]
    models[1].language_model.compile_blocks()
    short, pixels = llava_batch()
    for ids in (short, torch.cat([short, torch.randint(3, 1000, (3, 7))], dim=1)):
        labels = ids.masked_fill(ids == 1023, -100)
        grads = []
        for model in models:
            model.zero_grad()
            model.loss(ids, labels, pixels).backward()
            grads.append(torch.cat([p.grad.flatten() for p in model.language_model.parameters()]))
        assert grads[0].abs().max() > 0 and (grads[0] - grads[1]).abs().max() <= 1e-5
        with torch.no_grad():
            assert (models[0](ids, pixels) - models[1](ids, pixels)).abs().max() <= 1e-5


def test_image_count_mismatch_is_an_error(llava_dir):
    model = VLM.from_pretrained(str(llava_dir))
    ids, pixels = llava_batch()
    with pytest.raises(ValueError, match="image-token positions"):
        model(ids, pixels[:2])


def test_saved_vlm_loads_in_transformers_with_same_logits(tmp_path, llava_dir):
    model = VLM.from_pretrained(str(llava_dir)).eval()
    model.save_pretrained(tmp_path / "saved")
    assert not list((tmp_path / "saved").glob("*.tmp"))
    ref = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "saved").eval()
    again = VLM.from_pretrained(str(tmp_path / "saved")).eval()
    ids, pixels = llava_batch(seed=1)
    with torch.no_grad():
        got = model(ids, pixels)
        assert (ref(input_ids=ids, pixel_values=pixels).logits - got).abs().max() <= TOL
        assert torch.equal(again(ids, pixels), got)


def test_vlm_from_parts_uses_pretrained_towers(tmp_path, clip_dir, llama_tokenizer_dir):
    llm_dir = hub_models.llama(tmp_path / "llm")
    for f in llama_tokenizer_dir.iterdir():
        (llm_dir / f.name).write_bytes(f.read_bytes())
    model = VLM.from_parts(str(clip_dir), str(llm_dir))
    clip = VisionTower.from_pretrained(str(clip_dir))
    assert all(torch.equal(a, b) for a, b in zip(model.vision_tower.state_dict().values(), clip.state_dict().values()))
    tokenizer = Tokenizer.from_dir(llm_dir)
    assert model.cfg.image_token_id == tokenizer.image_token_id >= tokenizer.tok.get_vocab_size() - 1
    ids = torch.tensor([[1, 5, 6] + [model.cfg.image_token_id] * 16 + [7, 8]])
    assert torch.isfinite(model(ids, torch.randn(1, 3, 28, 28))).all()


def test_sharded_and_bin_checkpoints_load(tmp_path):
    ref = LLM.from_pretrained(str(hub_models.llama(tmp_path / "single")))
    sharded = LLM.from_pretrained(str(hub_models.llama(tmp_path / "sharded", max_shard_size="20KB")))
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    for (name, a), b in zip(ref.state_dict().items(), sharded.state_dict().values()):
        assert torch.equal(a, b), name
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_bytes((tmp_path / "single" / "config.json").read_bytes())
    torch.save(load_file(tmp_path / "single" / "model.safetensors"), bin_dir / "pytorch_model.bin")
    from_bin = LLM.from_pretrained(str(bin_dir))
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), from_bin.state_dict().values()))


def test_missing_and_corrupt_shards_are_named(tmp_path):
    path = hub_models.llama(tmp_path / "sharded", max_shard_size="20KB")
    shards = sorted(path.glob("model-*.safetensors"))
    shards[0].write_bytes(shards[0].read_bytes()[:100])
    with pytest.raises(ValueError, match=shards[0].name):
        LLM.from_pretrained(str(path))
    shards[1].unlink()
    with pytest.raises(FileNotFoundError, match=shards[1].name):
        LLM.from_pretrained(str(path))


def test_mismatched_checkpoints_name_the_keys(tmp_path):
    path = hub_models.llama(tmp_path / "llm")
    state = load_file(path / "model.safetensors")
    state["model.norm.weight"] = torch.ones(65)
    state["model.extra.weight"] = state.pop("model.layers.1.mlp.up_proj.weight")
    save_file(state, path / "model.safetensors")
    with pytest.raises(ValueError) as e:
        LLM.from_pretrained(str(path))
    for fragment in ("layers.1.mlp.up_proj.weight", "model.extra.weight",
                     "model.norm.weight: checkpoint (65,) vs model (64,)"):
        assert fragment in str(e.value)


@pytest.mark.parametrize("change,message", [
    ({"model_type": "gpt2"}, "unsupported LLM model_type"),
    ({"hidden_act": "gelu"}, "unsupported LLM activation"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "unsupported rope_scaling"),
])
def test_unsupported_llm_configs_are_errors(change, message):
    with pytest.raises(ValueError, match=message):
        LLMConfig.from_hf(hub_models.TEXT | change)


def test_unsupported_vision_configs_are_errors():
    with pytest.raises(ValueError, match="unsupported vision activation"):
        VLMConfig.from_hf({"model_type": "llava", "vision_config": {"hidden_act": "relu"}})
    with pytest.raises(ValueError, match="unsupported vision model_type"):
        VLMConfig.from_hf({"model_type": "llava", "vision_config": {"model_type": "siglip_vision_model"}})
    with pytest.raises(ValueError, match="unknown vision family"):
        VisionConfig(family="siglip")


def test_llava_config_defaults_follow_transformers():
    """llava-hf/llava-1.5-7b-hf's config.json leaves most sizes to transformers' defaults."""
    cfg = VLMConfig.from_hf({"model_type": "llava", "text_config": {"model_type": "llama", "vocab_size": 32064}})
    ref = transformers.LlavaConfig(text_config={"model_type": "llama", "vocab_size": 32064})
    assert cfg.llm.hidden_size == ref.text_config.hidden_size and cfg.llm.num_hidden_layers == 32
    assert cfg.vision.image_size == ref.vision_config.image_size == 336
    assert cfg.num_image_tokens() == 576


def test_load_by_repo_id_from_offline_hub_cache(tmp_path, llava_dir):
    hub_models.hub_cache(tmp_path / "hf", "tiny-org/tiny-llava", llava_dir)
    script = ("import torch\nfrom nanovlm.vlm import VLM\n"
              "m = VLM.from_pretrained('tiny-org/tiny-llava')\n"
              "print(sum(p.numel() for p in m.parameters()))\n"
              "VLM.from_pretrained('tiny-org/not-cached')\n")
    env = os.environ | {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    expected = sum(p.numel() for p in VLM.from_pretrained(str(llava_dir)).parameters())
    assert run.stdout.split()[0] == str(expected), run.stderr
    assert "could not get 'tiny-org/not-cached'" in run.stderr


def test_meta_loading_leaves_nothing_on_meta(llava_dir):
    model = VLM.from_pretrained(str(llava_dir), dtype=torch.bfloat16)
    assert all(p.device.type == "cpu" and p.dtype == torch.bfloat16 for p in model.parameters())
