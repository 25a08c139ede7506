"""Benchmark zsadlib.metrics against the plain per-threshold loop (tests/plain_metrics.py).

    python bench/bench_metrics.py [--n 500] [--size 518] [--plain-n 50] [--seed 0] [--repeat 3]

Makes N synthetic maps (float32, upsampled 37x37 noise plus a bump on the defects, Gaussian blur
sigma 4, like the CLIP pipelines' maps) with blob masks (about half the images defective), saves them
to a temporary folder, and runs each measurement in its own spawned process that loads the data,
resets its peak-RSS counter (/proc/self/clear_refs) and reports wall seconds and peak RSS above the
post-load baseline. This counts numpy, torch and everything else the measured call allocates; the
maps and masks themselves are not counted. The plain loop is measured on the first --plain-n maps
and extrapolated linearly to N (fields named *_extrapolated). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------


def make_data(n: int, size: int, seed: int, folder: Path) -> dict:
    """Write masks.npy [n,size,size] bool and maps.npy [n,size,size] float32; return a summary."""
    import torch
    import torch.nn.functional as F
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    masks = np.lib.format.open_memmap(folder / "masks.npy", mode="w+", dtype=bool, shape=(n, size, size))
    maps = np.lib.format.open_memmap(folder / "maps.npy", mode="w+", dtype=np.float32, shape=(n, size, size))
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        mask = np.zeros((size, size), dtype=bool)
        if rng.random() < 0.5:
            for _ in range(rng.integers(1, 4)):
                cy, cx = rng.integers(0, size, 2)
                ry, rx = rng.integers(max(2, size // 60), max(3, size // 9), 2)
                mask |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        grid = torch.from_numpy(rng.standard_normal((1, 1, 37, 37)).astype(np.float32))
        low = F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False)[0, 0].numpy()
        bump = ndimage.gaussian_filter(mask.astype(np.float32), 6.0) * rng.uniform(0.5, 3.0)
        amap = ndimage.gaussian_filter(0.5 * low + bump, 4.0)
        masks[i] = mask
        maps[i] = 1.0 / (1.0 + np.exp(-amap))  # a probability-like map in (0, 1)
    summary = {
        "anomalous_images": int(masks.any(axis=(1, 2)).sum()),
        "anomalous_pixel_fraction": float(masks.mean()),
        "maps_bytes": int(maps.nbytes),
        "masks_bytes": int(masks.nbytes),
    }
    masks.flush()
    maps.flush()
    del masks, maps
    return summary


# ---------------------------------------------------------------------------------------------
# measurements, each in a fresh process
# ---------------------------------------------------------------------------------------------


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _child(task: str, folder: str, limit: int | None, queue) -> None:
    """Load the data, reset the peak, run one task, report (seconds, peak bytes above baseline, value)."""
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "tests"))
    import torch  # noqa: F401  (imported before the baseline)

    import plain_metrics
    from zsadlib import metrics

    masks = np.load(Path(folder) / "masks.npy")
    maps = np.load(Path(folder) / "maps.npy")
    if limit is not None:
        masks, maps = masks[:limit].copy(), maps[:limit].copy()
    labels = masks.any(axis=(1, 2)).astype(np.int64)
    scores = maps.max(axis=(1, 2))
    tasks = {
        "ours_linear200": lambda: metrics.aupro(masks, maps, "linear200"),
        "ours_mvtec": lambda: metrics.aupro(masks, maps, "mvtec"),
        "ours_compute": lambda: metrics.compute(labels, scores, masks, maps),
        "plain_linear200": lambda: plain_metrics.plain_aupro_linear200(masks, maps),
        "plain_linear200_relabel": lambda: plain_metrics.plain_aupro_linear200(
            masks, maps, relabel_each_threshold=True),
    }
    run = tasks[task]
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        peak_reset = True
    except OSError:
        peak_reset = False
    base_kb = _status_kb("VmRSS")
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    value = run()
    seconds = time.perf_counter() - t0
    cpu_seconds = time.process_time() - cpu0
    peak_kb = _status_kb("VmHWM")
    if isinstance(value, dict):
        value = {k: float(v) for k, v in value.items()}
    else:
        value = float(value)
    queue.put({"seconds": seconds, "cpu_seconds": cpu_seconds, "peak_bytes": (peak_kb - base_kb) * 1024,
               "value": value, "peak_reset": peak_reset, "load_1min": os.getloadavg()[0]})


def measure_once(task: str, folder: Path, limit: int | None = None) -> dict:
    """One measurement in a fresh spawned process."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(task, str(folder), limit, queue))
    proc.start()
    result = queue.get()
    proc.join()
    print(f"[bench] {task}{'' if limit is None else f' (first {limit})'}: {result['seconds']:.2f} s "
          f"(cpu {result['cpu_seconds']:.2f} s), peak +{result['peak_bytes'] / 2**20:.0f} MiB, "
          f"load {result['load_1min']:.1f}", file=sys.stderr)
    return result


def measure(task: str, folder: Path, limit: int | None = None, repeat: int = 1) -> dict:
    """`repeat` fresh-process measurements: median seconds, largest peak, all seconds."""
    runs = [measure_once(task, folder, limit) for _ in range(max(1, repeat))]
    return {
        "seconds": float(np.median([r["seconds"] for r in runs])),
        "seconds_all": [round(r["seconds"], 3) for r in runs],
        "cpu_seconds": float(np.median([r["cpu_seconds"] for r in runs])),
        "load_1min": [round(r["load_1min"], 1) for r in runs],
        "peak_bytes": max(r["peak_bytes"] for r in runs),
        "value": runs[0]["value"],
        "peak_reset": all(r["peak_reset"] for r in runs),
    }


# ---------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=500, help="number of maps")
    ap.add_argument("--size", type=int, default=518, help="map side in pixels")
    ap.add_argument("--plain-n", type=int, default=50, help="maps for the plain loop (extrapolated to --n)")
    ap.add_argument("--no-relabel", action="store_true",
                    help="skip the plain loop that relabels regions at every threshold (as the released code)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3,
                    help="fresh-process runs of each fast measurement (median time, largest peak reported)")
    args = ap.parse_args(argv)
    plain_n = min(args.plain_n, args.n)

    with tempfile.TemporaryDirectory(prefix="bench_metrics_") as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        data = make_data(args.n, args.size, args.seed, folder)
        print(f"[bench] data made in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        maps_bytes = data["maps_bytes"]
        os.sync()  # let the data's write-back finish before timing anything
        time.sleep(2.0)

        lin = measure("ours_linear200", folder, repeat=args.repeat)
        mvt = measure("ours_mvtec", folder, repeat=args.repeat)
        full = measure("ours_compute", folder, repeat=args.repeat)
        lin_sub = measure("ours_linear200", folder, plain_n, repeat=args.repeat)
        plain = measure("plain_linear200", folder, plain_n)
        relabel = None if args.no_relabel else measure("plain_linear200_relabel", folder, plain_n)

    scale = args.n / plain_n
    out = {
        "n": args.n,
        "size": args.size,
        "seed": args.seed,
        "repeat": args.repeat,
        "maps_bytes": maps_bytes,
        "masks_bytes": data["masks_bytes"],
        "anomalous_images": data["anomalous_images"],
        "anomalous_pixel_fraction": round(data["anomalous_pixel_fraction"], 5),
    }
    for name, r in (("ours_linear200", lin), ("ours_mvtec", mvt), ("ours_compute", full)):
        out[f"{name}_seconds"] = round(r["seconds"], 3)
        out[f"{name}_seconds_all_runs"] = r["seconds_all"]
        out[f"{name}_cpu_seconds"] = round(r["cpu_seconds"], 3)
        out[f"{name}_peak_bytes"] = r["peak_bytes"]
        out[f"{name}_peak_over_maps_bytes"] = round(r["peak_bytes"] / maps_bytes, 3)
        out[f"{name}_load_1min"] = r["load_1min"]
    out["ours_compute_values"] = full["value"]
    out["plain_n"] = plain_n
    plains = [("plain_linear200", plain)] + ([("plain_linear200_relabel", relabel)] if relabel else [])
    for name, r in plains:
        out[f"{name}_seconds_measured_on_plain_n"] = round(r["seconds"], 3)
        out[f"{name}_cpu_seconds_measured_on_plain_n"] = round(r["cpu_seconds"], 3)
        out[f"{name}_seconds_extrapolated"] = round(r["seconds"] * scale, 3)
        out[f"{name}_cpu_seconds_extrapolated"] = round(r["cpu_seconds"] * scale, 3)
        out[f"{name}_peak_bytes_on_plain_n"] = r["peak_bytes"]
        out[f"{name}_load_1min"] = r["load_1min"]
        out[f"speedup_linear200_vs_{name}_extrapolated"] = round(r["seconds"] * scale / lin["seconds"], 1)
        out[f"speedup_linear200_vs_{name}_extrapolated_cpu_time"] = round(
            r["cpu_seconds"] * scale / lin["cpu_seconds"], 1)
        out[f"speedup_linear200_vs_{name}_same_subset"] = round(r["seconds"] / lin_sub["seconds"], 1)
    out["linear200_ours_minus_plain_on_plain_n"] = lin_sub["value"] - plain["value"]
    out["plain_note"] = ("plain = per-threshold Python loop over images and regions (tests/plain_metrics.py), "
                         "regions labelled once; *_relabel labels them at every threshold as the released "
                         "reference code does")
    out["peak_note"] = ("peak RSS of a fresh process above its RSS after loading the data (maps, masks not "
                        "counted); ours_*: median over --repeat fresh processes, largest peak")
    out["timing_note"] = ("wall and process CPU seconds; load_1min is the machine's load average when each "
                          "run ended (other jobs share the 2 cores, so wall times are noisy)")
    out["peak_reset_ok"] = all(r["peak_reset"] for r in (lin, mvt, full))
    out["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version()}
    import torch

    out["machine"]["torch"] = torch.__version__
    out["machine"]["torch_threads"] = torch.get_num_threads()
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
