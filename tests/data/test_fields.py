"""Field datasets: every file layout gives the same items, the normaliser inverts exactly and its
statistics are numpy's, its state survives torch.load(weights_only=True), and bad data is named."""
import io
import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from ditkit.data.fields import FieldDataset, FieldNormalizer, read_params, split_indices

N, C, CF, H = 10, 3, 2, 8
EPS = 1e-3


@pytest.fixture(scope="module")
def arrays():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, C, H, H)).astype(np.float32)
    x[:, 1] = rng.lognormal(mean=2.0, sigma=1.5, size=(N, H, H))  # positive, heavy-tailed
    x[0, 1, 0, 0] = 0.0  # zeros are allowed with eps > 0
    field = rng.normal(size=(N, CF, H, H)).astype(np.float32) * 3 + 1
    params = np.stack([rng.uniform(0.1, 0.5, N), rng.uniform(0.6, 1.0, N), rng.normal(size=N)], axis=1)
    return x, field, params


def write_csv(path, params, names=("Omega_m", "sigma_8", "A_SN1")):
    lines = [",".join(names)] + [",".join(repr(float(v)) for v in row) for row in params]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture()
def files(tmp_path, arrays):
    x, field, params = arrays
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "field.npy", field)
    write_csv(tmp_path / "params.csv", params)
    return tmp_path


def test_items_are_standardised_tensors_with_the_model_shape(files):
    ds = FieldDataset(files / "x.npy", files / "params.csv", files / "field.npy", log_channels=[1], eps=EPS)
    item = ds[3]
    assert set(item) == {"x", "field", "params", "index"} and item["index"] == 3
    assert item["x"].shape == (C, H, H) and item["field"].shape == (CF, H, H) and item["params"].shape == (3,)
    assert all(item[k].dtype == torch.float32 for k in ("x", "field", "params"))
    assert ds.model_shape() == {"in_channels": C, "input_size": H, "num_params": 3, "cond_channels": CF}
    assert ds.param_names == ["Omega_m", "sigma_8", "A_SN1"]
    batch = next(iter(DataLoader(ds, batch_size=N)))
    for key, dims in (("x", (0, 2, 3)), ("field", (0, 2, 3)), ("params", (0,))):
        v = batch[key].double()
        torch.testing.assert_close(v.mean(dims), torch.zeros(v.shape[1], dtype=torch.float64), atol=1e-5, rtol=0)
        torch.testing.assert_close(v.std(dims, unbiased=False), torch.ones(v.shape[1], dtype=torch.float64), atol=1e-5, rtol=0)


def test_statistics_are_numpys_on_the_training_subset(files, arrays):
    x, field, params = arrays
    train = np.array([0, 2, 3, 5, 7, 9])
    ds = FieldDataset(files / "x.npy", files / "params.csv", files / "field.npy", log_channels=[1], eps=EPS, indices=train)
    st = ds.normalizer.state_dict()
    t = x[train].astype(np.float64)
    t[:, 1] = np.log(t[:, 1] + EPS)
    np.testing.assert_allclose(st["x"]["mean"].numpy(), t.mean(axis=(0, 2, 3)), rtol=1e-10)
    np.testing.assert_allclose(st["x"]["std"].numpy(), t.std(axis=(0, 2, 3)), rtol=1e-10)
    np.testing.assert_allclose(st["params"]["mean"].numpy(), params[train].mean(0), rtol=1e-10)
    np.testing.assert_allclose(st["field"]["std"].numpy(), field[train].astype(np.float64).std(axis=(0, 2, 3)), rtol=1e-6)
    assert st["x"]["log"] == [False, True, False] and st["field"]["log"] == [False, False]


def test_normalizer_round_trip_with_log_and_through_a_weights_only_checkpoint(files, arrays):
    x, _, params = arrays
    ds = FieldDataset(files / "x.npy", files / "params.csv", log_channels=[1], eps=EPS)
    buf = io.BytesIO()
    torch.save({"normalizer": ds.normalizer.state_dict()}, buf)
    buf.seek(0)
    norm = FieldNormalizer(torch.load(buf, weights_only=True)["normalizer"])
    phys = torch.from_numpy(x).double()  # a batch (N, C, H, W)
    z = norm.normalize(phys)
    assert torch.allclose(z[3], ds[3]["x"].double(), atol=1e-5)
    torch.testing.assert_close(norm.denormalize(z), phys, rtol=1e-10, atol=1e-12)
    p = torch.from_numpy(params)
    torch.testing.assert_close(norm.denormalize(norm.normalize(p, "params"), "params"), p)
    z32 = norm.normalize(phys.float())  # float32 batches (the sampler's) come back within float32 precision
    torch.testing.assert_close(norm.denormalize(z32), phys.float(), rtol=1e-5, atol=1e-5)
    below = z.clone()
    below[:, 1] = -1e3  # a generated value under log(eps): 0 in physical units, never negative
    assert (norm.denormalize(below)[:, 1] == 0).all()
    with pytest.raises(KeyError, match="no statistics for 'field'"):
        norm.normalize(phys, "field")
    with pytest.raises(ValueError, match="normalizer's 3 channels"):
        norm.normalize(phys[:, :2])


def _same_items(a: FieldDataset, b: FieldDataset) -> None:
    assert len(a) == len(b)
    for i in (0, len(a) - 1):
        for key in a[i]:
            ai, bi = a[i][key], b[i][key]
            assert torch.equal(torch.as_tensor(ai), torch.as_tensor(bi)), key


def test_npz_folder_and_npy_params_give_the_same_items(files, arrays):
    x, field, params = arrays
    ref = FieldDataset(files / "x.npy", files / "params.csv", files / "field.npy", log_channels=[1], eps=EPS)
    np.savez(files / "all.npz", fields=x, cond=field, theta=params)
    names = ["Omega_m", "sigma_8", "A_SN1"]
    _same_items(ref, FieldDataset(files / "all.npz", files / "all.npz", files / "all.npz", x_key="fields", field_key="cond",
                                  params_key="theta", param_names=names, log_channels=[1], eps=EPS))
    (files / "xs").mkdir()
    (files / "fs").mkdir()
    for i in range(N):  # one file per sample, sorted by name; .npz and .npy both accepted
        np.savez(files / "xs" / f"{i:04d}.npz", x[i])
        np.save(files / "fs" / f"{i:04d}.npy", field[i])
    np.save(files / "params.npy", params)
    _same_items(ref, FieldDataset(files / "xs", files / "params.npy", files / "fs", param_names=names, log_channels=[1], eps=EPS))


def test_hdf5_gives_the_same_items_and_survives_worker_processes(files, arrays):
    h5py = pytest.importorskip("h5py")
    x, field, params = arrays
    with h5py.File(files / "data.h5", "w") as f:
        f["sim/x"], f["sim/field"], f["theta"] = x, field, params
    ref = FieldDataset(files / "x.npy", files / "params.csv", files / "field.npy", log_channels=[1], eps=EPS)
    ds = FieldDataset(files / "data.h5", files / "data.h5", files / "data.h5", x_key="sim/x", field_key="sim/field",
                      params_key="theta", param_names=["Omega_m", "sigma_8", "A_SN1"], log_channels=[1], eps=EPS)
    _same_items(ref, ds)
    # workers forked after the parent opened the file reopen it; spawned ones get it by pickle
    batches = list(DataLoader(ds, batch_size=5, num_workers=2, multiprocessing_context="fork"))
    torch.testing.assert_close(torch.cat([b["x"] for b in batches]), torch.stack([ref[i]["x"] for i in range(N)]))
    _same_items(ref, pickle.loads(pickle.dumps(ds)))
    with pytest.raises(ValueError, match=r"holds arrays sim/field, sim/x, theta; give a key"):
        FieldDataset(files / "data.h5")


def test_single_channel_arrays_and_csv_column_choice(tmp_path, arrays):
    x, _, params = arrays
    np.save(tmp_path / "x.npy", x[:, 0])  # (N, H, W)
    write_csv(tmp_path / "p.csv", params)
    ds = FieldDataset(tmp_path / "x.npy", tmp_path / "p.csv", param_names=["sigma_8", "Omega_m"])
    assert ds[0]["x"].shape == (1, H, H)
    values, names = read_params(tmp_path / "p.csv", names=["sigma_8", "Omega_m"])
    assert names == ["sigma_8", "Omega_m"] and np.allclose(values, params[:, [1, 0]])


def test_validation_set_reuses_the_training_normaliser(files):
    train_idx, val_idx = split_indices(N, 0.3, seed=1)
    assert len(val_idx) == 3 and not set(train_idx) & set(val_idx) and len(train_idx) + len(val_idx) == N
    assert np.array_equal(split_indices(N, 0.3, seed=1)[1], val_idx)
    kw = dict(x=files / "x.npy", params=files / "params.csv", field=files / "field.npy")
    train = FieldDataset(**kw, log_channels=[1], eps=EPS, indices=train_idx)
    val = FieldDataset(**kw, indices=val_idx, normalizer=train.normalizer)
    assert val.normalizer is train.normalizer and len(val) == 3 and val[0]["index"] == val_idx[0]
    with pytest.raises(ValueError, match=r"x log channels \[0\] differ from the normalizer's \[1\]"):
        FieldDataset(**kw, indices=val_idx, normalizer=train.normalizer, log_channels=[0])
    with pytest.raises(ValueError, match="has field statistics but the data has no field"):
        FieldDataset(files / "x.npy", files / "params.csv", indices=val_idx, normalizer=train.normalizer)


def test_augmentation_moves_x_and_field_together(tmp_path):
    ramp = np.arange(H * H, dtype=np.float32).reshape(1, 1, H, H)
    np.save(tmp_path / "x.npy", np.repeat(ramp, 4, axis=0))
    np.save(tmp_path / "f.npy", np.repeat(ramp, 4, axis=0) * 2 + 5)  # an affine copy: same after standardising
    ds = FieldDataset(tmp_path / "x.npy", field=tmp_path / "f.npy", augment=True)
    torch.manual_seed(0)
    seen = set()
    for _ in range(40):
        item = ds[0]
        torch.testing.assert_close(item["x"], item["field"])
        seen.add(tuple(item["x"][0, 0, :2].tolist()))
    assert len(seen) == 8  # the eight symmetries of the square, told apart by two corner pixels


@pytest.mark.parametrize("make, message", [
    (lambda d, x, f, p: np.save(d / "x.npy", x[:, 0, 0]), r"x array .*x.npy has shape \(10, 8\); expected \(N, C, H, W\)"),
    (lambda d, x, f, p: np.save(d / "field.npy", f[:-1]), r"field .*field.npy has shape \(9, 2, 8, 8\).*must be \(10, C_cond, 8, 8\)"),
    (lambda d, x, f, p: np.save(d / "field.npy", f[..., :4]), r"field .*has shape \(10, 2, 8, 4\)"),
    (lambda d, x, f, p: write_csv(d / "params.csv", p[:7]), r"params file .*params.csv has 7 rows but x .* has 10 samples"),
    (lambda d, x, f, p: np.save(d / "x.npy", np.where(np.arange(N)[:, None, None, None] == 4, np.nan, x)),
     r"x data .*x.npy holds 192 NaN or inf values \(first: .*x.npy\[4\] channel 0 holds nan\)"),
    (lambda d, x, f, p: np.save(d / "x.npy", x * np.where(np.arange(C) == 1, -1, 1)[None, :, None, None]),
     r"x.npy\[0\]: channel 1 is log-transformed but holds -\d.*needs x > -0.001"),
    (lambda d, x, f, p: write_csv(d / "params.csv", np.where(np.arange(N)[:, None] == 6, np.nan, p)),
     r"params file .*params.csv: sample 6, column 'Omega_m' is nan"),
    (lambda d, x, f, p: (d / "params.csv").write_text("a,b\n1,2\n3,oops\n"), r"params.csv, row 3, column 'b': 'oops' is not a number"),
])
def test_bad_files_are_named(files, arrays, make, message):
    make(files, *arrays)
    with pytest.raises(ValueError, match=message):
        FieldDataset(files / "x.npy", files / "params.csv", files / "field.npy", log_channels=[1], eps=EPS)


def test_bad_arguments_are_named(files, arrays):
    x = arrays[0]
    with pytest.raises(FileNotFoundError, match="x file .*missing.npy does not exist"):
        FieldDataset(files / "missing.npy")
    with pytest.raises(ValueError, match="x log channel 5 does not exist; the x has 3 channels"):
        FieldDataset(files / "x.npy", log_channels=[5])
    with pytest.raises(ValueError, match="has no column 'h'; columns: Omega_m, sigma_8, A_SN1"):
        FieldDataset(files / "x.npy", files / "params.csv", param_names=["h"])
    np.savez(files / "two.npz", a=x, b=x)
    with pytest.raises(ValueError, match=r"two.npz holds arrays a, b; give key 'c' that exists"):
        FieldDataset(files / "two.npz", x_key="c")
    (files / "empty").mkdir()
    with pytest.raises(ValueError, match="x folder .*empty holds no .npy or .npz files"):
        FieldDataset(files / "empty")
    (files / "mixed").mkdir()
    np.save(files / "mixed" / "0.npy", x[0])
    np.save(files / "mixed" / "1.npy", x[1, :2])
    with pytest.raises(ValueError, match=r"x file .*1.npy has shape \(2, 8, 8\); the first file, 0.npy, has \(3, 8, 8\)"):
        FieldDataset(files / "mixed")
    (files / "x.txt").write_text("1 2 3")
    with pytest.raises(ValueError, match="unsupported format '.txt'"):
        FieldDataset(files / "x.txt")


def test_non_finite_values_are_counted_over_the_whole_file(tmp_path, arrays):
    x = arrays[0].copy()
    x[2, 1, 0, 0], x[7, 0, 3, :] = np.inf, np.nan  # 1 + 8 bad values in two chunks' worth of samples
    np.save(tmp_path / "x.npy", x)
    with pytest.raises(ValueError, match=r"x data .*x.npy holds 9 NaN or inf values \(first: .*x.npy\[2\] channel 1 holds inf\)"):
        FieldDataset(tmp_path / "x.npy")


def test_statistics_are_float64_and_must_fit_float32(tmp_path):
    # float32 data near its largest value: the square overflows float32 but not float64
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, size=(N, 2, H, H)).astype(np.float32)
    x[:, 1] *= np.float32(3e38)
    np.save(tmp_path / "x.npy", x)
    ds = FieldDataset(tmp_path / "x.npy")
    std = ds.normalizer.state["x"]["std"]
    assert torch.isfinite(std).all() and std[1] == pytest.approx(x[:, 1].astype(np.float64).std(), rel=1e-9)
    assert torch.isfinite(ds[0]["x"]).all()
    # float64 data whose statistics leave float32's range: named by file and channel
    np.save(tmp_path / "big.npy", x.astype(np.float64) * np.array([1.0, 1e10])[None, :, None, None])
    with pytest.raises(ValueError, match=r"x data .*big.npy channel 1: non-finite (mean|standard deviation) in "
                                         r"float32 .*values up to [23][.\d]*e\+48"):
        FieldDataset(tmp_path / "big.npy")
