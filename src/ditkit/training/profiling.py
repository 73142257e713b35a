"""``train.profile=A-B``: the PyTorch profiler over training steps A..B (counted from 1; put them
after warm-up and compilation), written to the run folder as a table of the kernels that took the
most GPU time, the share of the wall time the GPU was busy, the operators that took the most host
time, and a Chrome trace."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from ditkit.config import parse_profile
from ditkit.utils.io import atomic_write_text


def _device_time_us(event) -> float:
    return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)


class StepProfiler:
    """Call ``before(step)`` ahead of each step, ``after(done)`` once it is counted, and ``close()`` when
    the run ends (a run stopped inside the window, by its time limit, writes no profile)."""

    def __init__(self, spec: str, run_dir: Path, write: bool, device: torch.device, start_step: int, end_step: int) -> None:
        self.window = parse_profile(spec)
        self.run_dir, self.write, self.device = run_dir, write, device
        self.prof = None
        if self.window is not None and not start_step <= self.window[0] < self.window[1] <= end_step and write:
            logging.getLogger("ditkit.train").warning(
                f"train.profile={spec}: this run does steps {start_step + 1} to {end_step}, so it writes no profile")

    def before(self, step: int) -> None:
        if self.window is None or step != self.window[0]:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.synchronize(self.device)
        self.prof = torch.profiler.profile(activities=activities)
        self.prof.__enter__()
        self.t0 = time.perf_counter()

    def after(self, done: int) -> None:
        if self.prof is None or done != self.window[1]:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        wall = time.perf_counter() - self.t0
        self.prof.__exit__(None, None, None)
        prof, self.prof = self.prof, None
        if not self.write:
            return
        a, b = self.window
        n = b - a
        events = prof.key_averages()
        # GPU kernels only: the GPU-side ranges of annotations (optimizer steps, NCCL calls) would count twice
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA
                   and not getattr(e, "is_user_annotation", False)]
        comm = sum(_device_time_us(e) for e in kernels if e.key.startswith("nccl")) / 1e3 / n
        compute = sum(_device_time_us(e) for e in kernels if not e.key.startswith("nccl")) / 1e3 / n
        step_ms = 1e3 * wall / n
        busy = (f"compute kernels {compute:.1f} ms ({compute / step_ms:.0%} of it: the rest the GPU waits for the host, "
                f"data or other GPUs); NCCL kernels {comm:.1f} ms (their own stream, overlapping)") \
            if self.device.type == "cuda" else "no GPU"
        lines = [f"steps {a + 1}..{b}: wall {step_ms:.1f} ms per step; {busy}", ""]
        by_gpu = sorted(kernels, key=_device_time_us, reverse=True)[:25]
        lines.append("kernels by GPU time per step (ms):")
        lines += [f"  {_device_time_us(e) / 1e3 / n:8.2f}  x{e.count // n:<4d} {e.key[:110]}" for e in by_gpu]
        lines.append("")
        lines.append(events.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70))
        path = self.run_dir / f"profile_{a + 1}-{b}.txt"
        atomic_write_text(path, "\n".join(lines))
        prof.export_chrome_trace(str(self.run_dir / f"profile_{a + 1}-{b}.json"))
        print("\n".join(lines[:2]) + f"\nprofile: {path}", flush=True)

    def close(self) -> None:
        if self.prof is not None:
            self.prof.__exit__(None, None, None)
            self.prof = None
