"""STIC: self-training on image comprehension (Deng et al., 2024). A trained VLM improves from unlabeled images:
it writes its own preferred and dispreferred descriptions, learns from them with DPO (nanovlm/dpo.py), then
learns to use its own description of an image when it answers a question about it. train_stic.py runs it.

Stage 1, preferences. For each unlabeled image, seeded by (seed, image):
- y_w, preferred: the model's description of the clean image under the `detailed` prompt, a step-by-step
  request for the subjects, the setting, the mood, the colours and composition, and what the image may mean;
- y_l, dispreferred, 50/50: a description of the clean image under one of the `hallucination` prompts, which
  invite objects that are not there; or a description under the training prompt x of a corrupted image: 50/50
  the short side downscaled to 20 px (the usual preprocessing then scales it back up), or a colour jitter
  (brightness factor in [0.5, 1.5], hue shifted by up to 0.3 of a turn);
- x, the prompt stored with the pair: one of 8 plain `describe` prompts.
Both answers are sampled at temperature 0.2 (up to 1024 new tokens, as released). The image is part of every
prompt, in generation and in training. PAPER_PROMPTS holds the three lists in this project's wording of the
paper's; a model that knows only its own narrow prompts (the tiny preset) gets its own lists (train_stic.py).

Stage 2, description-infused fine-tuning. The stage-1 model describes the image of each record of a slice of the
instruction data (5k records in the paper) under a random plain prompt (temperature 0.2), and the record's first
human turn becomes `<image>\\nImage description:\\n{description}\\n\\n{question}` (`infuse`); it is then trained
with the ordinary SFT loss. At inference, describe-and-respond (`describe_and_respond`, `eval.py --dar`) has the
model describe the image first (greedy, under the first plain prompt, "Describe the image.") and answer with the
description in that same layout.

Departures from the released code, which does not do what the paper says: it never corrupts the image it
describes (so half the dispreferred answers come from clean images), and its DPO prompts and its DaR description
prompt lack the image placeholder (so those passes never see the image). Here the corrupted image is the one
described, and every pass has the image in its prompt (tests/test_stic.py checks both).
"""

import json
import random
import shutil
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageEnhance
from tqdm import tqdm

from .checkpoint import atomic_write
from .data import BadRecord, check_record
from .generate import Sampling, answer
from .image import ImageProcessor, load_image
from .templates import Template
from .tokenizer import IMAGE_PLACEHOLDER, Tokenizer
from .train import Distributed
from .vlm import VLM


@dataclass(frozen=True)
class Prompts:
    describe: tuple[str, ...]  # plain description prompts: the training prompt x, stage 2's descriptions, DaR's (first)
    detailed: str  # the step-by-step prompt of the preferred answers
    hallucination: tuple[str, ...]  # prompts that invite objects that are not in the image


PAPER_PROMPTS = Prompts(
    describe=(
        "Describe the image.",
        "Give an account of what the image contains.",
        "What does this picture show? Describe it.",
        "Write a description of the scene in the image.",
        "Tell me about the things in this picture and how they are arranged.",
        "Explain what is going on in this image.",
        "Provide a description of the visual content.",
        "Walk me through the main things visible in the photo.",
    ),
    detailed=(
        "Describe the image in detail, step by step. First, name the main subjects (people, animals or objects) "
        "and say what each of them is doing. Second, describe the setting: indoors or outdoors, and what kind of "
        "place it is. Third, describe the mood of the image and what creates it, such as the light, the weather "
        "or the expressions. Fourth, describe the main colours and how the picture is composed. Finally, point "
        "out any other details that help to understand the image, and say what it may represent."
    ),
    hallucination=(
        "Describe the image, adding objects that are not shown but could plausibly be there.",
        "Describe the scene and invent extra people or things that would fit into it.",
        "Describe the picture, including the items you imagine lie just outside the frame.",
        "Describe the image as if it also held the objects that usually appear in scenes like it.",
        "Describe the scene together with events or activities that could be taking place in it.",
        ("Describe the picture with animals, weather or other natural elements that might belong there, stated "
         "as facts."),
        "Describe the image and fill it with the tools, vehicles or gadgets one would expect in such a setting.",
        "Describe the scene with imagined details that make it richer, written as if they were visible.",
    ),
)
DOWNSCALE_SIDE = 20
BRIGHTNESS, HUE = 0.5, 0.3  # torchvision ColorJitter(brightness=0.5, hue=0.3), as released
GENERATION_TEMPERATURE = 0.2
DESCRIPTION_TOKENS = 1024
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


def downscale(image: Image.Image, short_side: int = DOWNSCALE_SIDE) -> Image.Image:
    """The image with its short side resized to `short_side` pixels, keeping the aspect ratio (bilinear)."""
    width, height = image.size
    long = int(short_side * max(width, height) / min(width, height))
    size = (short_side, long) if width <= height else (long, short_side)
    return image.resize(size, Image.Resampling.BILINEAR)


def colour_jitter(image: Image.Image, brightness: float, hue: float) -> Image.Image:
    """Scale every pixel by `brightness` (clipped), then rotate the hue by `hue` of a turn (-0.5 to 0.5)."""
    image = ImageEnhance.Brightness(image).enhance(brightness)
    h, s, v = image.convert("HSV").split()
    shift = round(hue * 255)
    return Image.merge("HSV", (h.point(lambda x: (x + shift) % 256), s, v)).convert("RGB")


def corrupt(image: Image.Image, rng: random.Random) -> tuple[Image.Image, str]:
    """A corrupted copy of `image` and its kind: 50/50 downscaled or colour-jittered, drawn from `rng`."""
    if rng.random() < 0.5:
        return downscale(image), "downscale"
    return colour_jitter(image, rng.uniform(1 - BRIGHTNESS, 1 + BRIGHTNESS), rng.uniform(-HUE, HUE)), "colour_jitter"


def infuse(question: str, description: str) -> str:
    """A first human turn with the image's description before the question, in STIC's layout."""
    question = question.replace(IMAGE_PLACEHOLDER, "", 1).lstrip("\n")
    return f"{IMAGE_PLACEHOLDER}\nImage description:\n{description}\n\n{question}"


def unlabeled_images(source: Path) -> tuple[Path, list[str]]:
    """The folder the images are relative to, and their paths: every image file under a folder (sorted), or the
    "image" of each record of a LLaVA JSON file (relative to the file's folder), such as data/shapes.py's
    unlabeled.json or data/coco_captions.py's coco_unlabeled.json."""
    if source.is_dir():
        names = sorted(str(p.relative_to(source)) for p in source.rglob("*")
                       if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not names:
            raise ValueError(f"{source}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        return source, names
    try:
        records = json.loads(source.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read the unlabeled images {source} (a folder or a LLaVA JSON file): {e}") from None
    if not isinstance(records, list) or not records:
        raise ValueError(f"{source}: expected a non-empty JSON list of records with an 'image'")
    names, first = [], {}
    for index, record in enumerate(records):
        if not isinstance(record, dict) or not isinstance(record.get("image"), str):
            raise BadRecord(f"{source} record {index}: no 'image' path")
        if record["image"] in first:
            raise BadRecord(f"{source} record {index}: image {record['image']} repeats record {first[record['image']]}")
        first[record["image"]] = index
        names.append(record["image"])
    return source.parent, names


def sft_slice(path: Path, image_folder: Path, num: int, seed: int, skip_bad: bool) -> tuple[dict[int, dict], int]:
    """A seeded sample of `num` image records of an instruction-tuning file (text-only records have nothing to
    describe), checked as training checks them: {index in the file: record} and how many were skipped."""
    try:
        records = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read the instruction data {path}: {e}") from None
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of LLaVA records")
    candidates = [i for i, r in enumerate(records) if isinstance(r, dict) and "image" in r]
    chosen, skipped = {}, 0
    for index in sorted(random.Random(seed).sample(candidates, min(num, len(candidates)))):
        try:
            check_record(records[index], image_folder)
        except BadRecord as e:
            if not skip_bad:
                raise BadRecord(f"{path} record {index}: {e}") from None
            skipped += 1
            continue
        chosen[index] = records[index]
    if not chosen:
        raise ValueError(f"{path}: no usable image records to describe")
    return chosen, skipped


def read_images(root: Path, names: list[str], skip_bad: bool) -> tuple[dict[str, Image.Image], dict[str, str]]:
    """The images that load, and the error of each one that does not (raised unless skip_bad)."""
    images, errors = {}, {}
    for name in names:
        try:
            images[name] = load_image(root / name)
        except (OSError, ValueError) as e:
            if not skip_bad:
                raise BadRecord(f"{e} (--skip_bad_records true skips unreadable images and counts them)") from None
            errors[name] = str(e)
    return images, errors


def describe(model: VLM, tokenizer: Tokenizer, processor: ImageProcessor, template: Template,
             requests: list[tuple[Image.Image, str, int]], sampling: Sampling) -> list[str]:
    """The model's answer to each (image, prompt, seed) in one batch; each is sampled from its own generator,
    so an answer does not depend on the batch it is in."""
    device = model.language_model.embed_tokens.weight.device
    generators = [torch.Generator(device).manual_seed(seed) for _, _, seed in requests]
    questions = [(image, f"{IMAGE_PLACEHOLDER}\n{prompt}") for image, prompt, _ in requests]
    texts = answer(model, tokenizer, processor, template, questions, sampling, max(1, len(questions)),
                   generator=generators)
    return [text.replace(IMAGE_PLACEHOLDER, "image") for text in texts]  # a spelt-out placeholder is not an image


def make_preferences(model: VLM, tokenizer: Tokenizer, processor: ImageProcessor, template: Template, root: Path,
                     names: list[str], seed: int, sampling: Sampling, skip_bad: bool = False,
                     prompts: Prompts = PAPER_PROMPTS) -> list[dict]:
    """One preference record per image (module docstring), or {"image", "error"} for one that does not load."""
    images, errors = read_images(root, names, skip_bad)
    records, requests = {}, []
    for name, image in images.items():
        rng = random.Random(f"stic-pair-{seed}-{name}")
        prompt = rng.choice(prompts.describe)
        if rng.random() < 0.5:
            rejected_prompt, rejected_image, corruption = rng.choice(prompts.hallucination), image, None
        else:
            rejected_prompt, (rejected_image, corruption) = prompt, corrupt(image, rng)
        requests += [(image, prompts.detailed, rng.getrandbits(63)),
                     (rejected_image, rejected_prompt, rng.getrandbits(63))]
        records[name] = {"image": name, "prompt": prompt, "rejected_prompt": rejected_prompt, "corruption": corruption}
    texts = iter(describe(model, tokenizer, processor, template, requests, sampling))
    for record in records.values():
        record["chosen"], record["rejected"] = next(texts), next(texts)
    return [records[name] if name in records else {"image": name, "error": errors[name]} for name in names]


def make_descriptions(model: VLM, tokenizer: Tokenizer, processor: ImageProcessor, template: Template, root: Path,
                      records: dict[int, dict], indices: list[int], seed: int, sampling: Sampling,
                      skip_bad: bool = False, prompts: Prompts = PAPER_PROMPTS) -> list[dict]:
    """{"index", "prompt", "description"} for the image of each SFT record `records[index]`, described under a
    random plain prompt, or {"index", "error"} for one that does not load."""
    images, errors = read_images(root, [records[i]["image"] for i in indices], skip_bad)
    rngs = {i: random.Random(f"stic-description-{seed}-{i}") for i in indices}
    asked = {i: rngs[i].choice(prompts.describe) for i in indices}
    usable = [i for i in indices if records[i]["image"] in images]
    texts = describe(model, tokenizer, processor, template,
                     [(images[records[i]["image"]], asked[i], rngs[i].getrandbits(63)) for i in usable], sampling)
    described = dict(zip(usable, texts))
    return [{"index": i, "prompt": asked[i], "description": described[i]} if i in described
            else {"index": i, "error": errors[records[i]["image"]]} for i in indices]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def write_jsonl(path: Path, records: list[dict]) -> None:
    atomic_write(path, lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in records)))


def generate_jsonl(path: Path, keys: list[Hashable], key: str, make: Callable[[list], list[dict]],
                   env: Distributed, batch_size: int, desc: str) -> list[dict]:
    """Make one record per key, `make(batch of keys)` at a time, and write them to the JSONL file `path` in the
    order of `keys`; return them. A record with an "error" field stands for an input that could not be used: it
    goes to `path`.skipped.jsonl instead, and is counted.

    Resumable and sharded: the keys that neither `path`, the skipped file nor a part file holds yet are cut into
    batches, and rank r of a torchrun makes batches r, r + world size, ...: a batch holds the same keys whatever
    the number of processes, so one process and N write the same file. Each rank rewrites its part
    (`path`.parts/rank{r}.jsonl) atomically after every batch, so a killed run loses at most the batches in
    flight; rank 0 joins the parts into `path` at the end.
    """
    parts = path.with_name(path.name + ".parts")
    skipped_path = path.with_name(path.stem + ".skipped.jsonl")

    def finished() -> dict:
        files = [path, skipped_path, *sorted(parts.glob("*.jsonl"))]
        return {record[key]: record for file in files for record in read_jsonl(file)}

    done = finished()
    env.barrier()  # every rank has read the parts before any rank writes to them
    todo = [k for k in keys if k not in done]
    if env.main:
        print(f"{desc}: {len(keys) - len(todo)} of {len(keys)} already done, {len(todo)} to make ({path})")
    own_part = parts / f"rank{env.rank}.jsonl"
    mine = read_jsonl(own_part)
    batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
    for batch in tqdm(batches[env.rank::env.world_size], disable=not env.main, desc=desc, dynamic_ncols=True):
        mine += make(batch)
        write_jsonl(own_part, mine)
    env.barrier()
    if env.main:
        records = finished()
        missing = [k for k in keys if k not in records]
        if missing:
            raise RuntimeError(f"{path}: no record was made for {len(missing)} keys, e.g. {missing[:3]}")
        good = [records[k] for k in keys if "error" not in records[k]]
        bad = [records[k] for k in keys if "error" in records[k]]
        write_jsonl(path, good)
        if bad:
            write_jsonl(skipped_path, bad)
            print(f"{desc}: skipped {len(bad)} unreadable inputs, listed in {skipped_path}")
        shutil.rmtree(parts, ignore_errors=True)
    env.barrier()
    return read_jsonl(path)


def describe_and_respond(model: VLM, tokenizer: Tokenizer, processor: ImageProcessor, template: Template,
                         questions: list[tuple[Image.Image | str | Path | None, str]],
                         sampling: Sampling = Sampling(max_new_tokens=64), batch_size: int = 32,
                         progress: bool = False, description_tokens: int = DESCRIPTION_TOKENS,
                         prompt: str = PAPER_PROMPTS.describe[0]) -> list[str]:
    """STIC's describe-and-respond, a drop-in for generate.answer: each image is first described (greedy, under
    the first plain prompt), then its question is answered with the description infused in the prompt.
    Questions without an image are answered as they are."""
    with_image = [i for i, (image, _) in enumerate(questions) if image is not None]
    descriptions = answer(model, tokenizer, processor, template,
                          [(questions[i][0], f"{IMAGE_PLACEHOLDER}\n{prompt}") for i in with_image],
                          Sampling(max_new_tokens=description_tokens), batch_size, progress)
    infused = list(questions)
    for i, description in zip(with_image, descriptions):
        infused[i] = (questions[i][0], infuse(questions[i][1], description.replace(IMAGE_PLACEHOLDER, "image")))
    return answer(model, tokenizer, processor, template, infused, sampling, batch_size, progress)
