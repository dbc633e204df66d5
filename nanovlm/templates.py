"""Conversation templates: render LLaVA-style conversations to text and tokenise them with loss labels.

A conversation is LLaVA JSON: [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}, ...], alternating
and starting with a human turn. The assistant answers carry loss; so do the questions of SQ-LLaVA's visual user
(a "vuser" turn in place of a later human turn, `v1_sq` template only; see nanovlm/selfq.py).
"""

from dataclasses import dataclass, replace

from .tokenizer import IMAGE_PLACEHOLDER, Tokenizer

IGNORE_INDEX = -100  # the label that torch's cross-entropy skips


@dataclass(frozen=True)
class Template:
    name: str
    system: str  # rendered once, before the first turn
    user: str  # format string around a human turn; it also opens the assistant turn
    assistant: str  # format string around an answer; the whole rendered piece carries loss
    stop_str: str  # generation stops when this appears
    assistant_tail: str = ""  # text after each answer that carries no loss (ChatML's newline)
    image_only_user: bool = False  # drop the human text and keep only the image (LLaVA stage-1 captioning)
    user_image_alone: str | None = None  # format of a human turn that is the image alone (None: `user`)
    vuser_prefix: str = ""  # opens a visual-user turn, no loss ("" : the template has no visual user)
    vuser_question: str = ""  # format string around the visual user's question; it carries loss
    vuser_suffix: str = ""  # after the question: opens the assistant turn, no loss


VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")

VICUNA_V1 = Template(name="vicuna_v1", system=VICUNA_SYSTEM + " ", user="USER: {} ASSISTANT:", assistant=" {}</s>",
                     stop_str="</s>")

TEMPLATES: dict[str, Template] = {
    "plain": Template(name="plain", system="", user="{}", assistant="{}\n", stop_str="\n", image_only_user=True),
    # `plain` that keeps the human text: the image, the text, a newline, the answer; the image alone renders as
    # in `plain`, so that ICCC's captioning samples are stage 1's (nanovlm/iccc.py)
    "plain_prompt": Template(name="plain_prompt", system="", user="{}\n", assistant="{}\n", stop_str="\n",
                             user_image_alone="{}"),
    "vicuna_v1": VICUNA_V1,
    # vicuna_v1 without the system prompt: the tiny preset's template. A model trained from scratch learns nothing
    # from a constant preamble, and on the shapes world its 29 tokens were a quarter of every stage-2 sequence.
    "vicuna_v1_bare": replace(VICUNA_V1, name="vicuna_v1_bare", system=""),
    # SQ-LLaVA (Sun et al., 2024): vicuna_v1 plus a visual user, VUSER, whose questions the model learns to ask.
    # The second paragraph of the system prompt is this project's wording of the official one's meaning.
    "v1_sq": replace(
        VICUNA_V1,
        name="v1_sq",
        system=VICUNA_SYSTEM + " The assistant is also a curious visual user: looking at the image, it asks "
        "complex questions that the image itself answers, and never asks about details it cannot be sure of. ",
        vuser_prefix="VUSER:",
        vuser_question=" {}</s>",
        vuser_suffix=" ASSISTANT:",
    ),
    "chatml": Template(
        name="chatml",
        system="<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n",
        user="<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n",
        assistant="{}<|im_end|>",
        stop_str="<|im_end|>",
        assistant_tail="\n",
    ),
    "mistral_instruct": Template(
        name="mistral_instruct", system="", user="[INST] {} [/INST]", assistant=" {}</s>", stop_str="</s>"
    ),
}


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise KeyError(f"unknown template {name!r}; valid templates: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def validate_conversation(conversation: list[dict], generation_prompt: bool = False) -> None:
    """Raise ValueError saying what is wrong unless turns alternate human/gpt, starting with human; a later
    human turn may be a visual user's ("vuser")."""
    if not isinstance(conversation, list) or not conversation:
        raise ValueError("conversation must be a non-empty list of turns")
    for i, turn in enumerate(conversation):
        expected = ("human",) if i == 0 else ("human", "vuser") if i % 2 == 0 else ("gpt",)
        if not isinstance(turn, dict) or turn.get("from") not in expected:
            got = turn.get("from") if isinstance(turn, dict) else turn
            raise ValueError(f"turn {i}: expected a {' or '.join(map(repr, expected))} turn, got {got!r} "
                             f"(turns must alternate human/gpt)")
        if not isinstance(turn.get("value"), str):
            raise ValueError(f"turn {i}: 'value' must be a string, got {type(turn.get('value')).__name__}")
    last = conversation[-1]["from"]
    if generation_prompt and last == "gpt":
        raise ValueError("a generation prompt needs a conversation that ends with a human turn")
    if not generation_prompt and last != "gpt":
        raise ValueError("conversation ends with a human turn; training needs it to end with a gpt answer")


def render(template: Template, conversation: list[dict],
           generation_prompt: bool = False) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation to text and the (start, end) character spans that carry loss.

    With generation_prompt=True the conversation ends with a human (or vuser) turn and the text ends where the
    answer starts.
    """
    validate_conversation(conversation, generation_prompt)
    text = template.system
    spans = []
    for turn in conversation:
        if turn["from"] == "human":
            question = turn["value"]
            if template.image_only_user:
                question = IMAGE_PLACEHOLDER if IMAGE_PLACEHOLDER in question else ""
            alone = question == IMAGE_PLACEHOLDER and template.user_image_alone is not None
            text += (template.user_image_alone if alone else template.user).format(question)
        elif turn["from"] == "vuser":
            if not template.vuser_prefix:
                raise ValueError(f"template {template.name!r} has no visual user (VUSER) role; use v1_sq")
            question = template.vuser_question.format(turn["value"])
            text += template.vuser_prefix
            spans.append((len(text), len(text) + len(question)))
            text += question + template.vuser_suffix
        else:
            answer = template.assistant.format(turn["value"])
            spans.append((len(text), len(text) + len(answer)))
            text += answer + template.assistant_tail
    return text, spans


def tokenize_conversation(tokenizer: Tokenizer, template: Template, conversation: list[dict], num_image_tokens: int,
                          generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """Token ids and labels (IGNORE_INDEX where there is no loss) for a conversation.

    The whole text is tokenised once, so BPE merges and sentencepiece's word-initial spaces are exactly those
    the model sees at inference. A token carries loss iff its first character lies inside an answer span; a
    leading space merged into a word token ("▁A", "ĠA") starts at that space, which belongs to the answer.
    Each <image> token becomes num_image_tokens image-token ids, to be replaced by image features.
    """
    text, spans = render(template, conversation, generation_prompt)
    trainable = [False] * len(text)
    for start, end in spans:
        trainable[start:end] = [True] * (end - start)

    input_ids = list(tokenizer.bos_ids)
    labels = [IGNORE_INDEX] * len(input_ids)
    for token_id, (start, _) in zip(*tokenizer.encode_with_offsets(text)):
        if token_id == tokenizer.image_token_id:
            input_ids += [token_id] * num_image_tokens
            labels += [IGNORE_INDEX] * num_image_tokens
        else:
            input_ids.append(token_id)
            # Byte-level post-processors that trim offsets can point a whitespace token one past the end.
            labels.append(token_id if start < len(text) and trainable[start] else IGNORE_INDEX)
    return input_ids, labels
