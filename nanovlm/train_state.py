"""Training state on disk, for an exact resume: the checkpoint-STEP/ folders, the metrics log, and the rules
that keep one output folder to one run.

A checkpoint holds what a run needs to go on along the same loss curve: the trainable weights, the optimizer,
the step, every rank's RNG state (Python, NumPy, torch, CUDA), and what makes the run this run: its settings
but those that only say where and how often it writes (TrainConfig.RESUME_MAY_CHANGE), the world size, a
SHA-256 and the weight of every data file, and the method's settings. A checkpoint is assembled under a
temporary name and renamed when complete, so a killed run leaves whole checkpoints only (and temporaries,
which the next start removes); the newest `keep` are kept, and the finished model replaces them.

- A run refuses an output folder that holds another run (checkpoints, a log, a finished model) unless told:
  `--resume` continues it, `--overwrite` deletes its checkpoints and log and starts afresh.
- `--resume` takes the newest checkpoint that loads: a corrupt one is named and the one before it used. It
  refuses a checkpoint of other data, another batch geometry or another recipe, listing every difference;
  the order of the --lr groups does not matter (the loop orders them by name).
- The metrics log is cut back to the checkpoint's step; a line torn by a kill is dropped.
Sharding (--fsdp) changes what is written: each rank writes its shard of the trainable weights and the
optimizer (torch.distributed.checkpoint, nanovlm/sharding.py), and a run resumes from it on any number of
processes.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file

from .checkpoint import atomic_write, write_json, write_weights
from .sharding import load_sharded, save_sharded

if TYPE_CHECKING:  # train.py imports this module
    from .train import Distributed, TrainConfig

RUN_FILES = ("metrics.jsonl", "train_config.json", "summary.json", "model.safetensors",
             "model.safetensors.index.json")  # a folder with any of these (or a checkpoint) holds a run
STATE_FILES = ("metrics.jsonl", "train_config.json", "summary.json")  # what --overwrite deletes, with checkpoints


class RunFolderError(ValueError):
    """The output folder does not fit the run: it holds another one, or its checkpoints cannot be resumed."""


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
    """The checkpoints in `out_dir` (complete, as renamed), oldest first."""
    return sorted(out_dir.glob("checkpoint-*[0-9]"), key=lambda p: int(p.name.split("-")[1]))


def recorded(settings: Any) -> dict | None:
    """A settings dataclass as a checkpoint records it for comparison: every field but those its class lists in
    RESUME_MAY_CHANGE, as JSON gives them back."""
    if settings is None:
        return None
    free = getattr(type(settings), "RESUME_MAY_CHANGE", ())
    return json.loads(json.dumps({k: v for k, v in asdict(settings).items() if k not in free}))


def start(out_dir: Path, cfg: TrainConfig, trainable: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer,
          env: Distributed, identity: dict, sharded: nn.Module | None = None) -> int:
    """Make `out_dir` ready for this run (module docstring) and return the step it starts at: 0, or with
    --resume its checkpoint's, whose weights, optimizer state and RNG state are then restored (into the shards
    of the `sharded` model under FSDP)."""
    held = held_run(out_dir)
    if cfg.resume and cfg.overwrite:
        raise RunFolderError("--resume continues the run in the output folder and --overwrite replaces it: not both")
    if held and not (cfg.resume or cfg.overwrite):
        raise RunFolderError(f"{out_dir} holds another run ({', '.join(held)}): --resume continues it, --overwrite "
                             f"deletes its checkpoints and log and starts afresh, or choose another --out_dir")
    env.barrier()  # every rank has looked before rank 0 changes anything
    if env.main:
        remove_temporaries(out_dir)
        if cfg.overwrite:
            remove_checkpoints(out_dir)
            for name in STATE_FILES:
                (out_dir / name).unlink(missing_ok=True)
    env.barrier()
    return resume(out_dir, trainable, optimizer, env, identity, sharded) if cfg.resume else 0


def held_run(out_dir: Path) -> list[str]:
    """What of a training run `out_dir` holds: checkpoints, metrics log, settings, summary, finished model."""
    return [p.name for p in checkpoints(out_dir)] + [name for name in RUN_FILES if (out_dir / name).exists()]


def remove_temporaries(out_dir: Path) -> None:
    """What a killed run left half-written: .checkpoint-STEP.tmp/ folders and atomic writes' .NAME.XXXX.tmp."""
    for path in sorted(out_dir.rglob(".*.tmp"), key=lambda p: -len(p.parts)):
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def remove_checkpoints(out_dir: Path, keep: int = 0) -> None:
    """All but the newest `keep` checkpoints; each is renamed to a temporary first, so that a kill mid-way never
    leaves a checkpoint with files missing."""
    found = checkpoints(out_dir)
    for path in found[:len(found) - keep]:
        doomed = path.with_name(f".{path.name}.removed.tmp")
        path.replace(doomed)
        shutil.rmtree(doomed)


def save_checkpoint(out_dir: Path, step: int, trainable: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer,
                    cfg: TrainConfig, env: Distributed, identity: dict, sharded: nn.Module | None = None) -> Path:
    """checkpoint-STEP/ holds the trainable weights (frozen ones never change), the optimizer, the step, the
    run's identity and one RNG file per rank; with a `sharded` (FSDP) model, each rank writes its shard of the
    weights and the optimizer. It is assembled under a temporary name and renamed when complete; then only the
    newest cfg.keep_checkpoints stay."""
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
        write_json(tmp / "trainer_state.json", {"step": step, "world_size": env.world_size, "config": asdict(cfg),
                                                "sharded": sharded is not None, "run": identity})
    env.barrier()
    if env.main:
        if final.exists():  # a corrupt one of the same step, which the resume passed over
            shutil.rmtree(final.replace(final.with_name(f".{final.name}.removed.tmp")))
        tmp.replace(final)
        remove_checkpoints(out_dir, cfg.keep_checkpoints)
    env.barrier()
    return final


def read_checkpoint(path: Path, env: Distributed) -> dict:
    """Everything of checkpoint `path`, read before anything is restored; ValueError says what does not load.
    Every rank reads every rank's RNG file, so that all of them judge a checkpoint alike. A sharded checkpoint's
    weights and optimizer are read later, straight into the shards (load_sharded)."""
    try:
        state = json.loads((path / "trainer_state.json").read_text())
        rng = [torch.load(path / f"rng_rank{r}.pt", weights_only=True) for r in range(state["world_size"])]
        if state.get("sharded"):
            if not (path / "sharded" / ".metadata").is_file():
                raise FileNotFoundError(f"no {path / 'sharded' / '.metadata'}")
            return {"state": state, "rng": rng[env.rank] if state["world_size"] == env.world_size else None}
        return {"state": state, "weights": load_file(path / "trainable.safetensors"),
                "optimizer": torch.load(path / "optimizer.pt", map_location=env.device, weights_only=True),
                "rng": rng[env.rank] if env.rank < len(rng) else None}
    except Exception as e:  # whatever a truncated or missing file raises: json, safetensors, torch's zip reader
        raise ValueError(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def resume(out_dir: Path, trainable: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer, env: Distributed,
           identity: dict, sharded: nn.Module | None = None) -> int:
    """Restore the newest checkpoint that loads and was made by this run; return its step (0 if none exists).
    A sharded checkpoint resumes on any number of processes; its RNG states only on as many as wrote it (else
    the draws, such as dropout's, differ from an uninterrupted run's)."""
    found = checkpoints(out_dir)
    if not found:
        if (out_dir / "model.safetensors").exists() or (out_dir / "model.safetensors.index.json").exists():
            raise RunFolderError(f"{out_dir} holds a finished model and no checkpoint: there is nothing to resume "
                                 f"(--overwrite trains it again)")
        if env.main:
            print(f"--resume: no checkpoint in {out_dir}; starting at step 0")
        return 0
    corrupt = []
    for path in reversed(found):
        try:
            saved = read_checkpoint(path, env)
        except ValueError as e:
            corrupt.append(f"{path.name} ({e})")
            if env.main:
                print(f"warning: {path} is corrupt, {e}; trying the checkpoint before it", file=sys.stderr)
            continue
        check_identity(path, saved["state"].get("run"), identity)
        if sharded is not None:
            load_sharded(path / "sharded", sharded, optimizer)
        elif set(saved["weights"]) != set(trainable):
            raise RunFolderError(f"{path}: its trainable weights differ from this recipe's: "
                                 f"{sorted(set(saved['weights']) ^ set(trainable))[:8]}")
        else:
            with torch.no_grad():
                for name, p in trainable.items():
                    p.copy_(saved["weights"][name])
            optimizer.load_state_dict(saved["optimizer"])
        if saved["rng"] is not None:
            set_rng_state(saved["rng"])
        if env.main:
            print(f"resuming from {path}")
        return saved["state"]["step"]
    raise RunFolderError(f"no checkpoint in {out_dir} loads: {'; '.join(corrupt)} (--overwrite starts afresh)")


def check_identity(path: Path, saved: dict | None, now: dict) -> None:
    """RunFolderError listing every way in which the run that wrote checkpoint `path` differs from this one."""
    now = json.loads(json.dumps(now))
    lines = differences(saved or {}, now)
    if lines:
        raise RunFolderError(f"cannot resume {path.parent} from {path.name}: it was made by another run\n  "
                             + "\n  ".join(lines) + "\n(run it as it was, or --overwrite to start afresh)")


def differences(saved: dict, now: dict) -> list[str]:
    """'key: checkpoint X, now Y' for each difference, field by field within the config and the method."""
    lines = []
    for key in sorted(saved.keys() | now.keys()):
        before, after = saved.get(key, "not recorded"), now.get(key, "not recorded")
        if isinstance(before, dict) and isinstance(after, dict):
            lines += [f"{key}.{k}: checkpoint {before.get(k, 'not recorded')}, now {after.get(k, 'not recorded')}"
                      for k in sorted(before.keys() | after.keys()) if before.get(k) != after.get(k)]
        elif before != after:
            lines.append(f"{key}: checkpoint {show(before)}, now {show(after)}")
    return lines


def show(value: Any) -> str:
    """A value in a difference; data files as name:weight, the start of their SHA-256 and their image folder."""
    if isinstance(value, list) and all(isinstance(v, dict) and "sha256" in v for v in value):
        return ", ".join(f"{v['file']}:{v['weight']:g} (sha256 {v['sha256'][:12]}, images in {v['image_folder']})"
                         for v in value)
    return str(value)


def restart_log(log_file: Path, step: int) -> None:
    """A fresh run (step 0) starts a fresh log; a resumed one drops what was logged after its checkpoint. A last
    line torn by a kill is dropped; a torn line elsewhere is an error naming it."""
    lines = log_file.read_text().splitlines() if log_file.exists() and step else []
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise ValueError(f"{log_file}:{number}: not a JSON line") from None
        if record["step"] <= step:
            kept.append(line)
    log_file.write_text("".join(line + "\n" for line in kept))
