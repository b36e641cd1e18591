"""The problems of `just bench-compare`, shared by every peer script.

One problem is a model x method at the paper's sizes (digest sections 4.2,
4.3, 4.5), with the log joint of avi's Rust models (crates/avi-models), every
normalising constant included:

    linear     p(θ) ∝ 1, z_n ~ N(0, 1), x_n ~ N(θ + τ z_n, σ²)
               τ = 1.155, σ = 2.43, N = 10,000
    nonlinear  θ ~ N(0, 1), z_n ~ N(0, 1),
               x_n ~ N(θ + z_n (1 + sin z_n), exp(cos z_n)²), N = 10,000
    saw        θ ~ N(0, 1), z_n ~ N(x_{n-1}, 1), x_n ~ N(α (θ + z_n), 1),
               α = 0.75, x_0 = 0, N = 1,000

and avi's objective: the Monte Carlo ELBO over M = 100 reparameterised draws
with the MC entropy (`-log q` at the same draws, avi's default `Entropy::Mc`),

    ELBO_hat = (1/M) Σ_m [log p(x, θ_m, z_m) - log q(θ_m, z_m)],

q a mean-field Gaussian parameterised by (mean, log sd). Methods:

    fvi  a free (mean, log sd) per z_n, plus q(θ)       2N + 2 parameters
    avi  q(θ) plus the paper's inference function of standardised inputs
         (u = (x - mean x) / sd x, the series padded with x_0 beyond its start):
         linear    mean = a0 + a1 u, one shared log sd               5
         nonlinear two MLPs 1→16→16→1 (ReLU), mean and log sd       644
         saw       one MLP (x_{n-1}, x_n) → 10 → 10 → (mean, log sd) 164

A problem is read from the JSON that `avi-step-time --dump` writes (the data as
avi uses it and avi's initial parameters, so that every implementation starts
from the same point) or, without one, simulated here with numpy.

This module also holds the float64 numpy references of the objective check:
`elbo_draws_np` (the per-draw ELBO at given standard-normal draws) and
`exact_elbo` (the expectation itself, in closed form for the linear and saw
models and by Gauss–Hermite quadrature for the nonlinear one).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field

import numpy as np

HALF_LN_2PI = 0.5 * math.log(2.0 * math.pi)

MODELS = ("linear", "nonlinear", "saw")
METHODS = ("fvi", "avi")

# Keep in step with `problem()` in benches/src/bin/avi-step-time.rs.
CONFIGS = {
    "linear": {
        "n": 10_000,
        "data_seed": 7,
        "settings": {"tau": 1.155, "sigma": 2.43},
        "lr": {"fvi": 1e-3, "avi": 1e-2},
        "avi": {"kind": "poly", "degree": 1, "window": [0, 0]},
    },
    "nonlinear": {
        "n": 10_000,
        "data_seed": 1789,
        "settings": {},
        "lr": {"fvi": 1e-2, "avi": 1e-2},
        "avi": {"kind": "mlp", "width": 16, "heads": "separate", "window": [0, 0]},
    },
    "saw": {
        "n": 1_000,
        "data_seed": 2012,
        "settings": {"alpha": 0.75, "x0": 0.0},
        "lr": {"fvi": 1e-3, "avi": 1e-3},
        "avi": {"kind": "mlp", "width": 10, "heads": "shared", "window": [1, 0]},
    },
}


def function_label(model: str, method: str) -> str:
    """The table's description of the local family."""
    if method == "fvi":
        return "free"
    f = CONFIGS[model]["avi"]
    if f["kind"] == "poly":
        return f"poly{f['degree']}"
    w = f["window"]
    win = "" if w == [0, 0] else f" w[{w[0]},{w[1]}]"
    return f"mlp{f['width']} {f['heads']}{win}"


@dataclass
class Problem:
    """One model x method: data, settings and variational parameters."""

    model: str
    method: str
    x: np.ndarray  # [N] float64 (values of the f32 data avi uses)
    settings: dict
    lr: float
    draws: int
    params: dict  # name -> float64 array; avi's VarStore names
    check_params: dict | None = None
    check_steps: int = 0
    avi_estimate: dict | None = None  # avi's ELBO estimate at check_params
    function: dict | None = field(default=None)

    @property
    def n(self) -> int:
        return int(self.x.shape[0])

    def num_parameters(self, params: dict | None = None) -> int:
        return int(sum(v.size for v in (params or self.params).values()))

    def inputs(self) -> np.ndarray:
        """The `[N, I]` A-VI inputs: windows of the standardised series."""
        before, after = self.function["window"]
        x = self.x
        pad = self.settings.get("x0", 0.0)
        mean, sd = x.mean(), x.std()
        sd = sd if sd > 0 else 1.0
        padded = np.concatenate([np.full(before, pad), x, np.full(after, pad)])
        padded = (padded - mean) / sd
        w = before + after + 1
        return np.stack([padded[i : i + self.n] for i in range(w)], axis=1)


def _params_from_json(d: dict) -> dict:
    return {
        k: np.asarray(v["values"], dtype=np.float64).reshape(v["shape"])
        for k, v in d.items()
    }


def load_problem(model: str, method: str, init: str | None, seed: int = 0) -> Problem:
    """The problem from avi's dump `init`, or simulated with numpy."""
    cfg = CONFIGS[model]
    function = cfg["avi"] if method == "avi" else None
    if init:
        with open(init) as f:
            d = json.load(f)
        if (d["model"], d["method"]) != (model, method):
            raise SystemExit(f"{init} holds {d['model']}/{d['method']}, not {model}/{method}")
        if function and d["method_config"].get("window") != function["window"]:
            raise SystemExit(f"{init}: window {d['method_config'].get('window')} != {function['window']}")
        check = d.get("check") or {}
        return Problem(
            model=model,
            method=method,
            x=np.asarray(d["x"], dtype=np.float64),
            settings=d["settings"],
            lr=float(d["lr"]),
            draws=int(d["draws"]),
            params=_params_from_json(d["params"]),
            check_params=_params_from_json(check["params"]) if check else None,
            check_steps=int(check.get("steps", 0)),
            avi_estimate=check.get("elbo_estimate"),
            function=function,
        )
    rng = np.random.default_rng(cfg["data_seed"])
    x = simulate(model, cfg["n"], cfg["settings"], rng).astype(np.float32).astype(np.float64)
    prob = Problem(model, method, x, dict(cfg["settings"]), cfg["lr"][method], 100, {}, function=function)
    prob.params = init_params(prob, np.random.default_rng(seed))
    return prob


def simulate(model: str, n: int, s: dict, rng: np.random.Generator) -> np.ndarray:
    """Data from the model (θ ~ N(0, 1); saw θ = 3.4159)."""
    if model == "linear":
        theta = rng.standard_normal()
        return theta + s["tau"] * rng.standard_normal(n) + s["sigma"] * rng.standard_normal(n)
    if model == "nonlinear":  # z ~ N(0, 1), as data/experiments/nonlinear.json
        theta = rng.standard_normal()
        z = rng.standard_normal(n)
        return theta + z * (1 + np.sin(z)) + np.exp(np.cos(z)) * rng.standard_normal(n)
    theta, prev, x = 3.4159, s["x0"], np.empty(n)
    for i in range(n):
        z = prev + rng.standard_normal()
        prev = x[i] = s["alpha"] * (theta + z) + rng.standard_normal()
    return x


def init_params(prob: Problem, rng: np.random.Generator) -> dict:
    """avi's initialisation: m_θ, log s_θ ~ N(0, 1); F-VI rows ~ U[0, 1);
    polynomial coefficients and log sd ~ N(0, 1); MLP layers uniform in
    ±1/sqrt(fan_in)."""
    p = {"theta_mean": rng.standard_normal(1), "theta_log_sd": rng.standard_normal(1)}
    if prob.method == "fvi":
        p["z"] = rng.uniform(size=(prob.n, 2))
        return p
    f = prob.function
    if f["kind"] == "poly":
        p["fn.coefficients"] = rng.standard_normal(f["degree"] + 1)
        p["fn.log_sd"] = rng.standard_normal(1)
        return p
    i, k = sum(f["window"]) + 1, f["width"]

    def linear(name, fan_in, fan_out):
        b = 1.0 / math.sqrt(fan_in)
        p[f"{name}.weight"] = rng.uniform(-b, b, size=(fan_out, fan_in))
        p[f"{name}.bias"] = rng.uniform(-b, b, size=fan_out)

    trunks = [("fn.trunk", "fn.head")]
    if f["heads"] == "separate":
        trunks.append(("fn.log_sd_trunk", "fn.log_sd_head"))
    for trunk, head in trunks:
        linear(f"{trunk}.hidden0", i, k)
        linear(f"{trunk}.hidden1", k, k)
        linear(head, k, 1 if f["heads"] == "separate" else 2)
    return p


# ---------------------------------------------------------------- references


def mlp_np(params: dict, prefix: str, head: str, u: np.ndarray) -> np.ndarray:
    h = u
    for layer in ("hidden0", "hidden1"):
        h = np.maximum(h @ params[f"{prefix}.{layer}.weight"].T + params[f"{prefix}.{layer}.bias"], 0.0)
    return h @ params[f"{head}.weight"].T + params[f"{head}.bias"]


def local_params_np(prob: Problem, params: dict) -> tuple[np.ndarray, np.ndarray]:
    """`[N]` means and log sds of q(z_n), float64."""
    if prob.method == "fvi":
        return params["z"][:, 0], params["z"][:, 1]
    f, u = prob.function, prob.inputs()
    if f["kind"] == "poly":
        c = params["fn.coefficients"]
        mean = np.zeros(prob.n)
        for a in c[::-1]:
            mean = mean * u[:, 0] + a
        return mean, np.full(prob.n, params["fn.log_sd"][0])
    if f["heads"] == "separate":
        return (
            mlp_np(params, "fn.trunk", "fn.head", u)[:, 0],
            mlp_np(params, "fn.log_sd_trunk", "fn.log_sd_head", u)[:, 0],
        )
    out = mlp_np(params, "fn.trunk", "fn.head", u)
    return out[:, 0], out[:, 1]


def log_joint_np(prob: Problem, theta: np.ndarray, z: np.ndarray) -> np.ndarray:
    """log p(θ_m, z_m, x) for `[M]` θ and `[M, N]` z, float64, term by term."""
    x, s, n = prob.x, prob.settings, prob.n
    t = theta[:, None]
    if prob.model == "linear":
        r = (x - t - s["tau"] * z) / s["sigma"]
        per_n = -0.5 * z**2 - 0.5 * r**2 - math.log(s["sigma"]) - 2 * HALF_LN_2PI
        return per_n.sum(1)
    prior = -0.5 * theta**2 - HALF_LN_2PI
    if prob.model == "nonlinear":
        r = (x - t - z * (1 + np.sin(z))) / np.exp(np.cos(z))
        per_n = -0.5 * z**2 - 0.5 * r**2 - np.cos(z) - 2 * HALF_LN_2PI
        return prior + per_n.sum(1)
    prev = np.concatenate([[s["x0"]], x[:-1]])
    per_n = -0.5 * (z - prev) ** 2 - 0.5 * (x - s["alpha"] * (t + z)) ** 2 - 2 * HALF_LN_2PI
    return prior + per_n.sum(1)


def elbo_draws_np(prob: Problem, params: dict, eps_theta: np.ndarray, eps_z: np.ndarray) -> np.ndarray:
    """Per-draw `log p - log q` at θ = m + s ε_θ, z = m + s ε_z (float64)."""
    mt, lst = params["theta_mean"][0], params["theta_log_sd"][0]
    mz, lsz = local_params_np(prob, params)
    theta = mt + math.exp(lst) * eps_theta
    z = mz + np.exp(lsz) * eps_z
    log_q = (
        -lst - 0.5 * eps_theta**2 - HALF_LN_2PI
        + (-lsz - 0.5 * eps_z**2 - HALF_LN_2PI).sum(1)
    )
    return log_joint_np(prob, theta, z) - log_q


def exact_elbo(prob: Problem, params: dict, nodes: int = 201) -> float:
    """E_q[log p - log q] without Monte Carlo error (float64)."""
    x, s, n = prob.x, prob.settings, prob.n
    mt, vt = params["theta_mean"][0], math.exp(2 * params["theta_log_sd"][0])
    mz, lsz = local_params_np(prob, params)
    vz = np.exp(2 * lsz)
    entropy = params["theta_log_sd"][0] + lsz.sum() + (n + 1) * (0.5 + HALF_LN_2PI)
    if prob.model == "linear":
        t, sg = s["tau"], s["sigma"]
        e_r2 = (x - mt - t * mz) ** 2 + vt + t * t * vz
        e_log_p = (-0.5 * (mz**2 + vz) - 0.5 * e_r2 / sg**2 - math.log(sg) - 2 * HALF_LN_2PI).sum()
        return float(e_log_p + entropy)
    prior = -0.5 * (mt**2 + vt) - HALF_LN_2PI
    if prob.model == "saw":
        a = s["alpha"]
        prev = np.concatenate([[s["x0"]], x[:-1]])
        e = (
            -0.5 * ((mz - prev) ** 2 + vz)
            - 0.5 * ((x - a * (mt + mz)) ** 2 + a * a * (vt + vz))
            - 2 * HALF_LN_2PI
        )
        return float(prior + e.sum() + entropy)
    # nonlinear: E[z²] and E[cos z] in closed form; the residual term
    # E[(x - θ - g(z))² e^{-2 cos z}] = E_t[((x - g(z) - m_θ)² + v_θ) e^{-2 cos z}],
    # z = m_z + s_z t, t ~ N(0, 1), by the trapezoid rule on t ∈ [-12, 12]
    # (geometric convergence for smooth integrands against the normal
    # density), doubling the grid until two rules agree to 1e-10 relative;
    # a wide q(z_n) makes the integrand oscillate and needs a fine grid.
    def quad(k: int) -> float:
        t = np.linspace(-12.0, 12.0, k)
        w = np.exp(-0.5 * t * t) * (t[1] - t[0]) / math.sqrt(2 * math.pi)
        total = 0.0
        for lo in range(0, n, 512):
            sl = slice(lo, lo + 512)
            zz = mz[sl, None] + np.sqrt(vz[sl])[:, None] * t[None, :]
            h = ((x[sl, None] - zz * (1 + np.sin(zz)) - mt) ** 2 + vt) * np.exp(-2 * np.cos(zz))
            total += float((h @ w).sum())
        return total

    k, e_quad = nodes, quad(nodes)
    while k < 8192:
        k = 2 * k - 1
        finer = quad(k)
        done = abs(finer - e_quad) <= 1e-10 * abs(finer)
        e_quad = finer
        if done:
            break
    e_cos = np.cos(mz) * np.exp(-0.5 * vz)
    e = -0.5 * (mz**2 + vz) - e_cos - 2 * HALF_LN_2PI
    return float(prior + e.sum() - 0.5 * e_quad + entropy)


# ------------------------------------------------------------- the checks


def check_report(
    prob: Problem,
    det_got: np.ndarray,
    det_want: np.ndarray,
    estimates: list[float],
) -> dict:
    """The objective check of one implementation at the check parameters.

    1. Deterministic: the implementation's per-draw ELBO at given standard
       normal draws against the float64 reference `elbo_draws_np`; passes at
       a relative error below 1e-5 (float32 sums of N terms).
    2. Statistical: the mean of repeated 100-draw estimates of the timed
       objective against the exact ELBO; passes when the difference is within
       4 standard errors (plus 1e-6 relative for float32 rounding).
    """
    params = prob.check_params if prob.check_params is not None else prob.params
    exact = exact_elbo(prob, params)
    rel = float(np.max(np.abs(det_got - det_want) / np.maximum(np.abs(det_want), 1e-300)))
    est = np.asarray(estimates, dtype=np.float64)
    mean, se = float(est.mean()), float(est.std(ddof=1) / math.sqrt(est.size))
    z = (mean - exact) / se if se > 0 else float("inf") * (mean != exact)
    ok_det = rel < 1e-5
    ok_stat = abs(mean - exact) <= 4 * se + 1e-6 * abs(exact)
    return {
        "params_after_steps": prob.check_steps,
        "exact_elbo": exact,
        "deterministic_max_rel_err": rel,
        "deterministic_pass": bool(ok_det),
        "estimates": int(est.size),
        "draws_per_estimate": prob.draws,
        "estimate_mean": mean,
        "estimate_se": se,
        "z_score": float(z),
        "statistical_pass": bool(ok_stat),
        "pass": bool(ok_det and ok_stat),
    }


def check_draws(prob: Problem, m: int = 4, seed: int = 12345) -> tuple[np.ndarray, np.ndarray]:
    """Standard normal `[m]` θ draws and `[m, N]` z draws for check 1."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal(m), rng.standard_normal((m, prob.n))


# ------------------------------------------------------------- timing, I/O


def cli(description: str, methods: tuple[str, ...] = METHODS) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--model", choices=MODELS, required=True)
    ap.add_argument("--method", choices=methods, required=True)
    ap.add_argument("--init", help="problem JSON written by `avi-step-time --dump`")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="0: the framework's default")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", action="store_true", help="run the objective check instead of timing")
    ap.add_argument("--check-estimates", type=int, default=100, help="100-draw estimates in check 2")
    return ap.parse_args()


def time_steps(step, sync, warmup: int, iters: int, repeats: int) -> list[float]:
    """Milliseconds per step of each of `repeats` blocks of `iters` steps,
    after `warmup` steps; `sync()` waits for queued work before each clock
    read."""
    for _ in range(warmup):
        step()
    sync()
    ms = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        for _ in range(iters):
            step()
        sync()
        ms.append((time.perf_counter() - t0) * 1e3 / iters)
    return ms


def peak_rss_mib() -> float:
    """Peak resident set size of this process (ru_maxrss, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def gpu_process_mib() -> float | None:
    """GPU memory of this process according to nvidia-smi (context plus
    allocator reserve), the figure every framework can report."""
    import subprocess

    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, check=False,
        ).stdout
    except OSError:
        return None
    for line in out.splitlines():
        f = [c.strip() for c in line.split(",")]
        if len(f) == 2 and f[0] == str(os.getpid()):
            return float(f[1])
    return None


def timing_report(framework: str, args, prob: Problem, ms: list[float], num_parameters: int, **extra) -> dict:
    return {
        "framework": framework,
        "model": prob.model,
        "method": prob.method,
        "function": function_label(prob.model, prob.method),
        "n": prob.n,
        "draws": prob.draws,
        "num_parameters": num_parameters,
        "ms_per_iteration": statistics.median(ms),
        "ms_repeats": ms,
        "warmup": args.warmup,
        "iters": args.iters,
        "repeats": args.repeats,
        "peak_rss_mib": peak_rss_mib(),
        "python": platform.python_version(),
        **extra,
    }


def emit(obj: dict) -> None:
    """Print the result as the last line of stdout (what run.py reads)."""
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()
