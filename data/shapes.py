"""The shapes world: a deterministic synthetic dataset to train and evaluate a tiny VLM on a laptop CPU.

Each image shows 1-4 coloured shapes on a dark-grey background, each in its own cell of a 4x4 grid (moved by a
pixel at most from the cell's centre), so that one object falls in one patch of the tiny preset's vision tower:
with shapes, colours and sizes read off a single patch, the tiny model learns them in minutes on a CPU, and what
stays hard is what VLMs find hard: binding attributes, counting, spatial relations and hallucinated objects.
`generate` (or `python data/shapes.py --out out/shapes`) writes LLaVA JSON: captions.json (stage 1: a caption
per train image), instruct.json (stage 2: a 3-6 turn conversation per train image), unlabeled.json (images only,
for self-training such as STIC), eval.json (single short-answer questions for `score` and `format_table`; the
eval script puts "<image>\n" in front), objects.json (image -> the objects drawn, the ground truth behind every
answer) and world.json (config, vocabulary, held-out pairs, counts, train pair statistics).

Four colour-shape pairs never occur in train or unlabeled images; half the eval images contain one, which
measures compositional generalisation. Existence questions follow POPE: half about present objects, half about
absent ones drawn at random, among the most frequent pairs (popular) or among those co-occurring most with the
present ones (adversarial). Pair frequencies are skewed, and pairs have "companions" they tend to appear with,
so that the popular and adversarial settings really probe those biases.

`python data/shapes_show.py` draws a world's first eval images with their questions, and a model's answers.

Two rendering domains, for SPHINX's weight mixing (nanovlm/merge.py): `solid` (the default, domain A) fills each
shape on a flat dark-grey background; `outline` (domain B, `--style outline --out out/shapes_b`) draws its objects,
with the same geometry (one object per grid cell, so one per patch of the tiny tower; the same sizes and boxes), as
outlines on a background of grey noise (data/shapes_draw.py draws both). A domain-B world keeps domain A's rules
(held-out pairs, pair frequencies, companions: the world's seed) and draws its own scenes, questions and noise from
streams keyed by the style, so its train and eval splits are its own; a solid world is written exactly as before
styles existed.
"""

import argparse
import json
import random
import re
import sys
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field, fields
from itertools import permutations
from pathlib import Path

from PIL import Image
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python data/shapes.py` finds the packages
from data.shapes_draw import COLOURS, draw, draw_outline  # noqa: E402

VERSION = 12  # bump when the output changes, so that a stale world.json is not reused
STYLES = ("solid", "outline")  # domains A and B, drawn by data/shapes_draw.py
SHAPES = ("circle", "square", "triangle", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
SIZES = {"small": 0.2, "large": 0.38}  # half the side of an object's bounding box, as a fraction of its cell
MAX_OBJECTS = 4
MIN_GAP = 2  # background pixels between any two bounding boxes
# A pixel of jitter keeps images distinct while a shape stays a fixed pattern of pixels in its patch: a ViT
# trained from scratch has no convolutional prior, and with jitter of a few pixels it needs far more than the
# default run's minutes to tell a small circle from a small square.
JITTER = 1
GRID = 4  # cells per side; the tiny tower's patch is one cell
NUM_HOLDOUT = 4
COMPANIONS_PER_PAIR, COMPANION_PROB = 2, 0.4
SPATIAL_MARGIN = 0.5  # spatial questions need centres this far apart (fraction of a cell) on their axis
POPE_KINDS = ("random", "popular", "adversarial")
POPE_TOP_K = 3  # popular / adversarial negatives come from the top-k absent pairs
FOCUS_PROB = 0.8  # how often a hold-out image's question is about its held-out object, when one can be
EVAL_TYPES = ("colour", "shape", "count", "size", "spatial", "existence")
# How often a turn draws each type: most for what is learnt last (relations; the lookups by a shape's name: the colour
# of "the square", how many squares), least for the first learnt (shape, by colour, existence; results/default_run.md)
INSTRUCT_TYPES = {"colour": 3.5, "shape": 0.3, "count": 2.0, "size": 2.0, "spatial": 3.5, "existence": 0.5,
                  "caption": 0.4}
BALANCED_TYPES = {"count", "existence"}  # answers as even as the images allow: no free guesses
EVAL_QUESTIONS_PER_IMAGE = 3
CAPTION_PROMPTS = (
    "Describe the image briefly.", "What is in this picture?", "List the objects in the image.",
    "Give a short caption for this image.", "Summarize the image in one sentence.",
)


@dataclass
class ShapesConfig:
    num_train: int = 16000
    num_unlabeled: int = 2000
    num_eval: int = 2000
    image_size: int = 96
    seed: int = 0
    style: str = "solid"  # one of STYLES

    def stream(self, name: str) -> str:
        """The seed of one random stream; a solid world's keys predate styles, so its output stays what it was."""
        return f"{self.seed}-{name}" if self.style == "solid" else f"{self.seed}-{self.style}-{name}"

    def record(self) -> dict:
        """The config as world.json stores it (a solid world's without its style, as before styles existed)."""
        return {k: v for k, v in asdict(self).items() if not (k == "style" and v == "solid")}


@dataclass(frozen=True)
class Obj:
    colour: str
    shape: str
    size: str
    x: int  # centre, in pixels
    y: int
    r: int  # half side of the bounding box
    column: int  # its grid cell, which orders captions and decides relations (not the pixel of jitter)
    row: int

    @property
    def pair(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass
class World:
    """Rules fixed by the seed: the held-out pairs, how common each other pair is and which pairs go together."""

    holdout: list[str]
    weights: dict[str, float]  # sampling weight of each pair allowed in training
    companions: dict[str, list[str]]


@dataclass(frozen=True)
class Question:
    type: str
    text: str
    answer: str
    about: tuple[str, ...] = ()  # the pairs it concerns, to steer hold-out questions to held-out objects
    pope: str | None = None


def make_world(seed: int) -> World:
    rng = random.Random(f"{seed}-world")
    # A permutation of shapes against distinct colours: each shape and each colour is held out at most once.
    holdout = [f"{c} {s}" for c, s in zip(rng.sample(list(COLOURS), NUM_HOLDOUT), rng.sample(SHAPES, NUM_HOLDOUT))]
    allowed = [f"{c} {s}" for c in COLOURS for s in SHAPES if f"{c} {s}" not in holdout]
    # Zipf-like weights over a shuffled order make some pairs "popular", as some objects are in real photos.
    ranks = {pair: rank for rank, pair in enumerate(rng.sample(allowed, len(allowed)))}
    companions = {p: rng.sample([q for q in allowed if q != p], COMPANIONS_PER_PAIR) for p in allowed}
    return World(holdout, {p: 1 / (ranks[p] + 1) ** 0.5 for p in allowed}, companions)


def sample_pairs(rng: random.Random, world: World, n: int) -> list[str]:
    names, weights = list(world.weights), list(world.weights.values())
    pairs = rng.choices(names, weights)
    while len(pairs) < n:  # an object often brings a companion, which makes co-occurrence informative
        if rng.random() < COMPANION_PROB:
            pairs.append(rng.choice(world.companions[pairs[-1]]))
        else:
            pairs += rng.choices(names, weights)
    return pairs


def place(rng: random.Random, pair: str, size: str, cell: tuple[int, int], cell_size: int) -> Obj:
    """An object in grid cell (column, row), its centre moved by up to JITTER pixels from the cell's centre."""
    colour, shape = pair.split()
    r = round(SIZES[size] * cell_size)
    jitter = min(JITTER, cell_size // 2 - r - MIN_GAP)  # keeps a free margin around the box, inside the cell
    x, y = (c * cell_size + cell_size // 2 + rng.randint(-jitter, jitter) for c in cell)
    return Obj(colour, shape, size, x, y, r, *cell)


def sample_scene(rng: random.Random, world: World, cfg: "ShapesConfig", holdout: bool) -> list[Obj]:
    n = rng.randint(1, MAX_OBJECTS)
    pairs = sample_pairs(rng, world, n)
    if holdout:
        pairs[rng.randrange(n)] = rng.choice(world.holdout)
    cells = rng.sample([(col, row) for row in range(GRID) for col in range(GRID)], n)
    cell_size = cfg.image_size // GRID
    return [place(rng, pair, rng.choice(list(SIZES)), cell, cell_size) for pair, cell in zip(pairs, cells)]


def render(objects: list[Obj], cfg: "ShapesConfig", path: str) -> Image.Image:
    """An image of the world's style; an outline image's noise is seeded by the image's path."""
    if cfg.style == "solid":
        return draw(objects, cfg.image_size)
    return draw_outline(objects, cfg.image_size, cfg.stream(f"noise-{path}"))


def caption(objects: list[Obj]) -> str:
    """Every object column by column from the left, top to bottom within a column: "A large red circle, a small
    blue square and a ..."."""
    phrases = [f"a {o.size} {o.pair}" for o in sorted(objects, key=lambda o: (o.column, o.row))]
    text = phrases[-1] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return text[0].upper() + text[1:] + "."


def unique(objects: list[Obj], attribute: str) -> list[Obj]:
    """The objects that their `attribute` alone ("the circle", "the red object") picks out unambiguously."""
    counts = Counter(getattr(o, attribute) for o in objects)
    return [o for o in objects if counts[getattr(o, attribute)] == 1]


# How a question names one object: "the red circle", "a red circle", "the red object", "the circle".
_COLOUR, _SHAPE = "|".join(COLOURS), "|".join(SHAPES)
REFERENCE = re.compile(rf"\b(?:the|a|an) ((?:{_COLOUR}) (?:{_SHAPE})|(?:{_COLOUR}) object|(?:{_SHAPE}))\b")


def named_objects(question: str, objects: list[dict]) -> list[list[dict]] | None:
    """The objects of an image (objects.json's records) that each name in the question matches, in the order
    named; None when a name matches none (an existence question answered "no") or the question names none."""
    def matches(name: str, o: dict) -> bool:
        return name in (f"{o['colour']} {o['shape']}", f"{o['colour']} object", o["shape"])

    named = [[o for o in objects if matches(name, o)] for name in REFERENCE.findall(question)]
    return named if named and all(named) else None


def colour_questions(objects: list[Obj], asker: "Asker") -> list[Question]:
    return [Question("colour", f"What colour is the {o.shape}?", o.colour, (o.pair,)) for o in unique(objects, "shape")]


def shape_questions(objects: list[Obj], asker: "Asker") -> list[Question]:
    return [
        Question("shape", f"What shape is the {o.colour} object?", o.shape, (o.pair,))
        for o in unique(objects, "colour")
    ]


def size_questions(objects: list[Obj], asker: "Asker") -> list[Question]:
    return [Question("size", f"Is the {o.pair} small or large?", o.size, (o.pair,)) for o in unique(objects, "pair")]


def count_questions(objects: list[Obj], asker: "Asker") -> list[Question]:
    """The total, each colour and shape present, and one absent one (all absent ones would swamp the rest with 0)."""
    present = sorted({o.colour for o in objects} | {o.shape for o in objects})
    absent = [a for a in (*COLOURS, *SHAPES) if a not in present]
    questions = [Question("count", "How many objects are there?", str(len(objects)), tuple(o.pair for o in objects))]
    for attribute in present + [asker.rng.choice(absent)]:
        matching = tuple(o.pair for o in objects if attribute in (o.colour, o.shape))
        what = f"{attribute} objects" if attribute in COLOURS else PLURALS[attribute]
        questions.append(Question("count", f"How many {what} are there?", str(len(matching)), matching))
    return questions


# A relation is asked as a choice between two objects and answered by the name of the one further that way:
# "Which is further left, the red circle or the blue square?" -> "blue square". The grid cell decides (the two are
# never in one column or row), so the answer needs where each named object is, not the pixel of jitter.
RELATIONS = {"further left": lambda o: o.column, "further right": lambda o: -o.column,
             "higher": lambda o: o.row, "lower": lambda o: -o.row}


def spatial_questions(objects: list[Obj], asker: "Asker") -> list[Question]:
    questions = []
    for a, b in permutations(unique(objects, "pair"), 2):
        for relation, key in RELATIONS.items():
            axis = 0 if relation.startswith("further") else 1
            if abs((a.x, a.y)[axis] - (b.x, b.y)[axis]) < SPATIAL_MARGIN * asker.cell_size:
                continue  # objects in one column (row) are not compared
            questions.append(Question("spatial", f"Which is {relation}, the {a.pair} or the {b.pair}?",
                                      min(a, b, key=key).pair, (a.pair, b.pair)))
    return questions


def existence_questions(objects: list[Obj], asker: "Asker", kind: str) -> list[Question]:
    """POPE: "yes" for the present pairs; "no" for absent ones, drawn by `kind` (random, popular, adversarial)."""
    present = sorted({o.pair for o in objects})
    absent = [p for p in asker.vocab if p not in present]
    if kind == "popular":
        absent = sorted(absent, key=lambda p: -asker.frequency[p])[:POPE_TOP_K]
    elif kind == "adversarial":
        absent = sorted(absent, key=lambda p: -sum(asker.cooccurrence[q][p] for q in present))[:POPE_TOP_K]

    def exists(pair: str, answer: str) -> Question:
        article = "an" if pair[0] in "aeiou" else "a"
        return Question("existence", f"Is there {article} {pair} in the image?", answer, (pair,), kind)

    return [exists(p, "yes") for p in present] + [exists(p, "no") for p in absent]


def caption_questions(objects: list[Obj], asker: "Asker") -> list[Question]:
    return [Question("caption", "Describe the image.", caption(objects))]


QUESTIONS = {  # existence is not here: it also needs a POPE kind
    "colour": colour_questions, "shape": shape_questions, "size": size_questions, "count": count_questions,
    "spatial": spatial_questions, "caption": caption_questions,
}


@dataclass
class Asker:
    """Draws questions about scenes, and tallies what it asked to keep types, yes/no and POPE kinds balanced."""

    rng: random.Random
    cell_size: int
    vocab: list[str]  # the pairs that questions may name
    frequency: Counter  # train images holding each pair
    cooccurrence: dict[str, Counter]  # train images holding each two pairs
    asked: Counter = field(default_factory=Counter)

    def least_asked_first(self, options, *key) -> list:
        # sorted first, so that a set's order cannot change which random tie-breaks go where
        return sorted(sorted(options), key=lambda option: (self.asked[(*key, option)], self.rng.random()))

    def ask(self, qtype: str, objects: list[Obj], focus: frozenset[str] = frozenset()) -> Question | None:
        """A question of `qtype` that is mostly about the `focus` pairs if it can be; None if none applies."""
        if qtype == "existence":
            kind = self.least_asked_first(POPE_KINDS, qtype)[0]
            candidates = existence_questions(objects, self, kind)
        else:
            kind, candidates = None, QUESTIONS[qtype](objects, self)
        if not candidates:
            return None
        if qtype in BALANCED_TYPES:
            answer = self.least_asked_first({q.answer for q in candidates}, qtype, kind)[0]
            candidates = [q for q in candidates if q.answer == answer]
        focused = [q for q in candidates if focus.intersection(q.about)]
        if focused and self.rng.random() < FOCUS_PROB:
            candidates = focused
        question = self.rng.choice(candidates)
        self.asked.update([(qtype,), (qtype, kind), (qtype, kind, question.answer)])
        return question

    def conversation(self, objects: list[Obj]) -> list[Question]:
        wanted, questions = self.rng.randint(3, 6), {}
        while len(questions) < wanted:  # count and existence questions always apply, and there are enough of them
            qtype = self.rng.choices(list(INSTRUCT_TYPES), list(INSTRUCT_TYPES.values()))[0]
            question = self.ask(qtype, objects)
            if question:
                questions.setdefault(question.text, question)  # no repeats, so at most one caption
        return list(questions.values())

    def eval_questions(self, objects: list[Obj], focus: frozenset[str]) -> list[Question]:
        questions = []
        for qtype in self.least_asked_first(EVAL_TYPES):  # distinct types per image, the rarest so far first
            if len(questions) < EVAL_QUESTIONS_PER_IMAGE and (question := self.ask(qtype, objects, focus)):
                questions.append(question)
        return questions


def pair_statistics(scenes: list[list[Obj]]) -> tuple[Counter, dict[str, Counter]]:
    """In how many images each pair occurs, and each two pairs occur together."""
    frequency, cooccurrence = Counter(), defaultdict(Counter)
    for objects in scenes:
        pairs = sorted({o.pair for o in objects})
        frequency.update(pairs)
        for a, b in permutations(pairs, 2):
            cooccurrence[a][b] += 1
    return frequency, cooccurrence


def chat(image: str, turns: list[tuple[str, str]]) -> dict:
    """A LLaVA record from (question, answer) turns; the image placeholder opens the first question."""
    conversation = []
    for i, (question, answer) in enumerate(turns):
        conversation.append({"from": "human", "value": ("<image>\n" if i == 0 else "") + question})
        conversation.append({"from": "gpt", "value": answer})
    return {"id": Path(image).stem, "image": image, "conversations": conversation}


def eval_record(image: str, i: int, q: Question, split: str) -> dict:
    record = {"id": f"{Path(image).stem}_{i}", "image": image, "question": q.text, "answer": q.answer}
    return record | {"type": q.type, "split": split} | ({"pope": q.pope} if q.pope else {})


def sample_scenes(cfg: ShapesConfig, world: World) -> dict[str, dict[str, list[Obj]]]:
    """split -> image path -> objects. Odd eval images hold a held-out pair: interleaved, any prefix is mixed."""

    def split(name: str, count: int, holdout=lambda i: False) -> dict[str, list[Obj]]:
        rng = random.Random(cfg.stream(name))  # a stream per split: eval does not depend on num_train
        paths = [f"images/{name}_{i:06d}.png" for i in range(count)]
        return {path: sample_scene(rng, world, cfg, holdout(i)) for i, path in enumerate(paths)}

    return {
        "train": split("train", cfg.num_train),
        "unlabeled": split("unlabeled", cfg.num_unlabeled),
        "eval": split("eval", cfg.num_eval, holdout=lambda i: i % 2 == 1),
    }


def make_records(cfg: ShapesConfig, world: World, scenes: dict, stats: tuple) -> tuple[dict[str, list], Counter]:
    """The records of each JSON split, and how many instruct questions each type has."""
    seen = list(world.weights)  # training text never names a held-out pair, not even to deny it
    askers = {  # one per split, each with its own tallies, so that each split is balanced on its own
        name: Asker(random.Random(cfg.stream(f"{name}-text")), cfg.image_size // GRID, vocab, *stats)
        for name, vocab in [("train", seen), ("in_distribution", seen), ("holdout", seen + world.holdout)]
    }
    rng = random.Random(cfg.stream("captions"))
    captions = [chat(path, [(rng.choice(CAPTION_PROMPTS), caption(objs))]) for path, objs in scenes["train"].items()]
    conversations = {path: askers["train"].conversation(objs) for path, objs in scenes["train"].items()}
    eval_set = []
    for i, (path, objs) in enumerate(scenes["eval"].items()):
        split = "holdout" if i % 2 else "in_distribution"
        focus = frozenset({o.pair for o in objs} & set(world.holdout))  # empty for in-distribution images
        eval_set += [eval_record(path, j, q, split) for j, q in enumerate(askers[split].eval_questions(objs, focus))]
    records = {
        "captions": captions,
        "instruct": [chat(path, [(q.text, q.answer) for q in qs]) for path, qs in conversations.items()],
        "unlabeled": [{"id": Path(path).stem, "image": path} for path in scenes["unlabeled"]],
        "eval": eval_set,
    }
    return records, Counter(q.type for qs in conversations.values() for q in qs)


def generate(out_dir: str | Path, cfg: ShapesConfig = ShapesConfig()) -> dict:
    """Write the shapes world to `out_dir` (reused if made with the same config); return world.json's content."""
    out = Path(out_dir)
    if (out / "world.json").exists():
        world = json.loads((out / "world.json").read_text())
        if world.get("config") == cfg.record() and world.get("version") == VERSION:
            print(f"shapes world reused: {out} (same config)")
            return world
    world = make_world(cfg.seed)
    scenes = sample_scenes(cfg, world)
    frequency, cooccurrence = pair_statistics(list(scenes["train"].values()))
    records, instruct_types = make_records(cfg, world, scenes, (frequency, cooccurrence))

    all_scenes = scenes["train"] | scenes["unlabeled"] | scenes["eval"]
    (out / "images").mkdir(parents=True, exist_ok=True)
    for path, objs in tqdm(all_scenes.items(), desc="shapes images", unit="img"):
        render(objs, cfg, path).save(out / path, optimize=False)
    counts = {name: len(data) for name, data in records.items()}
    counts["instruct_questions"] = dict(instruct_types.most_common())
    counts["eval_questions"] = dict(Counter(r["type"] for r in records["eval"]).most_common())
    metadata = {
        "version": VERSION,
        "config": cfg.record(),
        "colours": COLOURS,
        "shapes": list(SHAPES),
        "sizes": {name: round(f * cfg.image_size // GRID) for name, f in SIZES.items()},  # half a box side, in pixels
        "holdout_pairs": world.holdout,
        "companions": world.companions,
        "counts": counts,
        "pair_frequency": dict(frequency.most_common()),
        "pair_cooccurrence": {a: dict(c.most_common()) for a, c in sorted(cooccurrence.items())},
    }
    objects = {path: [asdict(o) for o in objs] for path, objs in all_scenes.items()}
    # world.json goes last: its presence says that the world is complete, and may be reused
    for name, data in (records | {"objects": objects, "world": metadata}).items():
        (out / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")
    return json.loads((out / "world.json").read_text())  # the same dict that a reused world returns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="out/shapes", help="the world's folder")
    for option in fields(ShapesConfig):
        kind = {"choices": STYLES} if option.name == "style" else {"type": int}
        parser.add_argument(f"--{option.name.replace('_', '-')}", default=option.default, **kind)
    args = vars(parser.parse_args())
    out = args.pop("out")
    world = generate(out, ShapesConfig(**args))
    print(f"{out}: held-out pairs {', '.join(world['holdout_pairs'])}; records {world['counts']}")


if __name__ == "__main__":
    main()
