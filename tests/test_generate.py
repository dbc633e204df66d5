"""KV-cache generation against cache-free decoding, and batching with padding against one prompt at a time."""

import pytest
import torch

import hub_models
from nanovlm.generate import Sampling, generate, generate_text, sample_next
from nanovlm.tokenizer import Tokenizer
from nanovlm.vlm import VLM

IMAGE = 1023
N_IMAGE_TOKENS = 16


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return VLM.from_pretrained(str(hub_models.llava(tmp_path_factory.mktemp("llava"), image_token_id=IMAGE))).eval()


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
