"""FSDP (nanovlm/sharding.py) on CPU with gloo: it follows the single-process loss curve and ends with DDP's
weights, resumes exactly from its sharded checkpoints, on the same or another number of processes, trains
SQ-LLaVA's LoRA adapters, and its memory plan (nanovlm/memory_plan.py) matches a hand computation."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from nanovlm.memory_plan import ARCHITECTURES, GiB, plan
from nanovlm.vlm import VLM
from test_train import ENV, command, launch

STEPS = ["--max_steps", "6", "--save_every", "3"]


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant: torchrun starts each worker in a session of its own, so killing
    its process group leaves the workers running (and finishing the run)."""
    tree, i = [pid], 0
    while i < len(tree):
        children = Path(f"/proc/{tree[i]}/task/{tree[i]}/children")
        tree += [int(c) for c in children.read_text().split()] if children.exists() else []
        i += 1
    for member in tree:
        os.kill(member, signal.SIGKILL)


def losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_curve(a, b, tolerance=1e-5):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert abs(x - y) <= tolerance * abs(x), (a, b)


def test_memory_plan_of_llava15_7b_on_8_gpus_by_hand():
    """LLaVA-1.5-7B's stage 2 (projector + LLM trained) under FSDP on 8 processes, micro-batch 16 of 2048 tokens,
    gradient checkpointing: every number recomputed here from the architecture."""
    vision_layer = 4 * (1024 * 1024 + 1024) + (1024 * 4096 + 4096) + (4096 * 1024 + 1024) + 2 * 2 * 1024
    vision = 3 * 14 * 14 * 1024 + 1024 + 577 * 1024 + 2 * 1024 + 24 * vision_layer + 2 * 1024  # CLIP ViT-L/14-336
    projector = 1024 * 4096 + 4096 + 4096 * 4096 + 4096
    llm_layer = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096
    llm = 32000 * 4096 + 32 * llm_layer + 4096 + 4096 * 32000  # Vicuna-7B: embeddings, layers, norm, lm_head
    assert (vision, llm) == (303_507_456, 6_738_415_616)  # the published sizes of both checkpoints
    params, trained = vision + projector + llm, projector + llm
    tokens = 16 * 2048
    expected = {"weights": (4 * trained + 2 * vision) / 8, "gradients": 4 * trained / 8, "optimizer": 8 * trained / 8,
                "working_set": 2 * (params - 32 * llm_layer - 24 * vision_layer) + 2 * 2 * llm_layer + 4 * llm_layer,
                "activations": 32 * 2 * tokens * 4096 + tokens * (16 * 4096 + 6 * 11008),
                "logits": 10 * tokens * 32000}
    estimate = plan(ARCHITECTURES["llava15-7b"], ["projector", "llm"], world_size=8, micro_batch=16, accumulation=1,
                    max_length=2048, gradient_checkpointing=True, fsdp=True)
    assert (estimate.params, estimate.trainable) == (params, trained)
    assert {name: getattr(estimate, name) for name in expected} == pytest.approx(expected)
    assert estimate.fits(40 * GiB) and not estimate.fits(32 * GiB)
    # accumulating micro-batches of 8 keeps the whole fp32 gradient: 8x40 GB no longer fits, 8x80 GB does
    accumulating = plan(ARCHITECTURES["llava15-7b"], ["projector", "llm"], 8, 8, 2, 2048, True, True)
    assert accumulating.gradients == pytest.approx(4 * trained / 8 + 4 * trained)
    assert not accumulating.fits(40 * GiB) and accumulating.fits(80 * GiB)
    ddp = plan(ARCHITECTURES["llava15-7b"], ["projector", "llm"], 8, 16, 1, 2048, True, False)
    assert ddp.optimizer == 8 * trained and not ddp.fits(80 * GiB)


def test_dry_run_prints_the_plan_and_stops_without_a_gpu(tmp_path):
    run = subprocess.run(command("train_sft.py", "--preset", "llava15-7b", "--dry_run"), cwd=tmp_path,
                         env=ENV | {"WORLD_SIZE": "8", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)},
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "llava15-7b, FSDP over 8 process(es), micro-batch 16 x 2048 tokens" in run.stdout
    assert "parameters 7.063 B, trained 6.759 B" in run.stdout
    assert "does NOT fit on 24 GiB, fits on 40 GiB, fits on 80 GiB" in run.stdout
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_fsdp_follows_one_process_ends_with_ddp_weights_and_loads_in_transformers(world, init, tmp_path):
    from transformers import LlavaForConditionalGeneration

    args = ["--max_steps", "4", "--micro_batch_size", "2"]  # 2 processes: 2 accumulation micro-batches each
    one = launch(init, world, tmp_path / "one", *args)
    fsdp = launch(init, world, tmp_path / "fsdp", *args, "--fsdp", processes=2)
    ddp = launch(init, world, tmp_path / "ddp", *args, processes=2)
    assert_same_curve([r["loss"] for r in one], [r["loss"] for r in fsdp])
    assert_same_curve([r["loss"] for r in ddp], [r["loss"] for r in fsdp])
    assert all(r["tokens_per_s_per_gpu"] > 0 and "mfu" not in r for r in fsdp)  # no MFU without a GPU's peak
    sharded, replicated = VLM.from_pretrained(str(tmp_path / "fsdp")), VLM.from_pretrained(str(tmp_path / "ddp"))
    for (name, p), q in zip(sharded.state_dict().items(), replicated.state_dict().values()):
        assert torch.allclose(p, q, atol=1e-5), name
    assert not torch.equal(sharded.language_model.layers[0].mlp.up_proj.weight,
                           VLM.from_pretrained(str(init)).language_model.layers[0].mlp.up_proj.weight)
    reference = LlavaForConditionalGeneration.from_pretrained(tmp_path / "fsdp").eval()
    ids = torch.tensor([[1, 5, 9, 11, 40, 2]])
    with torch.no_grad():
        assert torch.allclose(sharded(ids), reference(input_ids=ids).logits, atol=1e-5)


@pytest.mark.slow
def test_fsdp_killed_run_resumes_on_the_same_curve_on_2_1_and_4_processes(world, init, tmp_path):
    whole = launch(init, world, tmp_path / "whole", *STEPS, "--fsdp", processes=2)
    line = ["--init", str(init), "--data", str(world / "instruct.json"), "--out_dir", str(tmp_path / "cut"),
            "--global_batch_size", "16", *STEPS, "--fsdp"]
    victim = subprocess.Popen(command("train_sft.py", *line, processes=2), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env=ENV, start_new_session=True)
    deadline = time.time() + 240
    while not (tmp_path / "cut" / "checkpoint-3").is_dir() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    kill_tree(victim.pid)
    assert victim.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoint-3" / "sharded").glob("*.distcp")) == [
        "__0_0.distcp", "__1_0.distcp"]
    for processes in (1, 4):  # DCP reshards the 2 processes' checkpoint
        other = tmp_path / f"on{processes}"
        other.mkdir()
        subprocess.run(["cp", "-r", str(tmp_path / "cut" / "checkpoint-3"), str(tmp_path / "cut" / "metrics.jsonl"),
                        str(other)], check=True)
        resumed = launch(init, world, other, *STEPS, "--fsdp", "--resume", processes=processes)
        assert [r["step"] for r in resumed] == list(range(1, 7))
        assert_same_curve([r["loss"] for r in whole], [r["loss"] for r in resumed])
    resumed = launch(init, world, tmp_path / "cut", *STEPS, "--fsdp", "--resume", processes=2)
    assert_same_curve([r["loss"] for r in whole], [r["loss"] for r in resumed], 1e-6)


@pytest.mark.slow
def test_sq_llava_lora_trains_under_fsdp_as_under_ddp(world, init, tmp_path):
    """SQ-LLaVA's LoRA on both towers, its prototype extractor and projector, sharded: the same curve as DDP,
    and the adapters it saves have trained (LoRA's B starts at zero)."""
    args = ["--max_steps", "3", "--micro_batch_size", "4"]
    fsdp = launch(init, world, tmp_path / "fsdp", *args, "--fsdp", processes=2, script="train_selfq.py")
    ddp = launch(init, world, tmp_path / "ddp", *args, processes=2, script="train_selfq.py")
    assert_same_curve([r["loss"] for r in ddp], [r["loss"] for r in fsdp])
    adapter = json.loads((tmp_path / "fsdp" / "adapter" / "language_model" / "adapter_config.json").read_text())
    assert adapter["r"] == 8
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "fsdp" / "adapter" / "language_model" / "adapter_model.safetensors")
    assert all(weights[k].abs().sum() > 0 for k in weights if ".lora_B." in k)


def test_stic_dpo_with_its_adapter_disabled_reference_runs_sharded(world, init, tmp_path):
    """STIC's DPO (a policy and an adapter-disabled reference pass through the same sharded weights) on one
    process under FSDP, against the plain loop; afterwards the model is a plain one again, adapters trained."""
    import torch.distributed as dist

    from nanovlm.dpo import DPOObjective, PreferenceDataset
    from nanovlm.lora import lora_layers
    from nanovlm.templates import get_template
    from nanovlm.train import Distributed, TrainConfig, train
    from test_stic import adapted_model, write_pairs

    runs = {}
    try:
        for fsdp in (False, True):
            model, tokenizer, processor = adapted_model(init)
            pairs = PreferenceDataset(write_pairs(world, tmp_path / "pairs.jsonl"), world, tokenizer,
                                      get_template(model.cfg.template), processor, model.cfg.num_image_tokens(), 512)
            cfg = TrainConfig(out_dir=str(tmp_path / f"fsdp{fsdp}"), global_batch_size=8, micro_batch_size=4,
                              max_steps=3, lr={"llm_lora": 1e-3}, fsdp=fsdp)
            runs[fsdp] = train(cfg, DPOObjective(model), model.parameter_groups(), pairs, tokenizer.pad_id,
                               Distributed())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    for a, b in zip(runs[False], runs[True]):
        for name in ("loss", "reward_margin", "chosen_logp"):
            assert a[name] == pytest.approx(b[name], rel=1e-5, abs=1e-6), name
    assert runs[True][-1]["reward_margin"] > 0
    layers = lora_layers(model)
    assert layers and all(type(p) is torch.nn.Parameter for p in model.parameters())  # no DTensor left
    assert all(layer.lora_B.weight.abs().sum() > 0 for layer in layers.values())
    model.save_adapter(tmp_path / "adapter", str(init), modules_to_save=())
