"""Where does a model lose track of where objects are? Linear probes on the shapes world.

Spatial questions ("Is the red circle to the left of the blue square?") need the grid cell of two objects. For
every object of the first `--images` training images, this takes the feature vector at the object's image token
at each stage of the model: the vision tower's output, the projector's output, and the hidden state after each
LLM layer (the image placed in the chat template as in training, under "Describe the image."). A linear
classifier per stage learns the object's column and its row (4 classes each, chance 25%) from 80% of the
objects and is scored on the other 20%.

    python -m data.shapes_probe out/tiny/sft
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from nanovlm.image import ImageProcessor, load_image
from nanovlm.templates import get_template, tokenize_conversation
from nanovlm.tokenizer import Tokenizer
from nanovlm.vlm import VLM, load_pretrained

from .shapes import GRID


def probe_accuracy(features: torch.Tensor, labels: torch.Tensor, steps: int = 400, seed: int = 0) -> float:
    """Held-out accuracy of a softmax regression from standardised `features` (N, D) to `labels` (N,):
    trained with Adam on a seeded 80% of the rows, scored on the other 20%."""
    order = torch.randperm(len(features), generator=torch.Generator().manual_seed(seed))
    x = (features - features.mean(0)) / (features.std(0) + 1e-6)
    x, y = x[order], labels[order]
    n = len(x) * 4 // 5
    weight = torch.zeros(x.shape[1], int(labels.max()) + 1, requires_grad=True)
    bias = torch.zeros(weight.shape[1], requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=1e-2)
    for _ in range(steps):
        loss = F.cross_entropy(x[:n] @ weight + bias, y[:n])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return ((x[n:] @ weight + bias).argmax(1) == y[n:]).float().mean().item()


@torch.no_grad()
def stage_features(model: VLM, tokenizer: Tokenizer, processor: ImageProcessor,
                   image_paths: list[Path]) -> dict[str, torch.Tensor]:
    """stage name -> (images, image tokens, hidden size) features of every image token at that stage."""
    template = get_template(model.cfg.template)
    conversation = [{"from": "human", "value": "<image>\nDescribe the image."}]
    num_tokens = model.cfg.num_image_tokens()
    ids, _ = tokenize_conversation(tokenizer, template, conversation, num_tokens, generation_prompt=True)
    first = ids.index(model.cfg.image_token_id)
    image_slice = slice(first, first + num_tokens)
    # One forward pass through the real path (embed, then the LLM); hooks keep each stage's output.
    image_stages = {"vision tower": model.vision_tower, "projector": model.multi_modal_projector}
    llm_stages = {f"llm layer {i + 1}": block for i, block in enumerate(model.language_model.layers)}
    stage_modules = image_stages | llm_stages
    outputs = {}
    hooks = [module.register_forward_hook(lambda _m, _a, out, name=name: outputs.__setitem__(name, out))
             for name, module in stage_modules.items()]
    stages: dict[str, list[torch.Tensor]] = {name: [] for name in stage_modules}
    try:
        for start in range(0, len(image_paths), 64):
            pixels = torch.stack([processor(load_image(p)) for p in image_paths[start:start + 64]])
            model.language_model(model.embed(torch.tensor([ids] * len(pixels)), pixels))
            for name, value in outputs.items():
                stages[name].append((value[:, image_slice] if name in llm_stages else value).float())
    finally:
        for hook in hooks:
            hook.remove()
    return {name: torch.cat(values) for name, values in stages.items()}


def probe(model_dir: str, world_dir: Path, images: int = 2000) -> dict[str, dict[str, float]]:
    """stage -> {"column": accuracy, "row": accuracy} for the objects of the first `images` training images."""
    model, tokenizer, processor = load_pretrained(model_dir)
    model.eval()
    if model.cfg.vision.select_feature != "patch" or model.cfg.num_image_tokens() != GRID * GRID:
        raise SystemExit(f"{model_dir}: the probe needs one image token per grid cell ({GRID * GRID} patch tokens)")
    objects = json.loads((world_dir / "objects.json").read_text())
    paths = [p for p in objects if Path(p).name.startswith("train_")][:images]
    cell = json.loads((world_dir / "world.json").read_text())["config"]["image_size"] // GRID
    features = stage_features(model, tokenizer, processor, [world_dir / p for p in paths])
    # (image, column, row) of every object; its image token is row * GRID + column (row-major patches)
    cells = torch.tensor([(i, o["x"] // cell, o["y"] // cell)
                          for i, path in enumerate(paths) for o in objects[path]])
    image_index, column, row = cells.T
    at_objects = {name: f[image_index, row * GRID + column] for name, f in features.items()}
    return {name: {"column": probe_accuracy(f, column), "row": probe_accuracy(f, row)}
            for name, f in at_objects.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="a tiny-preset checkpoint directory, e.g. out/tiny/sft")
    parser.add_argument("--world", type=Path, default=Path("out/shapes"))
    parser.add_argument("--images", type=int, default=2000)
    args = parser.parse_args(argv)
    results = probe(args.model, args.world, args.images)
    print(f"{args.model}: linear probes of each object's grid cell (%; chance 25)")
    print("| stage | column | row |\n|---|---:|---:|")
    for name, accuracy in results.items():
        print(f"| {name} | {100 * accuracy['column']:.1f} | {100 * accuracy['row']:.1f} |")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
