"""SQ-LLaVA: the v1_sq template and its labels, the visual-user draw, the prototype extractor, train_selfq.py."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import eval as eval_script
from nanovlm.data import DataSource, LLaVADataset
from nanovlm.image import ImageProcessor
from nanovlm.prototypes import PrototypeExtractor
from nanovlm.selfq import to_self_questioning, turn_rng
from nanovlm.templates import IGNORE_INDEX, VICUNA_SYSTEM, get_template, render, tokenize_conversation
from nanovlm.tokenizer import Tokenizer
from nanovlm.vlm import VLM, load_pretrained
from test_train import launch

THREE_TURNS = [
    {"from": "human", "value": "<image>\nWhat is on the table?"}, {"from": "gpt", "value": "Two red cups."},
    {"from": "vuser", "value": "What colour is the chair?"}, {"from": "gpt", "value": "The chair is blue."},
    {"from": "human", "value": "How many people are there?"}, {"from": "gpt", "value": "Three."},
]


def test_v1_sq_renders_the_specified_string():
    text, _ = render(get_template("v1_sq"), THREE_TURNS)
    system = get_template("v1_sq").system
    assert system.startswith(VICUNA_SYSTEM + " ") and "visual user" in system and system.endswith(". ")
    assert text == (system + "USER: <image>\nWhat is on the table? ASSISTANT: Two red cups.</s>"
                    "VUSER: What colour is the chair?</s> ASSISTANT: The chair is blue.</s>"
                    "USER: How many people are there? ASSISTANT: Three.</s>")


def test_v1_sq_labels_cover_answers_and_vuser_questions_only(llama_tokenizer_dir):
    tokenizer = Tokenizer.from_dir(llama_tokenizer_dir)
    template = get_template("v1_sq")
    ids, labels = tokenize_conversation(tokenizer, template, THREE_TURNS, num_image_tokens=4)
    text = render(template, THREE_TURNS)[0]
    expected_ids = tokenizer.bos_ids + tokenizer.encode(text)
    image = expected_ids.index(tokenizer.image_token_id)
    assert ids == expected_ids[:image] + [tokenizer.image_token_id] * 4 + expected_ids[image + 1:]
    runs, current = [], []  # maximal runs of consecutive tokens that carry loss
    for token, label in zip(ids, labels):
        assert label in (token, IGNORE_INDEX)
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    pieces = [tokenizer.decode(run, skip_special_tokens=False).strip() for run in runs + [current] if run]
    assert pieces == ["Two red cups.</s>", "What colour is the chair?</s>", "The chair is blue.</s>", "Three.</s>"]
    # The VUSER prefix, the USER questions and the system prompt stay masked.
    masked = tokenizer.decode([t for t, label in zip(ids, labels) if label == IGNORE_INDEX and t != ids[image]])
    assert "VUSER:" in masked and "How many people are there?" in masked and "curious" in masked


def test_templates_without_a_visual_user_refuse_vuser_turns():
    with pytest.raises(ValueError, match="no visual user"):
        render(get_template("vicuna_v1"), THREE_TURNS)
    with pytest.raises(ValueError, match="turn 0"):
        render(get_template("v1_sq"), [{"from": "vuser", "value": "<image>\nHi?"}, {"from": "gpt", "value": "Hi."}])


def conversation(turns: int, image: bool = True) -> list[dict]:
    out = []
    for j in range(turns):
        out += [{"from": "human", "value": ("<image>\n" if image and j == 0 else "") + f"Q{j}"},
                {"from": "gpt", "value": f"A{j}"}]
    return out


def test_visual_user_draw_is_seeded_per_record_and_epoch_and_spares_the_first_turn():
    conv = conversation(6)
    draws = [[t["from"] for t in to_self_questioning(conv, 0.5, turn_rng(0, i, epoch))[::2]]
             for epoch in range(2) for i in range(200)]
    assert all(d[0] == "human" for d in draws)
    later = [who == "vuser" for d in draws for who in d[1:]]
    assert abs(sum(later) / len(later) - 0.5) < 0.05
    assert draws[:200] != draws[200:]  # a fresh draw each epoch
    again = [[t["from"] for t in to_self_questioning(conv, 0.5, turn_rng(0, i, 0))[::2]] for i in range(200)]
    assert again == draws[:200]  # the same (seed, index, epoch) gives the same turns
    assert to_self_questioning(conversation(1), 1.0, turn_rng(0, 0, 0)) == conversation(1)
    assert to_self_questioning(conversation(3, image=False), 1.0, turn_rng(0, 0, 0)) == conversation(3, False)
    assert conv == conversation(6)  # the record itself is never modified


def test_dataset_puts_loss_on_vuser_questions(tmp_path, llama_tokenizer_dir):
    from PIL import Image

    Image.new("RGB", (28, 28), (200, 30, 30)).save(tmp_path / "a.png")
    (tmp_path / "data.json").write_text(json.dumps([{"id": "0", "image": "a.png", "conversations": conversation(4)}]))
    tokenizer = Tokenizer.from_dir(llama_tokenizer_dir)

    def labelled_text(sq_ratio: float, epoch: int = 0) -> str:
        data = LLaVADataset([DataSource(tmp_path / "data.json")], tokenizer, get_template("v1_sq"),
                            ImageProcessor(size=28, crop_size=28), 4, 512, sq_ratio=sq_ratio)
        data.set_epoch(epoch)
        item = data[0]
        return tokenizer.decode([t for t in item["labels"] if t != IGNORE_INDEX])

    assert "Q" not in labelled_text(0.0)
    assert [q for q in ("Q0", "Q1", "Q2", "Q3") if q in labelled_text(1.0)] == ["Q1", "Q2", "Q3"]
    assert {labelled_text(0.5, epoch) for epoch in range(8)} != {labelled_text(0.5, 0)}


def test_vuser_turn_without_v1_sq_names_the_record(tmp_path, llama_tokenizer_dir):
    from nanovlm.data import BadRecord

    (tmp_path / "data.json").write_text(json.dumps([{"id": "0", "conversations": [
        {"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hi."},
        {"from": "vuser", "value": "Why?"}, {"from": "gpt", "value": "Because."}]}]))
    data = LLaVADataset([DataSource(tmp_path / "data.json")], Tokenizer.from_dir(llama_tokenizer_dir),
                        get_template("vicuna_v1"), ImageProcessor(size=28, crop_size=28), 4, 512)
    with pytest.raises(BadRecord, match=r"data.json record 0: .*no visual user"):
        data[0]


def reference_prototypes(m: PrototypeExtractor, x: torch.Tensor) -> torch.Tensor:
    """The equations of nanovlm/prototypes.py written out one image, centre and token at a time."""
    out = []
    for xi in x:
        L, K = len(xi), m.num_prototypes
        bounds = [(math.floor(n * L / K), math.ceil((n + 1) * L / K)) for n in range(K)]
        f, v = m.value(xi), m.key(xi)
        c = torch.stack([xi[a:b].mean(0) for a, b in bounds])
        for _ in range(m.iterations):
            c = m.centre(c)
            a = torch.stack([torch.softmax(torch.stack([F.cosine_similarity(c[n], v[t], dim=0) for n in range(K)]), 0)
                             for t in range(L)], 1)
            c = a @ f
        cos = torch.stack([torch.stack([F.cosine_similarity(c[n], xi[t], dim=0) for t in range(L)]) for n in range(K)])
        nearest = cos.argmax(0)
        s = torch.sigmoid(m.beta + m.alpha * cos)
        pooled_f = torch.stack([f[a:b].mean(0) for a, b in bounds])
        rows = []
        for t in range(L):
            n = int(nearest[t])
            members = [j for j in range(L) if int(nearest[j]) == n]
            p = (sum(s[n, j] * f[j] for j in members) + pooled_f[n]) / (len(members) + 1)
            rows.append(xi[t] + s[n, t] * p)
        out.append(torch.stack(rows))
    return torch.stack(out)


def test_prototype_extractor_matches_its_equations_and_size():
    torch.manual_seed(0)
    m = PrototypeExtractor(16, num_prototypes=4)
    with torch.no_grad():
        m.alpha.fill_(1.7)
        m.beta.fill_(-0.3)
    x = torch.randn(2, 10, 16)
    got = m(x)
    assert got.shape == x.shape
    assert torch.allclose(got, reference_prototypes(m, x), atol=1e-5)
    got.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
    assert sum(p.numel() for p in PrototypeExtractor(1024, 256).parameters()) == 3 * 1024 * 1025 + 2  # ~3.15M


def selfq(init, world, out, *args, processes=1):
    micro = ["--micro_batch_size", str(16 // processes)]
    return launch(init, world, out, *micro, *args, processes=processes, script="train_selfq.py")


@pytest.mark.slow
def test_one_step_trains_both_loras_and_leaves_every_base_weight(init, world, tmp_path):
    history = selfq(init, world, tmp_path / "run", "--max_steps", "1")
    assert len(history) == 1 and set(history[0]["lr"]) == {"llm_lora", "vision_lora", "projector", "prototypes"}
    base = VLM.from_pretrained(str(init)).state_dict()
    trained = VLM.from_pretrained(str(tmp_path / "run"))  # adapters merged
    adapter = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    changed_b = {k for k, v in adapter.items() if k.endswith("lora_B.weight") and v.abs().sum() > 0}
    assert any(".vision_tower." in k for k in changed_b) and any(".language_model." in k for k in changed_b)
    assert len(changed_b) == len(adapter) // 2  # every B left zero: each adapter got a gradient
    assert trained.prototype_extractor is not None and trained.cfg.template == "v1_sq"
    deltas = {}
    for name in config["target_modules"]:
        r = config["rank_pattern"].get(name, config["r"])
        alpha = config["alpha_pattern"].get(name, config["lora_alpha"])
        B, A = (adapter[f"base_model.model.{name}.lora_{p}.weight"] for p in "BA")
        module = name.replace("model.language_model.", "language_model.").replace(
            "model.vision_tower.encoder.", "vision_tower.")
        deltas[module + ".weight"] = B @ A * alpha / r
    state = trained.state_dict()
    for key, weight in base.items():
        if key.startswith(("vision_tower.", "language_model.")):
            assert torch.allclose(state[key] - deltas.get(key, 0), weight, atol=1e-6), key
        else:
            assert not torch.equal(state[key], weight), key  # the projector trains fully
    assert sum(k.startswith("vision_tower.") for k in deltas) == 4 * 6  # every ViT layer's six Linear


@pytest.mark.slow
def test_torchrun_two_processes_run_selfq_to_the_end(init, world, tmp_path):
    history = selfq(init, world, tmp_path / "run", "--max_steps", "2", "--no-vit-lora", processes=2)
    assert [r["step"] for r in history] == [1, 2] and "vision_lora" not in history[0]["lr"]
    files = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert files == ["adapter", "config.json", "metrics.jsonl", "model.safetensors", "preprocessor_config.json",
                     "summary.json", "tokenizer.json", "tokenizer_config.json", "train_config.json"]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["method"]["no_vit_lora"] and summary["method"]["sq_ratio"] == 0.5
    model = VLM.from_pretrained(str(tmp_path / "run"))
    assert model.prototype_extractor is not None


def test_eval_self_questions_mode(init, world, tmp_path, capsys):
    model, tokenizer, processor = load_pretrained(str(init))
    model.cfg.template = "v1_sq"
    model.save_pretrained(tmp_path, tokenizer, processor)
    image = next((world / "images").glob("*.png"))
    questions = eval_script.main([str(tmp_path), "--image", str(image), "--self_questions", "3"])
    assert len(questions) == 3 and all(isinstance(q, str) for q in questions)
    assert "description:" in capsys.readouterr().out
