"""Conversation templates: exact rendered text, loss labels against transformers' tokenisation, validation."""

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from nanovlm.templates import IGNORE_INDEX, TEMPLATES, get_template, render, tokenize_conversation
from nanovlm.tokenizer import IMAGE_PLACEHOLDER, Tokenizer

ANSWERS = ["A white cat sits on the mat.", "It is red.", "Two dogs and a child, near 12 cars."]
CONVERSATION = [
    {"from": "human", "value": "<image>\nWhat is in the picture?"},
    {"from": "gpt", "value": ANSWERS[0]},
    {"from": "human", "value": "What color is the chair?"},
    {"from": "gpt", "value": ANSWERS[1]},
    {"from": "human", "value": "Describe the street."},
    {"from": "gpt", "value": ANSWERS[2]},
]
CAPTION = [{"from": "human", "value": "Describe the image.\n<image>"}, {"from": "gpt", "value": ANSWERS[0]}]
NUM_IMAGE_TOKENS = 7

RENDERED = {
    "plain": "<image>A white cat sits on the mat.\nIt is red.\nTwo dogs and a child, near 12 cars.\n",
    "plain_prompt": "<image>\nWhat is in the picture?\nA white cat sits on the mat.\nWhat color is the chair?\n"
    "It is red.\nDescribe the street.\nTwo dogs and a child, near 12 cars.\n",
    "vicuna_v1": "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions. USER: <image>\nWhat is in the picture? "
    "ASSISTANT: A white cat sits on the mat.</s>USER: What color is the chair? ASSISTANT: It is red.</s>"
    "USER: Describe the street. ASSISTANT: Two dogs and a child, near 12 cars.</s>",
    "chatml": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n<image>\nWhat is in the picture?<|im_end|>\n<|im_start|>assistant\n"
    "A white cat sits on the mat.<|im_end|>\n"
    "<|im_start|>user\nWhat color is the chair?<|im_end|>\n<|im_start|>assistant\nIt is red.<|im_end|>\n"
    "<|im_start|>user\nDescribe the street.<|im_end|>\n<|im_start|>assistant\n"
    "Two dogs and a child, near 12 cars.<|im_end|>\n",
    "mistral_instruct": "[INST] <image>\nWhat is in the picture? [/INST] A white cat sits on the mat.</s>"
    "[INST] What color is the chair? [/INST] It is red.</s>"
    "[INST] Describe the street. [/INST] Two dogs and a child, near 12 cars.</s>",
    # The tiny preset's: vicuna_v1 from its first "USER:" on.
    "vicuna_v1_bare": "USER: <image>\nWhat is in the picture? "
    "ASSISTANT: A white cat sits on the mat.</s>USER: What color is the chair? ASSISTANT: It is red.</s>"
    "USER: Describe the street. ASSISTANT: Two dogs and a child, near 12 cars.</s>",
    # Without VUSER turns, v1_sq is vicuna_v1 with a longer system prompt (VUSER turns: tests/test_selfq.py).
    "v1_sq": get_template("v1_sq").system + "USER: <image>\nWhat is in the picture? "
    "ASSISTANT: A white cat sits on the mat.</s>USER: What color is the chair? ASSISTANT: It is red.</s>"
    "USER: Describe the street. ASSISTANT: Two dogs and a child, near 12 cars.</s>",
}
TRAINED = {  # the exact text of each loss span
    "plain": [a + "\n" for a in ANSWERS],
    "plain_prompt": [a + "\n" for a in ANSWERS],
    "vicuna_v1": [f" {a}</s>" for a in ANSWERS],
    "vicuna_v1_bare": [f" {a}</s>" for a in ANSWERS],
    "chatml": [f"{a}<|im_end|>" for a in ANSWERS],
    "mistral_instruct": [f" {a}</s>" for a in ANSWERS],
    "v1_sq": [f" {a}</s>" for a in ANSWERS],
}
GENERATION_PROMPT_END = {
    "plain": "It is red.\n",
    "plain_prompt": "It is red.\nDescribe the street.\n",
    "vicuna_v1": "USER: Describe the street. ASSISTANT:",
    "vicuna_v1_bare": "USER: Describe the street. ASSISTANT:",
    "chatml": "<|im_start|>user\nDescribe the street.<|im_end|>\n<|im_start|>assistant\n",
    "mistral_instruct": "[INST] Describe the street. [/INST]",
    "v1_sq": "USER: Describe the street. ASSISTANT:",
}


@pytest.mark.parametrize("name", TEMPLATES)
def test_render(name: str) -> None:
    text, spans = render(get_template(name), CONVERSATION)
    assert text == RENDERED[name]
    assert [text[start:end] for start, end in spans] == TRAINED[name]


@pytest.mark.parametrize("name", TEMPLATES)
def test_generation_prompt(name: str) -> None:
    text, spans = render(get_template(name), CONVERSATION[:-1], generation_prompt=True)
    assert text.endswith(GENERATION_PROMPT_END[name])
    assert RENDERED[name].startswith(text)
    assert [text[start:end] for start, end in spans] == TRAINED[name][:2]


def _reference(tokenizer_dir: Path):
    """transformers' tokenizer for the checkpoint, with <image> added the way nanovlm adds it."""
    ref = AutoTokenizer.from_pretrained(tokenizer_dir)
    ref.add_tokens([IMAGE_PLACEHOLDER], special_tokens=True)
    return ref


def _expand_images(ids: list[int], image_token_id: int) -> list[int]:
    out = []
    for token_id in ids:
        out += [token_id] * (NUM_IMAGE_TOKENS if token_id == image_token_id else 1)
    return out


def _loss_spans(input_ids: list[int], labels: list[int]) -> list[list[int]]:
    """Contiguous runs of tokens that carry loss."""
    spans, previous = [], IGNORE_INDEX
    for token_id, label in zip(input_ids, labels):
        if label != IGNORE_INDEX:
            assert label == token_id
            if previous == IGNORE_INDEX:
                spans.append([])
            spans[-1].append(token_id)
        previous = label
    return spans


@pytest.mark.parametrize(
    ("name", "tokenizer_name", "conversation", "end_token"),
    [
        ("vicuna_v1", "llama", CONVERSATION, "</s>"),
        ("mistral_instruct", "llama", CONVERSATION, "</s>"),
        ("chatml", "chatml", CONVERSATION, "<|im_end|>"),
        ("plain", "llama", CAPTION, "\n"),
    ],
)
def test_tokenize_conversation(request: pytest.FixtureRequest, name: str, tokenizer_name: str, conversation: list[dict],
                               end_token: str) -> None:
    tokenizer_dir = request.getfixturevalue(f"{tokenizer_name}_tokenizer_dir")
    tok = Tokenizer.from_dir(tokenizer_dir)
    ref = _reference(tokenizer_dir)
    template = get_template(name)
    input_ids, labels = tokenize_conversation(tok, template, conversation, NUM_IMAGE_TOKENS)
    assert len(input_ids) == len(labels)

    # The whole text tokenised at once by transformers, <image> then expanded.
    text, _ = render(template, conversation)
    assert input_ids == _expand_images(ref(text).input_ids, tok.image_token_id)
    assert input_ids[: len(tok.bos_ids)] == tok.bos_ids

    # Image tokens: one contiguous block, no loss.
    image_positions = [i for i, token_id in enumerate(input_ids) if token_id == tok.image_token_id]
    assert len(image_positions) == NUM_IMAGE_TOKENS
    assert image_positions == list(range(image_positions[0], image_positions[0] + NUM_IMAGE_TOKENS))
    assert all(labels[i] == IGNORE_INDEX for i in image_positions)

    # Loss exactly on the answers plus their end token. Every answer follows a word boundary (a space,
    # newline or special token), so its in-context ids are the tokenizer's ids of the answer on its own
    # (sentencepiece's dummy prefix supplies the leading "▁").
    answers = [turn["value"] for turn in conversation if turn["from"] == "gpt"]
    spans = _loss_spans(input_ids, labels)
    assert spans == [ref(a + end_token, add_special_tokens=False).input_ids for a in answers]
    assert [tok.decode(s, skip_special_tokens=False).strip(" ") for s in spans] == [a + end_token for a in answers]
    assert sum(label != IGNORE_INDEX for label in labels) == sum(map(len, spans))


def test_chatml_newline_after_answer_has_no_loss(chatml_tokenizer_dir: Path) -> None:
    tok = Tokenizer.from_dir(chatml_tokenizer_dir)
    input_ids, labels = tokenize_conversation(tok, get_template("chatml"), CONVERSATION, NUM_IMAGE_TOKENS)
    ends = [i for i, token_id in enumerate(input_ids) if token_id == tok.eos_id and labels[i] != IGNORE_INDEX]
    assert len(ends) == 3
    newline = tok.encode("\n")
    for i in ends:
        assert input_ids[i + 1 : i + 1 + len(newline)] == newline
        assert labels[i + 1] == IGNORE_INDEX


def test_prompt_tokens_have_no_loss(llama_tokenizer_dir: Path) -> None:
    tok = Tokenizer.from_dir(llama_tokenizer_dir)
    template = get_template("vicuna_v1")
    input_ids, labels = tokenize_conversation(tok, template, CONVERSATION, NUM_IMAGE_TOKENS)
    prompt, _ = tokenize_conversation(tok, template, CONVERSATION[:1], NUM_IMAGE_TOKENS, generation_prompt=True)
    assert input_ids[: len(prompt)] == prompt  # BOS, system prompt, first USER turn, image tokens, "ASSISTANT:"
    assert set(labels[: len(prompt)]) == {IGNORE_INDEX}
    assert labels[len(prompt)] == input_ids[len(prompt)]  # the answer's first token


def test_text_only_conversation(chatml_tokenizer_dir: Path) -> None:
    tok = Tokenizer.from_dir(chatml_tokenizer_dir)
    conversation = [{"from": "human", "value": "Hi there"}, {"from": "gpt", "value": "Hello!"}]
    input_ids, labels = tokenize_conversation(tok, get_template("chatml"), conversation, NUM_IMAGE_TOKENS)
    assert tok.image_token_id not in input_ids
    assert _loss_spans(input_ids, labels) == [tok.encode("Hello!<|im_end|>")]


def test_plain_drops_question_text() -> None:
    conversation = [{"from": "human", "value": "Say hi"}, {"from": "gpt", "value": "hi"}]
    assert render(get_template("plain"), conversation) == ("hi\n", [(0, 3)])


@pytest.mark.parametrize(
    ("conversation", "generation_prompt", "message"),
    [
        ([], False, "non-empty"),
        ([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], False, "turn 1: expected a 'gpt'"),
        ([{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}], False, "turn 0: expected a 'human'"),
        ([{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}, {"from": "human", "value": "c"}],
         False, "ends with a human turn"),
        ([{"from": "human", "value": "a"}, {"from": "gpt", "value": 3}], False, "turn 1: 'value' must be a string"),
        ([{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}], True, "ends with a human turn"),
    ],
)
def test_validation_errors(conversation: list[dict], generation_prompt: bool, message: str) -> None:
    for name in TEMPLATES:
        with pytest.raises(ValueError, match=message):
            render(get_template(name), conversation, generation_prompt)


def test_unknown_template_lists_valid_names() -> None:
    with pytest.raises(KeyError, match="vicuna_v1.*chatml"):
        get_template("llama_99")
