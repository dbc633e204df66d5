"""STIC (Deng et al., 2024): self-training on image comprehension, from unlabeled images only.

Three steps, all by default, each runnable alone with --step and resumable (nanovlm/stic.py states the method,
nanovlm/dpo.py the objective):
1. preferences: the starting model describes every unlabeled image twice, a preferred and a dispreferred
   description, into OUT/preferences.jsonl (image, prompt, chosen, rejected, corruption). Under torchrun each
   rank describes its own batches; a rerun skips the images already done.
2. dpo: LoRA adapters learn the pairs with DPO + NLL through the shared training loop (checkpoints and --resume
   as every recipe); the adapter-disabled model is the reference. Writes OUT/dpo (merged model, adapter/).
3. describe: the DPO'd model describes the image of each record of a slice of the instruction data into
   OUT/descriptions.jsonl; OUT/described.json holds those records with the description before the question, on
   which the same adapters continue with the ordinary SFT loss. The finished model is OUT (llava-hf layout,
   adapters merged) and OUT/adapter (PEFT layout). A finished step (its adapter/ written) is skipped on a rerun.

Recipe (yihedeng9/STIC's released scripts, scripts/dpo_finetune.sh and finetune_lora.sh): LoRA r 128, alpha 256
on every linear layer of the LLM (q,k,v,o,gate,up,down; not lm_head). DPO: beta 0.1, alpha 1/1024 on summed
log-probabilities, lr 1e-7, global batch 8, one epoch, cosine after 3% warmup, LoRA dropout 0 (the released DPO
trainer switches dropout off). The projector stays frozen here, unlike the released script (lr 2e-5), so that
the adapter-disabled reference is the starting model. Stage 2: 5k records of the instruction data, the same
adapters at lr 2e-5 with dropout 0.05 and the projector at 2e-5, global batch 32, max length 2048, one epoch,
cosine after 3% warmup. Generation: temperature 0.2, up to 1024 new tokens. One chat template throughout, the
model's own. The `llava15-7b` and `small` presets keep these released values; the `tiny` preset has its own
(the `tiny` entries below): a model trained from scratch in minutes, which the released lr 1e-7 would leave
unchanged after a few hundred steps.

    python train_stic.py       # tiny preset: the shapes world's unlabeled.json, from train_sft.py's output
    torchrun --nproc_per_node=8 train_stic.py --preset llava15-7b --init llava-hf/llava-1.5-7b-hf \\
        --images out/coco/coco_unlabeled.json --sft_data out/llava_mix665k/llava_v1_5_mix665k.json
"""

import sys
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn

from data import shapes_eval
from nanovlm.checkpoint import write_json
from nanovlm.data import DataSource
from nanovlm.dpo import ALPHA, BETA, DPOObjective, PreferenceDataset
from nanovlm.generate import Sampling
from nanovlm.lora import add_lora, load_adapter, lora_layers, save_adapter
from nanovlm.presets import PRESETS
from nanovlm.recipe import SHAPES_DIR, dataset, fit, parse, start_from
from nanovlm.stic import (DESCRIPTION_TOKENS, GENERATION_TEMPERATURE, PAPER_PROMPTS, Prompts, generate_jsonl, infuse,
                          make_descriptions, make_preferences, sft_slice, unlabeled_images)
from nanovlm.templates import get_template
from nanovlm.train import TrainConfig
from nanovlm.vlm import PEFT_RENAMES, PEFT_TO_MODULE

LLM_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
STEPS = ("preferences", "dpo", "describe")
SFT_OUTPUT = {"llava15-7b": "out/llava15-7b/sft", "small": "out/small/sft", "tiny": "out/tiny/sft"}
# The tiny model knows one description question, the shapes world's "Describe the image." (data/shapes.py); asked
# anything else it answers "yes". It is its x, its preferred prompt and (the first plain prompt of both lists)
# its DaR prompt; the hallucination prompts stay the paper's, whose answers are junk to it.
PROMPTS = {"paper": PAPER_PROMPTS,
           "shapes": Prompts(describe=("Describe the image.",), detailed="Describe the image.",
                             hallucination=PAPER_PROMPTS.hallucination)}


@dataclass
class Stic:
    step: str = "all"  # preferences, dpo, describe or all
    prompts: str = "paper"  # a key of PROMPTS
    images: str | None = None  # unlabeled images: a folder, or a LLaVA JSON file whose records have an "image"
    sft_data: str | None = None  # the instruction data (LLaVA JSON) whose slice stage 2 describes and trains on
    sft_image_folder: str | None = None  # where its images are (default: the file's folder)
    num_sft: int = 5000
    lora: tuple[int, float] = (128, 256.0)  # r, alpha
    dpo_lora_dropout: float = 0.0
    sft_lora_dropout: float = 0.05
    beta: float = BETA
    alpha: float = ALPHA
    temperature: float = GENERATION_TEMPERATURE
    max_new_tokens: int = DESCRIPTION_TOKENS
    generation_batch_size: int = 16  # images a batch; a preference batch generates two answers an image
    sft_lr: dict[str, float] = field(default_factory=lambda: {"llm_lora": 2e-5, "projector": 2e-5})
    sft_global_batch_size: int = 32
    sft_micro_batch_size: int = 4


# The TrainConfig is the DPO stage's; stage 2 takes its own lr and batch from Stic.
RECIPES = {
    "llava15-7b": TrainConfig(out_dir="out/llava15-7b/stic", global_batch_size=8, micro_batch_size=1,
                              lr={"llm_lora": 1e-7}, max_length=2048, num_workers=4),
    "small": TrainConfig(out_dir="out/small/stic", global_batch_size=8, micro_batch_size=1,
                         lr={"llm_lora": 1e-7}, max_length=2048, num_workers=4),
    "tiny": TrainConfig(out_dir="out/tiny/stic", global_batch_size=8, micro_batch_size=8,
                        lr={"llm_lora": 1e-4}, max_length=512),
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
    return (folder / "adapter" / "adapter_config.json").is_file()


def set_lora_dropout(model: nn.Module, p: float) -> None:
    for layer in lora_layers(model).values():
        layer.lora_dropout = nn.Dropout(p) if p > 0 else nn.Identity()


def main(argv: list[str] | None = None) -> None:
    run = parse(__doc__.splitlines()[0], RECIPES, argv, METHODS)
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
    out, env = Path(run.cfg.out_dir), run.env
    model, tokenizer, processor = start_from(run, SFT_OUTPUT[run.preset])
    template = get_template(model.cfg.template)
    sampling = Sampling(max_new_tokens=stic.max_new_tokens, temperature=stic.temperature)
    generation = {"seed": run.cfg.seed, "sampling": sampling, "skip_bad": run.cfg.skip_bad_records,
                  "prompts": PROMPTS[stic.prompts]}

    if "preferences" in steps:
        if on_shapes and stic.step == "all" and env.main:
            scores, _ = shapes_eval.evaluate(model, tokenizer, processor, SHAPES_DIR)
            print(f"\nbefore STIC (shapes world, exact match %):\n{shapes_eval.format_table(scores)}")
        root, names = unlabeled_images(images)
        model.eval()
        generate_jsonl(out / "preferences.jsonl", names, "image",
                       partial(make_preferences, model, tokenizer, processor, template, root, **generation),
                       env, stic.generation_batch_size, "preferences")

    if "dpo" in steps and finished(out / "dpo"):
        print(f"{out / 'dpo'} is finished; skipping the DPO step (delete it to train again)")
    elif "dpo" in steps:
        torch.manual_seed(run.cfg.seed)  # the adapters' initialisation
        add_lora(model.language_model, LLM_TARGETS, *stic.lora, stic.dpo_lora_dropout)
        pairs = PreferenceDataset(out / "preferences.jsonl", unlabeled_images(images)[0], tokenizer, template,
                                  processor, model.cfg.vision.num_image_tokens(), run.cfg.max_length,
                                  run.cfg.skip_bad_records)
        dpo = replace(run, cfg=replace(run.cfg, out_dir=str(out / "dpo")), data=[DataSource(pairs.path)])
        fit(dpo, model, tokenizer, processor, pairs, DPOObjective(model, stic.beta, stic.alpha))
        if env.main:
            save_adapter(model, out / "dpo" / "adapter", PEFT_RENAMES, run.init or SFT_OUTPUT[run.preset])
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
            load_adapter(model, out / "dpo" / "adapter", PEFT_TO_MODULE)
        image_folder = Path(stic.sft_image_folder) if stic.sft_image_folder else sft_data.parent
        records, skipped = sft_slice(sft_data, image_folder, stic.num_sft, run.cfg.seed, run.cfg.skip_bad_records)
        if skipped and env.main:
            print(f"skipped {skipped} bad records of {sft_data}")
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
            save_adapter(model, out / "adapter", PEFT_RENAMES, run.init or SFT_OUTPUT[run.preset])
            if on_shapes:
                print("\nafter STIC (DPO and description-infused fine-tuning):")
                shapes_eval.report(model, tokenizer, processor, SHAPES_DIR, out)
        env.barrier()


if __name__ == "__main__":
    main(sys.argv[1:])
