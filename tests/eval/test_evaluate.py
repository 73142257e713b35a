"""evaluate()'s bookkeeping: which statistics feed FID/sFID, what each metric is computed from,
the table and the JSON.  Features come from a stand-in for the network (a fixed function of the
pixels) so that the 2048-d sqrtm and 299² forwards stay out of this test; the network's own
feature path is tested in test_inception.py."""
import json

import numpy as np
import pytest

from ditkit.eval import evaluate as ev  # the module
from ditkit.eval.metrics import feature_statistics, frechet_distance, inception_score, precision_recall


def fake_activations(model, source, batch_size, resize, progress):
    x = np.concatenate(list(source.batches(batch_size))).reshape(source.num_images, -1).astype(np.float64) / 255
    logits = 4 * x[:, :10]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return {"pool": x[:, :6], "spatial": x[:, 6:11], "probs": probs}


@pytest.fixture
def stub_network(monkeypatch):
    monkeypatch.setattr(ev, "load_inception", lambda path, device: None)
    monkeypatch.setattr(ev, "compute_activations", fake_activations)


@pytest.fixture
def batches(tmp_path):
    rng = np.random.default_rng(0)
    samples = rng.integers(0, 256, size=(40, 2, 2, 3), dtype=np.uint8)
    reference = rng.integers(0, 200, size=(30, 2, 2, 3), dtype=np.uint8)
    np.savez(tmp_path / "samples.npz", arr_0=samples)
    np.savez(tmp_path / "ref.npz", arr_0=reference)
    return tmp_path, samples, reference


def test_reference_of_images(stub_network, batches):
    tmp, samples, reference = batches
    r = ev.evaluate(tmp / "samples.npz", tmp / "ref.npz", "weights.pth")
    s, f = fake_activations(None, ev.open_images(samples), 64, None, False), fake_activations(None, ev.open_images(reference), 64, None, False)
    assert r["fid"] == pytest.approx(frechet_distance(*feature_statistics(s["pool"]), *feature_statistics(f["pool"])))
    assert r["sfid"] == pytest.approx(frechet_distance(*feature_statistics(s["spatial"]), *feature_statistics(f["spatial"])))
    assert r["inception_score"] == pytest.approx(inception_score(s["probs"]))
    assert (r["precision"], r["recall"]) == pytest.approx(precision_recall(f["pool"], s["pool"]))
    assert (r["num_samples"], r["num_reference"], r["notes"]) == (40, 30, [])


def test_samples_against_themselves(stub_network, batches):
    tmp, samples, _ = batches
    r = ev.evaluate(samples, tmp / "samples.npz", "weights.pth")
    assert r["fid"] == pytest.approx(0, abs=1e-6) and r["sfid"] == pytest.approx(0, abs=1e-6)
    assert (r["precision"], r["recall"]) == (1.0, 1.0)


def test_precomputed_reference_statistics_are_used(stub_network, batches):
    tmp, samples, reference = batches
    mu, sigma = np.full(6, 0.5), 0.1 * np.eye(6)
    np.savez(tmp / "adm_ref.npz", arr_0=reference, mu=mu, sigma=sigma)
    r = ev.evaluate(tmp / "samples.npz", tmp / "adm_ref.npz", "weights.pth")
    s = fake_activations(None, ev.open_images(samples), 64, None, False)
    assert r["fid"] == pytest.approx(frechet_distance(*feature_statistics(s["pool"]), mu, sigma))
    assert any("'mu', 'sigma' read from the reference file" in n for n in r["notes"])
    assert r["precision"] is not None  # still from the reference images

    ignored = ev.evaluate(tmp / "samples.npz", tmp / "adm_ref.npz", "weights.pth", use_reference_stats=False)
    assert ignored["fid"] != pytest.approx(r["fid"]) and ignored["notes"] == []


def test_statistics_only_reference(stub_network, batches, tmp_path):
    tmp, _, _ = batches
    np.savez(tmp / "stats.npz", mu=np.zeros(6), sigma=np.eye(6))
    r = ev.evaluate(tmp / "samples.npz", tmp / "stats.npz", "weights.pth")
    assert r["fid"] is not None and r["sfid"] is None and r["precision"] is None and r["recall"] is None
    assert r["num_reference"] is None

    table = ev.format_table(r)
    assert "FID" in table and "n/a" in table and "no images" in table
    ev.write_json(r, tmp_path / "out.json")
    loaded = json.loads((tmp_path / "out.json").read_text())
    assert loaded["sfid"] is None and loaded["fid"] == pytest.approx(r["fid"])


def test_inputs_are_checked_before_the_network_is_loaded(batches):
    tmp, _, _ = batches
    with pytest.raises(FileNotFoundError, match="missing_ref.npz"):
        ev.evaluate(tmp / "samples.npz", tmp / "missing_ref.npz", tmp / "no_weights.pth")
    with pytest.raises(ValueError, match="resize must be one of"):
        ev.evaluate(tmp / "samples.npz", tmp / "ref.npz", tmp / "no_weights.pth", resize="bicubic")
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05-6726825d.pth"):
        ev.evaluate(tmp / "samples.npz", tmp / "ref.npz", tmp / "no_weights.pth")
