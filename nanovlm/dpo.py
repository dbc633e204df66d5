"""Direct preference optimisation (Rafailov et al., NeurIPS 2023) with a likelihood term on the preferred answer,
the objective of STIC's first stage (Deng et al., 2024):

    L = -log sigmoid(beta * [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))])
        - alpha * log pi(y_w|x),                                      beta = 0.1, alpha = 1/1024

x is the image and the prompt, y_w the preferred and y_l the dispreferred answer. log pi(y|x) is a *sum* over the
answer's tokens (its text and the end-of-turn token) of their log-probabilities under the model; system prompt,
question and image tokens carry none. The reference `ref` is the same model with its LoRA adapters switched off
(`lora.adapters_disabled`), never a second copy in memory: it is the starting model as long as nothing but the
adapters trains (train_stic.py keeps the projector frozen in this stage for that reason). Chosen and rejected
answers go through the model in one batch, chosen rows first.

The rewards DPO users watch are logged every step: r_w = beta (log pi(y_w|x) - log ref(y_w|x)), r_l likewise,
their margin r_w - r_l and the accuracy [r_w > r_l]. (STIC's released trainer scores the rejected side with the
model's own most likely tokens instead of y_l; here both terms are the log-probabilities of the answers'
own tokens, which tests/test_stic.py checks against a position-by-position computation.)

Preference data is JSONL, one pair a line: {"image": path relative to the image folder, "prompt": the question
x, "chosen": y_w, "rejected": y_l, ...}; the image goes in front of the prompt as `<image>\\n`. Every line, and
every image (decoded up front, nanovlm/image_check.py), is checked when the dataset is built; a bad one stops the
run with its file and line, or with `skip_bad` is dropped and counted. A pair whose chosen or rejected answer
max_length cuts away entirely is dropped as it loads, and counted.
"""

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from .data import BadRecord, check_image_path, collate, has_targets, truncate
from .image import ImageProcessor, load_image
from .image_check import check_images
from .lora import adapters_disabled
from .templates import IGNORE_INDEX, Template, tokenize_conversation
from .tokenizer import IMAGE_PLACEHOLDER, Tokenizer
from .train import Objective
from .vlm import VLM

BETA = 0.1
ALPHA = 1 / 1024
PAIR_FIELDS = ("image", "prompt", "chosen", "rejected")


def sequence_logps(model: VLM, input_ids: torch.Tensor, labels: torch.Tensor,
                   pixel_values: torch.Tensor | None) -> torch.Tensor:
    """(B,) log pi(y|x): the sum of each row's log-probabilities at its labelled positions.

    VLM.loss with reduction="none" gives the cross-entropy of every labelled position in row-major order; they
    are added up per row."""
    token_logps = -model.loss(input_ids, labels, pixel_values, reduction="none")
    rows = (labels[:, 1:] != IGNORE_INDEX).nonzero()[:, 0]
    return token_logps.new_zeros(len(input_ids)).index_add(0, rows, token_logps)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float = BETA,
             alpha: float = ALPHA) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair loss of the module docstring's equation, and the chosen and rejected rewards (detached)."""
    chosen_rewards = beta * (policy_chosen - reference_chosen)
    rejected_rewards = beta * (policy_rejected - reference_rejected)
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards) - alpha * policy_chosen
    return loss, chosen_rewards.detach(), rejected_rewards.detach()


class DPOObjective(Objective):
    """DPO + NLL for the shared training loop: a batch holds n chosen rows, then their n rejected rows; the
    targets are the n pairs."""

    def __init__(self, model: VLM, beta: float = BETA, alpha: float = ALPHA):
        super().__init__(model)
        self.beta, self.alpha = beta, alpha
        self.last: dict[str, float] = {}

    def count(self, batch: dict) -> int:
        return len(batch["input_ids"]) // 2

    def forward(self, batch: dict) -> torch.Tensor:
        ids, labels, pixels = batch["input_ids"], batch["labels"], batch["pixel_values"]
        n = self.count(batch)
        policy = sequence_logps(self.model, ids, labels, pixels)
        with torch.no_grad(), adapters_disabled(self.model):
            reference = sequence_logps(self.model, ids, labels, pixels)
        loss, chosen, rejected = dpo_loss(policy[:n], policy[n:], reference[:n], reference[n:], self.beta, self.alpha)
        self.last = {"reward_margin": (chosen - rejected).sum().item(), "chosen_reward": chosen.sum().item(),
                     "rejected_reward": rejected.sum().item(), "reward_accuracy": (chosen > rejected).sum().item(),
                     "chosen_logp": policy[:n].sum().item(), "rejected_logp": policy[n:].sum().item()}
        return loss.sum()

    def metrics(self) -> dict[str, float]:
        return self.last


def check_pair(line: str, image_folder: Path, absolute_allowed: bool = False) -> dict:
    """The pair on one JSONL line; BadRecord says what is wrong with it."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise BadRecord(f"not valid JSON: {e}") from None
    if not isinstance(record, dict):
        raise BadRecord(f"expected a JSON object, got {type(record).__name__}")
    missing = [name for name in PAIR_FIELDS if name not in record]
    if missing:
        raise BadRecord(f"missing field(s) {', '.join(missing)}")
    wrong = [name for name in PAIR_FIELDS if not isinstance(record[name], str)]
    if wrong:
        raise BadRecord(f"field(s) {', '.join(wrong)} must be strings")
    if any(IMAGE_PLACEHOLDER in record[name] for name in ("chosen", "rejected")):
        raise BadRecord(f"an answer contains {IMAGE_PLACEHOLDER}")
    check_image_path(record["image"], absolute_allowed)
    if not (image_folder / record["image"]).is_file():
        raise BadRecord(f"image {image_folder / record['image']} does not exist")
    return record


class PreferenceDataset(torch.utils.data.Dataset):
    """Preference pairs from a JSONL file, each item the chosen and the rejected conversation tokenised with the
    chat template; `collate` stacks a micro-batch's chosen rows, then its rejected rows."""

    def __init__(self, path: Path, image_folder: Path, tokenizer: Tokenizer, template: Template,
                 processor: ImageProcessor, num_image_tokens: int, max_length: int, skip_bad: bool = False,
                 allow_absolute_image_paths: bool = False):
        self.path, self.image_folder = Path(path), Path(image_folder)
        self.tokenizer, self.template = tokenizer, template
        self.processor, self.num_image_tokens, self.max_length = processor, num_image_tokens, max_length
        self.skip_bad, self.skipped = skip_bad, {}
        self.pairs: list[tuple[dict, str]] = []  # record, where it came from
        if not self.path.is_file():
            raise FileNotFoundError(f"preference file not found: {self.path}")
        for number, line in enumerate(self.path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                self.pairs.append((check_pair(line, self.image_folder, allow_absolute_image_paths),
                                   f"{self.path}:{number}"))
            except BadRecord as e:
                self.refuse(f"{self.path}:{number}: {e}")
        bad = check_images(self.image_folder, [record["image"] for record, _ in self.pairs])
        for record, where in self.pairs:
            if record["image"] in bad:
                self.refuse(f"{where}: image {self.image_folder / record['image']}: {bad[record['image']]}")
        self.pairs = [(record, where) for record, where in self.pairs if record["image"] not in bad]
        if not self.pairs:
            raise ValueError(f"{self.path}: no preference pairs")

    def refuse(self, error: str) -> None:
        if not self.skip_bad:
            raise BadRecord(error)
        self.skipped[str(self.path)] = self.skipped.get(str(self.path), 0) + 1

    def __len__(self) -> int:
        return len(self.pairs)

    def set_epoch(self, epoch: int) -> None:
        pass  # nothing is drawn per epoch

    def length(self, index: int) -> int:
        record = self.pairs[index][0]
        return len(record["chosen"].split()) + len(record["rejected"].split()) + 2 * self.num_image_tokens

    def __getitem__(self, index: int) -> dict | None:
        record, where = self.pairs[index]
        try:
            pixels = self.processor(load_image(self.image_folder / record["image"]))[None]
        except (OSError, ValueError) as e:
            if self.skip_bad:
                return None  # counted by collate
            raise BadRecord(f"{where}: {e}") from None
        prompt = record["prompt"]
        question = prompt if IMAGE_PLACEHOLDER in prompt else f"{IMAGE_PLACEHOLDER}\n{prompt}"
        pair = {}
        for side in ("chosen", "rejected"):
            conversation = [{"from": "human", "value": question}, {"from": "gpt", "value": record[side]}]
            ids, labels = tokenize_conversation(self.tokenizer, self.template, conversation, self.num_image_tokens)
            pair[side] = truncate(ids, labels, pixels, self.max_length, self.tokenizer.image_token_id,
                                  self.num_image_tokens)
            if not has_targets(pair[side]):
                return None  # its answer was cut away: dropped, counted by collate
        return pair

    def collate(self, samples: list[dict | None], pad_id: int) -> dict:
        pairs = [s for s in samples if s is not None]
        batch = collate([p["chosen"] for p in pairs] + [p["rejected"] for p in pairs], pad_id)
        return batch | {"skipped": len(samples) - len(pairs)}  # no pair at all: one row of padding, count 0
