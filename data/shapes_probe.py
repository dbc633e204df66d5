"""Where does a model lose track of where objects are? Linear probes and attention on the shapes world.

Spatial questions ("Is the red circle to the left of the blue square?") need the grid cell of two objects. For
every object of the first `--images` training images, this takes the feature vector at the object's image token
at each stage of the model: the vision tower's output, the projector's output, and the hidden state after each
LLM layer (the image placed in the chat template as in training, under "Describe the image."). A linear
classifier per stage learns the object's column and its row (4 classes each, chance 25%) from 80% of the
objects and is scored on the other 20%; the same at as many empty (background) cells of those images. Beside
each probe, the position's share of the features: how large the cell's code is against all a token carries.

With --attention it asks instead where the answer looks: for eval questions of each type, the attention of the
last prompt position (the one that predicts the answer's first token), in every layer and head, split into the
image token of the object the question names first, of the one it names second (spatial relations), of the
other objects and of the background cells. It prints, per layer, the head that looks most at the named
objects. A type whose answer is read off one object attends to that object far more than to the others; a
type where no head does has no lookup of the object it asks about.

    python -m data.shapes_probe out/tiny/sft
    python -m data.shapes_probe out/tiny/sft --attention
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from nanovlm import benchmarks
from nanovlm.image import ImageProcessor, load_image
from nanovlm.llm import rotate
from nanovlm.templates import get_template, tokenize_conversation
from nanovlm.tokenizer import Tokenizer
from nanovlm.vlm import VLM, load_pretrained

from .shapes import EVAL_TYPES, GRID, named_objects

PARTS = ("first named", "second named", "other objects", "background")


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


def position_share(features: torch.Tensor, cells: torch.Tensor) -> float:
    """How much of `features` (N, D) is a code of their grid cell `cells` (N,): the RMS of the per-cell means
    about their overall mean, less the spread that sampling alone gives means of that many rows, over the
    features' RMS. A probe can read a cell off perfectly from a code of any size; this says how large the code
    is beside everything else a token carries, which is what an attention that leaks onto a token mixes in."""
    means = torch.stack([features[cells == c].mean(0) for c in cells.unique()])
    sampling = torch.stack([features[cells == c].var(0).sum() / (cells == c).sum() for c in cells.unique()]).mean()
    between = ((means - means.mean(0)) ** 2).sum(1).mean() - sampling
    return (between.clamp(min=0) / (features ** 2).sum(1).mean()).sqrt().item()


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
            model.hidden(torch.tensor([ids] * len(pixels)), pixels)
            for name, value in outputs.items():
                stages[name].append((value[:, image_slice] if name in llm_stages else value).float())
    finally:
        for hook in hooks:
            hook.remove()
    return {name: torch.cat(values) for name, values in stages.items()}


def load(model_dir: str, world_dir: Path) -> tuple[VLM, Tokenizer, ImageProcessor, dict[str, list[dict]], int]:
    """The model (one image token per grid cell, or exit), the world's objects per image, and a cell's side."""
    model, tokenizer, processor = load_pretrained(model_dir)
    model.eval()
    if model.cfg.vision.select_feature != "patch" or model.cfg.num_image_tokens() != GRID * GRID:
        raise SystemExit(f"{model_dir}: the probe needs one image token per grid cell ({GRID * GRID} patch tokens)")
    objects = json.loads((world_dir / "objects.json").read_text())
    cell = json.loads((world_dir / "world.json").read_text())["config"]["image_size"] // GRID
    return model, tokenizer, processor, objects, cell


def token_of(o: dict, cell: int) -> int:
    """The image token an object sits on: its grid cell, row-major like the patches."""
    return (o["y"] // cell) * GRID + o["x"] // cell


def probe(model_dir: str, world_dir: Path, images: int = 2000) -> dict[str, dict[str, float]]:
    """stage -> {"column", "row", "position share", and the same three prefixed "background "}: the probes'
    accuracies and `position_share` at the objects of the first `images` training images, and at as many of
    their empty cells (a seeded draw). Position left on the background is what an answer's attention mixes into
    an object's when it does not single the object out."""
    model, tokenizer, processor, objects, cell = load(model_dir, world_dir)
    paths = [p for p in objects if Path(p).name.startswith("train_")][:images]
    features = stage_features(model, tokenizer, processor, [world_dir / p for p in paths])
    # (image, column, row) of every object; its image token is row * GRID + column (row-major patches)
    cells = torch.tensor([(i, o["x"] // cell, o["y"] // cell)
                          for i, path in enumerate(paths) for o in objects[path]])
    empty = torch.tensor([(i, c % GRID, c // GRID) for i, path in enumerate(paths)
                          for c in sorted(set(range(GRID * GRID)) - {token_of(o, cell) for o in objects[path]})])
    empty = empty[torch.randperm(len(empty), generator=torch.Generator().manual_seed(0))[:len(cells)]]
    results = {name: {} for name in features}
    for prefix, (image_index, column, row) in (("", cells.T), ("background ", empty.T)):
        for name, f in features.items():
            at_cells = f[image_index, row * GRID + column]
            results[name] |= {prefix + "column": probe_accuracy(at_cells, column),
                              prefix + "row": probe_accuracy(at_cells, row),
                              prefix + "position share": position_share(at_cells, row * GRID + column)}
    return results


def named_cells(question: str, objects: list[dict], cell: int) -> list[list[int]] | None:
    """The image tokens (row-major cells) of each object the question names, in the order named; None when a
    name matches no object of the image (an existence question answered "no") or the question names none."""
    named = named_objects(question, objects)
    return None if named is None else [[token_of(o, cell) for o in name] for name in named]


def parts_of_image(named: list[list[int]], objects: list[dict], cell: int) -> list[list[int]]:
    """The image tokens split into PARTS: the first-named object's, the second-named one's, the other objects'
    and the background's; every token in exactly one."""
    first, second = named[0], named[1] if len(named) > 1 else []
    others = sorted({token_of(o, cell) for o in objects} - set(first) - set(second))
    background = [c for c in range(GRID * GRID) if c not in first + second + others]
    return [first, second, others, background]


@torch.no_grad()
def last_position_attention(model: VLM, ids: list[int], pixels: torch.Tensor) -> torch.Tensor:
    """(layers, heads, T) softmax attention of the last position of one prompt, recomputed from each attention
    layer's input (its queries and keys, rotated as the layer rotates them)."""
    rows = []

    def record(attention, args):
        x, cos, sin = args[:3]  # (1, T, D) normalised input, (1, 1, T, head_dim) rotary tables
        q = rotate(attention.q_proj(x[:, -1:]).view(1, 1, attention.n_head, -1).transpose(1, 2),
                   cos[:, :, -1:], sin[:, :, -1:])  # (1, heads, 1, head_dim)
        k = rotate(attention.k_proj(x).view(1, x.shape[1], attention.n_kv, -1).transpose(1, 2), cos, sin)
        k = k.repeat_interleave(attention.n_head // attention.n_kv, dim=1)  # (1, heads, T, head_dim)
        rows.append((q @ k.transpose(-1, -2) / attention.head_dim ** 0.5).softmax(-1)[0, :, 0])  # (heads, T)

    hooks = [block.self_attn.register_forward_pre_hook(record) for block in model.language_model.layers]
    try:
        model.hidden(torch.tensor([ids]), pixels[None])
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack(rows)


def attention_shares(model_dir: str, world_dir: Path, questions: int = 150) -> dict[str, dict]:
    """question type -> {"questions": n, "layers": [per layer, the head that looks most at the named objects
    (first and second together): {"head", and the share of its attention on each of PARTS}]}, over the first `questions`
    in-distribution eval questions of each type that name objects present in the image."""
    model, tokenizer, processor, objects, cell = load(model_dir, world_dir)
    records = benchmarks.load("shapes", world_dir / "eval.json").records
    template = get_template(model.cfg.template)
    results = {}
    for qtype in EVAL_TYPES:
        totals, n = None, 0
        for record in records:
            if record["type"] != qtype or record["split"] != "in_distribution":
                continue
            named = named_cells(record["question"], objects[record["image"]], cell)
            if named is None:
                continue
            conversation = [{"from": "human", "value": benchmarks.prompt("shapes", record)}]
            ids, _ = tokenize_conversation(tokenizer, template, conversation, GRID * GRID, generation_prompt=True)
            first = ids.index(model.cfg.image_token_id)
            image = last_position_attention(model, ids, processor(load_image(world_dir / record["image"])))
            image = image[..., first:first + GRID * GRID]  # (layers, heads, cells)
            parts = parts_of_image(named, objects[record["image"]], cell)
            shares = torch.stack([image[..., p].sum(-1) for p in parts], dim=-1)  # (layers, heads, PARTS)
            totals = shares if totals is None else totals + shares
            n += 1
            if n == questions:
                break
        if n:
            mean = totals / n
            layers = []
            for layer in mean:
                head = int(layer[:, :2].sum(-1).argmax())
                layers.append({"head": head} | {part: round(float(v), 4) for part, v in zip(PARTS, layer[head])})
            results[qtype] = {"questions": n, "layers": layers}
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="a tiny-preset checkpoint directory, e.g. out/tiny/sft")
    parser.add_argument("--world", type=Path, default=Path("out/shapes"))
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--attention", action="store_true", help="where the answer looks, per question type")
    parser.add_argument("--questions", type=int, default=150, help="eval questions per type for --attention")
    args = parser.parse_args(argv)
    if args.attention:
        shares = attention_shares(args.model, args.world, args.questions)
        print(f"{args.model}: attention of the answer position (share, per layer the head that looks most at the "
              "named objects)")
        print("| question | layer | head | " + " | ".join(PARTS) + " |\n|---|---:|---:|" + "---:|" * len(PARTS))
        for qtype, result in shares.items():
            for i, layer in enumerate(result["layers"]):
                print(f"| {qtype} ({result['questions']}) | {i + 1} | {layer['head']} | "
                      + " | ".join(f"{layer[part]:.2f}" for part in PARTS) + " |")
        return shares
    results = probe(args.model, args.world, args.images)
    print(f"{args.model}: linear probes of the grid cell at objects and at empty cells (%; chance 25), and the "
          "position's share of the features (%)")
    print("| stage | column | row | position share | background column | background row | background position "
          "share |\n|---|---:|---:|---:|---:|---:|---:|")
    for name, values in results.items():
        print(f"| {name} | " + " | ".join(f"{100 * v:.1f}" for v in values.values()) + " |")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
