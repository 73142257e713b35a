"""Sequences of embeddings from files (``data.context_path``): matched to samples by name or by index, padded with a
mask by the collate, checked against ``model.context_dim``; `ditkit.train` runs, resumes exactly and
`ditkit sample --context` makes one sample per file."""
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

import ditkit
from ditkit.cli import main
from ditkit.config import ConfigError
from ditkit.data import build_dataset
from ditkit.data.context import WithContext, pad_contexts, read_context
from ditkit.data.digits import DigitsDataset
from ditkit.data.sequences import SequenceDataset
from tests.data.resume import assert_resumes_exactly
from tests.data.test_sequences import make_folder

E = 10
TINY = ["model.name=custom", "model.patch_size=4", "model.hidden_size=32", "model.depth=2", "model.num_heads=2",
        "model.num_classes=0", f"model.context_dim={E}", "model.context_len=8", "train.global_batch_size=8",
        "train.log_every=1", "train.ckpt_every=3", "train.warmup_steps=2", "train.ema_decay=0.9", "train.log_to=none",
        "train.sample_every=3", "sample.steps=4", "sample.cfg_scale=2.0"]


def digit_tokens(label: int, extra: int) -> np.ndarray:
    """A digit's label as a sequence: its one-hot vector, then ``extra`` copies (lengths vary)."""
    return np.repeat(np.eye(E, dtype=np.float32)[label][None], 1 + extra, axis=0)


def write_digit_contexts(folder: Path, n: int | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    labels = DigitsDataset().y if n is None else DigitsDataset().y[:n]
    for i, y in enumerate(np.asarray(labels).tolist()):
        np.save(folder / f"{i:05d}.npy", digit_tokens(int(y), i % 3))


def test_pad_contexts_pads_to_the_longest_and_masks():
    ctx, mask = pad_contexts([torch.ones(2, 3), torch.ones(4, 3), torch.ones(0, 3)])
    assert ctx.shape == (3, 4, 3) and mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]]
    assert ctx[0, 2:].abs().sum() == 0 and ctx[2].abs().sum() == 0


def test_files_by_name_with_a_folder_dataset_and_the_collate_pads_both(tmp_path):
    make_folder(tmp_path / "seq", n=6)
    for c, i in [(i % 2, i) for i in range(6)]:
        (tmp_path / "ctx" / f"c{c}").mkdir(parents=True, exist_ok=True)
        a = np.full((1 + i % 3, E), float(i), dtype=np.float32)
        if i == 5:
            save_file({"context": a}, str(tmp_path / "ctx" / f"c{c}" / f"{i:03d}.safetensors"))
        else:
            np.save(tmp_path / "ctx" / f"c{c}" / f"{i:03d}.npy", a)
    data = WithContext(SequenceDataset(tmp_path / "seq", 4, classes=True), tmp_path / "ctx")
    for k in range(6):  # each sample's file by its name, whatever its class folder
        name = Path(data.inner.files[k]).stem
        assert data[k]["context"].unique().item() == float(int(name))
    batch = data.collate([data[k] for k in range(6)])
    assert batch["context"].shape == (6, 3, E) and batch["context_mask"].sum(1).tolist() == [1 + int(Path(f).stem) % 3 for f in data.inner.files]
    assert "mask" in batch and batch["x"].shape[0] == 6  # the sequences' own padding is still made


def test_missing_and_mismatched_files_are_named(tmp_path):
    write_digit_contexts(tmp_path / "ctx", n=10)
    with pytest.raises(ValueError, match=r"no file for 1787 of 1797 samples \(first: 10.npy"):
        WithContext(DigitsDataset(), tmp_path / "ctx")
    write_digit_contexts(tmp_path / "ctx")
    cfg = ditkit.load_config("digits", [*TINY, "model.context_dim=7", f"data.context_path={tmp_path / 'ctx'}"])
    with pytest.raises(ConfigError, match="entries of width 10, but model.context_dim is 7"):
        build_dataset(cfg)
    with pytest.raises(ConfigError, match="go together"):
        build_dataset(ditkit.load_config("digits", TINY))
    np.save(tmp_path / "bad.npy", np.full((2, E), np.nan))
    with pytest.raises(ValueError, match="bad.npy holds NaN"):
        read_context(tmp_path / "bad.npy")
    np.save(tmp_path / "ctx" / "01500.npy", np.zeros((2, E + 6), np.float32))  # one wrong width: named at start-up
    with pytest.raises(ValueError, match=r"01500.npy has shape \(2, 16\); expected \(M, 10\)"):
        WithContext(DigitsDataset(), tmp_path / "ctx")
    from safetensors.numpy import save_file

    (tmp_path / "ctx" / "01500.npy").unlink()
    save_file({"context": np.zeros((3, E + 1), np.float32)}, str(tmp_path / "ctx" / "01500.safetensors"))
    with pytest.raises(ValueError, match=r"01500.safetensors has shape \(3, 11\)"):
        WithContext(DigitsDataset(), tmp_path / "ctx")


def test_train_resume_and_sample_from_files(tmp_path):
    write_digit_contexts(tmp_path / "ctx")
    cfg = lambda *extra: ditkit.load_config("digits", [*TINY, f"data.context_path={tmp_path / 'ctx'}", *extra])  # noqa: E731
    a, ckpt = assert_resumes_exactly(cfg, tmp_path, steps=6)
    assert any("sequence" in k for k in a["ema"])

    asked = tmp_path / "asked"
    asked.mkdir()
    for i, (y, extra) in enumerate([(3, 0), (7, 2), (0, 1)]):
        np.save(asked / f"{i}.npy", digit_tokens(y, extra))
    main(["sample", "--ckpt", str(ckpt), "--out", str(tmp_path / "out"), "--context", str(asked), "--seed", "2",
          "--device", "cpu"])
    with np.load(tmp_path / "out" / "samples.npz") as saved:
        assert saved["arr_0"].shape == (3, 8, 8, 3) and saved["samples"].shape == (3, 1, 8, 8)
        first = saved["samples"]
    assert (tmp_path / "out" / "grid.png").stat().st_size > 0
    # the API gives the same samples from the same files, and refuses a model's missing sequences
    from ditkit.checkpoints import load_run

    model, run_cfg, _ = load_run(ckpt, device="cpu")
    again = ditkit.sample(model, run_cfg, context=asked, seed=2, progress=False)
    np.testing.assert_allclose(again.x.numpy(), first, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="context_dim=10"):
        ditkit.sample(model, run_cfg, num_samples=2, progress=False)
    with pytest.raises(ValueError, match=r"context 0 has shape \(1, 4\)"):
        ditkit.sample(model, run_cfg, context=[np.zeros(4)], progress=False)


def test_sequences_of_mixed_lengths_conditioned_on_sequences_of_embeddings(tmp_path):
    make_folder(tmp_path / "seq", n=8)
    for f in sorted((tmp_path / "seq").rglob("*.npy")):
        target = tmp_path / "ctx" / f.relative_to(tmp_path / "seq")
        target.parent.mkdir(parents=True, exist_ok=True)
        np.save(target, np.eye(E, dtype=np.float32)[: 1 + int(f.stem) % 4])
    cfg = ditkit.load_config("digits", [*TINY, "data.kind=sequences", f"data.path={tmp_path / 'seq'}",
                                        f"data.context_path={tmp_path / 'ctx'}", "train.steps=3"])
    ditkit.train(cfg, tmp_path / "run", device="cpu")
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    from ditkit.generation import sample_sequences

    asked = [np.eye(E, dtype=np.float32)[:1], np.eye(E, dtype=np.float32)[:3]]
    seqs = sample_sequences(ckpt, [8, 16], context=asked, seed=1, device="cpu")
    assert [s.shape for s in seqs] == [(2, 8), (2, 16)] and all(np.isfinite(s).all() for s in seqs)
    with pytest.raises(ValueError, match="1 context sequences for 2 lengths"):
        sample_sequences(ckpt, [8, 16], context=asked[:1], device="cpu")


def test_arrays_conditioned_on_sequences_sample_in_the_data_units(tmp_path):
    """data.kind=fields with contexts by index: ditkit sample --context writes the arrays with the normalisation
    undone, as the API's model-space samples mapped back by the checkpoint's normaliser."""
    from ditkit.checkpoints import load_run
    from ditkit.data.fields import FieldNormalizer

    rng = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", (rng.normal(size=(16, 1, 8, 8)) * 3 + 5).astype(np.float32))
    (tmp_path / "ctx").mkdir()
    for i in range(16):
        np.save(tmp_path / "ctx" / f"{i}.npy", digit_tokens(i % 10, i % 2))
    cfg = ditkit.load_config("digits", [*TINY, f"data.path={tmp_path / 'x.npy'}", f"data.context_path={tmp_path / 'ctx'}",
                                        "train.steps=2", "train.sample_every=0"])
    ditkit.train(cfg, tmp_path / "run", device="cpu")
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    asked = tmp_path / "asked"
    asked.mkdir()
    np.save(asked / "0.npy", digit_tokens(4, 1))
    main(["sample", "--ckpt", str(ckpt), "--out", str(tmp_path / "out"), "--context", str(asked), "--device", "cpu"])
    model, run_cfg, stored = load_run(ckpt, device="cpu")
    x = ditkit.sample(model, run_cfg, context=asked, progress=False).x
    with np.load(tmp_path / "out" / "samples.npz") as saved:
        physical = FieldNormalizer(stored["normalizer"]).denormalize(x.double(), "x").numpy()
        np.testing.assert_allclose(saved["samples"], physical, rtol=1e-4, atol=1e-4)


def test_the_guides_token_files_are_what_the_digits_take(tmp_path, monkeypatch):
    """docs/training.md#conditioning-on-sequences-of-embeddings: its Python block, as a user types it, writes a
    folder that the digits read by index."""
    text = (Path(__file__).parents[2] / "docs" / "training.md").read_text()
    code = text.split("## Conditioning on sequences of embeddings", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tokens").mkdir()
    exec(code, {})
    data = WithContext(DigitsDataset(), tmp_path / "tokens")
    assert data.dim == 10 and torch.equal(data[5]["context"], torch.eye(10)[int(data[5]["y"])][None])


def test_a_folder_of_asked_sequences_is_taken_in_natural_name_order(tmp_path):
    from ditkit.generation import context_file_list, load_contexts

    for i in (10, 2, 1):
        np.save(tmp_path / f"q{i}.npy", np.full((1, E), float(i), np.float32))
    assert [p.name for p in context_file_list(tmp_path)] == ["q1.npy", "q2.npy", "q10.npy"]
    assert [float(c[0, 0]) for c in load_contexts(tmp_path)] == [1.0, 2.0, 10.0]
    assert context_file_list(tmp_path / "q2.npy") == [tmp_path / "q2.npy"]
