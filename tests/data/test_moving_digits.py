"""Clips of a handwritten digit moving at a constant velocity (``ditkit.data.moving_digits``,
``ditkit.eval.moving_digits``): the files ``data.kind=fields`` and ``data.params_file`` read, every clip inside its
canvas; the scorer against real clips of held-out digits (right, velocity exact) and against shuffled conditions
(wrong); and benchmarks/moving_digits.py end to end on the CPU."""
import csv
import json

import numpy as np
import pytest
from PIL import Image

from ditkit.data.digits import to_pixel_space
from ditkit.data.fields import read_params
from ditkit.data.moving_digits import (
    PARAM_NAMES,
    clip_params,
    compose_clips,
    draw_clips,
    max_speed,
    random_starts,
    write_moving_digits,
)
from ditkit.data.numbers import digit_pool
from ditkit.eval.digits import digit_split
from ditkit.eval.moving_digits import fit_velocities, score_clips
from ditkit.eval.numbers import split_digits, to_number_pixels
from tests.benchmark_scripts import load_benchmark


def real_clips(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels, velocities, starts = draw_clips(n, rng)
    return compose_clips(labels, velocities, starts, digit_pool(*split_digits("test")), rng), labels, velocities, starts


def test_writer_lays_out_clips_their_parameters_and_paths(tmp_path):
    images, classes = split_digits("train")
    meta = write_moving_digits(tmp_path, n=200, seed=3, digits=images, labels=classes)
    x = np.load(tmp_path / "x.npy")
    assert x.shape == (200, 1, 8, 16, 16) and x.dtype == np.float32 and x.min() == -1 and x.max() <= 1
    assert json.loads((tmp_path / "clips.json").read_text()) == meta and (meta["frames"], meta["size"]) == (8, 16)
    with open(tmp_path / "params.csv") as f:
        assert next(csv.reader(f)) == PARAM_NAMES == [*(f"c{d}" for d in range(10)), "vy", "vx"]
    params, names = read_params(tmp_path / "params.csv")
    labels = np.array([c["label"] for c in meta["clips"]])
    velocities = np.array([c["velocity"] for c in meta["clips"]])
    assert names == PARAM_NAMES and np.array_equal(params, clip_params(labels, velocities))
    assert set(map(tuple, velocities)) == {(a, b) for a in (-1, 0, 1) for b in (-1, 0, 1)}
    train = {a.tobytes() for a in digit_split()[0]}
    pixels = to_pixel_space(x[:, 0].astype(np.float64))  # (N, T, 16, 16) on 0..16
    for i, clip in enumerate(meta["clips"]):
        boxes = np.array(clip["start"]) + np.arange(8)[:, None] * np.array(clip["velocity"])  # (T, 2)
        assert boxes.min() >= 0 and boxes.max() <= 8  # inside the canvas in every frame
        digits = [pixels[i, t, y:y + 8, x_:x_ + 8] for t, (y, x_) in enumerate(boxes)]
        assert all(np.array_equal(d, digits[0]) for d in digits)  # the same digit, moved by whole pixels
        assert digits[0].reshape(64).tobytes() in train
        assert pixels[i].sum() == 8 * digits[0].sum()  # and nothing else on the canvas
    write_moving_digits(tmp_path / "again", 200, seed=3, digits=images, labels=classes)
    assert np.array_equal(x, np.load(tmp_path / "again" / "x.npy"))


def test_the_start_keeps_every_velocity_inside_and_too_fast_is_refused():
    assert max_speed(8, 16) == 1 and max_speed(5, 16) == 2
    rng = np.random.default_rng(0)
    v = np.repeat(np.array([[-2, 2], [2, -2], [0, 0]]), 300, axis=0)
    p = random_starts(v, rng, frames=5, size=16)
    ends = p + 4 * v
    assert p.min() == 0 and p.max() == 8 and ends.min() == 0 and ends.max() == 8
    with pytest.raises(ValueError, match="leaves the 16×16 canvas"):
        random_starts(np.array([[2, 0]]), rng)
    with pytest.raises(ValueError, match="needs size ≥ 15"):
        max_speed(8, 14)
    with pytest.raises(ValueError, match="clip 0 leaves the canvas in frame 7"):
        compose_clips(np.array([1]), np.array([[1, 0]]), np.array([[2, 0]]), digit_pool(*split_digits("test")), rng)


def test_real_clips_score_right_and_wrong_conditions_score_wrong():
    pixels, labels, velocities, _ = real_clips(400)
    right = score_clips(pixels, labels, velocities)
    assert right["frame_agreement"] >= 0.95 and right["clip_agreement"] >= 0.95 and right["right"] >= 0.95
    assert right["velocity_error"] < 1e-9 and right["velocity_within"] == 1.0 and right["path_residual"] < 1e-9
    # through model space, as samples come, and back to the 0..16 lattice: the same scores
    assert score_clips(to_number_pixels(pixels / 8 - 1)[:, None], labels, velocities) == right
    shuffle = np.random.default_rng(1).permutation(len(labels))
    wrong = score_clips(pixels, labels, velocities[shuffle])
    assert wrong["velocity_error"] > 0.6 and wrong["velocity_within"] < 0.25 and wrong["right"] < 0.25  # 8/9, 1/9
    assert wrong["frame_agreement"] == right["frame_agreement"]
    assert score_clips(pixels, labels[shuffle], velocities)["clip_agreement"] < 0.25
    assert score_clips(pixels, labels, -velocities)["velocity_within"] < 0.3  # backwards is wrong unless still


def test_fitted_velocity_is_the_least_squares_slope():
    t = np.arange(8.0)
    path = np.stack([2 + 0.5 * t, 9 - 1.25 * t], axis=1)[None]  # (1, 8, 2)
    v, residual = fit_velocities(path)
    np.testing.assert_allclose(v, [[0.5, -1.25]])
    assert residual[0] < 1e-12
    wobble = path + np.array([1, -1] * 4)[None, :, None] * 0.25
    assert fit_velocities(wobble)[1][0] > 0.2


def test_scorer_refuses_what_it_cannot_read():
    pixels, labels, velocities, _ = real_clips(3)
    with pytest.raises(ValueError, match="in \\[0, 16\\]"):
        score_clips(pixels / 8 - 1, labels, velocities)
    with pytest.raises(ValueError, match="3 clips need labels"):
        score_clips(pixels, labels[:2], velocities)
    with pytest.raises(ValueError, match=r"\(N, T, H, W\)"):
        score_clips(pixels[:, 0], labels, velocities)
    with pytest.raises(ValueError, match="both the digits and their labels"):
        write_moving_digits("unused", 4, digits=split_digits("test")[0])


def test_benchmark_writes_trains_samples_and_scores_on_the_cpu(tmp_path, capsys):
    bench = load_benchmark("moving_digits")
    common = ["--out", str(tmp_path), "--device", "cpu"]
    bench.main([*common, "data", "--num", "64"])
    bench.main([*common, "train", "--steps", "4", "--batch", "16", "--hidden", "32", "--depth", "1",
                "--set", "model.num_heads=2", "train.speed=reference"])
    rows = bench.main([*common, "score", "--per-condition", "1", "--cfg-scales", "1", "2", "--sample-steps", "2"])
    assert [r["cfg_scale"] for r in rows] == [1.0, 2.0] and all(0.0 <= r["right"] <= 1.0 for r in rows)
    assert all(0.0 <= r[k] <= 1.0 for r in rows for k in ("frame_agreement", "velocity_within"))
    assert rows[0]["num_clips"] == 90 and rows[0]["real_right"] >= 0.9 and rows[0]["chance_right"] < 0.2
    assert json.loads((tmp_path / "moving_digits.json").read_text()) == json.loads(json.dumps(rows))
    assert (tmp_path / "clips_cfg2.png").stat().st_size > 0
    with Image.open(tmp_path / "clips_cfg2.gif") as gif:
        assert gif.n_frames == 8
    assert "| guidance | sampler | NFE | right |" in capsys.readouterr().out
