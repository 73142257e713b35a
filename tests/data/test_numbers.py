"""Numbers of handwritten digits from their token sequences (``ditkit.data.numbers``, ``ditkit.eval.numbers``): the
files ``data.kind=fields`` and ``data.context_path`` read; the scorer against real numbers of held-out digits (right)
and against shuffled asked numbers (chance); and benchmarks/digit_numbers.py end to end on the CPU."""
import json

import numpy as np
import pytest

from ditkit.data.digits import to_pixel_space
from ditkit.data.numbers import compose_numbers, digit_pool, draw_numbers, number_tokens, write_numbers
from ditkit.eval.digits import digit_split
from ditkit.eval.numbers import BLANK_MEAN, score_numbers, split_digits, to_number_pixels
from tests.benchmark_scripts import load_benchmark


def real_numbers(n: int, seed: int = 0) -> tuple[np.ndarray, list[list[int]]]:
    rng = np.random.default_rng(seed)
    numbers = draw_numbers(n, rng)
    return compose_numbers(numbers, digit_pool(*split_digits("test")), rng), numbers


def test_writer_lays_out_images_and_their_token_sequences(tmp_path):
    numbers = write_numbers(tmp_path, n=120, seed=3, digits=split_digits("train"))
    x = np.load(tmp_path / "x.npy")
    assert x.shape == (120, 1, 8, 24) and x.dtype == np.float32 and x.min() >= -1 and x.max() <= 1
    assert json.loads((tmp_path / "numbers.json").read_text())["numbers"] == numbers
    assert sorted({len(n) for n in numbers}) == [1, 2, 3]
    train = {a.tobytes() for a in digit_split()[0]}  # every slot is a real training digit or blank
    for i in (0, 7, 119):
        ctx = np.load(tmp_path / "context" / f"{i:03d}.npy")
        assert ctx.shape == (len(numbers[i]), 10) and (ctx.argmax(1) == numbers[i]).all() and ctx.sum() == len(ctx)
        slots = to_pixel_space(x[i, 0]).reshape(8, 3, 8).transpose(1, 0, 2)
        for j, slot in enumerate(slots):
            if j < len(numbers[i]):
                assert slot.reshape(64).astype(np.float64).tobytes() in train
            else:
                assert (slot == 0).all()
    write_numbers(tmp_path / "again", 120, seed=3, digits=split_digits("train"))
    assert np.array_equal(x, np.load(tmp_path / "again" / "x.npy"))


def test_real_numbers_score_right_and_shuffled_ones_near_chance():
    pixels, numbers = real_numbers(600)
    right = score_numbers(pixels, numbers)
    assert right["exact"] >= 0.97 and right["digit_accuracy"] >= 0.98 and right["blank_accuracy"] == 1.0
    assert set(right["exact_by_length"]) == {1, 2, 3} and min(right["exact_by_length"].values()) >= 0.95
    # the same images through model space and back to the 0..16 lattice score the same
    assert score_numbers(to_number_pixels(pixels / 8 - 1)[:, None], numbers) == right
    shuffled = [numbers[i] for i in np.random.default_rng(1).permutation(len(numbers))]
    assert score_numbers(pixels, shuffled)["exact"] < 0.05  # chance: Σ_k P(k)² 10^-k = 0.012
    # a right digit in the wrong place, or one slot too many or too few, is wrong
    assert score_numbers(pixels, [n[::-1] if len(set(n)) > 1 else n for n in numbers])["exact"] < 0.5
    assert score_numbers(pixels, [n + [0] if len(n) < 3 else n[:2] for n in numbers])["exact"] == 0.0


def test_blank_threshold_sits_between_noise_and_the_dimmest_real_digit():
    x_train, x_test, _, _ = digit_split()
    assert np.concatenate([x_train, x_test]).mean(1).min() > 2.5 * BLANK_MEAN
    noise = to_number_pixels(np.random.default_rng(0).normal(-1.0, 1 / 8, (500, 8, 24)))  # σ = 1 level around 0
    assert score_numbers(noise, [[1]] * 500)["blank_accuracy"] == 1.0


def test_scorer_refuses_what_it_cannot_read():
    pixels, numbers = real_numbers(4)
    with pytest.raises(ValueError, match="in \\[0, 16\\]"):
        score_numbers(pixels / 8 - 1, numbers)
    with pytest.raises(ValueError, match="4 images but 3 asked"):
        score_numbers(pixels, numbers[:3])
    with pytest.raises(ValueError, match="expected 1 to 3 digits"):
        score_numbers(pixels, [[1, 2, 3, 4]] * 4)
    with pytest.raises(ValueError, match=r"\(N, 8, 8·S\)"):
        score_numbers(pixels[:, :, :20], numbers)
    assert number_tokens([4, 7]).tolist() == np.eye(10)[[4, 7]].tolist()
    images, labels = split_digits("train")
    with pytest.raises(ValueError, match="no image of class 3"):
        digit_pool(images[labels != 3], labels[labels != 3])


def test_benchmark_writes_trains_samples_and_scores_on_the_cpu(tmp_path, capsys):
    bench = load_benchmark("digit_numbers")
    common = ["--out", str(tmp_path), "--device", "cpu"]
    bench.main([*common, "data", "--num", "64"])
    bench.main([*common, "train", "--steps", "4", "--batch", "16", "--hidden", "32", "--depth", "1",
                "--set", "model.patch_size=4", "model.num_heads=2", "train.speed=reference"])
    rows = bench.main([*common, "score", "--per-length", "3", "--cfg-scales", "1", "2", "--sample-steps", "2"])
    assert [r["cfg_scale"] for r in rows] == [1.0, 2.0] and all(0.0 <= r["exact"] <= 1.0 for r in rows)
    assert rows[0]["num_samples"] == 9 and rows[0]["real_exact"] >= 2 / 3
    assert json.loads((tmp_path / "digit_numbers.json").read_text()) == json.loads(json.dumps(rows))
    assert (tmp_path / "samples_cfg2.png").stat().st_size > 0
    assert "| guidance | sampler | NFE | right |" in capsys.readouterr().out
