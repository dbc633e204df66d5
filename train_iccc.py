"""ICCC (Li, Wu, He, CVPR 2024): image-conditioned caption correction, between LLaVA's stage 1 and stage 2.

Recipe: caption records become correction samples as they load (nanovlm/iccc.py): with probability aug_ratio a
concept of the caption is replaced, or two are swapped (swap_ratio of those), and the model reads the image and
`check the caption "<corrupted caption>",` and learns to say `"<wrong>" should be "<right>".` or `"B" and "A"
are swapped.`; otherwise it learns the caption itself. The `plain_prompt` template, loss on the target only;
only the connector trains (the projector, and the prototype extractor when the model has one), the vision
tower and the LLM stay frozen; AdamW with weight decay 0.05, 500 warmup steps, cosine decay. It continues the
stage-1 checkpoint (--init, by default train_align.py's output); `--aug_ratio 0` is the control, the same run
on plain captions. `train_sft.py --init OUT` then instruction-tunes the result. On the tiny preset it ends with
the shapes world's caption ranking (true captions against corrupted ones, by likelihood; data/caption_ranking.py).

    python train_iccc.py                                     # tiny preset, shapes world captions, after train_align.py
    python train_iccc.py --aug_ratio 0 --out_dir out/tiny/iccc-control
    torchrun --nproc_per_node=8 train_iccc.py --preset llava15-7b --data blip_laion_cc_sbu_558k.json
    python eval.py out/tiny/iccc --task caption_ranking
"""

import dataclasses
import sys
from pathlib import Path

from data import caption_ranking
from nanovlm.data import DataSource
from nanovlm.iccc import ICCC, RATES, CaptionCorrectionDataset
from nanovlm.presets import PRESETS
from nanovlm.recipe import SHAPES_DIR, fit, parse, stage_dir, start_from
from nanovlm.templates import get_template
from nanovlm.train import TrainConfig

# The official YAMLs: weight decay 0.05, 500 warmup steps, about one epoch of COCO + VG captions. The rates per
# backbone: Vicuna-7B as in InstructBLIP (lr 1e-6), SmolLM2 as BLIP-2's OPT (lr 5e-6 is OPT-6.7B's; the OPT-2.7B
# YAML's 5e-8 would leave the connector where it is). LLaVA's stage-1 global batch, 256 (ICCC trains on captions).
PRETRAINED = TrainConfig(global_batch_size=256, micro_batch_size=32, weight_decay=0.05, warmup_steps=500,
                         max_length=2048, num_workers=4)
RECIPES = {
    "llava15-7b": dataclasses.replace(PRETRAINED, lr={"projector": 1e-6}),
    "small": dataclasses.replace(PRETRAINED, lr={"projector": 5e-6}),
    # One epoch of the shapes world's 16,000 captions is 500 steps of 32, so the warmup keeps the official share
    # (500 of 17,600 steps, 3%), not its count. The lr is stage 1's: the tiny projector is young (1,000 steps from
    # scratch), and in 150-step trials from the default stage-1 checkpoint, BLIP-2's ratio of ICCC to connector
    # pretraining lr (1/20: 2.5e-5) moved the loss of correction targets (64 captions' samples) from 9.8 to
    # 6.8 nats a token and of captions from 1.67 to 1.53; 5e-4 to 5.8 and 0.99: only it can act in 500 steps.
    "tiny": TrainConfig(global_batch_size=32, micro_batch_size=32, epochs=1, lr={"projector": 5e-4},
                        weight_decay=0.05, max_length=512),
}
# Shapes captions always hold several objects with colours and sizes to bind, and a run of 500 steps sees 16,000
# samples (the paper's: about 850,000), so the tiny preset corrects half of its samples and swaps half of those.
METHODS = {"llava15-7b": ICCC(*RATES["instructblip-vicuna-7b"]), "small": ICCC(*RATES["blip2-opt-2.7b"]),
           "tiny": ICCC(aug_ratio=0.5, swap_ratio=0.5)}


def main(argv: list[str] | None = None) -> None:
    run = parse(__doc__.splitlines()[0], RECIPES, argv, METHODS, stage="iccc")
    model, tokenizer, processor = start_from(run, stage_dir(run.preset, "align"))
    if model.prototype_extractor is not None and "projector" in run.cfg.lr:  # SQ-LLaVA's extractor: connector too
        run.cfg.lr = run.cfg.lr | {"prototypes": run.cfg.lr["projector"]}
    is_shapes = PRESETS[run.preset].vision is None and not run.data
    if is_shapes:
        run.data = [DataSource(SHAPES_DIR / "captions.json")]
    if not run.data:
        raise SystemExit(f"--data is required for the {run.preset} preset (LLaVA caption JSON, e.g. "
                         f"blip_laion_cc_sbu_558k.json or coco_karpathy_train.json)")
    with run.env.main_first():  # rank 0 checks the images; the others find its results in the cache
        data = CaptionCorrectionDataset(run.data, tokenizer, get_template("plain_prompt"), processor,
                                        model.cfg.num_image_tokens(), run.cfg.max_length, run.cfg.seed,
                                        run.cfg.skip_bad_records, settings=run.method,
                                        allow_absolute_image_paths=run.cfg.allow_absolute_image_paths)
    if run.env.main:
        print(f"concept bank over {data.bank.captions} captions, frequent of distinct: {data.bank.summary()}")
    fit(run, model, tokenizer, processor, data)
    if is_shapes and run.env.main:
        caption_ranking.report(model, tokenizer, processor, SHAPES_DIR, Path(run.cfg.out_dir))


if __name__ == "__main__":
    main(sys.argv[1:])
