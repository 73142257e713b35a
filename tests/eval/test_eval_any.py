"""``ditkit eval`` on samples of any kind: a folder of PNGs and an .npz of another size scored by a
randomly initialised InceptionV3 of the real architecture, the one line that names the missing weights,
and the digits scorer chosen by looking at the samples (and only then)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from ditkit.cli import main
from ditkit.eval import evaluate as ev
from ditkit.eval.digits import digit_split, evaluate_digits, is_digit_samples
from ditkit.eval.inception import WEIGHTS_ENV, WEIGHTS_FILE, WEIGHTS_URL
from ditkit.eval.scoring import choose_scorer, score
from ditkit.utils.images import to_uint8

from .test_evaluate import fake_activations


def write_pngs(folder, images):
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    return folder


def one_line(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("ditkit: error: "), err
    return err


def run_eval(capsys, tmp_path, *argv):
    main(["eval", *argv, "--json", str(tmp_path / "out.json"), "--device", "cpu"])
    return capsys.readouterr().out, json.loads((tmp_path / "out.json").read_text())


def test_png_folder_and_npz_of_another_size_with_a_random_inception(tmp_path, weights_file, capsys):
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 256, size=(5, 24, 20, 3), dtype=np.uint8)
    folder = write_pngs(tmp_path / "ref", ref)
    np.savez(tmp_path / "ref.npz", arr_0=ref)  # the same images as the folder
    other = rng.integers(0, 256, size=(6, 40, 48, 3), dtype=np.uint8)
    np.savez(tmp_path / "samples.npz", arr_0=other, arr_1=np.arange(6))  # a ditkit/ADM sample batch of another size

    out, scores = run_eval(capsys, tmp_path, "--samples", str(tmp_path / "samples.npz"), "--ref", str(folder),
                           "--inception", str(weights_file))
    assert scores["scorer"] == "inception" and (scores["num_samples"], scores["num_reference"]) == (6, 5)
    assert all(np.isfinite(scores[k]) for k in ("fid", "sfid", "inception_score", "precision", "recall"))
    assert scores["fid"] > 0 and "FID" in out

    # The PNG folder against the same images in an .npz: one set twice, read through both formats; its
    # distances to itself are five orders of magnitude under those between different sets.
    _, same = run_eval(capsys, tmp_path, "--samples", str(folder), "--ref", str(tmp_path / "ref.npz"),
                       "--inception", str(weights_file))
    for metric in ("fid", "sfid"):
        assert same[metric] == pytest.approx(0, abs=1e-5 * scores[metric])
    assert (same["precision"], same["recall"]) == (1.0, 1.0)


def test_missing_weights_name_the_file_to_download(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    folder = write_pngs(tmp_path / "imgs", np.zeros((4, 16, 16, 3), np.uint8))
    np.savez(tmp_path / "adm.npz", arr_0=np.zeros((4, 32, 32, 3), np.uint8))
    for argv in (["--samples", str(folder)], ["--samples", str(tmp_path / "adm.npz"), "--ref", str(folder)]):
        err = one_line(capsys, ["eval", *argv])
        assert f"download {WEIGHTS_FILE}" in err and WEIGHTS_URL in err and "--inception PATH" in err, err
        assert f"{WEIGHTS_ENV}=PATH" in err
    err = one_line(capsys, ["eval", "--samples", str(folder), "--inception", str(tmp_path / "none.pth")])
    assert f"InceptionV3 weights not found at {tmp_path / 'none.pth'}: download {WEIGHTS_FILE}" in err


def test_weights_from_the_environment_and_no_reference(tmp_path, monkeypatch):
    loaded = []
    monkeypatch.setattr(ev, "load_inception", lambda path, device: loaded.append(path))
    monkeypatch.setattr(ev, "compute_activations", fake_activations)
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "w.pth"))
    images = np.random.default_rng(0).integers(0, 256, size=(6, 16, 16, 3), dtype=np.uint8)
    r = score(write_pngs(tmp_path / "imgs", images))
    assert loaded == [str(tmp_path / "w.pth")] and r["scorer"] == "inception"
    assert r["inception_score"] == pytest.approx(ev.inception_score(fake_activations(None, ev.open_images(images), 64, None, None)["probs"]))
    assert r["fid"] is None and r["precision"] is None and r["reference"] is None
    assert any("no reference was given" in note for note in r["notes"])


@pytest.fixture
def digits_run(tmp_path):
    """Held-out real digits written as a digits run writes its samples: x = v/8 − 1, raw and as images."""
    _, pixels, _, labels = digit_split()
    x = torch.from_numpy(pixels / 8 - 1).float().reshape(-1, 1, 8, 8)
    np.savez(tmp_path / "run.npz", arr_0=to_uint8(x), arr_1=labels, samples=x.numpy(), labels=labels)
    np.savez(tmp_path / "images.npz", arr_0=to_uint8(x), arr_1=labels)  # the images alone
    return tmp_path, pixels, labels


def test_digits_are_detected_and_scored_as_before(digits_run, capsys):
    tmp, pixels, labels = digits_run
    expected = evaluate_digits(pixels, labels)  # the real pixels themselves, no file in between
    for name in ("run.npz", "images.npz"):
        out, scores = run_eval(capsys, tmp, "--samples", str(tmp / name))
        assert scores == {"scorer": "digits", **expected} and out.startswith(f"digits: {len(pixels)} samples")
    np.savez(tmp / "flat.npz", samples=pixels.reshape(-1, 64) / 8 - 1, labels=labels)  # not detected: forced
    assert run_eval(capsys, tmp, "--samples", str(tmp / "flat.npz"), "--metric", "digits")[1]["digits_fd"] == expected["digits_fd"]


def test_digits_only_when_the_samples_are_digits(digits_run, tmp_path):
    tmp, _, labels = digits_run
    n = len(labels)
    not_digits = {
        "no_labels.npz": {"samples": np.zeros((n, 1, 8, 8), np.float32)},
        "rgb.npz": {"samples": np.zeros((n, 3, 32, 32), np.float32), "labels": labels},
        "images_no_labels.npz": {"arr_0": np.zeros((n, 8, 8, 3), np.uint8)},
        "float_images.npz": {"arr_0": np.zeros((n, 8, 8, 3), np.float32), "arr_1": labels},
        "big_images.npz": {"arr_0": np.zeros((n, 16, 16, 3), np.uint8), "arr_1": labels},
    }
    for name, arrays in not_digits.items():
        np.savez(tmp / name, **arrays)
        assert not is_digit_samples(tmp / name), name
    folder = write_pngs(tmp / "eights", np.zeros((4, 8, 8, 3), np.uint8))  # 8×8 PNGs carry no labels
    assert not is_digit_samples(folder) and choose_scorer(folder) == "inception"
    assert is_digit_samples(tmp / "run.npz") and choose_scorer(tmp / "run.npz") == "digits"
    assert choose_scorer(tmp / "run.npz", reference=folder) == "inception"  # a reference asks for FID
    assert choose_scorer(tmp / "run.npz", metric="inception") == "inception"
    with pytest.raises(ValueError, match="leave out --ref"):
        choose_scorer(tmp / "run.npz", reference=folder, metric="digits")
