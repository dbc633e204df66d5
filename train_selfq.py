"""SQ-LLaVA (Sun et al., "SQ-LLaVA: Self-Questioning for Large Vision-Language Assistant", ECCV 2024): visual
instruction tuning with self-questioning, a prototype extractor and LoRA on both towers.

The model learns to ask questions about an image as well as to answer them: L = L_sq + L_ans, one token-mean
cross-entropy over the visual user's questions and the assistant's answers (nanovlm/selfq.py).

Recipe: the `v1_sq` template, each later human turn a visual-user (VUSER) question with probability
`sq_ratio`, whose tokens carry loss like the answers; the prototype extractor (nanovlm/prototypes.py) before
the MLP projector, both trained fully; LoRA on the LLM's q,k,v,o,gate,up,down and on every ViT layer's
q,k,v,out_proj,fc1,fc2; everything else frozen; cosine decay after 3% warmup, no weight decay. It continues
SQ-LLaVA's stage 1 (`train_align.py --prototypes K`, out/PRESET/align-prototypes), which trained the extractor
with the projector; from a stage-1 checkpoint without one (LLaVA's, out/PRESET/align) it adds a new extractor
and says so. The finished model answers with `vicuna_v1`, as every official evaluation script prompts
(`--conv-mode v1`); `eval.py --self_questions N` opens the `v1_sq` visual-user turn.

The numbers of the pretrained presets are those of the paper's 7B run on LLaVA-665K (heliossun/SQ-LLaVA):
- sq_ratio 0.3; ViT LoRA r32 / alpha 64 at lr 2e-5; LLM LoRA r128 / alpha 256 at lr 2e-4; projector and
  extractor at lr 2e-5 (mm_projector_lr); one epoch: `sophon_lora_665k_clu_sq.sh` at commit 56f5ec9, the
  7B LLaVA-665K script, removed from the repository before its release (a later version of that file ran
  sq_ratio 0.5 with ViT LoRA r64 / alpha 128, and the released 13B ShareGPT4V script,
  scripts/finetune_lora_clu_sq.sh, uses 0.5, r64 / alpha 128 and 1.2 epochs; which 7B run gave the paper's
  table is not recorded, and this one is kept whole rather than mixed with the others);
- LoRA dropout 0.05 on the LLM (train.py's lora_dropout) and 0.2 on the ViT (fixed in train.py);
- 256 centres, 2 iterations (sqllava/model/multimodal_projector/builder.py);
- global batch 128, max length 2048, lr 2e-4 (the README's fine-tuning hyperparameter table).
The paper's ablation switches one part off: --no-selfq (the preset's chat template, vicuna_v1, in training
too, every turn a USER turn), --no-prototypes (continues LLaVA's stage 1, out/PRESET/align), --no-vit-lora;
all three give LLaVA-1.5's LoRA recipe.

Where this departs from the official code, and why:
- The ViT LoRA really trains: the official vision tower runs under no_grad, so its adapters never get a
  gradient (tests/test_selfq.py checks that every ViT adapter changes after one step).
- The visual-user draw is seeded per record and epoch, so a run can be repeated; the official one is not.
- The model is written with the adapters merged (llava-hf layout plus the extractor's weights), and under
  adapter/ as the official code keeps them apart: the LLM's LoRA with the projector and the extractor as
  PEFT's modules_to_save (adapter/language_model/), the ViT's LoRA with its own dropout
  (adapter/vision_tower/); `VLM.load_adapter` rebuilds the model from the stage-1 checkpoint and them.

On the tiny preset it trains on the shapes world's QA and then prints the shapes evaluation; --eval_every N
logs the accuracy on --eval_questions eval questions every N steps (a curve, `python -m data.shapes_eval
--curve`).

    python train_align.py --prototypes 8 && python train_selfq.py       # tiny preset, CPU is fine
    torchrun --nproc_per_node=8 train_selfq.py --preset llava15-7b --data llava_v1_5_mix665k.json
"""

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from data import shapes_eval
from nanovlm.config import ranged
from nanovlm.data import DataSource
from nanovlm.lora import add_lora
from nanovlm.presets import PRESETS
from nanovlm.recipe import SHAPES_DIR, Run, dataset, fit, parse, stage_dir, start_from
from nanovlm.train import TrainConfig
from nanovlm.vlm import VLM

LLM_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VIT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
SELFQ_TEMPLATE = "v1_sq"  # what SQ-LLaVA trains with
ANSWER_TEMPLATE = "vicuna_v1"  # what it is evaluated with: every official eval script passes --conv-mode v1
LORA = (">= 1", "> 0", "[0, 1)")  # the allowed r, alpha and dropout of an adapter


@dataclass
class SelfQ:
    no_selfq: bool = False  # ablation: the chat template, every human turn a USER turn, no question carries loss
    no_prototypes: bool = False  # ablation: no prototype extractor (continues LLaVA's stage 1, out/PRESET/align)
    no_vit_lora: bool = False  # ablation: no LoRA on the vision tower, which stays frozen
    sq_ratio: float = ranged(0.3, "[0, 1]")  # probability that a human turn after the first becomes a VUSER turn
    num_prototypes: int = ranged(256, ">= 1")  # centres of a new prototype extractor (a stage-1 one keeps its own)
    llm_lora: tuple[int, float, float] = ranged((128, 256.0, 0.05), LORA)  # r, alpha, dropout of the LLM's adapters
    vit_lora: tuple[int, float, float] = ranged((32, 64.0, 0.2), LORA)  # r, alpha, dropout of the ViT's adapters


# The paper's 7B recipe (module docstring), the same for both pretrained presets.
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


def default_init(preset: str, sq: SelfQ) -> str:
    """SQ-LLaVA's stage 1 where it exists and the extractor is wanted, else LLaVA's."""
    with_extractor = stage_dir(preset, "align-prototypes")
    return with_extractor if not sq.no_prototypes and Path(with_extractor).is_dir() else stage_dir(preset, "align")


def prepare_extractor(run: Run, model: VLM, init: str) -> None:
    """Continue the stage-1 checkpoint's prototype extractor, add a new one where it has none, or (for
    --no-prototypes) check that it has none."""
    sq: SelfQ = run.method
    if sq.no_prototypes:
        if model.prototype_extractor is not None:
            raise SystemExit(f"{init} has a prototype extractor; --no-prototypes continues a stage-1 checkpoint "
                             f"without one (train_align.py without --prototypes)")
        return
    if model.prototype_extractor is not None:
        message = f"prototype extractor: continued from {init} ({model.cfg.prototypes} centres)"
    else:
        model.add_prototype_extractor(sq.num_prototypes)
        message = (f"warning: {init} has no prototype extractor; adding a new one with {sq.num_prototypes} "
                   f"centres (SQ-LLaVA trains it at stage 1: train_align.py --prototypes {sq.num_prototypes})")
    if run.env.main:
        print(message)


def main(argv: list[str] | None = None) -> None:
    run = parse(__doc__.splitlines()[0], RECIPES, argv, METHODS, stage="selfq")
    sq: SelfQ = run.method
    init = run.init or default_init(run.preset, sq)
    model, tokenizer, processor = start_from(run, init)
    torch.manual_seed(run.cfg.seed)  # the adapters' and a new extractor's initialisation
    add_lora(model.language_model, LLM_TARGETS, *sq.llm_lora)
    lr = dict(run.cfg.lr)
    if sq.no_vit_lora:
        lr.pop("vision_lora", None)
    else:
        add_lora(model.vision_tower, VIT_TARGETS, *sq.vit_lora)
    if sq.no_prototypes:
        lr.pop("prototypes", None)
    prepare_extractor(run, model, init)
    run.cfg.lr = lr
    # --no-selfq trains and answers with the stage-1 checkpoint's chat template (the preset's), as LLaVA does
    train_template = model.cfg.template if sq.no_selfq else SELFQ_TEMPLATE
    model.cfg.template = model.cfg.template if sq.no_selfq else ANSWER_TEMPLATE
    is_shapes = PRESETS[run.preset].vision is None and not run.data
    if is_shapes:
        run.data = [DataSource(SHAPES_DIR / "instruct.json")]
    data = dataset(run, model, tokenizer, processor, train_template, sq_ratio=0.0 if sq.no_selfq else sq.sq_ratio)
    fit(run, model, tokenizer, processor, data, evaluate=shapes_eval.tracker_for(run, model, tokenizer, processor))
    if run.env.main:
        model.save_adapter(Path(run.cfg.out_dir) / "adapter", init)
        if is_shapes:
            shapes_eval.report(model, tokenizer, processor, SHAPES_DIR, Path(run.cfg.out_dir))


if __name__ == "__main__":
    main(sys.argv[1:])
