"""Image loading and CLIP preprocessing with numpy and PIL.

`load_image` refuses an image whose header says it is larger than MAX_SIDE on its longest side or more than
MAX_ASPECT times longer than wide, before decoding a pixel: a decompression bomb, or a 30000x20 strip that
padding to a square would turn into gigabytes. High-bit-depth images (PIL modes I;16, I, F) are scaled to 8
bits, not clipped: 16-bit values (I;16 and I, as 16-bit PNG and TIFF store them) are divided by 257, floats in
[0, 1] multiplied by 255 (floats beyond 1 are taken on PIL's own 0-255 scale).

`ImageProcessor` reproduces transformers' slow (PIL) `CLIPImageProcessor` bit for bit: resize the short side
with PIL bicubic, center-crop, rescale to [0, 1], normalise. LLaVA-1.5 first pads each image to a square
filled with the mean colour (`image_aspect_ratio="pad"`), so nothing is cropped away.

With `multi_scale` (SPHINX-1K, Lin et al., 2023) the same steps run at twice the size (a 448 square for a 224
tower), and the image becomes five views of the tower's size, in this order: the whole square downsampled
(PIL bicubic), then its top-left, top-right, bottom-left and bottom-right quadrants at full resolution.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # DINOv2's
IMAGENET_STD = (0.229, 0.224, 0.225)


MAX_SIDE = 8192  # pixels on the longest side; its padded square (64 Mpx, 200 MB in RGB) stays under PIL's bomb limit
MAX_ASPECT = 50  # longest side over shortest; a resize of the short side to 672 px then makes at most 22 Mpx


def size_error(width: int, height: int) -> str | None:
    """Why an image of this size is refused, or None."""
    if max(width, height) > MAX_SIDE:
        return f"{width}x{height} pixels: larger than {MAX_SIDE} on a side (a decompression bomb, or too large to pad)"
    if min(width, height) < 1 or max(width, height) > MAX_ASPECT * min(width, height):
        return f"{width}x{height} pixels: more than {MAX_ASPECT} times longer than wide"
    return None


def to_8_bit(image: Image.Image) -> Image.Image:
    """A 16- or 32-bit grey image (modes I;16*, I, F) as mode L, scaled as the module docstring says."""
    pixels = np.asarray(image).astype(np.float64)
    if image.mode == "F":
        pixels = pixels * 255 if pixels.size and np.nanmax(pixels) <= 1 else pixels
    else:
        pixels = pixels / 257
    return Image.fromarray(np.nan_to_num(pixels).round().clip(0, 255).astype(np.uint8), "L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Return an RGB copy; transparent pixels are composited onto white, as transformers does."""
    if image.mode.startswith("I") or image.mode == "F":
        image = to_8_bit(image)
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        image = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image).convert("RGB")
    return image.convert("RGB")


def load_image(path: str | os.PathLike) -> Image.Image:
    try:
        with Image.open(path) as image:
            if error := size_error(*image.size):
                raise ValueError(error)
            return to_rgb(image)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"image not found: {path}") from error
    except Exception as error:  # PIL's errors for non-image, truncated or corrupt files are of many kinds
        raise ValueError(f"cannot read image {path}: {error}") from error


def expand_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """LLaVA's `expand2square`: centre the image on a `fill`-coloured square of side max(w, h)."""
    width, height = image.size
    if width == height:
        return image
    canvas = Image.new(image.mode, (max(width, height),) * 2, fill)
    canvas.paste(image, (0, (width - height) // 2) if width > height else ((height - width) // 2, 0))
    return canvas


def center_crop(pixels: np.ndarray, size: int) -> np.ndarray:
    """Crop an (H, W, C) array to (size, size) around its centre, zero-padding first if it is too small."""
    height, width = pixels.shape[:2]
    pad_h, pad_w = max(size - height, 0), max(size - width, 0)
    # transformers centres the padding with ceil(), so an odd extra pixel goes above / to the left
    pixels = np.pad(pixels, (((pad_h + 1) // 2, pad_h // 2), ((pad_w + 1) // 2, pad_w // 2), (0, 0)))
    top, left = (pixels.shape[0] - size) // 2, (pixels.shape[1] - size) // 2
    return pixels[top : top + size, left : left + size]


def sub_images(pixels: np.ndarray, resample: Image.Resampling) -> list[np.ndarray]:
    """SPHINX-1K's five (s, s, C) views of a (2s, 2s, C) image: the whole downsampled, then the quadrants
    top-left, top-right, bottom-left, bottom-right."""
    s = pixels.shape[0] // 2
    whole = np.asarray(Image.fromarray(pixels).resize((s, s), resample, reducing_gap=None))
    return [whole, pixels[:s, :s], pixels[:s, s:], pixels[s:, :s], pixels[s:, s:]]


@dataclass
class ImageProcessor:
    size: int = 336  # the short side after resizing
    crop_size: int = 336
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    pad_to_square: bool = True
    resample: Image.Resampling = Image.Resampling.BICUBIC
    multi_scale: bool = False  # SPHINX-1K's five views of a twice-as-large image instead of one

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """Preprocess one image into a float32 (3, crop_size, crop_size) tensor, or (5, 3, crop_size, crop_size)
        views with multi_scale."""
        image = to_rgb(image)
        if self.pad_to_square:
            # LLaVA truncates rather than rounds: CLIP's mean becomes (122, 116, 104)
            image = expand_to_square(image, tuple(int(m * 255) for m in self.mean))
        scale = 2 if self.multi_scale else 1
        width, height = image.size
        short = scale * self.size
        long = int(short * max(width, height) / min(width, height))
        new_size = (short, long) if width <= height else (long, short)
        pixels = center_crop(np.asarray(image.resize(new_size, self.resample, reducing_gap=None)),
                             scale * self.crop_size)  # (H, W, 3) uint8
        if self.multi_scale:
            pixels = np.stack(sub_images(pixels, self.resample))  # (5, H / 2, W / 2, 3)
        # Same precision as transformers: rescale in float64, then cast and normalise in float32.
        pixels = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)
        pixels = (pixels - np.array(self.mean, np.float32)) / np.array(self.std, np.float32)
        return torch.from_numpy(np.ascontiguousarray(np.moveaxis(pixels, -1, -3)))  # channels first

    def batch(self, images: list[Image.Image]) -> torch.Tensor:
        return torch.stack([self(image) for image in images])

    @classmethod
    def from_dir(cls, path: str | os.PathLike, image_size: int, pad_to_square: bool = True,
                 multi_scale: bool = False) -> "ImageProcessor":
        """Read `path/preprocessor_config.json` if present, else CLIP defaults at `image_size`. The model's config
        holds pad_to_square and multi_scale, which CLIP's preprocessor config has no fields for."""
        config_path = Path(path) / "preprocessor_config.json"
        if not config_path.exists():
            return cls(size=image_size, crop_size=image_size, pad_to_square=pad_to_square, multi_scale=multi_scale)
        config = json.loads(config_path.read_text())
        size, crop = config.get("size", image_size), config.get("crop_size", image_size)
        if isinstance(size, dict) and "shortest_edge" not in size:
            raise ValueError(f"{config_path}: only size={{'shortest_edge': n}} is supported, got {size}")
        if isinstance(crop, dict) and crop["height"] != crop["width"]:
            raise ValueError(f"{config_path}: only square crops are supported, got {crop}")
        return cls(
            size=size["shortest_edge"] if isinstance(size, dict) else int(size),
            crop_size=crop["height"] if isinstance(crop, dict) else int(crop),
            mean=tuple(config.get("image_mean", CLIP_MEAN)),
            std=tuple(config.get("image_std", CLIP_STD)),
            pad_to_square=pad_to_square,
            resample=Image.Resampling(config.get("resample", Image.Resampling.BICUBIC)),
            multi_scale=multi_scale,
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write a preprocessor_config.json that transformers' CLIPImageProcessor loads to the same settings."""
        config = {
            "image_processor_type": "CLIPImageProcessor",
            "do_convert_rgb": True,
            "do_resize": True,
            "size": {"shortest_edge": self.size},
            "resample": int(self.resample),
            "do_center_crop": True,
            "crop_size": {"height": self.crop_size, "width": self.crop_size},
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": list(self.mean),
            "image_std": list(self.std),
        }
        directory = Path(path)
        directory.mkdir(parents=True, exist_ok=True)
        # Write beside the target and rename, so a crash never leaves a half-written config behind.
        tmp = directory / f".preprocessor_config.json.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(config, indent=2) + "\n")
        os.replace(tmp, directory / "preprocessor_config.json")
