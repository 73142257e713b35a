"""From a checkpoint to samples, refusing what would make wrong ones: a rerun into a folder whose
parts came from another model (same file name, other content), and inputs no run can serve (no
samples, NaN or inf guidance or conditions), each in one line naming the option and value."""
import hashlib
import json
import shutil

import numpy as np
import pytest
import torch

from ditkit.checkpoints import load_model
from ditkit.checkpoints.training import load_checkpoint, save_checkpoint
from ditkit.cli import main
from ditkit.config import load_config
from ditkit.generation import sample, sample_checkpoint
from ditkit.sampling import check_finite
from ditkit.training.trainer import train
from ditkit.utils.io import content_sha256

TINY = ["model.hidden_size=32", "model.depth=1", "model.num_heads=2", "train.global_batch_size=16", "train.steps=1"]
FEW = {"steps": 2}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    run = tmp_path_factory.mktemp("digits")
    train(load_config("digits", overrides=TINY), run, device="cpu")
    return run / "checkpoints" / "last.pt"


@pytest.fixture(scope="module")
def fields_ckpt(tmp_path_factory):
    """A field model (parameters and a conditioning field) at toy size, and its benchmark folder."""
    from tests.training.test_trainer import tiny_fields_run

    root = tmp_path_factory.mktemp("fields")
    b = tiny_fields_run(root, "train.steps=1")
    return root / "run" / "checkpoints" / "last.pt", b


def test_a_checkpoint_replaced_by_another_model_is_refused(tmp_path, ckpt):
    model_file = tmp_path / "model.pt"
    shutil.copy(ckpt, model_file)
    out = tmp_path / "out"
    sample_checkpoint(model_file, out, num_samples=2, batch_size=2, settings=FEW, device="cpu")
    source = json.loads((out / "parts" / "settings.json").read_text())["source"]
    assert f"sha256={hashlib.sha256(model_file.read_bytes()).hexdigest()}" in source
    sample_checkpoint(model_file, out, num_samples=2, batch_size=2, settings=FEW, device="cpu")  # same file: resumes
    other = load_checkpoint(ckpt)
    other["ema"] = {k: v + 0.01 for k, v in other["ema"].items()}
    shutil.copy(save_checkpoint(other, tmp_path / "other", 1, keep_last=1), model_file)
    with pytest.raises(ValueError, match="holds samples made with other settings .*differing: source"):
        sample_checkpoint(model_file, out, num_samples=2, batch_size=2, settings=FEW, device="cpu")


def test_content_hash_of_a_file_and_of_a_folder(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    (tmp_path / "m" / "w.bin").write_bytes(b"\x00" * 100)
    assert content_sha256(tmp_path / "m" / "w.bin") == hashlib.sha256(b"\x00" * 100).hexdigest()
    before = content_sha256(tmp_path / "m")
    (tmp_path / "m" / "w.bin").write_bytes(b"\x00" * 99 + b"\x01")
    changed = content_sha256(tmp_path / "m")
    (tmp_path / "m" / "w.bin").rename(tmp_path / "m" / "v.bin")
    assert len({before, changed, content_sha256(tmp_path / "m")}) == 3


@pytest.mark.parametrize("argv, message", [
    (["--num-samples", "0"], "--num-samples must be at least 1, got 0"),
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--cfg-scale", "nan"], "--cfg-scale must be a finite number, got nan"),
    (["--guidance-interval", "0", "inf"], "--guidance-interval must be two finite noise levels, got [0.0, inf]"),
])
def test_bad_options_are_refused_before_the_checkpoint_is_read(capsys, tmp_path, argv, message):
    with pytest.raises(SystemExit) as exc:
        main(["sample", "--ckpt", str(tmp_path / "not_read.pt"), "--out", str(tmp_path / "out"), *argv])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and err == f"ditkit: error: {message}"


def test_non_finite_conditions_in_the_cond_file_are_named(tmp_path, fields_ckpt):
    path, b = fields_ckpt
    params = np.loadtxt(b / "params.csv", delimiter=",", skiprows=1)[:4]
    params[2, 0] = np.nan
    params[0, :] = np.inf
    field = np.load(b / "field.npy")[:4]
    cond = tmp_path / "cond.npz"
    np.savez(cond, params=params, field=field)
    with pytest.raises(ValueError) as exc:
        sample_checkpoint(path, tmp_path / "out", cond=str(cond), device="cpu")
    assert str(exc.value) == f"{cond}: 'params' holds {params.shape[1] + 1} non-finite values (rows 0, 2)"
    field[3, 0, 1, 1] = np.nan
    np.savez(cond, params=np.nan_to_num(params), field=field)
    with pytest.raises(ValueError, match=r"cond\.npz: 'field' holds 1 non-finite value \(row 3\)"):
        sample_checkpoint(path, tmp_path / "out", cond=str(cond), device="cpu")


def test_ditkit_sample_refuses_non_finite_inputs(ckpt, fields_ckpt):
    field_model, field_cfg = load_model(fields_ckpt[0])
    params = torch.zeros(2, field_cfg.model.num_params)
    field = torch.zeros(2, field_cfg.model.cond_channels, 8, 8)
    kw = {"speed": "reference", "progress": False}
    assert sample(field_model, field_cfg, params=params, field=field, **kw).x.shape == (2, 2, 8, 8)
    params[1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"^params holds 1 non-finite value \(row 1\)$"):
        sample(field_model, field_cfg, params=params, field=field, **kw)
    field[0, 0, 0, 0] = float("-inf")
    with pytest.raises(ValueError, match=r"^field holds 1 non-finite value \(row 0\)$"):
        sample(field_model, field_cfg, params=params.nan_to_num(), field=field, **kw)
    model, cfg = load_model(ckpt)
    with pytest.raises(ValueError, match=r"^cfg_scale must be a finite number, got inf$"):
        sample(model, cfg, num_samples=2, cfg_scale=float("inf"), **kw)
    with pytest.raises(ValueError, match=r"^num_samples must be at least 1, got 0$"):
        sample(model, cfg, num_samples=0, **kw)


def test_check_finite_lists_the_first_rows():
    check_finite("x", torch.ones(3, 2))
    x = torch.zeros(6, 2)
    x[[0, 1, 3, 5], 1] = float("nan")
    with pytest.raises(ValueError, match=r"^x holds 4 non-finite values \(rows 0, 1, 3, \.\.\.\)$"):
        check_finite("x", x)
    with pytest.raises(ValueError, match=r"^s holds 1 non-finite value \(row 0\)$"):
        check_finite("s", torch.tensor(float("nan")))


def test_official_weights_sample_with_the_official_guidance_and_say_so(tmp_path, capsys):
    """Weights without a run config take the official sample.py's guidance 4.0 (on 3 channels), and
    `ditkit sample` prints where the scale came from; --cfg-scale overrides it silently."""
    import ditkit

    torch.manual_seed(0)
    torch.save(ditkit.DiT_models["DiT-S/8"](input_size=8, num_classes=10, in_channels=3).state_dict(), tmp_path / "dit.pt")
    model, cfg = ditkit.load_model(tmp_path / "dit.pt", device="cpu")
    assert (cfg.sample.cfg_scale, cfg.sample.guided_channels) == (4.0, 3)
    common = ["sample", "--ckpt", str(tmp_path / "dit.pt"), "--num-samples", "2", "--steps", "2", "--batch-size", "2"]
    main([*common, "--out", str(tmp_path / "a")])
    assert "guidance scale 4: the official sample.py's default" in capsys.readouterr().out
    main([*common, "--out", str(tmp_path / "b"), "--cfg-scale", "1.5"])
    out = capsys.readouterr().out
    assert "guidance scale" not in out and "guidance 1.5" in out
