"""Checkpoint files: round trips, atomic writes, clear errors, strict and fine-tune loading."""
import pytest
import torch

from ditkit.checkpoints.formats import (
    CheckpointError,
    StateDictMismatchError,
    check_state_dict,
    load_for_finetune,
    load_state_dict,
    read_metadata,
    save_state_dict,
)
from ditkit.models.dit import DiT
from tests.checkpoints.conftest import SMALL


@pytest.mark.parametrize("name", ["w.safetensors", "w.pt"])
def test_round_trip_is_exact_and_leaves_no_temporary(small_dit, tmp_path, name):
    state_dict = small_dit.state_dict()
    state_dict["alias"] = state_dict["pos_embed"]  # shared storage, as diffusers' copied embedders
    save_state_dict(state_dict, tmp_path / name)
    back = load_state_dict(tmp_path / name)
    assert back.keys() == state_dict.keys()
    assert all(torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in state_dict.items())
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_safetensors_keeps_metadata(small_dit, tmp_path):
    save_state_dict(small_dit.state_dict(), tmp_path / "w.safetensors", metadata={"model": "DiT-S/2"})
    assert read_metadata(tmp_path / "w.safetensors") == {"model": "DiT-S/2"}


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "w.pt"
    save_state_dict({"a": torch.ones(3)}, path)
    with pytest.raises(Exception):
        save_state_dict({"a": lambda: 0}, path)  # unpicklable: fails halfway through writing
    assert torch.equal(load_state_dict(path)["a"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["w.pt"]


@pytest.mark.parametrize("name", ["w.safetensors", "w.pt"])
def test_truncated_file_is_named(small_dit, tmp_path, name):
    path = tmp_path / name
    save_state_dict(small_dit.state_dict(), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=rf"{name}: .*(truncated|corrupt)"):
        load_state_dict(path)


@pytest.mark.parametrize("content, message", [
    (b"step: 1000\nlr: 1e-4\n", "not a torch checkpoint"),
    (b"", "empty"),
])
def test_non_checkpoint_file_is_named(tmp_path, content, message):
    path = tmp_path / "config.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=f"config.pt: .*{message}"):
        load_state_dict(path)


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "unsafe.pt"
    torch.save({"w": torch.ones(1), "loss": torch.nn.MSELoss()}, path)
    with pytest.raises(CheckpointError, match="unsafe.pt: .*weights_only=True"):
        load_state_dict(path)


def test_checkpoint_without_weights_is_named(tmp_path):
    path = tmp_path / "log.pt"
    torch.save({"step": 3, "losses": [0.1, 0.2]}, path)
    with pytest.raises(CheckpointError, match=r"log.pt: no state dict .*'losses', 'step'"):
        load_state_dict(path)


def test_check_state_dict_names_the_problems(small_dit):
    state_dict = small_dit.state_dict()
    del state_dict["blocks.1.attn.qkv.bias"]
    state_dict["extra.weight"] = torch.zeros(1)
    state_dict["final_layer.linear.bias"] = torch.zeros(5)
    with pytest.raises(StateDictMismatchError) as info:
        check_state_dict(small_dit, state_dict)
    message = str(info.value)
    assert "1 missing keys (blocks.1.attn.qkv.bias)" in message
    assert "1 unexpected keys (extra.weight)" in message
    assert "final_layer.linear.bias (5,) vs model (32,)" in message


def test_finetune_to_other_classes_reinitialises_only_the_label_table(small_dit):
    torch.manual_seed(1)
    target = DiT(**{**SMALL, "num_classes": 3})
    logged = []
    reinit = load_for_finetune(target, small_dit.state_dict(), log=logged.append)
    assert reinit == ["y_embedder.embedding_table.weight"]
    assert len(logged) == 1 and "y_embedder.embedding_table.weight" in logged[0] and "11 rows" in logged[0]
    source, loaded = small_dit.state_dict(), target.state_dict()
    assert all(torch.equal(loaded[k], source[k]) for k in loaded if k not in reinit)
    table = loaded["y_embedder.embedding_table.weight"]
    assert table.shape == (4, 64) and 0.015 < table.std() < 0.025


def test_finetune_to_other_input_size_recomputes_pos_embed(small_dit):
    target = DiT(**{**SMALL, "input_size": 32})
    fresh = target.pos_embed.detach().clone()
    with torch.no_grad():
        target.pos_embed.zero_()
    logged = []
    assert load_for_finetune(target, small_dit.state_dict(), log=logged.append) == ["pos_embed"]
    assert torch.equal(target.pos_embed, fresh) and "16x16 patch grid" in logged[0]


def test_finetune_refuses_other_mismatches(small_dit):
    with pytest.raises(StateDictMismatchError, match=r"missing keys \(blocks\.2\."):
        load_for_finetune(DiT(**{**SMALL, "depth": 3}), small_dit.state_dict(), log=lambda s: None)


def test_finetune_drops_repas_projector_with_one_line_and_nothing_else(small_dit):
    """A REPA run's weights (``repa_projector.*``: a training-only head) into a model without REPA: the projector is
    dropped and said once, every other weight loads as it was; any other stray or missing key is still named."""
    torch.manual_seed(1)
    repa = DiT(**SMALL, repa_depth=1, repa_dim=16)
    repa.load_state_dict(small_dit.state_dict(), strict=False)
    source = repa.state_dict()
    target, logged = DiT(**SMALL), []
    assert load_for_finetune(target, source, log=logged.append, source="repa.pt") == []
    assert logged == ["fine-tune: dropped REPA's projector (6 tensors of repa.pt): a training-only head, and this "
                      "model has none (model.repa_depth unset)"]
    assert all(torch.equal(v, source[k]) for k, v in target.state_dict().items())
    with pytest.raises(StateDictMismatchError, match=r"1 unexpected keys \(extra\.weight\)"):
        load_for_finetune(DiT(**SMALL), {**source, "extra.weight": torch.zeros(1)}, log=lambda s: None)
    del source["blocks.1.attn.qkv.bias"]
    with pytest.raises(StateDictMismatchError, match=r"1 missing keys \(blocks\.1\.attn\.qkv\.bias\)"):
        load_for_finetune(DiT(**SMALL), source, log=lambda s: None)
    with pytest.raises(StateDictMismatchError, match=r"missing keys \(repa_projector\.0\.weight"):
        load_for_finetune(DiT(**SMALL, repa_depth=1, repa_dim=16), small_dit.state_dict(), log=lambda s: None)
