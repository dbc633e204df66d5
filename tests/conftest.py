"""Shared fixtures: small tokenizers built locally in the exact on-disk formats of Hub checkpoints."""

import json
import random
from pathlib import Path

import pytest

WORDS = (
    "the a an cat dog man woman child people street car bus tree sky water building table chair food plate "
    "red blue green white black small large two three is are sits stands on in near with of and what where "
    "how many image picture photo shows describe answer question user assistant chat helpful detailed polite "
    "between curious artificial intelligence gives answers"
).split()


def _corpus(num_lines: int = 400) -> list[str]:
    rng = random.Random(0)
    lines = []
    for _ in range(num_lines):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 14))]
        words[0] = words[0].capitalize()
        lines.append(" ".join(words) + rng.choice([".", "?", "!", ",", ":", " 12.", " 2024."]))
    return lines


@pytest.fixture(scope="session")
def llama_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Llama-2 / Vicuna style sentencepiece BPE tokenizer, saved as llava-hf checkpoints ship it.

    The tokenizer.json mirrors what transformers 4.x's LlamaConverter wrote for legacy Llama tokenizers (these
    files are what the Hub holds): a Prepend("▁") + Replace(" ", "▁") normaliser (the sentencepiece dummy
    prefix, applied to every text segment between special tokens), byte fallback, and a post-processor that
    adds <s>. It is assembled by hand because transformers 5's own sentencepiece conversion writes a different
    (Metaspace) layout and, for this model, no BOS.
    """
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    out = tmp_path_factory.mktemp("llama_tokenizer")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()),
        model_prefix=str(out / "tokenizer"),
        model_type="bpe",
        vocab_size=400,
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    extracted = SentencePieceExtractor(str(out / "tokenizer.model")).extract(models.BPE)
    tok = Tokenizer(
        models.BPE(
            vocab=extracted["vocab"], merges=extracted["merges"], unk_token="<unk>", fuse_unk=True, byte_fallback=True
        )
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.save(str(out / "tokenizer.json"))
    def added_token(content: str) -> dict:
        # Older Hub configs (Llama-2, Vicuna) serialise special tokens as AddedToken dicts, not strings.
        flags = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
        return {"__type": "AddedToken", "content": content, **flags}

    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": added_token("<s>"),
        "eos_token": added_token("</s>"),
        "unk_token": added_token("<unk>"),
        "pad_token": None,
        "clean_up_tokenization_spaces": False,
        "legacy": True,
        "model_max_length": 4096,
        "tokenizer_class": "LlamaTokenizer",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return out


@pytest.fixture(scope="session")
def chatml_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A GPT-2 / SmolLM2 style byte-level BPE tokenizer with ChatML special tokens, saved by transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>"
    )
    out = tmp_path_factory.mktemp("chatml_tokenizer")
    wrapped.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small shapes world: 160 training images, 20 for evaluation."""
    from data.shapes import ShapesConfig, generate

    out = tmp_path_factory.mktemp("world")
    generate(out, ShapesConfig(num_train=160, num_unlabeled=0, num_eval=20))
    return out


@pytest.fixture(scope="session")
def init(world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model, saved as the stage-1 checkpoint that train_sft.py and train_selfq.py continue."""
    from nanovlm.presets import tiny_model
    from train_align import shapes_corpus

    model, tokenizer, processor = tiny_model(shapes_corpus(world, "vicuna_v1"))
    # LLaVA's 1-D rotary position, not the tiny preset's grid_rope, which transformers' Llama does not have: the
    # tests that read this checkpoint with transformers (PEFT, FSDP, llava-hf) compare logits with it.
    model.cfg.llm.grid_rope = False
    out = tmp_path_factory.mktemp("init")
    model.save_pretrained(out, tokenizer, processor)
    return out
