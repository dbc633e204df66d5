"""Caption ranking: a zero-shot test of fine-grained image-text alignment that needs no instruction tuning.

Each record holds an image, its true caption and corrupted versions of it, one per kind: "replace-TYPE" (one
concept of a type replaced by another frequent one) and "swap-TYPE" (two concepts of a type traded), made by
ICCC's corruptions (nanovlm/iccc.py; data/caption_ranking.py builds the file). The model scores every caption by
its log-likelihood under the stage-1 `plain` template (the image, then the caption and its newline), summed
over the caption's tokens: log p(caption | image). The sum, not the per-token mean, because the sum is the
probability of the whole caption, which is what "the model prefers this caption" means; a corruption changes
one or two words, so the candidates' lengths differ by a token or two, and a per-token mean would reward a
candidate for extra easy tokens (a replacement split into more pieces) rather than for fitting the image.

The accuracy of a kind is the share of its records whose true caption scores strictly higher than the
corruption of that kind; `replace` and `swap` pool their kinds, and `all` is the share of records whose true
caption beats every one of its corruptions. JSONL lines: {"id", "image", "caption", "negatives": {kind: caption}}.
"""

from collections import defaultdict

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .benchmarks import Benchmark
from .data import collate
from .image import ImageProcessor, load_image
from .templates import get_template, tokenize_conversation
from .tokenizer import IMAGE_PLACEHOLDER, Tokenizer
from .vlm import VLM


@torch.no_grad()
def caption_logprobs(model: VLM, tokenizer: Tokenizer, pixels: torch.Tensor, captions: list[str]) -> torch.Tensor:
    """(N,) summed log-probabilities of each caption (and its closing newline) given its image, under the
    `plain` template; pixels (N, 3, H, W) holds the image of each caption."""
    template = get_template("plain")
    samples = []
    for caption in captions:
        conversation = [{"from": "human", "value": IMAGE_PLACEHOLDER}, {"from": "gpt", "value": caption}]
        ids, labels = tokenize_conversation(tokenizer, template, conversation, model.cfg.num_image_tokens())
        samples.append({"input_ids": ids, "labels": labels, "pixel_values": None})
    batch = collate(samples, tokenizer.pad_id)
    device = model.language_model.embed_tokens.weight.device
    ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
    hidden = model.hidden(ids, pixels.to(device, model.language_model.embed_tokens.weight.dtype))
    targets = labels[:, 1:]
    keep = targets != -100
    logits = model.language_model.lm_head(hidden[:, :-1][keep])  # only the caption positions, as VLM.loss does
    token_logprobs = -F.cross_entropy(logits.float(), targets[keep], reduction="none")
    rows = keep.nonzero()[:, 0]
    return torch.zeros(len(captions), device=device).index_add_(0, rows, token_logprobs).cpu()


def evaluate(model: VLM, tokenizer: Tokenizer, processor: ImageProcessor, benchmark: Benchmark,
             batch_size: int = 64, progress: bool = True) -> tuple[dict[str, dict], list[dict]]:
    """The accuracy per kind, and every record with each candidate's log-likelihood ("logprobs": {"true": ...,
    kind: ...}). Candidates are scored batch_size at a time; a record's candidates are neighbours, so an image is
    read about once."""
    model.eval()
    records = benchmark.records
    pairs = [(i, kind, caption) for i, r in enumerate(records)
             for kind, caption in [("true", r["caption"]), *r["negatives"].items()]]
    scores: list[dict[str, float]] = [{} for _ in records]
    for start in tqdm(range(0, len(pairs), batch_size), disable=not progress, desc="ranking captions"):
        chunk = pairs[start:start + batch_size]
        images = {i: processor(load_image(benchmark.image(i))) for i in dict.fromkeys(i for i, _, _ in chunk)}
        values = caption_logprobs(model, tokenizer, torch.stack([images[i] for i, _, _ in chunk]),
                                  [caption for _, _, caption in chunk])
        for (i, kind, _), value in zip(chunk, values.tolist()):
            scores[i][kind] = value
    return accuracy(scores), [r | {"logprobs": s} for r, s in zip(records, scores)]


def accuracy(scores: list[dict[str, float]]) -> dict[str, dict]:
    """Per kind (and pooled `replace`, `swap`, and `all`): the share of records whose true caption scores
    strictly above the corruption, with the number of records."""
    wins = defaultdict(list)
    for record in scores:
        kinds = [k for k in record if k != "true"]
        for kind in kinds:
            won = record["true"] > record[kind]
            wins[kind].append(won)
            wins[kind.split("-")[0]].append(won)
        if kinds:
            wins["all"].append(all(record["true"] > record[k] for k in kinds))
    order = sorted(k for k in wins if "-" in k) + [k for k in ("replace", "swap", "all") if k in wins]
    return {kind: {"accuracy": sum(wins[kind]) / len(wins[kind]), "n": len(wins[kind])} for kind in order}


def format_table(scores: dict[str, dict]) -> str:
    rows = ["| corruption | true caption ranked higher (%) | n |", "|---|---:|---:|"]
    rows += [f"| {kind} | {100 * s['accuracy']:.1f} | {s['n']} |" for kind, s in scores.items()]
    return "\n".join(rows)
