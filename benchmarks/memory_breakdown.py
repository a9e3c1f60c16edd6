"""Where an artifact's ONNX Runtime RSS goes: each session's growth at load (by graph kind,
beside its weights on disk), the fixed KV buffers, then the peak of vision, prefill and a few
decode steps (VmHWM reset before each phase via /proc/self/clear_refs; Linux only).

    python benchmarks/memory_breakdown.py ARTIFACT [--decode-tokens N]

REROUTE_EXPORT_THREADS sets the threads (default 2, as the bench). Figures: BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

GIB = 2**30


def rss_hwm() -> tuple[float, float]:
    """(VmRSS, VmHWM) of this process in GiB."""
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return tuple(int(fields[k].split()[0]) * 1024 / GIB for k in ("VmRSS", "VmHWM"))  # type: ignore[return-value]


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS


def kind(name: str) -> str:
    return name.split("_")[0].split(".")[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifact", type=Path)
    p.add_argument("--decode-tokens", type=int, default=4)
    args = p.parse_args(argv)
    os.environ.setdefault("REROUTE_EXPORT_THREADS", "2")
    from reroute_export.preprocess import load_image, samples
    from reroute_export.runtime import OrtArtifact
    from reroute_export.runtime import ort as R

    grown: dict[str, float] = {}
    init = R.Graph.__init__

    def measured_init(self, path, *a, **k):  # each session's RSS growth while it loads
        before = rss_hwm()[0]
        init(self, path, *a, **k)
        grown[kind(path.name)] = grown.get(kind(path.name), 0.0) + rss_hwm()[0] - before

    R.Graph.__init__ = measured_init
    try:
        t0 = time.perf_counter()
        art = OrtArtifact.load(args.artifact, providers=["CPUExecutionProvider"], verify=False)
    finally:
        R.Graph.__init__ = init
    disk: dict[str, float] = {}
    for f in args.artifact.iterdir():
        if f.name.endswith(".data"):
            disk[kind(f.name)] = disk.get(kind(f.name), 0.0) + f.stat().st_size / GIB
    print(f"loaded in {time.perf_counter() - t0:.1f} s, RSS {rss_hwm()[0]:.2f} GiB")
    for k in sorted(grown):
        print(f"  {k:8s} sessions +{grown[k]:.2f} GiB (weights on disk {disk.get(k, 0.0):.2f} GiB)")
    path, prompt = samples()[0]
    before = rss_hwm()[0]
    run = art.bind(art.prepare(load_image(path), prompt))
    print(f"bound (KV buffers): +{rss_hwm()[0] - before:.2f} GiB")
    box = {}

    def prefill():
        box["state"] = run.prefill()

    def decode():
        for step in range(args.decode_tokens):
            box["state"] = run.decode(box["state"], step)

    for name, fn in (("vision", run.vision), ("prefill", prefill), (f"decode x{args.decode_tokens}", decode)):
        reset_peak()
        base = rss_hwm()[0]
        t1 = time.perf_counter()
        fn()
        ms = (time.perf_counter() - t1) * 1e3
        now, peak = rss_hwm()
        print(f"{name:10s} {ms:9.0f} ms  peak {peak:.2f} GiB (+{peak - base:.2f}), after {now:.2f}")
    return 0


if __name__ == "__main__":
    from reroute_export.errors import UserError

    try:
        sys.exit(main())
    except UserError as e:
        sys.exit(f"memory_breakdown: error: {e}")
