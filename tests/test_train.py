"""The shared training loop: the loss goes down, torchrun with 2 processes equals 1, a killed run resumes exactly."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nanovlm.data import DataSource, LLaVADataset
from nanovlm.presets import tiny_model
from nanovlm.templates import get_template
from nanovlm.train import Distributed, Objective, TrainConfig, lr_factor, train
from nanovlm.vlm import VLM, load_pretrained
from train_align import shapes_corpus

ROOT = Path(__file__).resolve().parents[1]


def command(script: str, *args: str, processes: int = 1) -> list[str]:
    """The command line of a training script, as one process or under torchrun (gloo on CPU)."""
    line = [str(ROOT / script), *args]
    if processes == 1:
        return [sys.executable, *line]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}", "--master_addr=127.0.0.1",
            f"--master_port={port}", *line]


ENV = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def run_script(script: str, *args: str, processes: int = 1, cwd: Path = ROOT,
               timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a training script to its end (a failure shows its stderr); its output."""
    run = subprocess.run(command(script, *args, processes=processes), cwd=cwd, capture_output=True, text=True,
                         env=ENV, timeout=timeout)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def launch(init, world, out, *args, processes=1, timeout=300, wait=True, script="train_sft.py",
           data="instruct.json"):
    """Run a training script on the small world from `init`, as one process or under torchrun; its metrics."""
    line = ["--init", str(init), "--data", str(world / data), "--out_dir", str(out), "--global_batch_size", "16", *args]
    if not wait:
        return subprocess.Popen(command(script, *line, processes=processes), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, env=ENV)
    run_script(script, *line, processes=processes, timeout=timeout)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_loss_goes_down(world, tmp_path):
    model, tokenizer, processor = tiny_model(shapes_corpus(world, "vicuna_v1"))
    data = LLaVADataset([DataSource(world / "instruct.json")], tokenizer, get_template("vicuna_v1"), processor,
                        model.cfg.num_image_tokens(), 512)
    cfg = TrainConfig(out_dir=str(tmp_path), global_batch_size=16, micro_batch_size=16, max_steps=30,
                      lr={"vision": 1e-3, "projector": 1e-3, "llm": 1e-3})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    history = train(cfg, Objective(model), model.parameter_groups(), data, tokenizer.pad_id,
                    Distributed())
    assert history[-1]["loss"] < 0.6 * history[0]["loss"]
    unchanged = [k for k, v in model.state_dict().items() if torch.equal(before[k], v)]
    assert unchanged == ["vision_tower.post_layernorm.weight", "vision_tower.post_layernorm.bias"]  # unused


def test_frozen_parts_do_not_change(world, init, tmp_path):
    model = VLM.from_pretrained(str(init))
    history = launch(init, world, tmp_path / "run", "--max_steps", "2", "--micro_batch_size", "8",
                     "--lr", "projector=1e-3")
    trained = VLM.from_pretrained(str(tmp_path / "run"))
    assert len(history) == 2
    for part, params in trained.parameter_groups().items():
        original = dict(model.parameter_groups()[part])
        changed = [not torch.equal(p, original[name]) for name, p in params]
        assert all(changed) if part == "projector" else not any(changed), part


def test_non_finite_loss_stops_the_run(world, tmp_path):
    class Exploding(Objective):
        def forward(self, batch):
            return super().forward(batch) * float("nan")

    model, tokenizer, processor = tiny_model(shapes_corpus(world, "vicuna_v1"))
    data = LLaVADataset([DataSource(world / "instruct.json")], tokenizer, get_template("vicuna_v1"), processor,
                        model.cfg.num_image_tokens(), 512)
    cfg = TrainConfig(out_dir=str(tmp_path), global_batch_size=16, micro_batch_size=16, max_steps=3,
                      lr={"llm": 1e-3})
    with pytest.raises(RuntimeError, match="non-finite loss nan at step 1"):
        train(cfg, Exploding(model), model.parameter_groups(), data, tokenizer.pad_id, Distributed())


def test_the_logged_learning_rate_follows_warmup_then_cosine(world, tmp_path):
    """Step s (1-based, as logged) trains at lr x f(s): a linear warmup that reaches the base rate at the end of
    warmup_steps (the first step already moves: f(1) = 1 / warmup), then a cosine from 1 to min_lr_ratio over
    the remaining steps. The values are written out for warmup 2, 6 steps, min_lr_ratio 0.1."""
    expected = [0.5, 1.0, 1.0, 0.1 + 0.45 * (1 + 0.5 ** 0.5), 0.55, 0.1 + 0.45 * (1 - 0.5 ** 0.5)]
    assert [lr_factor(s, 6, 2, 0.1) for s in range(6)] == pytest.approx(expected, abs=1e-12)
    model, tokenizer, processor = tiny_model(shapes_corpus(world, "vicuna_v1"))
    data = LLaVADataset([DataSource(world / "instruct.json")], tokenizer, get_template("vicuna_v1"), processor,
                        model.cfg.num_image_tokens(), 512)
    cfg = TrainConfig(out_dir=str(tmp_path), global_batch_size=8, micro_batch_size=8, max_steps=6, warmup_steps=2,
                      min_lr_ratio=0.1, lr={"projector": 1e-3, "llm": 2e-3})
    history = train(cfg, Objective(model), model.parameter_groups(), data, tokenizer.pad_id, Distributed())
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in history] == [r["lr"] for r in logged]
    for record, f in zip(logged, expected):
        assert record["lr"] == pytest.approx({"projector": 1e-3 * f, "llm": 2e-3 * f}, rel=1e-12), record
    # the default warmup is 3% of the steps, at least one
    assert [lr_factor(s, 100, 3, 0.0) for s in range(3)] == pytest.approx([1 / 3, 2 / 3, 1.0])


@pytest.mark.slow
def test_two_processes_follow_the_single_process_loss_curve(world, init, tmp_path):
    single = launch(init, world, tmp_path / "one", "--max_steps", "4", "--micro_batch_size", "8")
    double = launch(init, world, tmp_path / "two", "--max_steps", "4", "--micro_batch_size", "4", processes=2)
    assert [round(r["targets"]) for r in single] == [round(r["targets"]) for r in double]
    for a, b in zip(single, double):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"]), (a, b)
        # the gradient too: DDP averages over ranks, so each rank scales its part by the world size
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * a["grad_norm"], (a, b)
    one, two = VLM.from_pretrained(str(tmp_path / "one")), VLM.from_pretrained(str(tmp_path / "two"))
    for (name, p), q in zip(one.state_dict().items(), two.state_dict().values()):
        assert torch.allclose(p, q, atol=1e-5), name
    assert not list((tmp_path / "two").glob("checkpoint-*")) and (tmp_path / "two" / "model.safetensors").is_file()


@pytest.mark.slow
def test_killed_run_resumes_on_the_same_loss_curve(world, init, tmp_path):
    args = ["--max_steps", "12", "--save_every", "3", "--micro_batch_size", "8"]
    uninterrupted = launch(init, world, tmp_path / "whole", *args)
    victim = launch(init, world, tmp_path / "cut", *args, wait=False)
    deadline = time.time() + 240
    while not (tmp_path / "cut" / "checkpoint-6").is_dir() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    resumed = launch(init, world, tmp_path / "cut", *args, "--resume")
    assert [r["step"] for r in resumed] == list(range(1, 13))
    for a, b in zip(uninterrupted, resumed):
        assert abs(a["loss"] - b["loss"]) <= 1e-6 * abs(a["loss"]), (a, b)
    assert not list((tmp_path / "cut").glob("checkpoint-*"))  # the finished model supersedes them


@pytest.mark.slow
def test_default_align_run_builds_the_shapes_world_and_a_loadable_model(tmp_path):
    """The README's first command, shortened: no --data, so it generates the shapes world in ./out/shapes."""
    run = subprocess.run([sys.executable, str(ROOT / "train_align.py"), "--max_steps", "3"], cwd=tmp_path,
                         env=os.environ | {"PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "out" / "shapes" / "world.json").is_file()
    model, tokenizer, processor = load_pretrained(str(tmp_path / "out" / "tiny" / "align"))
    history = [json.loads(line) for line in (tmp_path / "out" / "tiny" / "align" / "metrics.jsonl").open()]
    assert [r["step"] for r in history] == [1, 2, 3] and history[-1]["loss"] < history[0]["loss"]
    # the learnt tokenizer knows the world's words and the chat template's: one token each, no byte pieces
    assert len(tokenizer.encode(" ASSISTANT: yellow triangle")) <= 5
    assert model.cfg.image_token_id == tokenizer.image_token_id


@pytest.mark.slow
def test_torchrun_four_processes_run_every_script_with_its_defaults(world, init, tmp_path):
    """The headline commands under torchrun --nproc_per_node=4, each with its preset's batch (16 or 32 records, in
    micro-batches too large for a process's share), pointed at the small world; stage 2 and SQ-LLaVA continue
    stage 1 from out/tiny/align as they do by default."""
    stages = [("train_align.py", "align", 16, ["--init", str(init), "--data", str(world / "captions.json")]),
              ("train_sft.py", "sft", 32, ["--data", str(world / "instruct.json")]),
              ("train_selfq.py", "selfq", 32, ["--data", str(world / "instruct.json")])]
    for script, stage, records, args in stages:
        run = run_script(script, "--max_steps", "2", *args, processes=4, cwd=tmp_path)
        share = f"batch: {records} records per step = 4 process(es) x {records // 4} records x 1 accumulation"
        assert run.stdout.count(share) == 1
        history = [json.loads(line) for line in (tmp_path / "out" / "tiny" / stage / "metrics.jsonl").open()]
        assert [r["step"] for r in history] == [1, 2] and all(r["targets"] > 0 for r in history)
        assert (tmp_path / "out" / "tiny" / stage / "model.safetensors").is_file()
    assert "has no prototype extractor; adding a new one with 8 centres" in run.stdout  # LLaVA's stage 1


@pytest.mark.parametrize("script", ["train_align.py", "train_sft.py", "train_selfq.py"])
def test_impossible_split_stops_before_any_model_is_loaded(script, tmp_path):
    """Under torchrun with 3 processes (its environment, one process) the 7B preset's global batch cannot be
    shared: the run stops in seconds with the numbers and values that work. Loading the model first would
    fail differently: its checkpoints are not in this empty, offline Hub cache."""
    env = ENV | {"WORLD_SIZE": "3", "RANK": "0", "LOCAL_RANK": "0", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    start = time.time()
    run = subprocess.run(command(script, "--preset", "llava15-7b", "--data", "absent.json"), cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60)
    elapsed = time.time() - start
    batch = 256 if script == "train_align.py" else 128
    assert run.returncode != 0
    assert f"a global batch of {batch} records cannot be split over 3 processes" in run.stderr, run.stderr[-2000:]
    assert f"--global_batch_size {(batch // 3 + 1) * 3} or {batch // 3 * 3}" in run.stderr and "Hub" not in run.stderr
    assert elapsed < 5, elapsed
