"""The README's Python snippets, run as written: the first block exactly, in a fresh folder; the
official-weights block with a small model of the official format written at the names it uses."""
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_first_snippet_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = python_blocks()[0]
    assert "ditkit.train(" in code and "ditkit.load_model(" in code and "ditkit.sample(" in code
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)  # noqa: S102 - the README's own code
    out = scope["out"]
    assert out.images.shape == (4, 8, 8, 3) and out.images.dtype.name == "uint8"
    assert tuple(out.x.shape) == (4, 1, 8, 8) and out.labels.tolist() == [0, 1, 2, 3]
    assert "(4, 8, 8, 3) torch.Size([4, 1, 8, 8])" in capsys.readouterr().out
    assert (tmp_path / "runs" / "digits-api" / "ema.safetensors").exists()


def test_the_official_weights_snippet_runs_on_a_small_model_of_the_official_format(tmp_path, monkeypatch, vae):
    """DiT-S/8 in the official layout under the snippet's file name, and a VAE of the SD architecture
    (random weights) under its folder name: the snippet samples 4 decoded images."""
    import ditkit

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    torch.save(ditkit.DiT_models["DiT-S/8"](input_size=8).state_dict(), "DiT-XL-2-256x256.pt")
    vae.save_pretrained(tmp_path / "sd-vae-ft-ema")
    code = python_blocks()[1].replace("steps=250", "steps=2")  # 250 steps of a random model prove nothing more
    scope = {"ditkit": ditkit}
    exec(compile(code, str(README), "exec"), scope)  # noqa: S102
    out = scope["out"]
    assert out.images.shape == (4, 64, 64, 3) and tuple(out.x.shape) == (4, 4, 8, 8)
    assert out.labels.tolist() == [207, 360, 387, 974]
