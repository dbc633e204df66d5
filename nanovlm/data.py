"""LLaVA-format training data: records -> token ids, loss labels and pixels; padding; the batch order.

A data file is LLaVA JSON: a list of {"id", "image" (a path relative to the image folder, optional),
"conversations": [{"from": "human"|"gpt", "value": ...}, ...]}. Every record is checked when the dataset is
built, and every image it names is decoded then (nanovlm/image_check.py, cached), so a bad one stops the run
before training starts, with its file and index; with `skip_bad=True` it is dropped instead and counted. An
image path must stay inside the image folder (no absolute path, no ../) unless `allow_absolute_image_paths`.
A record whose answers `max_length` cuts away entirely is dropped as it loads and counted with the skipped ones
(the training loop logs them), so no record trains on nothing.
With `sq_ratio` > 0 the conversations get SQ-LLaVA's visual-user turns as they load (nanovlm/selfq.py).
"""

import hashlib
import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from .image import ImageProcessor, load_image
from .image_check import check_images
from .selfq import to_self_questioning, turn_rng
from .templates import IGNORE_INDEX, Template, tokenize_conversation, validate_conversation
from .tokenizer import IMAGE_PLACEHOLDER, Tokenizer


class BadRecord(ValueError):
    pass


@dataclass
class DataSource:
    """One JSON file; `weight` scales how many of its records an epoch draws (0.5: a seeded half, 2: twice)."""
    path: Path
    weight: float = 1.0
    image_folder: Path | None = None  # None: the JSON file's own folder

    @classmethod
    def parse(cls, spec: str) -> "DataSource":
        """'file.json' or 'file.json:weight' (a finite weight > 0); ValueError says what is wrong."""
        path, colon, weight = spec.rpartition(":")
        if not colon:
            return cls(Path(spec))
        try:
            value = float(weight)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"--data {spec}: the weight after ':' must be a finite number > 0, got {weight!r}")
        return cls(Path(path), value)

    def fingerprint(self) -> dict:
        """What a resumed run compares: the file's name and SHA-256, its weight and the image folder."""
        digest = hashlib.sha256()
        with open(self.path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        return {"file": self.path.name, "sha256": digest.hexdigest(), "weight": self.weight,
                "image_folder": str((self.image_folder or self.path.parent).resolve())}


def check_image_path(image, absolute_allowed: bool = False) -> None:
    """Raise BadRecord unless `image` is a path (a non-empty string) inside the image folder."""
    if not isinstance(image, str) or not image.strip():
        raise BadRecord(f"image must be a path (a non-empty string), got {image!r}")
    if not absolute_allowed and (os.path.isabs(image) or os.path.normpath(image).split(os.sep)[0] == ".."):
        raise BadRecord(f"image {image} is outside the image folder (--allow_absolute_image_paths allows it)")


def image_root(folder: Path, data_dir: Path) -> str:
    """How a data file in `data_dir` names the files under `folder`, inside its own folder: `folder`'s path
    relative to `data_dir` where it lies below it, else a symlink in `data_dir` named after `folder` (made here),
    so that a builder's records pass check_image_path without --allow_absolute_image_paths."""
    relative = os.path.relpath(folder, data_dir)
    if not relative.startswith(".."):
        return relative
    link = data_dir / folder.name
    if not link.is_symlink():
        data_dir.mkdir(parents=True, exist_ok=True)
        link.symlink_to(relative, target_is_directory=True)
    if link.resolve() != folder.resolve():
        raise FileExistsError(f"{link} exists and is not a link to {folder}")
    return folder.name


def check_record(record, image_folder: Path, absolute_allowed: bool = False) -> None:
    """Raise BadRecord saying what is wrong with one LLaVA record."""
    if not isinstance(record, dict) or "conversations" not in record:
        raise BadRecord("not an object with 'conversations'")
    conversation = record["conversations"]
    try:
        validate_conversation(conversation)
    except ValueError as e:
        raise BadRecord(str(e)) from None
    for i, turn in enumerate(conversation):
        if turn["from"] == "gpt" and not turn["value"].strip():
            raise BadRecord(f"turn {i} has an empty answer")
    placeholders = sum(turn["value"].count(IMAGE_PLACEHOLDER) for turn in conversation)
    if "image" in record:
        check_image_path(record["image"], absolute_allowed)
        if placeholders != 1 or IMAGE_PLACEHOLDER not in conversation[0]["value"]:
            raise BadRecord(f"an image record needs exactly one {IMAGE_PLACEHOLDER} in its first turn, "
                            f"found {placeholders} in the conversation")
        if not (image_folder / record["image"]).is_file():
            raise BadRecord(f"image {image_folder / record['image']} does not exist")
    elif placeholders:
        raise BadRecord(f"{IMAGE_PLACEHOLDER} in a record without an image")


class LLaVADataset(torch.utils.data.Dataset):
    def __init__(self, sources: list[DataSource], tokenizer: Tokenizer, template: Template,
                 processor: ImageProcessor, num_image_tokens: int, max_length: int, seed: int = 0,
                 skip_bad: bool = False, sq_ratio: float = 0.0, allow_absolute_image_paths: bool = False):
        self.tokenizer, self.template, self.processor = tokenizer, template, processor
        self.num_image_tokens, self.max_length, self.skip_bad = num_image_tokens, max_length, skip_bad
        self.absolute_allowed = allow_absolute_image_paths
        self.seed, self.sq_ratio, self.epoch = seed, sq_ratio, 0
        self.records: list[tuple[dict, Path, str]] = []  # record, image folder, where it came from
        self.skipped: dict[str, int] = {}
        for source in sources:
            self.records += self.read_source(source, random.Random(seed))

    def read_source(self, source: DataSource, rng: random.Random) -> list[tuple[dict, Path, str]]:
        try:
            records = json.loads(source.path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read data file {source.path}: {e}") from e
        if not isinstance(records, list):
            raise ValueError(f"{source.path}: expected a JSON list of records")
        folder = source.image_folder or source.path.parent
        kept = []
        for index, record in enumerate(records):
            where = f"{source.path} record {index}"
            try:
                self.check(record, folder)
            except BadRecord as e:
                self.refuse(f"{where}: {e}", source)
                continue
            kept.append((record, folder, where))
        bad = check_images(folder, [record["image"] for record, _, _ in kept if "image" in record])
        unreadable = [(where, record["image"]) for record, _, where in kept if record.get("image") in bad]
        for where, image in unreadable:
            self.refuse(f"{where}: image {folder / image}: {bad[image]} ({len(unreadable)} unreadable images in "
                        f"{source.path}; --skip_bad_records drops them)", source)
        kept = [item for item in kept if item[0].get("image") not in bad]
        whole, fraction = divmod(source.weight, 1)
        return kept * int(whole) + rng.sample(kept, round(fraction * len(kept)))

    def refuse(self, error: str, source: DataSource) -> None:
        """Stop at a bad record, or with skip_bad count it (its caller drops it)."""
        if not self.skip_bad:
            raise BadRecord(error)
        self.skipped[str(source.path)] = self.skipped.get(str(source.path), 0) + 1

    def check(self, record, image_folder: Path) -> None:
        """Raise BadRecord saying what is wrong with a record; a recipe's dataset may demand more."""
        check_record(record, image_folder, self.absolute_allowed)

    def conversation(self, index: int) -> list[dict]:
        """The turns a record is trained on this epoch (a recipe's dataset may rewrite them as they load)."""
        return to_self_questioning(self.records[index][0]["conversations"], self.sq_ratio,
                                   turn_rng(self.seed, index, self.epoch))

    def set_epoch(self, epoch: int) -> None:
        """Called by the training loop before each epoch: per-epoch draws (visual-user turns) depend on it."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def length(self, index: int) -> int:
        """A cheap length estimate for grouping batches: words plus image tokens."""
        record = self.records[index][0]
        words = sum(len(turn["value"].split()) for turn in record["conversations"])
        return words + self.num_image_tokens * ("image" in record)

    def __getitem__(self, index: int) -> dict | None:
        record, folder, where = self.records[index]
        try:
            pixels = self.processor(load_image(folder / record["image"]))[None] if "image" in record else None
        except (OSError, ValueError) as e:
            if self.skip_bad:
                return None  # counted by collate
            raise BadRecord(f"{where}: {e}") from None
        try:
            ids, labels = tokenize_conversation(self.tokenizer, self.template, self.conversation(index),
                                                self.num_image_tokens)
        except ValueError as e:  # a turn the template cannot render, e.g. a VUSER turn without v1_sq
            raise BadRecord(f"{where}: {e}") from None
        sample = truncate(ids, labels, pixels, self.max_length, self.tokenizer.image_token_id, self.num_image_tokens)
        return sample if has_targets(sample) else None  # its answers were cut away: dropped, counted by collate


def has_targets(sample: dict) -> bool:
    """Whether a sample has a token to learn (the first position predicts nothing)."""
    return any(label != IGNORE_INDEX for label in sample["labels"][1:])


def truncate(ids: list[int], labels: list[int], pixels: torch.Tensor | None, max_length: int,
             image_token_id: int, num_image_tokens: int) -> dict:
    """Cut to max_length, never through an image: a cut inside image tokens moves back before them, and the
    images whose tokens were cut away are dropped with them."""
    if len(ids) > max_length:
        cut = max_length
        while cut > 0 and ids[cut - 1] == image_token_id == ids[cut]:
            cut -= 1
        ids, labels = ids[:cut], labels[:cut]
        if pixels is not None:
            kept = ids.count(image_token_id) // num_image_tokens
            pixels = pixels[:kept] if kept else None
    return {"input_ids": ids, "labels": labels, "pixel_values": pixels}


def collate(samples: list[dict | None], pad_id: int) -> dict:
    """Right-pad a micro-batch; the loss never sees padding (labels -100) and causal attention needs no mask.
    Dropped samples (None) are counted as "skipped"; a micro-batch of dropped samples only is one row of padding
    without targets, so that every process still takes part in the step."""
    kept = [s for s in samples if s is not None] or [{"input_ids": [pad_id], "labels": [IGNORE_INDEX],
                                                      "pixel_values": None}]
    width = max(len(s["input_ids"]) for s in kept)
    ids = torch.full((len(kept), width), pad_id, dtype=torch.long)
    labels = torch.full((len(kept), width), IGNORE_INDEX, dtype=torch.long)
    for i, s in enumerate(kept):
        ids[i, :len(s["input_ids"])] = torch.tensor(s["input_ids"])
        labels[i, :len(s["labels"])] = torch.tensor(s["labels"])
    images = [s["pixel_values"] for s in kept if s["pixel_values"] is not None]
    return {"input_ids": ids, "labels": labels, "pixel_values": torch.cat(images) if images else None,
            "skipped": sum(s is None for s in samples)}


@dataclass(frozen=True)
class BatchGeometry:
    """How one optimizer step's records are split: over processes, then over accumulation micro-batches."""
    global_batch: int  # records per optimizer step
    world_size: int  # processes
    micro_batch: int  # records per forward pass of one process

    @property
    def accumulation(self) -> int:
        """Micro-batches per process and step."""
        return self.global_batch // (self.world_size * self.micro_batch)

    def __str__(self) -> str:
        return (f"{self.global_batch} records per step = {self.world_size} process(es) x {self.micro_batch} records "
                f"x {self.accumulation} accumulation step(s)")


def batch_geometry(global_batch: int, micro_batch: int, world_size: int) -> BatchGeometry:
    """The split of `global_batch` records over `world_size` processes with micro-batches of at most `micro_batch`.

    Each process takes global / world records a step, in the fewest micro-batches of equal size that are no larger
    than `micro_batch` (the memory bound): micro = global / (world x accumulation). A global batch that the
    processes cannot share equally is an error that names a global batch and process counts that work.
    """
    if global_batch < 1 or micro_batch < 1:
        raise ValueError(f"global batch {global_batch} and micro batch {micro_batch} must be positive")
    if global_batch % world_size:
        lower, upper = global_batch // world_size * world_size, (global_batch // world_size + 1) * world_size
        fits = [n for n in range(1, 17) if global_batch % n == 0]
        raise ValueError(f"a global batch of {global_batch} records cannot be split over {world_size} processes "
                         f"({global_batch} is not a multiple of {world_size}): use --global_batch_size "
                         f"{upper}{f' or {lower}' if lower else ''}, or --nproc_per_node in {fits}")
    per_process = global_batch // world_size
    accumulation = next(a for a in range(1, per_process + 1) if per_process % a == 0 and per_process <= a * micro_batch)
    return BatchGeometry(global_batch, world_size, per_process // accumulation)


def step_batches(num_records: int, geometry: BatchGeometry, rank: int, epoch: int, seed: int,
                 lengths: list[int] | None = None) -> list[list[list[int]]]:
    """This rank's micro-batches for every optimizer step of one epoch.

    Each step draws `geometry.global_batch` records of a seeded permutation; how they are split over ranks and
    accumulation micro-batches changes nothing in the gradient, because the loss of a step is normalised by
    the step's total target count. With `lengths`, a step's records are sorted by length before the split,
    so micro-batches hold similar lengths and pad little.
    """
    global_batch, micro_batch = geometry.global_batch, geometry.micro_batch
    order = torch.randperm(num_records, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    steps = []
    for start in range(0, num_records - global_batch + 1, global_batch):
        chosen = order[start:start + global_batch]
        if lengths is not None:
            chosen.sort(key=lambda i: -lengths[i])
        micro = [chosen[j:j + micro_batch] for j in range(0, global_batch, micro_batch)]
        steps.append(micro[rank::geometry.world_size])
    return steps
