"""Training state on disk, for an exact resume: the checkpoint-STEP/ folders and the metrics log.

A checkpoint holds what a run needs to go on along the same loss curve: the trainable weights, the optimizer,
the step and every rank's RNG state (Python, NumPy, torch, CUDA). A killed run leaves whole checkpoints only,
the newest `keep` are kept, and a resumed run's metrics.jsonl is cut back to its checkpoint's step. Sharding
(--fsdp) changes what is written: each rank writes its shard of the trainable weights and the optimizer
(torch.distributed.checkpoint, nanovlm/sharding.py), and a run resumes from it on any number of processes.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file

from .checkpoint import atomic_write, write_json, write_weights
from .sharding import load_sharded, save_sharded

if TYPE_CHECKING:  # train.py imports this module
    from .train import Distributed, TrainConfig


def rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": [keys.tolist(), pos, has_gauss, gauss],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoints(out_dir: Path) -> list[Path]:
    """The complete checkpoints in `out_dir`, oldest first."""
    return sorted(out_dir.glob("checkpoint-*[0-9]"), key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(out_dir: Path, step: int, trainable: dict[str, nn.Parameter],
                    optimizer: torch.optim.Optimizer, cfg: TrainConfig, env: Distributed, keep: int,
                    sharded: nn.Module | None = None) -> None:
    """checkpoint-STEP/ holds the trainable weights (frozen ones never change), the optimizer, the step, the
    config and one RNG file per rank; with a `sharded` (FSDP) model, each rank's shard of the weights and the
    optimizer. It is assembled under a temporary name and renamed when complete."""
    final, tmp = out_dir / f"checkpoint-{step}", out_dir / f".checkpoint-{step}.tmp"
    if env.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    env.barrier()
    atomic_write(tmp / f"rng_rank{env.rank}.pt", lambda f: torch.save(rng_state(), f))
    if sharded is not None:
        save_sharded(tmp / "sharded", sharded, optimizer)
    elif env.main:
        write_weights(tmp / "trainable.safetensors", {k: p.data for k, p in trainable.items()})
        atomic_write(tmp / "optimizer.pt", lambda f: torch.save(optimizer.state_dict(), f))
    if env.main:
        write_json(tmp / "trainer_state.json", {"step": step, "world_size": env.world_size,
                                                "sharded": sharded is not None, "config": asdict(cfg)})
    env.barrier()
    if env.main:
        os.replace(tmp, final)
        for old in checkpoints(out_dir)[:-keep]:
            shutil.rmtree(old)
    env.barrier()


def load_checkpoint(path: Path, trainable: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer,
                    env: Distributed, sharded: nn.Module | None = None) -> int:
    """Restore the trainable weights, the optimizer and this rank's RNG from `path`; return its step. A sharded
    checkpoint resumes on any number of processes; its RNG states only on as many as wrote it (else the
    draws, such as dropout's, differ from an uninterrupted run's)."""
    state = json.loads((path / "trainer_state.json").read_text())
    if state.get("sharded", False) != (sharded is not None):
        raise ValueError(f"{path} was written {'with' if state.get('sharded') else 'without'} --fsdp; "
                         f"resume the same way")
    if sharded is not None:
        load_sharded(path / "sharded", sharded, optimizer)
        if state["world_size"] == env.world_size:
            set_rng_state(torch.load(path / f"rng_rank{env.rank}.pt", weights_only=True))
        return state["step"]
    if state["world_size"] != env.world_size:
        raise ValueError(f"{path} was written by {state['world_size']} processes; resume with as many")
    weights = load_file(path / "trainable.safetensors")
    if set(weights) != set(trainable):
        raise ValueError(f"{path}: its trainable weights differ from this recipe's: "
                         f"{sorted(set(weights) ^ set(trainable))[:8]}")
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(weights[name])
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=env.device, weights_only=True))
    set_rng_state(torch.load(path / f"rng_rank{env.rank}.pt", weights_only=True))
    return state["step"]


def restart_log(log_file: Path, step: int) -> None:
    """A fresh run (step 0) starts a fresh log; a resumed one drops what was logged after its checkpoint."""
    lines = log_file.read_text().splitlines() if log_file.exists() and step else []
    kept = [line for line in lines if json.loads(line)["step"] <= step]
    log_file.write_text("".join(line + "\n" for line in kept))
