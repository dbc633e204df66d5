"""Every image a run will read, decoded once before it starts, so that a bad one is found up front and never
crashes a run mid-way: in parallel, with a progress bar, and remembered, so that the second run checks nothing.

An image is checked as `load_image` will read it: its header (format and size, refused above MAX_SIDE or
MAX_ASPECT, nanovlm/image.py) and then a full decode and conversion to RGB. Reading the header alone would catch
bombs and strips but not a truncated or corrupt file, and PIL's `verify()` checks PNG checksums but does nothing
for JPEG; a full decode is the one check that sees every fault. A JPEG is decoded at 1/8 scale (`draft`), which
still reads its whole entropy-coded stream (a truncated file fails) at a fraction of the cost. Measured on the
default run's 20,000 PNGs of 96x96 on this project's 2-core machine: about 3 s; a run that finds them in the
cache spends about 0.2 s stat-ing them.

The results are cached in `.nanovlm-image-check.json` in the image folder, beside the data in the usual layout,
so that every run and every stage reading the same images shares them: an image's entry holds its size and
mtime, and is checked again when either changes (or when the limits do). The file is written atomically; a
folder that cannot be written is checked every time (a note says so).
"""

import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from .checkpoint import atomic_write
from .image import MAX_ASPECT, MAX_SIDE, size_error, to_rgb

CACHE_NAME = ".nanovlm-image-check.json"
CACHE_VERSION = [1, MAX_SIDE, MAX_ASPECT]  # entries made under other limits are checked again
PARALLEL_FROM = 2000  # fewer images are checked in this process: starting workers would cost more


def check_image(path: str | os.PathLike) -> str | None:
    """Why the image at `path` cannot be used, or None if it loads."""
    try:
        with Image.open(path) as image:
            if error := size_error(*image.size):
                return error
            if image.format == "JPEG":
                image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
            to_rgb(image)
        return None
    except FileNotFoundError:
        return "does not exist"
    except Exception as error:  # truncated, not an image, corrupt: PIL raises errors of many kinds
        return f"{type(error).__name__}: {error}"


def stamp(path: Path) -> list[int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns]


def check_images(folder: Path, names: list[str], progress: bool = True) -> dict[str, str]:
    """{name: why it cannot be used} for the images `names` (paths relative to `folder`, or absolute) that fail;
    the others load. Unchanged images checked before are not read again."""
    cache_file = folder / CACHE_NAME
    try:
        cache = json.loads(cache_file.read_text())
        entries = cache["images"] if cache.get("version") == CACHE_VERSION else {}
    except (OSError, ValueError, KeyError, TypeError):
        entries = {}
    stamps = {name: stamp(folder / name) for name in dict.fromkeys(names)}
    todo = [name for name, s in stamps.items() if s is None or entries.get(name, [None])[:2] != s]
    if todo:
        paths = [folder / name for name in todo]
        workers = min(16, os.cpu_count() or 1) if len(todo) >= PARALLEL_FROM else 1
        bar = tqdm(total=len(todo), desc=f"checking images in {folder}", unit="img", disable=not progress,
                   dynamic_ncols=True, mininterval=1)
        if workers > 1:
            with ProcessPoolExecutor(workers) as pool:
                results = []
                for result in pool.map(check_image, paths, chunksize=256):
                    results.append(result)
                    bar.update()
        else:
            results = []
            for path in paths:
                results.append(check_image(path))
                bar.update()
        bar.close()
        for name, result in zip(todo, results):
            if stamps[name] is not None:
                entries[name] = [*stamps[name], result]
        try:
            atomic_write(cache_file, lambda tmp: tmp.write_text(json.dumps({"version": CACHE_VERSION,
                                                                             "images": entries})))
        except OSError as error:
            print(f"note: cannot write the image check's cache {cache_file} ({error}); the next run checks again")
    return {name: "does not exist" if stamps[name] is None else entries[name][2]
            for name in stamps if stamps[name] is None or entries[name][2] is not None}
