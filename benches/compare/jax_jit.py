"""JAX peer: the whole training iteration under one `jax.jit`.

The parameters are a dict pytree (the MLPs as explicit weight matrices, laid
out as avi's `nn::Linear`: `y = u Wᵀ + b`), the log joint is written term by
term as in `models.log_joint_np`, `log q` from the draws, and the iteration
`jax.value_and_grad` of the negative ELBO followed by `optax.adam` (default
betas and eps) is one jitted function of (params, Adam state, PRNG key).
Timing waits with `jax.block_until_ready`. float32 throughout.

    python jax_jit.py --model saw --method avi --init saw-avi.json
    python jax_jit.py --model saw --method avi --init saw-avi.json --check
"""

from __future__ import annotations

import math
import os
import sys

import numpy as np

import models as M

HALF_LN_2PI = M.HALF_LN_2PI


def configure_threads(threads: int) -> None:
    """XLA's CPU thread pools follow the process's CPU affinity (run.py pins
    every process to the same cores); one thread also turns off Eigen's
    multi-threading. Must run before jax is imported."""
    if threads == 1:
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1".strip()


def build(prob: M.Problem, params_np: dict):
    """(params pytree, elbo_draws(params, eps_theta, eps_z) -> [M])."""
    import jax.numpy as jnp

    f32 = lambda a: jnp.asarray(np.asarray(a), dtype=jnp.float32)  # noqa: E731
    x = f32(prob.x)
    s = prob.settings
    params = {"theta_mean": f32(params_np["theta_mean"]), "theta_log_sd": f32(params_np["theta_log_sd"])}
    if prob.method == "fvi":
        params["m_z"] = f32(params_np["z"][:, 0])
        params["log_s_z"] = f32(params_np["z"][:, 1])
    else:
        params.update({k: f32(v) for k, v in params_np.items() if k.startswith("fn.")})
        u = f32(prob.inputs())
    f = prob.function
    x_prev = jnp.concatenate([f32([s.get("x0", 0.0)]), x[:-1]])

    def mlp(p, prefix, head):
        h = u
        for layer in ("hidden0", "hidden1"):
            h = jnp.maximum(h @ p[f"{prefix}.{layer}.weight"].T + p[f"{prefix}.{layer}.bias"], 0.0)
        return h @ p[f"{head}.weight"].T + p[f"{head}.bias"]

    def local(p):
        if prob.method == "fvi":
            return p["m_z"], p["log_s_z"]
        if f["kind"] == "poly":
            c = p["fn.coefficients"]
            mean = c[-1] * jnp.ones(prob.n, jnp.float32)
            for k in range(c.shape[0] - 2, -1, -1):
                mean = mean * u[:, 0] + c[k]
            return mean, jnp.broadcast_to(p["fn.log_sd"], (prob.n,))
        if f["heads"] == "separate":
            return mlp(p, "fn.trunk", "fn.head")[:, 0], mlp(p, "fn.log_sd_trunk", "fn.log_sd_head")[:, 0]
        out = mlp(p, "fn.trunk", "fn.head")
        return out[:, 0], out[:, 1]

    def log_joint(theta, z):
        if prob.model == "linear":
            tau, sigma = s["tau"], s["sigma"]
            lp = -0.5 * z**2 - 0.5 * ((x - theta - tau * z) / sigma) ** 2 - math.log(sigma) - 2 * HALF_LN_2PI
            return lp.sum(1)
        prior = (-0.5 * theta**2 - HALF_LN_2PI).sum(1)
        if prob.model == "nonlinear":
            resid = (x - theta - z * (1 + jnp.sin(z))) / jnp.exp(jnp.cos(z))
            lp = -0.5 * z**2 - 0.5 * resid**2 - jnp.cos(z) - 2 * HALF_LN_2PI
            return prior + lp.sum(1)
        a = s["alpha"]
        lp = -0.5 * (z - x_prev) ** 2 - 0.5 * (x - a * (theta + z)) ** 2 - 2 * HALF_LN_2PI
        return prior + lp.sum(1)

    def elbo_draws(p, eps_theta, eps_z):
        s_theta = jnp.exp(p["theta_log_sd"])
        theta = p["theta_mean"] + s_theta * eps_theta  # [M, 1]
        m_z, log_s_z = local(p)
        s_z = jnp.exp(log_s_z)
        z = m_z + s_z * eps_z  # [M, N]
        log_q_theta = (-p["theta_log_sd"] - (theta - p["theta_mean"]) ** 2 / (2 * s_theta**2) - HALF_LN_2PI).sum(1)
        log_q_z = (-log_s_z - (z - m_z) ** 2 / (2 * s_z**2) - HALF_LN_2PI).sum(1)
        return log_joint(theta, z) - log_q_theta - log_q_z

    return params, elbo_draws


def main() -> None:
    args = M.cli(__doc__.splitlines()[0])
    configure_threads(args.threads)
    import jax
    import jax.numpy as jnp

    # Full f32 matrix products, as avi and PyTorch compute them (on GPUs XLA
    # otherwise uses TF32, a different function: ≈1e-4 relative).
    jax.config.update("jax_default_matmul_precision", "highest")
    import optax

    platform = jax.devices()[0].platform
    want = "gpu" if args.device == "cuda" else "cpu"
    if platform != want:
        M.emit({"framework": "jax", "model": args.model, "method": args.method,
                "skipped": f"jax runs on {platform}, not {args.device} (jax[cpu] is installed)"})
        return
    prob = M.load_problem(args.model, args.method, args.init, args.seed)
    m, n = prob.draws, prob.n

    def elbo_estimate(p, key, elbo_draws):
        kt, kz = jax.random.split(key)
        eps_theta = jax.random.normal(kt, (m, 1), jnp.float32)
        eps_z = jax.random.normal(kz, (m, n), jnp.float32)
        return elbo_draws(p, eps_theta, eps_z).mean()

    if args.check:
        params_np = prob.check_params if prob.check_params is not None else prob.params
        params, elbo_draws = build(prob, params_np)
        et, ez = M.check_draws(prob)
        got = jax.jit(elbo_draws)(params, jnp.asarray(et, jnp.float32)[:, None], jnp.asarray(ez, jnp.float32))
        est = jax.jit(lambda p, k: elbo_estimate(p, k, elbo_draws))
        keys = jax.random.split(jax.random.PRNGKey(args.seed), args.check_estimates)
        estimates = [float(est(params, k)) for k in keys]
        report = M.check_report(prob, np.asarray(got, np.float64), M.elbo_draws_np(prob, params_np, et, ez), estimates)
        M.emit({"framework": "jax", "model": prob.model, "method": prob.method, "check": report})
        return

    params, elbo_draws = build(prob, prob.params)
    opt = optax.adam(prob.lr)

    @jax.jit
    def train_step(p, opt_state, key):
        key, sub = jax.random.split(key)
        loss, grads = jax.value_and_grad(lambda q: -elbo_estimate(q, sub, elbo_draws))(p)
        updates, opt_state = opt.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, key, loss

    state = {"v": (params, opt.init(params), jax.random.PRNGKey(args.seed), jnp.float32(0))}

    def step() -> None:
        p, o, k, _ = state["v"]
        state["v"] = train_step(p, o, k)

    ms = M.time_steps(step, lambda: jax.block_until_ready(state["v"]), args.warmup, args.iters, args.repeats)
    M.emit(
        M.timing_report(
            "jax",
            args,
            prob,
            ms,
            int(sum(a.size for a in jax.tree_util.tree_leaves(params))),
            threads=args.threads if args.threads > 0 else len(os.sched_getaffinity(0)),
            device=str(jax.devices()[0]),
            final_elbo=-float(state["v"][3]),
            version=jax.__version__,
        )
    )


if __name__ == "__main__":
    sys.exit(main())
