"""``ditkit eval``: which scorer fits the samples, and the scores.

    results = score("samples.npz", reference="ref_images/", inception="pt_inception-2015-12-05-6726825d.pth")
    print(format_scores(results))

Two scorers:

- ``digits``: the digits demo's own metrics (``ditkit.eval.digits``), when the samples are a digits
  run's samples file (raw samples (N, 1, 8, 8) with labels, or 8×8 images with labels) and no
  reference is given.  InceptionV3 features mean nothing on 8×8 digits.
- ``inception``: FID, sFID, IS, precision and recall (``ditkit.eval.evaluate``) of anything else: an
  ADM .npz, a ditkit samples .npz or a folder of images, against a reference of the same kinds or an
  ADM reference batch with precomputed statistics.  Without a reference, IS alone.

``metric="auto"`` looks at the samples (the array headers, not the images) to choose; ``"digits"`` or
``"inception"`` forces one.  The InceptionV3 weights are a file the user downloads once: ``inception``,
else the environment variable ``DITKIT_INCEPTION``.
"""
from __future__ import annotations

import os
from pathlib import Path

from ditkit.eval.batches import existing_input, npz_arrays, open_images

SCORERS = ("auto", "digits", "inception")


def choose_scorer(samples: str | Path, reference: str | Path | None = None, metric: str = "auto") -> str:
    """"digits" or "inception": the one ``metric`` names, or for "auto" the one the samples call for."""
    if metric not in SCORERS:
        raise ValueError(f"metric must be one of {', '.join(SCORERS)}, got {metric!r}")
    if metric == "digits" and reference is not None:
        raise ValueError(f"the digits scorer compares {samples} with the real digits, not with a reference: "
                         f"leave out --ref {reference}, or score images with --metric inception")
    if metric != "auto":
        return metric
    from ditkit.eval.digits import is_digit_samples

    return "digits" if reference is None and is_digit_samples(samples) else "inception"


def _check_images(path: Path) -> None:
    """Fails before the weights are looked for on samples that InceptionV3 cannot read: an .npz without
    ``arr_0`` (a field run's samples, a statistics file), images of the wrong type, an empty folder."""
    if path.is_file():
        keys = sorted(npz_arrays(path))
        if "arr_0" not in keys:
            hint = "; field samples are scored with ditkit eval-fields" if "samples" in keys else ""
            raise ValueError(f"{path} holds no images to score: no 'arr_0' uint8 (N, H, W, 3) (it has: "
                             f"{', '.join(keys) or 'none'}){hint}")
    open_images(path)


def score(samples: str | Path, reference: str | Path | None = None, inception: str | Path | None = None,
          metric: str = "auto", batch_size: int = 64, device: str = "cpu", resize: str = "pytorch-fid",
          progress: bool = False) -> dict:
    """The scores of ``samples`` by the scorer ``choose_scorer`` picks, with ``"scorer"`` naming it.

    Both paths are checked first, so that a wrong one fails at once; a scorer that needs the
    InceptionV3 weights and has none says which file to download and how to pass it."""
    from ditkit.eval.inception import WEIGHTS_ENV, weights_hint

    samples = existing_input(samples)
    reference = None if reference is None else existing_input(reference)
    scorer = choose_scorer(samples, reference, metric)
    if scorer == "digits":
        from ditkit.eval.digits import evaluate_digits, load_digit_samples

        return {"scorer": "digits", **evaluate_digits(*load_digit_samples(samples))}

    _check_images(samples)
    inception = inception or os.environ.get(WEIGHTS_ENV) or None
    if inception is None:
        why = ("--metric inception" if metric == "inception" else f"--ref {reference} is given" if reference
               else "it is not a digits run's samples")
        raise ValueError(f"scoring {samples} needs the FID InceptionV3 ({why}): {weights_hint()}")
    from ditkit.eval.evaluate import evaluate

    return {"scorer": "inception", **evaluate(samples, reference, inception, batch_size=batch_size, device=device,
                                              resize=resize, progress=progress)}


def format_scores(results: dict) -> str:
    """The digits lines or the metrics table, as the scorer wrote them."""
    if results["scorer"] == "digits":
        from ditkit.eval.digits import format_digits

        return format_digits(results)
    from ditkit.eval.evaluate import format_table

    return format_table(results)
