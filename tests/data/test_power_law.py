"""Power-law random fields on grids of 1, 2 and 3 axes, a known answer: the spectrum is normalised to the asked
pixel variance, draws match the exact spectra within their sampling noise, the spectral tools agree with the 2D ones
they generalise, and the benchmark script writes, trains and scores end to end."""
import json

import numpy as np
import pytest
import torch

from ditkit.data.power_law import PowerLawFields, write_power_law
from ditkit.data.random_fields import gaussian_field, wavenumbers
from ditkit.eval.fields import power_spectrum, radial_bins, score_power_law
from tests.benchmark_scripts import load_benchmark


@pytest.mark.parametrize("axes, size", [(1, 128), (2, 16), (3, 8)])
def test_the_pixel_variance_is_the_asked_one_and_the_lognormal_mean_is_one(axes, size):
    bench = PowerLawFields(size=size, axes=axes)
    params = torch.tensor([[0.2, 1.5], [0.4, 2.5]], dtype=torch.float64)
    P = bench.spectrum(params)
    torch.testing.assert_close(P.flatten(1).sum(1), params[:, 0])  # Parseval: Σ_k P(k) = σ²
    x = bench.sample_x(params.repeat_interleave(400, 0), torch.Generator().manual_seed(0)).reshape(2, 400, 2, -1)
    np.testing.assert_allclose(x[:, :, 0].var(dim=(1, 2)).numpy(), params[:, 0].numpy(), rtol=0.1)
    np.testing.assert_allclose(x[:, :, 1].mean(dim=(1, 2)).numpy(), [1.0, 1.0], rtol=0.05)


@pytest.mark.parametrize("axes, size", [(1, 64), (3, 8)])
def test_true_draws_score_their_sampling_noise_and_it_falls_with_more_samples(axes, size):
    bench = PowerLawFields(size=size, axes=axes)
    g = torch.Generator().manual_seed(1)
    few = score_power_law(lambda p: bench.sample_x(p, g), bench, points=3, samples=8)
    many = score_power_law(lambda p: bench.sample_x(p, g), bench, points=3, samples=128)
    for name in bench.channel_names:
        assert many[f"{name}_spectrum_err"] < few[f"{name}_spectrum_err_floor"]
        assert many[f"{name}_spectrum_err"] < 2 * many[f"{name}_spectrum_err_floor"] + 0.01
    wrong = score_power_law(lambda p: bench.sample_x(p * torch.tensor([2.0, 1.0], dtype=torch.float64), g), bench,
                            points=3, samples=128)
    assert wrong["gaussian_spectrum_err"] > 0.5  # twice the variance: the spectrum is twice the exact one


def test_the_nd_tools_agree_with_their_2d_forms():
    f = torch.fft.fftfreq(6, d=1 / 6, dtype=torch.float64)
    k3 = wavenumbers(6, 3)
    assert torch.equal(k3[2, 1, 3], torch.sqrt(f[2] ** 2 + f[1] ** 2 + f[3] ** 2))
    _, _, counts = radial_bins((8, 8, 8))
    assert counts.sum() < 8 ** 3 and counts[0] == 6 + 12  # |k| = 1 (±1, 0, 0)… and √2 (±1, ±1, 0)…
    x = torch.randn(3, 16, 16, dtype=torch.float64)
    k, p = power_spectrum(x)
    k_nd, p_nd = power_spectrum(x, axes=2)
    assert torch.equal(p, p_nd) and torch.equal(k, k_nd)
    one = gaussian_field(torch.ones(2, 32, dtype=torch.float64), torch.Generator().manual_seed(0))
    assert one.shape == (2, 32) and torch.isfinite(one).all()


def test_the_benchmark_writes_trains_within_a_budget_over_calls_and_scores(tmp_path, monkeypatch):
    from ditkit.checkpoints.training import load_checkpoint

    script = load_benchmark("power_law_fields")
    paths = write_power_law(tmp_path / "data", 24, size=8, axes=3, seed=0)
    assert np.load(paths["x"]).shape == (24, 2, 8, 8, 8)
    assert json.loads(paths["meta"].read_text())["benchmark"]["axes"] == 3
    toy = ["model.hidden_size=32", "model.depth=1", "model.num_heads=2", "train.global_batch_size=8",
           "train.log_to=none", "train.precision=fp32", "data.num_workers=0", "sample.steps=2", "train.warmup_steps=1",
           "train.log_every=1"]
    command = ["--out", str(tmp_path), "--device", "cpu", "train", "--steps", "3", "--minutes", "1e-9", "--set", *toy]
    script.main(command)  # the budget is spent at the first log step
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == 1
    script.main(command)  # the same command again resumes: nothing left of the budget
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == 1
    command[command.index("--minutes") + 1] = "60"
    script.main(command)  # a larger budget goes on to --steps
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == 3
    monkeypatch.delenv("OUT", raising=False)
    table = script.score(tmp_path, "cpu", points=2, samples=2)
    scores = json.loads((tmp_path / "score.json").read_text())
    assert "| gaussian |" in table and np.isfinite(scores["gaussian_spectrum_err"])
    assert (tmp_path / "spectra.png").stat().st_size > 0


def test_mixed_lengths_with_parameters_write_train_and_score(tmp_path, monkeypatch):
    from ditkit.data.power_law import write_power_law_sequences

    script = load_benchmark("power_law_fields")
    paths = write_power_law_sequences(tmp_path / "data", 24, lengths=(16, 32), seed=0)
    shapes = {np.load(f).shape for f in paths["seqs"].glob("*.npy")}
    assert shapes == {(2, 16), (2, 32)}
    cfg = script.config(tmp_path, steps=2, minutes=0, extra=[
        "model.hidden_size=32", "model.depth=1", "model.num_heads=2", "train.global_batch_size=8", "train.log_to=none",
        "train.precision=fp32", "data.num_workers=0", "sample.steps=2", "train.warmup_steps=1", "model.patch_size=4",
        "data.length_buckets=0"])
    import ditkit
    from ditkit.checkpoints.training import load_checkpoint

    ditkit.train(cfg, tmp_path / "run", device="cpu")
    stored = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert stored["normalizer"]["params"]["names"] == ["variance", "n_s"]
    monkeypatch.delenv("OUT", raising=False)
    table = script.score(tmp_path, "cpu", points=1, samples=2)
    scores = json.loads((tmp_path / "score.json").read_text())
    assert "| 16 |" in table and "| 32 |" in table and np.isfinite(scores["mean"]["gaussian_spectrum_err"])


def test_a_sequence_without_a_parameter_row_is_named(tmp_path, caplog):
    from ditkit.data.sequences import SequenceDataset

    (tmp_path / "s").mkdir()
    for i in range(3):
        np.save(tmp_path / "s" / f"{i}.npy", np.ones((1, 8)) * i)
    (tmp_path / "p.csv").write_text("file,a\n0,1.0\n1.npy,2.0\n")
    with pytest.raises(ValueError, match=r"no row for 1 of 3 samples \(first: 2\)"):
        SequenceDataset(tmp_path / "s", 4, params_file=tmp_path / "p.csv")
    (tmp_path / "p.csv").write_text("file,a\n0,1.0\n1.npy,2.0\n2,4.0\n")
    data = SequenceDataset(tmp_path / "s", 4, params_file=tmp_path / "p.csv")
    assert data.param_names == ["a"] and np.isclose(float(data[2]["params"][0]), (4.0 - 7 / 3) / np.std([1, 2, 4]))
    (tmp_path / "p.csv").write_text("file,a\n0,1.0\n1.npy,2.0\n2,4.0\n3,8.0\n")  # a row for a sample that is not there
    with caplog.at_level("WARNING", logger="ditkit.data.sequences"):
        SequenceDataset(tmp_path / "s", 4, params_file=tmp_path / "p.csv")
    assert "1 rows for no sample" in caplog.text and "(first: 3)" in caplog.text
    (tmp_path / "q.csv").write_text("name,a\n0,1\n")
    with pytest.raises(ValueError, match="needs a 'file' column"):
        SequenceDataset(tmp_path / "s", 4, params_file=tmp_path / "q.csv")
