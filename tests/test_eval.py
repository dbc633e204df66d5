"""eval.py and nanovlm/benchmarks.py: benchmark files checked line by line, the task metrics, and whole runs on a
trained tiny model and on a llava-hf checkpoint."""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import eval as eval_script
import hub_models
from data.shapes import ShapesConfig, generate
from nanovlm import VLM, ImageProcessor, Tokenizer
from nanovlm.benchmarks import BadBenchmarkRecord, binary_metrics, load, option_letter, pope_answer, prompt, score
from nanovlm.generate import Sampling, answer
from nanovlm.image import load_image
from nanovlm.templates import get_template
from nanovlm.vlm import load_pretrained

ROOT = Path(__file__).resolve().parents[1]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bench")
    (folder / "images").mkdir()
    for i, colour in enumerate(["red", "blue", "green"]):
        Image.new("RGB", (40, 30), colour).save(folder / "images" / f"{i}.png")
    return folder


def vqa_line(i: int, **change) -> dict:
    return {"question_id": i, "image": f"images/{i % 3}.png", "question": "What colour?",
            "answers": ["red"] * 7 + ["dark red"] * 3} | change


@pytest.mark.parametrize("line, message", [
    ("{not json", ":2: not valid JSON"),
    (json.dumps({"question_id": 9, "image": "images/0.png", "question": "q"}), r":2: missing field\(s\) answers"),
    (json.dumps(vqa_line(9, answers=[])), ":2: answers must be a non-empty list"),
    (json.dumps(vqa_line(9, image="images/missing.png")), ":2: image not found"),
    (json.dumps(vqa_line(0)), ":2: id 0 repeats"),
    ("[1, 2]", ":2: expected a JSON object"),
])
def test_a_bad_line_is_named_by_file_and_line(images, line, message):
    path = write_jsonl(images / "bad.jsonl", [vqa_line(0), line])
    with pytest.raises(BadBenchmarkRecord, match=message) as error:
        load("vqa", path)
    assert str(path) in str(error.value)


def test_task_specific_checks(images):
    mc = {"question_id": 1, "question": "Which?", "options": ["a", "b"], "answer": "C"}
    with pytest.raises(BadBenchmarkRecord, match="not the letter of one of its options"):
        load("mc", write_jsonl(images / "mc.jsonl", [mc]))
    pope = {"question_id": 1, "image": "images/0.png", "question": "Is there a cat?", "label": "maybe"}
    with pytest.raises(BadBenchmarkRecord, match=r"pope.jsonl:1: label must be"):
        load("pope", write_jsonl(images / "pope.jsonl", [pope]))
    with pytest.raises(FileNotFoundError, match="benchmark file not found"):
        load("vqa", images / "absent.jsonl")


def test_prompts_follow_llava_evaluation():
    assert prompt("vqa", vqa_line(0)) == "<image>\nWhat colour?\nAnswer the question using a single word or phrase."
    mc = {"question": "Which is a fruit?", "options": ["car", "apple"], "context": "Food.", "image": "x.png"}
    assert prompt("mc", mc) == ("<image>\nContext: Food.\nWhich is a fruit?\nA. car\nB. apple\n"
                                "Answer with the option's letter from the given choices directly.")
    assert prompt("mc", mc | {"image": None, "context": ""}).startswith("Which is a fruit?\nA. car")


@pytest.mark.parametrize("text, letter", [
    ("B", "B"), ("(B)", "B"), ("B. apple", "B"), ("The answer is B.", "B"), ("apple", "B"), ("I think A", "A"),
    ("no idea", None), ("car or apple", None), ("D", None),
])
def test_option_letter(text, letter):
    assert option_letter(text, ["car", "apple", "pear"]) == letter


@pytest.mark.parametrize("text, parsed", [
    ("Yes", "yes"), ("No", "no"), ("no.", "no"), ("Yes, there is a dog.", "yes"), ("There is not a dog.", "no"),
    ("Yes. No cats though.", "yes"),
])
def test_pope_answer_follows_llava_parsing(text, parsed):
    assert pope_answer(text) == parsed


def test_binary_metrics_from_confusion_counts():
    pairs = [("yes", "yes")] * 3 + [("yes", "no")] * 1 + [("no", "yes")] * 2 + [("no", "no")] * 4
    m = binary_metrics(pairs)
    precision, recall = 3 / 4, 3 / 5
    assert m["accuracy"] == pytest.approx(7 / 10) and m["yes_ratio"] == pytest.approx(4 / 10)
    assert (m["precision"], m["recall"]) == (pytest.approx(precision), pytest.approx(recall))
    assert m["f1"] == pytest.approx(2 * precision * recall / (precision + recall))


def test_scores_per_task(images):
    vqa = load("vqa", write_jsonl(images / "v.jsonl", [vqa_line(i) for i in range(3)]))
    assert score(vqa, ["Red.", "dark red", "blue"])["accuracy"] == pytest.approx((1 + 0.9 + 0) / 3)
    pope_lines = [{"question_id": i, "image": "images/0.png", "question": "Is there a cat?", "label": label,
                   "category": category} for i, (label, category) in enumerate(
                       [("yes", "random"), ("no", "random"), ("yes", "popular"), ("no", "popular")])]
    pope = load("pope", write_jsonl(images / "p.jsonl", pope_lines))
    scores = score(pope, ["Yes", "No", "No", "No"])
    assert scores["random"]["accuracy"] == 1.0 and scores["popular"]["accuracy"] == 0.5
    assert scores["overall"]["n"] == 4 and scores["overall"]["yes_ratio"] == 0.25
    mc = load("mc", write_jsonl(images / "m.jsonl", [
        {"question_id": i, "question": "Which?", "options": ["x", "y"], "answer": a} for i, a in enumerate("AB")]))
    assert score(mc, ["A", "something else"]) == {"accuracy": 0.5, "unparsed": 1, "n": 2}
    captions = load("caption", write_jsonl(images / "c.jsonl", [
        {"image_id": i, "image": f"images/{i}.png", "references": [f"a {c} square", f"a plain {c} image"]}
        for i, c in enumerate(["red", "blue", "green"])]))
    perfect, wrong = score(captions, ["a red square", "a blue square", "a green square"]), score(captions, ["x"] * 3)
    assert perfect["CIDEr-D"] > wrong["CIDEr-D"] == 0 and perfect["BLEU-4"] > wrong["BLEU-4"]


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory, llama_tokenizer_dir) -> Path:
    """A llava-hf checkpoint (transformers' format) with tokenizer and preprocessor, as eval.py's MODEL."""
    tokenizer = Tokenizer.from_dir(llama_tokenizer_dir)
    source = hub_models.llava(tmp_path_factory.mktemp("src"), image_token_id=tokenizer.image_token_id)
    path = tmp_path_factory.mktemp("llava")
    VLM.from_pretrained(str(source)).save_pretrained(path, tokenizer, ImageProcessor(size=28, crop_size=28))
    return path


@pytest.mark.parametrize("task", ["vqa", "pope", "mc", "caption", "grounding"])
def test_eval_script_writes_every_prediction_and_its_scores(task, images, llava_dir, tmp_path):
    lines = {
        "vqa": [vqa_line(i) for i in range(5)],
        "pope": [{"question_id": i, "image": f"images/{i % 3}.png", "question": "Is there a dog in the image?",
                  "label": "yes" if i % 2 else "no", "category": "random"} for i in range(5)],
        "mc": [{"question_id": i, "question": "Which colour?", "options": ["red", "blue"], "answer": "AB"[i % 2],
                **({"image": f"images/{i % 3}.png"} if i % 2 else {})} for i in range(5)],
        "caption": [{"image_id": i, "image": f"images/{i % 3}.png", "references": ["a red image", "red"]}
                    for i in range(5)],
        "grounding": [{"id": i, "image": f"images/{i % 3}.png", "expression": "the red square",
                       "box": [0.1, 0.2, 0.5, 0.6], "size": "small"} for i in range(5)],
    }[task]
    data = write_jsonl(images / f"{task}.jsonl", lines)
    out = tmp_path / "preds.json"
    scores = eval_script.main([str(llava_dir), "--task", task, "--data", str(data), "--out", str(out),
                               "--batch_size", "2", "--max_new_tokens", "5"])
    written = json.loads(out.read_text())
    assert written["scores"] == json.loads(json.dumps(scores))
    key = {"caption": "image_id", "grounding": "id"}.get(task, "question_id")
    assert [p[key] for p in written["predictions"]] == list(range(5))
    # the same answers, asked one at a time outside eval.py, give the same predictions
    model, tokenizer, processor = load_pretrained(str(llava_dir))
    benchmark = load(task, data)
    questions = [(load_image(benchmark.image(i)) if benchmark.image(i) else None, prompt(task, r))
                 for i, r in enumerate(benchmark.records)]
    alone = [answer(model, tokenizer, processor, get_template(model.cfg.template), [q], Sampling(max_new_tokens=5))[0]
             for q in questions]
    assert [p["prediction"] for p in written["predictions"]] == alone
    assert score(benchmark, alone) == scores


def test_length_sorted_batches_give_the_unsorted_answers(llava_dir, images, monkeypatch):
    """answer() batches questions longest prompt first and returns them in the order asked: the same answers as
    batches in the given order, greedy and sampled with one generator per question."""
    generation = importlib.import_module("nanovlm.generate")  # the module; nanovlm.generate is the function
    batches = []
    generate_text = generation.generate_text
    monkeypatch.setattr(generation, "generate_text",
                        lambda model, tok, prompts, *rest: batches.append([len(p) for p in prompts]) or
                        generate_text(model, tok, prompts, *rest))
    model, tokenizer, processor = load_pretrained(str(llava_dir))
    template = get_template(model.cfg.template)
    questions = [(images / "images" / f"{i % 3}.png" if i % 2 else None, "<image>\n" * (i % 2) + "colour? " * (1 + i))
                 for i in range(7)]
    for sampling, seeded in ((Sampling(max_new_tokens=6), False), (Sampling(max_new_tokens=6, temperature=1.0), True)):
        runs = [answer(model, tokenizer, processor, template, questions, sampling, batch_size=3, by_length=by_length,
                       generator=[torch.Generator().manual_seed(i) for i in range(7)] if seeded else None)
                for by_length in (True, False)]
        assert runs[0] == runs[1] and len(set(runs[0])) > 1
    sorted_lengths = [n for batch in batches[:3] for n in batch]
    assert sorted_lengths == sorted(sorted_lengths, reverse=True) != [n for batch in batches[3:6] for n in batch]


@pytest.mark.slow
def test_compiled_decoding_answers_as_eager(images, llava_dir, tmp_path, capsys):
    """eval.py --compile (a static cache, the step compiled per batch shape) predicts what the eager run does."""
    data = write_jsonl(images / "compiled.jsonl", [vqa_line(i, question="What colour? " * (1 + i)) for i in range(5)])
    runs = []
    for flags in ([], ["--compile"]):
        out = tmp_path / f"preds{len(flags)}.json"
        eval_script.main([str(llava_dir), "--task", "vqa", "--data", str(data), "--out", str(out), "--batch_size", "2",
                          "--max_new_tokens", "6", *flags])
        runs.append([p["prediction"] for p in json.loads(out.read_text())["predictions"]])
    assert runs[0] == runs[1]
    assert "questions/s" in capsys.readouterr().out


def test_one_question_mode(llava_dir, images, capsys):
    reply = eval_script.main([str(llava_dir), "--image", str(images / "images" / "0.png"), "--prompt",
                              "What colour is it?", "--max_new_tokens", "6"])
    model, tokenizer, processor = load_pretrained(str(llava_dir))
    [expected] = answer(model, tokenizer, processor, get_template(model.cfg.template),
                        [(load_image(images / "images" / "0.png"), "<image>\nWhat colour is it?")],
                        Sampling(max_new_tokens=6))
    assert reply == expected and expected in capsys.readouterr().out


def test_template_flag_replaces_the_saved_template(llava_dir, images, monkeypatch):
    """--template reaches the prompt: the answering function sees the system text of the template asked for."""
    seen = []

    def spy(model, tokenizer, processor, template, items, sampling):
        seen.append((model.cfg.template, template.system))
        return ["x"]

    monkeypatch.setattr(eval_script, "answer", spy)
    args = [str(llava_dir), "--image", str(images / "images" / "0.png"), "--prompt", "What colour is it?"]
    eval_script.main(args)
    eval_script.main(args + ["--template", "v1_sq"])
    assert seen[0][1] != seen[1][1] and seen[1] == ("v1_sq", get_template("v1_sq").system)
    # a benchmark answered with another template is written beside the model under its own name
    monkeypatch.undo()
    data = write_jsonl(images / "vqa_template.jsonl", [vqa_line(i) for i in range(2)])
    eval_script.main([str(llava_dir), "--task", "vqa", "--data", str(data), "--template", "v1_sq",
                      "--max_new_tokens", "3"])
    assert json.loads((llava_dir / "eval_vqa_v1_sq.json").read_text())["template"] == "v1_sq"
    assert not (llava_dir / "eval_vqa.json").exists()


@pytest.mark.slow
def test_shapes_accuracy_equals_what_training_reported(tmp_path):
    """A short stage 2 on a small world prints its shapes table; eval.py on the saved model prints the same."""
    world = tmp_path / "out" / "shapes"
    generate(world, ShapesConfig(num_train=200, num_unlabeled=0, num_eval=60))
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for script in ("train_align.py", "train_sft.py"):  # the defaults: the shapes world in ./out/shapes
        run = subprocess.run([sys.executable, str(ROOT / script), "--max_steps", "30", "--global_batch_size", "16",
                              "--micro_batch_size", "16"], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
    reported = json.loads((tmp_path / "out" / "tiny" / "sft" / "eval_shapes.json").read_text())
    run = subprocess.run([sys.executable, str(ROOT / "eval.py"), "out/tiny/sft", "--task", "shapes", "--out",
                          "again.json"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["scores"] == reported["scores"]
    assert [p["prediction"] for p in again["predictions"]] == [p["prediction"] for p in reported["predictions"]]
    assert sum(bool(p["prediction"]) for p in reported["predictions"]) > len(reported["predictions"]) / 2
