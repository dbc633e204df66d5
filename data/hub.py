"""Fetching Hugging Face Hub dataset files for the dataset builders (data/llava_pretrain.py, data/pope.py, ...).

A builder names its source files (`HubFile`), checks that the disk can hold the build before it downloads
anything (`check_disk_space`), downloads them with `hf_hub_download` (which honours HF_HOME, HF_HUB_CACHE,
HF_HUB_OFFLINE and a revision), extracts from the image zips only the members its records use (`extract`,
streamed member by member, mapped by the end of their path, because the mirrors' inner roots differ), then
checks and writes its outputs (`require_images`, `check_count`, `write_json`, `write_jsonl`; written atomically).

Errors are `BuildError`s that name the file and the record or line; `run` turns them into a one-line exit message.
"""

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from huggingface_hub import HfApi, constants, hf_hub_download, try_to_load_from_cache
from huggingface_hub.hf_api import RepoFile
from tqdm import tqdm


class BuildError(Exception):
    """A build cannot go on; the message says which file, record or line and why."""


@dataclass(frozen=True)
class HubFile:
    repo: str
    filename: str  # its path inside the repo
    repo_type: str = "dataset"
    revision: str | None = None  # None: main

    def __str__(self) -> str:
        return f"{self.repo}/{self.filename}" + (f"@{self.revision}" if self.revision else "")


def gb(num_bytes: int) -> str:
    return f"{num_bytes / 1e9:.2f} GB"  # decimal GB, as the Hub shows sizes


def build_parser(doc: str, default_out: str) -> argparse.ArgumentParser:
    """The options every builder takes."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(default_out), help="output folder")
    parser.add_argument("--revision", help="a branch, tag or commit of the annotation repo (default: main)")
    parser.add_argument("--force", action="store_true",
                        help="go on when the disk looks too small or a count differs from the published one")
    parser.add_argument("--limit", type=int, default=0, help="build only the first N records (a smoke build)")
    return parser


def run(main: Callable[[list[str]], object]) -> None:
    """Run a builder's main on the command line: a BuildError ends it with its message instead of a traceback."""
    try:
        main(sys.argv[1:])
    except BuildError as error:
        sys.exit(f"error: {error}")


# --- disk space -------------------------------------------------------------------------------------------------

def cached_path(file: HubFile) -> Path | None:
    found = try_to_load_from_cache(file.repo, file.filename, revision=file.revision, repo_type=file.repo_type)
    return Path(found) if isinstance(found, str) else None  # it may also be a "known not to exist" marker


def file_sizes(files: Iterable[HubFile]) -> dict[HubFile, tuple[int, bool]]:
    """Each file's size and whether it is already in the cache: cached files are measured on disk, the others
    asked of the Hub (one metadata request per repo), so nothing is downloaded."""
    sizes, remote = {}, {}
    for file in files:
        if (path := cached_path(file)) is not None:
            sizes[file] = (path.stat().st_size, True)
        else:
            remote.setdefault((file.repo, file.repo_type, file.revision), []).append(file)
    for (repo, repo_type, revision), wanted in remote.items():
        try:
            infos = HfApi().get_paths_info(repo, [f.filename for f in wanted], repo_type=repo_type, revision=revision)
        except Exception as error:  # offline mode, no network, unknown repo or revision: all say the same to a user
            raise BuildError(f"{', '.join(map(str, wanted))}: not in the Hugging Face cache "
                             f"({constants.HF_HUB_CACHE}) and its size cannot be asked of the Hub: "
                             f"{type(error).__name__}: {error}") from error
        found = {info.path: info for info in infos}
        for file in wanted:
            if not isinstance(found.get(file.filename), RepoFile):
                raise BuildError(f"{file}: no such file in the {repo_type} repo {repo}")
            sizes[file] = (found[file.filename].size, False)
    return sizes


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under `folder` (0 if it does not exist): what an earlier run already extracted."""
    total = 0
    for root, _, names in os.walk(folder):
        total += sum(os.stat(os.path.join(root, name)).st_size for name in names)
    return total


def existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def require_space(needs: list[tuple[Path, int, str]], force: bool) -> None:
    """Check that each filesystem can take what will be written to it: `needs` lists (folder, bytes, what).
    Folders on one filesystem add up. Without `force` a shortfall is a BuildError; with it, a warning."""
    by_device: dict[int, tuple[Path, int, list[str]]] = {}
    for folder, num_bytes, what in needs:
        parent = existing_parent(folder)
        device = os.stat(parent).st_dev
        _, total, whats = by_device.get(device, (parent, 0, []))
        by_device[device] = (parent, total + num_bytes, whats + [what])
    for parent, total, whats in by_device.values():
        free = shutil.disk_usage(parent).free
        if total > free:
            message = (f"not enough disk space on {parent}: this build writes {gb(total)} there "
                       f"({'; '.join(whats)}) and {gb(free)} is free")
            if not force:
                raise BuildError(f"{message} (--force to try anyway)")
            print(f"warning: {message}", file=sys.stderr)


def check_disk_space(files: list[HubFile], archives: dict[HubFile, Path], force: bool) -> None:
    """Print what the build will download and extract, and stop (unless `force`) if the disks cannot hold it.

    `archives` maps each zip among `files` to the folder its images go to. What a zip extracts is known only
    once it is downloaded (extract() checks it exactly then); until then it is estimated as the zip's size less
    what the folder already holds: close when a build uses every image (JPEG data does not compress further), an
    upper bound when it uses a few (POPE: 500 of val2014's 40,504).
    """
    sizes = file_sizes(files)
    print("disk space this build needs:")
    download = 0
    for file in files:
        size, cached = sizes[file]
        download += 0 if cached else size
        print(f"  {'cached' if cached else 'download':8}  {file}  {gb(size)}")
    needs = [(Path(constants.HF_HUB_CACHE), download, f"{gb(download)} of downloads")]
    by_folder: dict[Path, int] = {}
    for file, folder in archives.items():
        by_folder[folder] = by_folder.get(folder, 0) + sizes[file][0]
    for folder, size in by_folder.items():
        estimate = max(0, size - folder_bytes(folder))
        print(f"  {'extract':8}  into {folder}  about {gb(estimate)} (the zips' size less what is there; "
              "exact once they are downloaded)")
        needs.append((folder, estimate, f"about {gb(estimate)} of images in {folder}"))
    require_space(needs, force)


# --- download ---------------------------------------------------------------------------------------------------

def download(file: HubFile) -> Path:
    """The file's path in the huggingface_hub cache, downloading it if it is not there."""
    try:
        return Path(hf_hub_download(file.repo, file.filename, repo_type=file.repo_type, revision=file.revision))
    except Exception as error:
        raise BuildError(f"could not get {file} from the Hugging Face Hub or its cache ({constants.HF_HUB_CACHE}): "
                         f"{type(error).__name__}: {error}") from error


def source(file: HubFile, path: Path) -> dict:
    """Where a file came from, for build.json: the repo, the file and the commit of the cached snapshot."""
    parts = path.parts
    commit = parts[parts.index("snapshots") + 1] if "snapshots" in parts else None
    return {"repo": file.repo, "repo_type": file.repo_type, "file": file.filename, "commit": commit}


# --- reading annotation files -----------------------------------------------------------------------------------

def parse_json(text: str, name: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise BuildError(f"{name}:{error.lineno}:{error.colno}: not valid JSON: {error.msg}") from None


def read_json(path: Path):
    return parse_json(path.read_text(encoding="utf-8"), str(path))


def read_jsonl(path: Path) -> list[tuple[str, object]]:
    """The objects of a JSON Lines file, each with its place "file:line" for error messages."""
    records = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if line.strip():
                place = f"{path}:{number}"
                try:
                    records.append((place, json.loads(line)))
                except json.JSONDecodeError as error:
                    raise BuildError(f"{place}: not valid JSON: {error.msg} (column {error.colno})") from None
    return records


def read_json_in_zip(archive: Path, basename: str):
    """A JSON member of a small zip (found by its file name wherever it sits), parsed without extracting it."""
    with zipfile.ZipFile(archive) as zf:
        members = [name for name in zf.namelist() if PurePosixPath(name).name == basename]
        if not members:
            raise BuildError(f"{archive}: no member named {basename} (members: {', '.join(zf.namelist()[:10])})")
        with zf.open(members[0]) as member:
            return parse_json(io.TextIOWrapper(member, encoding="utf-8").read(), f"{archive}:{members[0]}")


def require_fields(record, fields: tuple[str, ...], place: str) -> dict:
    if not isinstance(record, dict):
        raise BuildError(f"{place}: expected a JSON object, got {type(record).__name__}")
    missing = [name for name in fields if name not in record]
    if missing:
        raise BuildError(f"{place}: missing field(s) {', '.join(missing)}")
    return record


# --- zips -------------------------------------------------------------------------------------------------------

def path_key(path: str, depth: int) -> str:
    """The last `depth` parts of a path: the name a record and a zip member are matched by."""
    return "/".join(PurePosixPath(path).parts[-depth:])


def member_index(zf: zipfile.ZipFile, depth: int) -> tuple[dict[str, zipfile.ZipInfo], dict[str, list[str]]]:
    """The zip's files by their last `depth` path parts, and the keys that name two different files."""
    index, clashes = {}, {}
    for info in zf.infolist():
        if info.is_dir() or info.filename.startswith("__MACOSX/"):  # macOS zips carry resource-fork copies
            continue
        key = path_key(info.filename, depth)
        other = index.setdefault(key, info)
        if other is not info and (other.CRC, other.file_size) != (info.CRC, info.file_size):
            clashes.setdefault(key, [other.filename]).append(info.filename)
    return index, clashes


def extract(archive: Path, wanted: dict[str, str], out: Path, depth: int = 1, force: bool = False) -> set[str]:
    """Extract the members that `wanted` names into `out`; return the keys the archive does not hold.

    `wanted` maps a key (the last `depth` parts of a member's path: "x.jpg" for depth 1, "00453/x.jpg" for 2)
    to the path, relative to `out`, it goes to. Members are streamed one by one (never the archive into memory)
    in archive order, each written to a temporary name and renamed, so an interrupted run leaves no torn image;
    a target already there with the member's size is skipped. zipfile checks each member's CRC as it reads.
    """
    with zipfile.ZipFile(archive) as zf:
        index, clashes = member_index(zf, depth)
        ambiguous = sorted(set(wanted) & set(clashes))
        if ambiguous:
            raise BuildError(f"{archive}: {len(ambiguous)} wanted name(s) match several different members, "
                             f"e.g. {ambiguous[0]}: {', '.join(clashes[ambiguous[0]])}")
        todo = []
        for key, target in wanted.items():
            info = index.get(key)
            path = out / target
            if info is not None and not (path.is_file() and path.stat().st_size == info.file_size):
                todo.append((info, path))
        todo.sort(key=lambda item: item[0].header_offset)
        total = sum(info.file_size for info, _ in todo)
        print(f"{archive.name}: {len(wanted) - len(todo)} of {len(wanted)} wanted files already extracted; "
              f"extracting {len(todo)} ({gb(total)})")
        require_space([(out, total, f"{gb(total)} of images from {archive.name}")], force)
        made = set()
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"extract {archive.name}") as bar:
            for info, path in todo:
                if path.parent not in made:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    made.add(path.parent)
                tmp = path.with_name(f".{path.name}.tmp")
                try:
                    with zf.open(info) as member, open(tmp, "wb") as file:
                        shutil.copyfileobj(member, file, 1 << 20)
                except (zipfile.BadZipFile, OSError, EOFError) as error:
                    tmp.unlink(missing_ok=True)
                    raise BuildError(f"{archive}: member {info.filename}: {error}") from error
                os.replace(tmp, path)
                bar.update(info.file_size)
    return set(wanted) - set(index)


# --- checking and writing outputs -------------------------------------------------------------------------------

def missing_images(records: Iterable[dict], out: Path) -> list[str]:
    """The image paths of `records` (those that have one) that are not files under `out`."""
    return [r["image"] for r in records if r.get("image") and not (out / r["image"]).is_file()]


def require_images(records: list[dict], out: Path, what: str) -> None:
    missing = missing_images(records, out)
    if missing:
        raise BuildError(f"{what}: {len(missing)} of {len(records)} records' images are missing under {out}, "
                         f"e.g. {', '.join(missing[:5])}")


def check_count(what: str, actual: int, expected: int | tuple[int, ...], force: bool) -> None:
    """Compare a count with the published one(s): a mismatch is a BuildError, or a warning with `force`."""
    allowed = expected if isinstance(expected, tuple) else (expected,)
    if actual not in allowed:
        message = f"{what}: {actual} found, the published count is {' or '.join(map(str, allowed))}"
        if not force:
            raise BuildError(f"{message} (--force to build anyway)")
        print(f"warning: {message}", file=sys.stderr)


def atomic_write(path: Path, write: Callable[[io.TextIOBase], None]) -> None:
    """write(file) into a temporary file beside `path`, then rename it into place: a crash never leaves a torn
    file under the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            write(file)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj, indent: int | None = None) -> None:
    atomic_write(path, lambda file: file.write(json.dumps(obj, ensure_ascii=False, indent=indent) + "\n"))


def write_jsonl(path: Path, records: Iterable[dict]) -> None:
    atomic_write(path, lambda file: file.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
