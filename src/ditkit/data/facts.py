"""What the data fixes about a run, read at start-up before any step.

A config names its data (``data.kind``, ``data.path`` and the fields' files); the data then fixes part
of the model: the channels and grid of x, the number of classes and their names, the length of the
parameter vector, the channels of a conditioning field.  ``fit_to_data`` fills those keys from the data
where the user left them to a preset or a default, and refuses a value the user set that contradicts
the data, naming both, so that a wrong size fails here and not at step 0 in a reshape.

Which keys the user set is what ``ditkit.load_config`` records (the keys of a config file and of the
overrides, not of the preset); a config built in code counts as set in full.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ditkit.config import Config, ConfigError, user_keys

LATENT_MARKER = "manifest.json"  # the file that makes a folder a latent cache (ditkit.data.latents.MANIFEST)
ARRAY_SUFFIXES = (".npy", ".npz", ".h5", ".hdf5")
DIGIT_NAMES = [str(k) for k in range(10)]


def kind_of_path(path: str | os.PathLike) -> str:
    """The ``data.kind`` a path holds: a folder with a manifest is a latent cache, another folder an
    image folder (or, holding ``.npy`` files, a sequence folder), an array file (``.npy``/``.npz``/HDF5) the fields'
    x, any other file a labels file."""
    p = Path(path)
    if p.is_dir():
        if (p / LATENT_MARKER).is_file():
            return "latents"
        return "sequences" if any(True for pattern in ("*.npy", "*/*.npy") for _ in p.glob(pattern)) else "images"
    if not p.exists():
        raise ConfigError(f"data.path {p} does not exist")
    return "fields" if p.suffix.lower() in ARRAY_SUFFIXES else "images"


@dataclass
class DataFacts:
    """What one dataset fixes: ``exact`` keys must hold these values, ``at_least`` keys at least these
    (a model may have more classes than a subset of its data uses), ``defaults`` are taken unless set."""
    source: str
    found: str  # one line for the start-up summary: "80 images of 32×32 in 4 classes"
    count: int | None = None  # samples (None where counting would read the data)
    exact: dict[str, Any] = field(default_factory=dict)
    at_least: dict[str, int] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)


def _grid(h: int, w: int) -> int | list[int]:
    return h if h == w else [h, w]


def _image_sizes(paths: list[str], limit: int = 64) -> set[tuple[int, int]]:
    """(width, height) of up to ``limit`` images spread over ``paths``; PIL reads the header only."""
    from PIL import Image

    step = max(1, len(paths) // limit)
    sizes = set()
    for p in paths[::step][:limit]:
        try:
            with Image.open(p) as im:
                sizes.add(im.size)
        except (OSError, ValueError, SyntaxError):
            continue  # an unreadable file is the dataset's to report
    return sizes


def _image_facts(cfg: Config) -> DataFacts:
    from ditkit.data.images import IMAGE_EXTENSIONS, _read_labels_file

    d, m = cfg.data, cfg.model
    root = Path(d.path)
    labels_file = None
    if d.labels_file is not None:
        labels_file = Path(d.labels_file) if Path(d.labels_file).is_absolute() or not root.is_dir() else root / d.labels_file
    elif root.is_file():
        labels_file = root
    facts = DataFacts(str(labels_file or root), "")
    classes: list[str] | None = None
    if labels_file is not None:
        if not labels_file.is_file():
            raise ConfigError(f"labels file {labels_file} does not exist")
        try:
            paths, labels = _read_labels_file(labels_file, None, unconditional=m.num_classes == 0)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        count = len(set(labels)) if m.num_classes else 0
        what = f"{len(paths)} images listed" + (f", class ids up to {max(labels)}" if count else "")
        if m.num_classes:
            facts.at_least["model.num_classes"] = max(labels) + 1
            facts.defaults["model.num_classes"] = max(labels) + 1
    else:
        if not root.is_dir():
            raise ConfigError(f"image folder {root} does not exist")
        classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
        walk = [root / c for c in classes] if classes and m.num_classes else [root]
        paths = [os.path.join(dirpath, f) for top in walk for dirpath, _, files in os.walk(top, followlinks=True)
                 for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
        if not paths:
            raise ConfigError(f"image folder {root} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        if classes and m.num_classes:
            what = f"{len(paths)} images in {len(classes)} class folders"
            facts.at_least["model.num_classes"] = len(classes)
            facts.defaults["model.num_classes"] = len(classes)
            facts.defaults["data.class_names"] = classes
        elif m.num_classes:  # no class folders: nothing to condition on
            what = f"{len(paths)} images, no class folders"
            facts.exact["model.num_classes"] = 0
        else:
            what = f"{len(paths)} images"
    facts.count = len(paths)
    sizes = _image_sizes(paths)
    if len(sizes) == 1:
        w, h = sizes.pop()
        what += f" of {w}×{h}"
        facts.defaults["data.image_size"] = min(w, h)  # the ADM center crop keeps the short side's square
    else:
        what += " of mixed sizes"
    facts.found = what
    facts.exact["model.in_channels"] = 3  # every image is read as 8-bit RGB
    return facts


def _latent_facts(cfg: Config) -> DataFacts:
    from ditkit.data.latents import read_manifest

    try:
        manifest = read_manifest(cfg.data.path)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    c, h, w = manifest["latent_shape"]
    facts = DataFacts(str(cfg.data.path), f"{manifest['count']} latents of {c}×{h}×{w}", count=manifest["count"])
    facts.exact.update({"model.in_channels": c, "model.input_size": _grid(h, w),  # and the VAE's units (latents.py)
                        "data.latent_scale": manifest["scale_factor"],
                        "data.latent_shift": manifest.get("shift_factor", 0.0)})
    if cfg.data.latent_norm == "channel":
        if "channel_mean" not in manifest:
            raise ConfigError(f"data.latent_norm=channel needs the per-channel statistics of the latent cache, which "
                              f"{cfg.data.path} lacks: run its `ditkit extract` command again (it finds every shard "
                              "done and only adds the statistics)")
        facts.exact.update({"data.latent_mean": manifest["channel_mean"], "data.latent_std": manifest["channel_std"]})
    n = manifest.get("num_classes")
    if n and cfg.model.num_classes:
        facts.found += f" in {n} classes"
        facts.at_least["model.num_classes"] = n
        facts.defaults["model.num_classes"] = n
        if manifest.get("classes"):
            facts.defaults["data.class_names"] = list(manifest["classes"])
    return facts


def _field_facts(cfg: Config) -> DataFacts:
    from ditkit.data.fields import FieldSource, read_params

    d = cfg.data
    try:
        x = FieldSource(d.path, what="x", axes=d.axes)
        n, c, *size = x.shape
        facts = DataFacts(str(d.path), f"{n} fields of {c}×{'×'.join(map(str, size))}", count=n)
        facts.exact.update({"model.in_channels": c, "model.input_size": _grid(*size) if len(size) == 2 else list(size)})
        if len(size) == 1:
            facts.defaults["data.flip"] = False  # a sequence has no symmetry of the square to draw
        if len(size) == 2 and size[0] != size[1] or len(size) == 3 and size[1] != size[2]:
            facts.defaults["data.flip"] = False  # nor a slice that is not square
        if d.params_file is not None:
            _, names = read_params(d.params_file, names=d.param_names)
            facts.found += f", {len(names)} parameters ({', '.join(names)})"
            facts.exact["model.num_params"] = len(names)
        else:
            facts.exact["model.num_params"] = 0
        if d.field_file is not None:
            cond = FieldSource(d.field_file, what="field", axes=x.axes).shape[1]
            facts.found += f", a {cond}-channel conditioning field"
            facts.exact["model.cond_channels"] = cond
        else:
            facts.exact["model.cond_channels"] = 0
    except (ValueError, OSError) as err:
        raise ConfigError(str(err)) from None
    facts.exact["model.num_classes"] = 0
    return facts


def patch_sizes(cfg: Config, axes: int) -> tuple[int, ...]:
    """The patch size along each of ``axes`` axes (a named variant's from its name; the model's default 2 when unset)."""
    m = cfg.model
    p = (m.patch_size if m.name == "custom" else int(m.name.rsplit("/", 1)[1])) or 2
    if isinstance(p, (list, tuple)):
        return tuple(p) if len(p) == axes else (p[0],) * axes
    return (p,) * axes


def _sequence_facts(cfg: Config) -> DataFacts:
    from ditkit.data.sequences import sequence_files, sequence_shape

    d, m = cfg.data, cfg.model
    axes = d.axes or 1
    try:
        files, _, classes = sequence_files(d.path, classes=m.num_classes > 0)
        shapes = [sequence_shape(f, axes) for f in files]
    except (ValueError, OSError) as err:
        raise ConfigError(str(err)) from None
    patch = patch_sizes(cfg, axes)
    largest = [-(-max(s[1 + a] for s in shapes) // patch[a]) * patch[a] for a in range(axes)]
    channels = f"{shapes[0][0]} channel{'s' if shapes[0][0] != 1 else ''}"
    if axes == 1:
        what = f"{len(files)} sequences of {channels}, lengths {min(s[1] for s in shapes)} to {largest[0]}"
    else:
        what = f"{len(files)} samples of {channels}, sizes up to {'×'.join(map(str, largest))}"
    facts = DataFacts(str(d.path), what, count=len(files))
    facts.exact.update({"model.in_channels": shapes[0][0], "model.input_size": largest})
    if d.params_file is not None:
        from ditkit.data.sequences import read_sequence_params

        try:
            _, names = read_sequence_params(d.params_file, Path(d.path), files, d.param_names, warn=False)
        except (ValueError, OSError) as err:
            raise ConfigError(str(err)) from None
        facts.found += f", {len(names)} parameters ({', '.join(names)})"
    facts.exact["model.num_params"] = len(names) if d.params_file is not None else 0
    if classes:
        facts.found += f" in {len(classes)} class folders"
        facts.at_least["model.num_classes"] = len(classes)
        facts.defaults.update({"model.num_classes": len(classes), "data.class_names": classes})
    elif m.num_classes:
        facts.exact["model.num_classes"] = 0
    return facts


def data_facts(cfg: Config) -> DataFacts:
    """What the data of ``cfg`` fixes (reads headers, manifests and folder listings, not the samples)."""
    kind = cfg.data.kind
    if kind == "digits":
        return DataFacts("scikit-learn digits", "1797 digits of 8×8 in 10 classes", count=1797,
                         exact={"model.in_channels": 1, "model.input_size": 8},
                         at_least={"model.num_classes": 10} if cfg.model.num_classes else {},
                         defaults={"data.class_names": DIGIT_NAMES} if cfg.model.num_classes else {})
    if cfg.data.path is None:
        raise ConfigError(f"data.path must be set for data.kind={kind} (or give --data PATH)")
    return {"images": _image_facts, "latents": _latent_facts, "fields": _field_facts,
            "sequences": _sequence_facts}[kind](cfg)


def _get(cfg: Config, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _set(cfg: Config, key: str, value: Any) -> None:
    section, name = key.split(".")
    setattr(getattr(cfg, section), name, value)


def _same(a: Any, b: Any) -> bool:
    """Equal config values; a grid size ``32`` equals ``[32, 32]``."""
    square = lambda v: [v, v] if isinstance(v, int) and not isinstance(v, bool) else v  # noqa: E731
    if a is not None and b is not None and (isinstance(a, (list, tuple)) or isinstance(b, (list, tuple))):
        return list(square(a)) == list(square(b))
    return a == b


def fit_to_data(cfg: Config) -> tuple[Config, list[str]]:
    """(a copy of ``cfg`` with what the data fixes filled in, the lines that say what was filled).

    ``data.kind`` follows ``data.path`` when only the path was set.  A key the user set that the data
    contradicts raises ``ConfigError`` naming the key, its value and what the data holds."""
    mine = user_keys(cfg)
    cfg = copy.deepcopy(cfg)
    notes: list[str] = []

    def user_set(key: str) -> bool:
        return mine is None or key in mine

    # A path the user gave decides the kind unless the kind was set too; a preset's path only replaces
    # a preset's kind other than the built-in digits.
    if (cfg.data.path is not None and not user_set("data.kind")
            and (cfg.data.kind != "digits" or user_set("data.path"))):
        kind = kind_of_path(cfg.data.path)
        if kind != cfg.data.kind:
            notes.append(f"data.kind = {kind} (from data.path {cfg.data.path})")
            cfg.data.kind = kind
    facts = data_facts(cfg)

    def take(key: str, value: Any, why: str) -> None:
        if _same(_get(cfg, key), value):
            return
        if user_set(key):
            raise ConfigError(f"{key}={_get(cfg, key)!r} contradicts the data: {facts.source} holds {facts.found}, "
                              f"which fixes {key}={value!r}{why}")
        _set(cfg, key, value)
        notes.append(f"{key} = {value!r} (from the data: {facts.found})")

    for key, value in facts.defaults.items():
        if key in facts.at_least or key in facts.exact:
            continue
        if key == "data.image_size" and not user_set(key) and user_set("model.input_size"):
            value = cfg.model.input_size  # the user sized the model: crop the images to it
        if not user_set(key) and _get(cfg, key) != value:
            _set(cfg, key, value)
            notes.append(f"{key} = {value!r} (from the data: {facts.found})")
    if cfg.data.kind == "images":
        facts.exact["model.input_size"] = cfg.data.image_size  # pixels: the model sees the cropped image
    for key, value in facts.exact.items():
        take(key, value, "" if key != "model.input_size" or cfg.data.kind != "images"
             else f" (data.image_size={cfg.data.image_size}: the model sees the cropped images)")
    for key, least in facts.at_least.items():
        have = _get(cfg, key)
        if user_set(key):
            if have < least:
                raise ConfigError(f"{key}={have} is too small for the data: {facts.source} holds {facts.found} "
                                  f"(needs at least {least})")
            continue
        value = facts.defaults.get(key, least)
        if have != value:
            _set(cfg, key, value)
            notes.append(f"{key} = {value} (from the data: {facts.found})")
    if facts.count is not None and facts.count < cfg.train.global_batch_size:
        raise ConfigError(f"{facts.source} holds {facts.count} samples, fewer than train.global_batch_size="
                          f"{cfg.train.global_batch_size}: give --set train.global_batch_size={facts.count} or less")
    names = cfg.data.class_names
    if names is not None and cfg.model.num_classes and len(names) > cfg.model.num_classes:
        raise ConfigError(f"data.class_names has {len(names)} names for model.num_classes={cfg.model.num_classes}")
    return cfg.validate(), notes
