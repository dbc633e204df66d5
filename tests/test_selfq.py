"""SQ-LLaVA: the v1_sq template and its labels, the visual-user draw, the prototype extractor, train_selfq.py."""

import json
import math
import subprocess

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import eval as eval_script
import train_selfq
from data import prototype_entropy
from data.prototype_entropy import relative_entropy
from nanovlm.data import DataSource, LLaVADataset
from nanovlm.image import ImageProcessor
from nanovlm.prototypes import PrototypeExtractor
from nanovlm.selfq import to_self_questioning, turn_rng
from nanovlm.templates import IGNORE_INDEX, VICUNA_SYSTEM, get_template, render, tokenize_conversation
from nanovlm.tokenizer import Tokenizer
from nanovlm.vlm import VLM
from test_train import ENV, command, launch

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


def test_relative_entropy_of_assignments():
    k = 8
    uniform = torch.full((2, k, 5), 1 / k)
    one_hot = F.one_hot(torch.tensor([[0, 3, 7, 1, 1]] * 2), k).transpose(1, 2).float()
    half = torch.zeros(1, k, 1)
    half[0, :2, 0] = 0.5  # two centres share a patch: entropy log 2 of log 8
    assert relative_entropy(uniform) == pytest.approx(1.0) and relative_entropy(one_hot) == pytest.approx(0.0)
    assert relative_entropy(half) == pytest.approx(1 / 3)


@pytest.mark.parametrize("norm", ["feature", "token"])
def test_new_extractor_assigns_uniformly_under_either_axis(init, world, norm):
    """No temperature on cosines of random projections: a new extractor's soft assignment is uniform to ~1e-3
    at its first iteration and ~1e-5 at its second, whichever axis normalises v(x)."""
    result = prototype_entropy.main([str(init), "--world", str(world), "--images", "8", "--new", "8", "--norm", norm])
    first, second = result["one_minus_entropy_over_log_k"]
    # 1 - H / log k >= 0, but float rounding can leave a nearly uniform assignment's a hair below 0
    assert 0 < first < 1e-2 and -1e-6 < second < 1e-4 and result["key_norm"] == norm


def selfq(init, world, out, *args, processes=1):
    micro = ["--micro_batch_size", str(16 // processes)]
    return launch(init, world, out, *micro, *args, processes=processes, script="train_selfq.py")


def shapes_batch(model: VLM, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two sequences with one image each (its 16 image tokens) among random text tokens of the tiny vocabulary."""
    g = torch.Generator().manual_seed(seed)
    n = model.cfg.num_image_tokens()
    ids = torch.randint(3, min(model.cfg.llm.vocab_size, model.cfg.image_token_id), (2, n + 12), generator=g)
    ids[0, 2:2 + n] = ids[1, 5:5 + n] = model.cfg.image_token_id
    return ids, torch.randn(2, 3, model.cfg.vision.image_size, model.cfg.vision.image_size, generator=g)


def logits(model: VLM, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(*batch)


@pytest.fixture(scope="module")
def stage1(init, world, tmp_path_factory):
    """SQ-LLaVA's stage 1, shortened: train_align.py --prototypes 8 from the tiny model, on the small world."""
    out = tmp_path_factory.mktemp("align-prototypes")
    launch(init, world, out, "--prototypes", "8", "--max_steps", "2", script="train_align.py", data="captions.json")
    return out


def test_stage_1_trains_the_extractor_with_the_projector(init, stage1):
    history = [json.loads(line) for line in (stage1 / "metrics.jsonl").open()]
    assert history[0]["lr"]["prototypes"] == history[0]["lr"]["projector"]
    before, after = VLM.from_pretrained(str(init)), VLM.from_pretrained(str(stage1))
    assert after.cfg.prototypes == 8 and after.cfg.prototype_norm == "feature" and before.prototype_extractor is None
    torch.manual_seed(0)  # train_align.py's seed: the extractor it started from
    before.add_prototype_extractor(8)
    start = before.prototype_extractor.state_dict()
    assert all(not torch.equal(p, start[name]) for name, p in after.prototype_extractor.state_dict().items())


@pytest.mark.slow
def test_selfq_starts_from_the_stage_1_extractor(stage1, init, world, tmp_path):
    """With the extractor and the projector frozen (only the LLM's adapters train), the saved SQ-LLaVA model
    holds exactly stage 1's extractor; from LLaVA's stage 1 (no extractor) a new one is added, with a warning."""
    selfq(stage1, world, tmp_path / "continued", "--max_steps", "1", "--lr", "llm_lora=1e-3")
    continued = VLM.from_pretrained(str(tmp_path / "continued")).state_dict()
    start = VLM.from_pretrained(str(stage1)).state_dict()
    kept = [k for k in start if k.startswith(("prototype_extractor.", "multi_modal_projector."))]
    assert len(kept) == 3 * 2 + 2 + 2 * 2 and all(torch.equal(continued[k], start[k]) for k in kept)
    run = subprocess.run(command("train_selfq.py", "--init", str(init), "--data", str(world / "instruct.json"),
                                 "--out_dir", str(tmp_path / "fresh"), "--max_steps", "1", "--global_batch_size", "16"),
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"warning: {init} has no prototype extractor; adding a new one with 8 centres" in run.stdout
    assert VLM.from_pretrained(str(tmp_path / "fresh")).cfg.prototypes == 8


@pytest.mark.slow
@pytest.mark.parametrize("base", ["stage1", "init"])
def test_adapter_rebuilds_the_trained_model_on_its_stage_1_base(base, request, world, tmp_path):
    """adapter/ holds everything training changed: load_adapter on the stage-1 checkpoint (with the extractor
    stage 1 trained, or without one) gives the saved merged model's logits."""
    start = request.getfixturevalue(base)
    history = selfq(start, world, tmp_path / "run", "--max_steps", "3")
    assert set(history[0]["lr"]) == {"llm_lora", "vision_lora", "projector", "prototypes"}
    merged, rebuilt, stage_1 = (VLM.from_pretrained(str(p)) for p in (tmp_path / "run", start, start))
    rebuilt.load_adapter(tmp_path / "run" / "adapter")
    batch = shapes_batch(merged)
    assert (logits(rebuilt, batch) - logits(merged, batch)).abs().max() <= 1e-5
    assert (logits(stage_1, batch) - logits(merged, batch)).abs().max() > 1e-3  # training changed the model
    # the projector and (continued from stage 1) the extractor trained, and the logits depend on each of them
    for part in ("multi_modal_projector",) + (("prototype_extractor",) if base == "stage1" else ()):
        stale = getattr(stage_1, part).state_dict()
        getattr(rebuilt, part).load_state_dict(stale)
        assert (logits(rebuilt, batch) - logits(merged, batch)).abs().max() > 1e-4, part
        getattr(rebuilt, part).load_state_dict(getattr(merged, part).state_dict())
    assert rebuilt.cfg.template == merged.cfg.template == "vicuna_v1"
    configs = {tower: json.loads((tmp_path / "run" / "adapter" / tower / "adapter_config.json").read_text())
               for tower in ("language_model", "vision_tower")}
    assert configs["language_model"]["lora_dropout"] == 0.05 and configs["vision_tower"]["lora_dropout"] == 0.2
    assert configs["language_model"]["modules_to_save"] == ["model.multi_modal_projector", "model.prototype_extractor"]
    assert all(".vision_tower." in name for name in configs["vision_tower"]["target_modules"])


@pytest.mark.slow
def test_peft_puts_both_adapters_on_transformers_llava(init, world, tmp_path):
    """Without the extractor (which transformers' Llava lacks), PEFT rebuilds the trained model from adapter/:
    the LLM's adapter with the projector, then the ViT's adapter, both active."""
    peft = pytest.importorskip("peft")
    import transformers

    selfq(init, world, tmp_path / "run", "--max_steps", "3", "--no-prototypes")
    merged = VLM.from_pretrained(str(tmp_path / "run"))
    ref = transformers.LlavaForConditionalGeneration.from_pretrained(init)
    ref = peft.PeftModel.from_pretrained(ref, tmp_path / "run" / "adapter" / "language_model")
    ref.load_adapter(tmp_path / "run" / "adapter" / "vision_tower", adapter_name="vision_tower")
    ref.base_model.set_adapter(["default", "vision_tower"])
    ids, pixels = shapes_batch(merged)
    with torch.no_grad():
        theirs = ref.eval()(input_ids=ids, pixel_values=pixels).logits
        assert (theirs - logits(merged, (ids, pixels))).abs().max() <= 1e-4
        with ref.disable_adapter():
            assert (ref(input_ids=ids, pixel_values=pixels).logits - theirs).abs().max() > 1e-3


@pytest.mark.slow
def test_one_step_trains_both_loras_and_leaves_every_base_weight(stage1, world, tmp_path):
    history = selfq(stage1, world, tmp_path / "run", "--max_steps", "1")
    assert len(history) == 1 and set(history[0]["lr"]) == {"llm_lora", "vision_lora", "projector", "prototypes"}
    base = VLM.from_pretrained(str(stage1)).state_dict()
    trained = VLM.from_pretrained(str(tmp_path / "run"))  # adapters merged
    deltas, changed_b, total_b = {}, set(), 0
    for tower in ("language_model", "vision_tower"):
        adapter = load_file(tmp_path / "run" / "adapter" / tower / "adapter_model.safetensors")
        config = json.loads((tmp_path / "run" / "adapter" / tower / "adapter_config.json").read_text())
        changed_b |= {k for k, v in adapter.items() if k.endswith("lora_B.weight") and v.abs().sum() > 0}
        total_b += sum(k.endswith("lora_B.weight") for k in adapter)
        for name in config["target_modules"]:
            r = config["rank_pattern"].get(name, config["r"])
            alpha = config["alpha_pattern"].get(name, config["lora_alpha"])
            B, A = (adapter[f"base_model.model.{name}.lora_{p}.weight"] for p in "BA")
            module = name.replace("model.language_model.", "language_model.").replace(
                "model.vision_tower.encoder.", "vision_tower.")
            deltas[module + ".weight"] = B @ A * alpha / r
    assert len(changed_b) == total_b  # no B left zero: each adapter got a gradient
    assert trained.prototype_extractor is not None and trained.cfg.template == "vicuna_v1"
    state = trained.state_dict()
    for key, weight in base.items():
        if key.startswith(("vision_tower.", "language_model.")):
            assert torch.allclose(state[key] - deltas.get(key, 0), weight, atol=1e-6), key
        elif key.startswith("multi_modal_projector."):
            assert not torch.equal(state[key], weight), key  # the projector trains fully
    assert sum(k.startswith("vision_tower.") for k in deltas) == 4 * 6  # every ViT layer's six Linear


@pytest.mark.slow
def test_torchrun_two_processes_run_selfq_to_the_end(stage1, world, tmp_path):
    history = selfq(stage1, world, tmp_path / "run", "--max_steps", "2", "--no-vit-lora", processes=2)
    assert [r["step"] for r in history] == [1, 2] and "vision_lora" not in history[0]["lr"]
    files = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert files == ["adapter", "config.json", "metrics.jsonl", "model.safetensors", "preprocessor_config.json",
                     "summary.json", "tokenizer.json", "tokenizer_config.json", "train_config.json"]
    assert sorted(p.name for p in (tmp_path / "run" / "adapter").iterdir()) == ["language_model", "nanovlm.json"]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["method"]["no_vit_lora"] and summary["method"]["sq_ratio"] == 0.3
    assert (summary["train_template"], summary["eval_template"]) == ("v1_sq", "vicuna_v1")


@pytest.mark.slow
def test_the_lora_baseline_is_llava_with_vicuna_and_logs_its_accuracy_curve(init, stage1, world, tmp_path):
    """All three switches off: LLaVA-1.5's LoRA recipe, the preset's own template (vicuna_v1 for LLaVA-1.5, here the
    tiny preset's vicuna_v1_bare) in training and evaluation; --eval_every logs
    the shapes accuracy during training, with the template the model is evaluated with."""
    history = selfq(init, world, tmp_path / "run", "--max_steps", "2", "--no-selfq", "--no-prototypes",
                    "--no-vit-lora", "--eval_every", "1", "--eval_questions", "12")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["train_template"], summary["eval_template"]) == ("vicuna_v1_bare", "vicuna_v1_bare")
    assert set(history[0]["lr"]) == {"llm_lora", "projector"}
    for record in history:  # each split overall, and each question type the 12 questions hold, per split
        split_keys = {k for k in record["eval"] if "/" not in k}
        assert split_keys == {"holdout", "in_distribution", "n"}
        assert {k.split("/")[0] for k in record["eval"] if "/" in k} == {"holdout", "in_distribution"}
    assert all(r["eval"]["n"] == 12 for r in history)
    with pytest.raises(SystemExit, match="has a prototype extractor"):
        train_selfq.main(["--init", str(stage1), "--no-prototypes", "--max_steps", "1"])


def test_eval_self_questions_mode(init, world, capsys):
    """--self_questions opens v1_sq's visual-user turn, whatever template the model answers with (here the tiny
    preset's vicuna_v1_bare; an SQ-LLaVA model's is vicuna_v1)."""
    assert VLM.from_pretrained(str(init)).cfg.template == "vicuna_v1_bare"
    image = next((world / "images").glob("*.png"))
    questions = eval_script.main([str(init), "--image", str(image), "--self_questions", "3"])
    assert len(questions) == 3 and all(isinstance(q, str) for q in questions)
    assert "description:" in capsys.readouterr().out
