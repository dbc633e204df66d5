"""ICCC: image-conditioned caption correction (Li, Wu, He, "Learning by Correction: Efficient Tuning Task for
Zero-Shot Generative Vision-Language Reasoning", CVPR 2024).

Image-caption pairs alone, without labels, teach a VLM to align fine-grained concepts of text and image: a
caption is corrupted (one concept replaced by another of its type, or two concepts of one type swapped) and
the model, looking at the image, says what is wrong. Per pair (image x, caption c), with probability aug_ratio:

    c~ = c with concepts a, b trading places    y = "b" and "a" are swapped.    (a swap: with probability
                                                                                 swap_ratio, if c allows one)
    c~ = c with concept a replaced by a'        y = "a'" should be "a".         (a replace: otherwise)
    input: x, then `check the caption "c~",`    L = -sum_t log p(y_t | y_<t, x, c~)

and otherwise an ordinary captioning sample: input x alone (BLIP-2 OPT's empty caption prompt), y = c, exactly
as stage 1 saw it. Rendered by the `plain_prompt` template: for a correction the image, a newline, the prompt
and a newline, then y and a newline; for a captioning sample the image, then y and a newline (`plain`'s
rendering). Only y and its newline carry loss (the official BLIP-2 OPT path feeds only the prompt to the LM, so it
learns nothing but a newline; its InstructBLIP path is right). Only the connector trains: the projector, and the
prototype extractor when the model has one.

Recipe (official YAMLs): aug 0.3 / swap 0.15 (BLIP-2 OPT-2.7B), 0.3 / 0.1 (OPT-6.7B), 0.1 / 0.1
(InstructBLIP Vicuna-7B); lr 5e-6 (OPT-6.7B), 1e-6 (InstructBLIP); weight decay 0.05; 500 warmup steps then
cosine; COCO + Visual Genome captions. Captions are lowercased, ":" becomes a space, and they are cut to 50
words (here: in correction samples; see below). The replace target has four phrasings ("should be", "could
be", "is", "actually is"), the swap target four ("are swapped", "need to be switched", "should exchange their
positions", "need to be swapped"), drawn uniformly.

Concepts (five types: ent, pred, noun, verb, attr, as in the official code) are found by nanovlm/concepts.py,
with word lists and a few rules where the paper uses spaCy's dependency parser.

Departures from the official code, and why:
- A replacement always differs from the original (the official draw can put back the same concept, leaving a
  correct caption with a "correction" as target). It is drawn among the type's frequent concepts of the same
  form (colour for colour, size for size, plural noun for plural noun, -ing verb for -ing verb), when there
  are any, else among all of the type: a replacement that breaks the grammar ("a large two circle") can be
  spotted without the image, which teaches nothing about images. For the same reason swapped nouns, verbs and
  attributes share a form too, and an article before an edited word follows it ("an orange cat" -> "a black
  cat").
- A swap is made only when it changes what the caption says. The official code refuses every swap in a caption
  that holds a symmetric word (next to, near, beside, adjacent, across, with, and), matched as substrings, so
  "standing" or "hand" block swaps, and so does any list: "a red circle and a blue square" can never become
  "a blue circle and a red square", the very binding error the swap exists to teach. Here a swap is judged on
  a canonical form of the caption in which order means nothing where English gives it no meaning: the items of
  a list (joined by "and", "or" or punctuation) are an unordered set, two noun phrases joined by a symmetric
  relation (whole words: next to, near, beside, adjacent, across, with, close to) an unordered pair, and the
  modifiers of one noun an unordered set. A swap whose caption has the same canonical form is refused, so
  "a cat and a dog" -> "a dog and a cat" and "a cat next to a dog" -> "a dog next to a cat" are refused, and
  "a red circle and a blue square" -> "a blue circle and a red square" or "a man riding a horse" -> "a horse
  riding a man" are made. The rule errs towards refusing: "a man riding a horse with a dog" cannot become "a
  man riding a dog with a horse".
- A captioning sample is stage 1's sample unchanged: the caption as the record has it (not lowercased, not
  cut), right after the image. The official code passes every caption through BLIP's text processor, which
  lowercases, because BLIP-2's pretraining captions went through the same processor: there too the captioning
  samples continue pretraining as it ran. LLaVA's stage 1 keeps the captions' case, and a model whose tokenizer
  and LLM learnt cased text pays for the difference: the tiny stage-1 model's caption loss is 0.18 on its own
  samples, 1.73 on the same captions lowercased and 0.68 with a newline after the image
  (results/iccc_seeds_lowercased_captions.json). With captioning samples as stage 1's, `--aug_ratio 0`
  continues stage 1 itself, and ICCC differs from that control only by its corrections.
- The corruption is drawn as records load, from a generator seeded by (seed, record, epoch): a run is
  reproducible, and each epoch corrupts each caption afresh.
"""

import random
import re
from collections import Counter
from dataclasses import dataclass
from itertools import combinations

from .concepts import TYPES, Concepts, extract, form, meaning
from .config import ranged
from .data import BadRecord, LLaVADataset
from .tokenizer import IMAGE_PLACEHOLDER

PROMPT = 'check the caption "{}",'
REPLACE_PHRASES = ('"{}" should be "{}".', '"{}" could be "{}".', '"{}" is "{}".', '"{}" actually is "{}".')
SWAP_PHRASES = ('"{}" and "{}" are swapped.', '"{}" and "{}" need to be switched.',
                '"{}" and "{}" should exchange their positions.', '"{}" and "{}" need to be swapped.')


@dataclass
class ICCC:
    """ICCC's settings (the official YAMLs; RATES names them per backbone)."""
    aug_ratio: float = ranged(0.3, "[0, 1]")  # the share of samples that become correction samples
    swap_ratio: float = ranged(0.15, "[0, 1]")  # of those, the share that try a swap first
    max_words: int = ranged(50, ">= 1")  # captions are cut to this many words


RATES = {  # (aug_ratio, swap_ratio) of the official training configs
    "blip2-opt-2.7b": (0.3, 0.15),
    "blip2-opt-6.7b": (0.3, 0.1),
    "instructblip-vicuna-7b": (0.1, 0.1),
}

# --- the concept bank ---------------------------------------------------------------------------------------


@dataclass
class ConceptBank:
    """How often each concept occurs in a caption set, and the frequent ones of each type (those whose count is
    above captions // distinct concepts of the type, as the official code keeps them), grouped by form."""
    captions: int
    counts: dict[str, Counter]
    frequent: dict[str, list[str]]
    by_form: dict[str, dict[str, list[str]]]

    @classmethod
    def build(cls, captions, max_words: int = 50) -> "ConceptBank":
        counts = {kind: Counter() for kind in TYPES}
        n = 0
        for caption in captions:
            concepts = extract(normalize(caption, max_words))
            for kind in TYPES:
                counts[kind].update(concepts.texts(kind))
            n += 1
        frequent, by_form = {}, {}
        for kind, counter in counts.items():
            threshold = n // len(counter) if counter else 0
            frequent[kind] = sorted((c for c, m in counter.items() if m > threshold), key=lambda c: (-counter[c], c))
            by_form[kind] = {}
            for concept in frequent[kind]:
                by_form[kind].setdefault(form(kind, concept), []).append(concept)
        return cls(n, counts, frequent, by_form)

    def pool(self, kind: str, concept: str) -> list[str]:
        """The frequent concepts a replacement of `concept` is drawn from; empty when none differs from it."""
        for pool in (self.by_form[kind].get(form(kind, concept), []), self.frequent[kind]):
            if len(pool) > 1 or (pool and pool[0] != concept):
                return pool
        return []

    def summary(self) -> str:
        return ", ".join(f"{kind} {len(self.frequent[kind])} of {len(self.counts[kind])}" for kind in TYPES)


# --- corruptions --------------------------------------------------------------------------------------------


def normalize(caption: str, max_words: int = 50) -> str:
    """ICCC's caption text: lowercased, ":" as a space, whitespace squeezed, at most max_words words."""
    if not isinstance(caption, str):
        raise TypeError(f"a caption must be a string, got {type(caption).__name__}")
    return " ".join(caption.lower().replace(":", " ").split()[:max_words])


def apply_edits(text: str, edits: list[tuple[int, int, str]]) -> str:
    """`text` with each (start, end) span replaced; an "a" / "an" right before an edit follows the new word."""
    pieces, last = [], 0
    for start, end, new in sorted(edits):
        before = text[last:start]
        if re.search(r"(^|\s)an? $", before):
            before = re.sub(r"an? $", "an " if new[:1] in "aeiou" and new else "a ", before)
        pieces += [before, new]
        last = end
    return "".join(pieces) + text[last:]


def replace(concepts: Concepts, bank: ConceptBank, rng: random.Random, types=TYPES) -> tuple[str, str, str, str] | None:
    """One concept occurrence -> a different frequent concept of its type: (caption, type, wrong, right), or None
    when no concept can be replaced. The type is drawn uniformly among those that can be, then the occurrence."""
    text = concepts.text
    options = {kind: [(s, e) for s, e in concepts.spans[kind] if bank.pool(kind, text[s:e])] for kind in types}
    kinds = [kind for kind in types if options[kind]]
    if not kinds:
        return None
    kind = rng.choice(kinds)
    start, end = rng.choice(options[kind])
    right, pool = text[start:end], bank.pool(kind, text[start:end])
    wrong = rng.choice(pool)
    while wrong == right:
        wrong = rng.choice(pool)
    return apply_edits(text, [(start, end, wrong)]), kind, wrong, right


def swap(concepts: Concepts, rng: random.Random, types=TYPES) -> tuple[str, str, str, str] | None:
    """Two different concepts of one type (nouns, verbs and attributes: of one form too) trade places at every
    occurrence: (caption, type, first, second) with first and second in their new reading order, or None when no
    swap changes the caption's meaning. The type is drawn uniformly among those with a pair, then the pair."""
    text, original = concepts.text, None
    kinds = list(types)
    rng.shuffle(kinds)
    for kind in kinds:
        distinct = list(dict.fromkeys(concepts.texts(kind)))
        pairs = [(a, b) for a, b in combinations(distinct, 2)
                 if kind in ("ent", "pred") or form(kind, a) == form(kind, b)]
        rng.shuffle(pairs)
        for a, b in pairs:
            edits = [(s, e, b if text[s:e] == a else a) for s, e in concepts.spans[kind] if text[s:e] in (a, b)]
            corrupted = apply_edits(text, edits)
            original = original or meaning(concepts)
            if meaning(extract(corrupted)) != original:
                return corrupted, kind, b, a
    return None


@dataclass(frozen=True)
class Sample:
    kind: str  # "caption" (untouched), "replace" or "swap"
    concept: str  # the type of the corrupted concept; "" for a caption
    caption: str  # the normalised caption, corrupted unless kind is "caption"
    target: str  # what the model learns to say: the correction, or the caption as the record has it


def make_sample(caption: str, bank: ConceptBank, settings: ICCC, rng: random.Random) -> Sample:
    """ICCC's draw for one caption: a correction sample with probability aug_ratio (a swap first with
    probability swap_ratio, when one changes the meaning; else a replace), otherwise plain captioning. A caption
    without a usable concept (empty, stop words only) stays a captioning sample, whose target is the caption
    as given (stage 1's)."""
    text = normalize(caption, settings.max_words)
    if text and rng.random() < settings.aug_ratio:
        concepts = extract(text)
        swapped = swap(concepts, rng) if rng.random() < settings.swap_ratio else None
        if swapped:
            corrupted, kind, first, second = swapped
            return Sample("swap", kind, corrupted, rng.choice(SWAP_PHRASES).format(first, second))
        if replaced := replace(concepts, bank, rng):
            corrupted, kind, wrong, right = replaced
            return Sample("replace", kind, corrupted, rng.choice(REPLACE_PHRASES).format(wrong, right))
    return Sample("caption", "", text, caption)


def to_conversation(sample: Sample) -> list[dict]:
    """The LLaVA turns of a sample: the image alone before a caption, the image and the prompt before a
    correction (rendered by the `plain_prompt` template: image, caption; or image, newline, prompt, newline,
    target)."""
    human = IMAGE_PLACEHOLDER if sample.kind == "caption" else IMAGE_PLACEHOLDER + "\n" + PROMPT.format(sample.caption)
    return [{"from": "human", "value": human}, {"from": "gpt", "value": sample.target}]


def sample_rng(seed: int, index: int, epoch: int) -> random.Random:
    return random.Random(f"iccc-{seed}-{index}-{epoch}")


def negatives(caption: str, bank: ConceptBank, rng: random.Random, max_words: int = 50) -> dict[str, str]:
    """Corrupted versions of a caption for caption ranking: at most one per kind, "replace-TYPE" for each type
    that has a replaceable concept and "swap-TYPE" for each type with a swap that changes the meaning."""
    concepts = extract(normalize(caption, max_words))
    out = {}
    for kind in TYPES:
        if replaced := replace(concepts, bank, rng, (kind,)):
            out[f"replace-{kind}"] = replaced[0]
    for kind in TYPES:
        if swapped := swap(concepts, rng, (kind,)):
            out[f"swap-{kind}"] = swapped[0]
    return out


# --- training data ------------------------------------------------------------------------------------------


class CaptionCorrectionDataset(LLaVADataset):
    """LLaVA caption records (an image, one human turn, the caption as answer) as ICCC samples, drawn per record
    and epoch as they load; the concept bank is built once, over every caption of the data."""

    def __init__(self, *args, settings: ICCC | None = None, **kwargs):
        self.settings = settings or ICCC()
        super().__init__(*args, **kwargs)
        self.bank = ConceptBank.build((record["conversations"][1]["value"] for record, _, _ in self.records),
                                      self.settings.max_words)

    def check(self, record, image_folder) -> None:
        super().check(record, image_folder)
        if "image" not in record or len(record["conversations"]) != 2:
            raise BadRecord("ICCC needs caption records: an image, one human turn and the caption as its answer")
        if not normalize(record["conversations"][1]["value"], self.settings.max_words):
            raise BadRecord("the caption is empty once normalised (lowercased, ':' removed)")

    def conversation(self, index: int) -> list[dict]:
        caption = self.records[index][0]["conversations"][1]["value"]
        return to_conversation(make_sample(caption, self.bank, self.settings, sample_rng(self.seed, index, self.epoch)))
