"""A command line that explains itself: every option has help and shows its default, ``ditkit config``
prints every key with its type and help, a resume needs only the run folder, and a run says what it
found and what it will do."""
import dataclasses
import logging

import pytest
import tqdm
import yaml

from ditkit.cli import build_parser, main
from ditkit.config import Config, field_help, load_config
from ditkit.models.dit import build_model
from ditkit.objectives import build_objective
from ditkit.sampling import sample_to_npz
from ditkit.training import trainer

TINY = ["model.hidden_size=32", "model.depth=2", "model.num_heads=2", "train.global_batch_size=16", "train.steps=1"]


def subparsers():
    (action,) = [a for a in build_parser()._actions if a.choices and a.dest == "command"]
    return action.choices


def test_every_option_has_help_and_shows_its_default():
    for name, p in subparsers().items():
        for action in p._actions:
            if action.option_strings and action.help != "==SUPPRESS==" and "-h" not in action.option_strings:
                assert action.help and action.help.strip(), f"ditkit {name} {action.option_strings[0]} has no help"
        p.format_help()  # a stray % in a help string would fail here
    text = " ".join(subparsers()["sample"].format_help().split())
    assert "samples to generate (default 100); not with --lengths" in text and "(default: 250)" in text
    assert "(default: None)" not in text and "(default: False)" not in text


def test_every_config_field_has_help():
    cfg = Config()
    for section in dataclasses.fields(cfg):
        assert type(getattr(cfg, section.name)).__doc__
        for f in dataclasses.fields(getattr(cfg, section.name)):
            assert field_help(f), f"{section.name}.{f.name} has no help"
    assert Config().train.adam_betas is not Config().train.adam_betas  # a list default is not shared


def test_config_command_prints_every_key_value_type_and_help(capsys, tmp_path):
    main(["config", "--preset", "digits", "--set", "train.lr=3e-4"])
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    for section, values in Config().to_dict().items():
        assert f"\n{section}: " in "\n" + out
        for key in values:
            assert f"{section}.{key}" in lines
    assert lines["train.lr"].split()[1:4] == ["0.0003", "float", "AdamW"]
    assert lines["model.depth"].split()[1:5] == ["4", "int", "|", "None"]

    main(["config", "--preset", "digits", "--set", "train.lr=3e-4", "--yaml"])
    text = capsys.readouterr().out
    assert yaml.safe_load(text)["train"]["lr"] == 3e-4
    (tmp_path / "c.yaml").write_text(text)
    from ditkit.data.facts import fit_to_data

    # what the trainer will run: the preset, the override and what the data fixes (the digits' class names)
    assert load_config(path=tmp_path / "c.yaml") == fit_to_data(load_config("digits", ["train.lr=3e-4"]))[0]


def test_resume_needs_only_the_run_folder(capsys, tmp_path):
    run = str(tmp_path / "run")
    main(["train", "--preset", "digits", *(a for o in TINY for a in ("--set", o)), "--run-dir", run])
    main(["train", "--run-dir", run, "--resume", "--set", "train.steps=2"])
    assert "trained to step 2" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # a folder without config.yaml: the one-line error of before
        main(["train", "--run-dir", str(tmp_path / "empty"), "--resume"])
    assert "give --preset NAME or --config FILE" in capsys.readouterr().err


def test_sampling_progress_counts_images(tmp_path, monkeypatch):
    bars = []

    class Bar:
        def __init__(self, *args, **kw):
            self.kw, self.updates = kw, []
            bars.append(self)

        def update(self, n):
            self.updates.append(n)

        def close(self):
            pass

    monkeypatch.setattr(tqdm, "tqdm", Bar)
    cfg = load_config("digits", ["model.hidden_size=32", "model.depth=1", "model.num_heads=2", "sample.steps=2"])
    model, objective = build_model(cfg.model.name, **cfg.model.kwargs()).eval(), build_objective(cfg)
    sample_to_npz(model, objective, cfg, 10, tmp_path, batch_size=4)
    (tmp_path / "parts" / "part_000002.npz").unlink()  # the last batch (2 images) is to do again
    sample_to_npz(model, objective, cfg, 10, tmp_path, batch_size=4)
    assert [(b.kw["unit"], b.kw["total"], b.kw["initial"], b.updates) for b in bars] == [
        ("img", 10, 0, [4, 4, 2]), ("img", 10, 8, [2])]


@pytest.mark.parametrize("steps,grids", [(3, [2, 3]), (4, [2, 4])])
def test_last_step_writes_a_grid_once(tmp_path, monkeypatch, steps, grids):
    written = []
    monkeypatch.setattr(trainer, "_write_sample_grid", lambda *args: written.append(args[6]))
    cfg = load_config("digits", [*TINY, f"train.steps={steps}", "train.sample_every=2"])
    trainer.train(cfg, tmp_path, device="cpu")
    assert written == grids


def test_startup_summary(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="ditkit.train"):
        trainer.train(load_config("digits", TINY), tmp_path, device="cpu")
    (block,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("data: ")]
    lines = block.splitlines()
    assert lines[0] == "data: digits (built in), 1797 samples, 10 classes, x (1, 8, 8)"
    assert lines[1].startswith("model: custom, 0.") and "M parameters, 16 tokens per sample (8×8 / patch 2)" in lines[1]
    assert lines[2].startswith("objective: ddpm, uniform times; sampler ") and "AdamW lr 0.001, betas (0.9, 0.999)" in lines[2]
    assert lines[3] == "batch: 16 global = 1 process × 16 micro-batch × 1 accumulation; steps 0 → 1"
    assert lines[4].startswith("speed: ")


def test_startup_summary_names_the_post_2023_options(tmp_path, caplog):
    options = ["model.pos_embed=rope", "model.norm=rmsnorm", "model.qk_norm=true", "model.mlp=swiglu",
               "objective.name=flow", "objective.time_sampling=logit_normal", "objective.shift=2",
               "train.adam_betas=[0.9,0.95]", "sample.sampler=euler"]
    with caplog.at_level(logging.INFO, logger="ditkit.train"):
        trainer.train(load_config("digits", [*TINY, *options]), tmp_path, device="cpu")
    (block,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("data: ")]
    lines = block.splitlines()
    assert lines[1].endswith("; RoPE, RMSNorm, QK-norm, SwiGLU")
    assert lines[2].startswith("objective: flow, logit_normal times (0, 1), shift 2; sampler euler")
    assert "betas (0.9, 0.95)" in lines[2]
