"""The one door on a DiT with LightningDiT's options (RMSNorm, RoPE, QK-norm, SwiGLU): the fastest recipe leaves
out, one line each, the levers that compute the official block's form of them, and what it applies keeps the
output of the unmodified model."""
import copy
import dataclasses

import pytest
import torch

from ditkit.fast import TrainRun, TrainSpeed, recipes, train_speed
from ditkit.fast.recipes import block_options
from ditkit.models.dit import DiT

CPU, GPU = torch.device("cpu"), torch.device("cuda")
OPTIONS = dict(pos_embed="rope", norm="rmsnorm", qk_norm=True, mlp="swiglu")


@pytest.fixture
def hopper(monkeypatch):
    monkeypatch.setattr(recipes, "fp8_tensor_cores", lambda device: device.type == "cuda")


def _model(**options) -> DiT:
    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10, **options)
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=0.05)
    return model


def _fused_types(levers: set[str]) -> tuple[type, ...]:
    """The module types of the fused levers in ``levers``."""
    from ditkit.fast.fused_attention import FusedAttention
    from ditkit.fast.fused_mlp import FusedMlp
    from ditkit.fast.fused_norm import FusedNormBlock, FusedNormFinalLayer

    types = {"fused_norm": (FusedNormBlock, FusedNormFinalLayer), "fused_attention": (FusedAttention,),
             "fused_mlp": (FusedMlp,)}
    return tuple(t for lever in levers for t in types.get(lever, ()))


def _same_output(model: DiT, fast: DiT) -> None:
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 2])
    with torch.no_grad():
        torch.testing.assert_close(fast.eval()(x, t, y), model.eval()(x, t, y), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options, left_out", [
    (dict(norm="rmsnorm"), {"fused_norm", "fp8_forward"}),
    (dict(pos_embed="rope"), {"fused_attention"}),
    (dict(qk_norm=True), {"fused_attention"}),
    (dict(mlp="swiglu"), {"fused_mlp"}),
    (OPTIONS, {"fused_norm", "fused_attention", "fused_mlp", "fp8_forward", "fp8_backward"}),
])
def test_fastest_leaves_out_what_cannot_serve_the_blocks_and_keeps_the_output(hopper, options, left_out):
    model = _model(**options)
    run = TrainRun(GPU, torch.bfloat16, block=block_options(**options))
    assert run.block == block_options(model)
    plan = train_speed("fastest", run)
    left = {n.split("left out ")[1].split(":")[0] for n in plan.notes}
    assert left == left_out and len(plan.notes) == len(left_out), plan.notes
    assert not any(getattr(plan.speed, lever) for lever in left_out)
    assert plan.speed.compile and plan.speed.tuned_linear and plan.speed.master_weights
    # Its module swaps, on the CPU (the fused modules compute with torch's ops) in float32; the bf16 residual
    # stream and the FP8 products change the numerics by design and need a GPU, so they stay out of this comparison.
    fast = copy.deepcopy(model)
    levers = dataclasses.replace(plan.speed, bf16_residual=False, fp8_forward=False, fp8_backward=False)
    assert recipes.TrainPlan(levers, dataclasses.replace(run, device=CPU)).apply(fast)  # no lever left out there
    assert not any(isinstance(m, _fused_types(left_out)) for m in fast.modules())
    assert fast.state_dict().keys() == model.state_dict().keys()
    _same_output(model, fast)


def test_a_plan_that_did_not_know_the_blocks_leaves_the_levers_out_when_applied(hopper):
    """The door checks the model it converts: a recipe resolved without ``TrainRun.block`` still never swaps in a
    fused module that would compute the official block in place of the model's."""
    model = _model(**OPTIONS)
    plan = train_speed("fastest", TrainRun(GPU, torch.bfloat16))
    plan.speed = dataclasses.replace(plan.speed, bf16_residual=False)  # float32 on the CPU, as above
    fast = copy.deepcopy(model)
    applied = plan.apply(fast)
    assert sum("left out" in line for line in applied) == 5 and "left out fused_norm" in " ".join(plan.notes)
    assert not (plan.speed.fused_norm or plan.speed.fused_attention or plan.speed.fused_mlp)
    _same_output(model, fast)
    with pytest.raises(ValueError, match="TrainSpeed.fused_norm=True cannot serve this run: .*RMSNorm"):
        train_speed(TrainSpeed(fused_norm=True), TrainRun(CPU, None)).apply(_model(norm="rmsnorm"))


def test_the_converters_leave_modern_blocks_alone():
    from ditkit.fast.fused_attention import convert_to_fused_attention
    from ditkit.fast.fused_mlp import convert_to_fused_mlp
    from ditkit.fast.fused_norm import convert_to_fused_norm

    model = _model(**OPTIONS)
    assert convert_to_fused_norm(model) == convert_to_fused_attention(model) == convert_to_fused_mlp(model) == 0
    assert convert_to_fused_attention(_model(pos_embed="rope", norm="rmsnorm")) == 0
    assert convert_to_fused_norm(_model(mlp="swiglu", qk_norm=True)) == 3  # LayerNorm blocks: 2 blocks + final layer
