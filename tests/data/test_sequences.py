"""Sequences of mixed lengths from a folder of .npy files: the collate pads and masks, the data sizes the model,
and `ditkit.train` runs, resumes exactly and samples back in the data's units."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import ditkit
from ditkit.checkpoints.training import load_checkpoint
from ditkit.cli import main
from ditkit.config import ConfigError
from ditkit.data import build_dataset
from ditkit.data.facts import fit_to_data
from ditkit.data.sampler import ShardBatchSampler
from ditkit.data.sequences import pad_batch
from ditkit.generation import sample_sequences
from tests.data.resume import assert_resumes_exactly

P = 4
TINY = ["model.name=custom", f"model.patch_size={P}", "model.hidden_size=32", "model.depth=2", "model.num_heads=2",
        "train.global_batch_size=8", "train.log_every=1", "train.ckpt_every=3", "train.warmup_steps=2",
        "train.ema_decay=0.9", "train.log_to=none", "train.sample_every=3", "sample.steps=4"]


def make_folder(root: Path, n: int = 24, channels: int = 2) -> list[np.ndarray]:
    """Two class folders of sequences of lengths 8..40 (multiples of the patch), channel c around 10^c."""
    rng = np.random.default_rng(0)
    seqs = []
    for i in range(n):
        a = rng.normal(size=(channels, int(rng.integers(2, 11)) * P)) * [[1.0], [3.0]] + [[1.0], [10.0]]
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        np.save(root / f"c{i % 2}" / f"{i:03d}.npy", a)
        seqs.append(a)
    return seqs


def config(path: Path, *extra: str):
    return ditkit.load_config("digits", [*TINY, "data.kind=sequences", f"data.path={path}", *extra])


def test_collate_pads_to_the_longest_rounded_to_the_patch_and_masks():
    items = [{"x": torch.full((2, n), float(n)), "y": torch.tensor(n)} for n in (8, 10, 4)]
    batch = pad_batch(items, P)
    assert batch["x"].shape == (3, 2, 12) and batch["mask"].shape == (3, 12)
    assert batch["mask"].sum(1).tolist() == [8, 10, 4] and batch["y"].tolist() == [8, 10, 4]
    for i, n in enumerate((8, 10, 4)):
        assert (batch["x"][i, :, :n] == n).all() and (batch["x"][i, :, n:] == 0).all()
        assert batch["mask"][i, :n].all() and not batch["mask"][i, n:].any()
    same = pad_batch([{"x": torch.ones(2, 8), "y": torch.tensor(0)}] * 3, P)
    assert "mask" not in same and same["x"].shape == (3, 2, 8)  # nothing padded: attention gets no mask


def test_the_data_sizes_the_model_and_a_contradicting_value_is_refused(tmp_path):
    seqs = make_folder(tmp_path / "seq")
    longest = max(a.shape[1] for a in seqs)
    cfg, notes = fit_to_data(config(tmp_path / "seq"))
    assert cfg.model.input_size == [longest] and cfg.model.in_channels == 2 and cfg.model.num_classes == 2
    assert cfg.data.class_names == ["c0", "c1"] and any("model.input_size" in n for n in notes)
    with pytest.raises(ConfigError, match=rf"model.input_size=\[16\].*model.input_size=\[{longest}\]"):
        fit_to_data(config(tmp_path / "seq", "model.input_size=[16]"))
    assert fit_to_data(ditkit.load_config("digits", [*TINY, f"data.path={tmp_path / 'seq'}"]))[0].data.kind == "sequences"
    # the statistics: per channel over every real position, in float64
    ds = build_dataset(cfg).inner
    flat = np.concatenate(seqs, axis=1)
    np.testing.assert_allclose(ds.normalizer.state["x"]["mean"].numpy(), flat.mean(1), rtol=1e-12)
    np.testing.assert_allclose(ds.normalizer.state["x"]["std"].numpy(), flat.std(1), rtol=1e-9)


def test_length_buckets_keep_each_epochs_samples_and_cut_the_padding():
    lengths = torch.randint(1, 11, (200,)) * P
    G, steps = 8, 200 // 8

    def epoch(buckets):
        it = iter(ShardBatchSampler(200, G, seed=5, lengths=lengths, buckets=buckets))
        return [[i for _, i in next(it)] for _ in range(steps)]

    plain, sorted_ = epoch(0), epoch(5)
    assert sorted(sum(plain, [])) == sorted(sum(sorted_, [])) == list(range(200))
    padded = lambda batches: sum(int(lengths[b].max()) * len(b) for b in batches)  # noqa: E731
    assert padded(sorted_) < 0.8 * padded(plain)
    assert epoch(5) == sorted_  # a function of the seed: resumes alike
    with pytest.raises(ConfigError, match="data.length_buckets"):
        ditkit.load_config("digits", ["data.length_buckets=2"])


def test_train_resume_and_sample_mixed_lengths(tmp_path):
    make_folder(tmp_path / "seq")
    ref, run = tmp_path / "ref", tmp_path / "run"
    ditkit.train(config(tmp_path / "seq", "train.steps=6", "data.length_buckets=2"), ref, device="cpu")
    ditkit.train(config(tmp_path / "seq", "train.steps=3", "data.length_buckets=2"), run, device="cpu")
    ditkit.train(config(tmp_path / "seq", "train.steps=6", "data.length_buckets=2"), run, device="cpu", resume=True)
    losses = [[json.loads(r)["loss"] for r in (d / "metrics.jsonl").read_text().splitlines()] for d in (ref, run)]
    assert len(losses[0]) == 6 and all(np.isfinite(losses[0])) and losses[0] == losses[1]
    a, b = (load_checkpoint(d / "checkpoints" / "last.pt") for d in (ref, run))
    for k in a["ema"]:
        assert torch.equal(a["ema"][k], b["ema"][k]), k
    assert torch.equal(a["normalizer"]["x"]["mean"], b["normalizer"]["x"]["mean"])

    ckpt = ref / "checkpoints" / "last.pt"
    lengths = [8, 20, 40]
    seqs = sample_sequences(ckpt, lengths, labels=[0, 1, 1], seed=3, device="cpu")
    assert [s.shape for s in seqs] == [(2, n) for n in lengths]
    # by hand: the same generation in the model's units, then x = z s_c + μ_c
    from ditkit.checkpoints import load_run
    from ditkit.data.sampler import step_seed
    from ditkit.objectives import build_objective
    from ditkit.sampling import generate_sizes

    model, cfg, stored = load_run(ckpt, device="cpu")
    z, _ = generate_sizes(model, build_objective(cfg), [(n,) for n in lengths], {"y": torch.tensor([0, 1, 1])},
                          cfg.sample, channels=2, seeds=[step_seed(3, i, 1) for i in range(3)])
    mean, std = (stored["normalizer"]["x"][k].numpy()[:, None] for k in ("mean", "std"))
    for s, zi in zip(seqs, z):
        np.testing.assert_allclose(s, zi.double().numpy() * std + mean, rtol=1e-6, atol=1e-6)
    # batches of any size: each sample's noise is its own, so the same sequences
    for batch in (1, 2):
        again = sample_sequences(ckpt, lengths, labels=[0, 1, 1], seed=3, device="cpu", batch_size=batch)
        for s, a in zip(seqs, again):
            np.testing.assert_allclose(a, s, rtol=1e-5, atol=1e-5)
    # through the speed door: bf16 autocast gives the same sequences to bf16's precision
    from ditkit.fast import SampleSpeed

    fast = sample_sequences(ckpt, lengths, labels=[0, 1, 1], seed=3, device="cpu", speed=SampleSpeed(precision="amp-bf16"))
    for s, f in zip(seqs, fast):
        assert np.abs(f - s).max() < 0.1 * np.abs(s).max() and not np.array_equal(f, s)
    with pytest.raises(ValueError, match="--lengths"):
        ditkit.sample(model, cfg, num_samples=2, progress=False)
    main(["sample", "--ckpt", str(ckpt), "--out", str(tmp_path / "out"), "--lengths", "8,20,40", "--labels", "0,1,1",
          "--seed", "3", "--device", "cpu"])
    assert seqs.labels.tolist() == [0, 1, 1] and seqs.params is None
    with np.load(tmp_path / "out" / "samples.npz") as saved:
        assert saved["lengths"].tolist() == lengths and saved["labels"].tolist() == [0, 1, 1]
        assert saved["class_names"].tolist() == seqs.class_names
        for i, s in enumerate(seqs):
            np.testing.assert_array_equal(saved[f"seq_{i:04d}"], s)


def test_volumes_of_different_sizes_train_resume_and_sample(tmp_path):
    """data.axes=3: a folder of (C, T_i, H_i, W_i) arrays, padded per axis with a (B, T, H, W) mask."""
    rng = np.random.default_rng(1)
    for i in range(12):
        size = (int(rng.integers(1, 3)) * 2, int(rng.integers(1, 3)) * 4, int(rng.integers(1, 3)) * 4)
        np.save(tmp_path / f"{i:02d}.npy", rng.normal(size=(2, *size)) * [[[[2.0]]], [[[0.5]]]] + 3)
    (tmp_path / "vol").mkdir()
    for f in tmp_path.glob("*.npy"):
        f.rename(tmp_path / "vol" / f.name)
    cfg = lambda *extra: ditkit.load_config("digits", [  # noqa: E731
        "model.name=custom", "model.patch_size=[2, 4, 4]", "model.input_size=[4, 8, 8]", "model.hidden_size=32",
        "model.depth=2", "model.num_heads=2", "model.num_classes=0", "train.global_batch_size=4", "train.log_every=1",
        "train.ckpt_every=2", "train.warmup_steps=1", "train.log_to=none", "sample.steps=3", "data.kind=sequences",
        f"data.path={tmp_path / 'vol'}", "data.axes=3", *extra])
    data = build_dataset(fit_to_data(cfg())[0])
    batch = data.inner.collate([data[(0, i)] for i in range(4)])
    assert batch["x"].shape[2:] == batch["mask"].shape[1:] and batch["mask"].dim() == 4
    assert [tuple(m.nonzero().max(0).values + 1) for m in batch["mask"]] == [data.inner.sizes[i] for i in range(4)]
    stored, ckpt = assert_resumes_exactly(cfg, tmp_path, steps=4)
    assert stored["normalizer"]["x"]["axes"] == 3
    vols = sample_sequences(ckpt, [(2, 4, 8), (4, 8, 4)], seed=1, device="cpu")
    assert [v.shape for v in vols] == [(2, 2, 4, 8), (2, 4, 8, 4)]
    main(["sample", "--ckpt", str(ckpt), "--out", str(tmp_path / "out"), "--lengths", "2x4x8,4x8x4", "--seed", "1",
          "--device", "cpu"])
    with np.load(tmp_path / "out" / "samples.npz") as saved:
        assert saved["sizes"].tolist() == [[2, 4, 8], [4, 8, 4]]
        np.testing.assert_array_equal(saved["seq_0001"], vols[1])
    with pytest.raises(ValueError, match=r"--lengths: 8 has 1 axis; this model's samples have 3 \(T, H, W\), e.g. 4x8x8"):
        sample_sequences(ckpt, [8], device="cpu")
    with pytest.raises(ValueError, match="--lengths: 2x6x8 is not a multiple of the patch size 4 on axis H"):
        sample_sequences(ckpt, [(2, 6, 8)], device="cpu")


def test_videos_as_folders_of_frames_of_different_lengths(tmp_path):
    """root/<class>/<clip>/*.png: RGB frames in name order, clips of 2 or 4 frames, class labels from the folders."""
    from PIL import Image

    from ditkit.data.sequences import SequenceDataset, read_clip

    rng = np.random.default_rng(0)
    for i in range(8):
        clip = tmp_path / "videos" / f"class{i % 2}" / f"clip{i}"
        clip.mkdir(parents=True)
        for t in range(2 + 2 * (i % 2)):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(clip / f"frame_{t:03d}.png")
    first = read_clip(tmp_path / "videos" / "class1" / "clip1")
    frame = np.asarray(Image.open(tmp_path / "videos" / "class1" / "clip1" / "frame_002.png"), dtype=np.float64)
    assert first.shape == (3, 4, 8, 8) and np.allclose(first[:, 2], frame.transpose(2, 0, 1) / 127.5 - 1)
    data = SequenceDataset(tmp_path / "videos", (2, 4, 4), classes=True, axes=3)
    assert sorted(data.sizes) == [(2, 8, 8)] * 4 + [(4, 8, 8)] * 4 and data.classes == ["class0", "class1"]
    cfg = ditkit.load_config("digits", [
        "model.name=custom", "model.patch_size=[2, 4, 4]", "model.input_size=[4, 8, 8]", "model.hidden_size=32",
        "model.depth=1", "model.num_heads=2", "model.num_classes=2", "train.global_batch_size=4", "train.steps=2",
        "train.log_to=none", "train.warmup_steps=1", "sample.steps=2", "data.kind=sequences",
        f"data.path={tmp_path / 'videos'}", "data.axes=3"])
    ditkit.train(cfg, tmp_path / "run", device="cpu")
    vids = sample_sequences(tmp_path / "run" / "checkpoints" / "last.pt", [(2, 8, 8), (4, 8, 8)], labels=[0, 1],
                            device="cpu")
    assert [v.shape for v in vids] == [(3, 2, 8, 8), (3, 4, 8, 8)]
    (tmp_path / "videos" / "class0" / "clip0" / "frame_009.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="frame_009.png cannot be read"):
        read_clip(tmp_path / "videos" / "class0" / "clip0")


def test_pad_multiple_bounds_the_shapes_a_batch_takes(tmp_path):
    items = [{"x": torch.ones(2, n), "y": torch.tensor(0)} for n in (8, 20)]
    assert pad_batch(items, P, multiple=16)["x"].shape[-1] == 32
    assert pad_batch(items, P, multiple=16, max_size=(24,))["x"].shape[-1] == 24  # no further than the model's size
    assert pad_batch(items[:1], P, multiple=16)["mask"].sum() == 8
    from ditkit.data.sequences import SequenceDataset

    with pytest.raises(ValueError, match="pad_multiple=6 is not a multiple of the patch size 4"):
        np.save(tmp_path / "a.npy", np.ones((1, 8)))
        SequenceDataset(tmp_path, P, pad_multiple=6)
