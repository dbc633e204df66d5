"""SQ-LLaVA (Sun et al., "SQ-LLaVA: Self-Questioning for Large Vision-Language Assistant", ECCV 2024): visual
instruction tuning with self-questioning, a prototype extractor and LoRA on both towers.

The model learns to ask questions about an image as well as to answer them: L = L_sq + L_ans, one token-mean
cross-entropy over the visual user's questions and the assistant's answers (nanovlm/selfq.py).

Recipe (the released 7B scripts): the `v1_sq` template, each later human turn a visual-user (VUSER) question
with probability 0.5, whose tokens carry loss like the answers (nanovlm/selfq.py); the prototype extractor
(256 centres, nanovlm/prototypes.py) before the MLP projector, both trained fully at lr 2e-5; LoRA r128 /
alpha 256 / dropout 0.05 on the LLM's q,k,v,o,gate,up,down at lr 2e-4; LoRA r32 / alpha 64 / dropout 0.2 on
every ViT layer's q,k,v,out_proj,fc1,fc2 at lr 2e-5; everything else frozen; global batch 128, one epoch,
cosine decay after 3% warmup. It continues the stage-1 checkpoint (--init, by default train_align.py's
output). The paper's ablation switches one part off: --no-selfq (every turn a USER turn), --no-prototypes,
--no-vit-lora; all three give LLaVA-1.5's LoRA recipe.

Where this departs from the official code, and why:
- The ViT LoRA really trains: the official vision tower runs under no_grad, so its adapters never get a
  gradient (tests/test_selfq.py checks that every ViT adapter changes after one step).
- The visual-user draw is seeded per record and epoch, so a run can be repeated; the official one is not.
- Stage 1 is LLaVA's (train_align.py) and the extractor starts at stage 2, newly initialised; the official
  stage 1 trains it with the projector (nanovlm/prototypes.py says why).
- sq_ratio 0.5 is the released scripts' current value; the paper's 7B run on LLaVA-665K used 0.3 (with this
  ViT LoRA, r32 / alpha 64; the current 13B script pairs 0.5 with r64 / alpha 128).
- The finished model keeps the `v1_sq` template, so eval.py prompts with its system prompt; the official
  evaluation scripts prompt with `vicuna_v1`.
- The model is written with the adapters merged (llava-hf layout plus the extractor's weights), and both
  towers' adapters under adapter/ in PEFT's layout; the official code saves the LLM adapter, the ViT adapter
  and the other trained weights apart.

On the tiny preset it trains on the shapes world's QA and then prints the shapes evaluation.

    python train_selfq.py                                    # tiny preset, after python train_align.py
    torchrun --nproc_per_node=8 train_selfq.py --preset llava15-7b --data llava_v1_5_mix665k.json
"""

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from data import shapes_eval
from nanovlm.data import DataSource
from nanovlm.lora import add_lora, save_adapter
from nanovlm.presets import PRESETS
from nanovlm.recipe import SHAPES_DIR, dataset, fit, parse, stage_dir, start_from
from nanovlm.train import TrainConfig
from nanovlm.vlm import PEFT_RENAMES

LLM_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VIT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


@dataclass
class SelfQ:
    no_selfq: bool = False  # ablation: every human turn stays a USER turn, no VUSER question carries loss
    no_prototypes: bool = False  # ablation: no prototype extractor before the projector
    no_vit_lora: bool = False  # ablation: no LoRA on the vision tower, which stays frozen
    sq_ratio: float = 0.5  # probability that a human turn after the first becomes a VUSER turn
    num_prototypes: int = 256  # the prototype extractor's K centres
    llm_lora: tuple[int, float, float] = (128, 256.0, 0.05)  # r, alpha, dropout of the LLM's adapters
    vit_lora: tuple[int, float, float] = (32, 64.0, 0.2)  # r, alpha, dropout of the vision tower's adapters


# The released 7B scripts' recipe, the same for both pretrained presets.
PRETRAINED = TrainConfig(global_batch_size=128, micro_batch_size=16, max_length=2048, num_workers=4,
                         lr={"llm_lora": 2e-4, "projector": 2e-5, "prototypes": 2e-5, "vision_lora": 2e-5})
RECIPES = {
    "llava15-7b": PRETRAINED,
    "small": PRETRAINED,
    # The tiny preset's schedule (train_sft.py); its adapters learn faster than its full weights, as LoRA recipes
    # do (LLaVA's: 10x): at 5e-4 the model still answered with captions after 150 steps (0-0.2%), at 2e-3
    # it reached 46% after 200.
    "tiny": TrainConfig(global_batch_size=32, micro_batch_size=32, epochs=2,
                        lr={"llm_lora": 2e-3, "vision_lora": 2e-3, "projector": 5e-4, "prototypes": 5e-4},
                        max_length=512),
}
# The tiny preset keeps the paper's proportions: 8 centres for 16 patches (256 for 576), and LoRA ranks that
# are a small fraction of its 128-wide layers as r128 is of Vicuna's 4096 (r128 there would be full rank).
METHODS = {"llava15-7b": SelfQ(), "small": SelfQ(),
           "tiny": SelfQ(num_prototypes=8, llm_lora=(8, 16.0, 0.05), vit_lora=(4, 8.0, 0.2))}


def main(argv: list[str] | None = None) -> None:
    run = parse(__doc__.splitlines()[0], RECIPES, argv, METHODS, stage="selfq")
    sq: SelfQ = run.method
    init = run.init or stage_dir(run.preset, "align")
    model, tokenizer, processor = start_from(run, init)
    torch.manual_seed(run.cfg.seed)  # the adapters' and the extractor's initialisation
    add_lora(model.language_model, LLM_TARGETS, *sq.llm_lora)
    lr = dict(run.cfg.lr)
    if sq.no_vit_lora:
        lr.pop("vision_lora", None)
    else:
        add_lora(model.vision_tower, VIT_TARGETS, *sq.vit_lora)
    if sq.no_prototypes:
        lr.pop("prototypes", None)
    else:
        model.add_prototype_extractor(sq.num_prototypes)
    run.cfg.lr = lr
    model.cfg.template = "v1_sq"
    is_shapes = PRESETS[run.preset].vision is None and not run.data
    if is_shapes:
        run.data = [DataSource(SHAPES_DIR / "instruct.json")]
    data = dataset(run, model, tokenizer, processor, "v1_sq", sq_ratio=0.0 if sq.no_selfq else sq.sq_ratio)
    fit(run, model, tokenizer, processor, data)
    if run.env.main:
        save_adapter(model, Path(run.cfg.out_dir) / "adapter", PEFT_RENAMES, init)
        if is_shapes:
            shapes_eval.report(model, tokenizer, processor, SHAPES_DIR, Path(run.cfg.out_dir))


if __name__ == "__main__":
    main(sys.argv[1:])
