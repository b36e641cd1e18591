"""Driver of `just bench-compare`: avi's training iteration against its peers.

For every model x method it

1. asks avi's timer (`avi-step-time --dump`) for the problem: the data, avi's
   initial parameters, and parameters after a few hundred steps with avi's
   ELBO estimate there;
2. checks that every implementation computes avi's objective at those
   parameters (each peer's `--check`; avi's own estimate against the exact
   ELBO of `models.exact_elbo`);
3. times the iteration (draws → ELBO → backward → Adam step) with avi (also
   with its other engines: `--engine fused` on CPU; `--engine graph`, CUDA
   graphs, and `--engine fused`, the F-VI kernels, on CUDA) and with each peer, in separate processes, from the same initial parameters,
   on the same device and with the same threads;

and prints one markdown table (also written, with every number, to
`--out`/table.md and `--out`/results.json).

    python benches/compare/run.py --out out/bench-compare --step-time target/release/avi-step-time
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
# No __pycache__ beside the scripts (here or in the peers run from here).
sys.dont_write_bytecode = True
os.environ["PYTHONDONTWRITEBYTECODE"] = "1"
sys.path.insert(0, str(HERE))
import models as M  # noqa: E402

PEERS = {  # name -> (script, methods)
    "torch": ("torch_eager.py", ("fvi", "avi")),
    "jax": ("jax_jit.py", ("fvi", "avi")),
    "pyro": ("pyro_svi.py", ("fvi",)),
    "numpyro": ("numpyro_svi.py", ("fvi",)),
}
PEER_TITLES = {
    "torch": "PyTorch eager",
    "jax": "JAX jit",
    "pyro": "Pyro SVI",
    "numpyro": "NumPyro SVI",
}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for results.json, table.md and the problems")
    ap.add_argument("--step-time", default=str(ROOT / "target" / "release" / "avi-step-time"),
                    help="avi's timer binary")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--threads", type=int, default=0,
                    help="threads (and cores) for every implementation; 0: all cores this process may use")
    ap.add_argument("--warmup", type=int, default=20, help="untimed iterations first")
    ap.add_argument("--iters", type=int, default=50, help="iterations per timed block")
    ap.add_argument("--repeats", type=int, default=5, help="timed blocks; the median is reported")
    ap.add_argument("--models", default=",".join(M.MODELS))
    ap.add_argument("--methods", default=",".join(M.METHODS))
    ap.add_argument("--peers", default=",".join(PEERS))
    ap.add_argument("--no-check", action="store_true", help="skip the objective checks")
    ap.add_argument("--check-steps", type=int, default=500, help="avi steps to the check parameters")
    ap.add_argument("--check-estimates", type=int, default=100, help="100-draw estimates per statistical check")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds allowed to one process")
    ap.add_argument("--require-targets", action="store_true",
                    help="exit 1 when a row misses the performance targets (see TARGETS)")
    return ap.parse_args()


def pin_threads(threads: int) -> int:
    """Restrict this process (and so every child) to `threads` cores and tell
    OpenMP/MKL to use that many threads; returns the count."""
    cpus = sorted(os.sched_getaffinity(0))
    t = len(cpus) if threads <= 0 else min(threads, len(cpus))
    os.sched_setaffinity(0, cpus[:t])
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(t)
    return t


def run_json(cmd: list[str], timeout: int) -> dict:
    """Run `cmd`; its last stdout line is a JSON object (or an error record)."""
    print("  $", " ".join(str(c) for c in cmd), file=sys.stderr, flush=True)
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=HERE)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    lines = [ln for ln in p.stdout.splitlines() if ln.strip().startswith("{")]
    if p.returncode != 0 or not lines:
        return {"error": f"exit {p.returncode}: {(p.stderr or p.stdout).strip()[-1500:]}"}
    return json.loads(lines[-1])


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "jax", "jaxlib", "optax", "pyro-ppl", "numpyro", "numpy"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def gpu_model() -> str | None:
    """The GPU's name and driver (nvidia-smi), or None."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, check=True).stdout.strip()
        return out.splitlines()[0].replace(", ", ", driver ") if out else None
    except (OSError, subprocess.CalledProcessError):
        return None


def git_commit() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def avi_check(prob: M.Problem) -> dict:
    """avi's estimate (from the dump) against the exact ELBO."""
    exact = M.exact_elbo(prob, prob.check_params)
    est = prob.avi_estimate
    z = (est["mean"] - exact) / est["se"] if est["se"] > 0 else math.inf
    ok = abs(est["mean"] - exact) <= 4 * est["se"] + 1e-6 * abs(exact)
    return {
        "params_after_steps": prob.check_steps,
        "exact_elbo": exact,
        "estimate_draws": est["draws"],
        "estimate_mean": est["mean"],
        "estimate_se": est["se"],
        "z_score": z,
        "statistical_pass": bool(ok),
        "pass": bool(ok),
    }


def fmt_ms(r: dict | None) -> str:
    if r is None:
        return "—"
    if "error" in r:
        return "error"
    if "skipped" in r:
        return "skipped"
    return f"{r['ms_per_iteration']:.2f}"


def memory(r: dict | None, device: str) -> str:
    if r is None or "ms_per_iteration" not in r:
        return "—"
    if device == "cuda":
        v = r.get("gpu_allocator_peak_mib")
        smi = r.get("gpu_mib")
        return ("?" if v is None else f"{v:.1f}" if v < 10 else f"{v:.0f}") + ("" if smi is None else f" ({smi:.0f})")
    v = r.get("peak_rss_mib")
    return "?" if v is None else f"{v:.0f}"


def extra_engines(device: str) -> list[str]:
    """avi's engines beside `torch`: the fused CPU engine on CPU; CUDA graphs
    and the fused CUDA kernels (F-VI only) on CUDA."""
    return ["graph", "fused"] if device == "cuda" else ["fused"]


def fastest_avi(row: dict, device: str) -> dict | None:
    """The fastest of avi's engines (the one the speed-ups are taken against)."""
    found = [row["timings"].get(k) for k in ("avi", *(f"avi_{e}" for e in extra_engines(device)))]
    found = [r for r in found if r is not None and "ms_per_iteration" in r]
    return min(found, key=lambda r: r["ms_per_iteration"]) if found else None


# The performance issue's targets: the largest allowed ratio avi ms ÷ peer ms
# (fastest avi engine, same run), per device.
TARGETS = {
    "cpu": {"jax": 0.5, "torch": 0.3},
    "cuda": {"torch": 0.1},
}


def target_misses(rows: list[dict], device: str) -> tuple[list[str], int]:
    """Each (row, peer) ratio above its target in TARGETS, as a line, and the
    number of ratios checked; a row without both timings is not checked."""
    misses, checked = [], 0
    for row in rows:
        ours = fastest_avi(row, device)
        for peer, limit in TARGETS.get(device, {}).items():
            r = row["timings"].get(peer)
            if ours is None or r is None or "ms_per_iteration" not in r:
                continue
            checked += 1
            ratio = ours["ms_per_iteration"] / r["ms_per_iteration"]
            if not ratio <= limit:
                misses.append(f"{row['model']}/{row['method']}: {ratio:.3f}× {PEER_TITLES[peer]} "
                              f"(target ≤ {limit}×)")
    return misses, checked


def targets_line(rows: list[dict], device: str) -> str:
    """One line: which targets were checked and whether every ratio met them."""
    limits = ", ".join(f"≤ {v}× {PEER_TITLES[k]}" for k, v in TARGETS.get(device, {}).items())
    misses, checked = target_misses(rows, device)
    if checked == 0:
        return f"Targets ({device}: {limits}): not checked (no peer timings)."
    if not misses:
        return f"Targets ({device}: {limits}): met by all {checked} ratios."
    return (f"Targets ({device}: {limits}): {len(misses)} of {checked} ratios MISSED: "
            + "; ".join(misses) + ".")


def table(rows: list[dict], peers: list[str], device: str) -> str:
    mem = ("GPU MiB: allocator peak (nvidia-smi)" if device == "cuda" else "peak RSS MiB")
    head = ["model", "method", "family", "avi ms"] + [f"avi {e} ms" for e in extra_engines(device)]
    head += [f"{PEER_TITLES[p]} ms (speed-up)" for p in peers]
    head += [f"{mem}: fastest avi / " + " / ".join(peers), "objective check"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for row in rows:
        ours = fastest_avi(row, device)
        cells = [row["model"], row["method"], row["family"], fmt_ms(row["timings"].get("avi"))]
        cells += [fmt_ms(row["timings"].get(f"avi_{e}")) for e in extra_engines(device)]
        for p in peers:
            r = row["timings"].get(p)
            cell = fmt_ms(r)
            if r is not None and "ms_per_iteration" in r and ours and "ms_per_iteration" in ours:
                cell += f" (×{r['ms_per_iteration'] / ours['ms_per_iteration']:.2f})"
            cells.append(cell)
        cells.append(" / ".join([memory(ours, device)] + [memory(row["timings"].get(k), device) for k in peers]))
        checks = row.get("checks", {})
        if not checks:
            cells.append("not run")
        else:
            bad = [k for k, c in checks.items() if not c.get("pass")]
            cells.append("pass (" + ", ".join(checks) + ")" if not bad else "FAIL: " + ", ".join(bad))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    out = Path(args.out).resolve()
    (out / "problems").mkdir(parents=True, exist_ok=True)
    threads = pin_threads(args.threads)
    step_time = str(Path(args.step_time).resolve())
    peers = [p for p in args.peers.split(",") if p]
    for p in peers:
        if p not in PEERS:
            raise SystemExit(f"unknown peer {p!r}; known: {', '.join(PEERS)}")
    timing = ["--warmup", str(args.warmup), "--iters", str(args.iters), "--repeats", str(args.repeats)]
    common = ["--device", args.device, "--threads", str(threads)]
    py = sys.executable

    rows = []
    for model in args.models.split(","):
        for method in args.methods.split(","):
            print(f"{model} / {method}", file=sys.stderr, flush=True)
            dump = out / "problems" / f"{model}-{method}.json"
            d = run_json([step_time, "--model", model, "--method", method, *common, "--dump", str(dump),
                          "--check-steps", str(0 if args.no_check else args.check_steps)], args.timeout)
            row = {"model": model, "method": method, "family": M.function_label(model, method),
                   "timings": {}, "checks": {}}
            if "error" in d:
                row["error"] = "avi-step-time --dump: " + d["error"]
                rows.append(row)
                continue
            prob = M.load_problem(model, method, str(dump))
            row["num_parameters"] = prob.num_parameters()
            row["n"] = prob.n
            active = [p for p in peers if method in PEERS[p][1]]
            if not args.no_check:
                row["checks"]["avi"] = avi_check(prob)
                for p in active:
                    r = run_json([py, PEERS[p][0], "--model", model, "--method", method, "--init", str(dump),
                                  *common, "--check", "--check-estimates", str(args.check_estimates)],
                                 args.timeout)
                    if "skipped" not in r:
                        row["checks"][p] = r.get("check", r)
            row["timings"]["avi"] = run_json(
                [step_time, "--model", model, "--method", method, *common, *timing], args.timeout)
            for engine in extra_engines(args.device):
                if args.device == "cuda" and engine == "fused" and method != "fvi":
                    continue  # the CUDA kernels cover F-VI
                row["timings"][f"avi_{engine}"] = run_json(
                    [step_time, "--model", model, "--method", method, *common, *timing,
                     "--engine", engine], args.timeout)
            for p in active:
                row["timings"][p] = run_json(
                    [py, PEERS[p][0], "--model", model, "--method", method, "--init", str(dump),
                     *common, *timing], args.timeout)
            rows.append(row)

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": args.device,
        "threads": threads,
        "cores": sorted(os.sched_getaffinity(0)),
        "cpu": cpu_model(),
        "gpu": gpu_model() if args.device == "cuda" else None,
        "warmup": args.warmup,
        "iters": args.iters,
        "repeats": args.repeats,
        "draws": 100,
        "dtype": "f32",
        "commit": git_commit(),
        "versions": versions(),
    }
    md = table(rows, peers, args.device)
    v = env["versions"]
    header = (
        f"Per-iteration time (draws → ELBO → backward → Adam step), median of {args.repeats} blocks of "
        f"{args.iters} iterations after {args.warmup} warm-up ones; {args.device}, {threads} thread(s) "
        f"({env['cpu']}{', ' + env['gpu'] if env.get('gpu') else ''}), 100 draws, f32. "
        f"Speed-up = peer ms / the faster avi engine's ms (> 1: avi is faster). "
        f"torch {v['torch']}, jax {v['jax']}, optax {v['optax']}, pyro {v['pyro-ppl']}, "
        f"numpyro {v['numpyro']}; commit {env['commit']}, {env['date']}."
    )
    errors = [f"- {r['model']}/{r['method']} {k}: {t['error']}" for r in rows
              for k, t in r["timings"].items() if "error" in t]
    errors += [f"- {r['model']}/{r['method']}: {r['error']}" for r in rows if "error" in r]
    text = header + "\n\n" + md + "\n\n" + targets_line(rows, args.device) + "\n" + ("\nErrors:\n" + "\n".join(errors) + "\n" if errors else "")
    (out / "table.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=2))
    print(text)
    print(f"written: {out / 'table.md'}, {out / 'results.json'}", file=sys.stderr)
    failed = [f"{r['model']}/{r['method']} {k}" for r in rows for k, c in r.get("checks", {}).items()
              if not c.get("pass")]
    if failed:
        print("objective check failed: " + ", ".join(failed), file=sys.stderr)
    missed = args.require_targets and target_misses(rows, args.device)[0]
    if missed:
        print("performance targets missed (--require-targets)", file=sys.stderr)
    if failed or errors or missed:
        sys.exit(1)


if __name__ == "__main__":
    main()
