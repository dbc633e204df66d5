"""Image loading and preprocessing, checked against transformers' slow CLIP image processor."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nanovlm.image import CLIP_MEAN, CLIP_STD, ImageProcessor, expand_to_square, load_image

try:  # transformers 5 names the PIL/numpy ("slow") processor explicitly; in 4.x it is the default class
    from transformers import CLIPImageProcessorPil as SlowCLIPImageProcessor
except ImportError:
    from transformers import CLIPImageProcessor as SlowCLIPImageProcessor

PHOTO = Path(__file__).parent / "fixtures" / "grace_hopper.jpg"
FILL = (122, 116, 104)


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return load_image(PHOTO)


def reference(image: Image.Image, size: int = 336, crop: int = 336, **kwargs) -> np.ndarray:
    processor = SlowCLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": crop, "width": crop}, **kwargs
    )
    return processor(image, return_tensors="np")["pixel_values"][0]


def max_error(ours: torch.Tensor, theirs: np.ndarray) -> float:
    assert ours.dtype == torch.float32 and tuple(ours.shape) == theirs.shape
    return float(np.abs(ours.numpy() - theirs).max())


@pytest.mark.parametrize("box", [None, (40, 100, 440, 360), (150, 200, 350, 350), (100, 0, 212, 600)])
@pytest.mark.parametrize("size", [336, 224])
def test_matches_transformers(photo, box, size):
    # as loaded (512x600, h > w), a 400x260 crop (w > h), one smaller than the output (200x150), a tall strip
    image = photo if box is None else photo.crop(box)
    ours = ImageProcessor(size=size, crop_size=size, pad_to_square=False)(image)
    assert max_error(ours, reference(image, size, size)) <= 1e-5


def test_crop_larger_than_resize_pads_like_transformers(photo):
    # 223 on the short side leaves the 224 crop one row short: transformers zero-pads it, the odd row on top
    image = photo.crop((40, 100, 440, 360))
    ours = ImageProcessor(size=223, crop_size=224, pad_to_square=False)(image)
    assert max_error(ours, reference(image, 223, 224)) <= 1e-5
    black = (0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(ours[:, 0, 100], black)
    assert not torch.allclose(ours[:, 1, 100], black)


def test_non_clip_mean_std_and_transparency_match_transformers(photo):
    rgba = photo.crop((0, 0, 300, 200)).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))  # partly transparent: composited onto white
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    ours = ImageProcessor(size=224, crop_size=224, mean=mean, std=std, pad_to_square=False)(rgba)
    assert max_error(ours, reference(rgba, 224, 224, image_mean=mean, image_std=std)) <= 1e-5


@pytest.mark.parametrize("width, height", [(400, 261), (261, 400)])
def test_expand_to_square_places_image_at_llava_offset(photo, width, height):
    image = photo.crop((0, 0, width, height))
    square = np.asarray(expand_to_square(image, FILL))
    side = max(width, height)
    assert square.shape == (side, side, 3)
    top, left = ((width - height) // 2, 0) if width > height else (0, (height - width) // 2)
    assert (top, left) in [(69, 0), (0, 69)]
    np.testing.assert_array_equal(square[top : top + height, left : left + width], np.asarray(image))
    border = np.ones((side, side), bool)
    border[top : top + height, left : left + width] = False
    assert border.sum() == side * side - width * height
    assert (square[border] == FILL).all()


def test_expand_to_square_leaves_square_image_unchanged(photo):
    image = photo.crop((0, 0, 300, 300))
    np.testing.assert_array_equal(np.asarray(expand_to_square(image, FILL)), np.asarray(image))


def test_pad_fill_is_llavas_truncated_mean():
    # A 1-pixel-tall image is almost all padding, so nearly every output pixel is the fill colour.
    out = ImageProcessor(size=224, crop_size=224)(Image.new("RGB", (224, 1), (255, 0, 0)))
    expected = (torch.tensor(FILL) / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(out[:, 0, 0], expected)


@pytest.mark.parametrize("box", [(40, 100, 440, 360), (100, 0, 300, 600)])
def test_pad_to_square_pipeline_matches_transformers_on_expanded_image(photo, box):
    image = photo.crop(box)
    ours = ImageProcessor()(image)
    assert max_error(ours, reference(expand_to_square(image, FILL))) <= 1e-5
    assert max_error(ours, reference(image)) > 0.1  # padding must actually change the result


def test_batch_stacks(photo):
    processor = ImageProcessor(size=224, crop_size=224)
    images = [photo, photo.crop((0, 0, 200, 100))]
    batch = processor.batch(images)
    assert batch.shape == (2, 3, 224, 224)
    torch.testing.assert_close(batch[1], processor(images[1]))


def test_save_round_trips_through_transformers(photo, tmp_path):
    ours = ImageProcessor(size=224, crop_size=200, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), pad_to_square=False)
    ours.save(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["preprocessor_config.json"]  # no temp file left behind
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert config["image_processor_type"] == "CLIPImageProcessor"
    theirs = SlowCLIPImageProcessor.from_pretrained(tmp_path)
    image = photo.crop((40, 100, 440, 360))
    assert max_error(ours(image), theirs(image, return_tensors="np")["pixel_values"][0]) <= 1e-5
    assert ImageProcessor.from_dir(tmp_path, image_size=999, pad_to_square=False) == ours


def test_from_dir_reads_transformers_config(tmp_path):
    mean, std = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]
    SlowCLIPImageProcessor(
        size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, image_mean=mean, image_std=std
    ).save_pretrained(tmp_path)
    processor = ImageProcessor.from_dir(tmp_path, image_size=336)
    assert processor == ImageProcessor(size=224, crop_size=224, mean=tuple(mean), std=tuple(std), pad_to_square=True)


def test_from_dir_legacy_int_sizes_and_missing_config(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": 224, "crop_size": 224}))
    assert ImageProcessor.from_dir(tmp_path, image_size=336) == ImageProcessor(size=224, crop_size=224)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert ImageProcessor.from_dir(empty, image_size=384, pad_to_square=False) == ImageProcessor(
        size=384, crop_size=384, pad_to_square=False
    )


def test_load_image_missing_file(tmp_path):
    path = tmp_path / "nope.jpg"
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        load_image(path)


def test_load_image_non_image_file(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("not an image")
    with pytest.raises(ValueError, match="notes.jpg"):
        load_image(path)


def test_load_image_converts_to_rgb(tmp_path):
    path = tmp_path / "gray.png"
    Image.new("L", (5, 4), 7).save(path)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (5, 4) and image.getpixel((0, 0)) == (7, 7, 7)
