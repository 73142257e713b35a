"""The speed levers under DDP and FSDP2 on the CPU (gloo): bf16 master weights and the compiled loss
give the losses and weights of one process with accumulation on the same global batch; a run launched
by torchrun wraps the model even in one process, so that it measures the step that N processes run."""
import subprocess
import sys

import pytest
import torch

from ditkit.config import load_config
from ditkit.fast import TrainSpeed
from ditkit.fast import recipes as recipes_module
from ditkit.training import trainer as trainer_module
from ditkit.training.distributed import DistInfo
from ditkit.training.trainer import train
from tests.training.test_trainer import (
    ENV,
    TINY,
    ditkit,
    final_weights,
    losses,
    overrides,
    torchrun,
)

BF16 = ("train.precision=bf16", "train.log_every=1")


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_master_weights_under_two_processes_equal_one_process_with_accumulation(tmp_path, mode):
    """Under DDP the bf16 gradients are averaged in float32 and rounded once, which for 2 ranks is the very
    sum that one process accumulates in bf16: bitwise equal (measured: 0.0).  Under FSDP the lever is FSDP2's
    mixed precision (sharded float32 masters, bf16 gathers), against the flat bf16 masters of one process:
    the same bf16 operands, so bf16 noise only."""
    common = ["train", "--preset", "digits", "--device", "cpu", "--steps", "4", "--speed", "master_weights"]
    torchrun(2, *common, "--run-dir", str(tmp_path / "two"), *overrides(*BF16, f"train.distributed={mode}"))
    one = ditkit(*common, "--run-dir", str(tmp_path / "one"), *overrides(*BF16, "train.grad_accum=2"))
    assert one.wait(timeout=300) == 0, one.stdout.read()[-2000:]
    ref, got = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert ref.keys() == got.keys() == {1, 2, 3, 4}
    a, b = final_weights(tmp_path / "two"), final_weights(tmp_path / "one")
    assert all(a["model"][k].dtype == torch.float32 for k in b["model"])  # the float32 masters, either way
    if mode == "ddp":
        assert got == ref
        assert all(torch.equal(a[part][k], b[part][k]) for part in ("model", "ema") for k in b[part])
    else:
        assert all(abs(got[k] - ref[k]) <= 1e-3 * ref[k] for k in ref), (ref, got)
        moved = torch.cat([(a["model"][k] - b["model"][k]).flatten() for k in b["model"]]).norm()
        assert moved / torch.cat([v.flatten() for v in b["model"].values()]).norm() < 1e-2, moved


@pytest.fixture
def one_rank_group(monkeypatch):
    """The trainer as torchrun starts it with one process: a 1-rank gloo group and ``launched``."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    monkeypatch.setattr(trainer_module, "setup_distributed", lambda device: DistInfo(launched=True))
    monkeypatch.setattr(trainer_module, "cleanup", lambda info: None)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_one_launched_process_is_wrapped_and_every_cpu_lever_composes(tmp_path, monkeypatch, one_rank_group, mode):
    """World size 1 under the wrapper: the compiled network with the compiled loss (dynamo traces through DDP's
    and FSDP2's forward; here with the aot_eager backend, which keeps eager's numerics and random draws) and bf16
    master weights follow the unwrapped run to bf16 rounding, and the wrapper is really there."""
    wrapped = []
    real_wrap = trainer_module._wrap_distributed
    monkeypatch.setattr(trainer_module, "_wrap_distributed", lambda m, *a, **kw: wrapped.append(real_wrap(m, *a, **kw))
                        or wrapped[-1])
    real_compile = recipes_module.TrainPlan.compile
    monkeypatch.setattr(recipes_module.TrainPlan, "compile", lambda self, m, o, **kw: real_compile(self, m, o, backend="aot_eager"))
    levers = TrainSpeed(compile=True, compile_loss=True, master_weights=True, bf16_residual=True)
    common = [*TINY, *BF16, "train.steps=3", "model.depth=1"]
    train(load_config("digits", overrides=[*common, f"train.distributed={mode}"]), tmp_path / "wrapped", device="cpu",
          speed=levers)
    kinds = {type(m).__name__ for m in wrapped}
    assert ("DistributedDataParallel" in kinds) if mode == "ddp" else any(k.startswith("FSDP") for k in kinds), kinds
    monkeypatch.setattr(trainer_module, "setup_distributed", lambda device: DistInfo())
    train(load_config("digits", overrides=common), tmp_path / "plain", device="cpu", speed=levers)
    ref, got = losses(tmp_path / "plain"), losses(tmp_path / "wrapped")
    assert ref.keys() == got.keys() == {1, 2, 3}
    assert all(abs(got[k] - ref[k]) <= 1e-3 * ref[k] for k in ref), (ref, got)


def test_torchrun_with_one_process_sets_up_a_group():
    """torchrun marks its processes (TORCHELASTIC_RUN_ID): one process gets a process group and ``launched``."""
    code = ("from ditkit.training.distributed import setup_distributed, cleanup; import torch.distributed as d; "
            "i = setup_distributed('cpu'); print(i.launched, i.enabled, d.is_initialized(), i.world_size); cleanup(i)")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "--no-python",
                          sys.executable, "-c", code],
                         env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.split() == ["True", "True", "True", "1"], out.stdout + out.stderr[-2000:]
    plain = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=120)
    assert plain.stdout.split() == ["False", "False", "False", "1"], plain.stdout + plain.stderr[-2000:]


@pytest.mark.parametrize("info, mode, parallel", [
    (DistInfo(), "fsdp", "none"),  # python -m ditkit train: one plain process, whatever train.distributed says
    (DistInfo(launched=True), "ddp", "ddp"),  # torchrun wraps even one process
    (DistInfo(launched=True), "fsdp", "fsdp"),
    (DistInfo(world_size=2), "fsdp", "fsdp"),
])
def test_one_decision_names_the_wrapper_for_the_plan_and_the_checkpoints(info, mode, parallel):
    """``TrainRun.parallel`` (the speed plan's), the wrapper and the checkpoint helpers read the same decision."""
    cfg = load_config("digits", overrides=[*TINY, f"train.distributed={mode}"])
    assert trainer_module._parallel(cfg, info) == parallel
    if parallel == "none":
        model = torch.nn.Linear(2, 2)
        assert trainer_module._wrap_distributed(model, cfg, info) is model
        assert trainer_module._full_state_dict(model, cfg, info).keys() == model.state_dict().keys()
