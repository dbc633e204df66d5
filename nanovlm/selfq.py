"""Self-questioning, from SQ-LLaVA (Sun et al., ECCV 2024): the model learns to ask questions about an image,
not only to answer them.

Training. Each human turn j > 0 of an image conversation becomes a turn of the visual user (VUSER) with
probability sq_ratio, drawn afresh every epoch from a generator seeded by (seed, record index, epoch), so a run
is reproducible (the official code's draw is not). The first turn (the one with the image), single-turn and
text-only conversations are never converted. With the `v1_sq` template (nanovlm/templates.py) a VUSER
question and its `</s>` carry loss like an answer; the `VUSER:` prefix, USER questions, the system prompt
and the image carry none. One token-mean cross-entropy over both kinds of target is the objective:

    L = L_sq + L_ans = -(1 / |T|) sum_{t in T} log p(x_t | x_<t, image),  T = VUSER-question and answer tokens

    ... USER: <image>\\nQ1 ASSISTANT: A1</s>VUSER: Q2</s> ASSISTANT: A2</s> ...

Inference. The model first describes the image ("Can you describe the image in detail?", greedy), then a
`VUSER:` turn is opened and a question sampled as the paper does: temperature 1.2, top-k 300, top-p 0.95,
until `</s>`.
"""

import random

import torch
from PIL import Image

from .generate import Sampling, answer, generate_text
from .image import ImageProcessor
from .templates import Template, tokenize_conversation
from .tokenizer import IMAGE_PLACEHOLDER, Tokenizer
from .vlm import VLM

DESCRIBE = "Can you describe the image in detail?"
QUESTION_SAMPLING = Sampling(max_new_tokens=64, temperature=1.2, top_k=300, top_p=0.95, stop_strings=("</s>",))


def turn_rng(seed: int, index: int, epoch: int) -> random.Random:
    return random.Random(f"selfq-{seed}-{index}-{epoch}")


def to_self_questioning(conversation: list[dict], sq_ratio: float, rng: random.Random) -> list[dict]:
    """A copy of an image conversation whose human turns after the first are VUSER turns with probability
    sq_ratio; text-only and single-turn conversations come back unchanged."""
    has_image = IMAGE_PLACEHOLDER in conversation[0]["value"]
    if not has_image or len(conversation) <= 2 or sq_ratio <= 0:
        return conversation
    converted = []
    for i, turn in enumerate(conversation):
        if i > 0 and turn["from"] == "human" and rng.random() < sq_ratio:
            turn = {**turn, "from": "vuser"}
        converted.append(turn)
    return converted


@torch.no_grad()
def ask_questions(model: VLM, tokenizer: Tokenizer, processor: ImageProcessor, template: Template,
                  image: Image.Image, num_questions: int, sampling: Sampling = QUESTION_SAMPLING,
                  generator: torch.Generator | None = None) -> tuple[str, list[str]]:
    """The model's description of `image` and `num_questions` questions it then asks about it as VUSER."""
    if not template.vuser_prefix:
        raise ValueError(f"template {template.name!r} has no visual user; self-questioning needs v1_sq")
    prompt = IMAGE_PLACEHOLDER + "\n" + DESCRIBE
    [description] = answer(model, tokenizer, processor, template, [(image, prompt)], Sampling(max_new_tokens=256))
    conversation = [{"from": "human", "value": prompt}, {"from": "gpt", "value": description}]
    ids = tokenize_conversation(tokenizer, template, conversation, model.cfg.num_image_tokens())[0]
    # </s> is a special token, so encoding the prefix on its own gives the ids it gets inside the whole text.
    ids += tokenizer.encode(template.vuser_prefix)
    pixels = processor(image)[None].to(model.language_model.embed_tokens.weight.device)
    questions = generate_text(model, tokenizer, [ids] * num_questions, pixels.expand(num_questions, -1, -1, -1),
                              sampling, generator)
    return description, questions
