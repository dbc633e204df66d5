"""Speed of nanovlm against transformers' LlavaForConditionalGeneration on CPU, on the same weights.

One tiny-but-not-trivial random llava checkpoint (CLIP 256-wide x 4 layers at 112 px = 64 image tokens, Llama
256-wide x 4 layers with GQA and a 4096-token vocabulary) is written by transformers, its weights perturbed as
in the tests' reference checkpoints (so greedy decoding does not just repeat one token), and loaded by both
libraries in float32. Measured, after checking that both compute the same thing:

- a training step: forward + backward of the loss on a batch of 8 x 192 tokens (64 image + 128 text, the
  image and the first 32 text tokens masked out of the loss as in a LLaVA prompt), in ms per batch;
- greedy generation of exactly 64 new tokens for one prompt and for 8 left-padded prompts, in tokens/s.

Run from the repository root (transformers must be installed, as for the tests):

    python tests/benchmark_speed.py [--threads N] [--iters 10] [--json results.json]
"""

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import tokenizers
import torch
import transformers
from transformers import LlavaConfig, LlavaForConditionalGeneration

import hub_models  # tests/, on the path when run as a script
from nanovlm.generate import Sampling, generate
from nanovlm.tokenizer import Tokenizer
from nanovlm.vlm import VLM

VISION = dict(model_type="clip_vision_model", hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
              intermediate_size=1024, image_size=112, patch_size=14, hidden_act="quick_gelu")
TEXT = dict(model_type="llama", hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
            intermediate_size=768, vocab_size=4096, max_position_embeddings=1024)
IMAGE_TOKEN = 4095
IMAGE_TOKENS = (VISION["image_size"] // VISION["patch_size"]) ** 2  # 64
QUESTION_TOKENS = 32  # text tokens at the start of each training sample that the loss skips
PAD = 0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    p.add_argument("--iters", type=int, default=10, help="timed training steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs before each measurement")
    p.add_argument("--gen-iters", type=int, default=5, help="timed generation runs (median reported)")
    p.add_argument("--batch", type=int, default=8, help="training batch size and number of batched prompts")
    p.add_argument("--text-len", type=int, default=128, help="text tokens per training sample")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per prompt")
    p.add_argument("--json", type=Path, help="also write the results to this file")
    return p.parse_args()


def build_checkpoint(path: Path, vision: dict = VISION, text: dict = TEXT) -> None:
    """A random llava checkpoint of these shapes (the image token the vocabulary's last), written by transformers."""
    torch.manual_seed(0)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=text["vocab_size"] - 1,
                      image_seq_length=(vision["image_size"] // vision["patch_size"]) ** 2,
                      tie_word_embeddings=text.get("tie_word_embeddings", False))
    model = LlavaForConditionalGeneration(cfg)
    hub_models.perturb(model)
    model.save_pretrained(path)


def word_level_tokenizer(vocab_size: int = TEXT["vocab_size"]) -> Tokenizer:
    """generate() needs a tokenizer only for its pad and end-of-sequence ids. The end-of-sequence id is the image
    placeholder (the vocabulary's last id): nanovlm masks it out of every step, and transformers' min_new_tokens
    masks its eos until the last token, so both decode exactly `--new-tokens` greedy tokens under the same
    constraint."""
    image_token = vocab_size - 1
    vocab = {f"t{i}": i for i in range(image_token)} | {"<image>": image_token}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="t0"))
    return Tokenizer(tok, bos_ids=[], eos_id=image_token, pad_id=PAD)


def text_tokens(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(1, IMAGE_TOKEN, (n,), generator=generator)


def median_seconds(fn, iters: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def training_batch(batch: int, text_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Image first, then text; labels only on the text after its first QUESTION_TOKENS tokens, as in LLaVA."""
    g = torch.Generator().manual_seed(1)
    ids = torch.stack([torch.cat([torch.full((IMAGE_TOKENS,), IMAGE_TOKEN), text_tokens(text_len, g)])
                       for _ in range(batch)])
    labels = ids.clone()
    labels[:, :IMAGE_TOKENS + QUESTION_TOKENS] = -100
    pixels = torch.randn(batch, 3, VISION["image_size"], VISION["image_size"], generator=g)
    return ids, labels, pixels


def bench_training(ours: VLM, ref: LlavaForConditionalGeneration, args) -> dict:
    ids, labels, pixels = training_batch(args.batch, args.text_len)
    losses = {"nanovlm": lambda: ours.loss(ids, labels, pixels),
              "transformers": lambda: ref(input_ids=ids, pixel_values=pixels, labels=labels).loss}
    ours_loss, ref_loss = losses["nanovlm"]().item(), losses["transformers"]().item()
    assert abs(ours_loss - ref_loss) < 1e-4, f"losses differ: nanovlm {ours_loss}, transformers {ref_loss}"

    def step(model, loss_fn):
        model.zero_grad(set_to_none=True)
        loss_fn().backward()

    ms = {name: 1000 * median_seconds(partial(step, model, losses[name]), args.iters, args.warmup)
          for name, model in (("nanovlm", ours), ("transformers", ref))}
    return {"loss": ours_loss, "ms_per_batch": ms, "speedup": ms["transformers"] / ms["nanovlm"]}


def generation_prompts(n: int) -> tuple[list[list[int]], torch.Tensor]:
    """n prompts of one image and 16, 24, 32, ... text tokens; with their images in order."""
    g = torch.Generator().manual_seed(2)
    prompts = [[IMAGE_TOKEN] * IMAGE_TOKENS + text_tokens(16 + 8 * i, g).tolist() for i in range(n)]
    return prompts, torch.randn(n, 3, VISION["image_size"], VISION["image_size"], generator=g)


def reference_generate(ref: LlavaForConditionalGeneration, prompts: list[list[int]], pixels: torch.Tensor,
                       new_tokens: int) -> list[list[int]]:
    length = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (length - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts])
    out = ref.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, do_sample=False,
                       min_new_tokens=new_tokens, max_new_tokens=new_tokens, eos_token_id=IMAGE_TOKEN,
                       pad_token_id=PAD)
    return out[:, length:].tolist()


def bench_generation(ours: VLM, ref: LlavaForConditionalGeneration, prompts: list[list[int]], pixels: torch.Tensor,
                     args) -> dict:
    tokenizer, sampling = word_level_tokenizer(), Sampling(max_new_tokens=args.new_tokens)
    runs = {"nanovlm": lambda: generate(ours, tokenizer, prompts, pixels, sampling),
            "transformers": lambda: reference_generate(ref, prompts, pixels, args.new_tokens)}
    tokens = {name: run() for name, run in runs.items()}
    for name, outputs in tokens.items():
        assert all(len(t) == args.new_tokens for t in outputs), f"{name} stopped early"
    tokens_per_s = {name: len(prompts) * args.new_tokens / median_seconds(run, args.gen_iters, args.warmup)
                    for name, run in runs.items()}
    return {"same_tokens": tokens["nanovlm"] == tokens["transformers"], "tokens_per_s": tokens_per_s,
            "speedup": tokens_per_s["nanovlm"] / tokens_per_s["transformers"]}


def machine(threads: int) -> dict:
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.exists() else []
    return {"cpu": names[0] if names else platform.processor() or platform.machine(), "threads": threads,
            "torch": torch.__version__, "transformers": transformers.__version__}


def table(results: dict, args) -> str:
    train, single, batched = results["train"], results["generate_1"], results["generate_batch"]
    rows = [
        (f"train step, batch {args.batch} x {IMAGE_TOKENS + args.text_len} (ms/batch, lower is better)",
         train["ms_per_batch"], train["speedup"], ".1f"),
        (f"generate 1 prompt x {args.new_tokens} tokens (tokens/s)", single["tokens_per_s"], single["speedup"],
         ".0f"),
        (f"generate {args.batch} prompts x {args.new_tokens} tokens (tokens/s)", batched["tokens_per_s"],
         batched["speedup"], ".0f"),
    ]
    lines = ["| benchmark | nanovlm | transformers | nanovlm speedup |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {v['nanovlm']:{fmt}} | {v['transformers']:{fmt}} | {speedup:.2f}x |"
              for name, v, speedup, fmt in rows]
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        build_checkpoint(Path(tmp))
        ours = VLM.from_pretrained(tmp)
        ref = LlavaForConditionalGeneration.from_pretrained(tmp, dtype=torch.float32, attn_implementation="sdpa")
    results = {"machine": machine(torch.get_num_threads())}
    results["train"] = bench_training(ours.train(), ref.train(), args)
    ours.eval()
    ref.eval()
    prompts, pixels = generation_prompts(args.batch)
    results["generate_1"] = bench_generation(ours, ref, prompts[:1], pixels[:1], args)
    assert results["generate_1"]["same_tokens"], "greedy tokens differ between nanovlm and transformers"
    results["generate_batch"] = bench_generation(ours, ref, prompts, pixels, args)

    info = results["machine"]
    print(f"{info['cpu']}, {info['threads']} threads, torch {info['torch']}, transformers {info['transformers']}\n")
    print(table(results, args))
    print(f"\nloss {results['train']['loss']:.6f} on both; single-prompt greedy tokens identical; batched tokens "
          f"{'identical' if results['generate_batch']['same_tokens'] else 'differ'}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
