"""Image loading and CLIP preprocessing with numpy and PIL.

`ImageProcessor` reproduces transformers' slow (PIL) `CLIPImageProcessor` bit for bit: resize the short side
with PIL bicubic, center-crop, rescale to [0, 1], normalise. LLaVA-1.5 first pads each image to a square
filled with the mean colour (`image_aspect_ratio="pad"`), so nothing is cropped away.
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


def to_rgb(image: Image.Image) -> Image.Image:
    """Return an RGB copy; transparent pixels are composited onto white, as transformers does."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        image = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image).convert("RGB")
    return image.convert("RGB")


def load_image(path: str | os.PathLike) -> Image.Image:
    try:
        with Image.open(path) as image:
            return to_rgb(image)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"image not found: {path}") from error
    except (OSError, ValueError) as error:  # PIL's errors for non-image, truncated or corrupt files
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


@dataclass
class ImageProcessor:
    size: int = 336  # the short side after resizing
    crop_size: int = 336
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    pad_to_square: bool = True
    resample: Image.Resampling = Image.Resampling.BICUBIC

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """Preprocess one image into a float32 (3, crop_size, crop_size) tensor."""
        image = to_rgb(image)
        if self.pad_to_square:
            # LLaVA truncates rather than rounds: CLIP's mean becomes (122, 116, 104)
            image = expand_to_square(image, tuple(int(m * 255) for m in self.mean))
        width, height = image.size
        long = int(self.size * max(width, height) / min(width, height))
        new_size = (self.size, long) if width <= height else (long, self.size)
        pixels = center_crop(np.asarray(image.resize(new_size, self.resample, reducing_gap=None)), self.crop_size)
        # Same precision as transformers: rescale in float64, then cast and normalise in float32.
        pixels = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)
        pixels = (pixels - np.array(self.mean, np.float32)) / np.array(self.std, np.float32)
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))

    def batch(self, images: list[Image.Image]) -> torch.Tensor:
        return torch.stack([self(image) for image in images])

    @classmethod
    def from_dir(cls, path: str | os.PathLike, image_size: int, pad_to_square: bool = True) -> "ImageProcessor":
        """Read `path/preprocessor_config.json` if present, else CLIP defaults at `image_size`."""
        config_path = Path(path) / "preprocessor_config.json"
        if not config_path.exists():
            return cls(size=image_size, crop_size=image_size, pad_to_square=pad_to_square)
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
