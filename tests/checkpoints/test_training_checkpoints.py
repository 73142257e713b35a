"""Training checkpoints are checked on load: every tensor's SHA-256 is in the file, a flipped byte is
named by file and tensor, a torn or foreign newest file falls back to the one before it, and a
write that fills the disk says so and leaves no temporary file."""
import errno
import hashlib
import json
import os
import shutil
import tempfile

import numpy as np
import pytest
import torch

from ditkit.checkpoints.formats import CheckpointError, read_metadata
from ditkit.checkpoints.training import (
    list_checkpoints,
    load_checkpoint,
    newest_good_checkpoint,
    save_checkpoint,
    tensor_sha256,
)
from ditkit.config import load_config
from ditkit.training.trainer import train
from ditkit.utils.io import atomic_write, remove_stale_temps

TINY = ["model.hidden_size=32", "model.depth=2", "model.num_heads=2", "train.global_batch_size=16",
        "train.steps=2", "train.ckpt_every=1", "train.keep_last=5"]


@pytest.fixture(scope="module")
def run_ckpts(tmp_path_factory):
    """The checkpoints of a real two-step run (steps 1 and 2): model, EMA, AdamW state, config."""
    run = tmp_path_factory.mktemp("run")
    train(load_config("digits", overrides=TINY), run, device="cpu")
    return run / "checkpoints"


@pytest.fixture
def ckpts(run_ckpts, tmp_path):
    """A private copy of the run's checkpoints, free to damage."""
    return shutil.copytree(run_ckpts, tmp_path / "checkpoints", symlinks=True)


def small_state(model) -> dict:
    """A training state of a small DiT, with the awkward tensors: bf16, 0-dim, integer keys."""
    return {"model": model.state_dict(), "ema": {k: v.bfloat16() for k, v in model.state_dict().items()},
            "opt": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(4)}}, "param_groups": [{"lr": 1e-4}]},
            "step": 40, "config": {"model": {"name": "custom"}}}


def flip_middle_of(path, t: torch.Tensor) -> None:
    """Invert 64 bytes in the middle of ``t``'s bytes inside ``path``, as a failing disk or copy would.
    The bytes are found by their content (random values); an identical copy (the EMA of a young run
    equals the model) is damaged too."""
    raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    needle = raw[len(raw) // 2 - 32:len(raw) // 2 + 32]
    data = path.read_bytes()
    assert needle in data
    path.write_bytes(data.replace(needle, bytes(b ^ 0xFF for b in needle)))


def assert_same_state(a, b) -> None:
    if torch.is_tensor(b):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(b, dict):
        assert a.keys() == b.keys()
        for k in b:
            assert_same_state(a[k], b[k])
    elif isinstance(b, (list, tuple)):
        assert len(a) == len(b) and all(assert_same_state(x, y) is None for x, y in zip(a, b))
    else:
        assert a == b


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_checksums_are_stored_in_the_file_and_not_returned(tmp_path, small_dit, fmt):
    state = small_state(small_dit)
    path = save_checkpoint(state, tmp_path, 40, keep_last=2, fmt=fmt)
    loaded = load_checkpoint(path)
    assert "checksums" not in loaded
    assert_same_state(loaded, state)
    stored = (torch.load(path, weights_only=True)["checksums"] if fmt == "pt"
              else json.loads(read_metadata(path)["checksums"]))
    assert stored["s/opt/state/0/step"] == hashlib.sha256(np.float32(3.0).tobytes()).hexdigest()  # a 0-dim tensor
    assert stored["s/model/pos_embed"] == hashlib.sha256(state["model"]["pos_embed"].numpy().tobytes()).hexdigest()
    assert len(stored) == 2 * len(state["model"]) + 2


def test_tensor_checksum_covers_every_dtype_and_shape():
    x = torch.randn(3, 5)
    assert tensor_sha256(x) == hashlib.sha256(x.numpy().tobytes()).hexdigest()
    assert tensor_sha256(x.t()) == hashlib.sha256(x.t().contiguous().numpy().tobytes()).hexdigest()  # memory order
    assert tensor_sha256(x.bfloat16()) != tensor_sha256(x.half())
    assert tensor_sha256(torch.tensor(7)) == hashlib.sha256(np.int64(7).tobytes()).hexdigest()
    assert tensor_sha256(torch.zeros(0)) == hashlib.sha256(b"").hexdigest()


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_flipped_bytes_name_the_file_and_the_tensor(tmp_path, small_dit, fmt):
    state = small_state(small_dit)
    path = save_checkpoint(state, tmp_path, 40, keep_last=2, fmt=fmt)
    name, largest = max(state["model"].items(), key=lambda kv: kv[1].numel())
    flip_middle_of(path, largest)
    with pytest.raises(CheckpointError, match=rf"ckpt_00000040\.{fmt} is corrupt: tensor s/model/{name} "
                                              "does not match its checksum"):
        load_checkpoint(path)
    damaged = load_checkpoint(path, verify=False)["model"][name]  # verify=False reads the bytes as they are
    assert not torch.equal(damaged, largest)


def test_files_without_checksums_load_unverified(tmp_path, small_dit):
    """Checkpoints of older versions carry no record: they load as before, unchecked."""
    from safetensors.torch import save_file

    from ditkit.checkpoints.training import STATE_KEY, flatten_state

    state = small_state(small_dit)
    torch.save(state, tmp_path / "old.pt")
    assert_same_state(load_checkpoint(tmp_path / "old.pt"), state)
    tensors = {}
    skeleton = flatten_state(state, tensors)
    save_file(tensors, tmp_path / "old.safetensors", metadata={STATE_KEY: json.dumps(skeleton)})
    assert_same_state(load_checkpoint(tmp_path / "old.safetensors"), state)


def test_a_file_edited_by_hand(tmp_path, small_dit):
    """Loaded with torch.load, edited and saved again, a file carries a stale record: with other
    tensors than the record lists it loads unverified; with the same tensors and other values the
    error says how to keep the edit."""
    path = save_checkpoint(small_state(small_dit), tmp_path, 40, keep_last=2)
    data = torch.load(path, weights_only=True)
    data["ema"]["extra.weight"] = torch.zeros(1)
    torch.save(data, tmp_path / "more.pt")
    assert "extra.weight" in load_checkpoint(tmp_path / "more.pt")["ema"]
    data = torch.load(path, weights_only=True)
    data["model"]["pos_embed"] = torch.zeros_like(data["model"]["pos_embed"])
    torch.save(data, tmp_path / "edited.pt")
    with pytest.raises(CheckpointError, match="tensor s/model/pos_embed .* without its 'checksums' entry"):
        load_checkpoint(tmp_path / "edited.pt")


def test_the_runs_checkpoints_verify(run_ckpts):
    """The trainer's real state (AdamW's integer-keyed state, the config) passes its own checksums."""
    assert [p.name for p in list_checkpoints(run_ckpts)] == ["ckpt_00000001.pt", "ckpt_00000002.pt"]
    state = load_checkpoint(run_ckpts / "last.pt")
    assert state["step"] == 2 and "checksums" not in state and isinstance(state["opt"]["state"][0]["exp_avg"], torch.Tensor)


def test_a_truncated_newest_checkpoint_falls_back_to_the_one_before(ckpts):
    newest = ckpts / "ckpt_00000002.pt"
    newest.write_bytes(newest.read_bytes()[:5000])
    lines = []
    path, state = newest_good_checkpoint(ckpts, log=lines.append)
    assert path.name == "ckpt_00000001.pt" and state["step"] == 1
    assert len(lines) == 1 and lines[0].startswith(f"checkpoint {newest} is unusable (")
    assert lines[0].endswith("; trying the one before it")


def test_corrupt_and_foreign_files_are_skipped(ckpts):
    state = load_checkpoint(ckpts / "ckpt_00000002.pt")
    flip_middle_of(ckpts / "ckpt_00000002.pt", max((v for v in state["model"].values()), key=torch.numel))
    torch.save({"weights": torch.zeros(3)}, ckpts / "ckpt_00000003.pt")
    lines = []
    path, _ = newest_good_checkpoint(ckpts, log=lines.append)
    assert path.name == "ckpt_00000001.pt"
    assert "ckpt_00000003.pt is unusable (a foreign file" in lines[0]
    assert "ckpt_00000002.pt is unusable (ckpt_00000002.pt is corrupt: tensor s/model/" in lines[1]


def test_no_usable_checkpoint_lists_them_all(ckpts, tmp_path):
    assert newest_good_checkpoint(tmp_path / "empty", log=print) is None
    for p in list_checkpoints(ckpts):
        p.write_bytes(b"torn")
    with pytest.raises(CheckpointError, match=r"no usable checkpoint in .*ckpt_00000002\.pt \(.*ckpt_00000001\.pt \("):
        newest_good_checkpoint(ckpts, log=lambda line: None)


def test_keep_last_never_deletes_the_kept_checkpoint(tmp_path):
    state = {"model": {"w": torch.ones(2)}, "step": 0, "config": {}}
    kept = save_checkpoint(state, tmp_path, 1, keep_last=2)
    for step in (2, 3, 4):
        save_checkpoint(state, tmp_path, step, keep_last=2, keep=kept)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt_00000001.pt", "ckpt_00000003.pt", "ckpt_00000004.pt"]
    assert os.readlink(tmp_path / "last.pt") == "ckpt_00000004.pt"
    save_checkpoint(state, tmp_path, 5, keep_last=2)  # no longer kept: pruned as usual
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt_00000004.pt", "ckpt_00000005.pt"]


def test_stale_temporaries_are_removed_and_nothing_else(tmp_path):
    """What a kill -9 mid-write leaves: mkstemp's file and save_checkpoint's link temporary."""
    sub = tmp_path / "sub"
    sub.mkdir()
    stale = [tempfile.mkstemp(dir=d, prefix=f".{name}.", suffix=".tmp")[1]
             for d, name in ((tmp_path, "ckpt_00000040.pt"), (tmp_path, "part_000003.npz"), (sub, "x.pt"))]
    (tmp_path / ".last.pt.tmp").symlink_to("ckpt_00000040.pt")
    others = [tmp_path / n for n in ("ckpt_00000040.pt", "notes.tmp", ".hidden", ".config.yaml.tmp")]
    for p in others:
        p.write_text("x")
    assert remove_stale_temps(tmp_path, targets={"part_000003.npz"}) == [tmp_path / os.path.basename(stale[1])]
    removed = remove_stale_temps(tmp_path)
    assert sorted(removed) == sorted([tmp_path / os.path.basename(stale[0]), tmp_path / ".last.pt.tmp"])
    assert os.path.exists(stale[2]) and all(p.exists() for p in others)
    assert remove_stale_temps(tmp_path, recursive=True) == [sub / os.path.basename(stale[2])]


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   OSError(errno.EDQUOT, "Disk quota exceeded"),
                                   RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0"),
                                   RuntimeError("PytorchStreamWriter failed writing file data/3: No space left on device")])
def test_a_full_disk_is_named_and_leaves_no_temporary(tmp_path, error):
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(b"partial")
        raise error

    with pytest.raises(OSError, match=r"no space left on the device writing .*ckpt\.pt \(free some space") as exc:
        atomic_write(tmp_path / "ckpt.pt", write)
    assert exc.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_during_save_checkpoint(tmp_path, monkeypatch):
    def full(obj, f):
        raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed; unexpected pos 1024 vs 0")

    save_checkpoint({"model": {"w": torch.ones(2)}, "step": 1, "config": {}}, tmp_path, 1, keep_last=2)
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError, match="no space left on the device writing .*ckpt_00000002.pt"):
        save_checkpoint({"model": {"w": torch.ones(2)}, "step": 2, "config": {}}, tmp_path, 2, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_00000001.pt", "last.pt"]


def test_other_errors_pass_through_unchanged(tmp_path):
    def write(tmp):
        raise RuntimeError("something else")

    with pytest.raises(RuntimeError, match="something else"):
        atomic_write(tmp_path / "a.pt", write)
    assert list(tmp_path.iterdir()) == []


def test_written_files_are_readable_by_others_as_the_umask_allows(tmp_path):
    """mkstemp makes its files 0600, and safetensors' writer sets 0600 again: the file written keeps neither."""
    from ditkit.checkpoints.formats import save_state_dict

    umask = os.umask(0o022)
    try:
        save_state_dict({"a": torch.zeros(3)}, tmp_path / "ema.safetensors")
        save_state_dict({"a": torch.zeros(3)}, tmp_path / "ema.pt")
    finally:
        os.umask(umask)
    assert {oct(os.stat(p).st_mode & 0o777) for p in tmp_path.iterdir()} == {"0o644"}
