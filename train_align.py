"""Stage 1 of LLaVA (Liu et al., NeurIPS 2023): align image features with the LLM's word embeddings.

The model learns to caption: L = -(1/|C|) sum_{t in C} log p(x_t | x_<t, image), C the caption's tokens.
Recipe (LLaVA-1.5, Liu et al., CVPR 2024, scripts/v1_5/pretrain.sh): the `plain` template (the image, then its
caption), loss on the caption only; only the projector trains, at lr 1e-3, global batch 256, one epoch, cosine
decay after 3% warmup, no weight decay. The tiny preset has no pretrained towers, so there every part trains,
on the shapes world's captions (generated on first use). --init DIR starts from that checkpoint instead of a
new model.

SQ-LLaVA's stage 1 (Sun et al., ECCV 2024; heliossun/SQ-LLaVA, scripts/pretrain_clu.sh) is the same with
`--prototypes K`: the prototype extractor (nanovlm/prototypes.py) sits before the projector and trains with
it at the projector's learning rate (1e-3: the released script and the README's hyperparameter table; the
stage 1 that the 7B LLaVA-665K run of train_selfq.py continued was made at 2e-4, pretrain_clu.sh at commit
56f5ec9), and the model goes to out/PRESET/align-prototypes, which train_selfq.py continues. The official
script also switches on the ViT LoRA, which gets no gradient there (its vision tower runs under no_grad) and
is left out here.

    python train_align.py                                    # tiny preset, shapes world, CPU is fine
    python train_align.py --prototypes 8                     # SQ-LLaVA's stage 1 on the tiny preset
    torchrun --nproc_per_node=8 train_align.py --preset llava15-7b --data blip_laion_cc_sbu_558k.json
"""

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from data import shapes
from nanovlm.config import ranged
from nanovlm.data import DataSource
from nanovlm.presets import PRESETS, pretrained_model, tiny_model
from nanovlm.prototypes import KEY_NORMS
from nanovlm.recipe import SHAPES_DIR, dataset, fit, model_dtype, parse, start_from
from nanovlm.templates import get_template, render
from nanovlm.train import TrainConfig

# LLaVA-1.5's stage 1 (scripts/v1_5/pretrain.sh), the same for every pretrained preset.
PRETRAINED = TrainConfig(global_batch_size=256, micro_batch_size=32, lr={"projector": 1e-3}, max_length=2048,
                         num_workers=4)
# From scratch every part trains (every tower: "vision"); 1e-3 and above stall on the shapes world, 5e-4 learns
# fastest. Steps of 16 captions: in steps of 32 at the same cost, a seed's captions could stay half learnt (final
# loss 0.39 against 0.13: results/default_run.md, round 12). A warmup of 10% (200 steps): with LLaVA's 3% a seed's
# loss jumped at step ~400 and its captions stayed half learnt (0.33 against 0.05; round 14). The tiny preset's
# SPHINX variants share it, so that they compare at equal steps.
TINY = TrainConfig(global_batch_size=16, micro_batch_size=16, epochs=2, warmup_ratio=0.1,
                   lr={"vision": 5e-4, "projector": 5e-4, "llm": 5e-4}, max_length=512)
RECIPES = {"llava15-7b": PRETRAINED, "small": PRETRAINED, "sphinx-7b": PRETRAINED,
           **{name: TINY for name, preset in PRESETS.items() if preset.vision is None}}


@dataclass
class Align:
    prototypes: int = ranged(0, ">= 0")  # SQ-LLaVA's stage 1: a prototype extractor of this many centres (7B: 256)
    prototype_norm: str = "feature"  # axis along which the extractor normalises v(x): feature, or token (official)


METHODS = {preset: Align() for preset in RECIPES}


def stage(settings: Align) -> str:
    """LLaVA's stage 1 writes out/PRESET/align, SQ-LLaVA's (with the extractor) out/PRESET/align-prototypes."""
    return "align-prototypes" if settings.prototypes else "align"


def shapes_corpus(world: Path, chat_template: str) -> list[str]:
    """The text the tiny tokenizer learns from: every training conversation as the model will read it."""
    captions = json.loads((world / "captions.json").read_text())
    instruct = json.loads((world / "instruct.json").read_text())
    return ([render(get_template("plain"), r["conversations"])[0] for r in captions]
            + [render(get_template(chat_template), r["conversations"])[0] for r in instruct])


def main(argv: list[str] | None = None) -> None:
    run = parse(__doc__.splitlines()[0], RECIPES, argv, METHODS, stage=stage)
    settings: Align = run.method
    if settings.prototype_norm not in KEY_NORMS:
        raise SystemExit(f"--prototype_norm must be one of {KEY_NORMS}, got {settings.prototype_norm!r}")
    preset = PRESETS[run.preset]
    if preset.vision is None and not (run.data and run.init):  # the tiny preset's default data, or its tokenizer's
        if run.env.main:
            shapes.generate(SHAPES_DIR)
        run.env.barrier()
        run.data = run.data or [DataSource(SHAPES_DIR / "captions.json")]
    if run.init:
        model, tokenizer, processor = start_from(run, None)
    elif preset.vision is None:
        model, tokenizer, processor = tiny_model(shapes_corpus(SHAPES_DIR, preset.template), run.cfg.seed, preset)
    else:
        model, tokenizer, processor = pretrained_model(preset, model_dtype(run), run.env.device)
    if settings.prototypes:
        torch.manual_seed(run.cfg.seed)
        model.add_prototype_extractor(settings.prototypes, settings.prototype_norm)
        if "projector" in run.cfg.lr:
            run.cfg.lr = {"prototypes": run.cfg.lr["projector"]} | run.cfg.lr
    fit(run, model, tokenizer, processor, dataset(run, model, tokenizer, processor, "plain"))


if __name__ == "__main__":
    main(sys.argv[1:])
