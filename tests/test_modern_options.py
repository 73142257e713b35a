"""The time-to-quality benchmark of the post-2023 options and the small-images benchmark run end to end at toy size:
every config gets the same training budget, a spent budget trains nothing more, a cut run goes on, and the scores
are those of the shapes scorer."""
import json

import pytest

from ditkit.checkpoints.training import load_checkpoint
from tests.benchmark_scripts import load_benchmark

TOY = ["model.hidden_size=32", "model.depth=1", "model.num_heads=2", "train.global_batch_size=8", "train.log_to=none",
       "train.log_every=1", "train.warmup_steps=1", "data.num_workers=0", "sample.steps=2", "train.precision=fp32"]


@pytest.fixture(scope="module")
def script():
    module = load_benchmark("modern_options")
    return module


def test_shapes_at_a_fixed_budget(tmp_path, monkeypatch, script):
    monkeypatch.delenv("OUT", raising=False)
    argv = ["--out", str(tmp_path), "--data", "shapes", "--per-class", "4", "--configs", "baseline,cos",
            "--steps", "3", "--minutes", "1e-9", "--num-samples", "12", "--device", "cpu", "--set", *TOY]
    rows = script.main(argv)
    assert [r["config"] for r in rows] == ["baseline", "cos"]  # three channels: the direction loss is allowed
    for r in rows:
        assert r["steps"] == 1 and r["train_seconds"] > 0  # the budget stopped each run at its first log step
        assert 0 <= r["agreement"] <= 1 and r["fd"] >= 0 and r["nfe"] == 4
    again = script.main(argv)  # a spent budget trains nothing more: the same checkpoints, the same scores
    assert [(r["steps"], r["train_seconds"], r["agreement"]) for r in again] == \
        [(r["steps"], r["train_seconds"], r["agreement"]) for r in rows]
    stored = json.loads((tmp_path / "modern_options.json").read_text())
    assert stored["data"] == "shapes" and stored["minutes"] == 1e-9 and len(stored["rows"]) == 2
    script.main([*argv[:argv.index("--configs") + 1], "cos", *argv[argv.index("--configs") + 2:]])
    stored = json.loads((tmp_path / "modern_options.json").read_text())
    assert [r["config"] for r in stored["rows"]] == ["baseline", "cos"]  # a call of one config keeps the others


def test_digits_by_steps_and_the_refused_direction_loss(tmp_path, monkeypatch, script, capsys):
    monkeypatch.delenv("OUT", raising=False)
    rows = script.main(["--out", str(tmp_path), "--configs", "baseline,cos", "--steps", "2", "--num-samples", "20",
                        "--device", "cpu", "--set", *TOY])
    assert [r["config"] for r in rows] == ["baseline"] and rows[0]["steps"] == 2
    assert "cos           refused at load" in capsys.readouterr().out  # one-channel digits: the cosine is a sign


def test_small_images_resumes_a_cut_run_and_scores(tmp_path, monkeypatch):
    """benchmarks/small_images.py at toy size: a run cut at its first checkpoint goes on when the same command runs
    again, and its training time is the sum over both calls."""
    monkeypatch.delenv("OUT", raising=False)
    script = load_benchmark("small_images")
    argv = ["--out", str(tmp_path), "--steps", "2", "--per-class", "4", "--num-samples", "12", "--device", "cpu",
            "--objectives", "flow", "--set", *TOY, "train.budget_minutes=1e-9"]
    script.main(argv)  # the budget cuts the run at step 1
    assert load_checkpoint(tmp_path / "flow" / "checkpoints" / "last.pt")["step"] == 1
    rows = script.main(argv[:-1])  # no budget: on to step 2, then scored
    assert load_checkpoint(tmp_path / "flow" / "checkpoints" / "last.pt")["step"] == 2
    assert [r["sampler"] for r in rows] == ["heun", "euler", "heun"] and all(0 <= r["classifier_agreement"] <= 1 for r in rows)
