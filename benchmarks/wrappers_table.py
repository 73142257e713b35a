"""The one table of scripts/gpu_wrappers.sh, from the JSON files it leaves in a folder: the official step
at its fastest and ditkit's benchmark step (benchmarks/bench.py), and `ditkit train` in one process,
under DDP and under FSDP (benchmarks/train_throughput.py), at each batch per GPU.

    python benchmarks/wrappers_table.py DIR
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def bench_rows(path: Path) -> dict[int, dict]:
    if not path.exists():
        return {}
    return {r["batch"]: r for r in json.loads(path.read_text()).get("train", []) if r.get("status") == "ok"}


def train_row(folder: Path, tag: str) -> dict | None:
    path = folder / f"train_throughput_1gpu_{tag}.json"
    if not path.exists():
        return None
    row = json.loads(path.read_text())[0]
    return row if row.get("status") == "ok" else {"status": row.get("status", "failed")}


def main(folder: Path) -> None:
    official, fastest = bench_rows(folder / "bench_official_bf16.json"), bench_rows(folder / "bench_fastest.json")
    batches = sorted({*official, *fastest} | {int(p.stem.rsplit("_b", 1)[1]) for p in folder.glob("train_throughput_1gpu_*_b*.json")})
    print("| batch per GPU | run | img/s | vs one process | GPU mem GiB | loss (last interval) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for b in batches:
        plain = train_row(folder, f"plain_b{b}")
        base = plain.get("img_per_s") if plain else None
        cells = []
        if b in official:
            cells.append(("official step, bf16 autocast (bench)", official[b]["img_per_s"], official[b]["peak_mem_gib"], None))
        if b in fastest:
            cells.append(("ditkit step, `fastest` (bench)", fastest[b]["img_per_s"], fastest[b]["peak_mem_gib"], None))
        buckets = sorted({p.stem.split("_ddp", 1)[1].rsplit("_b", 1)[0] for p in folder.glob(f"train_throughput_1gpu_ddp*_b{b}.json")
                          if p.stem.split("_ddp", 1)[1][0].isdigit()}, key=float)  # DDP_BUCKETS sizes, 12.5 too
        for tag, name in (("plain", "`ditkit train`, one process"), ("ddp", "`ditkit train`, DDP (torchrun, 1 process)"),
                          *((f"ddp{mb}", f"`ditkit train`, DDP, {mb} MiB buckets (torchrun, 1 process)") for mb in buckets),
                          ("fsdp", "`ditkit train`, FSDP (torchrun, 1 process)"),
                          ("fsdpeager", "`ditkit train`, FSDP, fastest's levers without torch.compile (torchrun, 1 process)")):
            r = train_row(folder, f"{tag}_b{b}")
            if r is None:
                continue
            cells.append((name, r.get("img_per_s"), r.get("gpu_mem_gib", 0.0), r.get("loss", r.get("status"))))
        for name, ips, mem, loss in cells:
            if ips is None:
                print(f"| {b} | {name} | failed: {loss} | | | |")
                continue
            rel = f"{ips / base:.1%}" if base and "ditkit train" in name else ""
            print(f"| {b} | {name} | {ips:.1f} | {rel} | {mem:.2f} | {'' if loss is None else f'{loss:.4f}'} |")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "."))
