"""What every train_*.py script does around its recipe: read the command line, build the model and the data,
run the shared loop, save on rank 0. The scripts keep only what differs: the hyperparameters per preset, the
template, the objective, and where the model starts."""

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from . import memory_plan
from .checkpoint import write_json
from .config import add_options, read_options, underscored
from .data import BatchGeometry, DataSource, LLaVADataset, batch_geometry
from .image import ImageProcessor
from .presets import PRESETS
from .templates import get_template
from .tokenizer import Tokenizer
from .train import Distributed, Objective, TrainConfig, train
from .train_state import RunFolderError, recorded, remove_checkpoints
from .vlm import VLM, load_pretrained

SHAPES_DIR = Path("out/shapes")  # where train_align.py writes the shapes world


@dataclass
class Run:
    preset: str
    cfg: TrainConfig
    data: list[DataSource]
    init: str | None
    env: Distributed
    method: Any = None  # a recipe's own settings (a dataclass), overridable like TrainConfig


def stage_dir(preset: str, stage: str) -> str:
    """Where a stage writes its model (out/PRESET/STAGE), and where the next stage starts from."""
    return f"out/{preset}/{stage}"


def parse(description: str, recipes: dict[str, TrainConfig], argv: list[str] | None = None,
          methods: dict[str, Any] | None = None, stage: str | Callable[[Any], str] | None = None) -> Run:
    """The run the command line asks for. `recipes` and `methods` (a recipe's own settings dataclass) hold the
    defaults of each preset; `stage` names the output folder, out/PRESET/STAGE, unless --out_dir says otherwise
    (a function of the method's settings where they decide it).

    The batch geometry is settled here, before any model is built: under torchrun a micro-batch too large for
    the global batch's share of a process shrinks, and a global batch the processes cannot share stops the run.
    The memory plan is printed here too (nanovlm/memory_plan.py); --dry_run stops after it.
    """
    argv = underscored(sys.argv[1:] if argv is None else argv)
    first = argparse.ArgumentParser(add_help=False, allow_abbrev=False)  # the preset decides the defaults
    first.add_argument("--preset", default="tiny", choices=sorted(recipes))
    preset = first.parse_known_args(argv)[0].preset
    method = methods[preset] if methods else None
    cfg = recipes[preset]
    if stage is not None:
        cfg = dataclasses.replace(cfg, out_dir=stage_dir(preset, stage if isinstance(stage, str) else stage(method)))
    args = command_line(description, sorted(recipes), preset, cfg, method).parse_args(argv)
    try:  # every number in range before anything is built: one line naming the option and its range
        data = [DataSource.parse(spec) for spec in args.data]
        method = read_options(args, method) if method is not None else None
        cfg = read_options(args, cfg)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    for source in data:
        source.image_folder = Path(args.image_folder) if args.image_folder else None
    if callable(stage) and not any(arg == "--out_dir" or arg.startswith("--out_dir=") for arg in argv):
        cfg.out_dir = stage_dir(preset, stage(method))
    try:
        geometry = batch_geometry(cfg.global_batch_size, cfg.micro_batch_size, int(os.environ.get("WORLD_SIZE", 1)))
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    cfg.micro_batch_size = geometry.micro_batch
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"batch: {geometry}")
        print(describe_plan(preset, args.init, cfg, geometry))
    if args.dry_run:
        raise SystemExit(0)
    return Run(preset, cfg, data, args.init, Distributed(), method)


def describe_plan(preset: str, init: str | None, cfg: TrainConfig, geometry: BatchGeometry) -> str:
    """The memory plan of the run the command line asks for, on the GPU found (or on common sizes)."""
    architecture = memory_plan.architecture(preset, init)
    if architecture is None:
        return f"memory plan: the {preset} preset's architecture is known once downloaded; pass --init DIR"
    estimate = memory_plan.plan(architecture, list(cfg.lr), geometry.world_size, geometry.micro_batch,
                                geometry.accumulation, cfg.max_length, cfg.gradient_checkpointing, cfg.fsdp)
    title = (f"{preset}, {'FSDP' if cfg.fsdp else 'DDP'} over {geometry.world_size} process(es), micro-batch "
             f"{geometry.micro_batch} x {cfg.max_length} tokens, accumulation {geometry.accumulation}, gradient "
             f"checkpointing {'on' if cfg.gradient_checkpointing else 'off'}, per GPU")
    return estimate.describe(title, *memory_plan.device_memory())


def command_line(description: str, presets: list[str], preset: str, cfg: TrainConfig,
                 method: Any) -> argparse.ArgumentParser:
    """The options of a train script: the run's own four, then every field of `cfg` and of `method` (if any),
    whose values are the defaults --help shows."""
    parser = argparse.ArgumentParser(
        description=description, allow_abbrev=False,
        usage="%(prog)s [-h] [--preset PRESET] [--data FILE[:WEIGHT] ...] [--init DIR] [--FIELD VALUE ...]",
        epilog="Defaults are the chosen preset's: --preset small --help lists that one's. Dashes and underscores "
               "in option names are the same; a bare boolean flag means true.")
    parser.add_argument("--preset", default="tiny", choices=presets, help="the model and its recipe (default: tiny)")
    parser.add_argument("--data", nargs="+", default=[], metavar="FILE[:WEIGHT]",
                        help="LLaVA JSON files; a weight draws a seeded share of a file per epoch (default: the "
                             "shapes world on the tiny preset, required on the others)")
    parser.add_argument("--image_folder", default=None, metavar="DIR",
                        help="image root of every --data file (default: each JSON file's folder)")
    parser.add_argument("--dry_run", action="store_true",
                        help="print the batch and the memory plan, then stop, before any model is built")
    parser.add_argument("--init", default=None, metavar="DIR",
                        help="checkpoint to start from, a directory or Hub repo id (default: the previous stage's "
                             "output, where there is one)")
    add_options(parser, cfg, f"training ({type(cfg).__name__}, the {preset} preset's defaults)")
    if method is not None:
        add_options(parser, method, f"method ({type(method).__name__}, the {preset} preset's defaults)")
    return parser


def model_dtype(run: Run) -> torch.dtype:
    return torch.bfloat16 if run.env.device.type == "cuda" else torch.float32


def dataset(run: Run, model: VLM, tokenizer: Tokenizer, processor: ImageProcessor, template: str,
            sq_ratio: float = 0.0) -> LLaVADataset:
    if not run.data:
        raise SystemExit(f"--data is required for the {run.preset} preset")
    with run.env.main_first():  # rank 0 checks the images; the others find its results in the cache
        return LLaVADataset(run.data, tokenizer, get_template(template), processor, model.cfg.num_image_tokens(),
                            run.cfg.max_length, run.cfg.seed, run.cfg.skip_bad_records, sq_ratio,
                            run.cfg.allow_absolute_image_paths)


def fit(run: Run, model: VLM, tokenizer: Tokenizer, processor: ImageProcessor, data: LLaVADataset,
        objective: Objective | None = None, evaluate: Callable[[], dict] | None = None) -> list[dict]:
    """Train, then write the finished model (llava-hf layout) and a summary from rank 0, and delete the
    checkpoints it supersedes. `evaluate`, if given, scores the model every --eval_every steps on rank 0 and its
    scores are logged with the step's metrics. An output folder that does not fit the run stops it (train_state)."""
    model.language_model.gradient_checkpointing = run.cfg.gradient_checkpointing
    for tower in model.vision_towers:
        tower.gradient_checkpointing = run.cfg.gradient_checkpointing
    if data.skipped and run.env.main:
        print(f"skipped bad records: {data.skipped}")
    identity = {"data": [source.fingerprint() for source in run.data], "method": recorded(run.method)}
    try:
        history = train(run.cfg, objective or Objective(model), model.parameter_groups(), data, tokenizer.pad_id,
                        run.env, evaluate, identity)
    except RunFolderError as e:
        raise SystemExit(f"error: {e}") from None
    out_dir = Path(run.cfg.out_dir)
    if run.env.main:
        model.save_pretrained(out_dir, tokenizer, processor)
        dropped = history[-1]["skipped_records"] if history else 0
        summary = {"preset": run.preset, "steps": len(history), "final_loss": history[-1]["loss"] if history else None,
                   "data": [str(s.path) for s in run.data], "records": len(data), "skipped": data.skipped,
                   "dropped_while_training": dropped, "train_template": data.template.name,
                   "eval_template": model.cfg.template, "method": asdict(run.method) if run.method else None}
        write_json(out_dir / "summary.json", summary)
        remove_checkpoints(out_dir)
        if dropped:
            print(f"{dropped} records were skipped (see metrics.jsonl's skipped_records): bad ones, or answers that "
                  f"--max_length {run.cfg.max_length} cut away")
    run.env.barrier()
    return history


def start_from(run: Run, default_init: str | None) -> tuple[VLM, Tokenizer, ImageProcessor]:
    """The model a later stage continues: --init, else `default_init` (the previous stage's stage_dir)."""
    init = run.init or default_init
    if init is None:
        raise SystemExit("--init is required: the checkpoint to continue from")
    if PRESETS[run.preset].vision is None and not Path(init).is_dir():
        raise SystemExit(f"no folder {init}: run the previous stage first, or give --init")
    try:
        return load_pretrained(init, dtype=model_dtype(run), device=run.env.device)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from None
