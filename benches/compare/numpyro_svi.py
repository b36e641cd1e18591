"""NumPyro peer: SVI with an `AutoNormal` guide (F-VI), the update jitted.

The model is written with `numpyro.sample` statements and a `numpyro.plate`
over the N observations (linear: θ has an `ImproperUniform` flat prior, log
density 0). `AutoNormal` gives every latent a Gaussian with a free loc and
scale (2N + 2 parameters, as avi's F-VI; its scale is stored through softplus,
NumPyro's default, where avi stores log sd: same family and objective,
different coordinates). `Trace_ELBO(num_particles=100)` (vectorised over
particles, NumPyro's default) is the MC ELBO with `log q` at the draws (avi's
`Entropy::Mc`). `svi.init` sets the guide to avi's initial parameters; the
iteration is `jax.jit(svi.update)` with `numpyro.optim.Adam` (default betas
and eps); timing waits with `jax.block_until_ready`. float32.

    python numpyro_svi.py --model saw --method fvi --init saw-fvi.json
    python numpyro_svi.py --model saw --method fvi --init saw-fvi.json --check
"""

from __future__ import annotations

import os
import sys

import numpy as np

import models as M
from jax_jit import configure_threads


def make_model(prob: M.Problem):
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    from numpyro.distributions import constraints

    s, n = prob.settings, prob.n
    if prob.model == "linear":
        tau, sigma = s["tau"], s["sigma"]

        def model(x):
            theta = numpyro.sample("theta", dist.ImproperUniform(constraints.real, (), ()))
            with numpyro.plate("data", n):
                z = numpyro.sample("z", dist.Normal(0.0, 1.0))
                numpyro.sample("x", dist.Normal(theta + tau * z, sigma), obs=x)

    elif prob.model == "nonlinear":

        def model(x):
            theta = numpyro.sample("theta", dist.Normal(0.0, 1.0))
            with numpyro.plate("data", n):
                z = numpyro.sample("z", dist.Normal(0.0, 1.0))
                numpyro.sample("x", dist.Normal(theta + z * (1 + jnp.sin(z)), jnp.exp(jnp.cos(z))), obs=x)

    else:
        alpha, x0 = s["alpha"], s["x0"]

        def model(x):
            theta = numpyro.sample("theta", dist.Normal(0.0, 1.0))
            x_prev = jnp.concatenate([jnp.full((1,), x0, x.dtype), x[:-1]])
            with numpyro.plate("data", n):
                z = numpyro.sample("z", dist.Normal(x_prev, 1.0))
                numpyro.sample("x", dist.Normal(alpha * (theta + z), 1.0), obs=x)

    return model


def guide_params(params: dict) -> dict:
    """avi's (mean, log sd) as AutoNormal's constrained (loc, scale)."""
    import jax.numpy as jnp

    f32 = lambda a: jnp.asarray(np.asarray(a), jnp.float32)  # noqa: E731
    return {
        "theta_auto_loc": f32(params["theta_mean"].reshape(())),
        "theta_auto_scale": f32(np.exp(params["theta_log_sd"]).reshape(())),
        "z_auto_loc": f32(params["z"][:, 0]),
        "z_auto_scale": f32(np.exp(params["z"][:, 1])),
    }


def main() -> None:
    args = M.cli(__doc__.splitlines()[0], methods=("fvi",))
    configure_threads(args.threads)
    import jax
    import jax.numpy as jnp

    # Full f32 matrix products, as avi and PyTorch compute them (on GPUs XLA
    # otherwise uses TF32, a different function: ≈1e-4 relative).
    jax.config.update("jax_default_matmul_precision", "highest")
    import numpyro
    from numpyro.infer import SVI, Trace_ELBO
    from numpyro.infer.autoguide import AutoNormal
    from numpyro.infer.util import log_density

    platform = jax.devices()[0].platform
    want = "gpu" if args.device == "cuda" else "cpu"
    if platform != want:
        M.emit({"framework": "numpyro", "model": args.model, "method": args.method,
                "skipped": f"jax runs on {platform}, not {args.device} (jax[cpu] is installed)"})
        return
    prob = M.load_problem(args.model, args.method, args.init, args.seed)
    model = make_model(prob)
    x = jnp.asarray(prob.x, jnp.float32)
    guide = AutoNormal(model)
    loss = Trace_ELBO(num_particles=prob.draws)
    svi = SVI(model, guide, numpyro.optim.Adam(prob.lr), loss)
    key = jax.random.PRNGKey(args.seed)

    if args.check:
        params = prob.check_params if prob.check_params is not None else prob.params
        state = svi.init(key, x, init_params=guide_params(params))
        gp = svi.get_params(state)
        et, ez = M.check_draws(prob)
        mt, st = params["theta_mean"][0], np.exp(params["theta_log_sd"][0])
        mz, sz = params["z"][:, 0], np.exp(params["z"][:, 1])
        got = []
        for i in range(et.shape[0]):
            values = {
                "theta": jnp.asarray(mt + st * et[i], jnp.float32),
                "z": jnp.asarray(mz + sz * ez[i], jnp.float32),
            }
            # What Trace_ELBO sums: the model's and the guide's log densities at
            # the same latent values.
            log_p, _ = log_density(model, (x,), {}, values)
            log_q, _ = log_density(guide, (x,), {}, {**gp, **values})
            got.append(float(log_p - log_q))
        est = jax.jit(lambda k: -loss.loss(k, gp, model, guide, x))
        estimates = [float(est(k)) for k in jax.random.split(key, args.check_estimates)]
        report = M.check_report(prob, np.asarray(got), M.elbo_draws_np(prob, params, et, ez), estimates)
        M.emit({"framework": "numpyro", "model": prob.model, "method": prob.method, "check": report})
        return

    state = {"s": svi.init(key, x, init_params=guide_params(prob.params)), "loss": None}
    update = jax.jit(svi.update)

    def step() -> None:
        state["s"], state["loss"] = update(state["s"], x)

    ms = M.time_steps(step, lambda: jax.block_until_ready(state["s"]), args.warmup, args.iters, args.repeats)
    M.emit(
        M.timing_report(
            "numpyro",
            args,
            prob,
            ms,
            int(sum(a.size for a in jax.tree_util.tree_leaves(svi.get_params(state["s"])))),
            threads=args.threads if args.threads > 0 else len(os.sched_getaffinity(0)),
            device=str(jax.devices()[0]),
            final_elbo=-float(state["loss"]),
            version=numpyro.__version__,
        )
    )


if __name__ == "__main__":
    sys.exit(main())
