"""``ditkit eval``: the DiT paper's sample metrics (ADM's evaluation suite) in torch.

    results = evaluate("samples.npz", "VIRTUAL_imagenet256_labeled.npz", "pt_inception-2015-12-05-6726825d.pth")
    print(format_table(results)); write_json(results, "eval.json")

As ADM's ``evaluator.py``: InceptionV3 pool3 and spatial features of both batches; FID and sFID
against the reference's precomputed statistics when it holds them (``mu``, ``sigma``, ``mu_s``,
``sigma_s``), else against statistics of its images; Inception Score of the samples alone;
precision and recall (k = 3) between the reference's and the samples' pool3 features.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ditkit.eval.batches import ImageSource, has_images, open_images, read_reference_stats
from ditkit.eval.inception import RESIZE_MODES, FIDInceptionV3, inception_features, load_inception
from ditkit.eval.metrics import feature_statistics, frechet_distance, inception_score, precision_recall

METRICS = (("fid", "FID"), ("sfid", "sFID"), ("inception_score", "Inception Score"),
           ("precision", "Precision"), ("recall", "Recall"))
NO_REFERENCE = "no reference was given (IS alone needs none)"


def compute_activations(model: FIDInceptionV3, source: ImageSource, batch_size: int = 64,
                        resize: str = "pytorch-fid", progress: bool = False) -> dict[str, np.ndarray]:
    """All images of ``source`` -> {"pool": (N, 2048), "spatial": (N, 2023), "probs": (N, 1008)}."""
    outputs: dict[str, list[np.ndarray]] = {"pool": [], "spatial": [], "probs": []}
    batches = source.batches(batch_size)
    for batch in tqdm(batches, total=math.ceil(source.num_images / batch_size), desc=source.name, disable=not progress):
        features = inception_features(model, torch.from_numpy(np.array(batch)), resize)  # copy: npz batches are read-only
        for key, value in features.items():
            outputs[key].append(value.float().cpu().numpy())
    return {key: np.concatenate(values) for key, values in outputs.items()}


def evaluate(samples: str | Path | np.ndarray, reference: str | Path | np.ndarray | None, inception_weights: str | Path,
             batch_size: int = 64, device: str | torch.device = "cpu", resize: str = "pytorch-fid",
             use_reference_stats: bool = True, progress: bool = False) -> dict:
    """FID, sFID, IS, precision and recall of ``samples`` against ``reference``.

    samples / reference: an .npz batch (arr_0 uint8 N×H×W×3), a folder of images or an array; the
    two may differ in size (both are resized to 299×299).  A metric that the reference cannot give
    (statistics only, no images: no precision or recall; no reference: IS alone) is None, and
    ``notes`` says why.  ``use_reference_stats=False`` ignores precomputed statistics.
    """
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    # Look at both inputs before the long part, so that a wrong path fails in the first second.
    sample_source = open_images(samples)
    ref_is_array = isinstance(reference, np.ndarray)
    ref_stats = {} if reference is None or ref_is_array or not use_reference_stats else read_reference_stats(reference)
    ref_source = open_images(reference) if ref_is_array or (reference is not None and has_images(reference)) else None
    model = load_inception(inception_weights, device)

    results: dict = {
        "samples": sample_source.name, "reference": None if reference is None else "array" if ref_is_array else str(reference),
        "num_samples": sample_source.num_images, "num_reference": None if ref_source is None else ref_source.num_images,
        "inception_weights": str(inception_weights), "resize": resize, "notes": [],
    }
    acts = compute_activations(model, sample_source, batch_size, resize, progress)
    ref_acts = None if ref_source is None else compute_activations(model, ref_source, batch_size, resize, progress)
    results["inception_score"] = inception_score(acts["probs"])

    for metric, mean, cov, feature in (("fid", "mu", "sigma", "pool"), ("sfid", "mu_s", "sigma_s", "spatial")):
        if mean in ref_stats:
            ref_mu, ref_sigma = ref_stats[mean], ref_stats[cov]
            # ADM's reference files hold TF-computed statistics: the port's difference adds to FID.
            results["notes"].append(f"{metric}: reference statistics '{mean}', '{cov}' read from the reference file")
        elif ref_acts is not None:
            ref_mu, ref_sigma = feature_statistics(ref_acts[feature])
        else:
            results[metric] = None
            results["notes"].append(f"{metric}: " + (NO_REFERENCE if reference is None
                                                     else f"the reference has neither '{mean}'/'{cov}' nor images"))
            continue
        results[metric] = frechet_distance(*feature_statistics(acts[feature]), ref_mu, ref_sigma)

    if ref_acts is None:
        results["precision"] = results["recall"] = None
        results["notes"].append("precision/recall: " + (NO_REFERENCE if reference is None
                                                         else "the reference holds no images (arr_0)"))
    else:
        results["precision"], results["recall"] = precision_recall(ref_acts["pool"], acts["pool"], device=device)
    return results


def format_table(results: dict) -> str:
    """The five metrics as a two-column table, then counts and notes."""
    lines = [f"{'metric':<16} {'value':>10}"]
    for key, name in METRICS:
        value = results.get(key)
        lines.append(f"{name:<16} {'n/a' if value is None else f'{value:10.4f}':>10}")
    reference = (f"{results['num_reference'] or 'statistics only'} from {results['reference']}"
                 if results["reference"] is not None else "none")
    lines.append(f"samples: {results['num_samples']} from {results['samples']}; reference: {reference}")
    lines += [f"note: {note}" for note in results["notes"]]
    return "\n".join(lines)


def write_json(results: dict, path: str | Path) -> None:
    """The results dict as indented JSON (None -> null)."""
    Path(path).write_text(json.dumps(results, indent=2) + "\n")
