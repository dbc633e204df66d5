"""LoRA: PEFT's conventions, merging, disabling, and adapters that PEFT itself loads onto transformers' Llava."""

import json

import pytest
import torch
import transformers

import hub_models
from nanovlm.lora import (
    LoRALinear,
    adapters_disabled,
    add_lora,
    checked_rename,
    load_adapter,
    lora_layers,
    merge,
    save_adapter,
    unmerge,
)
from nanovlm.vlm import PEFT_RENAMES, PEFT_TO_MODULE, VLM
from test_model import llava_batch

LLM_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VIT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return hub_models.llava(tmp_path_factory.mktemp("llava"))


def adapted(path, seed: int = 0) -> VLM:
    """The llava checkpoint with LoRA on both towers (different ranks) and non-zero B, as after training."""
    model = VLM.from_pretrained(str(path)).eval()
    torch.manual_seed(seed)
    add_lora(model.language_model, LLM_TARGETS, r=8, alpha=16, dropout=0.05)
    add_lora(model.vision_tower, VIT_TARGETS, r=4, alpha=12, dropout=0.2)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_(std=0.05)
    return model


def test_lora_follows_peft_initialisation(llava_dir):
    model = VLM.from_pretrained(str(llava_dir)).eval()
    ids, pixels = llava_batch()
    with torch.no_grad():
        before = model(ids, pixels)
    names = add_lora(model.language_model, LLM_TARGETS, r=8, alpha=16, dropout=0.05)
    assert len(names) == 7 * hub_models.TEXT["num_hidden_layers"] and "lm_head" not in " ".join(names)
    layer = model.language_model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoRALinear) and layer.scaling == 2.0
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    bound = 1 / layer.in_features ** 0.5  # kaiming_uniform(a=sqrt 5), nn.Linear's and PEFT's
    assert layer.lora_A.weight.abs().max() <= bound and layer.lora_A.weight.abs().max() > 0.9 * bound
    with torch.no_grad():
        assert torch.equal(model(ids, pixels), before)  # B = 0: the adapted model starts as the base model
    assert "language_model.layers.0.self_attn.q_proj.weight" in model.state_dict()  # base names kept


def test_merged_model_gives_the_adapter_models_logits(llava_dir):
    model = adapted(llava_dir)
    base = VLM.from_pretrained(str(llava_dir)).eval()
    ids, pixels = llava_batch()
    with torch.no_grad():
        unmerged = model(ids, pixels)
        with adapters_disabled(model):
            assert torch.equal(model(ids, pixels), base(ids, pixels))
        assert not torch.allclose(unmerged, base(ids, pixels), atol=1e-3)  # the adapters act
        merge(model)
        assert (model(ids, pixels) - unmerged).abs().max() <= 1e-5
        with pytest.raises(RuntimeError, match="unmerge"):
            with adapters_disabled(model):
                pass
        unmerge(model)
    base_state = base.state_dict()
    for name, p in model.state_dict().items():
        if "lora_" not in name:
            assert torch.allclose(p, base_state[name], atol=1e-6), name


def test_dropout_acts_on_the_input_of_a_in_training_only():
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(16, 16), r=4, alpha=8, dropout=0.5)
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(8, 16)
    base = torch.nn.functional.linear(x, layer.weight, layer.bias)
    assert torch.allclose(layer.eval()(x), base + x @ layer.delta().T, atol=1e-5)
    assert not torch.allclose(layer.train()(x), layer.eval()(x))
    torch.nn.init.zeros_(layer.lora_B.weight)
    assert torch.equal(layer.train()(x), base)  # the base path never sees the dropout


def test_dropout_mask_replayed_gives_peft_formula():
    """In training, y = W x + b + s B A (m * x) / (1 - p) with m the dropout's Bernoulli mask over x: replaying the
    mask from the same seed on a tensor of x's shape gives the layer's output. (Dropout on B's output, or on A's,
    draws a mask of another shape and gives another output.)"""
    p = 0.3
    layer = LoRALinear(torch.nn.Linear(12, 20), r=4, alpha=8, dropout=p).train()
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(6, 12)
    torch.manual_seed(7)
    got = layer(x)
    torch.manual_seed(7)
    kept = torch.nn.functional.dropout(torch.ones_like(x), p) * (1 - p)  # the mask m: 0 or 1
    assert 0 < kept.mean() < 1
    base = torch.nn.functional.linear(x, layer.weight, layer.bias)
    want = base + layer.scaling * (kept * x / (1 - p)) @ layer.lora_A.weight.T @ layer.lora_B.weight.T
    assert (got - want).abs().max() <= 1e-5


def test_peft_loads_the_saved_adapters_onto_transformers(llava_dir, tmp_path):
    peft = pytest.importorskip("peft")
    model = adapted(llava_dir)
    with torch.no_grad():  # the projector trained too
        model.multi_modal_projector.linear_1.bias.add_(0.1)
    model.save_adapter(tmp_path / "adapter", str(llava_dir))
    for tower, (r, alpha, dropout) in {"language_model": (8, 16, 0.05), "vision_tower": (4, 12, 0.2)}.items():
        config = json.loads((tmp_path / "adapter" / tower / "adapter_config.json").read_text())
        assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (r, alpha, dropout), tower
        assert all(f".{tower}." in name for name in config["target_modules"])
    ref = transformers.LlavaForConditionalGeneration.from_pretrained(llava_dir)
    ref = peft.PeftModel.from_pretrained(ref, tmp_path / "adapter" / "language_model")
    ref.load_adapter(tmp_path / "adapter" / "vision_tower", adapter_name="vision_tower")
    ref.base_model.set_adapter(["default", "vision_tower"])
    ref.eval()
    ids, pixels = llava_batch()
    with torch.no_grad():
        ours = model(ids, pixels)
        theirs = ref(input_ids=ids, pixel_values=pixels).logits
        assert (ours - theirs).abs().max() <= 1e-4
        with ref.disable_adapter():  # and PEFT sees the same base model
            assert (ref(input_ids=ids, pixel_values=pixels).logits
                    - VLM.from_pretrained(str(llava_dir)).eval()(ids, pixels)).abs().max() <= 1e-4

    fresh = VLM.from_pretrained(str(llava_dir)).eval()
    fresh.load_adapter(tmp_path / "adapter")
    assert sorted(lora_layers(fresh)) == sorted(lora_layers(model))
    with torch.no_grad():
        assert torch.equal(fresh(ids, pixels), ours)


def test_saved_model_has_the_adapters_merged(llava_dir, tmp_path):
    model = adapted(llava_dir)
    model.save_pretrained(tmp_path)
    ids, pixels = llava_batch()
    with torch.no_grad():
        assert (VLM.from_pretrained(str(tmp_path)).eval()(ids, pixels) - model(ids, pixels)).abs().max() <= 1e-5
        ref = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
        assert (ref(input_ids=ids, pixel_values=pixels).logits - model(ids, pixels)).abs().max() <= 1e-4


def test_bad_adapters_are_named(llava_dir, tmp_path):
    model = adapted(llava_dir)
    with pytest.raises(ValueError, match="one PEFT adapter has one dropout"):
        save_adapter(tmp_path, lora_layers(model), None)  # both towers: dropouts 0.05 and 0.2
    with pytest.raises(ValueError, match="no rule maps the module"):
        checked_rename("vision_tower.layers.0.mlp.fc1", PEFT_RENAMES[:1])
    with pytest.raises(ValueError, match="no Linear layer"):
        add_lora(model.language_model, ("nonexistent",), 4, 8, 0.0)
    model.save_adapter(tmp_path, None)
    config = json.loads((tmp_path / "language_model" / "adapter_config.json").read_text())
    (tmp_path / "language_model" / "adapter_config.json").write_text(json.dumps(config | {"r": 3, "rank_pattern": {}}))
    with pytest.raises(ValueError, match="has shape"):
        load_adapter(VLM.from_pretrained(str(llava_dir)), tmp_path / "language_model", PEFT_TO_MODULE)
