"""The one door for speed (ditkit.fast.recipes): which levers a recipe keeps for a run, and why it says
it left one out; explicit levers that cannot work are refused by name; old configs migrate."""
import copy
import dataclasses
from pathlib import Path

import pytest
import torch

from ditkit.config import ConfigError, load_config
from ditkit.fast import (
    SAMPLE_RECIPES,
    TRAIN_RECIPES,
    SampleSpeed,
    TrainRun,
    TrainSpeed,
    master_weights,
    recipes,
    sample_speed,
    train_speed,
)
from ditkit.fast.recipes import parse_levers, resolve_sample_speed
from ditkit.models.dit import DiT

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
CPU, GPU = torch.device("cpu"), torch.device("cuda")


@pytest.fixture
def hopper(monkeypatch):
    """A GPU with FP8 tensor cores, as far as the door can tell (no GPU is needed to resolve a recipe)."""
    monkeypatch.setattr(recipes, "fp8_tensor_cores", lambda device: device.type == "cuda")


def test_auto_is_reference_on_a_cpu_and_a_named_recipe_says_why():
    plan = train_speed("auto", TrainRun(CPU, None))
    assert plan.speed == TrainSpeed() and plan.notes == []
    plan = train_speed("fastest", TrainRun(CPU, torch.bfloat16))
    assert plan.speed == TrainSpeed()
    assert plan.notes == ["speed fastest: the fast levers need a CUDA GPU; this run is on cpu: training the reference "
                          "modules (named, fused_mlp+fused_attention+tuned_linear+fused_norm+bf16_residual run on a CPU "
                          "too)"]
    assert train_speed(recipes.CPU_LEVERS, TrainRun(CPU, torch.bfloat16)).speed.fused_norm  # and they do
    assert resolve_sample_speed("fast", CPU) == (SampleSpeed(), [
        "speed fast: the fast levers need a CUDA GPU; sampling on cpu with the reference numerics"])


def test_fastest_on_one_hopper_gpu_keeps_every_lever(hopper):
    plan = train_speed("auto", TrainRun(GPU, torch.bfloat16))
    assert plan.speed == TRAIN_RECIPES["fastest"] and plan.notes == [] and plan.cuda_graphs
    assert all(getattr(plan.speed, f) for f in ("fused_mlp", "fused_attention", "tuned_linear", "fused_norm",
                                                "bf16_residual", "master_weights", "compile_loss", "fp8_forward",
                                                "fp8_backward"))
    assert resolve_sample_speed("auto", GPU) == (SAMPLE_RECIPES["fastest"], [])


@pytest.mark.parametrize("run, left_out, why", [
    (TrainRun(GPU, None), {"bf16_residual", "master_weights", "fp8_forward", "fp8_backward"}, "bf16 arithmetic"),
    (TrainRun(GPU, torch.bfloat16, cross_attention=True), {"fp8_forward", "fp8_backward"}, "without cross-attention"),
])
def test_fastest_leaves_out_what_cannot_serve_the_run_one_line_each(hopper, run, left_out, why):
    plan = train_speed("fastest", run)
    kept = {f for f in ("compile_loss", "master_weights", "bf16_residual", "fp8_forward", "fp8_backward")
            if getattr(plan.speed, f)}
    assert not kept & left_out and plan.speed.fused_mlp and plan.speed.compile
    assert len(plan.notes) == len(left_out) and all(why in n for n in plan.notes), plan.notes
    assert {n.split("left out ")[1].split(":")[0] for n in plan.notes} == left_out


def test_a_gpu_without_fp8_tensor_cores_gets_fast_and_a_note(monkeypatch):
    monkeypatch.setattr(recipes, "fp8_tensor_cores", lambda device: False)
    plan = train_speed("fastest", TrainRun(GPU, torch.bfloat16))
    assert plan.speed == TRAIN_RECIPES["fast"]
    assert plan.notes == ["speed fastest: left out the FP8 products (this GPU has no FP8 tensor cores: compute capability < 8.9)"]
    s, notes = resolve_sample_speed("fastest", GPU)
    assert s == SAMPLE_RECIPES["fast"] and "no FP8 tensor cores" in notes[0]


@pytest.mark.parametrize("run", [TrainRun(GPU, torch.bfloat16, world_size=8, parallel="ddp"),
                                 TrainRun(GPU, torch.bfloat16, world_size=1, parallel="ddp"),
                                 TrainRun(GPU, torch.bfloat16, grad_accum=2)])
def test_fastest_keeps_every_lever_under_ddp_and_accumulation(hopper, run):
    plan = train_speed("fastest", run)
    assert plan.speed == TRAIN_RECIPES["fastest"] and plan.notes == [] and not plan.bf16_gather
    assert plan.ddp_comm_hook() is (None if run.parallel == "none" else master_weights.float32_allreduce_hook)


def test_under_ddp_a_step_with_cuda_graphs_gets_one_bucket_unless_asked(hopper):
    """DDP's bucket size: every gradient in one bucket when the step is compiled with CUDA graphs (dynamo cuts the
    step at every bucket), said in one line; a configured size wins; otherwise torch's 25 MiB, said nothing."""
    model = torch.nn.Linear(1024, 1024)  # 4 MiB of float32 weights and 4 KiB of bias
    plan = train_speed("fastest", TrainRun(GPU, torch.bfloat16, world_size=8, parallel="ddp"))
    mb, said = plan.ddp_bucket_mb(model, None)
    assert mb == 6.0 and "one bucket of 6 MiB" in said and "train.ddp_bucket_mb" in said
    assert plan.ddp_bucket_mb(model, 64.0) == (64.0, None)
    for speed, run in (("fast", TrainRun(GPU, torch.bfloat16, world_size=8, parallel="none")),
                       (TrainSpeed(compile=True), TrainRun(GPU, torch.bfloat16, world_size=8, parallel="ddp")),
                       ("reference", TrainRun(GPU, torch.bfloat16, world_size=8, parallel="ddp"))):
        assert train_speed(speed, run).ddp_bucket_mb(model, None) == (25.0, None)


def test_under_fsdp_master_weights_are_fsdps_mixed_precision_and_cuda_graphs_are_left_out(hopper):
    plan = train_speed("fastest", TrainRun(GPU, torch.bfloat16, world_size=8, parallel="fsdp"))
    assert plan.speed == dataclasses.replace(TRAIN_RECIPES["fastest"], cuda_graphs=False)
    assert plan.bf16_gather and plan.ddp_comm_hook() is None
    assert plan.optimizer(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), max_norm=0.0) is None  # torch's AdamW on shards
    assert len(plan.notes) == 2 and "cuda_graphs" in plan.notes[0] and "gathers the parameters into new memory" in plan.notes[0]
    assert plan.notes[1] == ("master_weights under FSDP: FSDP2's mixed precision serves them (float32 masters and "
                             "AdamW state sharded, bf16 all-gathers, gradients reduce-scattered in float32)")
    with pytest.raises(ValueError, match="cuda_graphs.*FSDP2 gathers"):
        train_speed(TrainSpeed(compile=True, cuda_graphs=True), TrainRun(GPU, torch.bfloat16, world_size=8, parallel="fsdp"))


def test_the_fsdp_note_stays_one_line_when_apply_resolves_again(hopper):
    """A plan resolved without the blocks' options resolves again when applied to a model that has them (RMSNorm,
    RoPE, QK-norm, SwiGLU): the lines it adds are the levers it leaves out, and the FSDP note is not repeated."""
    plan = train_speed("fastest", TrainRun(GPU, torch.bfloat16, world_size=8, parallel="fsdp"))
    plan.speed = dataclasses.replace(plan.speed, bf16_residual=False)  # float32 on the CPU
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10,
                pos_embed="rope", norm="rmsnorm", qk_norm=True, mlp="swiglu")
    applied = plan.apply(model)
    assert sum(n.startswith("master_weights under FSDP") for n in plan.notes) == 1, plan.notes
    assert not any(n.startswith("master_weights under FSDP") for n in applied), applied
    assert sum("left out" in n for n in applied) == 5 and plan.speed.master_weights and plan.bf16_gather


def test_explicit_levers_that_cannot_work_are_refused_by_name():
    with pytest.raises(ValueError, match="TrainSpeed.compile_loss=True .* needs compile=True"):
        train_speed(TrainSpeed(compile_loss=True), TrainRun(CPU, None))
    with pytest.raises(ValueError, match="fused_attention.*cuDNN"):
        train_speed(TrainSpeed(fused_attention=True, sdpa="flash"), TrainRun(CPU, None))
    with pytest.raises(ValueError, match="cudagraphs.*needs a CUDA GPU"):
        resolve_sample_speed(SampleSpeed(compile="cudagraphs"), CPU)
    with pytest.raises(ValueError, match="fp8_mlp=True works with fp8=True"):
        resolve_sample_speed(SampleSpeed(fp8_mlp=True), CPU)


def test_levers_joined_by_plus_are_the_config_spelling_of_an_ablation():
    assert parse_levers("fused_mlp+fused_norm", TrainSpeed) == TrainSpeed(fused_mlp=True, fused_norm=True)
    assert parse_levers("cuda_graphs", TrainSpeed) == TrainSpeed(compile=True, cuda_graphs=True)
    assert parse_levers("amp_bf16+fp8+fp8_mlp+cudagraphs", SampleSpeed) == SAMPLE_RECIPES["fastest"]
    with pytest.raises(ValueError, match="unknown speed lever 'fused_tail'"):
        parse_levers("fused_mlp+fused_tail", TrainSpeed)
    cfg = load_config("digits", overrides=["train.speed=fused_mlp+tuned_linear", "sample.speed=amp_bf16"])
    assert cfg.train.speed == "fused_mlp+tuned_linear"
    with pytest.raises(ConfigError, match="train.speed: unknown speed lever 'fast_as_possible'"):
        load_config("digits", overrides=["train.speed=fast_as_possible"])


def test_applying_a_recipe_keeps_the_state_dict_and_the_output():
    """Every module lever, applied through the door on the CPU (the fused modules compute with torch's ops):
    the same state dict and, in float32, the same output."""
    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=0.05)
    fast = copy.deepcopy(model)
    levers = TrainSpeed(fused_mlp=True, fused_attention=True, tuned_linear=True, fused_norm=True)
    plan = train_speed(levers, TrainRun(CPU, None, activation_checkpointing=True))
    applied = plan.apply(fast)
    assert applied == ["fused MLP (2)", "fused attention (2)", "tuned linears (14)", "fused norm (3)",
                       "activation checkpointing (2 blocks)"]
    assert {k: v.shape for k, v in fast.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 2])
    with torch.no_grad():
        ref, got = model.eval()(x, t, y), fast.eval()(x, t, y)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_the_bf16_residual_stream_survives_the_module_swaps():
    """The residual stream's cast must reach the blocks that run, whatever the other levers rebuild: under bf16
    autocast every block's input is bf16 with the fused norm and activation checkpointing too."""
    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=3, num_heads=4, num_classes=10)
    levers = TrainSpeed(fused_mlp=True, fused_attention=True, tuned_linear=True, fused_norm=True, bf16_residual=True)
    for checkpointing in (False, True):
        fast = copy.deepcopy(model).train()
        train_speed(levers, TrainRun(CPU, torch.bfloat16, activation_checkpointing=checkpointing)).apply(fast)
        seen = []
        fast.blocks[0].register_forward_hook(lambda m, args, out: seen.append(out.x.dtype if hasattr(out, "x") else out.dtype))
        fast.final_layer.register_forward_pre_hook(lambda m, args: seen.append(getattr(args[0], "x", args[0]).dtype))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast(torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 2]))
        assert seen == [torch.bfloat16, torch.bfloat16], (checkpointing, seen)


def test_sampling_door_converts_a_copy_and_calibrates_fp8():
    """Explicit FP8 levers on the CPU (emulated): the linears become FP8, the calibration run is called, the
    network still maps x_t to an output of the model's shape."""
    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10).eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 2])
    calls = []
    net, notes = sample_speed(model, SampleSpeed(fp8=True, fp8_mlp=True), CPU,
                              calibrate=lambda n: calls.append(n(x, t, y=y)))
    assert len(calls) == 1 and notes[0].startswith("fp8: 8 block linears in float8_e4m3fn")
    assert notes[1] == "fp8: static activation scales of 8 layers calibrated"
    assert net(x, t, y=y).shape == (2, 8, 8, 8)


@pytest.mark.parametrize("fixture, train_speed_, sample_speed_", [
    ("config_with_speed_keys_fastest.yaml", "fastest", "fast"),
    ("config_with_speed_keys_digits.yaml", "reference", "reference"),
])
def test_configs_written_with_one_key_per_lever_still_load(fixture, train_speed_, sample_speed_):
    """Configs (and so checkpoints) written before the speed recipes carry a key per lever: they load, as the
    recipe that ran what they asked for."""
    cfg = load_config(FIXTURES / fixture)
    assert (cfg.train.speed, cfg.sample.speed) == (train_speed_, sample_speed_)
