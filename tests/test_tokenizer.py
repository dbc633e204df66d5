"""Tokenizer wrapper vs. transformers' AutoTokenizer (and sentencepiece) on locally built Hub-format tokenizers."""

import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from nanovlm.tokenizer import IMAGE_PLACEHOLDER, Tokenizer

TEXTS = [
    "Hello world",
    "the cat\nsat  on the mat.",
    "What is in the image?\nTwo dogs, one cat!",
    "A cat sits.</s>USER: ok",
    "Numbers: 2024 and 3.5, 12 dogs.",
    "unicode é ü 日本",
    "trailing space ",
    "tabs\tand\n\nnewlines\n",
    "<|im_start|>user\nhi<|im_end|>\n",
    "",
]
# transformers 5 rebuilds a LlamaTokenizer's normalisation (a Metaspace pre-tokenizer instead of the file's
# Prepend/Replace normaliser); the two disagree when a text segment starts with whitespace. Those texts are
# checked against sentencepiece itself for the llama tokenizer, and against AutoTokenizer for the others.
LEADING_SPACE_TEXTS = [" A1</s>USER: Q2", "  two spaces", "a</s> b", "\n new line first", " "]


@pytest.fixture(params=["llama", "chatml"])
def tokenizer_dir(request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue(f"{request.param}_tokenizer_dir")


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(tokenizer_dir: Path, text: str) -> None:
    ref = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert Tokenizer.from_dir(tokenizer_dir).encode(text) == ref(text, add_special_tokens=False).input_ids


@pytest.mark.parametrize("text", LEADING_SPACE_TEXTS)
def test_encode_leading_whitespace(llama_tokenizer_dir: Path, chatml_tokenizer_dir: Path, text: str) -> None:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(llama_tokenizer_dir / "tokenizer.model"))
    # sentencepiece treats "</s>" inside text as plain characters, so split it out as the tokenizer.json does.
    expected = []
    for i, piece in enumerate(text.split("</s>")):
        expected += ([2] if i else []) + sp.encode(piece)
    assert Tokenizer.from_dir(llama_tokenizer_dir).encode(text) == expected

    ref = AutoTokenizer.from_pretrained(chatml_tokenizer_dir)
    assert Tokenizer.from_dir(chatml_tokenizer_dir).encode(text) == ref(text, add_special_tokens=False).input_ids


def test_special_tokens(llama_tokenizer_dir: Path, chatml_tokenizer_dir: Path) -> None:
    llama = Tokenizer.from_dir(llama_tokenizer_dir)
    assert (llama.bos_ids, llama.eos_id, llama.pad_id) == ([1], 2, 2)  # no pad_token: pad with eos
    chatml = Tokenizer.from_dir(chatml_tokenizer_dir)
    im_end = AutoTokenizer.from_pretrained(chatml_tokenizer_dir).convert_tokens_to_ids("<|im_end|>")
    assert (chatml.bos_ids, chatml.eos_id, chatml.pad_id) == ([], im_end, im_end)
    assert chatml.encode("<|im_end|>") == [chatml.eos_id]


def test_bos_matches_transformers(tokenizer_dir: Path) -> None:
    tok = Tokenizer.from_dir(tokenizer_dir)
    ref = AutoTokenizer.from_pretrained(tokenizer_dir)
    for text in TEXTS:
        assert ref(text).input_ids == tok.bos_ids + tok.encode(text)


def test_decode(tokenizer_dir: Path) -> None:
    tok = Tokenizer.from_dir(tokenizer_dir)
    ref = AutoTokenizer.from_pretrained(tokenizer_dir)
    for text in ["Hello world", "the cat\nsat  on the mat.", "unicode é ü 日本", "Two dogs, one cat!\n"]:
        assert tok.decode(tok.encode(text)) == text
    for text in TEXTS:
        ids = tok.bos_ids + tok.encode(text)
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True)
        assert tok.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False)


def test_image_token_added_past_vocab(tokenizer_dir: Path) -> None:
    tok = Tokenizer.from_dir(tokenizer_dir)
    vocab_size = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    assert tok.image_token_id >= vocab_size
    assert tok.encode(IMAGE_PLACEHOLDER) == [tok.image_token_id]
    ids = tok.encode("Look: <image>\nWhat is it?")
    assert ids.count(tok.image_token_id) == 1
    assert IMAGE_PLACEHOLDER not in tok.decode(ids)


def test_existing_image_token_is_reused(llama_tokenizer_dir: Path, tmp_path: Path) -> None:
    # Like llava-hf checkpoints: <image> and <pad> appended to the language model's tokenizer.
    ref = AutoTokenizer.from_pretrained(llama_tokenizer_dir)
    ref.add_tokens([IMAGE_PLACEHOLDER], special_tokens=True)
    ref.add_special_tokens({"pad_token": "<pad>"})
    ref.save_pretrained(tmp_path)
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.image_token_id == ref.convert_tokens_to_ids(IMAGE_PLACEHOLDER) == 400
    assert tok.pad_id == ref.convert_tokens_to_ids("<pad>") == 401
    assert tok.tok.get_vocab_size(with_added_tokens=True) == len(ref)
    text = "USER: <image>\nWhat is it? ASSISTANT: A cat.</s>"
    assert tok.bos_ids + tok.encode(text) == ref(text).input_ids


def test_save_round_trip(tokenizer_dir: Path, tmp_path: Path) -> None:
    tok = Tokenizer.from_dir(tokenizer_dir)
    tok.save(tmp_path)
    ref = AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS + LEADING_SPACE_TEXTS + ["USER: <image>\nWhat is it?"]:
        assert ref(text).input_ids == tok.bos_ids + tok.encode(text)
    reloaded = Tokenizer.from_dir(tmp_path)
    assert (reloaded.bos_ids, reloaded.eos_id, reloaded.pad_id) == (tok.bos_ids, tok.eos_id, tok.pad_id)
    assert reloaded.image_token_id == tok.image_token_id
    assert ref.eos_token_id == tok.eos_id


def _copy_with_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "tokenizer_config.json").read_text())
    config.update(changes)
    (dst / "tokenizer_config.json").write_text(json.dumps(config))
    return dst


def test_bos_ignores_eos_appended_by_post_processor(llama_tokenizer_dir: Path, tmp_path: Path) -> None:
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import processors

    path = _copy_with_config(llama_tokenizer_dir, tmp_path / "tok")
    raw = RawTokenizer.from_file(str(path / "tokenizer.json"))
    raw.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
    raw.save(str(path / "tokenizer.json"))
    assert Tokenizer.from_dir(path).bos_ids == [1]


def test_eos_from_special_tokens_map(llama_tokenizer_dir: Path, tmp_path: Path) -> None:
    path = _copy_with_config(llama_tokenizer_dir, tmp_path / "tok", eos_token=None)
    with pytest.raises(ValueError, match="no eos_token in .*tokenizer_config.json"):
        Tokenizer.from_dir(path)
    (path / "special_tokens_map.json").write_text(json.dumps({"eos_token": {"content": "<unk>"}}))
    assert Tokenizer.from_dir(path).eos_id == 0


def test_missing_tokenizer_json(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.model").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json.*sentencepiece tokenizer\.model"):
        Tokenizer.from_dir(tmp_path)
