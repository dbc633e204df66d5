"""Weight mixing (SPHINX, Lin et al., 2023) and LoRA adapters merged into their base, written as new checkpoints.

SPHINX fine-tunes one base model on two domains, real-world and synthetic data, and mixes the two results tensor
by tensor:

    theta = beta * theta_A + (1 - beta) * theta_B,    0 <= beta <= 1

and, for N checkpoints, theta = sum_i w_i theta_i with w_i >= 0 and sum_i w_i = 1. Every tensor the checkpoints
share is mixed (they must share all of them, with the same shapes and the same config); integer tensors must be
equal. A mix is meaningful only between models that left one starting point, so that their weights stay in one
basin. Here both domain models are fine-tuned from the same stage-1 checkpoint, side by side: the official
repository releases no mixing script, and its code does not settle whether theta_syn continues theta_real or
the shared base. Siblings make beta = 1 and beta = 0 the two single-domain models, each the same compute away
from the base, so that the sweep over beta compares like with like and a joint fine-tune on both domains at
that compute is the natural control; the other reading would mix a model with its own descendant, which has
seen both domains.

The sum is computed as running interpolations in float32 (float64 stays float64),
m_1 = theta_1, m_k = lerp(m_(k-1), theta_k, w_k / (w_1 + ... + w_k)), which is the same sum, gives an input back
bit for bit when its weight is 1 (torch.lerp is exact at both ends) and an input mixed with itself unchanged;
each result is cast back to the first checkpoint's dtype.

Memory: tensors are read one at a time from the (sharded) safetensors files (`safe_open`, `get_tensor`), and the
output is written shard by shard (at most --max_shard_size each), so two 7B checkpoints merge in the memory of
about one output shard, never the models. The output is a llava-hf checkpoint (model.safetensors, or shards and
model.safetensors.index.json) with the config, tokenizer and preprocessing files of the first checkpoint and a
merge.json that says how it was made; it is assembled in a temporary folder beside the target and renamed into
place when complete.

LoRA: `--adapter DIR BASE` writes W + (alpha / r) B A (alpha / sqrt(r) with rsLoRA) into every adapted weight of
BASE and copies the rest, so that any LoRA run (nanovlm's adapter/ folders or PEFT's own save_pretrained) becomes
a plain checkpoint. Adapter module names are matched to checkpoint keys through the llava-hf key layouts
(nanovlm/vlm.py), whichever transformers version named them. Only what the adapter holds is merged: a run that
also trained whole modules (SQ-LLaVA's projector and prototype extractor) saves its merged model itself.

    python -m nanovlm.merge out/sphinx/A/seed0 out/sphinx/B/seed0 --beta 0.75 --out out/sphinx/merge-0.75/seed0
    python -m nanovlm.merge A B C --weights 0.5,0.3,0.2 --out D
    python -m nanovlm.merge --adapter ADAPTER_DIR BASE --out OUT     # a LoRA run as a plain checkpoint
"""

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .checkpoint import brief, read_config, rename, resolve, weight_files, write_json
from .vlm import ADAPTER_TOWERS, LLAVA_RENAMES

# What a checkpoint holds besides its weights and the merge keeps: the first checkpoint's (the base's) files.
# Training logs and evaluation results are left behind: they describe another model.
SIDE_FILES = ("config.json", "generation_config.json", "preprocessor_config.json", "processor_config.json",
              "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
              "added_tokens.json", "chat_template.json", "chat_template.jinja", "vocab.json", "merges.txt")
# Config keys that differ between two saves of one architecture.
VOLATILE_CONFIG = {"_name_or_path", "transformers_version", "torch_dtype", "dtype"}
DEFAULT_SHARD = 5 * 1024**3


class IncompatibleCheckpoints(ValueError):
    """Checkpoints that cannot be mixed; the message lists every key, shape and config value that differs."""


@dataclass
class Checkpoint:
    """A checkpoint's tensors as its safetensors headers describe them; a tensor is read only when asked for."""

    path: Path
    config: dict
    files: dict[str, Path]  # key -> the file that holds it, in the checkpoint's own order
    shapes: dict[str, tuple[int, ...]]

    @classmethod
    def open(cls, name_or_path: str | os.PathLike) -> "Checkpoint":
        path = resolve(name_or_path)
        files, shapes = {}, {}
        for file in weight_files(path):
            if file.suffix != ".safetensors":
                raise ValueError(f"{file}: only safetensors checkpoints are merged (convert .bin files first)")
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    if key in files:
                        raise ValueError(f"{path}: {key} is in both {files[key].name} and {file.name}")
                    files[key], shapes[key] = file, tuple(f.get_slice(key).get_shape())
        return cls(path, read_config(path), files, shapes)

    def read(self, key: str) -> torch.Tensor:
        """One tensor. Its file is opened for this read alone: safetensors maps a file into memory, and the pages
        read stay resident, counted as this process's memory, until the file is closed; a whole shard would pile
        up that way. Opening a file costs a read of its JSON header, a millisecond."""
        with safe_open(self.files[key], framework="pt") as f:
            return f.get_tensor(key)


class ShardWriter:
    """Collects tensors into shards of at most `max_bytes` (a larger tensor gets a shard of its own), writes each
    shard as soon as the next tensor would overflow it, and names the shards as transformers does at the end."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        self.shard: dict[str, torch.Tensor] = {}
        self.shard_bytes, self.total_bytes = 0, 0
        self.written: list[list[str]] = []  # the keys of each written shard

    def add(self, key: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.shard and self.shard_bytes + size > self.max_bytes:
            self.flush()
        self.shard[key] = tensor.contiguous()
        self.shard_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        save_file(self.shard, self.folder / f".shard-{len(self.written)}", metadata={"format": "pt"})
        self.written.append(list(self.shard))
        self.shard, self.shard_bytes = {}, 0

    def finish(self) -> list[str]:
        """Write the last shard, give every shard its final name and write the index; returns the file names."""
        if self.shard or not self.written:
            self.flush()
        n = len(self.written)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for i, name in enumerate(names):
            os.replace(self.folder / f".shard-{i}", self.folder / name)
        if n > 1:
            weight_map = {key: name for keys, name in zip(self.written, names) for key in keys}
            write_json(self.folder / "model.safetensors.index.json",
                       {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map})
        return names


def atomic_folder(out: Path, fill: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Call fill(tmp) on a new temporary folder beside `out`, then rename it to `out`: a crash or an error never
    leaves a partial checkpoint under the final name. An existing non-empty `out` is replaced only if `overwrite`."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (--overwrite replaces it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        fill(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def copy_side_files(source: Path, folder: Path) -> None:
    for name in SIDE_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, folder / name)


# --- weight mixing ----------------------------------------------------------------------------------------------

def mix(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """sum_i weights[i] * tensors[i] by running interpolation (module docstring), in the first tensor's dtype."""
    first = tensors[0]
    if not first.is_floating_point():
        if any(not torch.equal(t, first) for t in tensors[1:]):
            raise IncompatibleCheckpoints("integer tensors differ between the checkpoints; they cannot be mixed")
        return first
    compute = torch.promote_types(first.dtype, torch.float32)
    mixed, total = first.to(compute), weights[0]
    for tensor, weight in zip(tensors[1:], weights[1:]):
        total += weight
        if weight:
            mixed = torch.lerp(mixed, tensor.to(compute), weight / total)
    return mixed.to(first.dtype)


def flatten(config: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in config.items():
        if key in VOLATILE_CONFIG:
            continue
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def differences(first: Checkpoint, other: Checkpoint) -> list[str]:
    """What keeps two checkpoints from being mixed, one line per kind of difference; empty if nothing does."""
    keys, other_keys = set(first.shapes), set(other.shapes)
    only_first, only_other = sorted(keys - other_keys), sorted(other_keys - keys)
    shapes = [f"{k}: {first.shapes[k]} vs {other.shapes[k]}" for k in first.shapes
              if k in other.shapes and first.shapes[k] != other.shapes[k]]
    a, b = flatten(first.config), flatten(other.config)
    config = [f"{k}: {a.get(k, '(absent)')!r} vs {b.get(k, '(absent)')!r}" for k in sorted(set(a) | set(b))
              if a.get(k, "(absent)") != b.get(k, "(absent)")]
    found = [("keys only in the first", only_first), ("keys only in the second", only_other),
             ("shapes that differ", shapes), ("config values that differ", config)]
    return [f"{what} ({len(items)}): {brief(items)}" for what, items in found if items]


def check_weights(weights: list[float], count: int) -> list[float]:
    if len(weights) != count:
        raise ValueError(f"{len(weights)} weights for {count} checkpoints")
    if any(not (0 <= w <= 1) for w in weights):  # also refuses NaN
        raise ValueError(f"every weight must lie in [0, 1], got {weights}")
    if abs(sum(weights) - 1) > 1e-6:
        raise ValueError(f"the weights must sum to 1, got {weights} (sum {sum(weights)})")
    return weights


def merge(checkpoints: list[str | os.PathLike], weights: list[float], out: str | os.PathLike,
          max_shard_size: int = DEFAULT_SHARD, overwrite: bool = False) -> Path:
    """Write sum_i weights[i] * checkpoints[i] (local folders or Hub repo ids) to `out`; returns its path."""
    if len(checkpoints) < 2:
        raise ValueError("mixing needs at least two checkpoints")
    weights = check_weights(weights, len(checkpoints))
    opened = [Checkpoint.open(c) for c in checkpoints]
    problems = [f"{opened[0].path} vs {other.path}:\n    " + "\n    ".join(found)
                for other in opened[1:] if (found := differences(opened[0], other))]
    if problems:
        raise IncompatibleCheckpoints("the checkpoints do not share keys, shapes and config (were they fine-tuned "
                                      "from one base?):\n  " + "\n  ".join(problems))

    def fill(folder: Path) -> None:
        writer = ShardWriter(folder, max_shard_size)
        for key in opened[0].files:
            writer.add(key, mix([c.read(key) for c in opened], weights))
        writer.finish()
        copy_side_files(opened[0].path, folder)
        write_json(folder / "merge.json", {"method": "weight mixing (SPHINX): sum_i w_i theta_i",
                                           "checkpoints": [str(c) for c in checkpoints], "weights": weights})

    return atomic_folder(Path(out), fill, overwrite)


# --- LoRA adapters ----------------------------------------------------------------------------------------------

def canonical(key: str) -> str:
    """A checkpoint key (or a module name + ".weight") in nanovlm's module naming, whatever llava-hf layout it
    comes from; keys of other models (a plain Llama) stay as they are."""
    return rename(key, LLAVA_RENAMES) or key


def pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern: a key is a full module name or a suffix (regex) of one."""
    for pattern, value in patterns.items():
        if module == pattern or re.fullmatch(rf"(.*\.)?{pattern}", module):
            return value
    return default


@dataclass
class LoRA:
    up: torch.Tensor  # B, (out, r)
    down: torch.Tensor  # A, (r, in)
    scaling: float

    @property
    def shape(self) -> tuple[int, int]:
        return self.up.shape[0], self.down.shape[1]

    def delta(self, dtype: torch.dtype) -> torch.Tensor:
        """(alpha / r) B A, the change the adapter makes to its weight."""
        return (self.up.to(dtype) @ self.down.to(dtype)) * self.scaling


def read_adapter(path: Path) -> dict[str, LoRA]:
    """Every module a PEFT-layout LoRA adapter adapts, by canonical key (`canonical`)."""
    config_file, weights_file = path / "adapter_config.json", path / "adapter_model.safetensors"
    for file in (config_file, weights_file):
        if not file.is_file():
            raise FileNotFoundError(f"{path} is not a LoRA adapter: no {file.name}")
    config = json.loads(config_file.read_text())
    unsupported = {"peft_type": config.get("peft_type") != "LORA", "use_dora": bool(config.get("use_dora")),
                   "fan_in_fan_out": bool(config.get("fan_in_fan_out")), "bias": config.get("bias", "none") != "none"}
    if any(unsupported.values()):
        raise ValueError(f"{config_file}: unsupported adapter settings "
                         f"{ {k: config.get(k) for k, bad in unsupported.items() if bad} }; only plain LoRA merges")
    weights = load_file(weights_file)
    others = sorted(k for k in weights if not re.search(r"\.lora_[AB]\.weight$", k))
    if others:
        raise ValueError(f"{weights_file}: tensors that are not LoRA A/B matrices (modules_to_save?): {brief(others)}")
    adapters = {}
    for key in sorted(k for k in weights if k.endswith(".lora_A.weight")):
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        up = weights.get(key.replace(".lora_A.", ".lora_B."))
        if up is None:
            raise ValueError(f"{weights_file}: {key} has no lora_B partner")
        down = weights[key]
        r = down.shape[0]
        if up.shape[1] != r:
            raise ValueError(f"{weights_file}: {key} has rank {r}, its lora_B {tuple(up.shape)}")
        alpha = pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
        scaling = alpha / r ** 0.5 if config.get("use_rslora") else alpha / r
        adapters[canonical(module + ".weight")] = LoRA(up, down, scaling)
    if len(adapters) * 2 != len(weights):
        raise ValueError(f"{weights_file}: lora_B matrices without a lora_A partner")
    return adapters


def read_adapters(path: Path) -> dict[str, LoRA]:
    """A PEFT adapter folder, or nanovlm's adapter/ folder: one PEFT adapter per tower (VLM.save_adapter)."""
    towers = [path / tower for tower in ADAPTER_TOWERS if (path / tower / "adapter_config.json").is_file()]
    adapters = {}
    for folder in towers or [path]:
        adapters |= read_adapter(folder)
    return adapters


def merge_adapter(adapter: str | os.PathLike, base: str | os.PathLike, out: str | os.PathLike,
                  max_shard_size: int = DEFAULT_SHARD, overwrite: bool = False) -> Path:
    """Write `base` (a local folder or Hub repo id) with the LoRA adapter at `adapter` merged into its weights."""
    adapters = read_adapters(Path(adapter))
    checkpoint = Checkpoint.open(base)
    keys = {canonical(key): key for key in checkpoint.files}
    unmatched = sorted(set(adapters) - set(keys))
    wrong = [f"{keys[k]}: {checkpoint.shapes[keys[k]]} vs the adapter's {tuple(d.shape)}" for k, d in adapters.items()
             if k in keys and checkpoint.shapes[keys[k]] != tuple(d.shape)]
    if unmatched or wrong:
        raise IncompatibleCheckpoints(f"the adapter {adapter} does not fit {checkpoint.path}:\n  adapted modules "
                                      f"missing from the base: {brief(unmatched)}\n"
                                      f"  shapes that differ: {brief(wrong)}")
    changes = {keys[k]: lora for k, lora in adapters.items()}

    def fill(folder: Path) -> None:
        writer = ShardWriter(folder, max_shard_size)
        for key in checkpoint.files:
            tensor = checkpoint.read(key)
            if key in changes:
                compute = torch.promote_types(tensor.dtype, torch.float32)
                tensor = (tensor.to(compute) + changes[key].delta(compute)).to(tensor.dtype)
            writer.add(key, tensor)
        writer.finish()
        copy_side_files(checkpoint.path, folder)
        write_json(folder / "merge.json", {"method": "LoRA merged: W + scaling * B A", "adapter": str(adapter),
                                           "base": str(base), "adapted": sorted(changes)})

    return atomic_folder(Path(out), fill, overwrite)


# --- command line -----------------------------------------------------------------------------------------------

def parse_size(text: str) -> int:
    """'5GB', '500MB', '200KB' (powers of 1024, as transformers reads them) or a number of bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B?)\s*", text.upper())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 500MB)")
    unit = {"": 1, "B": 1, "K": 1024, "KB": 1024, "M": 1024**2, "MB": 1024**2, "G": 1024**3, "GB": 1024**3}
    return int(float(match[1]) * unit[match[2]])


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("checkpoints", nargs="+", help="llava-hf checkpoints (folders or Hub repo ids) fine-tuned "
                        "from one base; with --adapter, the one base the adapter was trained on")
    parser.add_argument("--out", required=True, help="the folder to write")
    parser.add_argument("--beta", type=float, help="two checkpoints: theta = beta * A + (1 - beta) * B")
    parser.add_argument("--weights", help="N checkpoints: comma-separated weights in [0, 1] that sum to 1")
    parser.add_argument("--adapter", help="merge this LoRA adapter folder (PEFT layout) into the checkpoint")
    parser.add_argument("--max_shard_size", type=parse_size, default=DEFAULT_SHARD, help="largest output shard "
                        "(default 5GB); the memory a merge needs is about one shard")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
    if args.adapter:
        if len(args.checkpoints) != 1 or args.beta is not None or args.weights:
            parser.error("--adapter takes exactly one base checkpoint and no --beta or --weights")
        out = merge_adapter(args.adapter, args.checkpoints[0], args.out, args.max_shard_size, args.overwrite)
    else:
        if (args.beta is None) == (args.weights is None):
            parser.error("give --beta (two checkpoints) or --weights (one per checkpoint)")
        if args.beta is not None:
            if len(args.checkpoints) != 2:
                parser.error(f"--beta mixes two checkpoints, got {len(args.checkpoints)}")
            if not 0 <= args.beta <= 1:
                parser.error(f"--beta must lie in [0, 1], got {args.beta}")
            weights = [args.beta, 1 - args.beta]
        else:
            try:
                weights = check_weights([float(w) for w in args.weights.split(",")], len(args.checkpoints))
            except ValueError as error:
                parser.error(f"--weights: {error}")
        out = merge(args.checkpoints, weights, args.out, args.max_shard_size, args.overwrite)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
