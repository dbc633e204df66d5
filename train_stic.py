"""STIC (Deng et al., "Enhancing Large Vision Language Models with Self-Training on Image Comprehension", 2024):
self-training on image comprehension, from unlabeled images only.

The model writes a preferred and a dispreferred description of each unlabeled image and learns the difference
with DPO plus an NLL term on the preferred one (nanovlm/dpo.py):
    L = -log sigmoid(beta [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))]) - alpha log pi(y_w|x)
then learns to answer with its own description of the image before the question (nanovlm/stic.py states both).
Three steps, all by default, each runnable alone with --step and resumable:
1. preferences: the starting model describes every unlabeled image twice into OUT/preferences.jsonl (image,
   prompt, chosen, rejected, corruption). Under torchrun each rank describes its own batches; a rerun skips the
   images already done.
2. dpo: LoRA adapters learn the pairs through the shared training loop (checkpoints and --resume as every
   recipe); the adapter-disabled model is the reference. Writes OUT/dpo (merged model, adapter/).
3. describe: the DPO'd model describes the image of each record of a slice of the instruction data into
   OUT/descriptions.jsonl; OUT/described.json holds those records with the description before the question, on
   which the same adapters continue with the ordinary SFT loss. The finished model is OUT (llava-hf layout,
   adapters merged) and OUT/adapter (PEFT layout). A finished step (its adapter/ written) is skipped on a rerun.

Recipe (the paper and yihedeng9/STIC's released scripts dpo_finetune.sh, finetune_lora.sh, generate_pref.py):
LoRA r 128, alpha 256 on every linear layer of the LLM (q,k,v,o,gate,up,down; not lm_head). DPO: beta 0.1,
alpha 1/1024 on summed log-probabilities, lr 1e-7, global batch 8, one epoch, cosine after 3% warmup. Stage 2:
5k image records of the instruction data, the same adapters (dropout 0.05) and the projector at lr 2e-5, global
batch 32, max length 2048, one epoch, cosine after 3% warmup. Generation: temperature 0.2, up to 1024 new
tokens. The `llava15-7b` and `small` presets keep these released values; the `tiny` preset has its own (its
entries below say why): a model trained from scratch in minutes, which lr 1e-7 would leave unchanged.

Where this departs from the official code, and why:
- The projector stays frozen during DPO (the released script trains it at 2e-5): with adapters disabled the
  reference would otherwise see the updated projector and no longer be the starting model.
- LoRA dropout is 0 during DPO: the released DPO trainer switches dropout off, so that is what it trained with.
- The dispreferred description of a "corrupted" image really describes the corrupted image, and every DPO,
  description and describe-and-respond prompt holds the image; the rejected term scores the rejected answer's
  own tokens (nanovlm/stic.py and nanovlm/dpo.py say how the released code differs; tests/test_stic.py checks).
- One chat template, the model's own, for generation, training and describe-and-respond (the released code
  mixes mistral_instruct and vicuna_v1).
- Stage 2 describes only records with an image (describing a text-only record has no meaning).

    python train_stic.py       # tiny preset: the shapes world's unlabeled.json, from train_sft.py's output
    torchrun --nproc_per_node=8 train_stic.py --preset llava15-7b --init llava-hf/llava-1.5-7b-hf --images DIR
        --sft_data llava_v1_5_mix665k.json      # one command: the images and the instruction data
"""

import sys
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn as nn

from data import shapes_eval
from nanovlm.checkpoint import write_json
from nanovlm.config import ranged
from nanovlm.data import DataSource
from nanovlm.dpo import ALPHA, BETA, DPOObjective, PreferenceDataset
from nanovlm.generate import Sampling
from nanovlm.image_check import check_images
from nanovlm.lora import add_lora, lora_layers
from nanovlm.presets import PRESETS
from nanovlm.recipe import SHAPES_DIR, Run, dataset, fit, parse, stage_dir, start_from
from nanovlm.stic import (
    DESCRIPTION_TOKENS,
    GENERATION_TEMPERATURE,
    PAPER_PROMPTS,
    Prompts,
    generate_jsonl,
    infuse,
    make_descriptions,
    make_preferences,
    sft_slice,
    unlabeled_images,
)
from nanovlm.templates import get_template
from nanovlm.train import TrainConfig

LLM_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
STEPS = ("preferences", "dpo", "describe")
# The tiny model knows one description question, the shapes world's "Describe the image." (data/shapes.py); asked
# anything else it answers "yes". It is its x, its preferred prompt and (the first plain prompt of both lists)
# its DaR prompt; the hallucination prompts stay the paper's, whose answers are junk to it.
PROMPTS = {"paper": PAPER_PROMPTS,
           "shapes": Prompts(describe=("Describe the image.",), detailed="Describe the image.",
                             hallucination=PAPER_PROMPTS.hallucination)}
SFT_LR = {"llm_lora": 2e-5, "projector": 2e-5}  # stage 2 (finetune_lora.sh: lr and mm_projector_lr)


@dataclass
class Stic:
    step: str = "all"  # preferences, dpo, describe (stage 2) or all
    prompts: str = "paper"  # the prompt lists: paper, or shapes (the tiny model's own description question)
    images: str | None = None  # unlabeled images: a folder, or LLaVA JSON with an "image" a record (tiny: the shapes')
    sft_data: str | None = None  # instruction data (LLaVA JSON) that stage 2 describes and learns (tiny: the shapes')
    sft_image_folder: str | None = None  # the folder of --sft_data's images (None: the file's own folder)
    num_sft: int = ranged(5000, ">= 1")  # records of --sft_data in stage 2, a seeded sample
    lora: tuple[int, float] = ranged((128, 256.0), (">= 1", "> 0"))  # r, alpha of the adapters on the LLM's linears
    dpo_lora_dropout: float = ranged(0.0, "[0, 1)")  # LoRA dropout during DPO
    sft_lora_dropout: float = ranged(0.05, "[0, 1)")  # LoRA dropout during stage 2
    beta: float = ranged(BETA, "> 0")  # DPO's beta: the scale of the reward margin inside the sigmoid
    alpha: float = ranged(ALPHA, ">= 0")  # weight of the NLL term -log pi(y_w|x)
    temperature: float = ranged(GENERATION_TEMPERATURE, ">= 0")  # sampling temperature of every description
    max_new_tokens: int = ranged(DESCRIPTION_TOKENS, ">= 1")  # longest description
    generation_batch_size: int = ranged(16, ">= 1")  # images per generation batch (a preference batch: 2 answers each)
    sft_lr: dict[str, float] = ranged(SFT_LR.copy, "> 0")  # stage 2's lr per parameter group (--lr: DPO's)
    sft_global_batch_size: int = ranged(32, ">= 1")  # stage 2's records per optimizer step (--global_batch_size: DPO's)
    sft_micro_batch_size: int = ranged(4, ">= 1")  # stage 2's records per process and micro-batch

    # What a resumed run may change: which step runs, and what only shapes the data it generates (the resumed
    # training step compares its data file's contents).
    RESUME_MAY_CHANGE: ClassVar[tuple[str, ...]] = (
        "step", "prompts", "images", "sft_data", "sft_image_folder", "num_sft", "temperature", "max_new_tokens",
        "generation_batch_size")


# The TrainConfig is the DPO stage's (released dpo_finetune.sh); stage 2 takes its own lr and batch from Stic.
PRETRAINED = TrainConfig(global_batch_size=8, micro_batch_size=1, lr={"llm_lora": 1e-7}, max_length=2048,
                         num_workers=4)
RECIPES = {
    "llava15-7b": PRETRAINED,
    "small": PRETRAINED,
    "tiny": TrainConfig(global_batch_size=8, micro_batch_size=8, lr={"llm_lora": 1e-4}, max_length=512),
}
# The tiny preset: LoRA r8 / alpha 16 on 128-wide layers (train_selfq.py's proportions); DPO at lr 1e-4 (measured
# on the shapes world: the reward margin grows to about 0.45 and the evaluation holds; at 1e-3 the margin reaches
# 1.2 and in-distribution accuracy falls 10 points); stage 2 on 1,000 records of instruct.json with the adapters
# at train_selfq.py's 2e-3; descriptions of at most 48 tokens (a shapes caption is one sentence); the shapes
# world's own description question as every plain and preferred prompt (PROMPTS above).
METHODS = {
    "llava15-7b": Stic(), "small": Stic(),
    "tiny": Stic(prompts="shapes", num_sft=1000, lora=(8, 16.0), max_new_tokens=48, generation_batch_size=64,
                 sft_lr={"llm_lora": 2e-3, "projector": 5e-4}, sft_micro_batch_size=32),
}


def finished(folder: Path) -> bool:
    return (folder / "adapter" / "nanovlm.json").is_file()  # written last by VLM.save_adapter


def set_lora_dropout(model: nn.Module, p: float) -> None:
    for layer in lora_layers(model).values():
        layer.lora_dropout = nn.Dropout(p) if p > 0 else nn.Identity()


def check_up_front(run: Run, root: Path, names: list[str]) -> None:
    """Decode every image a generation step will read before it starts (cached); a bad one stops the run here
    rather than mid-way, unless --skip_bad_records, with which generation lists it as skipped."""
    with run.env.main_first():
        bad = check_images(root, names)
    if bad and not run.cfg.skip_bad_records:
        name = next(iter(bad))
        raise SystemExit(f"error: image {root / name}: {bad[name]} ({len(bad)} unreadable images of {len(names)}; "
                         f"--skip_bad_records skips them)")


def main(argv: list[str] | None = None) -> None:
    run = parse(__doc__.splitlines()[0], RECIPES, argv, METHODS, stage="stic")
    stic: Stic = run.method
    if stic.step not in STEPS + ("all",):
        raise SystemExit(f"--step must be one of {', '.join(STEPS)} or all, not {stic.step!r}")
    if run.data:
        raise SystemExit("train_stic.py reads --images and --sft_data, not --data")
    if stic.prompts not in PROMPTS:
        raise SystemExit(f"--prompts must be one of {', '.join(PROMPTS)}, not {stic.prompts!r}")
    steps = STEPS if stic.step == "all" else (stic.step,)
    on_shapes = PRESETS[run.preset].vision is None and stic.images is None and stic.sft_data is None
    images = Path(stic.images) if stic.images else SHAPES_DIR / "unlabeled.json" if on_shapes else None
    sft_data = Path(stic.sft_data) if stic.sft_data else SHAPES_DIR / "instruct.json" if on_shapes else None
    if images is None and {"preferences", "dpo"} & set(steps):
        raise SystemExit("--images is required: a folder of unlabeled images or a LLaVA JSON file listing them")
    if sft_data is None and "describe" in steps:
        raise SystemExit("--sft_data is required: the instruction data (LLaVA JSON) that stage 2 describes")
    out, env, init = Path(run.cfg.out_dir), run.env, run.init or stage_dir(run.preset, "sft")
    model, tokenizer, processor = start_from(run, init)
    template = get_template(model.cfg.template)
    sampling = Sampling(max_new_tokens=stic.max_new_tokens, temperature=stic.temperature)
    generation = {"seed": run.cfg.seed, "sampling": sampling, "skip_bad": run.cfg.skip_bad_records,
                  "prompts": PROMPTS[stic.prompts]}

    if "preferences" in steps:
        if on_shapes and stic.step == "all" and env.main:
            scores, _ = shapes_eval.evaluate(model, tokenizer, processor, SHAPES_DIR)
            print(f"\nbefore STIC (shapes world, exact match %):\n{shapes_eval.format_table(scores)}")
        root, names = unlabeled_images(images)
        check_up_front(run, root, names)
        model.eval()
        generate_jsonl(out / "preferences.jsonl", names, "image",
                       partial(make_preferences, model, tokenizer, processor, template, root, **generation),
                       env, stic.generation_batch_size, "preferences")

    if "dpo" in steps and finished(out / "dpo"):
        print(f"{out / 'dpo'} is finished; skipping the DPO step (delete it to train again)")
    elif "dpo" in steps:
        torch.manual_seed(run.cfg.seed)  # the adapters' initialisation
        add_lora(model.language_model, LLM_TARGETS, *stic.lora, stic.dpo_lora_dropout)
        with env.main_first():  # rank 0 checks the images; the others find its results in the cache
            pairs = PreferenceDataset(out / "preferences.jsonl", unlabeled_images(images)[0], tokenizer, template,
                                      processor, model.cfg.num_image_tokens(), run.cfg.max_length,
                                      run.cfg.skip_bad_records, run.cfg.allow_absolute_image_paths)
        dpo = replace(run, cfg=replace(run.cfg, out_dir=str(out / "dpo")), data=[DataSource(pairs.path)])
        fit(dpo, model, tokenizer, processor, pairs, DPOObjective(model, stic.beta, stic.alpha))
        if env.main:
            model.save_adapter(out / "dpo" / "adapter", init, modules_to_save=())  # the projector stays frozen
            if on_shapes:
                print("\nafter STIC's DPO:")
                shapes_eval.report(model, tokenizer, processor, SHAPES_DIR, out / "dpo")
        env.barrier()

    if "describe" in steps and finished(out):
        print(f"{out} is finished; skipping stage 2 (delete its adapter/ to train again)")
    elif "describe" in steps:
        if not lora_layers(model):
            if not finished(out / "dpo"):
                raise SystemExit(f"{out / 'dpo' / 'adapter'} does not exist: run --step dpo first")
            model.load_adapter(out / "dpo" / "adapter")
        image_folder = Path(stic.sft_image_folder) if stic.sft_image_folder else sft_data.parent
        records, skipped = sft_slice(sft_data, image_folder, stic.num_sft, run.cfg.seed, run.cfg.skip_bad_records)
        if skipped and env.main:
            print(f"skipped {skipped} bad records of {sft_data}")
        check_up_front(run, image_folder, [record["image"] for record in records.values()])
        model.eval()
        descriptions = generate_jsonl(
            out / "descriptions.jsonl", list(records), "index",
            partial(make_descriptions, model, tokenizer, processor, template, image_folder, records, **generation),
            env, stic.generation_batch_size, "descriptions")
        described = []
        for d in descriptions:
            first, *rest = records[d["index"]]["conversations"]
            first = first | {"value": infuse(first["value"], d["description"])}
            described.append(records[d["index"]] | {"conversations": [first, *rest]})
        if env.main:
            write_json(out / "described.json", described)
        env.barrier()
        set_lora_dropout(model, stic.sft_lora_dropout)
        sft = replace(run, cfg=replace(run.cfg, lr=stic.sft_lr, global_batch_size=stic.sft_global_batch_size,
                                       micro_batch_size=stic.sft_micro_batch_size),
                      data=[DataSource(out / "described.json", image_folder=image_folder)])
        fit(sft, model, tokenizer, processor, dataset(sft, model, tokenizer, processor, model.cfg.template))
        if env.main:
            model.save_adapter(out / "adapter", init, modules_to_save=("multi_modal_projector",))
            if on_shapes:
                print("\nafter STIC (DPO and description-infused fine-tuning):")
                shapes_eval.report(model, tokenizer, processor, SHAPES_DIR, out)
        env.barrier()


if __name__ == "__main__":
    main(sys.argv[1:])
