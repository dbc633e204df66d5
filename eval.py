"""Evaluate a VLM on a benchmark, or answer one question about one image.

MODEL is a nanovlm checkpoint directory, a llava-hf repo id on the Hub or a local llava-hf directory. A benchmark
run generates greedily in batches with the KV cache, prints a table and writes every prediction to JSON
(--out; by default eval_TASK.json beside a local model, else under out/eval/). Tasks and file formats:
nanovlm/benchmarks.py.

    python eval.py out/tiny/sft --task shapes                       # the shapes world's eval split
    python eval.py out/tiny/iccc --task caption_ranking             # true captions against corrupted ones
    python eval.py llava-hf/llava-1.5-7b-hf --task pope --data out/pope/pope.jsonl
    python eval.py llava-hf/llava-1.5-7b-hf --task grounding --data out/refcoco/refcoco_testA.jsonl
    python eval.py out/tiny/sft --image out/shapes/images/eval_000000.png --prompt "How many objects are there?"
    python eval.py out/tiny/selfq --image out/shapes/images/eval_000000.png --self_questions 3   # SQ-LLaVA
    python eval.py out/tiny/stic --task shapes --dar                 # STIC's describe-and-respond
"""

import argparse
import sys
import time
from functools import partial
from pathlib import Path

import torch

from data import caption_ranking as caption_ranking_data
from data import shapes_eval
from nanovlm import benchmarks, caption_ranking
from nanovlm.checkpoint import write_json
from nanovlm.config import number
from nanovlm.generate import Sampling, answer
from nanovlm.image import load_image
from nanovlm.recipe import SHAPES_DIR
from nanovlm.selfq import ask_questions
from nanovlm.stic import DESCRIPTION_TOKENS, describe_and_respond
from nanovlm.templates import TEMPLATES, get_template
from nanovlm.vlm import load_pretrained


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="nanovlm checkpoint directory, llava-hf repo id or local llava-hf directory")
    parser.add_argument("--task", choices=benchmarks.TASKS, default="shapes")
    parser.add_argument("--data", help=f"benchmark file (shapes: default {SHAPES_DIR / 'eval.json'}; caption_ranking: "
                        f"default the shapes world's eval captions, {SHAPES_DIR / 'caption_ranking.jsonl'})")
    parser.add_argument("--limit", type=number(int, ">= 0"), default=0, help="evaluate only the first N records")
    parser.add_argument("--batch_size", type=number(int, ">= 1"), default=64)
    parser.add_argument("--max_new_tokens", type=number(int, ">= 1"), default=64)
    parser.add_argument("--allow_absolute_image_paths", action="store_true",
                        help="benchmark records may name images outside the benchmark file's folder")
    parser.add_argument("--out", help="predictions JSON (default: eval_TASK.json, eval_TASK_dar.json with --dar, "
                        "eval_TASK_TEMPLATE.json with --template, beside a local model)")
    parser.add_argument("--image", help="answer one question about this image (with --prompt)")
    parser.add_argument("--prompt", help="the question to ask about --image")
    parser.add_argument("--temperature", type=number(float, ">= 0"), default=0.0, help="one-question mode; 0 is greedy")
    parser.add_argument("--self_questions", type=number(int, ">= 0"), default=0,
                        help="with --image: describe it, then pose N questions about it as the visual user of "
                             "the v1_sq template (SQ-LLaVA models)")
    parser.add_argument("--seed", type=number(int, ">= 0"), default=0, help="sampling seed of --self_questions")
    parser.add_argument("--dar", action="store_true",
                        help="STIC's describe-and-respond: describe each image first, then answer with the description")
    parser.add_argument("--description_tokens", type=number(int, ">= 1"), default=DESCRIPTION_TOKENS,
                        help="longest description --dar writes")
    parser.add_argument("--template", choices=sorted(TEMPLATES),
                        help="answer with this chat template, not the one the model's config names (e.g. v1_sq, "
                             "the template a SQ-LLaVA model trained with; the official evaluation uses vicuna_v1)")
    parser.add_argument("--revision", help="Hub revision of MODEL")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="weights' dtype; auto: bfloat16 on GPU, float32 on CPU (bfloat16 is faster on CPUs with "
                        "native bfloat16, such as avx512_bf16, but may change near-tie greedy answers)")
    parser.add_argument("--compile", action="store_true",
                        help="decode through torch.compile with a static KV cache (a CUDA graph on GPU, weights "
                        "prepacked on CPU): faster steps after a compile of about a minute per batch shape")
    args = parser.parse_args(argv)
    if args.image and not (args.prompt or args.self_questions):
        parser.error("--image needs --prompt or --self_questions")
    if (args.prompt or args.self_questions) and not args.image:
        parser.error("--prompt and --self_questions need --image")
    if args.dar and args.task == "caption_ranking":
        parser.error("--dar describes before answering; caption_ranking scores captions and generates nothing")
    return args


def default_out(model: str, task: str) -> Path:
    folder = Path(model) if Path(model).is_dir() else Path("out/eval") / model.replace("/", "--")
    return folder / f"eval_{task}.json"


def main(argv: list[str] | None = None) -> dict | str | list[str]:
    args = parse(argv)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(
        args.dtype, torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    model, tokenizer, processor = load_pretrained(args.model, args.revision, dtype, args.device)
    model.eval()
    if args.template:
        model.cfg.template = args.template
    if args.compile:
        model.language_model.compile_decoding()
    respond = partial(describe_and_respond, description_tokens=args.description_tokens) if args.dar else answer
    if args.self_questions:
        # SQ-LLaVA answers with its chat template but asks as the visual user of v1_sq, the template it trained with
        description, questions = ask_questions(model, tokenizer, processor, get_template("v1_sq"),
                                               load_image(args.image), args.self_questions,
                                               generator=torch.Generator(args.device).manual_seed(args.seed))
        print(f"description: {description}\n" + "\n".join(f"VUSER: {q}" for q in questions))
        return questions
    if args.image:
        sampling = Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
        [reply] = respond(model, tokenizer, processor, get_template(model.cfg.template),
                          [(load_image(args.image), "<image>\n" + args.prompt)], sampling)
        print(reply)
        return reply

    absolute = args.allow_absolute_image_paths
    start = time.perf_counter()
    if args.task == "shapes":
        benchmark = benchmarks.load(args.task, args.data or SHAPES_DIR / "eval.json", args.limit, absolute)
        scores, predictions = shapes_eval.evaluate_benchmark(model, tokenizer, processor, benchmark, args.batch_size,
                                                             respond=respond)
        table = shapes_eval.format_table(scores)
    elif args.task == "caption_ranking":  # likelihoods, not generation
        benchmark = benchmarks.load(args.task, args.data or caption_ranking_data.shapes_benchmark(SHAPES_DIR),
                                    args.limit, absolute)
        scores, predictions = caption_ranking.evaluate(model, tokenizer, processor, benchmark, args.batch_size)
        table = caption_ranking.format_table(scores)
    else:
        if not args.data:
            raise SystemExit(f"--data is required for --task {args.task}")
        benchmark = benchmarks.load(args.task, args.data, args.limit, absolute)
        answers = benchmarks.predict(model, tokenizer, processor, benchmark,
                                     Sampling(max_new_tokens=args.max_new_tokens), args.batch_size, respond=respond)
        scores = benchmarks.score(benchmark, answers)
        predictions = [r | {"prediction": a} for r, a in zip(benchmark.records, answers)]
        table = benchmarks.format_scores(args.task, scores)
    seconds = time.perf_counter() - start
    print(f"\n{args.model}, task {args.task}{' (describe-and-respond)' * args.dar}:\n{table}")
    print(f"{len(predictions)} questions in {seconds:.1f} s: {len(predictions) / seconds:.2f} questions/s")
    # another template's answers go to their own file, beside (not over) those of the model's own template
    suffix = "_dar" * args.dar + (f"_{args.template}" if args.template else "")
    out = Path(args.out) if args.out else default_out(args.model, args.task + suffix)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, {"model": args.model, "task": args.task, "data": args.data, "dar": args.dar,
                     "template": model.cfg.template, "scores": scores, "predictions": predictions})
    print(f"predictions: {out}")
    return scores


if __name__ == "__main__":
    main(sys.argv[1:])
