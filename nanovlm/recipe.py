"""What every train_*.py script does around its recipe: read the command line, build the model and the data,
run the shared loop, save on rank 0. The scripts keep only what differs: the hyperparameters per preset, the
template, the objective, and where the model starts."""

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .config import override
from .data import DataSource, LLaVADataset
from .image import ImageProcessor
from .presets import PRESETS
from .templates import get_template
from .tokenizer import Tokenizer
from .train import Distributed, Objective, TrainConfig, train
from .vlm import VLM, load_pretrained

SHAPES_DIR = Path("out/shapes")  # where train_align.py writes the shapes world
STAGE1_OUTPUT = {"llava15-7b": "out/llava15-7b/align", "small": "out/small/align", "tiny": "out/tiny/align"}


@dataclass
class Run:
    preset: str
    cfg: TrainConfig
    data: list[DataSource]
    init: str | None
    env: Distributed
    method: Any = None  # a recipe's own settings (a dataclass), overridable like TrainConfig


def parse(description: str, recipes: dict[str, TrainConfig], argv: list[str] | None = None,
          methods: dict[str, Any] | None = None) -> Run:
    """The run the command line asks for; `methods` holds a recipe's own settings dataclass per preset."""
    parser = argparse.ArgumentParser(description=description, epilog="Any TrainConfig field can be overridden "
                                     "with --field value, e.g. --max_steps 100 --lr projector=1e-3,llm=2e-5.")
    parser.add_argument("--preset", default="tiny", choices=sorted(recipes))
    parser.add_argument("--data", nargs="+", default=[], help="LLaVA JSON files, each FILE or FILE:WEIGHT")
    parser.add_argument("--image_folder", default=None, help="image root (default: each JSON file's folder)")
    parser.add_argument("--init", default=None, help="checkpoint to start from (a directory or Hub repo id)")
    args, rest = parser.parse_known_args(argv)
    cfg, *method = override(rest, recipes[args.preset], *([methods[args.preset]] if methods else []))
    data = [DataSource.parse(spec) for spec in args.data]
    for source in data:
        source.image_folder = Path(args.image_folder) if args.image_folder else None
    return Run(args.preset, cfg, data, args.init, Distributed(), method[0] if method else None)


def model_dtype(run: Run) -> torch.dtype:
    return torch.bfloat16 if run.env.device.type == "cuda" else torch.float32


def dataset(run: Run, model: VLM, tokenizer: Tokenizer, processor: ImageProcessor, template: str,
            sq_ratio: float = 0.0) -> LLaVADataset:
    if not run.data:
        raise SystemExit(f"--data is required for the {run.preset} preset")
    return LLaVADataset(run.data, tokenizer, get_template(template), processor, model.cfg.vision.num_image_tokens(),
                        run.cfg.max_length, run.cfg.seed, run.cfg.skip_bad_records, sq_ratio)


def fit(run: Run, model: VLM, tokenizer: Tokenizer, processor: ImageProcessor, data: LLaVADataset,
        objective: Objective | None = None) -> list[dict]:
    """Train, then write the finished model (llava-hf layout) and a summary from rank 0."""
    model.language_model.gradient_checkpointing = run.cfg.gradient_checkpointing
    model.vision_tower.gradient_checkpointing = run.cfg.gradient_checkpointing
    if data.skipped and run.env.main:
        print(f"skipped bad records: {data.skipped}")
    history = train(run.cfg, objective or Objective(model), model.parameter_groups(), data, tokenizer.pad_id, run.env)
    if run.env.main:
        model.save_pretrained(run.cfg.out_dir, tokenizer, processor)
        summary = {"preset": run.preset, "steps": len(history), "final_loss": history[-1]["loss"] if history else None,
                   "data": [str(s.path) for s in run.data], "records": len(data), "skipped": data.skipped,
                   "method": asdict(run.method) if run.method else None}
        (Path(run.cfg.out_dir) / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    run.env.barrier()
    return history


def start_from(run: Run, default_init: str | None) -> tuple[VLM, Tokenizer, ImageProcessor]:
    """The model a later stage continues: --init, else the previous stage's output."""
    init = run.init or default_init
    if init is None:
        raise SystemExit("--init is required: the checkpoint to continue from")
    if PRESETS[run.preset].vision is None and not Path(init).is_dir():
        raise SystemExit(f"{init} does not exist: run the previous stage first")
    return load_pretrained(init, dtype=model_dtype(run), device=run.env.device)
