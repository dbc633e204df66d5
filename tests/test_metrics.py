"""Evaluation metrics: the official VQA accuracy and its normalisation, and BLEU / CIDEr-D against pycocoevalcap."""

import math

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

from nanovlm.caption_metrics import bleu, caption_scores, cider_d, tokenize
from nanovlm.vqa_accuracy import CONTRACTIONS, normalize_answer, vqa_accuracy


@pytest.mark.parametrize("raw, normalized", [
    ("Two.", "2"),                 # trailing period deleted, number word -> digit, lowercased
    ("the dog", "dog"),            # articles dropped
    ("A", ""),                     # ... even when nothing else is left
    ("dont", "don't"),             # apostrophe-less contraction restored
    ("whats", "what's"),
    ("Im", "im"),                  # the table's capitalised keys never match: the lookup happens after lowercasing
    ("3.5", "3.5"),                # a period before a digit is kept
    ("yes,", "yes"),               # a mark touching no space becomes a space, then split away
    ("Yes!", "yes"),
    ("red, white", "red white"),   # a mark next to a space is deleted
    ("t-shirt", "t shirt"),        # ... otherwise replaced by a space
    ("1,000", "1000"),             # a digit,digit comma makes every mark be deleted ...
    ("x-ray, 1,2", "xray 12"),     # ... anywhere in the text
    ("10:30", "10:30"),            # ":" is not among the stripped marks
    ("None", "0"),
    ("eleven", "eleven"),          # number words stop at ten
    ("  \tTwo\ndogs ", "2 dogs"),  # tabs and newlines are spaces
    ("." * 40, "." * 8),           # the evaluator deletes at most 32 periods
])
def test_normalize_answer_follows_the_official_evaluator(raw: str, normalized: str) -> None:
    assert normalize_answer(raw) == normalized


def test_contractions_table_is_the_official_one() -> None:
    assert len(CONTRACTIONS) == 120
    assert CONTRACTIONS["wont"] == "won't" and CONTRACTIONS["twas"] == "'twas"
    assert CONTRACTIONS["yall'd've"] == "y'all'd've" and CONTRACTIONS["Im"] == "I'm"
    assert CONTRACTIONS["somebody'd"] == "somebodyd"  # the official table maps this one backwards


@pytest.mark.parametrize("matching, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (7, 1.0), (10, 1.0)])
def test_vqa_accuracy_averages_over_leave_one_out_subsets(matching: int, expected: float) -> None:
    others = ["cat", "puppy", "wolf", "fox", "cat", "cat", "puppy", "fox", "wolf", "cat"]
    answers = ["dog"] * matching + others[matching:]
    # Leaving out one of the `matching` humans leaves matching - 1 votes, leaving out anyone else leaves `matching`.
    leave_one_out = [min(1.0, (matching - (i < matching)) / 3) for i in range(10)]
    assert vqa_accuracy("dog", answers) == pytest.approx(sum(leave_one_out) / 10)
    assert vqa_accuracy("dog", answers) == pytest.approx(expected)


def test_normalisation_makes_a_prediction_match() -> None:
    answers = ["2", "2", "2", "3", "3", "4", "2 dogs", "two", "3", "4"]
    assert vqa_accuracy("2", answers) == pytest.approx(0.9)
    assert vqa_accuracy("Two.", answers) == pytest.approx(0.9)
    assert vqa_accuracy("The 2 dogs!", answers) == pytest.approx(0.3)
    assert vqa_accuracy("two", answers) == pytest.approx(0.9)  # the human "two" is not normalised, the prediction is


def test_human_answers_get_the_official_treatment() -> None:
    # Not all identical: punctuation processing only, so "dog." counts as "dog" but "dog!" becomes "dog ".
    assert vqa_accuracy("dog", ["dog."] * 3 + ["cat"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("dog", ["dog!"] * 3 + ["cat"] * 7) == 0.0
    # All identical: used as given, and never lowercased.
    assert vqa_accuracy("dog", ["dog."] * 10) == 0.0
    assert vqa_accuracy("dog", ["dog"] * 10) == 1.0
    assert vqa_accuracy("Dog", ["Dog"] * 5 + ["cat"] * 5) == 0.0


def test_vqa_accuracy_rejects_no_answers() -> None:
    with pytest.raises(ValueError, match="empty answers"):
        vqa_accuracy("yes", [])


@pytest.mark.parametrize("raw, tokens", [
    ("A man's dog, running.", "a man 's dog running"),
    ("Two people don't like the rain!", "two people do n't like the rain"),
    ("I can't see it", "i ca n't see it"),
    ("The dogs' toys", "the dogs toys"),
    ('"Hello," she said...', "hello she said"),
    ("A t-shirt -- and jeans; a hat: red", "a t-shirt and jeans a hat red"),
    ("It costs $1,000 at 3.5% at 10:30", "it costs $ 1,000 at 3.5 % at 10:30"),
    ("In the U.S. at 5 o'clock", "in the u.s. at 5 o'clock"),
    ("A cat (black) sits", "a cat -lrb- black -rrb- sits"),
    ("A dog\nrunning  fast?", "a dog running fast"),
])
def test_tokenize_approximates_the_ptb_tokenizer(raw: str, tokens: str) -> None:
    assert tokenize(raw) == tokens


# COCO-like images: (hypothesis, references). Hypotheses shorter and longer than their references, with repeated
# words, an empty-ish one-word caption, and one that shares nothing with its references.
CAPTIONS = {
    "kitchen": ("A woman cooking in a kitchen.", [
        "A woman is standing in a kitchen preparing food.",
        "A lady cooks a meal on the stove in her kitchen.",
        "A woman in an apron stirs a pot on a stove.",
        "Someone preparing dinner in a small kitchen.",
    ]),
    "surf": ("A man riding a wave on top of a surfboard.", [
        "A man riding a wave on top of a surfboard.",
        "A surfer rides a large wave in the ocean.",
        "A person on a surfboard catching a wave.",
        "A surfer in a black wetsuit riding a wave.",
        "Man surfing on a big blue wave.",
    ]),
    "giraffe": ("Giraffes.", [
        "Two giraffes standing next to each other near trees.",
        "A pair of giraffes in a grassy enclosure.",
        "Two giraffes eating leaves from a tall tree.",
    ]),
    "pizza": ("A pizza pizza pizza pizza on a table table.", [
        "A large pizza sitting on top of a wooden table.",
        "A pepperoni pizza on a table with plates.",
        "A pizza with cheese and tomatoes on a table.",
        "Freshly baked pizza served on a table.",
    ]),
    "bus": ("A red double decker bus driving down a busy city street next to a row of tall buildings on a cloudy "
            "day with people walking on the sidewalk.", [
        "A red double decker bus on a city street.",
        "A double decker bus driving down the street.",
        "A red bus is parked beside the road.",
        "A tour bus drives past tall buildings.",
    ]),
    "skate": ("A young man doing a trick on a skateboard.", [
        "A skateboarder performs a trick on a ramp.",
        "A young man jumping in the air on his skateboard.",
        "A boy riding a skateboard down a rail.",
        "A skater doing a kickflip in a skate park.",
    ]),
    "cat": ("A cat sleeping on a laptop keyboard.", [
        "A cat laying on top of a laptop computer.",
        "A gray cat sleeps on an open laptop.",
        "A kitten is resting on a keyboard.",
        "A cat curled up on a computer keyboard.",
        "The cat is napping on the laptop.",
    ]),
    "unrelated": ("Purple elephants juggle violins underwater.", [
        "A plate of food with broccoli and rice.",
        "A meal of chicken, rice and vegetables on a plate.",
        "Broccoli and rice served on a white dish.",
    ]),
    "train": ("A train on the railroad tracks.", [
        "A long train traveling down train tracks.",
        "A passenger train pulling into a station.",
        "A yellow and blue train on the railroad tracks.",
        "A train is coming down the tracks near a platform.",
    ]),
    "bathroom": ("A bathroom with a toilet and a sink and a mirror and a shower and a towel.", [
        "A white bathroom with a toilet and a sink.",
        "A small bathroom with a mirror over the sink.",
        "A clean bathroom has a toilet, sink and shower.",
    ]),
    "tennis": ("A woman swinging a tennis racket on a court.", [
        "A woman swinging a tennis racket at a ball.",
        "A tennis player hits the ball on a clay court.",
        "A female tennis player in a white dress.",
        "A woman playing tennis on a court.",
    ]),
    "dogs": ("Two dogs playing with a frisbee in the park.", [
        "Two dogs chasing a frisbee in a grassy park.",
        "A brown dog and a black dog play in the grass.",
        "Dogs running after a red frisbee.",
        "Two puppies play together on the lawn.",
    ]),
    "clock": ("A clock tower.", [
        "A tall clock tower in the middle of a city.",
        "A large clock on the side of a brick building.",
        "The clock tower shows the time as noon.",
        "An old clock tower against a blue sky.",
    ]),
    "beach": ("People on the beach with umbrellas umbrellas umbrellas.", [
        "Many people on a sandy beach with umbrellas.",
        "A crowded beach with colorful umbrellas.",
        "Beach goers relaxing under umbrellas by the ocean.",
        "A beach full of people and beach umbrellas.",
        "People sunbathing on the beach on a sunny day.",
    ]),
    "horse": ("A person riding a horse.", [
        "A woman riding a brown horse in a field.",
        "A jockey on a horse jumping over a fence.",
        "A person on horseback on a dirt road.",
    ]),
    "plane": ("A large passenger jet flying through a blue sky.", [
        "A large passenger jet flying through a blue sky.",
        "An airplane flying high in the clear sky.",
        "A white jet plane in the air.",
        "A commercial airliner in flight against a blue sky.",
    ]),
    "fridge": ("An open refrigerator full of food and drinks.", [
        "A refrigerator filled with lots of food.",
        "An open fridge stocked with drinks and vegetables.",
        "The inside of a refrigerator with food on the shelves.",
        "A fridge full of bottles and containers.",
    ]),
    "elephant": ("An elephant.", [
        "An elephant walking through the tall grass.",
        "A large elephant standing in a field.",
        "A baby elephant next to its mother.",
    ]),
    "umbrella": ("A man holding an umbrella in the rain on a city street at night.", [
        "A man holding an umbrella in the rain.",
        "A person walks down a wet street with an umbrella.",
        "Someone with a black umbrella on a rainy night.",
        "A pedestrian holding an umbrella crosses the street.",
    ]),
    "baseball": ("A baseball player swinging a bat at a ball.", [
        "A baseball player swinging a bat at a pitch.",
        "A batter swings at the ball during a game.",
        "A catcher and umpire behind a batter at home plate.",
        "A man in a baseball uniform swings his bat.",
    ]),
    "sandwich": ("Sandwich sandwich sandwich.", [
        "A sandwich cut in half on a plate.",
        "A turkey sandwich with lettuce and tomato.",
        "Half a sandwich next to some chips.",
    ]),
    "boats": ("Boats in a harbor.", [
        "Several boats docked in a harbor.",
        "Small boats floating in the water near a pier.",
        "A marina full of sail boats.",
        "Boats tied up at a dock on a sunny day.",
        "Many boats in the harbor at sunset.",
    ]),
}


def tokenized(keys: list[str]) -> tuple[dict[str, str], dict[str, list[str]]]:
    hypotheses = {key: tokenize(CAPTIONS[key][0]) for key in keys}
    references = {key: [tokenize(caption) for caption in CAPTIONS[key][1]] for key in keys}
    return hypotheses, references


def reference_scores(hypotheses: dict[str, str], references: dict[str, list[str]]) -> tuple[list[float], float]:
    """pycocoevalcap's BLEU-1..4 and CIDEr-D on the same tokenized captions (its format: a list per image)."""
    hypothesis_lists = {key: [caption] for key, caption in hypotheses.items()}
    bleu_scores, _ = Bleu(4).compute_score(references, hypothesis_lists, verbose=0)
    cider_score, _ = Cider().compute_score(references, hypothesis_lists)
    return bleu_scores, float(cider_score)


# The whole corpus; the short hypotheses alone (their total length is below the references', so BLEU's brevity
# penalty applies); and two images (idf from a tiny corpus).
@pytest.mark.parametrize("keys", [
    list(CAPTIONS),
    ["giraffe", "clock", "elephant", "train", "horse", "boats", "sandwich"],
    ["surf", "unrelated"],
])
def test_bleu_and_cider_d_equal_pycocoevalcap(keys: list[str]) -> None:
    assert len(CAPTIONS) >= 20
    hypotheses, references = tokenized(keys)
    expected_bleu, expected_cider = reference_scores(hypotheses, references)
    assert bleu(hypotheses, references) == pytest.approx(expected_bleu, abs=1e-6)
    assert cider_d(hypotheses, references) == pytest.approx(expected_cider, abs=1e-6)
    assert expected_cider > 0.5 and min(expected_bleu) > 0.1  # the captions match at every n-gram order


def test_bleu_brevity_penalty() -> None:
    hypotheses, references = tokenized(["giraffe", "clock", "elephant"])
    hypothesis_length = sum(len(caption.split()) for caption in hypotheses.values())
    closest = sum(min((abs(len(r.split()) - len(hypotheses[k].split())), len(r.split())) for r in references[k])[1]
                  for k in hypotheses)
    assert hypothesis_length < closest
    # Every hypothesis word appears in its references, so BLEU-1 is the brevity penalty alone.
    assert bleu(hypotheses, references, n=1)[0] == pytest.approx(math.exp(1 - closest / hypothesis_length), abs=1e-6)


def test_bleu_closest_reference_length_prefers_the_shorter_on_a_tie() -> None:
    hypotheses, references = {"dog": "a dog"}, {"dog": ["a dog runs", "dog"]}
    # Lengths 3 and 1 are both 1 away from 2: the evaluator takes 1, so the hypothesis is not short and BP = 1.
    assert bleu(hypotheses, references, n=1) == pytest.approx([1.0], abs=1e-6)
    expected, _ = Bleu(4).compute_score(references, {"dog": ["a dog"]}, verbose=0)
    assert bleu(hypotheses, references) == pytest.approx(expected, abs=1e-6)


def test_caption_scores_tokenizes_and_checks_ids() -> None:
    raw_hypotheses = {key: hypothesis for key, (hypothesis, _) in CAPTIONS.items()}
    raw_references = {key: references for key, (_, references) in CAPTIONS.items()}
    hypotheses, references = tokenized(list(CAPTIONS))
    scores = caption_scores(raw_hypotheses, raw_references)
    assert scores == {"BLEU-4": bleu(hypotheses, references)[3], "CIDEr-D": cider_d(hypotheses, references)}
    with pytest.raises(ValueError, match="have no references"):
        caption_scores(raw_hypotheses | {"extra": "A dog."}, raw_references)
    with pytest.raises(ValueError, match="have no hypothesis"):
        cider_d({"cat": "a cat"}, {"cat": ["a cat"], "dog": ["a dog"]})
    with pytest.raises(ValueError, match="non-empty list"):
        bleu({"cat": "a cat"}, {"cat": "a cat"})
