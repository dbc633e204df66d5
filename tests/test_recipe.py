"""The train scripts' command line: every field an option, listed by --help with its default and its comment;
values parsed by the field's type; the output folder follows the preset and the stage."""

import dataclasses
import re

import pytest

import train_align
import train_iccc
import train_selfq
import train_sft
import train_stic
from nanovlm.config import field_comments, show_value
from nanovlm.recipe import parse

SCRIPTS = {"align": train_align, "sft": train_sft, "selfq": train_selfq, "iccc": train_iccc, "stic": train_stic}


@pytest.mark.parametrize("stage", SCRIPTS)
def test_help_lists_every_field_with_its_default_and_comment(stage, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # no help text wrapped
    script = SCRIPTS[stage]
    with pytest.raises(SystemExit) as exit:
        script.main(["--help"])
    assert exit.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--preset", "--data", "--image_folder", "--init"):
        assert f"{option} " in text
    configs = [dataclasses.replace(script.RECIPES["tiny"], out_dir=f"out/tiny/{stage}")]
    configs += [script.METHODS["tiny"]] if hasattr(script, "METHODS") else []
    for cfg in configs:
        comments = field_comments(type(cfg))
        for f in dataclasses.fields(cfg):
            assert comments.get(f.name), f"{type(cfg).__name__}.{f.name} has no comment to show as its help"
            expected = f"{comments[f.name]} (default: {show_value(getattr(cfg, f.name))})"
            assert re.search(rf"--{f.name} \S+ {re.escape(expected)}", text), (f.name, expected)


def test_options_are_parsed_by_field_type_and_the_output_follows_preset_and_stage():
    argv = ["--preset", "small", "--no-selfq", "--epochs", "1.5", "--lr", "llm_lora=1e-3", "--vit-lora", "2,4,0.1",
            "--resume", "--seed=3", "--data", "a.json:0.5", "b.json"]
    run = parse("", train_selfq.RECIPES, argv, train_selfq.METHODS, stage="selfq")
    assert run.cfg == dataclasses.replace(train_selfq.RECIPES["small"], out_dir="out/small/selfq", epochs=1.5,
                                          lr={"llm_lora": 1e-3}, resume=True, seed=3)
    assert run.method == dataclasses.replace(train_selfq.METHODS["small"], no_selfq=True, vit_lora=(2, 4.0, 0.1))
    assert [(str(s.path), s.weight) for s in run.data] == [("a.json", 0.5), ("b.json", 1.0)]
    for stage, script in SCRIPTS.items():
        for preset in script.RECIPES:
            assert parse("", script.RECIPES, ["--preset", preset], stage=stage).cfg.out_dir == f"out/{preset}/{stage}"
    assert parse("", train_sft.RECIPES, ["--out_dir", "x", "--resume", "false"], stage="sft").cfg.out_dir == "x"
    for bad in (["--max_step", "3"], ["--resume", "maybe"], ["--lr", "llm"], ["--betas", "0.9"]):
        with pytest.raises(SystemExit):
            parse("", train_sft.RECIPES, bad, stage="sft")
