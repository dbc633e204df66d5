"""How the shapes world looks: its objects drawn in one of two rendering domains (SPHINX's weight mixing needs
two, nanovlm/merge.py). `draw` is domain A, each shape filled on a flat dark-grey background; `draw_outline` is
domain B, the same shapes on the same boxes as outlines STROKE pixels wide over grey noise, so that every box and
answer holds in both domains. The objects are data/shapes.py's `Obj`s (colour, shape, centre x y, half side r).
"""

import random
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw

if TYPE_CHECKING:
    from data.shapes import Obj

BACKGROUND = (40, 40, 40)
NOISE = (20, 100)  # an outline world's background: every pixel an independent grey in this range
STROKE = 2  # an outline's width in pixels
COLOURS = {  # far apart in RGB, and from the background, so that a small image leaves no doubt
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 90, 230), "yellow": (235, 215, 50),
    "purple": (150, 60, 200), "orange": (245, 135, 30), "white": (240, 240, 240),
}


def draw(objects: list["Obj"], image_size: int) -> Image.Image:
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    pen = ImageDraw.Draw(image)
    for o in objects:
        fill, box = COLOURS[o.colour], (o.x - o.r, o.y - o.r, o.x + o.r, o.y + o.r)
        if o.shape == "circle":
            pen.ellipse(box, fill=fill)
        elif o.shape == "square":
            pen.rectangle(box, fill=fill)
        elif o.shape == "triangle":
            pen.polygon([(o.x, o.y - o.r), (o.x + o.r, o.y + o.r), (o.x - o.r, o.y + o.r)], fill=fill)
        else:  # a plus sign; bars a third of its size thick keep it a cross, not a blob, at 64 px
            t = max(1, o.r // 3)
            pen.rectangle((o.x - o.r, o.y - t, o.x + o.r, o.y + t), fill=fill)
            pen.rectangle((o.x - t, o.y - o.r, o.x + t, o.y + o.r), fill=fill)
    return image


def draw_outline(objects: list["Obj"], image_size: int, seed: str) -> Image.Image:
    """Domain B: the objects' outlines, STROKE pixels wide, over grey noise drawn from the stream `seed`. The
    outline runs along the same box as the solid shape's edge, so every box and answer holds in both domains."""
    noise = np.random.default_rng(random.Random(seed).getrandbits(64)).integers(
        NOISE[0], NOISE[1] + 1, (image_size, image_size), dtype=np.uint8)
    image = Image.fromarray(noise).convert("RGB")
    pen = ImageDraw.Draw(image)
    for o in objects:
        colour, box = COLOURS[o.colour], (o.x - o.r, o.y - o.r, o.x + o.r, o.y + o.r)
        if o.shape == "circle":
            pen.ellipse(box, outline=colour, width=STROKE)
        elif o.shape == "square":
            pen.rectangle(box, outline=colour, width=STROKE)
        elif o.shape == "triangle":
            pen.polygon([(o.x, o.y - o.r), (o.x + o.r, o.y + o.r), (o.x - o.r, o.y + o.r)], outline=colour,
                        width=STROKE)
        else:  # the plus sign's twelve corners, its bars as thick as the solid one's
            t, r = max(1, o.r // 3), o.r
            corners = [(-t, -r), (t, -r), (t, -t), (r, -t), (r, t), (t, t), (t, r), (-t, r), (-t, t), (-r, t), (-r, -t),
                       (-t, -t)]
            pen.polygon([(o.x + dx, o.y + dy) for dx, dy in corners], outline=colour, width=STROKE)
    return image
