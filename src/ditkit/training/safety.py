"""What makes a long run trustworthy, beside the training loop: a loss-spike guard on the device, a lock
on the run folder, stop signals turned into a checkpoint, and the resume checks that keep a resumed
run the run it was.

- ``LossGuard``: a step is good only if its loss and gradients are finite and its loss is not a spike,
  loss > factor · m with m the running mean of the good steps' losses (m_k = β m_{k−1} + (1 − β) ℓ_k,
  β = 0.99, from the first good loss; checked once ``WARMUP`` good steps were seen).  All on the device:
  no host sync.  A bad step's update is skipped, so the weights stay those of the last good step.
- ``RunLock``: an advisory ``flock`` on ``run_dir/.lock`` (released by the kernel when the process dies,
  even by ``kill -9``), holding the holder's PID, host and start time for the error a second trainer gets.
  A file system without locks (some shared ones) gets a warning, not a refusal.
- ``StopSignals``: SIGTERM (what schedulers send before killing a job) and SIGINT set a flag; the loop
  finishes the step in flight, every rank checkpoints, and the run ends with ``TrainingPreempted``.
"""
from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import signal
import socket
import threading
from pathlib import Path

import torch

log = logging.getLogger("ditkit.train")


class LossGuard:
    """Flags loss spikes against the running mean of the good steps' losses (see the module docstring)."""

    WARMUP = 10  # good steps before the check starts: the mean must have seen the loss settle a little
    BETA = 0.99

    def __init__(self, factor: float, device: torch.device):
        self.factor = factor
        self.mean = torch.zeros((), device=device)
        self.count = torch.zeros((), device=device)

    def spike(self, loss: torch.Tensor) -> torch.Tensor:
        """A bool device scalar: ``loss`` (the step's loss, the same on every rank) is a spike."""
        if self.factor <= 0:
            return torch.zeros((), dtype=torch.bool, device=loss.device)
        return (self.count >= self.WARMUP) & (loss > self.factor * self.mean)

    def update(self, loss: torch.Tensor, good: torch.Tensor) -> None:
        beta = torch.where(self.count > 0, self.BETA, 0.0)  # the first good loss is the mean
        self.mean = torch.where(good, beta * self.mean + (1 - beta) * loss, self.mean)
        self.count = self.count + good.float()

    def state_dict(self) -> dict:
        return {"mean": float(self.mean), "count": float(self.count)}

    def load_state_dict(self, state: dict) -> None:
        self.mean.fill_(float(state["mean"]))
        self.count.fill_(float(state["count"]))


class RunLock:
    """``with RunLock(run_dir):`` — one trainer per run folder; the second gets a ``RunDirLocked`` naming
    the holder.  Only the main process of a job takes it (the job's other ranks are the same run)."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.path, self.enabled, self.fd = Path(run_dir) / ".lock", enabled, None

    def __enter__(self) -> "RunLock":
        if not self.enabled:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another process holds the lock
            holder = os.read(fd, 4096).decode(errors="replace")
            os.close(fd)
            raise RunDirLocked(self.path.parent, holder) from None
        except OSError as err:  # no locks on this file system (Lustre mounted without -o flock: ENOSYS)
            os.close(fd)
            log.warning(f"cannot lock {self.path} ({err.strerror}): the run goes on, but nothing stops a second "
                        f"trainer from using {self.path.parent}")
            return self
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": datetime.datetime.now().isoformat(timespec="seconds")}).encode())
        os.fsync(fd)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)  # closing releases the flock
            self.fd = None


class RunDirLocked(ValueError):
    def __init__(self, run_dir: Path, holder: str):
        try:
            h = json.loads(holder)
            who = f"PID {h['pid']} on host {h['host']} (since {h['since']})"
        except (ValueError, KeyError, TypeError):
            who = "another process"
        super().__init__(f"run folder {run_dir} is in use by {who}: one trainer per run folder; wait for it, stop it, "
                         "or choose another --run-dir")


class StopSignals:
    """``with StopSignals() as stop:`` — ``stop.requested`` turns true on SIGTERM or SIGINT (the previous
    handlers come back on exit).  In the main thread only; elsewhere it never turns true."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self.previous = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def _handle(self, signum, frame) -> None:
        self.received = signum
        log.warning(f"{signal.Signals(signum).name}: finishing this step, then checkpointing and stopping")

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def any_rank(flag: bool, info) -> bool:
    """True on every rank if it is true on any (a host sync: call it every few steps, not every step)."""
    if not info.enabled:
        return flag
    import torch.distributed as dist

    t = torch.tensor([float(flag)], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


# What may not change on --resume without --allow-changes: each changes the batches or the random draws,
# so the resumed run would no longer be the one it was (train.grad_accum and the number of processes may:
# the trainer keeps their product, the shards of a step, where it can; trainer._keep_shards).
RESUME_FIXED = {"train": ("seed", "global_batch_size"), "data": ("kind", "path", "labels_file", "image_size", "flip",
                                                                  "params_file", "field_file", "log_transform",
                                                                  "field_log_transform", "latent_norm", "length_buckets", "axes",
                                                                  "context_path")}


def check_resume(saved: dict, cfg: dict, path: Path, allow_changes: bool) -> None:
    """The saved run's config against this run's: model and objective must match; the seed, the global
    batch and the data too, unless ``allow_changes``.  Raises ValueError naming the key and both values."""
    from ditkit.config import Config, ConfigError

    defaults = Config().to_dict()  # keys added since the checkpoint was written hold their defaults there
    saved = {s: {**defaults.get(s, {}), **v} if isinstance(v, dict) else v for s, v in saved.items()}
    for section in ("model", "objective"):
        if saved.get(section) != cfg[section]:
            keys = sorted(k for k in cfg[section] if saved.get(section, {}).get(k) != cfg[section][k])
            raise ConfigError(f"cannot resume from {path}: its {section} config differs from this run's "
                              f"({', '.join(f'{section}.{k}' for k in keys) or section})")
    changed = [(f"{s}.{k}", saved.get(s, {}).get(k), cfg[s][k]) for s, ks in RESUME_FIXED.items() for k in ks
               if k in saved.get(s, {}) and saved[s][k] != cfg[s][k]]
    if changed and not allow_changes:
        what = "; ".join(f"{k} was {a!r}, now {b!r}" for k, a, b in changed)
        raise ConfigError(f"cannot resume from {path}: {what}. That changes the batches or the random draws, so the "
                          "run would not continue as it was; pass --allow-changes to resume anyway")
    for k, a, b in changed:
        log.warning(f"resuming with {k} changed from {a!r} to {b!r} (--allow-changes)")
