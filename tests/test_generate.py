"""KV-cache generation against cache-free decoding, batching with padding against one prompt at a time, and the
static cache and compiled decoding step against the eager ones."""

import pytest
import torch

import hub_models
from nanovlm.generate import Sampling, StopStrings, generate, generate_text, sample_next
from nanovlm.tokenizer import Tokenizer
from nanovlm.vlm import VLM

IMAGE = 1023
N_IMAGE_TOKENS = 16


@pytest.fixture(scope="module", params=[False, True], ids=["rope", "grid_rope"])
def model(tmp_path_factory, request):
    """llava-hf's LLaVA, and the same with the tiny preset's 2-D rotary position for image tokens (their rows and
    columns ride along the cache only at the prefill)."""
    model = VLM.from_pretrained(str(hub_models.llava(tmp_path_factory.mktemp("llava"), image_token_id=IMAGE))).eval()
    model.cfg.llm.grid_rope = request.param
    return model


@pytest.fixture(scope="module")
def tokenizer(llama_tokenizer_dir):
    return Tokenizer.from_dir(llama_tokenizer_dir)


def prompts_and_images():
    g = torch.Generator().manual_seed(0)
    text = lambda n: torch.randint(3, 900, (n,), generator=g).tolist()  # noqa: E731
    prompts = [
        [1] + text(4) + [IMAGE] * N_IMAGE_TOKENS + text(6),
        [1] + text(9),  # text only, shorter: left-padded in a batch
        [1] + [IMAGE] * N_IMAGE_TOKENS + text(2) + [IMAGE] * N_IMAGE_TOKENS + text(3),
    ]
    images = [torch.randn(1, 3, 28, 28, generator=g), None, torch.randn(2, 3, 28, 28, generator=g)]
    return prompts, images


@torch.no_grad()
def greedy_without_cache(model, prompt, images, steps, eos):
    ids = list(prompt)
    for _ in range(steps):
        logits = model(torch.tensor([ids]), images)[0, -1]
        logits[IMAGE] = float("-inf")
        token = int(logits.argmax())
        if token == eos:
            break
        ids.append(token)
    return ids[len(prompt):]


def test_kv_cache_greedy_equals_cache_free_greedy(model, tokenizer):
    prompts, images = prompts_and_images()
    for prompt, image in zip(prompts, images):
        want = greedy_without_cache(model, prompt, image, 20, tokenizer.eos_id)
        got = generate(model, tokenizer, [prompt], image, Sampling(max_new_tokens=20))[0]
        assert got == want
        assert len(got) > 5


def test_padded_batch_equals_one_at_a_time(model, tokenizer):
    prompts, images = prompts_and_images()
    alone = [generate(model, tokenizer, [p], im, Sampling(max_new_tokens=15))[0] for p, im in zip(prompts, images)]
    batch_images = torch.cat([im for im in images if im is not None])
    together = generate(model, tokenizer, prompts, batch_images, Sampling(max_new_tokens=15))
    assert together == alone


class EosAfter(torch.nn.Module):
    """An lm_head that makes end-of-sequence the argmax from its (n+1)-th call on."""

    def __init__(self, head, eos, n):
        super().__init__()
        self.head, self.eos, self.n, self.calls = head, eos, n, 0

    def forward(self, x):
        self.calls += 1
        logits = self.head(x)
        if self.calls > self.n:
            logits[..., self.eos] = logits.max() + 1
        return logits


def test_generation_stops_at_eos(model, tokenizer):
    prompts, images = prompts_and_images()
    head = model.language_model.lm_head
    model.language_model.lm_head = EosAfter(head, tokenizer.eos_id, 3)
    try:
        out = generate(model, tokenizer, prompts[:1], images[0], Sampling(max_new_tokens=10))
        assert model.language_model.lm_head.calls == 4
    finally:
        model.language_model.lm_head = head
    assert len(out[0]) == 3 and tokenizer.eos_id not in out[0]


def test_stop_strings_cut_generation(model, tokenizer):
    prompts, images = prompts_and_images()
    full = generate(model, tokenizer, prompts[1:2], None, Sampling(max_new_tokens=20))[0]
    text = tokenizer.decode(full)
    stop = text.strip()[len(text.strip()) // 2:][:3]
    assert stop.strip()
    sampling = Sampling(max_new_tokens=20, stop_strings=(stop,))
    cut = generate(model, tokenizer, prompts[1:2], None, sampling)[0]
    assert len(cut) < len(full) and full[:len(cut)] == cut
    assert stop not in generate_text(model, tokenizer, prompts[1:2], None, sampling)[0]


def test_sampling_filters():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.5, -1.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    greedy = sample_next(logits, Sampling(temperature=0), g)
    assert (greedy == 0).all()
    top2 = sample_next(logits, Sampling(temperature=1.0, top_k=2), g)
    assert set(top2.tolist()) == {0, 1}
    probs = logits[0].softmax(-1)  # 0.63, 0.23, 0.09, ...: top_p 0.8 keeps the first two only
    nucleus = sample_next(logits, Sampling(temperature=1.0, top_p=0.8), g)
    assert set(nucleus.tolist()) == {0, 1} and probs[:2].sum() > 0.8
    everything = sample_next(logits, Sampling(temperature=1.0), g)
    assert set(everything.tolist()) == {0, 1, 2, 3, 4}
    hot = sample_next(logits, Sampling(temperature=5.0), g)
    assert (hot == 4).sum() > (everything == 4).sum()


def test_seeded_sampling_is_reproducible(model, tokenizer):
    prompts, images = prompts_and_images()
    sampling = Sampling(max_new_tokens=12, temperature=1.0, top_k=50, top_p=0.95)
    runs = [generate(model, tokenizer, prompts[:1], images[0], sampling, torch.Generator().manual_seed(7))
            for _ in range(2)]
    assert runs[0] == runs[1]


def test_stop_strings_are_found_where_the_whole_text_finds_them(model, tokenizer):
    """The tail StopStrings decodes finds a stop string at the same token as decoding everything would."""
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        ids = torch.randint(3, tokenizer.tok.get_vocab_size(), (40,), generator=g).tolist()
        text = tokenizer.decode(ids)
        start = int(torch.randint(0, max(1, len(text) - 4), (1,), generator=g))
        stop = text[start:start + int(torch.randint(1, 5, (1,), generator=g))]
        stops = StopStrings(tokenizer, (stop,))
        first_whole = next(n for n in range(1, len(ids) + 1) if stop in tokenizer.decode(ids[:n]))
        assert next(n for n in range(1, len(ids) + 1) if stops.found(ids[:n])) == first_whole


class Recording:
    """A decoding step that keeps every step's logits."""

    def __init__(self, step):
        self.step, self.logits = step, []

    def __call__(self, *args):
        self.logits.append(self.step(*args).clone())
        return self.logits[-1]


def padded_batch():
    prompts, images = prompts_and_images()
    return prompts, torch.cat([im for im in images if im is not None])


def test_static_cache_generates_what_the_dynamic_one_does(model, tokenizer):
    """The static cache (fixed shapes, masked unfilled positions) run eagerly: same tokens as the dynamic one."""
    prompts, images = padded_batch()
    want = generate(model, tokenizer, prompts, images, Sampling(max_new_tokens=15))
    model.language_model.compiled_decode = model.language_model.decode  # the static path, not compiled
    try:
        got = generate(model, tokenizer, prompts, images, Sampling(max_new_tokens=15))
    finally:
        model.language_model.compiled_decode = None
    assert got == want


@pytest.mark.slow
def test_compiled_decoding_matches_eager(tmp_path, tokenizer):
    """torch.compile'd decoding steps (weights frozen into them) give the eager steps' logits to 1e-5."""
    model = VLM.from_pretrained(str(hub_models.llava(tmp_path, image_token_id=IMAGE))).eval()
    llm, (prompts, images) = model.language_model, padded_batch()
    llm.compiled_decode = eager = Recording(llm.decode)
    want = generate(model, tokenizer, prompts, images, Sampling(max_new_tokens=15))
    llm.compile_decoding()
    llm.compiled_decode = compiled = Recording(llm.compiled_decode)
    assert generate(model, tokenizer, prompts, images, Sampling(max_new_tokens=15)) == want
    assert len(compiled.logits) == len(eager.logits) == 14
    assert max((a - b).abs().max().item() for a, b in zip(compiled.logits, eager.logits)) <= 1e-5
