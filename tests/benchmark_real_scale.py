"""Speed at a real model's size: nanovlm against transformers' LlavaForConditionalGeneration on the same weights,
and against this machine's own limits.

The model has SmolLM2-135M's shape (576 wide, 30 layers, 9 query and 3 key-value heads, MLP 1536, a tied
49,152-token vocabulary) behind a CLIP ViT-B/16-shaped tower at 224 px (196 image tokens; 86M + 135M
parameters). Its random weights are written by transformers in the llava-hf layout, so nothing is downloaded,
and perturbed as in the tests' checkpoints. After checking that nanovlm and transformers (attention "sdpa")
compute the same thing (loss, greedy tokens), their timed runs are interleaved, A B A B ..., so that the noise
of a shared machine falls on every implementation alike; the tables give medians and ranges.

- training step: forward + backward of the loss on 4 x 512 tokens (an image, then text; the image and the first
  32 text tokens masked out of the loss as in a LLaVA prompt), the vision tower frozen as in LLaVA's recipes;
- greedy generation of exactly 64 tokens for 1 prompt and for 4 left-padded prompts (212-236 tokens each), in
  tokens/s end to end (image encoding and prefill included); the prefill alone is timed too (1 new token), so
  a decoding step's time is (all - prefill) / 63.

Each row has its roofline: useful GFLOP/s (the FLOPs nanovlm's step executes, counted by torch's FlopCounterMode,
over the time) against the matmul peak, and for decoding, the GB/s of weights and KV cache a step must read
against the memory bandwidth; peak and bandwidth are measured here by a matmul and a memory micro-benchmark.
nanovlm's speed switches are timed beside its defaults: bfloat16 weights (--bf16; greedy agreement with float32
is reported, not assumed), and with --compile, a compiled decoding step (LLM.compile_decoding, with inductor's
freezing; the compile's time is reported) and compiled decoder blocks in the training step (LLM.compile_blocks).

Run from the repository root (transformers must be installed, as for the tests); the model is written once to
--checkpoint (default: a temporary folder):

    python tests/benchmark_real_scale.py --bf16 --compile --json results/speed_real_scale.json
"""

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlavaForConditionalGeneration

from benchmark_speed import build_checkpoint, word_level_tokenizer  # tests/, on the path as a script
from nanovlm.generate import Sampling, generate
from nanovlm.vlm import VLM

VISION = dict(model_type="clip_vision_model", hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, image_size=224, patch_size=16, hidden_act="quick_gelu")
TEXT = dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
            num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
            rms_norm_eps=1e-5, tie_word_embeddings=True)  # HuggingFaceTB/SmolLM2-135M's config.json
IMAGE_TOKEN = TEXT["vocab_size"] - 1
IMAGE_TOKENS = (VISION["image_size"] // VISION["patch_size"]) ** 2  # 196
QUESTION_TOKENS = 32  # text tokens at the start of each training sample that the loss skips
PAD = 0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    p.add_argument("--iters", type=int, default=3, help="timed training steps per implementation")
    p.add_argument("--gen-iters", type=int, default=5, help="timed generations per implementation and batch")
    p.add_argument("--batch", type=int, default=4, help="training batch and number of batched prompts")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per training sample")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per prompt")
    p.add_argument("--bf16", action="store_true", help="also time both libraries with bfloat16 weights")
    p.add_argument("--compile", action="store_true",
                   help="also time nanovlm's compiled decoding step and its training step with compiled blocks")
    p.add_argument("--skip-train", action="store_true", help="generation only")
    p.add_argument("--profile", action="store_true", help="print where nanovlm's time goes (torch.profiler)")
    p.add_argument("--checkpoint", type=Path, help="where the random model is written (reused if present)")
    p.add_argument("--json", type=Path, help="also write the results to this file")
    return p.parse_args()


# ---------------------------------------------------------------------------------------------------------------
# The machine's limits


def best_seconds(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def machine_peaks() -> dict:
    """Matmul GFLOP/s (float32, bfloat16) of a 2048^3 product and memory GB/s of reading (a sum) and copying 512
    MiB, far beyond the caches; the best of 5 runs each, as a peak is the best the machine does."""
    n = 2048
    peaks = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        peaks[f"matmul_gflops_{name}"] = 2 * n**3 / best_seconds(lambda a=a, b=b: a @ b) / 1e9
    x = torch.ones(128 * 2**20)  # 512 MiB
    y = torch.empty_like(x)
    peaks["read_gbs"] = x.nbytes / best_seconds(x.sum) / 1e9
    peaks["copy_gbs"] = 2 * x.nbytes / best_seconds(lambda: y.copy_(x)) / 1e9  # read + write
    return peaks


def machine(threads: int) -> dict:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    return {"cpu": names[0] if names else platform.processor() or platform.machine(), "threads": threads,
            "avx512_bf16": "avx512_bf16" in flags, "torch": torch.__version__,
            "transformers": transformers.__version__, "load_average_before": os.getloadavg()}


# ---------------------------------------------------------------------------------------------------------------
# The model, the inputs and the work they take


def training_batch(batch: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, IMAGE_TOKEN, (batch, seq_len), generator=g)
    ids[:, 1:1 + IMAGE_TOKENS] = IMAGE_TOKEN
    labels = ids.clone()
    labels[:, :1 + IMAGE_TOKENS + QUESTION_TOKENS] = -100
    return ids, labels, torch.randn(batch, 3, VISION["image_size"], VISION["image_size"], generator=g)


def generation_prompts(n: int) -> tuple[list[list[int]], torch.Tensor]:
    """n prompts of one image and 16, 24, 32, ... text tokens; with their images in order."""
    g = torch.Generator().manual_seed(2)
    prompts = [[IMAGE_TOKEN] * IMAGE_TOKENS + torch.randint(1, IMAGE_TOKEN, (16 + 8 * i,), generator=g).tolist()
               for i in range(n)]
    return prompts, torch.randn(n, 3, VISION["image_size"], VISION["image_size"], generator=g)


def attention_flops(query, key, value, dropout_p=0.0, is_causal=False, *args, out_shape=None, **kwargs) -> int:
    """QK^T and PV of torch's CPU attention kernel (FlopCounterMode counts only the GPU ones); a causal kernel
    skips the masked half."""
    b, h, t, d = query
    return 4 * b * h * t * key[2] * d // (2 if is_causal else 1)


def attention_backward_flops(grad_out, query, key, value, out, logsumexp, dropout_p=0.0, is_causal=False, *args,
                             out_shape=None, **kwargs) -> int:
    return 2 * attention_flops(query, key, value, is_causal=is_causal)


def counted_flops(fn) -> int:
    aten = torch.ops.aten
    mapping = {aten._scaled_dot_product_flash_attention_for_cpu: attention_flops,
               aten._scaled_dot_product_flash_attention_for_cpu_backward: attention_backward_flops}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return counter.get_total_flops()


def decode_bytes(model: VLM, batch: int, prompt_lens: list[int], new_tokens: int) -> float:
    """Bytes one decoding step must read, averaged over the steps: every LLM weight once (the tied embedding is
    the output head) and each sequence's keys and values so far."""
    llm = model.language_model
    weights = sum(p.nbytes for p in llm.parameters())  # parameters() yields a tied weight once
    cfg, itemsize = llm.cfg, llm.embed_tokens.weight.element_size()
    per_position = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * itemsize
    positions = batch * max(prompt_lens) + batch * (new_tokens / 2)  # left-padded: every row is max long
    return weights + per_position * positions


# ---------------------------------------------------------------------------------------------------------------
# Interleaved timing


def interleaved(runs: dict, iters: int, warmup: bool = True) -> dict[str, list[float]]:
    """Seconds of each run per round, the runs taking turns (the order reversed every other round, so that none
    always follows the same neighbour), after an untimed warm-up call of each."""
    for run in runs.values() if warmup else ():
        run()
    times = {name: [] for name in runs}
    for i in range(iters):
        for name in (list(runs) if i % 2 == 0 else list(runs)[::-1]):
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
    return times


def summary(seconds: list[float]) -> dict:
    return {"median": statistics.median(seconds), "min": min(seconds), "max": max(seconds), "runs": seconds}


# ---------------------------------------------------------------------------------------------------------------
# The benchmarks


def bench_training(models: dict, args, peaks: dict) -> dict:
    ids, labels, pixels = training_batch(args.batch, args.seq_len)
    losses = {name: (lambda m=model: m.loss(ids, labels, pixels)) if isinstance(model, VLM) else
              (lambda m=model: m(input_ids=ids, pixel_values=pixels, labels=labels).loss)
              for name, model in models.items()}
    with torch.no_grad():
        values = {name: fn().item() for name, fn in losses.items()}
    assert all(abs(v - values["transformers"]) < 1e-4 for v in values.values()), f"losses differ: {values}"

    def step(model, loss_fn):
        model.zero_grad(set_to_none=True)
        loss_fn().backward()

    flops = counted_flops(lambda: step(models["nanovlm"], losses["nanovlm"]))
    runs = {name: lambda m=models[name], f=fn: step(m, f) for name, fn in losses.items()}
    times = interleaved(runs, args.iters)
    rows = {}
    for name, seconds in times.items():
        s = summary(seconds)
        gflops = flops / s["median"] / 1e9
        rows[name] = s | {"gflops": gflops,
                          "peak_fraction": gflops / peaks["matmul_gflops_float32"]}
    return {"loss": values, "flops": flops, "rows": rows}


def nanovlm_generation(model: VLM, prompts, pixels):
    tokenizer = word_level_tokenizer(TEXT["vocab_size"])
    return lambda n: generate(model, tokenizer, prompts, pixels, Sampling(max_new_tokens=n))


def transformers_generation(model: LlavaForConditionalGeneration, prompts, pixels):
    length = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (length - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts])
    pixels = pixels.to(model.dtype)

    def run(n: int) -> list[list[int]]:
        out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, do_sample=False,
                             min_new_tokens=n, max_new_tokens=n, eos_token_id=IMAGE_TOKEN, pad_token_id=PAD)
        return out[:, length:].tolist()

    return run


def bench_generation(models: dict, batch: int, args, peaks: dict) -> dict:
    prompts, pixels = generation_prompts(batch)
    generators = {name: (transformers_generation if name.startswith("transformers") else nanovlm_generation)(
        model, prompts, pixels) for name, model in models.items()}
    n = args.new_tokens
    tokens, first = {}, {}
    for name, gen in generators.items():  # also the warm-up, and a compiled step's compile
        start = time.perf_counter()
        tokens[name] = gen(n)
        first[name] = time.perf_counter() - start
    for name, out in tokens.items():
        assert all(len(t) == n for t in out), f"{name} stopped early"
    flops = counted_flops(lambda: generators["nanovlm"](1))
    runs = {}
    for name, gen in generators.items():
        runs[f"{name}|prefill"] = lambda g=gen: g(1)
        runs[f"{name}|all"] = lambda g=gen: g(n)
    times = interleaved(runs, args.gen_iters, warmup=False)
    rows = {}
    for name in models:
        prefill, total = summary(times[f"{name}|prefill"]), summary(times[f"{name}|all"])
        step = (total["median"] - prefill["median"]) / (n - 1)
        dtype = "bfloat16" if "bf16" in name else "float32"
        ours = models["nanovlm bf16" if dtype == "bfloat16" else "nanovlm"]
        bytes_per_step = decode_bytes(ours, batch, [len(p) for p in prompts], n)
        rows[name] = {
            "tokens_per_s": batch * n / total["median"],
            "tokens_per_s_range": [batch * n / total["max"], batch * n / total["min"]],
            "seconds": total, "prefill_seconds": prefill, "decode_step_ms": 1000 * step,
            "prefill_gflops": flops / prefill["median"] / 1e9,
            "prefill_peak_fraction": flops / prefill["median"] / 1e9 / peaks[f"matmul_gflops_{dtype}"],
            "decode_gbs": bytes_per_step / step / 1e9, "decode_bandwidth_fraction":
                bytes_per_step / step / 1e9 / peaks["read_gbs"],
        }
    same = {name: tokens[name] == tokens["transformers" + (" bf16" if "bf16" in name else "")]
            for name in tokens if name.startswith("nanovlm")}
    return {"prefill_flops": flops, "same_tokens_as_transformers": same, "tokens": tokens,
            "compile_seconds": {name: first[name] - rows[name]["seconds"]["median"] for name in models
                                if "compiled" in name}, "rows": rows}


def bf16_agreement(fp32: VLM, bf16: VLM, prompts: list[list[int]], pixels: torch.Tensor,
                   continuations: list[list[int]]) -> dict:
    """How bfloat16 weights change greedy decoding on these random weights, teacher-forced on float32's greedy
    tokens: the share of steps whose top token is the same, and how close float32's own top two were where it is
    not (random weights spread the probability thinly, so near-ties are common)."""
    agree, margins_all, margins_differ = 0, [], []
    with torch.no_grad():
        for prompt, image, continuation in zip(prompts, pixels, continuations):
            ids = torch.tensor([prompt + continuation])
            positions = slice(len(prompt) - 1, len(prompt) + len(continuation) - 1)  # each predicts the next
            logits = {name: model(ids, image[None].to(model.language_model.embed_tokens.weight.dtype))[0, positions]
                      .float() for name, model in (("fp32", fp32), ("bf16", bf16))}
            logits = {name: v.index_fill(-1, torch.tensor([IMAGE_TOKEN]), float("-inf")) for name, v in logits.items()}
            top2 = logits["fp32"].topk(2).values
            margin = (top2[:, 0] - top2[:, 1]).tolist()
            same = (logits["fp32"].argmax(-1) == logits["bf16"].argmax(-1)).tolist()
            agree += sum(same)
            margins_all += margin
            margins_differ += [m for m, s in zip(margin, same) if not s]
    steps = len(margins_all)
    return {"steps": steps, "top1_agreement": agree / steps,
            "median_fp32_margin": statistics.median(margins_all),
            "median_fp32_margin_where_differ": statistics.median(margins_differ) if margins_differ else None}


def profile(model: VLM, args) -> str:
    """The operators nanovlm spends a training step and a batch-1 generation in, and how the time splits."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    ids, labels, pixels = training_batch(args.batch, args.seq_len)
    prompts, images = generation_prompts(1)
    gen = nanovlm_generation(model, prompts, images)
    out = []
    for title, fn in (("training step", lambda: model.loss(ids, labels, pixels).backward()),
                      ("generation, batch 1", lambda: gen(args.new_tokens))):
        model.zero_grad(set_to_none=True)
        fn()
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        groups = {"matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::mkldnn_convolution"),
                  "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu",
                                "aten::_scaled_dot_product_flash_attention_for_cpu_backward")}
        shares = {g: sum(e.self_cpu_time_total for e in events if e.key in ops) / total for g, ops in groups.items()}
        shares["everything else"] = 1 - sum(shares.values())
        out.append(f"{title}: " + ", ".join(f"{g} {100 * s:.0f}%" for g, s in shares.items()))
        out.append(events.table(sort_by="self_cpu_time_total", row_limit=12))
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------------------
# The report


def fmt_range(s: dict, scale: float = 1.0, digits: int = 2) -> str:
    return f"{s['median'] * scale:.{digits}f} ({s['min'] * scale:.{digits}f}-{s['max'] * scale:.{digits}f})"


def tables(results: dict, args) -> str:
    peaks = results["peaks"]
    lines = [f"Peaks: matmul {peaks['matmul_gflops_float32']:.0f} GFLOP/s float32, "
             f"{peaks['matmul_gflops_bfloat16']:.0f} bfloat16; memory {peaks['read_gbs']:.1f} GB/s read, "
             f"{peaks['copy_gbs']:.1f} GB/s copy (read + write)", ""]
    if "train" in results:
        train = results["train"]
        ref = train["rows"]["transformers"]["median"]
        lines += [f"Training step, {args.batch} x {args.seq_len} tokens, forward + backward "
                  f"({train['flops'] / 1e12:.2f} TFLOP useful work):", "",
                  "| implementation | s/step, median (range) | time vs transformers | GFLOP/s | of matmul peak |",
                  "|---|---:|---:|---:|---:|"]
        for name, row in train["rows"].items():
            lines.append(f"| {name} | {fmt_range(row)} | {row['median'] / ref:.2f}x | {row['gflops']:.0f} | "
                         f"{100 * row['peak_fraction']:.0f}% |")
        lines.append("")
    for key, title in (("generate_1", "1 prompt"), ("generate_batch", f"{args.batch} left-padded prompts")):
        if key not in results:
            continue
        gen = results[key]
        lines += [f"Greedy generation, {title} x {args.new_tokens} tokens:", "",
                  "| implementation | tokens/s, median (range) | vs transformers (same dtype) | prefill s | "
                  "prefill GFLOP/s (of peak) | decode ms/step | decode GB/s (of read bandwidth) |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for name, row in gen["rows"].items():
            ref = gen["rows"]["transformers" + (" bf16" if "bf16" in name else "")]["tokens_per_s"]
            low, high = row["tokens_per_s_range"]
            lines.append(
                f"| {name} | {row['tokens_per_s']:.1f} ({low:.1f}-{high:.1f}) | {row['tokens_per_s'] / ref:.2f}x | "
                f"{row['prefill_seconds']['median']:.2f} | {row['prefill_gflops']:.0f} "
                f"({100 * row['prefill_peak_fraction']:.0f}%) | {row['decode_step_ms']:.1f} | "
                f"{row['decode_gbs']:.1f} ({100 * row['decode_bandwidth_fraction']:.0f}%) |")
        same = ", ".join(f"{name} {'identical' if s else 'differ'}" for name, s in gen["same_tokens_as_transformers"]
                         .items())
        lines += ["", f"tokens vs transformers in the same dtype: {same}"]
        if gen["compile_seconds"]:
            lines.append("first call of a compiled step (compile included): " + ", ".join(
                f"{name} {s:.0f} s" for name, s in gen["compile_seconds"].items()))
        lines.append("")
    if "bf16_agreement" in results:
        a = results["bf16_agreement"]
        lines.append(f"bfloat16 vs float32 nanovlm, teacher-forced on float32's greedy tokens: top-1 agreement "
                     f"{100 * a['top1_agreement']:.1f}% of {a['steps']} steps; float32's top-2 logit margin, median "
                     f"{a['median_fp32_margin']:.3f} overall, {a['median_fp32_margin_where_differ'] or 0:.3f} "
                     f"where they differ; identical greedy outputs: {a['identical_greedy']}")
    return "\n".join(lines)


def save(results: dict, path: Path | None) -> None:
    """Write what is measured so far (without the generated tokens), so that a run cut short keeps it."""
    if path is not None:
        kept = {key: {k: v for k, v in value.items() if k != "tokens"} if isinstance(value, dict) else value
                for key, value in results.items()}
        path.write_text(json.dumps(kept, indent=2) + "\n")


def load_models(path: Path, args) -> dict:
    """Every implementation the run times, on the checkpoint at `path`; the vision towers frozen."""
    models = {"nanovlm": VLM.from_pretrained(str(path)),
              "transformers": LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32,
                                                                             attn_implementation="sdpa")}
    if args.bf16:
        models["nanovlm bf16"] = VLM.from_pretrained(str(path), dtype=torch.bfloat16)
        models["transformers bf16"] = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16,
                                                                                      attn_implementation="sdpa")
    if args.compile:
        for dtype, name in ((torch.float32, "nanovlm compiled"), (torch.bfloat16, "nanovlm bf16 compiled")):
            if dtype == torch.float32 or args.bf16:
                models[name] = VLM.from_pretrained(str(path), dtype=dtype)
                models[name].language_model.compile_decoding()
        models["nanovlm compiled blocks"] = VLM.from_pretrained(str(path))  # for training only
        models["nanovlm compiled blocks"].language_model.compile_blocks()
    for model in models.values():
        (model.vision_tower if isinstance(model, VLM) else model.model.vision_tower).requires_grad_(False)
    return models


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    results = {"machine": machine(torch.get_num_threads()), "args": {k: str(v) for k, v in vars(args).items()}}
    results["peaks"] = machine_peaks()
    with tempfile.TemporaryDirectory() if args.checkpoint is None else nullcontext(args.checkpoint) as folder:
        if not (Path(folder) / "model.safetensors").exists():
            build_checkpoint(Path(folder), VISION, TEXT)
        models = load_models(Path(folder), args)
    if args.profile:
        print(profile(models["nanovlm"], args))
    if not args.skip_train:
        training = {name: models[name].train() for name in ("nanovlm", "transformers", "nanovlm compiled blocks")
                    if name in models}
        results["train"] = bench_training(training, args, results["peaks"])
        print(f"training: {json.dumps({k: round(v['median'], 2) for k, v in results['train']['rows'].items()})}",
              flush=True)
        save(results, args.json)
    generating = {name: model.eval() for name, model in models.items() if name != "nanovlm compiled blocks"}
    for key, batch in (("generate_1", 1), ("generate_batch", args.batch)):
        results[key] = bench_generation(generating, batch, args, results["peaks"])
        print(f"{key}: {json.dumps({k: round(v['tokens_per_s'], 1) for k, v in results[key]['rows'].items()})}",
              flush=True)
        save(results, args.json)
    assert results["generate_1"]["same_tokens_as_transformers"]["nanovlm"], "greedy tokens differ from transformers"
    if args.bf16:
        prompts, pixels = generation_prompts(args.batch)
        tokens = results["generate_batch"]["tokens"]
        results["bf16_agreement"] = bf16_agreement(models["nanovlm"], models["nanovlm bf16"], prompts, pixels,
                                                   tokens["nanovlm"])
        results["bf16_agreement"]["identical_greedy"] = sum(
            a == b for a, b in zip(tokens["nanovlm"], tokens["nanovlm bf16"]))
    results["machine"]["load_average_after"] = os.getloadavg()

    info = results["machine"]
    print(f"\n{info['cpu']}, {info['threads']} threads, torch {info['torch']}, transformers {info['transformers']}; "
          f"load average {info['load_average_before'][0]:.2f} before, {info['load_average_after'][0]:.2f} after\n")
    print(tables(results, args))
    save(results, args.json)


if __name__ == "__main__":
    main()
