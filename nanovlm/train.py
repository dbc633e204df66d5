"""The one training loop every recipe shares: torchrun DDP, gradient accumulation, AdamW, cosine schedule.

A recipe (a train_*.py script) says which parameters train at which learning rate and what the objective is;
this file does the rest:
- one process per device under torchrun (NCCL on GPU, gloo on CPU), or a single process without it;
- each optimizer step sees `global_batch_size` records whatever the world size and micro-batch size (a
  micro-batch too large for a process's share shrinks: nanovlm/data.py, batch_geometry); its loss is the sum
  over the step's targets divided by their total count across ranks and micro-batches, so one process and N
  processes follow the same loss curve, and accumulation micro-batches skip gradient sync;
- bf16 autocast on GPU; AdamW with one parameter group per part; linear warmup then cosine decay; gradient
  clipping; a non-finite loss stops the run;
- checkpoints (trainable weights, optimizer, step, every rank's RNG state, config) written atomically every
  `save_every` steps; `resume` continues from the newest one exactly (nanovlm/train_state.py);
- a tqdm bar on rank 0 and metrics in `metrics.jsonl` next to the checkpoints, with any extra metrics the
  objective reports (`Objective.metrics`, e.g. DPO's rewards), normalised like the loss, and the recipe's own
  evaluation every `eval_every` steps where it has one (an accuracy curve).
A dataset whose records are not single sequences (preference pairs) brings its own `collate(samples, pad_id)`.
With `fsdp` the processes shard the model instead of each holding a copy (nanovlm/sharding.py): the same
objectives, loss normalisation and checkpoints, written as shards; throughput (tokens/s a GPU, MFU) is logged
either way (nanovlm/throughput.py).
"""

from __future__ import annotations  # train() comes first and names classes defined below it

import json
import math
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from .checkpoint import write_json
from .data import batch_geometry, collate, step_batches
from .sharding import clip_grad_norm, shard, unshard
from .throughput import Throughput
from .train_state import checkpoints, load_checkpoint, restart_log, save_checkpoint


@dataclass
class TrainConfig:
    out_dir: str = "out/run"  # checkpoints, metrics.jsonl and the finished model
    global_batch_size: int = 128  # records per optimizer step, whatever the number of processes
    micro_batch_size: int = 16  # records per forward pass and process, at most; smaller when global / world needs it
    epochs: float = 1.0  # passes over the data
    max_steps: int = 0  # > 0 overrides epochs
    lr: dict[str, float] = field(default_factory=dict)  # parameter group -> learning rate; absent groups freeze
    weight_decay: float = 0.0  # AdamW's, on matrices only (never on norms and biases)
    warmup_ratio: float = 0.03  # share of the steps with a linear warmup, before the cosine decay
    warmup_steps: int = 0  # > 0: this many warmup steps instead of warmup_ratio
    min_lr_ratio: float = 0.0  # the cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0  # maximum norm of all trained parameters' gradient
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW's
    max_length: int = 2048  # tokens per sequence; longer ones are cut, never through an image
    skip_bad_records: bool = False  # drop (and count) bad records instead of stopping with their file and index
    group_by_length: bool = False  # micro-batches of similar lengths, so they pad less
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: less memory, more time
    fsdp: bool = False  # shard weights, gradients and optimizer state over the processes (FSDP2) instead of DDP
    save_every: int = 0  # steps between checkpoints; 0: no checkpoint, only the finished model
    keep_checkpoints: int = 2  # the newest checkpoints kept
    resume: bool = False  # continue from the newest checkpoint in out_dir
    seed: int = 0  # data order and draws, and the initialisation of new weights (tiny preset, adapters)
    num_workers: int = 0  # data loader processes
    log_every: int = 1  # steps between lines of metrics.jsonl
    eval_every: int = 0  # steps between evaluations logged in metrics.jsonl (where the script has one); 0: none
    eval_questions: int = 600  # eval questions scored by each of those evaluations, spread over the eval set


def train(cfg: TrainConfig, objective: Objective, groups: dict[str, list[tuple[str, nn.Parameter]]],
          dataset: torch.utils.data.Dataset, pad_id: int, env: Distributed,
          evaluate: Callable[[], dict] | None = None) -> list[dict]:
    """Run the recipe; return the logged metrics. `groups` maps a learning-rate group name (a key of cfg.lr)
    to its named parameters; parameters outside every group in cfg.lr are frozen. `evaluate`, if given, runs
    on rank 0 every `eval_every` steps and after the last one; what it returns is logged as the step's "eval"."""
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
    trainable = {name: p for g in cfg.lr for name, p in groups[g]}
    optimizer = make_optimizer(cfg, groups)
    base_lrs = [g["lr"] for g in optimizer.param_groups]

    geometry = batch_geometry(cfg.global_batch_size, cfg.micro_batch_size, env.world_size)
    lengths = [dataset.length(i) for i in range(len(dataset))] if cfg.group_by_length else None
    steps_per_epoch = len(dataset) // cfg.global_batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{len(dataset)} records are fewer than one global batch of {cfg.global_batch_size}")
    total = cfg.max_steps or math.ceil(cfg.epochs * steps_per_epoch)
    warmup = cfg.warmup_steps or max(1, round(cfg.warmup_ratio * total))

    step = 0
    if cfg.resume and checkpoints(out_dir):
        step = load_checkpoint(checkpoints(out_dir)[-1], trainable, optimizer, env, sharded)
    throughput = Throughput(objective.model.cfg, env)
    log_file = out_dir / "metrics.jsonl"
    if env.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(out_dir / "train_config.json", asdict(cfg))
        restart_log(log_file, step)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=env.device.type == "cuda")
    history, skipped, start_time = [], 0, time.time()
    bar = tqdm(total=total, initial=step, disable=not env.main, desc=out_dir.name, dynamic_ncols=True)
    objective.train()
    while step < total:
        epoch, offset = divmod(step, steps_per_epoch)
        plan = step_batches(len(dataset), geometry, env.rank, epoch, cfg.seed, lengths)[offset:offset + total - step]
        dataset.set_epoch(epoch)  # before the loader's workers take their copy of the dataset
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=[mb for s in plan for mb in s],
                                             collate_fn=partial(getattr(dataset, "collate", collate), pad_id=pad_id),
                                             num_workers=cfg.num_workers)
        batches = iter(loader)
        for micro_batches in plan:
            batch_list = [to_device(next(batches), env.device) for _ in micro_batches]
            targets = env.sum(sum(objective.count(b) for b in batch_list))
            skipped += sum(b["skipped"] for b in batch_list)
            for g, base in zip(optimizer.param_groups, base_lrs):
                g["lr"] = base * lr_factor(step, total, warmup, cfg.min_lr_ratio)
            loss_sum, extra_sums = 0.0, {}
            for i, batch in enumerate(batch_list):
                sync = i == len(batch_list) - 1 or env.world_size == 1
                if cfg.fsdp:
                    model.set_requires_gradient_sync(sync)
                with autocast, (nullcontext() if sync or cfg.fsdp else model.no_sync()):
                    loss = model(batch)
                    # DDP and FSDP average gradients over ranks; scale so the step's gradient is sum / total targets.
                    (loss * env.world_size / max(targets, 1)).backward()
                loss_sum += loss.item()
                for name, value in objective.metrics().items():
                    extra_sums[name] = extra_sums.get(name, 0.0) + value
            loss_value = env.sum(loss_sum) / max(targets, 1)
            extras = {name: env.sum(value) / max(targets, 1) for name, value in extra_sums.items()}
            if not math.isfinite(loss_value):
                raise RuntimeError(f"non-finite loss {loss_value} at step {step}; stopping (lower the learning rate "
                                   f"or check the data of this step)")
            grad_norm = clip_grad_norm(list(trainable.values()), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            record = {"step": step, "epoch": epoch, "loss": loss_value, "grad_norm": float(grad_norm),
                      "lr": {g["name"]: g["lr"] for g in optimizer.param_groups}, "targets": int(targets),
                      "skipped_records": int(env.sum(skipped)) + sum(getattr(dataset, "skipped", {}).values()),
                      "elapsed_s": round(time.time() - start_time, 2)} | throughput.step(batch_list) | extras
            if evaluate is not None and cfg.eval_every and (step % cfg.eval_every == 0 or step == total) and env.main:
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
                save_checkpoint(out_dir, step, trainable, optimizer, cfg, env, cfg.keep_checkpoints, sharded)
    bar.close()
    if cfg.fsdp:
        del optimizer  # its state is freed before the full weights are gathered
        unshard(objective.model)
    return history


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

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, value: float) -> float:
        if self.world_size == 1:
            return value
        t = torch.tensor(float(value), dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item()

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def make_optimizer(cfg: TrainConfig, groups: dict[str, list[tuple[str, nn.Parameter]]]) -> torch.optim.AdamW:
    """AdamW with one parameter group per trained part, split into matrices (decayed) and norms and biases
    (never decayed)."""
    param_groups = []
    for name, lr in cfg.lr.items():
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
