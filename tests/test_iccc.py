"""ICCC: concept extraction against hand-parsed captions, the corruptions and their targets, the training data,
train_iccc.py, and caption ranking."""

import json
import os
import random
import re
import subprocess
import sys

import pytest
import torch

import eval as eval_script
from data.caption_ranking import main as build_ranking
from data.caption_ranking import shapes_benchmark
from nanovlm.benchmarks import load
from nanovlm.caption_ranking import accuracy, caption_logprobs
from nanovlm.concepts import TYPES, extract, form
from nanovlm.data import BadRecord, DataSource, LLaVADataset
from nanovlm.iccc import (
    ICCC,
    PROMPT,
    REPLACE_PHRASES,
    SWAP_PHRASES,
    CaptionCorrectionDataset,
    ConceptBank,
    make_sample,
    normalize,
    replace,
    sample_rng,
    swap,
    to_conversation,
)
from nanovlm.image import ImageProcessor, load_image
from nanovlm.templates import IGNORE_INDEX, get_template, render, tokenize_conversation
from nanovlm.tokenizer import Tokenizer
from nanovlm.vlm import VLM, load_pretrained
from test_train import ROOT, launch

# caption | ent | pred | noun | verb | attr, each list split at "|" (nouns and verbs at spaces), parsed by hand
PARSED = [
    ("A man riding a horse on a beach.", "a man|a horse|a beach", "riding|on", "man horse beach", "riding", ""),
    ("Two dogs playing with a frisbee in the park.", "two dogs|a frisbee|the park", "playing with|in",
     "dogs frisbee park", "playing", "two"),
    ("There is a cat sitting on top of a red car.", "a cat|a red car", "sitting on top of", "cat car", "sitting",
     "red"),
    ("A woman holding an umbrella next to a light blue bus.", "a woman|an umbrella|a light blue bus",
     "holding|next to", "woman umbrella bus", "holding", "light|blue"),
    ("A man in a black and white shirt is standing in front of a building.",
     "a man|a black and white shirt|a building", "in|is standing in front of", "man shirt building", "standing",
     "black and white"),
    ("A group of people standing around a dining table.", "a group|people|a dining table", "standing around",
     "group people table", "standing", "dining"),
    ("A red circle to the left of a blue square.", "a red circle|a blue square", "to the left of", "circle square",
     "", "red|blue"),
    ("A cat is sleeping on a couch.", "a cat|a couch", "is sleeping on", "cat couch", "sleeping", ""),
    ("A traffic light at an intersection.", "a traffic light|an intersection", "at", "light intersection", "",
     "traffic"),
    ("The man's hand holds a glass of wine.", "the man's hand|a glass|wine", "holds", "hand glass wine", "holds", ""),
    ("A large red circle, a small blue square and a small green cross.",
     "a large red circle|a small blue square|a small green cross", "", "circle square cross", "",
     "large|red|small|blue|small|green"),
    ("Three zebras grazing in a grassy field.", "three zebras|a grassy field", "grazing in", "zebras field",
     "grazing", "three|grassy"),
    ("A plate of food with broccoli and carrots.", "a plate|food|broccoli|carrots", "with",
     "plate food broccoli carrots", "", ""),
    ("A young boy swinging a baseball bat.", "a young boy|a baseball bat", "swinging", "boy bat", "swinging",
     "young|baseball"),
    ("An elephant standing next to a wooden fence.", "an elephant|a wooden fence", "standing next to",
     "elephant fence", "standing", "wooden"),
    ("A kitchen with white cabinets and a stainless steel refrigerator.",
     "a kitchen|white cabinets|a stainless steel refrigerator", "with", "kitchen cabinets refrigerator", "",
     "white|stainless|steel"),
    ("Two people are flying kites on a sunny day.", "two people|kites|a sunny day", "are flying|on",
     "people kites day", "flying", "two|sunny"),
    ("A pizza topped with cheese and pepperoni on a wooden table.", "a pizza|cheese|pepperoni|a wooden table",
     "topped with|on", "pizza cheese pepperoni table", "topped", "wooden"),
    ("A bus parked on the side of the road.", "a bus|the road", "parked on the side of", "bus road", "parked", ""),
    ("Several cars are stopped at a red light.", "several cars|a red light", "are stopped at", "cars light",
     "stopped", "several|red"),
    ("A little girl eating a slice of chocolate cake.", "a little girl|a slice|chocolate cake", "eating",
     "girl slice cake", "eating", "little|chocolate"),
    ("A giraffe and a zebra stand near a tree.", "a giraffe|a zebra|a tree", "stand near", "giraffe zebra tree",
     "stand", ""),
    ("A man wearing a hat sits on a bench.", "a man|a hat|a bench", "wearing|sits on", "man hat bench",
     "wearing sits", ""),
    ("The sky is blue above the snowy mountains.", "the sky|the snowy mountains", "is blue above", "sky mountains",
     "", "snowy"),
    ("Four small birds perched on a power line.", "four small birds|a power line", "perched on", "birds line",
     "perched", "four|small|power"),
    ("A brown teddy bear next to a pair of shoes.", "a brown teddy bear|a pair|shoes", "next to", "bear pair shoes",
     "", "brown|teddy"),
    ("A laptop computer sitting on top of a desk.", "a laptop computer|a desk", "sitting on top of", "computer desk",
     "sitting", "laptop"),
    ("A person riding a surfboard on a large wave.", "a person|a surfboard|a large wave", "riding|on",
     "person surfboard wave", "riding", "large"),
    ("Two men playing frisbee in a park while a dog watches.", "two men|frisbee|a park|a dog", "playing|in|while",
     "men frisbee park dog", "playing watches", "two"),
    ("A yellow fire hydrant on a city sidewalk.", "a yellow fire hydrant|a city sidewalk", "on", "hydrant sidewalk",
     "", "yellow|fire|city"),
    ("A blue square above a green triangle and a red cross below a white circle.",
     "a blue square|a green triangle|a red cross|a white circle", "above|below", "square triangle cross circle", "",
     "blue|green|red|white"),
    ("Two small white dogs lying on a bed.", "two small white dogs|a bed", "lying on", "dogs bed", "lying",
     "two|small|white"),
    ("A skier skiing down a snowy hill.", "a skier|a snowy hill", "skiing down", "skier hill", "skiing", "snowy"),
    ("The cat's eyes are green.", "the cat's eyes", "", "eyes", "", ""),
    ("Three people ski down a mountain slope.", "three people|a mountain slope", "ski down", "people slope", "ski",
     "three|mountain"),
    ("A clock tower with a flag on the top.", "a clock tower|a flag|the top", "with|on", "tower flag top", "",
     "clock"),
    ("A vase filled with pink and yellow flowers.", "a vase|pink and yellow flowers", "filled with", "vase flowers",
     "filled", "pink|yellow"),
    ("A bowl with 5 oranges and 2 bananas.", "a bowl|5 oranges|2 bananas", "with", "bowl oranges bananas", "",
     "5|2"),
    ("A small kitten is drinking milk from a bowl.", "a small kitten|milk|a bowl", "is drinking|from",
     "kitten milk bowl", "drinking", "small"),
    ("A train traveling down the tracks near a station.", "a train|the tracks|a station", "traveling down|near",
     "train tracks station", "traveling", ""),
    ("A man and a woman sitting at a table with wine glasses.", "a man|a woman|a table|wine glasses",
     "sitting at|with", "man woman table glasses", "sitting", "wine"),
    ("An old man with a long white beard.", "an old man|a long white beard", "with", "man beard", "",
     "old|long|white"),
    ("A stop sign on the corner of a street.", "a stop sign|the corner|a street", "on", "sign corner street", "",
     "stop"),
    ("Some sheep are grazing on green grass.", "some sheep|green grass", "are grazing on", "sheep grass", "grazing",
     "green"),
    ("A cup of coffee and a donut on a napkin.", "a cup|coffee|a donut|a napkin", "on", "cup coffee donut napkin",
     "", ""),
    ("There are two horses pulling a wooden cart.", "two horses|a wooden cart", "pulling", "horses cart", "pulling",
     "two|wooden"),
    ("A white cross to the right of an orange triangle.", "a white cross|an orange triangle", "to the right of",
     "cross triangle", "", "white|orange"),
    ("A baby elephant walks beside its mother.", "a baby elephant|its mother", "walks beside", "elephant mother",
     "walks", "baby"),
    ("A bathroom with a toilet, a sink and a mirror.", "a bathroom|a toilet|a sink|a mirror", "with",
     "bathroom toilet sink mirror", "", ""),
    ("A dog catches a frisbee in mid air.", "a dog|a frisbee|mid air", "catches|in", "dog frisbee air", "catches",
     "mid"),
]


def split(text: str, separator: str = "|") -> list[str]:
    return [part.strip() for part in text.split(separator) if part.strip()]


@pytest.mark.parametrize("caption, ent, pred, noun, verb, attr", PARSED, ids=[p[0][:40] for p in PARSED])
def test_extraction_matches_hand_parsed_captions(caption, ent, pred, noun, verb, attr):
    concepts = extract(normalize(caption))
    expected = {"ent": split(ent), "pred": split(pred), "noun": split(noun, " "), "verb": split(verb, " "),
                "attr": split(attr)}
    assert {kind: concepts.texts(kind) for kind in TYPES} == expected
    assert len(PARSED) >= 40


def make_bank() -> ConceptBank:
    """A bank over the hand-parsed captions and shapes-like ones, so that every type has frequent concepts."""
    rng = random.Random(0)
    shapes = [f"a {rng.choice(['large', 'small'])} {rng.choice(['red', 'blue', 'green', 'white'])} "
              f"{rng.choice(['circle', 'square', 'cross'])} {rng.choice(['next to', 'above', 'below', 'on'])} a "
              f"{rng.choice(['large', 'small'])} {rng.choice(['yellow', 'orange'])} triangle" for _ in range(300)]
    scenes = [f"{rng.choice(['a dog', 'a cat', 'two men'])} {rng.choice(['sitting', 'standing', 'lying', 'eating'])} "
              f"on a {rng.choice(['bench', 'couch', 'bed'])}" for _ in range(300)]
    return ConceptBank.build([p[0] for p in PARSED] * 3 + shapes + scenes)


def test_bank_keeps_concepts_above_the_mean_count():
    bank = ConceptBank.build(["a red circle"] * 5 + ["a blue circle"] * 5 + ["a green circle"])
    assert bank.captions == 11
    assert bank.counts["attr"] == {"red": 5, "blue": 5, "green": 1}
    assert bank.frequent["attr"] == ["blue", "red"]  # count > 11 // 3
    assert bank.frequent["noun"] == []  # "circle": 11, not above 11 // 1
    assert bank.by_form["attr"] == {"colour": ["blue", "red"]}


def test_a_replacement_always_differs_and_keeps_its_type_and_form():
    bank = make_bank()
    seen = set()
    for i, (caption, *_) in enumerate(PARSED * 10):
        concepts = extract(normalize(caption))
        replaced = replace(concepts, bank, random.Random(i))
        assert replaced, caption
        corrupted, kind, wrong, right = replaced
        assert wrong != right and wrong in bank.frequent[kind] and right in concepts.texts(kind)
        if any(c != right for c in bank.by_form[kind].get(form(kind, right), [])):
            assert form(kind, wrong) == form(kind, right), (kind, wrong, right)
        # exactly one occurrence of the concept changed (an article before it may follow the new word)
        text, articles = concepts.text, lambda t: re.sub(r"\ban\b", "a", t)
        expected = {articles(text[:s] + wrong + text[e:]) for s, e in concepts.spans[kind] if text[s:e] == right}
        assert articles(corrupted) in expected
        seen.add(kind)
    assert seen == set(TYPES)


def all_swaps(caption: str, tries: int = 300) -> set[tuple[str, str]]:
    out = set()
    for seed in range(tries):
        if swapped := swap(extract(normalize(caption)), random.Random(seed)):
            out.add((swapped[0], swapped[1]))
    return out


@pytest.mark.parametrize("caption", [
    "a cat and a dog", "a cat next to a dog", "a cat sitting beside a dog", "a red circle and a blue circle",
    "a red and white bus", "a large red circle", "a cat, a dog and a bird", "a cat near a dog near a bird",
])
def test_no_swap_that_keeps_the_meaning(caption):
    assert all_swaps(caption) == set()


@pytest.mark.parametrize("caption, expected", [
    # across "and", an entity swap keeps the meaning, an attribute or noun swap binds them differently
    ("a red circle and a blue square", {("a blue circle and a red square", "attr"),
                                        ("a red square and a blue circle", "noun")}),
    ("a man riding a horse", {("a horse riding a man", "ent"), ("a horse riding a man", "noun")}),
    ("a red circle to the left of a blue square", {
        ("a blue square to the left of a red circle", "ent"), ("a blue circle to the left of a red square", "attr"),
        ("a red square to the left of a blue circle", "noun")}),
    # the official substring rule would refuse both: "standing" holds "and", "without" holds "with"
    ("a man standing on a skateboard", {("a skateboard standing on a man", "ent"),
                                        ("a skateboard standing on a man", "noun")}),
])
def test_swaps_that_change_the_meaning(caption, expected):
    assert all_swaps(caption) == expected


def test_symmetric_pairs_inside_a_list():
    """Two "with" pairs joined by "and": each pair is unordered, but what is with whom matters."""
    made = {text for text, _ in all_swaps("a man with a hat and a woman with an umbrella")}
    assert {"a man with an umbrella and a woman with a hat", "a woman with a hat and a man with an umbrella",
            "a man with a woman and a hat with an umbrella", "an umbrella with a hat and a woman with a man"} == made
    assert "a hat with a man and a woman with an umbrella" not in made  # man <-> hat: the same pair


def test_swaps_pair_words_of_one_form_and_fix_articles():
    assert all_swaps("a large orange circle and a small red square") == {
        ("a large red circle and a small orange square", "attr"),
        ("a small orange circle and a large red square", "attr"),
        ("a large orange square and a small red circle", "noun")}
    assert ("an orange circle and a red square", "attr") in all_swaps("a red circle and an orange square")


def test_targets_are_the_exact_strings():
    bank = ConceptBank.build(["a red circle"] * 5 + ["a blue circle"] * 5 + ["a green circle"])
    replaced = {make_sample("A red circle", bank, ICCC(aug_ratio=1, swap_ratio=0), random.Random(s))
                for s in range(300)}
    assert {(s.kind, s.concept, s.caption) for s in replaced} == {("replace", "attr", "a blue circle"),
                                                                 ("replace", "ent", "a blue circle")}
    assert {s.target for s in replaced} == {
        '"blue" should be "red".', '"blue" could be "red".', '"blue" is "red".', '"blue" actually is "red".',
        '"a blue circle" should be "a red circle".', '"a blue circle" could be "a red circle".',
        '"a blue circle" is "a red circle".', '"a blue circle" actually is "a red circle".'}
    swapped = {make_sample("A red circle and a blue square.", bank, ICCC(aug_ratio=1, swap_ratio=1),
                           random.Random(s)) for s in range(300)}
    assert {(s.kind, s.caption, s.target) for s in swapped} == {
        ("swap", "a blue circle and a red square.", phrase.format("blue", "red")) for phrase in SWAP_PHRASES} | {
        ("swap", "a red square and a blue circle.", phrase.format("square", "circle")) for phrase in SWAP_PHRASES}
    assert len(REPLACE_PHRASES) == len(SWAP_PHRASES) == 4
    untouched = make_sample("A Red: circle  on  a MAT", bank, ICCC(aug_ratio=0), random.Random(0))
    assert untouched.kind == "caption" and untouched.caption == "a red circle on a mat"
    assert untouched.target == "A Red: circle  on  a MAT"  # stage 1's sample: the caption as the record has it
    assert to_conversation(untouched) == [{"from": "human", "value": "<image>"},
                                          {"from": "gpt", "value": "A Red: circle  on  a MAT"}]
    correction = next(s for s in replaced if s.concept == "attr")
    assert to_conversation(correction)[0]["value"] == '<image>\ncheck the caption "a blue circle",'
    assert PROMPT.format("x") == 'check the caption "x",'


def test_corrected_captions_are_cut_to_50_words_and_captioning_keeps_stage_one_captions():
    long = " ".join(["a red circle"] * 30)
    assert len(normalize(long).split()) == 50
    corrected = make_sample(long, make_bank(), ICCC(aug_ratio=1, swap_ratio=0), random.Random(0))
    assert corrected.kind == "replace" and len(corrected.caption.split()) == 50
    untouched = make_sample(long, make_bank(), ICCC(aug_ratio=0), random.Random(0))
    assert untouched.caption == normalize(long) and untouched.target == long


def test_rates_follow_aug_and_swap_ratios():
    bank, settings = make_bank(), ICCC(aug_ratio=0.3, swap_ratio=0.5)
    kinds = [make_sample("a red circle and a blue square", bank, settings, sample_rng(0, i, 0)).kind
             for i in range(4000)]
    assert abs(kinds.count("caption") / 4000 - 0.7) < 0.03
    assert abs(kinds.count("swap") / 4000 - 0.15) < 0.02  # this caption always allows a swap


@pytest.mark.parametrize("caption", ["", "   ", "a the of and is", "...", "Un chat noir sur un canapé, près de l’âtre.",
                                     "一只猫坐在沙发上", "A cat 🐱 on a mat ☀️", "A ĳ ǅ caption"])
def test_bad_captions_give_captioning_samples_or_a_clean_draw(caption):
    bank = make_bank()
    for seed in range(50):
        sample = make_sample(caption, bank, ICCC(aug_ratio=1, swap_ratio=0.5), random.Random(seed))
        assert sample.kind in ("caption", "replace", "swap")
        if sample.kind == "caption":
            assert sample.caption == normalize(caption) and sample.target == caption
    for empty in ("", "a the of and is", "..."):
        assert make_sample(empty, bank, ICCC(aug_ratio=1), random.Random(0)).kind == "caption"
    with pytest.raises(TypeError, match="a caption must be a string, got int"):
        make_sample(3, bank, ICCC(), random.Random(0))


def caption_record(i: int, caption="A red circle and a blue square.", **change) -> dict:
    return {"id": str(i), "image": "images/train_000000.png", "conversations": [
        {"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": caption}]} | change


@pytest.fixture
def tokenizer(init) -> Tokenizer:
    return Tokenizer.from_dir(init)


def dataset(path, tokenizer, seed=0, settings=None, skip_bad=False, folder=None):
    return CaptionCorrectionDataset([DataSource(path, image_folder=folder)], tokenizer, get_template("plain_prompt"),
                                    ImageProcessor(size=96, crop_size=96, pad_to_square=False), 16, 512, seed,
                                    skip_bad, settings=settings or ICCC(aug_ratio=1.0, swap_ratio=0.5))


@pytest.mark.parametrize("record, message", [
    (caption_record(1, " "), "turn 1 has an empty answer"),
    (caption_record(1, 7), "turn 1: 'value' must be a string"),
    (caption_record(1, ": :"), "the caption is empty once normalised"),
    (caption_record(1) | {"conversations": caption_record(1)["conversations"] + [
        {"from": "human", "value": "And?"}, {"from": "gpt", "value": "Nothing else."}]}, "ICCC needs caption records"),
    ({k: v for k, v in caption_record(1, "A cat.").items() if k != "image"} | {"conversations": [
        {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "A cat."}]}, "ICCC needs caption records"),
])
def test_bad_records_are_named_by_file_and_record(world, tokenizer, tmp_path, record, message):
    path = tmp_path / "iccc_bad.json"
    path.write_text(json.dumps([caption_record(0), record]))
    with pytest.raises(BadRecord, match=f"iccc_bad.json record 1: .*{message}"):
        dataset(path, tokenizer, folder=world)
    assert len(dataset(path, tokenizer, skip_bad=True, folder=world)) == 1


def test_plain_prompt_renders_the_image_the_text_and_the_answer():
    conversation = [{"from": "human", "value": '<image>\ncheck the caption "a blue circle",'},
                    {"from": "gpt", "value": '"blue" should be "red".'}]
    text, spans = render(get_template("plain_prompt"), conversation)
    assert text == '<image>\ncheck the caption "a blue circle",\n"blue" should be "red".\n'
    assert [text[s:e] for s, e in spans] == ['"blue" should be "red".\n']
    captioning = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "A cat."}]
    assert render(get_template("plain_prompt"), captioning) == ("<image>A cat.\n", [(7, 14)])
    assert render(get_template("plain_prompt"), captioning) == render(get_template("plain"), captioning)


@pytest.mark.parametrize("tokenizer_source", ["tiny", "llama"])
def test_loss_covers_exactly_the_target_tokens(world, init, llama_tokenizer_dir, tokenizer_source):
    tok = Tokenizer.from_dir(init if tokenizer_source == "tiny" else llama_tokenizer_dir)
    data = dataset(world / "captions.json", tok)
    kinds = set()
    for index in range(40):
        sample = make_sample(data.records[index][0]["conversations"][1]["value"], data.bank, data.settings,
                             sample_rng(0, index, 0))
        kinds.add(sample.kind)
        item = data[index]
        ids, labels = item["input_ids"], item["labels"]
        text = render(get_template("plain_prompt"), to_conversation(sample))[0]
        image = tok.bos_ids + tok.encode(text)
        at = image.index(tok.image_token_id)
        assert ids == image[:at] + [tok.image_token_id] * 16 + image[at + 1:]
        trained = [t for t, label in zip(ids, labels) if label != IGNORE_INDEX]
        assert [label for label in labels if label != IGNORE_INDEX] == trained
        assert trained == ids[len(ids) - len(trained):]  # one run, at the end: the target and its newline
        assert tok.decode(trained, skip_special_tokens=False).strip(" ") == sample.target + "\n"
        assert tok.decode(ids[:len(ids) - len(trained)]).endswith(("\n", sample.caption + '",\n'))
    assert kinds == {"replace", "swap"}


def test_the_control_is_stage_one_itself(world, tokenizer):
    """With aug_ratio 0 every sample is the one stage 1 trains on: the same tokens and the same labels."""
    control = dataset(world / "captions.json", tokenizer, settings=ICCC(aug_ratio=0.0))
    stage1 = LLaVADataset([DataSource(world / "captions.json")], tokenizer, get_template("plain"),
                          ImageProcessor(size=96, crop_size=96, pad_to_square=False), 16, 512, 0)
    for index in range(20):
        assert control[index]["input_ids"] == stage1[index]["input_ids"]
        assert control[index]["labels"] == stage1[index]["labels"]


def test_samples_are_seeded_per_record_and_epoch(world, tokenizer):
    def draw(seed, epoch):
        data = dataset(world / "captions.json", tokenizer, seed, ICCC(aug_ratio=0.5, swap_ratio=0.5))
        data.set_epoch(epoch)
        return [data.conversation(i) for i in range(60)]

    first = draw(0, 0)
    assert first == draw(0, 0)
    assert first != draw(0, 1) and first != draw(1, 0)
    assert dataset(world / "captions.json", tokenizer)[3]["input_ids"] == dataset(world / "captions.json",
                                                                                    tokenizer)[3]["input_ids"]


@pytest.mark.parametrize("prototypes", [0, 4])
def test_a_train_iccc_step_changes_only_the_connector(world, init, tmp_path, prototypes):
    start = init
    if prototypes:
        model, tokenizer, processor = load_pretrained(str(init))
        model.add_prototype_extractor(prototypes)
        start = tmp_path / "init"
        model.save_pretrained(start, tokenizer, processor)
    before = VLM.from_pretrained(str(start))
    history = launch(start, world, tmp_path / "run", "--data", str(world / "captions.json"), "--max_steps", "2",
                     "--micro_batch_size", "8", script="train_iccc.py")
    after = VLM.from_pretrained(str(tmp_path / "run"))
    assert len(history) == 2 and set(history[0]["lr"]) >= {"projector", "projector/decay"}
    connector = {"projector", "prototypes"}
    for part, params in after.parameter_groups().items():
        original = dict(before.parameter_groups()[part])
        changed = [not torch.equal(p, original[name]) for name, p in params]
        assert all(changed) if part in connector else not any(changed), part
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["method"] == {"aug_ratio": 0.5, "swap_ratio": 0.5, "max_words": 50}


@pytest.mark.slow
def test_torchrun_with_two_processes_follows_the_single_process_loss(world, init, tmp_path):
    """Each record's corruption depends on (seed, record, epoch) only, so two ranks draw what one process draws."""
    args = ["--data", str(world / "captions.json"), "--max_steps", "3"]
    single = launch(init, world, tmp_path / "one", *args, "--micro_batch_size", "8", script="train_iccc.py")
    double = launch(init, world, tmp_path / "two", *args, "--micro_batch_size", "4", processes=2,
                    script="train_iccc.py")
    assert [r["targets"] for r in single] == [r["targets"] for r in double]
    for a, b in zip(single, double):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"]), (a, b)


def test_caption_logprobs_equal_the_training_loss(init, world):
    model, tokenizer, processor = load_pretrained(str(init))
    pixels = torch.stack([processor(load_image(world / "images" / f"eval_00000{i}.png")) for i in range(3)])
    captions = ["A large red circle.", "A small blue square and a large white cross.", "A cat."]
    scores = caption_logprobs(model, tokenizer, pixels, captions)
    template = get_template("plain")
    for i, caption in enumerate(captions):
        conversation = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": caption}]
        ids, labels = tokenize_conversation(tokenizer, template, conversation, model.cfg.num_image_tokens())
        loss = model.loss(torch.tensor([ids]), torch.tensor([labels]), pixels[i:i + 1], reduction="sum")
        assert scores[i].item() == pytest.approx(-loss.item(), rel=1e-5)


def test_accuracy_per_kind():
    scores = [{"true": -1.0, "replace-attr": -2.0, "swap-noun": -0.5}, {"true": -3.0, "replace-attr": -2.0},
              {"true": -1.0, "replace-ent": -1.0}]
    assert accuracy(scores) == {
        "replace-attr": {"accuracy": 0.5, "n": 2}, "replace-ent": {"accuracy": 0.0, "n": 1},
        "swap-noun": {"accuracy": 0.0, "n": 1}, "replace": {"accuracy": 1 / 3, "n": 3},
        "swap": {"accuracy": 0.0, "n": 1}, "all": {"accuracy": 0.0, "n": 3}}


def test_caption_ranking_from_the_shapes_world_and_eval_script(world, init, tmp_path):
    path = shapes_benchmark(world)
    benchmark = load("caption_ranking", path)
    objects = json.loads((world / "objects.json").read_text())
    assert len(benchmark.records) == sum("eval_" in p for p in objects)  # every eval image allows a replace
    for record in benchmark.records:
        assert record["caption"][0].isupper() and record["caption"] not in record["negatives"].values()
        assert set(record["negatives"]) <= {f"{k}-{t}" for k in ("replace", "swap") for t in TYPES}
    scores = eval_script.main([str(init), "--task", "caption_ranking", "--data", str(path), "--out",
                               str(tmp_path / "ranking.json"), "--batch_size", "7"])
    written = json.loads((tmp_path / "ranking.json").read_text())
    assert written["scores"] == scores and scores["all"]["n"] == len(benchmark.records)
    assert {"replace-attr", "replace-noun", "replace-ent"} <= set(scores)
    assert all(set(p["logprobs"]) == {"true", *p["negatives"]} for p in written["predictions"])


def test_runs_over_seeds_are_compared_per_kind(tmp_path):
    for arm, accuracies in (("control", (0.8, 0.9)), ("iccc", (0.9, 1.0))):
        for seed, value in enumerate(accuracies):
            scores = {"swap-attr": {"accuracy": value, "n": 10}, "all": {"accuracy": value / 2, "n": 10}}
            (tmp_path / arm / f"seed{seed}").mkdir(parents=True)
            (tmp_path / arm / f"seed{seed}" / "eval_caption_ranking.json").write_text(json.dumps({"scores": scores}))
    table = build_ranking(["--compare", str(tmp_path / "control"), str(tmp_path / "iccc")])
    assert table.splitlines()[2] == "| swap-attr | 85.0 ± 7.1 | 95.0 ± 7.1 |"
    assert table.splitlines()[3] == "| all | 42.5 ± 3.5 | 47.5 ± 3.5 |"


def test_caption_ranking_builder_from_llava_captions(world, tmp_path):
    out = build_ranking(["--captions", str(world / "captions.json"), "--limit", "30", "--out",
                         str(tmp_path / "sub" / "ranking.jsonl")])
    benchmark = load("caption_ranking", out)  # image paths resolve from the output's folder
    assert 0 < len(benchmark.records) <= 30 and benchmark.image(0).is_file()


def test_train_iccc_without_flags_continues_stage_one_on_the_shapes_captions(world, init, tmp_path):
    """The README's command: out/tiny/align and out/shapes/captions.json, relative to the working directory."""
    (tmp_path / "out" / "tiny").mkdir(parents=True)
    (tmp_path / "out" / "tiny" / "align").symlink_to(init)
    (tmp_path / "out" / "shapes").symlink_to(world)
    run = subprocess.run([sys.executable, str(ROOT / "train_iccc.py"), "--max_steps", "1"], check=False, cwd=tmp_path,
                         env=os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "tiny" / "iccc" / "summary.json").read_text())
    assert summary["data"] == ["out/shapes/captions.json"] and summary["steps"] == 1
    assert "concept bank over 160 captions" in run.stdout
