"""Stage 1 of LLaVA (Liu et al., NeurIPS 2023): align image features with the LLM's word embeddings.

The model learns to caption: L = -(1/|C|) sum_{t in C} log p(x_t | x_<t, image), C the caption's tokens.
Recipe (LLaVA-1.5, Liu et al., CVPR 2024, scripts/v1_5/pretrain.sh): the `plain` template (the image, then its
caption), loss on the caption only; only the projector trains, at lr 1e-3, global batch 256, one epoch, cosine
decay after 3% warmup, no weight decay. The tiny preset has no pretrained towers, so there every part trains,
on the shapes world's captions (generated on first use).

    python train_align.py                                    # tiny preset, shapes world, CPU is fine
    torchrun --nproc_per_node=8 train_align.py --preset llava15-7b --data blip_laion_cc_sbu_558k.json
"""

import json
import sys
from pathlib import Path

from data import shapes
from nanovlm.data import DataSource
from nanovlm.presets import PRESETS, pretrained_model, tiny_model
from nanovlm.recipe import SHAPES_DIR, dataset, fit, model_dtype, parse
from nanovlm.templates import get_template, render
from nanovlm.train import TrainConfig

# LLaVA-1.5's stage 1 (scripts/v1_5/pretrain.sh), the same for every pretrained preset.
PRETRAINED = TrainConfig(global_batch_size=256, micro_batch_size=32, lr={"projector": 1e-3}, max_length=2048,
                         num_workers=4)
# From scratch every part trains (every tower: "vision"); 1e-3 and above stall on the shapes world, 5e-4 learns
# fastest. The tiny preset's SPHINX variants share it, so that they compare at equal steps.
TINY = TrainConfig(global_batch_size=32, micro_batch_size=32, epochs=2,
                   lr={"vision": 5e-4, "projector": 5e-4, "llm": 5e-4}, max_length=512)
RECIPES = {"llava15-7b": PRETRAINED, "small": PRETRAINED, "sphinx-7b": PRETRAINED,
           **{name: TINY for name, preset in PRESETS.items() if preset.vision is None}}


def shapes_corpus(world: Path, chat_template: str) -> list[str]:
    """The text the tiny tokenizer learns from: every training conversation as the model will read it."""
    captions = json.loads((world / "captions.json").read_text())
    instruct = json.loads((world / "instruct.json").read_text())
    return ([render(get_template("plain"), r["conversations"])[0] for r in captions]
            + [render(get_template(chat_template), r["conversations"])[0] for r in instruct])


def main(argv: list[str] | None = None) -> None:
    run = parse(__doc__.splitlines()[0], RECIPES, argv, stage="align")
    preset = PRESETS[run.preset]
    if preset.vision is None:
        if run.env.main:
            shapes.generate(SHAPES_DIR)
        run.env.barrier()
        run.data = run.data or [DataSource(SHAPES_DIR / "captions.json")]
        model, tokenizer, processor = tiny_model(shapes_corpus(SHAPES_DIR, preset.template), run.cfg.seed, preset)
    else:
        model, tokenizer, processor = pretrained_model(preset, model_dtype(run), run.env.device)
    fit(run, model, tokenizer, processor, dataset(run, model, tokenizer, processor, "plain"))


if __name__ == "__main__":
    main(sys.argv[1:])
