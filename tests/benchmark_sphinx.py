"""What SPHINX's visual side costs on the tiny preset: image tokens, parameters, step time and memory of
`sphinx-tiny-towers` (a second tower), `sphinx-tiny-scales` (five views per image) and `sphinx-tiny` (both),
against `tiny` (one tower, one view).

Each variant is built by its preset (nanovlm/presets.py) and takes training steps of the tiny recipe on the
same micro-batch of shapes-world conversations: forward, backward and AdamW over every part, as
train_sft.py does. Measured per variant:
- image tokens per image, and the micro-batch's padded sequence length;
- step time: the median of --iters steps after --warmup, in CPU seconds of this process (on --threads 1,
  close to wall time on an idle core and less disturbed than wall time on a shared machine);
- activation memory: the bytes of every distinct tensor autograd keeps for the backward pass (parameters
  excluded), which is what grows with the image tokens; on a GPU also torch.cuda.max_memory_allocated.

    PYTHONPATH=. python tests/benchmark_sphinx.py [--threads 1] [--batch 32] [--iters 5] [--json FILE]
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmark_iccc import cpu_name  # tests/, on the path when run as a script
from data.shapes import ShapesConfig, generate
from nanovlm.data import DataSource, LLaVADataset, collate
from nanovlm.presets import PRESETS, tiny_model
from nanovlm.templates import get_template
from nanovlm.train import Objective
from train_align import shapes_corpus

VARIANTS = ("tiny", "sphinx-tiny-towers", "sphinx-tiny-scales", "sphinx-tiny")


def saved_activation_bytes(objective: Objective, batch: dict) -> int:
    """Bytes of the distinct non-parameter tensors the forward pass saves for backward."""
    parameters = {p.untyped_storage().data_ptr() for p in objective.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        objective(batch)
    return sum(storages.values())


def measure(variant: str, world: Path, args: argparse.Namespace, device: torch.device) -> dict:
    model, tokenizer, processor = tiny_model(shapes_corpus(world, "vicuna_v1"), preset=PRESETS[variant])
    data = LLaVADataset([DataSource(world / "instruct.json")], tokenizer, get_template("vicuna_v1"), processor,
                        model.cfg.num_image_tokens(), 512)
    batch = collate([data[i] for i in range(args.batch)], tokenizer.pad_id)
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    objective = Objective(model).to(device).train()
    optimizer = torch.optim.AdamW(objective.parameters(), lr=5e-4)
    activations = saved_activation_bytes(objective, batch)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = []
    for step in range(args.warmup + args.iters):
        start = time.process_time() if device.type == "cpu" else time.perf_counter()
        objective(batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            seconds.append((time.process_time() if device.type == "cpu" else time.perf_counter()) - start)
    result = {"variant": variant, "image_tokens": model.cfg.num_image_tokens(),
              "sequence_length": batch["input_ids"].shape[1],
              "parameters_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
              "step_s": round(statistics.median(seconds), 3), "activations_MB": round(activations / 2**20, 1)}
    if device.type == "cuda":
        result["cuda_peak_MB"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return result


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU (default 1)")
    parser.add_argument("--batch", type=int, default=32, help="conversations per step (the tiny recipe's 32)")
    parser.add_argument("--iters", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        world = Path(tmp)
        generate(world, ShapesConfig(num_train=args.batch * 2, num_unlabeled=0, num_eval=4))
        results = [measure(variant, world, args, device) for variant in VARIANTS]
    where = (torch.cuda.get_device_name() if device.type == "cuda"
             else f"{cpu_name()}, {args.threads} thread(s)")
    print(f"\n{where}, torch {torch.__version__}, batch {args.batch}, median of {args.iters} steps:")
    print("| variant | image tokens | sequence length | parameters (M) | step (s) | activations (MB) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['variant']} | {r['image_tokens']} | {r['sequence_length']} | {r['parameters_M']} | "
              f"{r['step_s']} | {r['activations_MB']} |")
    if args.json:
        command = " ".join(["PYTHONPATH=. python tests/benchmark_sphinx.py", *(argv or sys.argv[1:])])
        summary = {"command": command, "machine": where, "torch": torch.__version__, "batch": args.batch,
                   "iters": args.iters, "results": results}
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
