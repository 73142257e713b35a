"""Sampling into ADM .npz batches: reproducible per sample, split over ranks without duplicates or
gaps, and resumable after an interruption."""
import numpy as np
import pytest
import torch

from ditkit.config import load_config
from ditkit.models.dit import build_model
from ditkit.objectives import build_objective
from ditkit.sampling import merge_parts, sample_labels, sample_to_npz


@pytest.fixture(scope="module")
def setup():
    cfg = load_config("digits", overrides=["model.hidden_size=32", "model.depth=1", "model.num_heads=2",
                                           "sample.steps=3"])
    torch.manual_seed(0)
    model = build_model(cfg.model.name, **cfg.model.kwargs()).eval()
    for p in model.parameters():  # leave adaLN-Zero's all-zero output
        p.data.add_(0.05 * torch.randn_like(p))
    return model, build_objective(cfg), cfg


def test_two_ranks_equal_one_and_cover_every_index(tmp_path, setup):
    model, objective, cfg = setup
    one = sample_to_npz(model, objective, cfg, 10, tmp_path / "one", batch_size=4, progress=False)
    assert sample_to_npz(model, objective, cfg, 10, tmp_path / "two", batch_size=4, rank=1, world_size=2,
                         progress=False) is None  # only rank 0 merges
    two = sample_to_npz(model, objective, cfg, 10, tmp_path / "two", batch_size=4, rank=0, world_size=2, progress=False)
    a, b = np.load(one), np.load(two)
    assert a["arr_0"].shape == (10, 8, 8, 3) and a["arr_0"].dtype == np.uint8
    np.testing.assert_array_equal(a["arr_1"], np.arange(10) % 10)
    np.testing.assert_allclose(a["samples"], b["samples"], atol=1e-6)
    np.testing.assert_array_equal(a["labels"], a["arr_1"])


def test_interrupted_run_resumes_without_redoing_parts(tmp_path, setup):
    model, objective, cfg = setup
    full = np.load(sample_to_npz(model, objective, cfg, 12, tmp_path / "ref", batch_size=4, progress=False))
    out = tmp_path / "resumed"
    with pytest.raises(RuntimeError, match="2 sample parts are missing"):  # rank 0 of 3 alone: 1 of 3 parts
        sample_to_npz(model, objective, cfg, 12, out, batch_size=4, rank=0, world_size=3, progress=False)
    with pytest.raises(RuntimeError, match="2 sample parts are missing"):
        merge_parts(out, 12, 3)
    done = (out / "parts" / "part_000000.npz").stat().st_mtime_ns
    merged = np.load(sample_to_npz(model, objective, cfg, 12, out, batch_size=4, progress=False))
    assert (out / "parts" / "part_000000.npz").stat().st_mtime_ns == done
    np.testing.assert_allclose(merged["samples"], full["samples"], atol=1e-6)


def test_labels_modes():
    assert sample_labels(range(5), 3, "balanced", 0).tolist() == [0, 1, 2, 0, 1]
    assert sample_labels(range(4), 10, [7, 2], 0).tolist() == [7, 2, 7, 2]
    r = sample_labels(range(200), 10, "random", 0)
    assert r.min() >= 0 and r.max() < 10 and len(set(r.tolist())) == 10
    assert torch.equal(r[50:60], sample_labels(range(50, 60), 10, "random", 0))  # per-sample, not per-batch


def test_rerun_with_other_settings_is_refused(tmp_path, setup):
    model, objective, cfg = setup
    sample_to_npz(model, objective, cfg, 4, tmp_path, batch_size=4, progress=False)
    cfg2 = type(cfg)(**cfg.__dict__)
    cfg2.sample = type(cfg.sample)(**{**cfg.sample.__dict__, "cfg_scale": 6.0})
    with pytest.raises(ValueError, match="other settings"):
        sample_to_npz(model, objective, cfg2, 4, tmp_path, batch_size=4, progress=False)
    with pytest.raises(ValueError, match="other settings"):  # another seed would mix two noise streams
        sample_to_npz(model, objective, cfg, 4, tmp_path, batch_size=4, seed=1, progress=False)
    cfg3 = type(cfg)(**cfg.__dict__)
    cfg3.sample = type(cfg.sample)(**{**cfg.sample.__dict__, "speed": "fastest"})  # the caller's source names the levers
    sample_to_npz(model, objective, cfg3, 4, tmp_path, batch_size=4, progress=False)


def test_a_corrupt_or_wrong_part_is_named_deleted_and_sampled_again(tmp_path, setup, capsys):
    model, objective, cfg = setup
    full = np.load(sample_to_npz(model, objective, cfg, 12, tmp_path / "ref", batch_size=4, progress=False))
    out = tmp_path / "out"
    sample_to_npz(model, objective, cfg, 12, out, batch_size=4, progress=False)
    parts = out / "parts"
    torn = parts / "part_000001.npz"
    torn.write_bytes(torn.read_bytes()[:300])
    (parts / "part_000002.npz").write_bytes((parts / "part_000000.npz").read_bytes())  # samples 0..3, not 8..11
    stale = parts / ".part_000001.npz.k3j9x0q_.tmp"  # what a kill mid-write leaves
    stale.write_bytes(b"torn")
    done = (parts / "part_000000.npz").stat().st_mtime_ns
    capsys.readouterr()
    merged = np.load(sample_to_npz(model, objective, cfg, 12, out, batch_size=4, progress=False))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("sample part parts/part_000001.npz is corrupt (BadZipFile: ")
    assert lines[1] == ("sample part parts/part_000002.npz is corrupt (it holds samples 0..3, not 8..11); "
                        "deleting it and sampling it again")
    assert all(line.endswith("; deleting it and sampling it again") for line in lines) and len(lines) == 2
    assert not stale.exists() and (parts / "part_000000.npz").stat().st_mtime_ns == done
    np.testing.assert_allclose(merged["samples"], full["samples"], atol=1e-6)
    np.testing.assert_array_equal(merged["arr_0"], full["arr_0"])


def test_merge_names_a_corrupt_part_and_both_holders_of_a_sample(tmp_path, setup):
    model, objective, cfg = setup
    sample_to_npz(model, objective, cfg, 8, tmp_path, batch_size=4, progress=False)
    parts = tmp_path / "parts"
    good = (parts / "part_000001.npz").read_bytes()
    np.savez(parts / "part_000001.npz", index=np.arange(4, 8), arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    with pytest.raises(RuntimeError, match=r"part_000001\.npz is corrupt \(it has no arr_1 array\)"):
        merge_parts(tmp_path, 8, 2)
    (parts / "part_000001.npz").write_bytes(good[:len(good) // 2])
    with pytest.raises(RuntimeError, match=r"part_000001\.npz is corrupt \(BadZipFile"):
        merge_parts(tmp_path, 8, 2)
    (parts / "part_000001.npz").write_bytes((parts / "part_000000.npz").read_bytes())
    with pytest.raises(RuntimeError, match=r"sample 0 is held by both part_000000\.npz and part_000001\.npz"):
        merge_parts(tmp_path, 8, 2)
    (parts / "part_000001.npz").write_bytes(good)
    assert merge_parts(tmp_path, 8, 2) == tmp_path / "samples.npz"


@pytest.mark.parametrize("kwargs, message", [
    ({"num_samples": 0}, "--num-samples must be at least 1, got 0"),
    ({"batch_size": -2}, "--batch-size must be at least 1, got -2"),
    ({"cfg_scale": float("nan")}, "--cfg-scale must be a finite number, got nan"),
    ({"guidance_interval": [0.0, float("inf")]}, "--guidance-interval must be two finite noise levels, got [0.0, inf]"),
])
def test_requests_no_run_can_serve_are_refused_in_one_line(tmp_path, setup, kwargs, message):
    model, objective, cfg = setup
    guidance = {k: kwargs.pop(k) for k in ("cfg_scale", "guidance_interval") if k in kwargs}
    cfg2 = type(cfg)(**cfg.__dict__)
    cfg2.sample = type(cfg.sample)(**{**cfg.sample.__dict__, **guidance})
    args = {"num_samples": 4, "batch_size": 4, **kwargs}
    with pytest.raises(ValueError) as exc:
        sample_to_npz(model, objective, cfg2, out_dir=tmp_path, progress=False, **args)
    assert str(exc.value) == message
    assert not (tmp_path / "parts").exists()  # refused before anything was written


def test_an_unconditional_model_is_not_guided():
    """Guidance needs a condition to drop: without one, a scale other than 1 would evaluate the network twice per
    step for the same output."""
    from ditkit.config import SampleConfig
    from ditkit.models.dit import DiT
    from ditkit.objectives.flow import FlowMatching
    from ditkit.sampling import generate

    model = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=0,
                learn_sigma=False).eval()
    batches = []
    model.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    noise = torch.randn(2, 1, 8, 8)
    x2, nfe2 = generate(model, FlowMatching(), noise, {}, SampleConfig(sampler="euler", steps=3, cfg_scale=2.0), False)
    assert batches == [2, 2, 2]  # the batch as it is: no doubled batch for a guidance with nothing to drop
    x1, nfe1 = generate(model, FlowMatching(), noise, {}, SampleConfig(sampler="euler", steps=3, cfg_scale=1.0), False)
    assert nfe2 == nfe1 == 3 and torch.equal(x1, x2)
    batches.clear()
    y = torch.tensor([0, 0])
    conditional = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=2,
                      learn_sigma=False).eval()
    conditional.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    generate(conditional, FlowMatching(), noise, {"y": y}, SampleConfig(sampler="euler", steps=3, cfg_scale=2.0), False)
    assert batches == [4, 4, 4]  # a class-conditional model is guided: the doubled batch
