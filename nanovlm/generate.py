"""Batched text generation with a KV cache: greedy, temperature, top-k and top-p (nucleus) sampling.

Prompts of different lengths are left-padded so that every sequence's next token sits in the last column.
Padded positions are masked out of attention and position ids count only real tokens, so a padded prompt
generates exactly what it would alone. Generation of a sequence stops at the end-of-sequence token or once
its text contains one of the stop strings.
"""

from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from .image import ImageProcessor, load_image
from .llm import KVCache
from .templates import Template, tokenize_conversation
from .tokenizer import Tokenizer
from .vlm import VLM


@dataclass
class Sampling:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 is greedy
    top_k: int = 0  # 0 keeps every token
    top_p: float = 1.0
    stop_strings: tuple[str, ...] = ()


STATIC_CACHE_MULTIPLE = 128
Generators = torch.Generator | list[torch.Generator] | None  # one for the batch, or one per sequence


def sample_next(logits: torch.Tensor, s: Sampling, generator: Generators) -> torch.Tensor:
    """(B, vocab) logits -> (B,) token ids. With one generator per sequence, a sequence draws the same tokens
    whatever batch it is in."""
    if s.temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / s.temperature
    if s.top_k:
        kth = logits.topk(min(s.top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token once the tokens before it already hold top_p of the mass; the first always stays.
        drop = probs.cumsum(-1) - probs > s.top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    if isinstance(generator, list):
        return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generator)])
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(model: VLM, tokenizer: Tokenizer, prompts: list[list[int]], pixel_values: torch.Tensor | None = None,
             sampling: Sampling = Sampling(), generator: Generators = None) -> list[list[int]]:
    """Token ids of each prompt's continuation, without the end-of-sequence token.

    pixel_values holds the images of all prompts in reading order, as for VLM.embed. Decoding steps run through
    `LLM.compiled_decode` when `LLM.compile_decoding` has set one, with a static cache; else eagerly.
    """
    device = model.language_model.embed_tokens.weight.device
    llm, B, L = model.language_model, len(prompts), max(len(p) for p in prompts)
    static = llm.compiled_decode is not None  # a static cache attends to all `total` positions: always masked
    total = L + sampling.max_new_tokens  # cache positions; a static cache's rounded up, so that batches of
    if static:  # somewhat different lengths share one compiled step
        total = -(-total // STATIC_CACHE_MULTIPLE) * STATIC_CACHE_MULTIPLE
    ids = torch.full((B, L), tokenizer.pad_id, dtype=torch.long, device=device)
    valid = torch.zeros(B, total, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):] = torch.tensor(p, device=device)
        valid[i, L - len(p):L] = True
    padded = not bool(valid[:, :L].all())
    position_ids = (valid[:, :L].cumsum(-1) - 1).clamp(min=0)
    mask = None
    if padded or static:
        keys = total if static else L
        causal = torch.ones(L, keys, dtype=torch.bool, device=device).tril()
        # A padding query would see no key at all (NaN in softmax); let it see itself. Its output is unused.
        itself = torch.eye(L, keys, dtype=torch.bool, device=device)
        mask = (causal & valid[:, None, None, :keys]) | itself  # (B, 1, L, keys)
    embeds = model.embed(ids, pixel_values)
    cache = KVCache(llm.cfg, B, total, device, embeds.dtype, static)
    logits = llm.lm_head(llm(embeds, position_ids, mask, cache, model.grid(ids))[:, -1])  # (B, vocab)
    decode = llm.compiled_decode or llm.decode
    next_position = position_ids[:, -1] + 1
    stops = StopStrings(tokenizer, sampling.stop_strings)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    out: list[list[int]] = [[] for _ in range(B)]
    for step in range(sampling.max_new_tokens):
        if model.cfg.image_token_id < logits.shape[-1]:  # a placeholder, never text
            logits = logits.index_fill(-1, torch.tensor([model.cfg.image_token_id], device=device), float("-inf"))
        token = sample_next(logits, sampling, generator)
        done |= token == tokenizer.eos_id
        tokens = token.tolist()
        for i in (~done).nonzero()[:, 0].tolist():
            out[i].append(tokens[i])
            if stops.found(out[i]):
                done[i] = True
        if done.all() or step == sampling.max_new_tokens - 1:
            break
        valid[:, L + step] = True
        step_mask = valid[:, None, None, :] if static else valid[:, None, None, :L + step + 1] if padded else None
        logits = decode(token, next_position, step_mask, cache)
        next_position += 1
    return out


class StopStrings:
    """Whether a continuation's text contains a stop string, at a cost that does not grow with its length: a
    string completed by the newest token lies within its last len(string) tokens (every token adds at least a
    character), so only a tail of that many tokens, plus a margin for tokens that add none (byte pieces of one
    character), is decoded."""

    MARGIN = 8

    def __init__(self, tokenizer: Tokenizer, strings: tuple[str, ...]):
        self.tokenizer, self.strings = tokenizer, strings
        self.tail = max((len(s) for s in strings), default=0) + self.MARGIN

    def found(self, ids: list[int]) -> bool:
        if not self.strings:
            return False
        text = self.tokenizer.decode(ids[-self.tail:])
        return any(s in text for s in self.strings)


def generate_text(model: VLM, tokenizer: Tokenizer, prompts: list[list[int]],
                  pixel_values: torch.Tensor | None = None, sampling: Sampling = Sampling(),
                  generator: Generators = None) -> list[str]:
    """Decoded continuations, cut before the first stop string."""
    texts = []
    for ids in generate(model, tokenizer, prompts, pixel_values, sampling, generator):
        text = tokenizer.decode(ids)
        for s in sampling.stop_strings:
            text = text.split(s)[0]
        texts.append(text.strip())
    return texts


def answer(model: VLM, tokenizer: Tokenizer, processor: ImageProcessor, template: Template,
           questions: list[tuple[Image.Image | str | Path | None, str]],
           sampling: Sampling = Sampling(max_new_tokens=64), batch_size: int = 32, progress: bool = False,
           generator: Generators = None, by_length: bool = True) -> list[str]:
    """One answer per (image, image file or None; question), in the order given, generated in batches with the
    chat template. With `by_length` the batches are formed longest prompt first, so that a batch's prompts are of
    similar lengths and little of it is padding; the answers are the same (a padded prompt generates what it
    would alone). Image files are read batch by batch, so a benchmark of thousands of photos never sits in
    memory at once. `generator` may hold one generator per question."""
    sampling = replace(sampling, stop_strings=sampling.stop_strings or (template.stop_str,))
    prompts = [tokenize_conversation(tokenizer, template, [{"from": "human", "value": question}],
                                     model.cfg.num_image_tokens(), generation_prompt=True)[0]
               for _, question in questions]
    order = sorted(range(len(questions)), key=lambda i: -len(prompts[i])) if by_length else list(range(len(questions)))
    answers = [""] * len(questions)
    for start in tqdm(range(0, len(questions), batch_size), disable=not progress, desc="answering"):
        chunk = order[start:start + batch_size]
        images = [processor(load_image(image) if isinstance(image, (str, Path)) else image)
                  for image, _ in (questions[i] for i in chunk) if image is not None]
        pixels = torch.stack(images).to(model.language_model.embed_tokens.weight.device) if images else None
        generators = [generator[i] for i in chunk] if isinstance(generator, list) else generator
        texts = generate_text(model, tokenizer, [prompts[i] for i in chunk], pixels, sampling, generators)
        for i, text in zip(chunk, texts):
            answers[i] = text
    return answers
