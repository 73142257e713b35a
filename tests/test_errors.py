"""Every failure a user can cause or meet ends in one line ``ditkit: error: ...`` and a non-zero exit;
``ditkit --debug`` shows the exception instead, and a bug keeps its traceback."""
import errno
import re

import numpy as np
import pytest
import torch

from ditkit.cli import main
from ditkit.config import ConfigError
from ditkit.training import trainer
from ditkit.training.trainer import EXIT_PREEMPTED, EXIT_STOPPED, TrainingPreempted, TrainingStopped

TINY = ["--set", "model.hidden_size=32", "--set", "model.depth=1", "--set", "model.num_heads=2",
        "--set", "train.global_batch_size=4", "--set", "train.steps=1"]


def one_line(capsys, argv, code=2):
    """Runs ``ditkit argv``; checks the exit code and that stderr is one ``ditkit: error:`` line."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == code, err
    assert len(err.splitlines()) == 1 and err.startswith("ditkit: error: "), err
    return err.strip()


def train_argv(tmp_path, *sets, preset="digits"):
    return ["train", "--preset", preset, *TINY, *(a for s in sets for a in ("--set", s)),
            "--run-dir", str(tmp_path / "run")]


def fields_argv(tmp_path, x):
    """The fields preset on an 8×8 x array alone (no params, no conditioning field)."""
    np.save(tmp_path / "x.npy", x)
    return train_argv(tmp_path, f"data.path={tmp_path / 'x.npy'}", "data.params_file=null", "data.field_file=null",
                      "data.log_transform=[]", "model.name=custom", "model.patch_size=2", "model.input_size=8",
                      "model.num_params=0", "model.cond_channels=0", preset="fields64")


@pytest.fixture
def train_raises(monkeypatch):
    """``ditkit train`` whose training raises ``err`` (cmd_train imports ``train`` when it runs)."""
    def install(err):
        def fake_train(*args, **kwargs):
            raise err
        monkeypatch.setattr(trainer, "train", fake_train)
    return install


# -- config values ----------------------------------------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("train.lr=.inf", "train.lr must be a finite number, got inf"),
    ("train.lr=nan", "train.lr must be a finite number, got nan"),
    ("sample.cfg_scale=.nan", "sample.cfg_scale must be a finite number, got nan"),
    ("objective.shift=-.inf", "objective.shift must be a finite number, got -inf"),
    ("train.adam_betas=[0.9, .nan]", "train.adam_betas must be a finite number, got nan"),
    ("train.weight_decay=-0.1", "train.weight_decay must be non-negative"),
    ("train.grad_clip=-1", "train.grad_clip must be non-negative"),
    ("train.lr=0", "train.lr must be positive, got 0.0"),
])
def test_non_finite_and_out_of_range_config_values(capsys, tmp_path, override, message):
    assert message in one_line(capsys, train_argv(tmp_path, override))
    with pytest.raises(ConfigError, match=re.escape(message)):
        main(["--debug", *train_argv(tmp_path, override)])


def test_missing_preset_or_config(capsys, tmp_path):
    assert "give --preset NAME or --config FILE" in one_line(capsys, ["train", "--run-dir", str(tmp_path)])


# -- files and folders ------------------------------------------------------------------------------

def test_run_dir_that_is_a_file(capsys, tmp_path):
    (tmp_path / "run").write_text("not a folder")
    err = one_line(capsys, train_argv(tmp_path))
    assert err == f"ditkit: error: --run-dir {tmp_path / 'run'} is a file, not a folder; choose a folder for the run"


def test_eval_of_a_truncated_samples_file(capsys, tmp_path):
    np.savez(tmp_path / "s.npz", samples=np.zeros((4, 1, 8, 8), np.float32), labels=np.zeros(4, np.int64))
    (tmp_path / "cut.npz").write_bytes((tmp_path / "s.npz").read_bytes()[:400])
    err = one_line(capsys, ["eval", "--samples", str(tmp_path / "cut.npz")])
    assert f"{tmp_path / 'cut.npz'} is not an .npz file, or is truncated" in err


def test_eval_of_image_samples_without_weights(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("DITKIT_INCEPTION", raising=False)
    np.savez(tmp_path / "adm.npz", arr_0=np.zeros((4, 32, 32, 3), np.uint8))
    err = one_line(capsys, ["eval", "--samples", str(tmp_path / "adm.npz")])
    assert "adm.npz needs the FID InceptionV3" in err and "pt_inception-2015-12-05-6726825d.pth" in err
    np.savez(tmp_path / "big.npz", samples=np.zeros((4, 3, 32, 32), np.float32), labels=np.zeros(4))
    assert "big.npz holds no images to score" in one_line(capsys, ["eval", "--samples", str(tmp_path / "big.npz")])
    assert "holds no images (.png" in one_line(capsys, ["eval", "--samples", str(tmp_path)])


def test_eval_against_a_damaged_reference(capsys, tmp_path):
    np.savez(tmp_path / "s.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    (tmp_path / "ref.npz").write_bytes((tmp_path / "s.npz").read_bytes()[:500])
    err = one_line(capsys, ["eval", "--samples", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "ref.npz"),
                            "--inception", str(tmp_path / "unused.pth"), "--device", "cpu"])
    assert "ref.npz is not an .npz file, or is truncated" in err


def test_image_folder_with_no_readable_image(capsys, tmp_path):
    for k in range(3):
        (tmp_path / "imgs" / "a").mkdir(parents=True, exist_ok=True)
        (tmp_path / "imgs" / "a" / f"{k}.png").write_bytes(b"not a png")
    err = one_line(capsys, train_argv(tmp_path, "data.kind=images", f"data.path={tmp_path / 'imgs'}",
                                      "data.image_size=8", "model.in_channels=3", "train.global_batch_size=2"))
    assert f"no readable image in {tmp_path / 'imgs'}: 3 file(s) skipped as unreadable" in err


def test_field_data_with_nan(capsys, tmp_path):
    x = np.zeros((4, 2, 8, 8), np.float32)
    x[1, 1, :2] = np.nan
    err = one_line(capsys, fields_argv(tmp_path, x))
    assert f"x data {tmp_path / 'x.npy'} holds 16 NaN or inf values (first: {tmp_path / 'x.npy'}[1] channel 1" in err


def test_field_data_whose_statistics_overflow_float32(capsys, tmp_path):
    x = np.random.default_rng(0).normal(size=(4, 2, 8, 8)) * np.array([1.0, 1e300])[None, :, None, None]
    err = one_line(capsys, fields_argv(tmp_path, x))
    assert f"x data {tmp_path / 'x.npy'} channel 1: non-finite" in err and "values up to" in err


def test_missing_data_file(capsys, tmp_path):
    err = one_line(capsys, train_argv(tmp_path, "data.kind=images", f"data.path={tmp_path / 'nowhere'}"))
    assert f"image folder {tmp_path / 'nowhere'} does not exist" in err


# -- what the machine or the run says ---------------------------------------------------------------

def test_full_disk(capsys, tmp_path, train_raises):
    train_raises(OSError(errno.ENOSPC, f"no space left on the device writing {tmp_path}/last.pt "
                                       "(free some space or choose another folder)"))
    err = one_line(capsys, train_argv(tmp_path))
    assert err == (f"ditkit: error: no space left on the device writing {tmp_path}/last.pt "
                   "(free some space or choose another folder)")
    train_raises(OSError(errno.EDQUOT, "Disk quota exceeded", str(tmp_path / "x")))
    assert "no space left on the device (Disk quota exceeded: " in one_line(capsys, train_argv(tmp_path))


def test_system_errors_name_the_file(capsys, tmp_path, train_raises):
    train_raises(PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "locked")))
    assert one_line(capsys, train_argv(tmp_path)) == f"ditkit: error: Permission denied: {tmp_path / 'locked'}"
    train_raises(IsADirectoryError(errno.EISDIR, "Is a directory", str(tmp_path)))
    assert one_line(capsys, train_argv(tmp_path)) == f"ditkit: error: Is a directory: {tmp_path}"


def test_out_of_gpu_memory(capsys, tmp_path, train_raises):
    train_raises(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity "
                                        "of 79.19 GiB of which 1.10 GiB is free. Process 7 has 78 GiB in use.\nmore"))
    err = one_line(capsys, train_argv(tmp_path))
    assert err == ("ditkit: error: out of GPU memory (CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a "
                   "total capacity of 79.19 GiB of which 1.10 GiB is free); lower the batch: --set "
                   "train.global_batch_size=N or train.grad_accum=K for training, --batch-size for sampling")


def test_training_stopped(capsys, tmp_path, train_raises):
    train_raises(TrainingStopped("10 consecutive non-finite steps by step 40; the last good checkpoint is kept"))
    err = one_line(capsys, train_argv(tmp_path), code=EXIT_STOPPED)
    assert err == "ditkit: error: 10 consecutive non-finite steps by step 40; the last good checkpoint is kept"


def test_training_preempted(capsys, tmp_path, train_raises):
    message = (f"stopped by a signal at step 12, checkpointed at step 12 in {tmp_path}: run the same command "
               "with --resume to continue")  # what the trainer says
    train_raises(TrainingPreempted(message))
    assert one_line(capsys, train_argv(tmp_path), code=EXIT_PREEMPTED) == f"ditkit: error: {message}"
    train_raises(TrainingPreempted())
    err = one_line(capsys, train_argv(tmp_path), code=EXIT_PREEMPTED)
    assert err == "ditkit: error: checkpointed after a stop signal; run the same command with --resume to continue"


def test_ctrl_c_outside_training(capsys, tmp_path, train_raises):
    train_raises(KeyboardInterrupt())
    assert one_line(capsys, train_argv(tmp_path), code=130) == "ditkit: error: interrupted (Ctrl-C)"


# -- --debug and bugs -------------------------------------------------------------------------------

@pytest.mark.parametrize("err", [TrainingStopped("stop"), torch.OutOfMemoryError("CUDA out of memory."),
                                 OSError(errno.ENOSPC, "no space left"), KeyboardInterrupt(), ValueError("bad")])
def test_debug_shows_the_exception(capsys, tmp_path, train_raises, err):
    train_raises(err)
    with pytest.raises(type(err)):
        main(["--debug", *train_argv(tmp_path)])
    with pytest.raises(type(err)):  # also accepted after the command
        main([*train_argv(tmp_path), "--debug"])
    assert "ditkit: error" not in capsys.readouterr().err


def test_a_bug_keeps_its_traceback(capsys, tmp_path, train_raises):
    train_raises(RuntimeError("index out of range in self"))
    with pytest.raises(RuntimeError, match="index out of range"):
        main(train_argv(tmp_path))
    train_raises(OSError(errno.EIO, "Input/output error"))
    with pytest.raises(OSError):
        main(train_argv(tmp_path))
    assert "ditkit: error" not in capsys.readouterr().err


def test_export_with_an_id2label_file_that_is_not_json(capsys, tmp_path, monkeypatch):
    import ditkit.checkpoints

    monkeypatch.setattr(ditkit.checkpoints, "load_model", lambda *args, **kwargs: (None, None))
    (tmp_path / "labels.json").write_text("{0: 'cat'")
    err = one_line(capsys, ["export", "--ckpt", "unused.pt", "--out", str(tmp_path / "out"),
                            "--id2label", str(tmp_path / "labels.json")])
    assert f"--id2label {tmp_path / 'labels.json'} is not valid JSON" in err


# -- sampling a model of sequences ------------------------------------------------------------------

@pytest.fixture(scope="module")
def sequence_checkpoint(tmp_path_factory):
    """A one-step run on sequences of lengths 8 to 24 (patch 8) with one parameter per sequence."""
    root = tmp_path_factory.mktemp("seqs")
    (root / "seq").mkdir()
    rows = ["file,a"]
    for i, n in enumerate([8, 16, 24, 16, 8, 24]):
        np.save(root / "seq" / f"{i}.npy", np.random.default_rng(i).normal(size=(2, n)))
        rows.append(f"{i},{i / 2}")
    (root / "p.csv").write_text("\n".join(rows) + "\n")
    main(train_argv(root, f"data.path={root / 'seq'}", f"data.params_file={root / 'p.csv'}", "model.patch_size=8",
                    "model.num_classes=0", "data.num_workers=0", "train.log_to=none"))
    np.savez(root / "cond.npz", params=np.zeros((2, 1)))
    np.savez(root / "other.npz", p=np.zeros((2, 1)))
    (root / "empty.npz").write_bytes(b"")
    (root / "text.npz").write_text("not an archive\n")
    return root


@pytest.mark.parametrize("lengths, cond, message", [
    ("8,12", "cond.npz", "--lengths: 12 is not a multiple of the patch size 8"),
    ("8,32", "cond.npz", "--lengths: 32 is larger than the model's 24 (model.input_size)"),
    ("0,8", "cond.npz", "--lengths: 0 must be positive"),
    ("8x8,8", "cond.npz", "--lengths: 8x8 has 2 axes; this model's samples have 1 (L), e.g. 24"),
    ("abc", "cond.npz", "--lengths 'abc': give lengths or sizes as integers"),
    ("8,16", None, "is conditioned on 1 parameters: give params (N, 1) in the data's units, one row per sample "
                   "(ditkit sample: --cond FILE.npz holding 'params')"),
    ("8,16", "other.npz", "other.npz has no 'params' array (it has: p)"),
    ("8,16", "empty.npz", "empty.npz is corrupt or truncated"),
    ("8,16", "text.npz", "text.npz is not an .npz file"),
    ("8,16", "missing.npz", "missing.npz does not exist"),
])
def test_sampling_sequences_names_the_bad_length_or_file(capsys, sequence_checkpoint, lengths, cond, message):
    root = sequence_checkpoint
    argv = ["sample", "--ckpt", str(root / "run" / "checkpoints" / "last.pt"), "--out", str(root / "out"),
            "--lengths", lengths, "--device", "cpu", *(["--cond", str(root / cond)] if cond else [])]
    assert message in one_line(capsys, argv)


def test_sampling_sequences_refuses_a_number_of_samples(capsys, sequence_checkpoint):
    root = sequence_checkpoint
    argv = ["sample", "--ckpt", str(root / "run" / "checkpoints" / "last.pt"), "--out", str(root / "out"),
            "--lengths", "8,16", "--num-samples", "4", "--device", "cpu", "--cond", str(root / "cond.npz")]
    assert "--num-samples does not apply with --lengths" in one_line(capsys, argv)


def test_a_token_narrower_than_its_patch_is_named(tmp_path, caplog):
    """64 values per patch (one channel, 8×8) into tokens of width 32: a warning at start-up."""
    main(train_argv(tmp_path, "model.patch_size=8", "data.num_workers=0", "train.log_to=none"))
    assert "model.hidden_size=32 is narrower than one patch's 64 values (1 channels × patch 8×8)" in caplog.text
