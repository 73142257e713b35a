"""Long runs on the CPU: a diverging run stops with its last good checkpoint kept, stop signals end in a
checkpoint, one trainer per run folder, a resumed run refuses what would change it, and corrupt
checkpoints are passed over by name."""
import json
import signal
import time

import pytest
import torch

from ditkit.checkpoints.training import list_checkpoints, load_checkpoint
from ditkit.config import ConfigError, load_config
from ditkit.training.safety import LossGuard, RunDirLocked, RunLock
from ditkit.training.trainer import EXIT_PREEMPTED, TrainingStopped, train
from tests.training.test_trainer import TINY, _patch_objective, ditkit, losses, overrides


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_loss_guard_flags_spikes_after_its_warmup_and_round_trips():
    guard = LossGuard(10.0, torch.device("cpu"))
    for loss in [1.0] * LossGuard.WARMUP:
        assert not guard.spike(torch.tensor(loss))
        guard.update(torch.tensor(loss), torch.tensor(True))
    assert guard.spike(torch.tensor(10.5)) and not guard.spike(torch.tensor(9.5))
    guard.update(torch.tensor(1e9), torch.tensor(False))  # a bad step leaves the mean alone
    assert guard.mean.item() == pytest.approx(1.0)
    again = LossGuard(10.0, torch.device("cpu"))
    again.load_state_dict(guard.state_dict())
    assert (again.mean.item(), again.count.item()) == (guard.mean.item(), guard.count.item())
    assert not LossGuard(0.0, torch.device("cpu")).spike(torch.tensor(1e30))  # factor 0: off


def test_a_diverging_run_stops_and_keeps_its_last_good_checkpoint(tmp_path):
    """12 good steps, then lr 1e3: the first update blows the weights up, the next losses are spikes, their
    updates are skipped, no checkpoint is written from them, and the run stops naming the good one."""
    run = tmp_path / "run"
    good = [*TINY, "train.ckpt_every=4", "train.keep_last=1", "train.max_nonfinite=3", "train.warmup_steps=0"]
    train(load_config("digits", [*good, "train.steps=12"]), run, device="cpu")
    with pytest.raises(TrainingStopped, match=r"the run diverged: 3 consecutive bad steps .*ckpt_00000012\.pt"):
        train(load_config("digits", [*good, "train.steps=40", "train.lr=1000"]), run, device="cpu", resume=True)
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["ckpt_00000012.pt"]
    logged = records(run)
    assert all(r["loss"] is None or 0 < r["loss"] < 1e3 for r in logged)  # bad steps never log as 0.0
    assert any(r.get("bad_steps") for r in logged)


def test_a_checkpoint_older_than_a_divergence_survives_keep_last(tmp_path, monkeypatch):
    """One NaN step between two checkpoints: the checkpoint written before it is kept, keep_last=1 or not."""
    run = tmp_path / "run"
    _patch_objective(monkeypatch, {5})  # step 6's loss is NaN
    train(load_config("digits", [*TINY, "train.steps=12", "train.ckpt_every=4", "train.keep_last=1"]), run, device="cpu")
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["ckpt_00000004.pt", "ckpt_00000012.pt"]


def test_sigterm_checkpoints_and_exits_with_its_own_code_then_resume_finishes(tmp_path):
    run = tmp_path / "run"
    args = ["train", "--preset", "digits", "--run-dir", str(run), "--steps", "400", "--device", "cpu",
            *overrides("train.ckpt_every=1000", "train.log_every=1")]
    proc = ditkit(*args)
    deadline = time.time() + 240
    while not (run / "metrics.jsonl").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=240)[0]
    assert proc.returncode == EXIT_PREEMPTED, out[-2000:]
    assert "run the same command with --resume" in out
    step = int(load_checkpoint(list_checkpoints(run / "checkpoints")[-1])["step"])
    assert 1 <= step < 400
    resumed = ditkit(*args[:6], str(step + 2), *args[7:], "--resume")
    assert resumed.wait(timeout=240) == 0, resumed.stdout.read()[-2000:]
    assert max(losses(run)) == step + 2


def test_one_trainer_per_run_folder(tmp_path):
    cfg = load_config("digits", [*TINY, "train.steps=1"])
    with RunLock(tmp_path / "run"):
        with pytest.raises(RunDirLocked, match=r"run folder .*run is in use by PID \d+ on host .*: one trainer per run folder"):
            train(cfg, tmp_path / "run", device="cpu")
    train(cfg, tmp_path / "run", device="cpu")  # released: the folder is free again


@pytest.mark.parametrize("change, message", [
    ("train.seed=1", "train.seed was 0, now 1"),
    ("train.global_batch_size=32", "train.global_batch_size was 16, now 32"),
    ("data.flip=true", "data.flip was False, now True"),
])
def test_resume_refuses_what_would_change_the_run_unless_allowed(tmp_path, change, message):
    common = [*TINY, "train.steps=2"]
    train(load_config("digits", common), tmp_path, device="cpu")
    with pytest.raises(ConfigError, match=f"{message}.*--allow-changes"):
        train(load_config("digits", [*common, "train.steps=3", change]), tmp_path, device="cpu", resume=True)
    train(load_config("digits", [*common, "train.steps=3", change]), tmp_path, device="cpu", resume=True,
          allow_changes=True)
    train(load_config("digits", [*common, "train.steps=4", change, "train.grad_accum=2"]), tmp_path, device="cpu",
          resume=True)  # the accumulation may change: the same global batch is the same run


def test_resume_passes_over_a_corrupt_newest_checkpoint_and_resume_from_picks_one(tmp_path, caplog):
    common = [*TINY, "train.ckpt_every=2", "train.keep_last=3"]
    train(load_config("digits", [*common, "train.steps=4"]), tmp_path, device="cpu")
    newest = list_checkpoints(tmp_path / "checkpoints")[-1]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated, as by a full disk
    (tmp_path / "checkpoints" / ".ckpt_00000006.pt.k2j4x9q1.tmp").write_bytes(b"left by a kill mid-write")
    with caplog.at_level("INFO", logger="ditkit.train"):
        train(load_config("digits", [*common, "train.steps=6"]), tmp_path, device="cpu", resume=True)
    assert "ckpt_00000004.pt is unusable" in caplog.text and "resuming from" in caplog.text
    assert "at step 2" in caplog.text and not list((tmp_path / "checkpoints").glob(".*.tmp"))
    train(load_config("digits", [*common, "train.steps=8"]), tmp_path / "b", device="cpu",
          resume_from=tmp_path / "checkpoints" / "ckpt_00000002.pt")
    assert max(losses(tmp_path / "b")) == 8 and min(losses(tmp_path / "b")) == 3


def test_sigterm_under_torchrun_checkpoints_on_every_rank_and_resumes_on_one(tmp_path):
    """torchrun passes SIGTERM on to its workers; they agree on the step to stop at, join one checkpoint
    and stop; the run then continues on one process with the same global batch."""
    import subprocess
    import sys

    from tests.training.test_trainer import ENV

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", "-m", "ditkit",
           "train", "--preset", "digits", "--run-dir", str(run), "--steps", "400", "--device", "cpu",
           *overrides("train.ckpt_every=1000", "train.log_every=1")]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while not (run / "metrics.jsonl").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=240)[0]
    assert proc.returncode != 0 and "stopped by a signal" in out, out[-3000:]
    step = int(load_checkpoint(list_checkpoints(run / "checkpoints")[-1])["step"])
    assert 1 <= step < 400
    resumed = ditkit("train", "--preset", "digits", "--run-dir", str(run), "--steps", str(step + 2), "--device", "cpu",
                     "--resume", *overrides("train.ckpt_every=1000", "train.log_every=1", "train.grad_accum=2"))
    assert resumed.wait(timeout=240) == 0, resumed.stdout.read()[-2000:]
    assert max(losses(run)) == step + 2


def test_a_file_system_without_locks_trains_unlocked_with_a_warning(tmp_path, monkeypatch, caplog):
    """Some shared file systems have no flock (Lustre mounted without -o flock answers ENOSYS): the run is
    not refused as if another trainer held the folder; it goes on and says what is not guarded."""
    import errno
    import fcntl

    def no_locks(fd, operation):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level("WARNING", logger="ditkit.train"):
        train(load_config("digits", [*TINY, "train.steps=1"]), tmp_path / "run", device="cpu")
    assert "(Function not implemented): the run goes on, but nothing stops a second trainer" in caplog.text
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == 1
