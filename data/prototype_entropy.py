"""How far SQ-LLaVA's prototype extractor is from a uniform soft assignment (nanovlm/prototypes.py).

Each iteration t of the extractor gives every patch a softmax A_t over the K centres. Its entropy H, averaged
over the patches of every image and over the images, is reported relative to log K: 1 is the uniform
assignment (every centre weighs 1/K, so the iterations only average the patches), 0 a one-hot one. The
report also gives 1 - H / log K, which resolves how close to uniform it is, and the mean of each patch's
largest weight against 1/K.

    python -m data.prototype_entropy out/tiny/align-prototypes            # on the shapes world's eval images
    python -m data.prototype_entropy out/tiny/align --new 8 --norm token  # a new extractor on that model
"""

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from nanovlm.checkpoint import write_json
from nanovlm.image import load_image
from nanovlm.prototypes import KEY_NORMS
from nanovlm.recipe import SHAPES_DIR
from nanovlm.vlm import VLM, load_pretrained


def relative_entropy(assignment: torch.Tensor) -> float:
    """The entropy of each patch's weights over the K centres, A (N, K, L), averaged over patches and images,
    over log K. In float64: float32 would carry an error of about 1e-7, the size of what is measured."""
    a = assignment.double()
    return float((-(a * a.clamp_min(1e-300).log()).sum(1)).mean() / math.log(a.shape[1]))


@torch.no_grad()
def assignment_stats(model: VLM, pixels: torch.Tensor) -> dict:
    """Per iteration, over the images `pixels` (N, 3, H, W): the relative entropy of A, 1 minus it, and the
    mean largest weight of a patch."""
    extractor = model.prototype_extractor
    features = model.vision_tower(pixels)  # (N, L, D)
    _, assignments = extractor.cluster(features, extractor.value(features))  # T x (N, K, L)
    ratios = [relative_entropy(a) for a in assignments]
    return {"entropy_over_log_k": ratios, "one_minus_entropy_over_log_k": [1 - r for r in ratios],
            "mean_max_weight": [float(a.max(1).values.mean()) for a in assignments],
            "uniform_weight": 1 / extractor.num_prototypes}


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a checkpoint directory with a prototype extractor (or any, with --new)")
    parser.add_argument("--world", type=Path, default=SHAPES_DIR, help="the shapes world whose eval images are used")
    parser.add_argument("--images", type=int, default=256, help="how many eval images")
    parser.add_argument("--new", type=int, default=0, metavar="K",
                        help="measure a newly initialised extractor with K centres instead (seeded as train_align.py)")
    parser.add_argument("--norm", default="feature", choices=KEY_NORMS, help="the new extractor's axis of v(x)")
    parser.add_argument("--seed", type=int, default=0, help="the new extractor's initialisation")
    parser.add_argument("--json", type=Path, help="also add the result to this file's \"measurements\" list")
    args = parser.parse_args(argv)
    model, _, processor = load_pretrained(args.model)
    if args.new:
        torch.manual_seed(args.seed)
        model.add_prototype_extractor(args.new, args.norm)
    if model.prototype_extractor is None:
        raise SystemExit(f"{args.model} has no prototype extractor (train_align.py --prototypes K trains one)")
    files = sorted({r["image"] for r in json.loads((args.world / "eval.json").read_text())})[:args.images]
    pixels = torch.stack([processor(load_image(args.world / f)) for f in files])
    result = {"model": args.model, "new_extractor": bool(args.new), "images": len(files),
              "prototypes": model.cfg.prototypes, "key_norm": model.cfg.prototype_norm}
    result |= assignment_stats(model.eval(), pixels)
    print(json.dumps(result, indent=2))
    if args.json:
        record = result | {"command": "python -m data.prototype_entropy " + " ".join(argv)}
        earlier = json.loads(args.json.read_text())["measurements"] if args.json.is_file() else []
        write_json(args.json, {"measurements": earlier + [record]})
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
