"""Reading and writing weights: Hub repo ids or local directories, safetensors (single or sharded), strict loads.

Weights are read only from safetensors, or from `.bin` files through `torch.load(weights_only=True)`, which
cannot execute code. A model is built on the meta device and the checkpoint tensors are assigned into it, so
a 7B model is never initialised randomly first and never held twice in memory.
"""

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

# Checkpoint keys that hold nothing nanovlm uses: CLIP's text tower and projections, and buffers that old
# transformers versions persisted.
IGNORED_KEYS = ("text_model.", "visual_projection.", "text_projection.", "logit_scale", "position_ids",
                "rotary_emb.inv_freq")


def resolve(name_or_path: str | os.PathLike, revision: str | None = None) -> Path:
    """A local directory as is; a Hub repo id ("name" or "owner/name") is fetched into (or found in) the
    huggingface_hub cache, which honours HF_HOME, HF_HUB_CACHE and HF_HUB_OFFLINE. Anything else that does not
    exist is a missing local folder: a path with more than one "/", one that starts with ".", "/" or "~", or
    "a/b" where ./a is a local folder (out/sft) is never looked up on the Hub."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.exists():
        raise FileNotFoundError(f"{name_or_path} is a file, not a checkpoint folder")
    text = str(name_or_path)
    if (text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text
            or (text.count("/") == 1 and Path(text.split("/")[0]).is_dir())):
        raise FileNotFoundError(f"no folder {name_or_path} (a local path, so not looked up on the Hugging Face Hub)")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*"]
    try:
        path = Path(snapshot_download(str(name_or_path), revision=revision, allow_patterns=patterns))
        if not any(path.glob("*.safetensors")):  # some older repos ship only .bin weights
            path = Path(snapshot_download(str(name_or_path), revision=revision, allow_patterns=patterns + ["*.bin"]))
    except Exception as e:
        raise OSError(f"could not get {name_or_path!r} (revision {revision}) from the Hugging Face Hub or its "
                      f"cache: {type(e).__name__}: {e}") from e
    return path


def read_config(path: Path) -> dict:
    file = path / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"no config.json in {path}")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from e


def weight_files(path: Path) -> list[Path]:
    """The weight files of a checkpoint directory: safetensors first, sharded through an index or single."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        index = path / f"{name}.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [s for s in shards if not (path / s).is_file()]
            if missing:
                raise FileNotFoundError(f"{index} lists shards that are missing: {missing}")
            return [path / s for s in shards]
        if (path / name).is_file():
            return [path / name]
    raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin (or their .index.json) in {path}")


def read_weights(path: Path, keep: Callable[[str], bool] = lambda key: True) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory whose key passes `keep`."""
    state = {}
    for file in weight_files(path):
        try:
            if file.suffix == ".safetensors":
                with safe_open(file, framework="pt") as f:
                    state |= {k: f.get_tensor(k) for k in f.keys() if keep(k)}
            else:
                shard = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
                state |= {k: v for k, v in shard.items() if keep(k)}
        except (SafetensorError, RuntimeError, OSError) as e:
            raise ValueError(f"cannot read weights from {file} (corrupt or truncated?): {e}") from e
    return state


def rename(key: str, renames: list[tuple[str, str]]) -> str | None:
    """The first matching prefix rule rewrites the key; None if no rule matches."""
    for old, new in renames:
        if key.startswith(old):
            return new + key[len(old):]
    return None


def brief(items: list[str], shown: int = 8) -> str:
    return f"{items[:shown]}" + (f" and {len(items) - shown} more" if len(items) > shown else "")


def load_renamed(model: nn.Module, path: Path, renames: list[tuple[str, str]], dtype: torch.dtype,
                 device: str | torch.device = "cpu", skip: tuple[str, ...] = (), reshape: tuple[str, ...] = ()) -> None:
    """Load checkpoint `path` into `model` (built on the meta device) strictly, after renaming its keys.

    Every parameter must be found with its exact shape, and every checkpoint tensor must be used (but for
    IGNORED_KEYS); otherwise the error names all the offending keys. Parameters whose names start with one of
    `skip` are left to the caller (tied weights); those named in `reshape` take a tensor of another shape with
    as many elements (a layout that stores them with extra unit dimensions). Tensors are cast to `dtype` and
    moved to `device`.
    """
    state, source, unexpected = {}, {}, []
    for key, tensor in read_weights(path, keep=lambda k: not any(p in k for p in IGNORED_KEYS)).items():
        name = rename(key, renames)
        if name is None:
            unexpected.append(key)
        elif not name.startswith(skip):
            state[name], source[name] = tensor, key
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith(skip)}
    missing = sorted(set(expected) - set(state))
    unexpected += sorted(source[k] for k in set(state) - set(expected))
    wrong = [f"{source[k]}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
             for k, v in expected.items() if k in state and state[k].shape != v.shape
             and not (k in reshape and state[k].numel() == v.numel())]
    if missing or unexpected or wrong:
        raise ValueError(f"checkpoint {path} does not fit {type(model).__name__}:\n  missing keys: {brief(missing)}"
                         f"\n  unexpected keys: {brief(unexpected)}\n  wrong shapes: {brief(wrong)}")
    state = {k: state[k].reshape(v.shape).to(device=device, dtype=dtype if state[k].is_floating_point() else None)
             for k, v in expected.items()}
    model.load_state_dict(state, strict=False, assign=True)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp) on a temporary file next to `path`, then rename it into place: a crash never leaves a
    torn file under the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: dict) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))


def write_weights(path: Path, state: dict[str, torch.Tensor]) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
