"""train.log_to: a short digits run logs its scalars and sample grid to Weights & Biases (a stand-in
``wandb`` module that records every call, checked against metrics.jsonl and the grid PNG on disk),
resumes into the same W&B run, and without the package warns once and completes."""
import json
import re
import sys
import types

import numpy as np
import pytest
import yaml
from PIL import Image

from ditkit.config import ConfigError, load_config, parse_log_to
from ditkit.training.trainer import train

TINY = ["model.hidden_size=32", "model.depth=1", "model.num_heads=2", "train.global_batch_size=8",
        "train.log_every=2", "train.sample_every=4", "sample.steps=2"]


class FakeWandb(types.ModuleType):
    """The part of wandb's API that ditkit uses: init -> run with log and finish, and Image."""

    class Image:
        def __init__(self, data):
            self.data = np.asarray(data)

    def __init__(self):
        super().__init__("wandb")
        self.inits, self.logs, self.finished = [], [], 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        module = self

        class Run:
            def log(self, data, step):
                module.logs.append((step, data))

            def finish(self):
                module.finished += 1

        return Run()


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_digits_run_logs_loss_and_grid_to_wandb(tmp_path, monkeypatch):
    wandb = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = load_config("digits", [*TINY, "train.steps=4", "train.log_to=wandb"])
    train(cfg, tmp_path / "run", device="cpu")

    (init,) = wandb.inits
    assert init["mode"] == "offline" and init["name"] == "run"
    assert init["config"] == yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())  # the run's resolved config
    scalars = [(step, data) for step, data in wandb.logs if "train/loss" in data]
    assert [(step, data["train/loss"]) for step, data in scalars] == [(r["step"], r["loss"]) for r in records(tmp_path / "run")]
    assert all(data.keys() == {f"train/{k}" for k in r if k != "step"} for (_, data), r in
               zip(scalars, records(tmp_path / "run")))
    (grid_step, grid), = [(step, data["samples"]) for step, data in wandb.logs if "samples" in data]
    png = np.asarray(Image.open(tmp_path / "run" / "samples" / "step_00000004.png").convert("RGB"))
    assert grid_step == 4 and np.array_equal(grid.data, png)
    assert wandb.finished == 1
    assert not (tmp_path / "run" / "tb").exists()  # only the backends asked for

    resumed = load_config("digits", [*TINY, "train.steps=6", "train.log_to=wandb"])
    train(resumed, tmp_path / "run", device="cpu", resume=True)
    assert wandb.inits[1]["id"] == init["id"] and wandb.inits[1]["resume"] == "allow"  # the same W&B run
    assert [step for step, data in wandb.logs[len(scalars) + 1:] if "train/loss" in data] == [6]


def test_without_wandb_the_run_warns_once_and_completes(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    cfg = load_config("digits", [*TINY, "train.steps=4", "train.log_to=tensorboard+wandb"])
    with caplog.at_level("WARNING", logger="ditkit.train"):
        result = train(cfg, tmp_path, device="cpu")
    warnings = [r.getMessage() for r in caplog.records if "wandb" in r.getMessage()]
    assert len(warnings) == 1 and "pip install wandb" in warnings[0], caplog.text
    assert result["step"] == 4 and [r["step"] for r in records(tmp_path)] == [2, 4]
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))  # the other backend still logs


def test_log_to_values():
    assert parse_log_to("tensorboard+wandb") == ("tensorboard", "wandb") and parse_log_to("none") == ()
    assert load_config("digits").train.log_to == "tensorboard"  # the default: TensorBoard, as before
    for bad in ("tb", "wandb+wandb", "tensorboard+"):
        with pytest.raises(ConfigError, match=f"train.log_to must be .* got {re.escape(repr(bad))}"):
            load_config("digits", [f"train.log_to={bad}"])
