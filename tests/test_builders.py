"""The Hub dataset builders (data/*.py) on tiny fixtures laid out as huggingface_hub's cache of dataset repos.

Each test writes a handful of records in the source files' real formats and a few tiny images in zips with the
mirror's inner layout, then runs the builder's main() with HF_HUB_OFFLINE=1, so files come through the same
hf_hub_download(..., repo_type="dataset") call a real download makes, only from the cache.
"""

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from huggingface_hub import constants
from huggingface_hub.hf_api import RepoFile
from PIL import Image

from data import coco_captions, hub, llava_mix665k, llava_pretrain, pope, refcoco, textvqa
from nanovlm.benchmarks import load
from nanovlm.data import check_record

COMMIT = "c0ffee" + "0" * 34


def image_bytes(seed: int, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 6), (seed * 40 % 256, 90, 200)).save(buffer, fmt)
    return buffer.getvalue()


def zip_bytes(members: dict[str, bytes]) -> bytes:
    """A zip as the mirrors make them: a folder entry, then its files (and, here, a macOS resource fork)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for folder in sorted({name.rsplit("/", 1)[0] + "/" for name in members if "/" in name}):
            zf.writestr(folder, b"")
        for name, data in members.items():
            zf.writestr(name, data)
        zf.writestr("__MACOSX/._junk.jpg", b"not an image")
    return buffer.getvalue()


def jsonl(lines: list[dict]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def hub_dataset(home: Path, repo_id: str, files: dict[str, bytes], commit: str = COMMIT,
                kind: str = "datasets") -> None:
    """Lay `files` (path in the repo -> content) out as huggingface_hub's cache of a dataset repo (a model repo with
    kind="models") under HF_HOME=home: content-named blobs, a snapshot of relative symlinks (nested paths
    included), refs/main."""
    repo = home / "hub" / f"{kind}--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """HF_HOME for an offline run in this process. huggingface_hub reads the variables once, when imported,
    so its constants are set too; test_command_line_offline checks the variables themselves."""
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return home


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_images_open(out: Path, records: list[dict]) -> None:
    for record in records:
        if "image" in record:
            with Image.open(out / record["image"]) as image:
                image.verify()


# --- POPE -------------------------------------------------------------------------------------------------------

def pope_lines(category: str, images: list[int]) -> list[dict]:
    objects = {"random": "snowboard", "popular": "person", "adversarial": "chair"}
    return [{"question_id": i + 1, "image": f"COCO_val2014_{n:012d}.jpg",
             "text": f"Is there a {objects[category]} in the image?", "label": "yes" if i % 2 else "no"}
            for i, n in enumerate(images)]


def pope_fixture(home: Path, broken_line: int = 0, sizes: dict[str, int] | None = None) -> None:
    files = {}
    for category in pope.CATEGORIES:
        images = [1, 1, 2, 3] if sizes is None else [1 + i % 3 for i in range(sizes[category])]
        lines = jsonl(pope_lines(category, images)).decode().splitlines(keepends=True)
        if broken_line and category == "popular":
            lines[broken_line - 1] = lines[broken_line - 1][:-3] + "\n"  # a line cut short
        files[f"eval/pope/coco_pope_{category}.json"] = "".join(lines).encode()
    hub_dataset(home, "Dense-World/VLM", files)
    val = {f"val2014/COCO_val2014_{n:012d}.jpg": image_bytes(n) for n in (1, 2, 3, 4)}
    hub_dataset(home, "nyanko7/coco-hosted", {"val2014.zip": zip_bytes(val)})


def test_pope(home, tmp_path):
    pope_fixture(home)
    out = tmp_path / "pope"
    build = pope.main(["--out", str(out), "--force"])  # 4 questions a category: not the published 3000
    records = read_jsonl(out / "pope.jsonl")
    assert len(records) == 12 and [r["category"] for r in records] == ["random"] * 4 + ["popular"] * 4 + [
        "adversarial"] * 4
    assert records[1] == {"question_id": "random-2", "image": "images/COCO_val2014_000000000001.jpg",
                          "question": "Is there a snowboard in the image?", "label": "yes", "category": "random"}
    assert len({r["question_id"] for r in records}) == 12
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"COCO_val2014_{n:012d}.jpg" for n in (1, 2, 3)]
    assert_images_open(out, records)
    assert build["source_counts"]["popular"] == {"questions": 4, "yes": 2, "no": 2, "images": 3}
    assert build["sources"][0] == {"repo": "Dense-World/VLM", "repo_type": "dataset",
                                   "file": "eval/pope/coco_pope_random.json", "commit": COMMIT}
    assert json.loads((out / "build.json").read_text()) == build


def test_pope_counts_are_checked(home, tmp_path):
    pope_fixture(home)
    with pytest.raises(hub.BuildError, match=r"coco_pope_random.json \(random\): 4 found, the published count "
                                             r"is 3000 or 2910 \(--force to build anyway\)"):
        pope.main(["--out", str(tmp_path / "pope")])


def test_pope_random_split_of_llava_15(home, tmp_path, capsys):
    """The POPE commit LLaVA-1.5 used has 2910 random questions: accepted, and reported."""
    pope_fixture(home, sizes={"random": 2910, "popular": 3000, "adversarial": 3000})
    build = pope.main(["--out", str(tmp_path / "pope"), "--limit", "2"])  # counts are of the whole files
    assert "random: 2910 questions (1455 yes, 1455 no) on 3 images" in capsys.readouterr().out
    assert build["source_counts"]["random"]["questions"] == 2910 and build["questions"] == 6
    assert len(read_jsonl(tmp_path / "pope" / "pope.jsonl")) == 6


def test_malformed_jsonl_line_names_file_and_line(home, tmp_path):
    pope_fixture(home, broken_line=3)
    with pytest.raises(hub.BuildError, match=r"coco_pope_popular\.json:3: not valid JSON"):
        pope.main(["--out", str(tmp_path / "pope"), "--force"])


def test_pope_rerun_skips_extracted_images(home, tmp_path, capsys):
    pope_fixture(home)
    out = tmp_path / "pope"
    pope.main(["--out", str(out), "--force"])
    image = out / "images" / "COCO_val2014_000000000001.jpg"
    image.write_bytes(b"torn")  # a wrong size: extracted again
    capsys.readouterr()
    pope.main(["--out", str(out), "--force"])
    assert "val2014.zip: 2 of 3 wanted files already extracted; extracting 1" in capsys.readouterr().out
    assert image.read_bytes() == image_bytes(1)


# --- disk space, offline errors, the command line ---------------------------------------------------------------

def test_disk_shortfall_stops_before_downloading_unless_forced(home, tmp_path, monkeypatch, capsys):
    pope_fixture(home)
    downloads = []

    def spy(*args, **kwargs):
        downloads.append(args[1])
        return real_download(*args, **kwargs)

    real_download = hub.hf_hub_download
    monkeypatch.setattr(hub, "hf_hub_download", spy)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=10**12, used=10**12, free=1000))
    out = tmp_path / "pope"
    with pytest.raises(hub.BuildError, match=r"not enough disk space on .*: this build writes 0\.00 GB there "
                                             r"\(0\.00 GB of downloads; about 0\.00 GB of images in .*\) and 0\.00 GB "
                                             r"is free \(--force to try anyway\)"):
        pope.main(["--out", str(out), "--limit", "1"])
    assert downloads == [] and not out.exists()
    printed = capsys.readouterr().out
    assert "cached    Dense-World/VLM/eval/pope/coco_pope_random.json" in printed
    assert "extract   into" in printed and "exact once they are downloaded" in printed

    pope.main(["--out", str(out), "--force"])
    assert len(downloads) == 4 and len(read_jsonl(out / "pope.jsonl")) == 12
    assert "warning: not enough disk space" in capsys.readouterr().err


def test_sizes_of_files_to_download_come_from_the_hub(home, tmp_path, monkeypatch, capsys):
    """Online, a file not in the cache is measured by the Hub's metadata, and a shortfall stops the build
    before anything is downloaded."""
    pope_fixture(home)
    shutil.rmtree(home / "hub" / "datasets--nyanko7--coco-hosted")  # val2014.zip is not downloaded yet
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    asked = []

    class Hub:
        def get_paths_info(self, repo_id, paths, repo_type=None, revision=None):
            asked.append((repo_id, paths, repo_type, revision))
            return [RepoFile(path="val2014.zip", size=6_645_013_297, oid="0" * 40)]  # the official zip's size

    monkeypatch.setattr(hub, "HfApi", Hub)
    monkeypatch.setattr(hub, "hf_hub_download", lambda *args, **kwargs: pytest.fail("downloaded"))
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=10**12, used=0, free=5 * 10**9))
    with pytest.raises(hub.BuildError, match=r"this build writes 13\.29 GB there \(6\.65 GB of downloads; about "
                                             r"6\.65 GB of images in .*\) and 5\.00 GB is free"):
        pope.main(["--out", str(tmp_path / "pope")])
    assert asked == [("nyanko7/coco-hosted", ["val2014.zip"], "dataset", None)]
    assert "download  nyanko7/coco-hosted/val2014.zip  6.65 GB" in capsys.readouterr().out


def test_file_missing_from_offline_cache_is_named(home, tmp_path):
    pope_fixture(home)
    shutil.rmtree(home / "hub" / "datasets--nyanko7--coco-hosted")
    with pytest.raises(hub.BuildError, match=r"nyanko7/coco-hosted/val2014\.zip: not in the Hugging Face cache"):
        pope.main(["--out", str(tmp_path / "pope"), "--force"])


def test_command_line_offline(tmp_path):
    """`python data/pope.py` from another folder, with HF_HOME and HF_HUB_OFFLINE as the only configuration."""
    pope_fixture(tmp_path / "hf")
    env = os.environ | {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    script = str(Path(pope.__file__))
    command = [sys.executable, script, "--out", str(tmp_path / "pope"), "--revision", COMMIT]
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and run.stderr.splitlines()[-1].startswith("error: ") and "published" in run.stderr
    run = subprocess.run(command + ["--force"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert len(read_jsonl(tmp_path / "pope" / "pope.jsonl")) == 12


# --- TextVQA ----------------------------------------------------------------------------------------------------

def textvqa_fixture(home: Path, answers_of_last: int = 10) -> None:
    data = [{"question": f"what is written on sign {i}?", "image_id": image_id, "question_id": 34602 + i,
             "answers": [f"word{i}"] * 7 + ["other"] * 3, "image_classes": ["Sign"], "flickr_original_url": "",
             "flickr_300k_url": "", "image_width": 8, "image_height": 6, "question_tokens": [], "set_name": "val"}
            for i, image_id in enumerate(["0054c91397f2fe05", "0054c91397f2fe05", "00c359f294f7dcd9"])]
    data[-1]["answers"] = data[-1]["answers"][:answers_of_last]
    questions = {"dataset_type": "val", "dataset_name": "textvqa", "dataset_version": "0.5.1", "data": data}
    images = {f"train_images/{image_id}.jpg": image_bytes(i)
              for i, image_id in enumerate(["0054c91397f2fe05", "00c359f294f7dcd9", "ffffffffffffffff"])}
    hub_dataset(home, "Dense-World/VLM", {"eval/textvqa/TextVQA_0.5.1_val.json": json.dumps(questions).encode(),
                                          "eval/textvqa/train_val_images.zip": zip_bytes(images)})


def test_textvqa(home, tmp_path, capsys):
    textvqa_fixture(home)
    out = tmp_path / "textvqa"
    build = textvqa.main(["--out", str(out), "--force"])
    records = read_jsonl(out / "textvqa_val.jsonl")
    assert records[0] == {"question_id": 34602, "image": "images/0054c91397f2fe05.jpg",
                          "question": "what is written on sign 0?", "answers": ["word0"] * 7 + ["other"] * 3}
    assert len(records) == 3 and all(len(r["answers"]) == 10 for r in records)
    assert sorted(p.name for p in (out / "images").iterdir()) == ["0054c91397f2fe05.jpg", "00c359f294f7dcd9.jpg"]
    assert_images_open(out, records)
    assert build["questions"] == 3 and build["images"] == 2
    assert "questions: 3 found, the published count is 5000" in capsys.readouterr().err


def test_textvqa_needs_ten_answers(home, tmp_path):
    textvqa_fixture(home, answers_of_last=9)
    with pytest.raises(hub.BuildError, match=r"TextVQA_0\.5\.1_val\.json data\[2\] \(question_id 34604\): "
                                             r"expected 10 answer strings"):
        textvqa.main(["--out", str(tmp_path / "textvqa"), "--force"])


# --- COCO captions, Karpathy split ------------------------------------------------------------------------------

def coco_image(cocoid: int, split: str, folder: str, captions: int = 5) -> dict:
    sentences = [{"tokens": ["a", "cat"], "raw": f"A cat number {cocoid}, caption {j}. ", "imgid": cocoid,
                  "sentid": cocoid * 10 + j} for j in range(captions)]
    return {"filepath": folder, "sentids": [s["sentid"] for s in sentences],
            "filename": f"COCO_{folder}_{cocoid:012d}.jpg", "imgid": cocoid, "split": split,
            "sentences": sentences, "cocoid": cocoid}


def test_coco_captions(home, tmp_path, capsys):
    images = [coco_image(1, "train", "train2014"), coco_image(2, "train", "train2014"),
              coco_image(3, "restval", "val2014"), coco_image(4, "test", "val2014", captions=6),
              coco_image(5, "test", "val2014"), coco_image(6, "val", "val2014")]
    karpathy = json.dumps({"images": images, "dataset": "coco"}).encode()
    annotations = zip_bytes({"dataset_coco.json": karpathy, "dataset_flickr8k.json": b"{}"})
    zips = {folder: zip_bytes({f"{folder}/{i['filename']}": image_bytes(i["cocoid"]) for i in images
                               if i["filepath"] == folder}) for folder in ("train2014", "val2014")}
    hub_dataset(home, "nyanko7/coco-hosted", {"caption_datasets.zip": annotations,
                                              "train2014.zip": zips["train2014"], "val2014.zip": zips["val2014"]})
    out = tmp_path / "coco"
    build = coco_captions.main(["--out", str(out), "--force"])

    train = json.loads((out / "coco_karpathy_train.json").read_text())
    assert [r["id"] for r in train] == ["1", "2", "3"]
    assert train[2]["image"] == "images/COCO_val2014_000000000003.jpg"
    human, gpt = train[0]["conversations"]
    assert human["from"] == "human" and human["value"].startswith("<image>\n")
    assert human["value"][len("<image>\n"):] in coco_captions.PROMPTS
    assert gpt == {"from": "gpt", "value": "A cat number 1, caption 0."}
    for record in train:
        check_record(record, out)  # what the trainers check before training starts

    test = read_jsonl(out / "coco_karpathy_test.jsonl")
    assert test[0] == {"image_id": 4, "image": "images/COCO_val2014_000000000004.jpg",
                       "references": [f"A cat number 4, caption {j}." for j in range(6)]}
    assert [r["image_id"] for r in test] == [4, 5]

    unlabeled = json.loads((out / "coco_unlabeled.json").read_text())
    assert unlabeled == [{"id": r["id"], "image": r["image"]} for r in train]
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(i["filename"] for i in images[:5])
    assert_images_open(out, train + test)
    assert build["train"] == 3 and build["test"] == 2 and build["splits"] == {"train": 2, "restval": 1, "val": 1,
                                                                              "test": 2}
    assert "split train: 2 found, the published count is 82783" in capsys.readouterr().err


# --- LLaVA-Pretrain ---------------------------------------------------------------------------------------------

def pretrain_record(image: str) -> dict:
    return {"id": Path(image).stem, "image": image, "conversations": [
        {"from": "human", "value": "Render a clear and concise summary of the photo.\n<image>"},
        {"from": "gpt", "value": f"caption of {image}"}]}


@pytest.mark.parametrize("root", ["", "LLaVA-Pretrain/images/"])  # the zip's root is not guaranteed
def test_llava_pretrain(home, tmp_path, root, capsys):
    present = ["00000/000000001.jpg", "00000/000000002.jpg", "00453/004539375.jpg"]
    records = [pretrain_record(image) for image in present + ["00001/000010001.jpg"]]  # the last is not in the zip
    members = {f"{root}{image}": image_bytes(i) for i, image in enumerate(present)}
    members[f"{root}00099/000000001.jpg"] = image_bytes(99)  # the same file name in another folder
    hub_dataset(home, "liuhaotian/LLaVA-Pretrain", {"blip_laion_cc_sbu_558k.json": json.dumps(records).encode(),
                                                    "images.zip": zip_bytes(members),
                                                    "blip_laion_cc_sbu_558k_meta.json": b"[]"})
    out = tmp_path / "pretrain"
    build = llava_pretrain.main(["--out", str(out), "--force"])
    kept = json.loads((out / "blip_laion_cc_sbu_558k.json").read_text())
    assert kept == [r | {"image": f"images/{r['image']}"} for r in records[:3]]
    assert (out / "images" / "00000" / "000000001.jpg").read_bytes() == image_bytes(0)
    assert not (out / "images" / "00099").exists()
    for record in kept:
        check_record(record, out)
    assert_images_open(out, kept)
    assert build["records"] == 4 and build["kept"] == 3 and build["dropped_missing_image"] == 1
    assert build["dropped_images"] == ["00001/000010001.jpg"]
    assert "dropped 1 records whose image is not in images.zip" in capsys.readouterr().err

    llava_pretrain.main(["--out", str(out), "--force", "--limit", "2"])
    assert len(json.loads((out / "blip_laion_cc_sbu_558k.json").read_text())) == 2


# --- LLaVA-1.5 mix665k ------------------------------------------------------------------------------------------

MIX_MEMBERS = {  # archive file -> (a member path with the mirror's root, the record's image path)
    "train2017.zip": [("train2017/000000033471.jpg", "coco/train2017/000000033471.jpg"),
                      ("train2017/000000052846.jpg", "coco/train2017/000000052846.jpg")],
    "images.zip@gqa": [("images/2354786.jpg", "gqa/images/2354786.jpg")],
    "ocr_vqa_images_llava_v15.zip": [("ocr_vqa/images/71789127.jpg", "ocr_vqa/images/71789127.jpg")],
    "train_val_images.zip": [("train_images/0054c91397f2fe05.jpg", "textvqa/train_images/0054c91397f2fe05.jpg")],
    "images.zip@vg": [("VG_100K/2316184.jpg", "vg/VG_100K/2316184.jpg")],
    "images2.zip": [("VG_100K_2/2400001.jpg", "vg/VG_100K_2/2400001.jpg")],
}


def mix_record(i: int, image: str | None) -> dict:
    turns = [{"from": "human", "value": ("<image>\n" if image else "") + "What is this?"},
             {"from": "gpt", "value": "A thing."}, {"from": "human", "value": "And then?"},
             {"from": "gpt", "value": "Another thing."}]
    record = {"id": i if image and image.startswith("gqa") else f"{i:012d}", "conversations": turns}
    return record | ({"image": image} if image else {"model": ""})


def test_llava_mix665k(home, tmp_path, capsys):
    images = [image for members in MIX_MEMBERS.values() for _, image in members]
    records = [mix_record(i, image) for i, image in enumerate(images)]
    records.insert(3, mix_record(100, "ocr_vqa/images/99999999.jpg"))  # not in the OCR-VQA archive
    records += [mix_record(101, None), mix_record(102, None)]  # ShareGPT, text-only
    hub_dataset(home, "liuhaotian/LLaVA-Instruct-150K", {"llava_v1_5_mix665k.json": json.dumps(records).encode()})
    zips = {name: zip_bytes({member: image_bytes(i) for i, (member, _) in enumerate(members)})
            for name, members in MIX_MEMBERS.items()}
    for repo, name, _, folder in llava_mix665k.ARCHIVES:
        key = {"gqa/images": "images.zip@gqa", "vg/VG_100K": "images.zip@vg"}.get(folder, name)
        hub_dataset(home, repo, {name: zips[key]})

    out = tmp_path / "mix"
    build = llava_mix665k.main(["--out", str(out), "--force"])
    kept = json.loads((out / "llava_v1_5_mix665k.json").read_text())
    assert len(kept) == len(records) - 1 == 9
    assert [r.get("image") for r in kept] == images + [None, None]
    assert all(isinstance(r["id"], str) for r in kept)
    assert kept[-1] == {"id": "000000000102", "conversations": records[-1]["conversations"], "model": ""}
    for record in kept:
        check_record(record, out)
    assert_images_open(out, kept)
    assert build["records"] == 10 and build["kept"] == 9 and build["text_only"] == 2
    assert build["dropped_missing_image"] == 1 and build["dropped_images"] == ["ocr_vqa/images/99999999.jpg"]
    assert build["dropped_per_folder"] == {"ocr_vqa/images": 1}
    assert build["images_per_folder"]["coco/train2017"] == 2
    assert json.loads((out / "build.json").read_text()) == build
    assert "dropped 1 records whose image is missing: ocr_vqa/images 1" in capsys.readouterr().err

    small = tmp_path / "mix_small"
    build = llava_mix665k.main(["--out", str(small), "--force", "--limit", "2"])  # coco only
    assert build["kept"] == 2 and [s["file"] for s in build["sources"]] == ["llava_v1_5_mix665k.json",
                                                                           "train2017.zip"]
    assert sorted(p.name for p in small.iterdir()) == ["build.json", "coco", "llava_v1_5_mix665k.json"]


# --- RefCOCO, RefCOCO+, RefCOCOg (MDETR's files) --------------------------------------------------------------

REFCOCO_IMAGES = {1: (40, 30), 2: (20, 32), 3: (16, 16)}  # COCO train2014 id -> (width, height)


def mdetr_file(entries: list[tuple[int, str, list]], extra_annotation: bool = False) -> bytes:
    """MDETR's COCO-style refexp file: an image entry per (coco id, expression, bbox), one annotation each."""
    images = [{"file_name": f"COCO_train2014_{coco:012d}.jpg", "height": REFCOCO_IMAGES[coco][1],
               "width": REFCOCO_IMAGES[coco][0], "id": i, "original_id": coco, "caption": expression,
               "dataset_name": "refcoco", "tokens_negative": []} for i, (coco, expression, _) in enumerate(entries)]
    annotations = [{"area": 1.0, "iscrowd": 0, "image_id": i, "category_id": 1, "id": i, "bbox": bbox,
                    "original_id": 100 + i, "tokens_positive": []} for i, (_, _, bbox) in enumerate(entries)]
    if extra_annotation:
        annotations.append(annotations[0] | {"id": 99})
    return json.dumps({"info": {}, "licenses": [], "images": images, "annotations": annotations,
                       "categories": []}).encode()


def refcoco_fixture(home: Path, testa: list | None = None, sizes: dict | None = None, **kwargs) -> None:
    testa = testa or [(1, "man on the left", [4, 6, 10, 8]), (2, "tall tree", [2, 4, 6, 10]),
                      (1, "the right dog", [20, 0, 20, 30])]
    files = {"mdetr_annotations/finetune_refcoco_testA.json": mdetr_file(testa, **kwargs),
             "mdetr_annotations/finetune_refcocog_val.json": mdetr_file([(3, "a square", [0, 0, 16, 16])])}
    hub_dataset(home, "GLIPModel/GLIP", files, kind="models")
    members = {}
    for coco, size in (sizes or REFCOCO_IMAGES).items():
        buffer = io.BytesIO()
        Image.new("RGB", size, (coco * 60, 0, 0)).save(buffer, "JPEG")
        members[f"train2014/COCO_train2014_{coco:012d}.jpg"] = buffer.getvalue()
    hub_dataset(home, "nyanko7/coco-hosted", {"train2014.zip": zip_bytes(members)})


def test_refcoco_boxes_on_the_padded_square(home, tmp_path, capsys):
    refcoco_fixture(home)
    out = tmp_path / "refcoco"
    build = refcoco.main(["--out", str(out), "--sets", "refcoco_testA", "refcocog_val", "--force"])
    records = read_jsonl(out / "refcoco_testA.jsonl")
    assert records[0] == {"id": "refcoco_testA-0", "image": "images/COCO_train2014_000000000001.jpg",
                          "expression": "man on the left", "box": [0.1, 0.275, 0.35, 0.475], "dataset": "refcoco",
                          "split": "testA", "width": 40, "height": 30}  # 40x30 padded to 40x40: 5 rows above
    assert records[1]["box"] == [0.25, 0.125, 0.4375, 0.4375]  # 20x32 padded to 32x32: 6 columns to the left
    assert records[2]["box"] == [0.5, 0.125, 1.0, 0.875]
    assert read_jsonl(out / "refcocog_val.jsonl")[0]["box"] == [0.0, 0.0, 1.0, 1.0]
    benchmark = load("grounding", out / "refcoco_testA.jsonl")  # what eval.py --task grounding reads
    assert [r["expression"] for r in benchmark.records] == ["man on the left", "tall tree", "the right dog"]
    assert_images_open(out, records)
    assert build["expressions"] == {"refcoco_testA": 3, "refcocog_val": 1}
    assert build["sources"][0] == {"repo": "GLIPModel/GLIP", "repo_type": "model",
                                   "file": "mdetr_annotations/finetune_refcoco_testA.json", "commit": COMMIT}
    assert "refcoco_testA): 3 found, the published count is 5657" in capsys.readouterr().err
    with pytest.raises(hub.BuildError, match="published count is 5657 \\(--force to build anyway\\)"):
        refcoco.main(["--out", str(out), "--sets", "refcoco_testA"])


@pytest.mark.parametrize("change, message", [
    ({"testa": [(1, "a man", [4, 6, -10, 8])]}, r"finetune_refcoco_testA\.json annotations\[0\] \(image entry 0\): "
                                                 r"bbox \[4, 6, -10, 8\] is not a box inside its 40x30 image"),
    ({"testa": [(1, "a man", [30, 6, 20, 8])]}, r"bbox \[30, 6, 20, 8\] is not a box inside"),
    ({"testa": [(1, "a man", [1, 2, 3])]}, r"bbox \[1, 2, 3\] is not a box"),
    ({"testa": [(1, "a man", [1, 2, 3, "x"])]}, r"is not a box"),
    ({"testa": [(1, "", [1, 2, 3, 4])]}, r"images\[0\] \(id 0\): empty expression"),
    ({"extra_annotation": True}, r"images\[0\] \(id 0\): 2 annotations, expected exactly one"),
    ({"sizes": {1: (40, 31), 2: (20, 32), 3: (16, 16)}}, r"refcoco_testA-0: .* is \(40, 31\), its annotation says "
                                                         r"\(40, 30\)"),
])
def test_refcoco_bad_annotations_are_named(home, tmp_path, change, message):
    refcoco_fixture(home, **change)
    with pytest.raises(hub.BuildError, match=message):
        refcoco.main(["--out", str(tmp_path / "refcoco"), "--sets", "refcoco_testA", "--force"])
    assert not (tmp_path / "refcoco" / "refcoco_testA.jsonl").exists()


# --- hub helpers ------------------------------------------------------------------------------------------------

def test_json_errors_name_file_and_place(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"id": 1},\n  {"id": 2,}\n]\n')
    with pytest.raises(hub.BuildError, match=r"broken\.json:3:12: not valid JSON"):
        hub.read_json(path)
    with pytest.raises(hub.BuildError, match=r"here: missing field\(s\) image"):
        hub.require_fields({"id": 1}, ("id", "image"), "here")


def test_ambiguous_member_names_are_an_error(tmp_path):
    archive = tmp_path / "a.zip"
    archive.write_bytes(zip_bytes({"a/x.jpg": image_bytes(1), "b/x.jpg": image_bytes(2), "b/y.jpg": image_bytes(3)}))
    with pytest.raises(hub.BuildError, match=r"match several different members, e\.g\. x\.jpg: a/x\.jpg, b/x\.jpg"):
        hub.extract(archive, {"x.jpg": "images/x.jpg"}, tmp_path / "out")
    assert hub.extract(archive, {"a/x.jpg": "x.jpg", "c/z.jpg": "z.jpg"}, tmp_path / "out", depth=2) == {"c/z.jpg"}
    assert (tmp_path / "out" / "x.jpg").read_bytes() == image_bytes(1)


def test_writes_are_atomic(tmp_path, monkeypatch):
    path = tmp_path / "records.jsonl"
    hub.write_jsonl(path, [{"a": 1}])

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        hub.write_jsonl(path, [{"a": 2}])
    assert read_jsonl(path) == [{"a": 1}] and [p.name for p in tmp_path.iterdir()] == ["records.jsonl"]
