"""The one training loop every recipe shares: torchrun DDP, gradient accumulation, AdamW, cosine schedule.

A recipe (a train_*.py script) says which parameters train at which learning rate and what the objective is;
this file does the rest:
- one process per device under torchrun (NCCL on GPU, gloo on CPU), or a single process without it;
- each optimizer step sees `global_batch_size` records whatever the world size and micro-batch size (a
  micro-batch too large for a process's share shrinks: nanovlm/data.py, batch_geometry); its loss is the sum
  over the step's targets divided by their total count across ranks and micro-batches, so one process and N
  processes follow the same loss curve, and accumulation micro-batches skip gradient sync; a step without a
  single target is an error, not a loss of 0;
- bf16 autocast on GPU; AdamW with one parameter group per part; linear warmup then cosine decay; gradient
  clipping;
- a step is applied only if it keeps everything finite: a non-finite loss or gradient norm (the norm the
  clipping computes anyway) stops the run before the optimizer moves; after the update one fused max-norm over
  the trained weights checks them, and a non-finite one puts back the weights of before the step (from a copy
  kept for that, the size of the trained weights) and stops the run. Either message names the step and the
  parameter groups; nothing of that step is saved, so the newest checkpoint always loads;
- checkpoints (trainable weights, optimizer, step, every rank's RNG state, what makes the run this run)
  written atomically every `save_every` steps; `resume` continues from the newest one exactly, and an output
  folder holding another run is refused unless told (nanovlm/train_state.py);
- Ctrl-C or SIGTERM lets the step in flight finish, saves a checkpoint, says how to resume and exits
  (128 + the signal's number); a second one stops at once;
- a tqdm bar on rank 0 and metrics in `metrics.jsonl` next to the checkpoints, with any extra metrics the
  objective reports (`Objective.metrics`, e.g. DPO's rewards), normalised like the loss, and the recipe's own
  evaluation every `eval_every` steps where it has one (an accuracy curve).
A dataset whose records are not single sequences (preference pairs) brings its own `collate(samples, pad_id)`.
With `fsdp` the processes shard the model instead of each holding a copy (nanovlm/sharding.py): the same
objectives, loss normalisation and checkpoints, written as shards; throughput (tokens/s a GPU, MFU) is logged
either way (nanovlm/throughput.py).
"""

from __future__ import annotations  # train() comes first and names classes defined below it

import atexit
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import ClassVar

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from .checkpoint import brief, write_json
from .config import check_ranges, ranged
from .data import batch_geometry, collate, step_batches
from .sharding import full, shard, total_norm, unshard
from .throughput import Throughput
from .train_state import checkpoints, recorded, restart_log, save_checkpoint, start


@dataclass
class TrainConfig:
    out_dir: str = "out/run"  # checkpoints, metrics.jsonl and the finished model
    global_batch_size: int = ranged(128, ">= 1")  # records per optimizer step, whatever the number of processes
    micro_batch_size: int = ranged(16, ">= 1")  # records per forward pass and process, at most; smaller when needed
    epochs: float = ranged(1.0, "> 0")  # passes over the data
    max_steps: int = ranged(0, ">= 0")  # > 0 overrides epochs
    lr: dict[str, float] = ranged(dict, "> 0")  # parameter group -> learning rate; absent groups freeze
    weight_decay: float = ranged(0.0, ">= 0")  # AdamW's, on matrices only (never on norms and biases)
    warmup_ratio: float = ranged(0.03, "[0, 1]")  # share of the steps with a linear warmup, before the cosine decay
    warmup_steps: int = ranged(0, ">= 0")  # > 0: this many warmup steps instead of warmup_ratio
    min_lr_ratio: float = ranged(0.0, "[0, 1]")  # the cosine decays to lr * min_lr_ratio
    grad_clip: float = ranged(1.0, "> 0")  # maximum norm of all trained parameters' gradient
    betas: tuple[float, float] = ranged((0.9, 0.999), ("[0, 1)", "[0, 1)"))  # AdamW's
    max_length: int = ranged(2048, ">= 1")  # tokens per sequence; longer ones are cut, never through an image
    skip_bad_records: bool = False  # drop (and count) bad records and images instead of stopping at the first
    allow_absolute_image_paths: bool = False  # records may name images outside the image folder (/..., ../...)
    group_by_length: bool = False  # micro-batches of similar lengths, so they pad less
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: less memory, more time
    fsdp: bool = False  # shard weights, gradients and optimizer state over the processes (FSDP2) instead of DDP
    save_every: int = ranged(500, ">= 0")  # steps between checkpoints (as transformers' Trainer); 0: none
    keep_checkpoints: int = ranged(2, ">= 1")  # the newest checkpoints kept
    resume: bool = False  # continue the run in out_dir from its newest checkpoint (started fresh if it has none)
    overwrite: bool = False  # start afresh in an out_dir that holds another run, deleting its checkpoints and log
    seed: int = ranged(0, ">= 0")  # data order and draws, and the initialisation of new weights (tiny, adapters)
    num_workers: int = ranged(0, ">= 0")  # data loader processes
    log_every: int = ranged(1, ">= 1")  # steps between lines of metrics.jsonl
    eval_every: int = ranged(0, ">= 0")  # steps between evaluations logged in metrics.jsonl (where there is one)
    eval_questions: int = ranged(600, ">= 1")  # eval questions scored by each of those evaluations

    # What a resumed run may change: where and how often it writes and reports, not what it computes.
    RESUME_MAY_CHANGE: ClassVar[tuple[str, ...]] = (
        "out_dir", "resume", "overwrite", "num_workers", "log_every", "save_every", "keep_checkpoints", "eval_every",
        "eval_questions", "gradient_checkpointing", "allow_absolute_image_paths")


def train(cfg: TrainConfig, objective: Objective, groups: dict[str, list[tuple[str, nn.Parameter]]],
          dataset: torch.utils.data.Dataset, pad_id: int, env: Distributed,
          evaluate: Callable[[], dict] | None = None, identity: dict | None = None) -> list[dict]:
    """Run the recipe; return the logged metrics. `groups` maps a learning-rate group name (a key of cfg.lr)
    to its named parameters; parameters outside every group in cfg.lr are frozen. `evaluate`, if given, runs
    on rank 0 every `eval_every` steps and after the last one; what it returns is logged as the step's "eval".
    `identity` holds what else makes this run this run (its data files, the method's settings): every
    checkpoint records it, and a resumed run must match it."""
    check_ranges(cfg)
    out_dir = Path(cfg.out_dir)
    unknown = set(cfg.lr) - set(groups)
    if unknown:
        raise ValueError(f"learning rates for unknown parameter groups {sorted(unknown)}; groups: {sorted(groups)}")
    chosen = [name for g in cfg.lr for name, _ in groups[g]]
    if len(chosen) != len(set(chosen)):
        raise ValueError(f"the learning-rate groups {sorted(cfg.lr)} share parameters: name a part as a whole "
                         f"(vision) or by its pieces (vision0, vision1), not both")
    if cfg.fsdp and evaluate is not None and cfg.eval_every:
        raise ValueError("--eval_every evaluates on rank 0 alone, which a sharded model cannot: train without --fsdp")
    for p in objective.parameters():
        p.requires_grad_(False)
    for g in cfg.lr:
        for _, p in groups[g]:
            p.requires_grad_(True)
            if env.device.type == "cuda":
                p.data = p.data.float()  # fp32 master weights; frozen ones may stay in bf16
    objective.to(env.device)
    sharded = objective if cfg.fsdp else None  # FSDP shards the objective in place
    if cfg.fsdp:
        groups = shard(objective, groups, env.device)
    model = objective if cfg.fsdp else wrap(objective, env)
    # The groups in one order whatever the order of --lr, so that a checkpoint's optimizer state fits.
    group_of = {name: g for g in sorted(cfg.lr) for name, _ in groups[g]}
    trainable = {name: p for g in sorted(cfg.lr) for name, p in groups[g]}
    params = list(trainable.values())
    optimizer = make_optimizer(cfg, groups)
    base_lrs = [g["lr"] for g in optimizer.param_groups]

    geometry = batch_geometry(cfg.global_batch_size, cfg.micro_batch_size, env.world_size)
    lengths = [dataset.length(i) for i in range(len(dataset))] if cfg.group_by_length else None
    steps_per_epoch = len(dataset) // cfg.global_batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{len(dataset)} records are fewer than one global batch of {cfg.global_batch_size}")
    total = cfg.max_steps or math.ceil(cfg.epochs * steps_per_epoch)
    warmup = cfg.warmup_steps or max(1, round(cfg.warmup_ratio * total))

    # An unsharded checkpoint resumes as it was written (one RNG state per rank); a sharded one on any number of
    # processes (torch.distributed.checkpoint reshards it), so with another split of a step's records too.
    config = recorded(cfg)
    if cfg.fsdp:
        del config["micro_batch_size"]
    identity = {"config": config} | ({} if cfg.fsdp else {"world_size": env.world_size}) | (identity or {})
    step = start(out_dir, cfg, trainable, optimizer, env, identity, sharded)
    throughput = Throughput(objective.model.cfg, env)
    log_file = out_dir / "metrics.jsonl"
    if env.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(out_dir / "train_config.json", asdict(cfg))
        restart_log(log_file, step)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=env.device.type == "cuda")
    before_step = [torch.empty_like(p) for p in params]  # the weights a non-finite update is undone to
    history, skipped, start_time, saved = [], 0, time.time(), step
    bar = tqdm(total=total, initial=step, disable=not env.main, desc=out_dir.name, dynamic_ncols=True)
    objective.train()
    with Interrupts() as interrupts:
        while step < total:
            epoch, offset = divmod(step, steps_per_epoch)
            plan = step_batches(len(dataset), geometry, env.rank, epoch, cfg.seed, lengths)
            plan = plan[offset:offset + total - step]
            dataset.set_epoch(epoch)  # before the loader's workers take their copy of the dataset
            loader = torch.utils.data.DataLoader(
                dataset, batch_sampler=[mb for s in plan for mb in s], num_workers=cfg.num_workers,
                collate_fn=partial(getattr(dataset, "collate", collate), pad_id=pad_id),
                worker_init_fn=ignore_interrupts)
            batches = iter(loader)
            for micro_batches in plan:
                batch_list = [to_device(next(batches), env.device) for _ in micro_batches]
                targets = env.sum(sum(objective.count(b) for b in batch_list))
                skipped += sum(b["skipped"] for b in batch_list)
                if targets == 0:
                    raise RuntimeError(f"step {step + 1} has no target tokens: every record of it was dropped (an "
                                       f"unreadable image, or answers that --max_length {cfg.max_length} cuts away)")
                for g, base in zip(optimizer.param_groups, base_lrs):
                    g["lr"] = base * lr_factor(step, total, warmup, cfg.min_lr_ratio)
                loss_sum, extra_sums = 0.0, {}
                for i, batch in enumerate(batch_list):
                    sync = i == len(batch_list) - 1 or env.world_size == 1
                    if cfg.fsdp:
                        model.set_requires_gradient_sync(sync)
                    with autocast, (nullcontext() if sync or cfg.fsdp else model.no_sync()):
                        loss = model(batch)
                        # DDP and FSDP average gradients over ranks; scale so the step's gradient is sum / total
                        # targets.
                        (loss * env.world_size / targets).backward()
                    loss_sum += loss.item()
                    for name, value in objective.metrics().items():
                        extra_sums[name] = extra_sums.get(name, 0.0) + value
                loss_value = env.sum(loss_sum) / targets
                extras = {name: env.sum(value) / targets for name, value in extra_sums.items()}
                if not math.isfinite(loss_value):
                    raise RuntimeError(f"non-finite loss {loss_value} at step {step + 1}{refused(out_dir)}; lower the "
                                       f"learning rate or check the data of this step")
                grad_norm = apply_step(optimizer, trainable, group_of, before_step, cfg.grad_clip, step + 1, out_dir)
                step += 1
                record = {"step": step, "epoch": epoch, "loss": loss_value, "grad_norm": float(grad_norm),
                          "lr": {g["name"]: g["lr"] for g in optimizer.param_groups}, "targets": int(targets),
                          "skipped_records": int(env.sum(skipped)) + sum(getattr(dataset, "skipped", {}).values()),
                          "elapsed_s": round(time.time() - start_time, 2)} | throughput.step(batch_list) | extras
                if evaluate and cfg.eval_every and (step % cfg.eval_every == 0 or step == total) and env.main:
                    record["eval"] = evaluate()  # the other ranks wait at the next step's first all-reduce
                    objective.train()
                history.append(record)
                if env.main and (step % cfg.log_every == 0 or step == total or "eval" in record):
                    with open(log_file, "a") as f:
                        f.write(json.dumps(record) + "\n")
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}", **{name: f"{value:.4f}" for name, value in extras.items()},
                                **throughput.shown(record))
                if cfg.save_every and step % cfg.save_every == 0 and step < total:
                    save_checkpoint(out_dir, step, trainable, optimizer, cfg, env, identity, sharded)
                    saved = step
                if env.sum(float(interrupts.received is not None)) > 0:  # every rank stops at the same step
                    bar.close()
                    if saved < step:
                        save_checkpoint(out_dir, step, trainable, optimizer, cfg, env, identity, sharded)
                    received = interrupts.received or signal.SIGTERM
                    if env.main:
                        print(f"{signal.Signals(received).name} after step {step} of {total}: saved "
                              f"{out_dir / f'checkpoint-{step}'}; to go on, run the same command with --resume",
                              file=sys.stderr)
                    raise SystemExit(128 + received)
    bar.close()
    if cfg.fsdp:
        del optimizer  # its state is freed before the full weights are gathered
        unshard(objective.model)
    return history


def apply_step(optimizer: torch.optim.Optimizer, trainable: dict[str, nn.Parameter], group_of: dict[str, str],
               before_step: list[torch.Tensor], grad_clip: float, step: int, out_dir: Path) -> torch.Tensor:
    """Clip the gradient and take the optimizer step, if the gradient and then the updated weights are finite
    (module docstring); return the gradient's norm before clipping."""
    params = list(trainable.values())
    grad_norm = total_norm([p.grad for p in params if p.grad is not None])
    if not torch.isfinite(grad_norm):
        grads = {name: p.grad for name, p in trainable.items() if p.grad is not None}
        raise RuntimeError(f"non-finite gradient at step {step} in {non_finite(grads, group_of)}{refused(out_dir)}; "
                           f"lower the learning rate or check the data of this step")
    torch.nn.utils.clip_grads_with_norm_(params, grad_clip, grad_norm)
    with torch.no_grad():
        for copy, p in zip(before_step, params):
            copy.copy_(p)
        optimizer.step()
        if not torch.isfinite(total_norm(params)):  # the 2-norm: a shard may be empty, which max() refuses
            where = non_finite(trainable, group_of)
            for copy, p in zip(before_step, params):
                p.copy_(copy)
            raise RuntimeError(f"non-finite weights after step {step} in {where}: they are put back as they were "
                               f"before it{refused(out_dir)}; lower the learning rate")
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def refused(out_dir: Path) -> str:
    found = checkpoints(out_dir)
    newest = f"the newest checkpoint is {found[-1]}" if found else "there is no checkpoint yet"
    return f"; the step is not applied and nothing of it is saved ({newest})"


def non_finite(tensors: dict[str, torch.Tensor], group_of: dict[str, str]) -> str:
    """Which parameter groups, and which of their tensors, hold a NaN or an infinity."""
    bad = [name for name, t in tensors.items() if not torch.isfinite(full(t)).all()]
    return f"group {', '.join(sorted({group_of[name] for name in bad}))} ({brief(bad, 3)})"


class Interrupts:
    """While training, SIGINT (Ctrl-C) and SIGTERM (a scheduler's notice) are noted, not acted on at once: the loop
    finishes its step, saves and stops. The handler only records the signal (printing from a handler can
    interrupt a print in progress); it also puts the previous handler back, so a second signal acts at once.
    Outside the main thread (no signals there) it does nothing."""

    def __enter__(self) -> Interrupts:
        self.received: int | None = None
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self.note) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def note(self, signum: int, frame) -> None:
        self.received = signum
        signal.signal(signum, self.previous[signum])

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def ignore_interrupts(worker_id: int) -> None:
    """A data loader worker leaves Ctrl-C and SIGTERM (sent to the whole process group) to the loop, which saves
    before it stops; the worker ends with its parent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class Objective(nn.Module):
    """What a recipe minimises. forward(batch) -> the loss summed over the batch's targets; count(batch) -> how
    many targets it has (known before the forward pass, for normalising a whole step)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def count(self, batch: dict) -> int:
        return int((batch["labels"][:, 1:] != -100).sum())

    def forward(self, batch: dict) -> torch.Tensor:
        return self.model.loss(batch["input_ids"], batch["labels"], batch["pixel_values"], reduction="sum")

    def metrics(self) -> dict[str, float]:
        """Extra metrics of the last forward pass, each summed over its targets like the loss: the loop sums
        them over micro-batches and ranks, divides by the step's target count and logs them beside the loss."""
        return {}


class Distributed:
    """Rank, world size and device; torchrun's environment variables start the process group."""

    def __init__(self):
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if torch.cuda.is_available():
            self.device = torch.device("cuda", local_rank)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        if self.world_size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            atexit.register(self.close)
        # Every sum goes through this one tensor, kept for the life of the process. The backend frees a collective's
        # work on its own thread after the caller has the result (gloo's barrier even keeps the works before it),
        # and destroying the group does not join that thread (DDP keeps the group alive). A thread that drops the
        # last reference to a tensor made in Python takes the GIL, and once the interpreter is finalizing, Python
        # 3.11 ends such a thread, which aborts the process at exit ("terminate called without an active
        # exception"). `close` waits until the backend has let go of this tensor.
        self.scalar = torch.zeros((), dtype=torch.float64, device=self.device)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, value: float) -> float:
        if self.world_size == 1:
            return value
        self.scalar.fill_(float(value))
        dist.all_reduce(self.scalar)
        return self.scalar.item()

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (filling a cache, say), then the other ranks."""
        if not self.main:
            self.barrier()
        yield
        if self.main:
            self.barrier()

    def close(self) -> None:
        """Destroy the process group once the backend's threads hold no reference to `scalar` (see __init__)."""
        if dist.is_initialized():
            deadline = time.monotonic() + 10
            while self.scalar._use_count() > 1 and time.monotonic() < deadline:
                time.sleep(0.001)
            dist.destroy_process_group()


def make_optimizer(cfg: TrainConfig, groups: dict[str, list[tuple[str, nn.Parameter]]]) -> torch.optim.AdamW:
    """AdamW with one parameter group per trained part, split into matrices (decayed) and norms and biases
    (never decayed)."""
    param_groups = []
    for name, lr in sorted(cfg.lr.items()):
        for decayed in (True, False):
            params = [p for _, p in groups[name] if (p.ndim >= 2 and cfg.weight_decay > 0) == decayed]
            if params:
                param_groups.append({"params": params, "lr": lr, "name": name + "/decay" * decayed,
                                     "weight_decay": cfg.weight_decay if decayed else 0.0})
    return torch.optim.AdamW(param_groups, betas=cfg.betas)


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """The learning rate at `step` over the base one: linear warmup, then cosine decay to `min_ratio`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def wrap(objective: Objective, env: Distributed) -> nn.Module:
    # Some micro-batches use no image (text-only samples), leaving the projector and vision tower unused.
    if env.world_size == 1:
        return objective
    return nn.parallel.DistributedDataParallel(objective, find_unused_parameters=True)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
