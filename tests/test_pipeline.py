"""End to end: a llava-hf checkpoint with tokenizer and preprocessor, a photograph and a question, answered."""

import json
from pathlib import Path

import pytest
import torch
import transformers

import hub_models
from nanovlm import (
    VLM,
    ImageProcessor,
    Sampling,
    Tokenizer,
    generate,
    get_template,
    load_image,
    load_pretrained,
    tokenize_conversation,
)

PHOTO = Path(__file__).parent / "fixtures" / "grace_hopper.jpg"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, llama_tokenizer_dir):
    """A llava-hf directory whose tokenizer has no <image> token of its own, saved by nanovlm."""
    tokenizer = Tokenizer.from_dir(llama_tokenizer_dir)
    source = hub_models.llava(tmp_path_factory.mktemp("source"), image_token_id=tokenizer.image_token_id)
    model = VLM.from_pretrained(str(source))
    processor = ImageProcessor(size=28, crop_size=28)
    path = tmp_path_factory.mktemp("saved")
    model.save_pretrained(path, tokenizer, processor)
    return path


def test_load_pretrained_round_trips_tokenizer_and_processor(checkpoint, llama_tokenizer_dir):
    model, tokenizer, processor = load_pretrained(str(checkpoint))
    original = Tokenizer.from_dir(llama_tokenizer_dir)
    text = "USER: <image>\nWhat is on the table? ASSISTANT: two red cups</s>"
    assert tokenizer.encode(text) == original.encode(text)
    assert (tokenizer.bos_ids, tokenizer.eos_id, tokenizer.image_token_id) == (
        original.bos_ids, original.eos_id, model.cfg.image_token_id)
    assert (processor.size, processor.crop_size, processor.pad_to_square) == (28, 28, True)


def test_question_about_a_photo_matches_transformers_generate(checkpoint):
    model, tokenizer, processor = load_pretrained(str(checkpoint))
    conversation = [{"from": "human", "value": "<image>\nWhat is in the picture?"}]
    prompt, _ = tokenize_conversation(tokenizer, get_template("vicuna_v1"), conversation,
                                      model.cfg.num_image_tokens(), generation_prompt=True)
    pixels = processor(load_image(PHOTO))[None]
    assert prompt.count(model.cfg.image_token_id) == model.cfg.num_image_tokens()
    ours = generate(model, tokenizer, [prompt], pixels, Sampling(max_new_tokens=24))[0]

    ref = transformers.LlavaForConditionalGeneration.from_pretrained(checkpoint).eval()
    ids = torch.tensor([prompt])
    out = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels, do_sample=False,
                       max_new_tokens=24, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id,
                       suppress_tokens=[model.cfg.image_token_id])
    theirs = out[0, len(prompt):].tolist()
    theirs = theirs[:theirs.index(tokenizer.eos_id)] if tokenizer.eos_id in theirs else theirs
    assert ours == theirs and len(ours) > 0


def test_mismatched_image_token_is_an_error(checkpoint, tmp_path):
    for f in checkpoint.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    config = hub_models.config(tmp_path) | {"image_token_index": 5}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="image_token_index 5"):
        load_pretrained(str(tmp_path))
