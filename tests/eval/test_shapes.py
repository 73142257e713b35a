"""The shapes scorer tells real draws from noise and from a generator that drops a class."""
import numpy as np

from ditkit.data.shapes import CLASSES, draw_shapes, write_shapes
from ditkit.eval import shapes


def test_real_draws_score_as_real_and_defects_are_seen():
    assert shapes.classifier_accuracy() > 0.95  # fresh draws, a seed the classifier never saw
    images, labels = draw_shapes(60, seed=7)
    assert shapes.classifier_agreement(images, labels) > 0.95
    assert shapes.classifier_agreement(images, (labels + 1) % len(CLASSES)) < 0.1
    real = shapes.shapes_frechet_distance(images)
    missing_class = shapes.shapes_frechet_distance(images[labels != 0])
    noise = shapes.shapes_frechet_distance(np.random.default_rng(0).integers(0, 256, images.shape, dtype=np.uint8))
    assert real < missing_class < noise


def test_the_folder_is_an_image_folder_of_sorted_class_names(tmp_path):
    root = write_shapes(tmp_path, per_class=2, size=16)
    assert sorted(p.name for p in root.iterdir()) == list(CLASSES)
    assert all(len(list((root / c).glob("*.png"))) == 2 for c in CLASSES)
