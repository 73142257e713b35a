"""Training beyond one process, on the CPU with gloo: two torchrun agents as two nodes that share one run
folder, a 1-process checkpoint resumed on 2 processes, and the CPU's speed levers under DDP and FSDP, each
against 1 process with the same global batch."""
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ditkit.checkpoints.training import load_checkpoint
from ditkit.config import load_config
from ditkit.fast import TrainSpeed
from ditkit.training.trainer import train
from tests.training.test_trainer import ENV, TINY, final_weights, losses, overrides, torchrun

COMMON = ["train", "--preset", "digits", "--device", "cpu"]
# train.keep_last=0: every checkpoint stays, so that a run's step-3 state can be compared and resumed
KEEP = ("train.ckpt_every=1", "train.keep_last=0")


def free_port() -> int:
    """A port that is free now: the kernel's pick for a socket bound to port 0."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(*args) -> dict[int, str]:
    """``ditkit *args`` as a 2-node job of 1 process per node: two torchrun agents on this host meeting at
    a c10d rendezvous on a free port, as on a cluster.  Returns each agent's output by its --node_rank."""
    rdzv = ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
            "--rdzv_endpoint", f"127.0.0.1:{free_port()}", "--rdzv_id", "two_nodes"]
    procs = {}
    try:
        for node in (1, 0):
            cmd = [sys.executable, "-m", "torch.distributed.run", *rdzv, "--node_rank", str(node), "-m", "ditkit",
                   *args]
            procs[node] = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        outs = {node: proc.communicate(timeout=300)[0] for node, proc in procs.items()}
    finally:
        for proc in procs.values():  # one agent failing leaves the other waiting at the rendezvous
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for node, proc in procs.items():
        assert proc.returncode == 0, f"node {node}:\n{outs[node][-3000:]}"
    return outs


def reference(run, steps: int, *extra, speed=None, resume=False):
    """1 process, 2 accumulation steps: the global batch of 2 processes."""
    cfg = load_config("digits", overrides=[*TINY, *KEEP, "train.grad_accum=2", f"train.steps={steps}", *extra])
    train(cfg, run, device="cpu", speed=speed, resume=resume)


def assert_same_weights(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    for part in ("model", "ema"):
        for k in b[part]:
            torch.testing.assert_close(a[part][k], b[part][k], rtol=1e-5, atol=1e-6, msg=f"{part}.{k}")


def test_two_nodes_share_one_run_folder_and_resume_on_one_process(tmp_path):
    """Two agents of 1 process each (gloo) write to one run folder, as on a shared file system: the same
    weights as 1 process with the same global batch, every file written once by global rank 0, and the run
    continues on 1 process.  c10d gives the nodes their ranks in the order of (host, agent PID), whatever
    their --node_rank: on one host the agent started first usually holds global rank 0, so node 1 starts
    first here, and nothing below depends on which node held it."""
    ref, run = tmp_path / "ref", tmp_path / "two_nodes"
    reference(ref, 5)
    outs = two_nodes(*COMMON, "--steps", "3", "--run-dir", str(run), *overrides(*KEEP))
    assert sum("batch: 16 global" in out for out in outs.values()) == 1, outs  # the start-up summary: rank 0's log
    assert_same_weights(final_weights(run), load_checkpoint(ref / "checkpoints" / "ckpt_00000003.pt"))

    # Written once: a second writer would leave a second lock holder (refused), TensorBoard file or log line.
    assert sorted(p.name for p in run.iterdir()) == [".lock", "checkpoints", "config.yaml", "ema.safetensors",
                                                     "metrics.jsonl", "tb"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "ckpt_00000001.pt", "ckpt_00000002.pt", "ckpt_00000003.pt", "last.pt"]  # no temporary files left
    assert len(list((run / "tb").iterdir())) == 1
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]

    reference(run, 5, resume=True)  # on 1 process with 2 accumulation steps
    assert_same_weights(final_weights(run), final_weights(ref))
    assert losses(run).keys() == {1, 2, 3, 4, 5}


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_one_process_checkpoint_resumes_on_two_processes(tmp_path, mode):
    """3 steps in 1 process with 2 accumulation steps, then --resume to 5 on 2 processes, DDP or FSDP: the
    1-process run of 5 steps, to float rounding (the reverse, 2 processes to 1, is in test_trainer.py)."""
    run, ref = tmp_path / "run", tmp_path / "ref"
    reference(run, 3)
    reference(ref, 5)
    torchrun(2, *COMMON, "--steps", "5", "--run-dir", str(run), "--resume",
             *overrides(*KEEP, f"train.distributed={mode}"))
    assert_same_weights(final_weights(run), final_weights(ref))
    assert losses(run).keys() == {1, 2, 3, 4, 5}


def test_a_two_process_run_resumed_on_one_process_keeps_its_shards(tmp_path, caplog):
    """3 steps on 2 processes (DDP, 1 accumulation step), then `ditkit train --run-dir R --resume` on 1 process
    with the run's own config: the accumulation becomes 2, so the run goes on bit for bit as 1 process with 2
    accumulation steps would have run it, and one line says why."""
    from ditkit.cli import main

    run, ref = tmp_path / "run", tmp_path / "ref"
    reference(ref, 5)
    said = torchrun(2, *COMMON, "--steps", "3", "--run-dir", str(run), *overrides(*KEEP))
    assert "batch: 16 global = 2 processes (DDP) × 8 micro-batch × 1 accumulation" in said  # the wrapper is named
    assert said.count("trained to step 3") == 1  # said by rank 0 alone
    with caplog.at_level("INFO", logger="ditkit.train"):
        main(["train", "--run-dir", str(run), "--resume", "--steps", "5", "--device", "cpu"])
    assert "train.grad_accum = 2 (the checkpoint's 2 shards per step over 1 process" in caplog.text
    assert_same_weights(final_weights(run), final_weights(ref))
    assert losses(run).keys() == {1, 2, 3, 4, 5}


LEVERS = "fused_mlp+fused_attention+tuned_linear+fused_norm+bf16_residual"  # the levers that run on a CPU


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_cpu_speed_levers_in_bf16_on_two_processes_follow_one_process(tmp_path, mode):
    """The speed levers that run on a CPU, in bf16, on 2 processes (DDP or FSDP) against the same levers in
    1 process with 2 accumulation steps: the same losses, to the rounding of sums taken in another order."""
    reference(tmp_path / "one", 4, "train.precision=bf16", speed=TrainSpeed(**dict.fromkeys(LEVERS.split("+"), True)))
    torchrun(2, *COMMON, "--steps", "4", "--run-dir", str(tmp_path / "two"), "--speed", LEVERS,
             *overrides("train.precision=bf16", f"train.distributed={mode}"))
    ref, got = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert ref.keys() == got.keys() == {1, 2, 3, 4}
    # Measured, relative: DDP 0 (bitwise), FSDP 3.3e-7.  The 1-process run without the levers is 1.9e-5 away,
    # so this tolerance also shows that the levers ran in both processes.
    assert all(abs(got[k] - ref[k]) <= 2e-6 * ref[k] for k in ref), (ref, got)
    a, b = final_weights(tmp_path / "two")["model"], final_weights(tmp_path / "one")["model"]
    moved = torch.cat([(a[k] - b[k]).flatten() for k in b]).norm() / torch.cat([b[k].flatten() for k in b]).norm()
    assert moved < 3e-5, moved  # measured: DDP 0, FSDP 5.8e-6


FAKE_SLURM = {  # what the script asks of SLURM, played on this host; the job step is one process group
    "srun": 'while [[ $1 == --* ]]; do shift; done\nsetsid "$@" &\necho $! > "$FAKE_SLURM/step"\nwait $!\n',
    "scancel": '[[ $* == "--signal=TERM $SLURM_JOB_ID.0" ]] || { echo "scancel $*: not the training step" >&2; exit 1; }\n'
               'kill -TERM -- -"$(cat "$FAKE_SLURM/step")"\n',
    "scontrol": 'case $1 in show) echo 127.0.0.1 ;; requeue) echo "$2" >> "$FAKE_SLURM/requeued" ;; esac\n',
}


@pytest.mark.parametrize("sig, requeued", [(signal.SIGUSR1, True), (signal.SIGTERM, False)])
def test_slurm_script_checkpoints_before_the_time_limit_and_requeues(tmp_path, sig, requeued):
    """scripts/slurm_train.sbatch with srun, scancel and scontrol played on this host (one node of one
    process): the time limit's warning, a SIGUSR1 to the batch shell, reaches ditkit's training step, which
    checkpoints and stops, and the job requeues itself.  The requeued job runs the same command, whose --resume
    continues from that checkpoint (--resume after a stop under torchrun: test_safety.py).  A cancel (SIGTERM)
    also checkpoints, but does not requeue."""
    script = Path(__file__).parents[2] / "scripts" / "slurm_train.sbatch"
    assert "export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1" in script.read_text()
    fake = tmp_path / "slurm"
    fake.mkdir()
    for name, body in FAKE_SLURM.items():
        (fake / name).write_text("#!/usr/bin/env bash\n" + body)
        (fake / name).chmod(0o755)
    env = {**ENV, "PATH": f"{fake}:{Path(sys.executable).parent}:{ENV['PATH']}", "FAKE_SLURM": str(fake),
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node1", "SLURM_NNODES": "1", "SLURM_GPUS_ON_NODE": "1",
           "RDZV_PORT": str(free_port())}
    run = tmp_path / "run"
    proc = subprocess.Popen(["bash", str(script), str(run), "--preset", "digits", "--device", "cpu", "--steps", "400",
                             *overrides("train.ckpt_every=1000")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while not (run / "metrics.jsonl").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(sig)  # --signal=B:USR1@120, or scancel JOBID
    out = proc.communicate(timeout=240)[0]
    assert proc.returncode != 0 and "stopped by a signal" in out, out[-3000:]
    assert "no checkpoint in" in out and "starting a new run" in out  # --resume: the same command continues
    assert 1 <= final_weights(run)["step"] < 400
    assert (fake / "requeued").read_text() == "4242\n" if requeued else not (fake / "requeued").exists(), out[-3000:]
