"""Weight mixing (SPHINX) and LoRA merging: exact endpoints, the formula on every key, streaming memory, named
errors, and merged adapters that give the adapter model's logits."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import hub_models
from nanovlm.checkpoint import weight_files
from nanovlm.merge import IncompatibleCheckpoints, main, merge, merge_adapter, mix
from nanovlm.vlm import VLM
from test_lora import adapted
from test_model import llava_batch


def fine_tuned(base: Path, out: Path, seed: int, max_shard_size: str | None = None) -> Path:
    """`base` after a pretend fine-tune: every parameter moved by seeded noise, saved by transformers (sharded
    when max_shard_size is given), so that it shares the base's keys, shapes and config."""
    model = transformers.LlavaForConditionalGeneration.from_pretrained(base)
    hub_models.perturb(model, seed)
    model.save_pretrained(out, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    return out


def tensors(path: Path) -> dict[str, torch.Tensor]:
    state = {}
    for file in weight_files(path):
        state |= load_file(file)
    return state


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return hub_models.llava(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def domain_a(base, tmp_path_factory) -> Path:
    return fine_tuned(base, tmp_path_factory.mktemp("a"), seed=10)


@pytest.fixture(scope="module")
def domain_b(base, tmp_path_factory) -> Path:
    return fine_tuned(base, tmp_path_factory.mktemp("b"), seed=11, max_shard_size="100KB")


def test_mixing_a_checkpoint_with_itself_gives_it_back_exactly(domain_a, tmp_path):
    out = merge([domain_a, domain_a], [0.3, 0.7], tmp_path / "self")
    ours, theirs = tensors(out), tensors(domain_a)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) and ours[k].dtype == theirs[k].dtype for k in theirs)
    three = merge([domain_a] * 3, [0.5, 0.3, 0.2], tmp_path / "three")
    assert all(torch.equal(t, theirs[k]) for k, t in tensors(three).items())


def test_beta_one_and_zero_give_each_checkpoint_bit_for_bit(domain_a, domain_b, tmp_path):
    assert len(weight_files(domain_b)) > 1  # B is sharded, A is not
    a, b = tensors(domain_a), tensors(domain_b)
    assert not torch.equal(a["language_model.lm_head.weight"], b["language_model.lm_head.weight"])
    for beta, expected in ((1.0, a), (0.0, b)):
        out = main([str(domain_a), str(domain_b), "--beta", str(beta), "--out", str(tmp_path / f"beta{beta}")])
        merged = tensors(out)
        assert merged.keys() == expected.keys()
        assert all(torch.equal(merged[k], expected[k]) for k in expected), beta


def test_every_tensor_follows_the_formula_and_the_mix_loads(base, domain_a, domain_b, tmp_path):
    a, b = tensors(domain_a), tensors(domain_b)
    out = main([str(domain_a), str(domain_b), "--beta", "0.25", "--out", str(tmp_path / "mix"),
                "--max_shard_size", "60KB"])
    merged = tensors(out)
    assert merged.keys() == a.keys()
    for key, tensor in merged.items():
        expected = 0.25 * a[key].double() + 0.75 * b[key].double()
        assert tensor.dtype == a[key].dtype
        assert torch.allclose(tensor.double(), expected, rtol=1e-6, atol=1e-7), key
        assert not torch.equal(tensor, a[key]) and not torch.equal(tensor, b[key]), key  # both really contribute
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(a) and len(set(index["weight_map"].values())) > 2
    assert all((out / name).is_file() for name in index["weight_map"].values())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in a.values())
    for name in ("config.json", "merge.json"):
        assert (out / name).is_file()
    assert json.loads((out / "config.json").read_text()) == hub_models.config(domain_a)
    assert json.loads((out / "merge.json").read_text())["weights"] == [0.25, 0.75]

    c = fine_tuned(base, tmp_path / "c", seed=12)
    three = tensors(main([str(domain_a), str(domain_b), str(c), "--weights", "0.5,0.3,0.2", "--out",
                          str(tmp_path / "three")]))
    c_state = tensors(c)
    for key, tensor in three.items():
        expected = 0.5 * a[key].double() + 0.3 * b[key].double() + 0.2 * c_state[key].double()
        assert torch.allclose(tensor.double(), expected, rtol=1e-6, atol=1e-7), key

    ids, pixels = llava_batch()
    with torch.no_grad():  # the mix is a llava-hf checkpoint like any other, for nanovlm and transformers
        ours = VLM.from_pretrained(str(out)).eval()(ids, pixels)
        theirs = transformers.LlavaForConditionalGeneration.from_pretrained(out).eval()(
            input_ids=ids, pixel_values=pixels).logits
    assert (ours - theirs).abs().max() <= 1e-4


def test_merges_hub_repo_ids_from_the_cache(domain_a, domain_b, tmp_path, monkeypatch):
    from huggingface_hub import constants

    home = tmp_path / "hf"
    for repo, source in (("someone/llava-a", domain_a), ("someone/llava-b", domain_b)):
        hub_models.hub_cache(home, repo, source)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    out = merge(["someone/llava-a", "someone/llava-b"], [1.0, 0.0], tmp_path / "out")
    assert all(torch.equal(t, tensors(domain_a)[k]) for k, t in tensors(out).items())


def test_mix_keeps_dtype_and_refuses_to_mix_integers():
    a, b = torch.randn(5, dtype=torch.bfloat16), torch.randn(5, dtype=torch.bfloat16)
    assert mix([a, b], [1.0, 0.0]).dtype == torch.bfloat16 and torch.equal(mix([a, b], [1.0, 0.0]), a)
    assert torch.equal(mix([a, b], [0.0, 1.0]), b)
    ints = torch.arange(4)
    assert torch.equal(mix([ints, ints.clone()], [0.5, 0.5]), ints)
    with pytest.raises(IncompatibleCheckpoints, match="integer tensors differ"):
        mix([ints, ints + 1], [0.5, 0.5])


def test_mismatched_checkpoints_are_named_errors(base, domain_a, tmp_path):
    wider = hub_models.llava(tmp_path / "wider", intermediate_size=96)
    with pytest.raises(IncompatibleCheckpoints) as error:
        merge([domain_a, wider], [0.5, 0.5], tmp_path / "out")
    message = str(error.value)
    assert "shapes that differ" in message and "mlp.gate_proj.weight: (128, 64) vs (96, 64)" in message
    assert "config values that differ (1): ['text_config.intermediate_size: 128 vs 96']" in message

    fewer = tmp_path / "fewer"
    fewer.mkdir()
    state = tensors(domain_a)
    del state["language_model.lm_head.weight"]
    save_file(state, fewer / "model.safetensors", metadata={"format": "pt"})
    (fewer / "config.json").write_text((domain_a / "config.json").read_text())
    with pytest.raises(IncompatibleCheckpoints, match=r"keys only in the first \(1\): \[.language_model.lm_head"):
        merge([domain_a, fewer], [0.5, 0.5], tmp_path / "out")
    assert not (tmp_path / "out").exists()

    for weights, message in (([0.5, 0.6], "sum to 1"), ([1.5, -0.5], r"lie in \[0, 1\]"), ([1.0], "1 weights for 2")):
        with pytest.raises(ValueError, match=message):
            merge([domain_a, domain_a], weights, tmp_path / "out")
    for argv in (["--beta", "1.5"], ["--beta", "-0.1"], ["--weights", "0.7,0.7"], ["--beta", "nan"], []):
        with pytest.raises(SystemExit):
            main([str(domain_a), str(domain_a), "--out", str(tmp_path / "out"), *argv])
    assert not (tmp_path / "out").exists()

    binary = tmp_path / "binary"
    binary.mkdir()
    torch.save({"w": torch.zeros(2)}, binary / "pytorch_model.bin")
    (binary / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="only safetensors"):
        merge([binary, binary], [0.5, 0.5], tmp_path / "out")


def test_output_appears_whole_or_not_at_all(domain_a, domain_b, tmp_path, monkeypatch):
    import nanovlm.merge as merging

    calls = []

    def failing(tensors, weights):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("disk full")
        return mix(tensors, weights)

    monkeypatch.setattr(merging, "mix", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        merge([domain_a, domain_b], [0.5, 0.5], tmp_path / "out", max_shard_size=1000)
    assert list(tmp_path.iterdir()) == []  # no partial output, no temporary folder left behind
    monkeypatch.undo()

    merge([domain_a, domain_b], [0.5, 0.5], tmp_path / "out")
    with pytest.raises(FileExistsError, match="--overwrite"):
        merge([domain_a, domain_b], [1.0, 0.0], tmp_path / "out")
    merge([domain_a, domain_b], [1.0, 0.0], tmp_path / "out", overwrite=True)
    assert all(torch.equal(t, tensors(domain_a)[k]) for k, t in tensors(tmp_path / "out").items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


MEMORY_PROBE = textwrap.dedent("""
    import json, resource, sys
    from nanovlm.merge import merge
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    merge(sys.argv[1:3], [0.5, 0.5], sys.argv[3], max_shard_size=int(sys.argv[4]))
    print(json.dumps({"before": before, "after": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
""")


@pytest.mark.slow
def test_merging_sharded_checkpoints_holds_about_one_shard_in_memory(tmp_path):
    """Two checkpoints of four 50 MB shards merge with a peak RSS increase under three shards (the output shard
    being filled, and change), measured in a fresh process (ru_maxrss, KiB on Linux); loading the inputs whole
    would take eight (measured: about 90 MB)."""
    shard_bytes, per_shard = 50 * 2**20, 10
    numel = shard_bytes // 4 // per_shard
    for name, seed in (("a", 0.0), ("b", 10.0)):
        folder = tmp_path / name
        folder.mkdir()
        weight_map = {}
        for shard in range(4):
            file = f"model-{shard + 1:05d}-of-00004.safetensors"
            state = {f"layers.{shard}.w{i}": torch.full((numel,), seed + shard + i / 8) for i in range(per_shard)}
            save_file(state, folder / file, metadata={"format": "pt"})
            weight_map |= dict.fromkeys(state, file)
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        (folder / "config.json").write_text(json.dumps({"model_type": "llava"}))
        del state
    result = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(tmp_path / "a"), str(tmp_path / "b"),
                             str(tmp_path / "out"), str(shard_bytes)], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1], check=True)
    rss = json.loads(result.stdout.splitlines()[-1])
    increase = (rss["after"] - rss["before"]) * 1024
    assert increase < 3 * shard_bytes, f"peak RSS grew by {increase / 2**20:.0f} MiB"
    assert len(weight_files(tmp_path / "out")) == 4
    shard = "model-00002-of-00004.safetensors"
    merged, a, b = (load_file(tmp_path / name / shard) for name in ("out", "a", "b"))
    assert merged.keys() == a.keys()
    assert all(torch.allclose(merged[k].double(), 0.5 * a[k].double() + 0.5 * b[k].double(), atol=1e-6) for k in a)


# --- LoRA adapters ----------------------------------------------------------------------------------------------

def test_nanovlm_adapter_merged_into_its_base_gives_the_adapter_models_logits(base, tmp_path):
    model = adapted(base)  # LoRA on both towers, two ranks, B non-zero
    model.save_adapter(tmp_path / "adapter", str(base), modules_to_save=())
    out = main(["--adapter", str(tmp_path / "adapter"), str(base), "--out", str(tmp_path / "merged")])
    ids, pixels = llava_batch()
    with torch.no_grad():
        expected = model(ids, pixels)
        merged = VLM.from_pretrained(str(out)).eval()(ids, pixels)
        assert (merged - expected).abs().max() <= 1e-5
        assert (VLM.from_pretrained(str(base)).eval()(ids, pixels) - expected).abs().max() > 1e-3  # it acts
    assert hub_models.config(out) == hub_models.config(base)
    changed = json.loads((out / "merge.json").read_text())["adapted"]
    assert len(changed) == sum(len(json.loads((tmp_path / "adapter" / tower / "adapter_config.json").read_text())[
        "target_modules"]) for tower in ("language_model", "vision_tower"))


def test_peft_adapter_merged_into_its_base_gives_the_peft_models_logits(base, tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "fc1", "gate_proj"],
                             rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 6.0})
    model = peft.get_peft_model(transformers.LlavaForConditionalGeneration.from_pretrained(base), config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    model.save_pretrained(tmp_path / "adapter")
    out = merge_adapter(tmp_path / "adapter", base, tmp_path / "merged")
    ids, pixels = llava_batch()
    with torch.no_grad():
        expected = model(input_ids=ids, pixel_values=pixels).logits
        merged = transformers.LlavaForConditionalGeneration.from_pretrained(out).eval()(
            input_ids=ids, pixel_values=pixels).logits
    assert (merged - expected).abs().max() <= 1e-5


def test_bad_adapters_are_named_errors(base, tmp_path):
    model = adapted(base)
    model.save_adapter(tmp_path / "adapter", str(base), modules_to_save=())
    other = hub_models.llava(tmp_path / "other", hidden_size=32, num_attention_heads=2, num_key_value_heads=1)
    with pytest.raises(IncompatibleCheckpoints, match="shapes that differ"):
        merge_adapter(tmp_path / "adapter", other, tmp_path / "out")
    config_file = tmp_path / "adapter" / "language_model" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps(config | {"use_dora": True}))
    with pytest.raises(ValueError, match="unsupported adapter settings {'use_dora': True}"):
        merge_adapter(tmp_path / "adapter", base, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="not a LoRA adapter"):
        merge_adapter(tmp_path, base, tmp_path / "out")
    with pytest.raises(SystemExit):
        main(["--adapter", str(tmp_path / "adapter"), str(base), str(base), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
