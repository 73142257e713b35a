"""The cosmology framework's ``dit.ini``, read as ditkit's config.

That framework configures its DiT with an INI file whose keys may sit in any section
(``[TRAINING]``, ``[MODEL]``, ...).  ditkit reads these keys and maps them onto its own fields:

    dit_variant, patch_size,        model.name ("DiT-S/4") when the sizes are those of the variant,
    hidden_size, depth, num_heads   else model.name=custom with depth, hidden_size, num_heads, patch_size
    mlp_ratio                       model.mlp_ratio
    precision                       train.precision: 32 (32-true) -> fp32, 16 (16-mixed) -> fp16,
                                    bf16 (bf16-mixed) -> bf16
    n_sampling_steps                sample.steps
    learning_rate                   train.lr

Whatever the file does not set comes from the base preset, ``cosmo128`` (the cosmology setting,
whose DiT-S/4 is the framework's default), or the preset given with it.  The framework's other keys
(its data paths, its logging) are ignored with one warning that lists them.
"""
from __future__ import annotations

import configparser
import logging
import math
from pathlib import Path
from typing import Any

from ditkit.models.dit import _SIZES, DiT_models

log = logging.getLogger("ditkit.config")

BASE_PRESET = "cosmo128"  # the base of an .ini file given without a preset

VARIANTS = {f"DiT-{size}": dims for size, dims in _SIZES.items()}  # "DiT-S" -> (depth, hidden_size, num_heads)
SIZE_KEYS = ("depth", "hidden_size", "num_heads")  # the order of a VARIANTS entry
# Lightning's spellings: "16" and "bf16" are its mixed precisions, which ditkit's fp16 (with a
# gradient scaler) and bf16 (autocast over float32 weights) are.
PRECISIONS = {"32": "fp32", "32-true": "fp32", "16": "fp16", "16-mixed": "fp16", "bf16": "bf16", "bf16-mixed": "bf16"}
ARCHITECTURE = ("dit_variant", "patch_size", *SIZE_KEYS)
FIELDS = {"mlp_ratio": ("model", "mlp_ratio"), "precision": ("train", "precision"),
          "n_sampling_steps": ("sample", "steps"), "learning_rate": ("train", "lr")}  # one key, one field
KEYS = (*ARCHITECTURE, *FIELDS)


def read_ini(path: Path) -> dict[str, tuple[str, str]]:
    """key -> (section, raw value) over every section of the file.  A key set in two sections to
    different values is an error: which one the framework took depends on its code, not the file."""
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=("#", ";"))
    try:
        parser.read_string(path.read_text(), source=str(path))
    except (configparser.Error, UnicodeDecodeError) as err:
        raise ValueError(f"config file {path} is not a valid INI file: {' '.join(str(err).split())}") from None
    found: dict[str, tuple[str, str]] = {}
    sections = {parser.default_section: parser.defaults(), **{name: parser[name] for name in parser.sections()}}
    for section, values in sections.items():
        for key, raw in values.items():
            raw = raw.strip()
            if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "\"'":  # precision = "16-mixed"
                raw = raw[1:-1]
            if key in found and found[key][1] != raw:
                first, value = found[key]
                raise ValueError(f"config file {path}: {key} is set twice, to {value!r} in [{first}] and to "
                                 f"{raw!r} in [{section}]")
            found.setdefault(key, (section, raw))
    return found


def _parse(path: Path, key: str, section: str, raw: str) -> Any:
    """The value of one key, or a one-line error naming the file, the key and the value."""
    where = f"config file {path}: [{section}] {key} = {raw!r}"
    if key == "dit_variant":
        names = {name.lower(): name for name in VARIANTS}
        if raw.lower() not in names:
            raise ValueError(f"{where} is not a DiT variant; choose one of {', '.join(VARIANTS)}")
        return names[raw.lower()]
    if key == "precision":
        if raw.lower() not in PRECISIONS:
            raise ValueError(f"{where} is not a precision ditkit trains in; choose one of {', '.join(PRECISIONS)}")
        return PRECISIONS[raw.lower()]
    kind = float if key in ("mlp_ratio", "learning_rate") else int
    try:
        value = kind(raw)
    except ValueError:
        value = None
    if value is None or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{where} is not a positive {'number' if kind is float else 'integer'}")
    return value


def _architecture(values: dict[str, Any], base: Any) -> dict[str, Any]:
    """model.name and the custom sizes.  Each size is the file's, else its dit_variant's, else the
    base model's; the model is named ("DiT-S/4") when its sizes are those of the variant."""
    if base.name == "custom":
        variant, dims = None, {"patch_size": base.patch_size, **{k: getattr(base, k) for k in SIZE_KEYS}}
    else:
        size, patch = base.name.removeprefix("DiT-").split("/")
        variant = f"DiT-{size}"
        dims = {"patch_size": int(patch), **dict(zip(SIZE_KEYS, VARIANTS[variant]))}
    if "dit_variant" in values:
        variant = values["dit_variant"]
        dims.update(zip(SIZE_KEYS, VARIANTS[variant]))
    dims.update({k: values[k] for k in ("patch_size", *SIZE_KEYS) if k in values})
    name = f"{variant}/{dims['patch_size']}"
    if variant and name in DiT_models and VARIANTS[variant] == tuple(dims[k] for k in SIZE_KEYS):
        return {"name": name, **dict.fromkeys(dims)}  # a named variant fixes the sizes itself
    return {"name": "custom", **dims}


def ini_config(path: Path, base_model: Any) -> dict[str, dict[str, Any]]:
    """The sections of ditkit's config that ``path`` sets ({"model": {...}, "train": {...}, ...}), for
    ``from_dict`` over a base config whose model section is ``base_model``."""
    found = read_ini(path)
    ignored = [key for key in found if key not in KEYS]
    if ignored:
        log.warning(f"{path}: ignoring {len(ignored)} key(s) that ditkit does not read (set its own fields with "
                    f"--set section.key=value): {', '.join(ignored)}")
    values = {key: _parse(path, key, *found[key]) for key in KEYS if key in found}
    data: dict[str, dict[str, Any]] = {"model": {}, "train": {}, "sample": {}}
    if any(key in values for key in ARCHITECTURE):
        data["model"] = _architecture(values, base_model)
    for key, (section, field) in FIELDS.items():
        if key in values:
            data[section][field] = values[key]
    return {section: fields for section, fields in data.items() if fields}


__all__ = ["BASE_PRESET", "PRECISIONS", "VARIANTS", "ini_config", "read_ini"]
