"""The command line: bad input gives one clear line and exit code 2, not a traceback."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ditkit.cli import main
from ditkit.config import load_config
from ditkit.training.trainer import train

TINY = ["model.hidden_size=32", "model.depth=1", "model.num_heads=2", "train.global_batch_size=16", "train.steps=1"]


def one_line_error(capsys, argv, match):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and match in err, err


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    train(load_config("digits", overrides=TINY), run, device="cpu")
    return run / "checkpoints" / "last.pt"


def test_unknown_model_lists_known_ones(capsys, tmp_path):
    one_line_error(capsys, ["train", "--preset", "digits", "--model", "DiT-M/2", "--run-dir", str(tmp_path)],
                   "unknown model 'DiT-M/2'; known models: DiT-XL/2")


def test_input_size_not_divisible(capsys, tmp_path):
    one_line_error(capsys, ["train", "--preset", "digits", "--set", "model.patch_size=3", "--run-dir", str(tmp_path)],
                   "input axis 0 (H) has size 8, not divisible by patch size 3")


def test_config_value_of_wrong_type(capsys, tmp_path):
    one_line_error(capsys, ["train", "--preset", "digits", "--set", "train.steps=many", "--run-dir", str(tmp_path)],
                   "train.steps must be int")


def test_label_out_of_range(capsys, tmp_path, ckpt):
    one_line_error(capsys, ["sample", "--ckpt", str(ckpt), "--out", str(tmp_path), "--labels", "3,12"],
                   "label 12 is out of range: the model has 10 classes")


def test_truncated_and_foreign_checkpoints(capsys, tmp_path, ckpt):
    cut = tmp_path / "cut.pt"
    cut.write_bytes(ckpt.read_bytes()[:1000])
    one_line_error(capsys, ["sample", "--ckpt", str(cut), "--out", str(tmp_path)], "cut.pt")
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    one_line_error(capsys, ["sample", "--ckpt", str(text), "--out", str(tmp_path)], "notes.pt")


def test_checkpoint_that_does_not_fit_names_keys(capsys, tmp_path, ckpt):
    data = torch.load(ckpt, weights_only=True)
    data["ema"]["extra.weight"] = torch.zeros(1)
    data["ema"]["pos_embed"] = torch.zeros(1, 3, 32)
    bad = tmp_path / "bad.pt"
    torch.save(data, bad)
    with pytest.raises(SystemExit):
        main(["sample", "--ckpt", str(bad), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert "extra.weight" in err and "pos_embed" in err


def test_sample_and_eval_end_to_end(tmp_path, ckpt):
    env_path = str(Path(__file__).parents[1] / "src")
    run = [sys.executable, "-m", "ditkit"]
    out = subprocess.run([*run, "sample", "--ckpt", str(ckpt), "--out", str(tmp_path), "--num-samples", "20",
                          "--steps", "2"], capture_output=True, text=True, env={"PYTHONPATH": env_path, "PATH": ""})
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "grid.png").exists() and (tmp_path / "samples.npz").exists()
    ev = subprocess.run([*run, "eval", "--samples", str(tmp_path / "samples.npz"), "--json", str(tmp_path / "m.json")],
                        capture_output=True, text=True, env={"PYTHONPATH": env_path, "PATH": ""})
    assert ev.returncode == 0 and "classifier agreement" in ev.stdout, ev.stderr[-2000:]
    assert (tmp_path / "m.json").exists()


def test_fp8_sampling_from_the_cli(tmp_path, ckpt, capsys):
    """--speed fp8+fp8_mlp converts the block linears (here emulated on the CPU) and samples as usual."""
    main(["sample", "--ckpt", str(ckpt), "--out", str(tmp_path), "--num-samples", "4", "--steps", "2", "--speed", "fp8+fp8_mlp"])
    out = capsys.readouterr().out
    assert "fp8: 4 block linears in float8_e4m3fn" in out and "static activation scales of 4 layers calibrated" in out
    import numpy as np

    assert np.load(tmp_path / "samples.npz")["samples"].shape[0] == 4


def test_a_named_recipe_on_the_cpu_says_it_samples_the_reference(tmp_path, ckpt, capsys):
    main(["sample", "--ckpt", str(ckpt), "--out", str(tmp_path), "--num-samples", "2", "--steps", "2", "--speed", "fastest"])
    assert "speed fastest: the fast levers need a CUDA GPU; sampling on cpu with the reference numerics" in capsys.readouterr().out


def test_bf16_sampling_from_the_cli_is_part_of_the_run_identity(tmp_path, ckpt, capsys):
    """The precision changes the samples, so a rerun into the same folder with another one is refused;
    compilation does not (a kernel choice), so it may change between reruns."""
    import numpy as np

    common = ["sample", "--ckpt", str(ckpt), "--out", str(tmp_path), "--num-samples", "4", "--steps", "2"]
    main([*common, "--speed", "amp_bf16"])
    bf16 = np.load(tmp_path / "samples.npz")["samples"]
    main([*common, "--speed", "amp_bf16+compile"])  # same identity: the parts are reused, nothing is compiled
    assert np.array_equal(np.load(tmp_path / "samples.npz")["samples"], bf16)
    capsys.readouterr()
    one_line_error(capsys, [*common, "--speed", "reference"], "differing: source")
    main(["sample", "--ckpt", str(ckpt), "--out", str(tmp_path / "fp32"), "--num-samples", "4", "--steps", "2"])
    fp32 = np.load(tmp_path / "fp32" / "samples.npz")["samples"]
    assert bf16.shape == fp32.shape and np.abs(bf16.astype(float) - fp32.astype(float)).mean() < 0.05 * np.abs(fp32).mean() + 1


def test_export_to_safetensors_and_diffusers_then_sample_from_it(tmp_path, ckpt):
    main(["export", "--ckpt", str(ckpt), "--to", "safetensors", "--out", str(tmp_path / "m.safetensors")])
    main(["export", "--ckpt", str(ckpt), "--to", "diffusers", "--out", str(tmp_path / "diffusers")])
    assert (tmp_path / "diffusers" / "config.json").exists()
    from ditkit.checkpoints import load_model

    a, _ = load_model(ckpt)
    for source in (tmp_path / "m.safetensors", tmp_path / "diffusers"):
        b, _ = load_model(source)
        for k, v in a.state_dict().items():
            assert torch.equal(v, b.state_dict()[k]), (source, k)


def test_official_train_py_checkpoint_samples_and_exports(tmp_path):
    import argparse

    import ditkit

    sd = ditkit.DiT_models["DiT-S/8"](input_size=16, num_classes=10).state_dict()  # heads inferred from width
    path = tmp_path / "0400000.pt"
    torch.save({"model": sd, "ema": sd, "opt": {}, "args": argparse.Namespace(model="DiT-custom")}, path)
    from ditkit.checkpoints import load_model

    model, cfg = load_model(path)
    assert cfg.sample.guided_channels == 3 and torch.equal(model.state_dict()["pos_embed"], sd["pos_embed"])
    main(["export", "--ckpt", str(path), "--to", "safetensors", "--out", str(tmp_path / "w.safetensors")])


def test_export_keeps_the_runs_objective(tmp_path):
    from ditkit.checkpoints import load_model

    run = tmp_path / "run"
    train(load_config("digits", overrides=[*TINY, "objective.name=flow", "sample.sampler=heun"]), run, device="cpu")
    main(["export", "--ckpt", str(run / "checkpoints" / "last.pt"), "--to", "safetensors",
          "--out", str(tmp_path / "f.safetensors")])
    _, cfg = load_model(tmp_path / "f.safetensors")
    assert (cfg.objective.name, cfg.sample.sampler, cfg.data.kind) == ("flow", "heun", "digits")


def test_version(capsys):
    import ditkit

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"ditkit {ditkit.__version__}"
