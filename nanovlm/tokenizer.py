"""The language model's tokenizer: a checkpoint's tokenizer.json plus the `<image>` placeholder, BOS, EOS and pad."""

import json
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers

from .checkpoint import atomic_write, write_json

IMAGE_PLACEHOLDER = "<image>"


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def _token_string(value: str | dict | None) -> str | None:
    # tokenizer_config.json writes special tokens either as plain strings or as serialised AddedToken dicts.
    return value["content"] if isinstance(value, dict) else value


class Tokenizer:
    """Wraps a checkpoint's tokenizer.json (the `tokenizers` library) with what a VLM needs.

    The `<image>` placeholder never grows a pretrained model's vocabulary. If the tokenizer already has it
    (llava-hf checkpoints do) its id is reused; otherwise it is added as a special token and gets the next free
    id, which is >= the language model's vocabulary size. That is fine because the VLM overwrites every
    image-token position with image features before any embedding lookup happens.
    """

    def __init__(self, tok: tokenizers.Tokenizer, bos_ids: list[int], eos_id: int, pad_id: int):
        # Adding a token that already exists keeps its id, so this covers both cases of the class docstring.
        tok.add_special_tokens([AddedToken(IMAGE_PLACEHOLDER, special=True, normalized=False)])
        self.tok = tok
        self.image_token_id: int = tok.token_to_id(IMAGE_PLACEHOLDER)
        self.bos_ids = bos_ids
        self.eos_id = eos_id
        self.pad_id = pad_id

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """Load tokenizer.json, with special tokens from tokenizer_config.json / special_tokens_map.json."""
        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.exists():
            raise FileNotFoundError(
                f"{tokenizer_file} not found; nanovlm needs a `tokenizers` tokenizer.json "
                "(checkpoints that only ship a sentencepiece tokenizer.model are unsupported)"
            )
        tok = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        config = _read_json(path / "tokenizer_config.json")
        special_map = _read_json(path / "special_tokens_map.json")

        def special_token(key: str) -> str | None:
            return _token_string(config.get(key)) or _token_string(special_map.get(key))

        def token_id(token: str) -> int:
            token_id = tok.token_to_id(token)
            if token_id is None:
                raise ValueError(f"special token {token!r} from {path} is not in {tokenizer_file}")
            return token_id

        eos = special_token("eos_token")
        if eos is None:
            raise ValueError(f"no eos_token in {path / 'tokenizer_config.json'} or {path / 'special_tokens_map.json'}")
        pad = special_token("pad_token") or eos

        # BOS is whatever the post-processor puts in front of a text; stop at the first text token so that
        # post-processors that also append EOS do not leak it in.
        probe = tok.encode("a", add_special_tokens=True)
        num_prefix = probe.special_tokens_mask.index(0)
        return cls(tok, probe.ids[:num_prefix], token_id(eos), token_id(pad))

    @classmethod
    def train(cls, texts: list[str], vocab_size: int) -> "Tokenizer":
        """A byte-level BPE tokenizer learnt from `texts`, with Llama's special tokens (<s> added in front,
        </s> ends answers): for models trained from scratch, such as the tiny preset."""
        specials = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_PLACEHOLDER]
        tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer)
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
        return cls(tok, bos_ids=[1], eos_id=2, pad_id=3)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without BOS; special tokens written in the text (and `<image>`) map to their ids."""
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Like `encode`, plus each token's (start, end) character offsets into `text`."""
        encoding = self.tok.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def save(self, path: str | Path) -> None:
        """Write tokenizer.json and a tokenizer_config.json that transformers' AutoTokenizer can load."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        atomic_write(path / "tokenizer.json", lambda tmp: self.tok.save(str(tmp)))
        config = {
            # The generic class loads tokenizer.json verbatim; model-specific classes (e.g. LlamaTokenizer in
            # transformers 5) rebuild normalisation from scratch and can tokenise differently from our runtime.
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.tok.id_to_token(self.bos_ids[0]) if self.bos_ids else None,
            "eos_token": self.tok.id_to_token(self.eos_id),
            "pad_token": self.tok.id_to_token(self.pad_id),
            "add_bos_token": bool(self.bos_ids),
            "add_eos_token": False,
            # Otherwise older transformers rewrite " ." to "." when decoding, unlike the `tokenizers` decoder.
            "clean_up_tokenization_spaces": False,
        }
        write_json(path / "tokenizer_config.json", config)
