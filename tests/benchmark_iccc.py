"""How fast ICCC's concept heuristics are: build the concept bank over 558,128 generated COCO-like captions (as
many as LLaVA-Pretrain holds) and draw every caption's training sample, on one core (CPU time, so a busy machine
does not slow the figures down much).

    python tests/benchmark_iccc.py                 # about a minute
    python tests/benchmark_iccc.py --captions 50000

The captions come from a seeded grammar of COCO's common shapes: "<subject> <verb> <object> <relation> <place>",
lists, "there is", numbers, colours, sizes, materials, -ing and -ed modifiers, 6 to 25 words. Draws use the
rates of the presets (LLaVA-1.5's 0.1 / 0.1, the tiny preset's 0.5 / 0.5) and the worst case, every caption
corrected (aug_ratio 1, swap_ratio 0.5).
"""

import argparse
import platform
import random
import time
from pathlib import Path

from nanovlm.iccc import ICCC, ConceptBank, make_sample, sample_rng

SUBJECTS = ("man", "woman", "boy", "girl", "dog", "cat", "person", "child", "player", "skier", "surfer", "horse",
            "elephant", "giraffe", "zebra", "bird", "bear", "cow", "sheep", "train", "bus", "truck", "car")
OBJECTS = ("frisbee", "umbrella", "kite", "skateboard", "surfboard", "pizza", "sandwich", "cake", "laptop", "phone",
           "ball", "racket", "bat", "book", "cup", "bottle", "bench", "chair", "table", "couch", "bed", "plate")
PLACES = ("beach", "street", "field", "park", "kitchen", "room", "road", "track", "snow", "water", "grass", "sidewalk",
          "counter", "desk", "ocean", "hill", "city", "station", "building", "window")
VERBS = ("riding", "holding", "sitting on", "standing next to", "eating", "playing with", "carrying", "looking at",
         "walking with", "throwing", "catching", "flying", "pulling", "lying on", "watching", "sits on", "holds",
         "rides", "stands near", "is holding", "is sitting on", "are playing with", "parked next to", "filled with",
         "covered with", "topped with")
RELATIONS = ("on", "in", "near", "next to", "in front of", "on top of", "behind", "under", "above", "beside", "at",
             "by", "along", "across from", "inside", "to the left of")
MODIFIERS = ("red", "blue", "green", "white", "black", "yellow", "brown", "large", "small", "little", "big", "tall",
             "old", "young", "wooden", "metal", "plastic", "glass", "empty", "busy", "snowy", "grassy", "sunny",
             "dining", "stuffed", "parked", "two", "three", "several", "many", "a few")


def noun_phrase(rng: random.Random, nouns: tuple[str, ...]) -> str:
    modifiers = rng.sample(MODIFIERS, rng.choice((0, 0, 1, 1, 2)))
    count = next((m for m in modifiers if m in ("two", "three", "several", "many", "a few")), None)
    modifiers = [m for m in modifiers if m != count]
    noun = rng.choice(nouns)
    if count:
        return " ".join([count, *modifiers, noun + "s"])
    words = [*modifiers, noun]
    return ("an " if words[0][0] in "aeiou" else rng.choice(("a ", "a ", "the "))) + " ".join(words)


def coco_like(rng: random.Random) -> str:
    subject = noun_phrase(rng, SUBJECTS)
    shape = rng.random()
    if shape < 0.55:
        text = (f"{subject} {rng.choice(VERBS)} {noun_phrase(rng, OBJECTS)} {rng.choice(RELATIONS)} "
                f"{noun_phrase(rng, PLACES)}")
    elif shape < 0.75:
        text = f"{subject} {rng.choice(RELATIONS)} {noun_phrase(rng, PLACES)}"
    elif shape < 0.9:
        text = f"{subject} and {noun_phrase(rng, SUBJECTS)} {rng.choice(VERBS)} {noun_phrase(rng, OBJECTS)}"
    else:
        text = (f"there is {subject} {rng.choice(VERBS)} {noun_phrase(rng, OBJECTS)} with "
                f"{noun_phrase(rng, OBJECTS)} and {noun_phrase(rng, OBJECTS)} {rng.choice(RELATIONS)} "
                f"{noun_phrase(rng, PLACES)}")
    return text[0].upper() + text[1:] + rng.choice((".", ".", ""))


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.machine())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--captions", type=int, default=558128)
    args = parser.parse_args(argv)
    rng = random.Random(0)
    captions = [coco_like(rng) for _ in range(args.captions)]
    words = sum(len(c.split()) for c in captions) / len(captions)
    print(f"{len(captions)} captions, {words:.1f} words on average, e.g. {captions[0]!r}, {captions[1]!r}")
    start = time.process_time()  # CPU time: the rate of one core even on a shared machine
    bank = ConceptBank.build(captions)
    seconds = {"concept bank": time.process_time() - start}
    print(f"concept bank: {bank.summary()}")
    for name, settings in (("llava15-7b rates", ICCC(0.1, 0.1)), ("tiny rates", ICCC(0.5, 0.5)),
                           ("every caption corrected", ICCC(1.0, 0.5))):
        start = time.process_time()
        kinds = [make_sample(c, bank, settings, sample_rng(0, i, 0)).kind for i, c in enumerate(captions)]
        seconds[name] = time.process_time() - start
        share = {k: round(kinds.count(k) / len(kinds), 3) for k in ("caption", "replace", "swap")}
        print(f"{name}: {share}")
    print(f"\n{cpu_name()}, Python {platform.python_version()}, CPU seconds of one process:")
    for name, s in seconds.items():
        print(f"{name:>24}: {s:6.1f} s, {len(captions) / s:8.0f} captions/s")
    return seconds


if __name__ == "__main__":
    main()
