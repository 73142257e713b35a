"""The walk-through of docs/training.md#your-own-images, at toy size, as a user types it: an image folder of
named classes → ditkit train --data → ditkit sample by class name → ditkit eval → ditkit export to
diffusers, and the export loads back as the same network."""
import json

import numpy as np
import pytest
import torch

import ditkit
from ditkit.cli import main
from ditkit.data.shapes import CLASSES, write_shapes

pytest.importorskip("diffusers")

TOY = ["model.hidden_size=32", "model.depth=1", "model.num_heads=2", "train.global_batch_size=12",
       "data.num_workers=0", "train.log_every=1", "train.sample_every=0"]


def test_own_images_to_samples_by_class_name_to_scores_to_diffusers(tmp_path, weights_file, capsys):
    folder = write_shapes(tmp_path / "shapes", per_class=4, size=16)  # 24 images of 16×16 in 6 named classes
    run = tmp_path / "run"
    args = ["train", "--preset", "images32", "--data", str(folder), "--run-dir", str(run), "--steps", "2",
            "--device", "cpu"]
    for o in TOY:
        args += ["--set", o]
    main(args)
    cfg = ditkit.load_config(path=run / "config.yaml")
    assert (cfg.model.input_size, cfg.data.image_size, cfg.model.num_classes) == (16, 16, 6)  # read from the data
    assert cfg.data.class_names == list(CLASSES)

    main(["sample", "--ckpt", str(run / "checkpoints" / "last.pt"), "--out", str(tmp_path / "samples"),
          "--labels", "ring,circle,ring,triangle", "--num-samples", "4", "--steps", "2", "--device", "cpu"])
    with np.load(tmp_path / "samples" / "samples.npz") as npz:
        assert npz["arr_0"].shape == (4, 16, 16, 3)
        assert npz["arr_1"].tolist() == [CLASSES.index(c) for c in ("ring", "circle", "ring", "triangle")]

    capsys.readouterr()
    main(["eval", "--samples", str(tmp_path / "samples" / "samples.npz"), "--ref", str(folder),
          "--inception", str(weights_file), "--json", str(tmp_path / "scores.json"), "--device", "cpu"])
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert np.isfinite(scores["fid"]) and scores["fid"] > 0

    main(["export", "--ckpt", str(run / "checkpoints" / "last.pt"), "--to", "diffusers", "--out", str(tmp_path / "hf")])
    model, _ = ditkit.load_model(run / "checkpoints" / "last.pt", device="cpu")
    again, _ = ditkit.load_model(tmp_path / "hf", device="cpu")
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([3.0, 700.0]), torch.tensor([0, 5])
    torch.testing.assert_close(again(x, t, y), model(x, t, y), rtol=1e-5, atol=1e-5)


def test_a_class_name_the_model_does_not_know_is_named(tmp_path):
    cfg = ditkit.load_config("digits")
    cfg.data.class_names = list(CLASSES)
    cfg.model.num_classes = 6
    from ditkit.generation import class_ids

    assert class_ids(["ring", 0, "5"], cfg) == [3, 0, 5]
    with pytest.raises(ValueError, match="unknown class name 'hexagon': the model's classes are circle, cross"):
        class_ids(["hexagon"], cfg)
    cfg.data.class_names = None
    with pytest.raises(ValueError, match="keeps no class names"):
        class_ids(["ring"], cfg)
    with pytest.raises(ValueError, match="label 6 is out of range"):
        class_ids([6], cfg)
