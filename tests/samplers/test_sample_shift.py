"""sample.shift: the shifted time grid of the flow samplers with a shift of its own (LightningDiT samples with a shift
its training draw did not use); none keeps objective.shift.  Checked against the grid written out by hand."""
import pytest
import torch

import ditkit
from ditkit.config import ConfigError, SampleConfig, load_config
from ditkit.objectives.flow import FlowMatching
from ditkit.sampling import generate
from tests.models.dit_cases import randomised


def _recorded_times(cfg: SampleConfig, objective: FlowMatching) -> list[float]:
    seen = []

    def model(x, t, **kw):
        seen.append(float(t[0]))
        return torch.zeros_like(x)

    generate(model, objective, torch.randn(1, 1, 2, 2), {}, cfg, progress=False)
    return seen


def test_the_sample_shift_moves_the_grid_and_none_keeps_the_objectives():
    objective = FlowMatching(shift=1.0)
    uniform = _recorded_times(SampleConfig(sampler="euler", steps=4, grid="shifted"), objective)
    shifted = _recorded_times(SampleConfig(sampler="euler", steps=4, grid="shifted", shift=3.0), objective)
    by_hand = [t / (3.0 - 2.0 * t) for t in (0.0, 0.25, 0.5, 0.75)]  # t' = t / (s − (s − 1) t)
    assert uniform == pytest.approx([objective.time_scale * t for t in (0.0, 0.25, 0.5, 0.75)])
    assert shifted == pytest.approx([objective.time_scale * t for t in by_hand])
    trained = _recorded_times(SampleConfig(sampler="euler", steps=4, grid="shifted"), FlowMatching(shift=3.0))
    assert trained == pytest.approx(shifted)


def test_a_shift_without_the_shifted_grid_or_not_positive_is_refused():
    with pytest.raises(ConfigError, match="set sample.grid=shifted too"):
        ditkit.load_config("digits", ["sample.shift=2.0"])
    with pytest.raises(ConfigError, match="sample.shift must be positive"):
        ditkit.load_config("digits", ["sample.grid=shifted", "sample.shift=0"])


def test_a_shifted_grid_is_refused_for_samplers_without_a_grid():
    """ddpm/ddim step through the model's T steps and dopri5 chooses its own: --grid/--shift would change nothing."""
    with pytest.raises(ConfigError, match="sample.sampler 'ddim' has no such grid"):
        load_config("digits", ["sample.grid=shifted"])
    with pytest.raises(ConfigError, match="sample.sampler 'dopri5' has no such grid .its steps are adaptive"):
        load_config("digits", ["objective.name=flow", "sample.sampler=dopri5", "sample.grid=shifted"])


def test_the_sample_line_names_the_grid_and_its_shift():
    from ditkit.generation import sampler_text

    flow = ["objective.name=flow", "sample.sampler=heun", "sample.steps=10", "sample.cfg_scale=1.5"]
    assert sampler_text(load_config("digits", flow)) == "heun, 10 steps, guidance 1.5"
    assert sampler_text(load_config("digits", [*flow, "sample.grid=shifted", "sample.shift=3.33"])) == \
        "heun, 10 steps, shifted grid (shift 3.33), guidance 1.5"
    assert "shifted grid (shift 2)" in sampler_text(load_config("digits", [*flow, "objective.shift=2", "sample.grid=shifted"]))


def test_ditkit_sample_takes_any_sample_setting():
    """ditkit.sample(..., grid=, shift=, guidance_interval=): the same samples as the settings put in the config."""
    cfg = load_config("digits", ["objective.name=flow", "sample.sampler=euler", "sample.steps=4", "model.hidden_size=32",
                                 "model.depth=1", "model.num_heads=2"])
    model = randomised(ditkit.build_model(cfg.model.name, **cfg.model.kwargs())).eval()  # a zero output would hide the grid
    by_call = ditkit.sample(model, cfg, labels=[1, 2], grid="shifted", shift=3.0, guidance_interval=(0.2, 0.8),
                            cfg_scale=2.0, speed="reference", progress=False)
    set_cfg = load_config("digits", ["objective.name=flow", "sample.sampler=euler", "sample.steps=4", "model.hidden_size=32",
                                     "model.depth=1", "model.num_heads=2", "sample.grid=shifted", "sample.shift=3.0",
                                     "sample.guidance_interval=[0.2,0.8]", "sample.cfg_scale=2.0"])
    by_config = ditkit.sample(model, set_cfg, labels=[1, 2], speed="reference", progress=False)
    plain = ditkit.sample(model, cfg, labels=[1, 2], cfg_scale=2.0, speed="reference", progress=False)
    assert torch.equal(by_call.x, by_config.x) and not torch.equal(by_call.x, plain.x)
    with pytest.raises(ConfigError, match="griid"):
        ditkit.sample(model, cfg, labels=[1], griid="shifted", progress=False)
