"""The training loop on the CPU: exact resume after a real kill -9, 2-process DDP/FSDP equal to
1 process with the same global batch, non-finite steps skipped, warmup and EMA."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ditkit.checkpoints.training import load_checkpoint
from ditkit.config import ConfigError, load_config
from ditkit.fast import TrainSpeed
from ditkit.models.dit import build_model
from ditkit.training import trainer as trainer_module
from ditkit.training.ema import ema_decay_at
from ditkit.training.trainer import TrainingStopped, lr_at, train

TINY = ["model.hidden_size=32", "model.depth=2", "model.num_heads=2", "train.global_batch_size=16",
        "train.log_every=1", "train.warmup_steps=3", "train.ema_decay=0.9"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2] / "src")}


def ditkit(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "ditkit", *args], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def torchrun(nproc, *args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone",
           "-m", "ditkit", *args]
    out = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout + out.stderr


def overrides(*extra):
    return [a for o in (*TINY, *extra) for a in ("--set", o)]


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def final_weights(run: Path) -> dict:
    return load_checkpoint(run / "checkpoints" / "last.pt")


def test_resume_after_kill_9_matches_uninterrupted_run(tmp_path):
    steps = 40
    ref = ditkit("train", "--preset", "digits", "--run-dir", str(tmp_path / "ref"), "--steps", str(steps),
                 *overrides("train.ckpt_every=5"))
    assert ref.wait(timeout=300) == 0, ref.stdout.read()[-2000:]

    run = tmp_path / "killed"
    proc = ditkit("train", "--preset", "digits", "--run-dir", str(run), "--steps", str(steps),
                  *overrides("train.ckpt_every=5"))
    first = run / "checkpoints" / "ckpt_00000005.pt"
    deadline = time.time() + 240
    while not first.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = int(load_checkpoint(sorted((run / "checkpoints").glob("ckpt_*.pt"))[-1])["step"])
    assert 5 <= killed_at < steps

    resumed = ditkit("train", "--preset", "digits", "--run-dir", str(run), "--steps", str(steps), "--resume",
                     *overrides("train.ckpt_every=5"))
    out = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, out[-2000:]
    assert "resuming from" in out and f"at step {killed_at}" in out

    assert losses(run) == losses(tmp_path / "ref")  # every step's loss, bit for bit
    a, b = final_weights(run), final_weights(tmp_path / "ref")
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k}"
    assert (run / "ema.safetensors").exists()


def test_existing_run_needs_resume_flag(tmp_path):
    cfg = load_config("digits", overrides=[*TINY, "train.steps=1"])
    train(cfg, tmp_path, device="cpu")
    with pytest.raises(ValueError, match="pass --resume"):
        train(cfg, tmp_path, device="cpu")


@pytest.mark.parametrize("mode", ["ddp", "fsdp", "fsdp_keep"])
def test_two_processes_equal_one_process_with_same_global_batch(tmp_path, mode):
    common = ["train", "--preset", "digits", "--steps", "4", "--device", "cpu"]
    dist = ["train.distributed=ddp"] if mode == "ddp" else ["train.distributed=fsdp", f"train.fsdp_reshard={mode == 'fsdp'}"]
    torchrun(2, *common, "--run-dir", str(tmp_path / "two"),
             *overrides(*dist, "train.sample_every=2", "sample.steps=2"))
    assert (tmp_path / "two" / "samples" / "step_00000004.png").exists()  # grids on every rank, FSDP included
    one = ditkit(*common, "--run-dir", str(tmp_path / "one"), *overrides("train.grad_accum=2"))
    assert one.wait(timeout=300) == 0, one.stdout.read()[-2000:]
    a, b = final_weights(tmp_path / "two"), final_weights(tmp_path / "one")
    for part in ("model", "ema"):
        for k in b[part]:
            torch.testing.assert_close(a[part][k], b[part][k], rtol=1e-5, atol=1e-6, msg=f"{part}.{k}")
    assert a["step"] == b["step"] == 4


class NaNAt:
    """Wraps an objective so that the loss is NaN at chosen steps (counted by calls)."""

    def __init__(self, inner, bad_calls):
        self.inner, self.bad, self.calls = inner, set(bad_calls), 0

    def loss(self, model, x0, kw):
        out = self.inner.loss(model, x0, kw)
        if self.calls in self.bad:
            out = {**out, "loss": out["loss"] * float("nan")}
        self.calls += 1
        return out

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _patch_objective(monkeypatch, bad_calls):
    import ditkit.training.trainer as trainer

    real = trainer.build_objective
    monkeypatch.setattr(trainer, "build_objective", lambda cfg: NaNAt(real(cfg), bad_calls))


def test_non_finite_step_is_skipped(tmp_path, monkeypatch):
    cfg = load_config("digits", overrides=[*TINY, "train.steps=2", "train.ckpt_every=2"])
    train(cfg, tmp_path / "a", device="cpu")
    _patch_objective(monkeypatch, {0})  # each resumed run's first step (step 3) has a NaN loss
    cfg.train.steps = 3
    train(cfg, tmp_path / "a", device="cpu", resume=True)  # ends on a bad step: no checkpoint from it
    assert final_weights(tmp_path / "a")["step"] == 2
    logged = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1] == {**logged[-1], "step": 3, "loss": None, "bad_steps": 1}
    cfg.train.steps, cfg.train.ckpt_every = 4, 1
    train(cfg, tmp_path / "a", device="cpu", resume=True)  # step 3 bad (skipped), step 4 good
    after = final_weights(tmp_path / "a")
    assert after["step"] == 4 and int(after["extra"]["nonfinite_total"]) == 1
    assert all(torch.isfinite(v).all() for v in after["model"].values())


def test_too_many_non_finite_steps_stop_the_run_with_last_good_checkpoint(tmp_path, monkeypatch):
    _patch_objective(monkeypatch, set(range(4, 100)))
    cfg = load_config("digits", overrides=[*TINY, "train.steps=20", "train.ckpt_every=4", "train.max_nonfinite=3"])
    with pytest.raises(TrainingStopped, match="consecutive bad steps"):
        train(cfg, tmp_path, device="cpu")
    good = final_weights(tmp_path)
    assert good["step"] == 4 and all(torch.isfinite(v).all() for v in good["model"].values())


def test_warmup_and_ema_schedules():
    assert lr_at(0, 1e-3, 10) == pytest.approx(1e-4) and lr_at(9, 1e-3, 10) == pytest.approx(1e-3)
    assert lr_at(50, 1e-3, 0) == 1e-3
    assert ema_decay_at(0.9999, 0, warmup=True) == pytest.approx(0.1) and ema_decay_at(0.9999, 0, warmup=False) == 0.9999


def test_sample_grids_tensorboard_and_bf16(tmp_path):
    cfg = load_config("digits", overrides=[*TINY, "train.steps=2", "train.sample_every=2", "train.precision=bf16",
                                           "sample.steps=2"])
    train(cfg, tmp_path, device="cpu")
    assert (tmp_path / "samples" / "step_00000002.png").stat().st_size > 0
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert (tmp_path / "config.yaml").exists()
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"loss", "grad_norm", "lr", "img_per_s"} <= set(record) and record["loss"] == record["loss"]


def test_finetune_with_another_number_of_classes_reinitialises_only_the_label_table(tmp_path, caplog):
    base = load_config("digits", overrides=[*TINY, "train.steps=1"])
    train(base, tmp_path / "base", device="cpu")
    cfg = load_config("digits", overrides=[*TINY, "train.steps=1", "train.lr=1e-12", "model.num_classes=12"])
    with caplog.at_level("INFO", logger="ditkit.train"):
        train(cfg, tmp_path / "ft", device="cpu", init_from=str(tmp_path / "base" / "checkpoints" / "last.pt"))
    assert "y_embedder.embedding_table.weight" in caplog.text
    src, ft = final_weights(tmp_path / "base")["ema"], final_weights(tmp_path / "ft")["model"]
    assert ft["y_embedder.embedding_table.weight"].shape == (13, 32)
    for k, v in ft.items():  # one step at lr 1e-12: everything else is the source's weights
        if not k.startswith("y_embedder"):
            torch.testing.assert_close(v, src[k], rtol=0, atol=1e-8)


def test_fp16_with_gradient_scaler_trains_and_resumes(tmp_path):
    cfg = load_config("digits", overrides=[*TINY, "train.steps=2", "train.precision=fp16"])
    train(cfg, tmp_path, device="cpu")
    state = final_weights(tmp_path)
    assert "scaler" in state and state["scaler"]["scale"] > 0
    cfg.train.steps = 3
    train(cfg, tmp_path, device="cpu", resume=True)
    assert final_weights(tmp_path)["step"] == 3


def test_safetensors_training_checkpoints_resume_like_pt(tmp_path):
    runs = {}
    for fmt in ("pt", "safetensors"):
        cfg = load_config("digits", overrides=[*TINY, "train.steps=2", "train.ckpt_every=2", f"train.ckpt_format={fmt}"])
        train(cfg, tmp_path / fmt, device="cpu")
        cfg.train.steps = 4
        train(cfg, tmp_path / fmt, device="cpu", resume=True)
        runs[fmt] = load_checkpoint(tmp_path / fmt / "checkpoints" / f"last.{fmt}")
    a, b = runs["pt"], runs["safetensors"]
    assert a["step"] == b["step"] == 4 and a["config"]["model"] == b["config"]["model"]
    assert b["config"]["train"]["ckpt_format"] == "safetensors"
    for part in ("model", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part])
    assert all(torch.equal(a["opt"]["state"][i]["exp_avg"], b["opt"]["state"][i]["exp_avg"]) for i in a["opt"]["state"])
    from ditkit.checkpoints import load_model

    model, cfg = load_model(tmp_path / "safetensors" / "checkpoints" / "last.safetensors")
    assert cfg.train.ckpt_format == "safetensors" and torch.equal(model.state_dict()["pos_embed"], b["ema"]["pos_embed"])


def test_time_limit_checkpoints_and_stops_then_resume_finishes(tmp_path):
    """train.max_minutes: stop at the first log step past the budget with a full checkpoint and the
    EMA weights; --resume then runs on to train.steps."""
    cfg = load_config("digits", overrides=[*TINY, "train.steps=10", "train.log_every=3", "train.ckpt_every=100",
                                           "train.max_minutes=1e-9"])
    result = train(cfg, tmp_path, device="cpu")
    assert result["step"] == 3 and final_weights(tmp_path)["step"] == 3
    assert (tmp_path / "ema.safetensors").exists()
    cfg.train.max_minutes = 0.0
    assert train(cfg, tmp_path, device="cpu", resume=True)["step"] == 10
    assert final_weights(tmp_path)["step"] == 10 and sorted(losses(tmp_path)) == [3, 6, 9, 10]
    with pytest.raises(ValueError, match="train.max_minutes"):
        load_config("digits", overrides=["train.max_minutes=-1"])


def test_budget_counts_training_time_over_resumes(tmp_path):
    """train.budget_minutes: the checkpoint keeps the time trained, a resume adds to it; a spent budget trains
    nothing more, a raised one trains on; metrics log the running total."""
    cfg = load_config("digits", overrides=[*TINY, "train.steps=10", "train.log_every=3", "train.ckpt_every=100",
                                           "train.budget_minutes=1e-9"])
    assert train(cfg, tmp_path, device="cpu")["step"] == 3
    first = load_checkpoint(tmp_path / "checkpoints" / "last.pt")["extra"]["train_seconds"]
    assert first > 0
    assert train(cfg, tmp_path, device="cpu", resume=True)["step"] == 3  # spent: nothing to do
    assert final_weights(tmp_path)["step"] == 3
    cfg.train.budget_minutes = 60.0
    assert train(cfg, tmp_path, device="cpu", resume=True)["step"] == 10
    total = load_checkpoint(tmp_path / "checkpoints" / "last.pt")["extra"]["train_seconds"]
    assert total > first
    minutes = [json.loads(line)["train_minutes"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(minutes) == 4 and minutes == sorted(minutes) and minutes[1] > first / 60
    with pytest.raises(ValueError, match="train.budget_minutes"):
        load_config("digits", overrides=["train.budget_minutes=-1"])


def test_torn_metrics_line_does_not_block_resume(tmp_path):
    cfg = load_config("digits", overrides=[*TINY, "train.steps=2", "train.ckpt_every=2"])
    train(cfg, tmp_path, device="cpu")
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.1')  # a crash mid-write
    cfg.train.steps = 3
    train(cfg, tmp_path, device="cpu", resume=True)
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_ema_safetensors_samples_with_the_runs_objective(tmp_path):
    from ditkit.checkpoints import load_model

    cfg = load_config("digits", overrides=[*TINY, "train.steps=1", "objective.name=flow", "sample.sampler=heun"])
    train(cfg, tmp_path, device="cpu")
    _, loaded = load_model(tmp_path / "ema.safetensors")
    assert loaded.objective.name == "flow" and loaded.sample.sampler == "heun"


def tiny_fields_run(tmp_path, *extra) -> Path:
    """The fields64 preset at toy size on a freshly written 8×8 benchmark; returns its folder."""
    from ditkit.data.random_fields import write_benchmark

    b = tmp_path / "bench"
    write_benchmark(b, 16, size=8, seed=0)
    cfg = load_config("fields64", overrides=[
        "model.name=custom", "model.input_size=8", "model.patch_size=4", "model.hidden_size=32", "model.depth=1",
        "model.num_heads=2", f"data.path={b / 'x.npy'}", f"data.params_file={b / 'params.csv'}",
        f"data.field_file={b / 'field.npy'}", "data.num_workers=0", "train.global_batch_size=8", "sample.steps=2",
        *extra])
    train(cfg, tmp_path / "run", device="cpu")
    return b


def test_fields_run_writes_sample_grids(tmp_path):
    tiny_fields_run(tmp_path, "train.steps=2", "train.sample_every=2")
    assert (tmp_path / "run" / "samples" / "step_00000002.png").exists()
    assert "normalizer" in final_weights(tmp_path / "run")


def test_sample_fields_in_physical_units_from_the_cli(tmp_path):
    import numpy as np

    from ditkit.cli import main
    from ditkit.data.fields import FieldNormalizer

    b = tiny_fields_run(tmp_path, "train.steps=1")
    field = np.load(b / "field.npy")[:3]
    params = np.loadtxt(b / "params.csv", delimiter=",", skiprows=1)[:3]
    np.savez(tmp_path / "cond.npz", params=params, field=field)
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    main(["sample", "--ckpt", str(ckpt), "--cond", str(tmp_path / "cond.npz"), "--out", str(tmp_path / "s")])
    out = np.load(tmp_path / "s" / "samples.npz")
    assert out["samples"].shape == (3, 2, 8, 8) and (tmp_path / "s" / "grid.png").exists()
    # physical units: the log-normal channel is positive, as the normaliser's exp brings it back
    norm = FieldNormalizer(final_weights(tmp_path / "run")["normalizer"])
    assert norm.state["x"]["log"][1] and (out["samples"][:, 1] > 0).all()
    main(["sample", "--ckpt", str(ckpt), "--cond", str(tmp_path / "cond.npz"), "--out", str(tmp_path / "s8"),
          "--speed", "fp8+fp8_mlp"])
    fp8 = np.load(tmp_path / "s8" / "samples.npz")["samples"]
    assert fp8.shape == (3, 2, 8, 8) and np.isfinite(fp8).all() and (fp8[:, 1] > 0).all()
    main(["eval-fields", "--ckpt", str(ckpt), "--data", str(b), "--out", str(tmp_path / "ev"), "--points", "2",
          "--samples", "2", "--device", "cpu"])
    scores = json.loads((tmp_path / "ev" / "fields_eval.json").read_text())
    assert {"target_spectrum_err", "target_r", "lognormal_spectrum_err"} <= set(scores)
    assert all((tmp_path / "ev" / f).exists() for f in ("target_spectrum.png", "fields.png", "cross_correlation.png"))


def test_gradient_norm_without_clipping_leaves_gradients_and_equals_clip_grad_norm():
    from ditkit.training.trainer import gradient_norm

    params = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    for p in params:
        p.grad = torch.randn_like(p)
    before = [p.grad.clone() for p in params]
    norm = gradient_norm(params, 0.0)
    torch.testing.assert_close(norm, torch.cat([g.flatten() for g in before]).norm())
    assert all(torch.equal(p.grad, g) for p, g in zip(params, before))
    clipped = gradient_norm(params, 1.0)  # returns the norm before clipping, clips to 1
    torch.testing.assert_close(clipped, norm)
    torch.testing.assert_close(torch.cat([p.grad.flatten() for p in params]).norm(), torch.tensor(1.0), rtol=1e-5, atol=0)


def test_cosmo128_preset_trains_and_samples_seed_000_shapes(tmp_path):
    """The cosmology setting's I/O at full size (3 positive 128² maps from 4 conditioning maps and 6 parameters),
    the network shrunk to one narrow block so it runs on a CPU: one step, then sampling in physical units."""
    import csv

    import numpy as np

    from ditkit.cli import main

    rng = np.random.default_rng(0)
    np.save(tmp_path / "maps.npy", np.exp(rng.normal(size=(4, 3, 128, 128))).astype(np.float32))
    cond = rng.normal(size=(4, 4, 128, 128)).astype(np.float32)
    cond[:, 0] = np.exp(cond[:, 0])
    np.save(tmp_path / "cond.npy", cond)
    with open(tmp_path / "params.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Omega_m", "sigma_8", "A_SN1", "A_AGN1", "A_SN2", "A_AGN2"])
        w.writerows(rng.uniform(0.1, 1.0, size=(4, 6)).tolist())
    cfg = load_config("cosmo128", overrides=[
        f"data.path={tmp_path / 'maps.npy'}", f"data.field_file={tmp_path / 'cond.npy'}",
        f"data.params_file={tmp_path / 'params.csv'}", "data.num_workers=0", "model.name=custom", "model.depth=1",
        "model.hidden_size=64", "model.num_heads=2", "model.patch_size=4", "train.global_batch_size=2", "train.steps=1"])
    assert (cfg.model.input_size, cfg.model.in_channels, cfg.model.cond_channels, cfg.model.num_params) == (128, 3, 4, 6)
    train(cfg, tmp_path / "run", device="cpu")
    state = final_weights(tmp_path / "run")
    assert state["normalizer"]["x"]["log"] == [True, True, True] and state["normalizer"]["field"]["log"][0]
    np.savez(tmp_path / "c.npz", params=np.loadtxt(tmp_path / "params.csv", delimiter=",", skiprows=1)[:2], field=cond[:2])
    main(["sample", "--ckpt", str(tmp_path / "run" / "checkpoints" / "last.pt"), "--cond", str(tmp_path / "c.npz"),
          "--out", str(tmp_path / "s"), "--steps", "2"])
    out = np.load(tmp_path / "s" / "samples.npz")["samples"]
    # One training step: the values are noise, but in physical units, densities never negative.
    assert out.shape == (2, 3, 128, 128) and not np.isnan(out).any() and (out >= 0).all()


def test_fastest_levers_on_the_cpu_follow_the_bf16_run_and_write_plain_checkpoints(tmp_path):
    """Every module lever of the fastest recipe, given explicitly on the CPU (the fused operators compute with
    torch's ops, the FP8 products are emulated) against the plain bf16 run: the losses stay within FP8's
    quantization noise, the checkpoint has the same keys, and the run resumes."""
    common = [*TINY, "train.steps=30", "train.log_every=5", "train.precision=bf16"]
    levers = TrainSpeed(fused_mlp=True, fused_attention=True, tuned_linear=True, fused_norm=True, bf16_residual=True,
                        master_weights=True, fp8_forward=True, fp8_backward=True)
    train(load_config("digits", overrides=common), tmp_path / "plain", device="cpu")
    train(load_config("digits", overrides=common), tmp_path / "fast", device="cpu", speed=levers)
    ref, got = losses(tmp_path / "plain"), losses(tmp_path / "fast")
    assert ref.keys() == got.keys() and ref != got  # the levers did run
    assert all(abs(got[k] - ref[k]) < 0.05 * ref[k] for k in ref), (ref, got)
    assert got[30] < 0.8 * got[5]  # and it learns
    a, b = final_weights(tmp_path / "plain"), final_weights(tmp_path / "fast")
    assert a["model"].keys() == b["model"].keys() and a["ema"].keys() == b["ema"].keys()
    train(load_config("digits", overrides=[*common, "train.steps=32"]), tmp_path / "fast", device="cpu", resume=True,
          speed=levers)
    assert final_weights(tmp_path / "fast")["step"] == 32


@pytest.mark.parametrize("option", ["fused_mlp", "fused_norm", "tuned_linear", "fused_attention"])
def test_fused_kernels_training_follows_the_plain_run(tmp_path, monkeypatch, option):
    """Each module lever through the door (on the CPU the operators compute with torch's ops) against the plain
    run: the same losses to float rounding, and the same checkpoint keys."""
    import importlib

    module = importlib.import_module(f"ditkit.fast.{option}")
    convert, converted = getattr(module, f"convert_to_{option}"), []
    monkeypatch.setattr(module, f"convert_to_{option}", lambda m, **kw: converted.append(convert(m, **kw)) or converted[-1])
    common = [*TINY, "train.steps=6", "train.log_every=2"]
    train(load_config("digits", overrides=common), tmp_path / "false", device="cpu")
    train(load_config("digits", overrides=common), tmp_path / "true", device="cpu", speed=TrainSpeed(**{option: True}))
    # the true run's two blocks (and the final layer); its linears: 4 and adaLN's per block, 2 in the time embedder, 2 in the final layer
    assert converted == [{"fused_mlp": 2, "fused_norm": 3, "tuned_linear": 2 * 5 + 2 + 2, "fused_attention": 2}[option]]
    ref, got = losses(tmp_path / "false"), losses(tmp_path / "true")
    assert ref.keys() == got.keys() == {2, 4, 6}
    assert all(abs(got[k] - ref[k]) <= 1e-5 * ref[k] for k in ref), (ref, got)
    assert final_weights(tmp_path / "false")["model"].keys() == final_weights(tmp_path / "true")["model"].keys()


def test_fused_kernels_under_two_process_fsdp(tmp_path):
    """FSDP2 unshards the block's Parameters around its forward; the fused MLP's and norm's operators and the
    tuned linears and the fused attention take them as the plain modules do: the same losses."""
    common = ["train", "--preset", "digits", "--device", "cpu", "--steps", "4"]
    for fused, speed in (("false", "reference"), ("true", "fused_mlp+fused_norm+tuned_linear+fused_attention")):
        torchrun(2, *common, "--run-dir", str(tmp_path / fused), "--speed", speed,
                 *overrides("train.distributed=fsdp", "train.log_every=2"))
    ref, got = losses(tmp_path / "false"), losses(tmp_path / "true")
    assert ref.keys() == got.keys() == {2, 4}
    assert all(abs(got[k] - ref[k]) <= 1e-5 * ref[k] for k in ref), (ref, got)


def test_fsdp_bf16_gathering_trains_like_one_process_in_bf16(tmp_path):
    """train.fsdp_bf16_gather=true: 2 FSDP processes that gather bf16 weights against 1 process under bf16
    autocast with the same global batch. The products see the same bf16 operands either way; what differs is
    the few operations autocast keeps in float32 (the label table's lookup), so the runs agree to bf16
    rounding, not bitwise."""
    common = ["train", "--preset", "digits", "--device", "cpu", "--steps", "4"]
    bf16 = ("train.precision=bf16", "train.log_every=1")
    torchrun(2, *common, "--run-dir", str(tmp_path / "two"),  # grids: the EMA, gathered in float32, outside autocast
             *overrides(*bf16, "train.distributed=fsdp", "train.fsdp_bf16_gather=true", "train.sample_every=2", "sample.steps=2"))
    assert (tmp_path / "two" / "samples" / "step_00000004.png").exists()
    one = ditkit(*common, "--run-dir", str(tmp_path / "one"), *overrides(*bf16, "train.grad_accum=2"))
    assert one.wait(timeout=300) == 0, one.stdout.read()[-2000:]
    ref, got = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert ref.keys() == got.keys() == {1, 2, 3, 4}
    assert all(abs(got[k] - ref[k]) <= 1e-3 * ref[k] for k in ref), (ref, got)  # measured: ≤ 2e-5
    a, b = final_weights(tmp_path / "two")["model"], final_weights(tmp_path / "one")["model"]
    assert all(a[k].dtype == b[k].dtype == torch.float32 for k in b)  # the sharded master weights stay float32
    moved = torch.cat([(a[k] - b[k]).flatten() for k in b]).norm() / torch.cat([b[k].flatten() for k in b]).norm()
    # measured 5.7e-5; plain FSDP gives 0 here (bitwise), so a non-zero difference shows the bf16 gathering acted
    assert 0 < moved < 1e-3, moved
    with pytest.raises(ConfigError, match="train.fsdp_bf16_gather=true needs bf16 autocast"):  # auto is fp32 on a CPU
        train(load_config("digits", overrides=[*TINY, "train.distributed=fsdp", "train.fsdp_bf16_gather=true"]),
              tmp_path / "fp32", device="cpu")
    for option in ("train.fsdp_bf16_gather=true", "train.fsdp_reshard=false"):
        with pytest.raises(ConfigError, match="train.distributed must be fsdp with"):
            load_config("digits", overrides=[option])


def test_the_ddp_bucket_size_reaches_ddp():
    """train.ddp_bucket_mb as DDP's reducer records it (bucket_bytes_cap), in one process, a 1-rank gloo group."""
    import torch.distributed as dist

    from ditkit.training.distributed import DistInfo
    from ditkit.training.trainer import _wrap_distributed

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        cfg = load_config("digits", overrides=[*TINY, "train.distributed=ddp", "train.ddp_bucket_mb=64"])
        model = build_model(cfg.model.name, **cfg.model.kwargs())
        ddp = _wrap_distributed(model, cfg, DistInfo(world_size=2))
        assert ddp.bucket_bytes_cap == 64 * 1024 * 1024
        plain = load_config("digits", overrides=[*TINY, "train.distributed=ddp"])  # the speed plan's size, else 25
        assert _wrap_distributed(model, plain, DistInfo(world_size=2), bucket_mb=6.0).bucket_bytes_cap == 6 * 2 ** 20
        assert _wrap_distributed(model, plain, DistInfo(world_size=2)).bucket_bytes_cap == 25 * 2 ** 20
        with pytest.raises(ConfigError, match="train.ddp_bucket_mb must be at least 1 .MiB"):
            load_config("digits", overrides=["train.ddp_bucket_mb=0.5"])
        with pytest.raises(ConfigError, match="train.distributed must be ddp with train.ddp_bucket_mb"):
            load_config("digits", overrides=["train.distributed=fsdp", "train.ddp_bucket_mb=64"])
    finally:
        dist.destroy_process_group()


def test_fsdp_options_reach_fully_shard():
    """train.fsdp_reshard=false and train.fsdp_bf16_gather=true as FSDP2 records them, block by block, for the
    trained model and (always resharded, gathered in float32) its EMA; in one process, a 1-rank gloo group."""
    import copy

    import torch.distributed as dist

    from ditkit.training.distributed import DistInfo
    from ditkit.training.trainer import _wrap_distributed

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        cfg = load_config("digits", overrides=[*TINY, "train.distributed=fsdp", "train.fsdp_reshard=false",
                                               "train.fsdp_bf16_gather=true"])
        model = build_model(cfg.model.name, **cfg.model.kwargs())
        ema = copy.deepcopy(model)
        info = DistInfo(world_size=2)  # the wrapper reads only whether the run is distributed
        _wrap_distributed(model, cfg, info)
        _wrap_distributed(ema, cfg, info, ema=True)
        groups = {name: m._get_fsdp_state()._fsdp_param_group for name, m in
                  (("block", model.blocks[0]), ("root", model), ("ema block", ema.blocks[0]))}
        assert groups["block"].post_forward_mesh_info is None  # the gathered weights stay for the backward
        assert groups["ema block"].post_forward_mesh_info is not None
        for name in ("block", "root"):
            mp = groups[name].mp_policy
            assert (mp.param_dtype, mp.reduce_dtype, mp.cast_forward_inputs) == (torch.bfloat16, torch.float32, False)
        assert groups["ema block"].mp_policy.param_dtype is None
    finally:
        dist.destroy_process_group()


def test_bf16_residual_stream_needs_bf16_autocast(tmp_path):
    with pytest.raises(ConfigError, match="TrainSpeed.bf16_residual=True cannot serve this run: it needs bf16 arithmetic"):
        train(load_config("digits", overrides=[*TINY, "train.steps=1"]), tmp_path / "a", device="cpu",
              speed=TrainSpeed(bf16_residual=True))
    cfg = load_config("digits", overrides=[*TINY, "train.steps=2", "train.precision=bf16"])
    train(cfg, tmp_path / "b", device="cpu", speed=TrainSpeed(bf16_residual=True))
    assert all(v == v for v in losses(tmp_path / "b").values())


def test_bf16_weights_train_like_bf16_autocast_and_checkpoint_float32(tmp_path):
    """TrainSpeed(master_weights=True) (ditkit.fast.master_weights) against the plain bf16 run on the CPU: the
    same first loss bit for bit (the stored bf16 weights are autocast's casts), then bf16 noise; float32
    model weights and torch AdamW's state in the checkpoint; an exact resume; and resumes across the
    two kinds of run, both ways."""
    common = [*TINY, "train.precision=bf16", "train.grad_clip=0.05"]
    master = {"false": TrainSpeed(), "true": TrainSpeed(master_weights=True)}
    for flag in ("false", "true"):
        train(load_config("digits", overrides=[*common, "train.steps=6"]), tmp_path / flag, device="cpu", speed=master[flag])
    ref, got = losses(tmp_path / "false"), losses(tmp_path / "true")
    assert ref.keys() == got.keys() and got[1] == ref[1]
    assert all(abs(got[k] - ref[k]) <= 0.02 * ref[k] for k in ref), (ref, got)
    a, b = final_weights(tmp_path / "false"), final_weights(tmp_path / "true")
    assert a["model"].keys() == b["model"].keys()
    assert all(b["model"][k].dtype == a["model"][k].dtype for k in a["model"])  # float32 masters, not the bf16 copies
    assert len(a["opt"]["state"]) == len(b["opt"]["state"]) and a["opt"]["state"][0].keys() == b["opt"]["state"][0].keys()
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=0.05, atol=2e-3, msg=k)

    eight = [*common, "train.steps=8"]
    train(load_config("digits", overrides=eight), tmp_path / "ref8", device="cpu", speed=master["true"])
    train(load_config("digits", overrides=eight), tmp_path / "true", device="cpu", resume=True, speed=master["true"])
    assert losses(tmp_path / "true") == losses(tmp_path / "ref8")
    c, d = final_weights(tmp_path / "true"), final_weights(tmp_path / "ref8")
    for part in ("model", "ema"):
        assert all(torch.equal(c[part][k], d[part][k]) for k in d[part]), part
    train(load_config("digits", overrides=eight), tmp_path / "false", device="cpu", resume=True, speed=master["true"])
    train(load_config("digits", overrides=[*eight, "train.steps=10"]), tmp_path / "true", device="cpu", resume=True,
          speed=master["false"])
    assert final_weights(tmp_path / "false")["step"] == 8 and final_weights(tmp_path / "true")["step"] == 10
    assert all(v == v for v in [*losses(tmp_path / "false").values(), *losses(tmp_path / "true").values()])


@pytest.mark.parametrize("extra, message", [
    (["train.precision=fp32"], "master_weights=True cannot serve this run: it needs bf16 arithmetic"),
    (["train.precision=auto"], "master_weights=True cannot serve this run: it needs bf16 arithmetic"),  # fp32 on a CPU
])
def test_master_weights_refuse_what_they_cannot_reproduce(tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        train(load_config("digits", overrides=[*TINY, "train.steps=1", "train.precision=bf16", *extra]), tmp_path,
              device="cpu", speed=TrainSpeed(master_weights=True))


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_process_checkpoint_resumes_on_one_process(tmp_path, mode):
    """A run written by 2 processes continues on 1 (with 2 accumulation steps, the same global batch)
    as a 1-process run that never stopped, to float rounding (1e-5): the checkpoint holds whole tensors, and the
    batches and random draws depend on the step, not on the number of processes."""
    common = ["train", "--preset", "digits", "--device", "cpu"]
    torchrun(2, *common, "--steps", "3", "--run-dir", str(tmp_path / "two"), *overrides(f"train.distributed={mode}"))
    resumed = ditkit(*common, "--steps", "5", "--run-dir", str(tmp_path / "two"), "--resume", *overrides("train.grad_accum=2"))
    assert resumed.wait(timeout=300) == 0, resumed.stdout.read()[-2000:]
    one = ditkit(*common, "--steps", "5", "--run-dir", str(tmp_path / "one"), *overrides("train.grad_accum=2"))
    assert one.wait(timeout=300) == 0, one.stdout.read()[-2000:]
    a, b = final_weights(tmp_path / "two"), final_weights(tmp_path / "one")
    assert a["step"] == b["step"] == 5
    for part in ("model", "ema"):
        for k in b[part]:
            torch.testing.assert_close(a[part][k], b[part][k], rtol=1e-5, atol=1e-6, msg=f"{part}.{k}")


def test_profiler_writes_where_the_steps_went(tmp_path, caplog):
    cfg = load_config("digits", overrides=[*TINY, "train.steps=4", "train.profile=2-3"])
    train(cfg, tmp_path, device="cpu")
    report = (tmp_path / "profile_2-3.txt").read_text()
    assert report.startswith("steps 2..3: wall ") and "no GPU" in report
    assert "aten::mm" in report or "aten::addmm" in report  # the host-time table of the operators
    assert json.loads((tmp_path / "profile_2-3.json").read_text())["traceEvents"]
    # a run that ends inside the window closes the profiler and writes no partial profile
    train(load_config("digits", overrides=[*TINY, "train.steps=3", "train.profile=2-5"]), tmp_path / "short", device="cpu")
    assert not list((tmp_path / "short").glob("profile_*"))
    assert "train.profile=2-5: this run does steps 1 to 3, so it writes no profile" in caplog.text
    for bad in ("3", "3-2", "0-2", "a-b"):
        with pytest.raises(ConfigError, match="train.profile"):
            load_config("digits", overrides=[f"train.profile={bad}"])


def test_compiled_loss_follows_the_compiled_network(tmp_path):
    """TrainSpeed(compile_loss=True) (the loss compiled with the network inside) against compile=True alone:
    with inductor drawing eager's random numbers, the same losses; without compile it is refused."""
    common = [*TINY, "model.depth=1", "train.steps=3", "train.log_every=1"]
    for c in ("false", "true"):
        # (config.patch, not monkeypatch: undoing a setattr on inductor's config module deletes the option)
        with torch._inductor.config.patch(fallback_random=True):
            train(load_config("digits", overrides=common), tmp_path / c, device="cpu",
                  speed=TrainSpeed(compile=True, compile_loss=c == "true"))
    ref, got = losses(tmp_path / "false"), losses(tmp_path / "true")
    assert ref.keys() == got.keys() == {1, 2, 3}
    assert all(abs(got[k] - ref[k]) <= 1e-4 * ref[k] for k in ref), (ref, got)
    with pytest.raises(ConfigError, match="compile_loss=True cannot serve this run: .* needs compile=True"):
        train(load_config("digits", overrides=common), tmp_path / "x", device="cpu", speed=TrainSpeed(compile_loss=True))
