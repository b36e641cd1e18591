"""Driver of `just bench-sweep`: how avi's training iteration grows with N.

For `linear` and `saw`, F-VI and A-VI, and avi's engines (`torch` and
`fused` on CPU; `torch`, `graph` (CUDA graphs) and `fused` (the F-VI kernels)
on CUDA), it times one iteration (100 draws) with `avi-step-time --n N`
for N = 10^3 ... 10^6 and fits the exponent b of `time ∝ N^b` by least
squares on log time vs log N over the points with N ≥ 10^4 (below that the
fixed per-step cost dominates; the fit over all points is reported too).
b ≈ 1 means the cost is linear in N × draws. It also reports the number of
variational parameters (A-VI's does not depend on N), the elements
(N × draws) processed per second and the peak memory of the run at the
largest N (the process's peak RSS on CPU; the CUDA allocator's peak on
CUDA), each configuration timed in its own process.

    python benches/sweep.py --out out/bench-sweep --step-time target/release/avi-step-time --threads 1

Writes `results.json` (every number) and `table.md` to `--out`;
`--from-results FILE` rebuilds `table.md` in `--out` from a stored
`results.json` without timing anything.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

SIZES = (1_000, 10_000, 100_000, 1_000_000)
DRAWS = 100


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for results.json and table.md")
    ap.add_argument("--step-time", help="avi's timer binary (avi-step-time); required unless --from-results")
    ap.add_argument("--from-results", help="rebuild table.md from this results.json; time nothing")
    ap.add_argument("--threads", type=int, default=1, help="threads of every run (default 1)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--models", default="linear,saw")
    ap.add_argument("--methods", default="fvi,avi")
    ap.add_argument("--sizes", default=",".join(str(n) for n in SIZES),
                    help="comma-separated N values")
    ap.add_argument("--engines", default="",
                    help="comma-separated engines (default: torch,fused on CPU; torch,graph,fused on CUDA)")
    ap.add_argument("--budget-s", type=float, default=0.5,
                    help="target seconds per timed block (sets --iters per N)")
    return ap.parse_args()


def run(binary: str, args: list[str]) -> dict:
    proc = subprocess.run([binary, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"error: {binary} {' '.join(args)} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def slope(points: list[tuple[int, float]]) -> float | None:
    """Least-squares slope of log(ms) on log(N)."""
    if len(points) < 2:
        return None
    xs = [math.log(n) for n, _ in points]
    ys = [math.log(ms) for _, ms in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx


def gpu_model() -> str | None:
    """The GPU's name and driver (nvidia-smi), or None."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, check=True).stdout.strip()
        return out.splitlines()[0] if out else None
    except (OSError, subprocess.CalledProcessError):
        return None


def write_atomic(path: Path, text: str) -> None:
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False) as f:
        f.write(text)
        tmp = Path(f.name)
    tmp.chmod(0o644)
    tmp.replace(path)


def render_table(meta: dict, rows: list[dict]) -> str:
    """The markdown table of a sweep's results (rows as in results.json)."""
    sizes = meta["sizes"]
    cuda = meta["device"] == "cuda"
    memory = "CUDA allocator peak MiB" if cuda else "peak RSS MiB"
    fits = [r for r in rows if "exponent" in r]
    times = [r for r in rows if "exponent" not in r]
    lines = [
        f"N sweep of one training iteration ({meta['draws']} draws), {meta['device']}, "
        f"{meta['threads']} thread(s); "
        f"time ∝ N^b fitted on N ≥ 10^4 (b over all N in brackets).",
        "",
        "| model | method | engine | " + " | ".join(f"N = {n:,} ms" for n in sizes)
        + f" | b (all) | parameters at the largest N | M elements/s at the largest N | {memory} at the largest N |",
        "|---" * (7 + len(sizes)) + "|",
    ]
    for f in fits:
        pts = [r for r in times if (r["model"], r["method"], r["engine"]) ==
               (f["model"], f["method"], f["engine"])]
        cells = " | ".join(f"{r['ms_per_iteration']:.3f}" for r in pts)
        b = "n/a" if f["exponent"] is None else f"{f['exponent']:.3f}"
        ball = "n/a" if f["exponent_all"] is None else f"{f['exponent_all']:.3f}"
        peak = pts[-1].get("gpu_allocator_peak_mib" if cuda else "peak_rss_mib")
        peak = "n/a" if peak is None else f"{peak:,.0f}"
        lines.append(f"| {f['model']} | {f['method']} | {f['engine']} | {cells} | {b} ({ball}) | "
                     f"{pts[-1]['num_parameters']:,} | {pts[-1]['elements_per_s'] / 1e6:.1f} | {peak} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    a = parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.from_results:
        stored = json.loads(Path(a.from_results).read_text())
        write_atomic(out / "table.md", render_table(stored["meta"], stored["rows"]))
        return
    if not a.step_time:
        sys.exit("error: --step-time is required (or --from-results)")
    sizes = [int(s) for s in a.sizes.split(",")]
    engines = a.engines.split(",") if a.engines else (
        ["torch", "fused"] if a.device == "cpu" else ["torch", "graph", "fused"])
    rows = []
    for model in a.models.split(","):
        for method in a.methods.split(","):
            for engine in engines:
                if a.device == "cuda" and engine == "fused" and method != "fvi":
                    continue  # the CUDA kernels cover F-VI
                points = []
                for n in sizes:
                    # One probe step count: fewer iterations for large N so a
                    # block lasts about --budget-s.
                    probe = run(a.step_time, ["--model", model, "--method", method,
                                              "--device", a.device, "--threads", str(a.threads),
                                              "--engine", engine, "--n", str(n),
                                              "--warmup", "2", "--iters", "2", "--repeats", "1"])
                    iters = max(2, min(50, int(a.budget_s * 1e3 / max(probe["ms_per_iteration"], 1e-3))))
                    r = run(a.step_time, ["--model", model, "--method", method,
                                          "--device", a.device, "--threads", str(a.threads),
                                          "--engine", engine, "--n", str(n),
                                          "--warmup", str(max(2, iters // 5)), "--iters", str(iters),
                                          "--repeats", "5"])
                    if not math.isfinite(r.get("final_elbo") or float("nan")):
                        sys.exit(f"error: {model} {method} {engine} N={n}: non-finite ELBO")
                    points.append((n, r["ms_per_iteration"]))
                    rows.append({"model": model, "method": method, "engine": engine, "n": n,
                                 "draws": DRAWS, "ms_per_iteration": r["ms_per_iteration"],
                                 "ms_repeats": r["ms_repeats"],
                                 "elements_per_s": n * DRAWS / (r["ms_per_iteration"] / 1e3),
                                 "num_parameters": r["num_parameters"],
                                 "peak_rss_mib": r["peak_rss_mib"],
                                 "gpu_allocator_peak_mib": r.get("gpu_allocator_peak_mib"),
                                 "threads": r["threads"]})
                    print(f"{model:7} {method:4} {engine:6} N={n:>8}: {r['ms_per_iteration']:10.3f} ms"
                          f"  params {r['num_parameters']}", flush=True)
                big = [p for p in points if p[0] >= 10_000]
                rows.append({"model": model, "method": method, "engine": engine,
                             "exponent": slope(big), "exponent_all": slope(points)})
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.processor() or platform.machine(),
        "gpu": gpu_model() if a.device == "cuda" else None,
        "cpus": os.cpu_count(),
        "device": a.device,
        "threads": a.threads,
        "sizes": sizes,
        "draws": DRAWS,
    }
    table = render_table(meta, rows)
    print(table)
    write_atomic(out / "results.json", json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    write_atomic(out / "table.md", table)


if __name__ == "__main__":
    main()
