"""Pyro peer: SVI with an `AutoNormal` guide (F-VI), as a Pyro user writes it.

The model is written with `pyro.sample` statements and a `pyro.plate` over the
N observations (linear: θ has an `ImproperUniform` flat prior, log density 0).
`AutoNormal` gives every latent a Gaussian with a free loc and scale (2N + 2
parameters, as avi's F-VI; its scale is stored through softplus, Pyro's
default, where avi stores log sd: same family and objective, different
coordinates). `Trace_ELBO(num_particles=100, vectorize_particles=True)` is the
MC ELBO with `log q` at the draws (avi's `Entropy::Mc`), and the iteration is
`svi.step` with `pyro.optim.Adam` (default betas and eps). `svi.step` returns
the loss as a Python float, so every Pyro step ends with one host read (its
API; on the CPU this costs nothing).

    python pyro_svi.py --model saw --method fvi --init saw-fvi.json
    python pyro_svi.py --model saw --method fvi --init saw-fvi.json --check
"""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from torch.distributions import biject_to

import models as M


def make_model(prob: M.Problem, device: torch.device):
    s = prob.settings
    f32 = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32, device=device)  # noqa: E731
    zero, one = f32(0.0), f32(1.0)
    n = prob.n

    if prob.model == "linear":
        tau, sigma = s["tau"], f32(s["sigma"])

        def model(x):
            theta = pyro.sample("theta", dist.ImproperUniform(constraints.real, (), ()))
            with pyro.plate("data", n, dim=-1):
                z = pyro.sample("z", dist.Normal(zero, one))
                pyro.sample("x", dist.Normal(theta + tau * z, sigma), obs=x)

    elif prob.model == "nonlinear":

        def model(x):
            theta = pyro.sample("theta", dist.Normal(zero, one))
            with pyro.plate("data", n, dim=-1):
                z = pyro.sample("z", dist.Normal(zero, one))
                pyro.sample("x", dist.Normal(theta + z * (1 + torch.sin(z)), torch.exp(torch.cos(z))), obs=x)

    else:
        alpha, x0 = s["alpha"], f32([s["x0"]])

        def model(x):
            theta = pyro.sample("theta", dist.Normal(zero, one))
            x_prev = torch.cat([x0, x[:-1]])
            with pyro.plate("data", n, dim=-1):
                z = pyro.sample("z", dist.Normal(x_prev, one))
                pyro.sample("x", dist.Normal(alpha * (theta + z), one), obs=x)

    return model


def set_guide(guide: AutoNormal, params: dict, device: torch.device) -> None:
    """Set the guide's locs and scales to avi's (mean, exp(log sd))."""
    values = {
        "theta": (params["theta_mean"].reshape(()), np.exp(params["theta_log_sd"]).reshape(())),
        "z": (params["z"][:, 0], np.exp(params["z"][:, 1])),
    }
    with torch.no_grad():
        for name, (loc, scale) in values.items():
            getattr(guide.locs, f"{name}_unconstrained").copy_(
                torch.as_tensor(loc, dtype=torch.float32, device=device))
            inv = biject_to(guide.scale_constraint).inv
            getattr(guide.scales, f"{name}_unconstrained").copy_(
                inv(torch.as_tensor(scale, dtype=torch.float32, device=device)))


def main() -> None:
    args = M.cli(__doc__.splitlines()[0], methods=("fvi",))
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "cuda" else "cpu")
    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    prob = M.load_problem(args.model, args.method, args.init, args.seed)
    model = make_model(prob, device)
    x = torch.as_tensor(prob.x, dtype=torch.float32, device=device)
    # Zeros as the initial locs (the default, init_to_feasible, samples the
    # prior, which the flat prior cannot); set_guide puts avi's values in.
    guide = AutoNormal(model, init_loc_fn=lambda site: torch.zeros(site["fn"].shape(), device=device))
    guide(x)  # create the parameters
    elbo = Trace_ELBO(num_particles=prob.draws, vectorize_particles=True, max_plate_nesting=1)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": prob.lr}), elbo)

    if args.check:
        params = prob.check_params if prob.check_params is not None else prob.params
        set_guide(guide, params, device)
        et, ez = M.check_draws(prob)
        mt, st = params["theta_mean"][0], np.exp(params["theta_log_sd"][0])
        mz, sz = params["z"][:, 0], np.exp(params["z"][:, 1])
        got = []
        with torch.no_grad():
            for i in range(et.shape[0]):
                values = {
                    "theta": torch.tensor(mt + st * et[i], dtype=torch.float32, device=device),
                    "z": torch.as_tensor(mz + sz * ez[i], dtype=torch.float32, device=device),
                }
                # What Trace_ELBO sums: the model's and the guide's log densities
                # at the same latent values. AutoNormal draws `{name}_unconstrained`
                # from its Normal and passes it on through a Delta (log density 0
                # for real-valued latents), so the guide is conditioned there.
                log_p = pyro.poutine.trace(pyro.poutine.condition(model, data=values)).get_trace(x).log_prob_sum()
                aux = {f"{k}_unconstrained": v for k, v in values.items()}
                log_q = pyro.poutine.trace(pyro.poutine.condition(guide, data=aux)).get_trace(x).log_prob_sum()
                got.append(float(log_p - log_q))
            estimates = [-svi.evaluate_loss(x) for _ in range(args.check_estimates)]
        report = M.check_report(prob, np.asarray(got), M.elbo_draws_np(prob, params, et, ez), estimates)
        M.emit({"framework": "pyro", "model": prob.model, "method": prob.method, "check": report})
        return

    set_guide(guide, prob.params, device)
    last = {}

    def step() -> None:
        last["loss"] = svi.step(x)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    ms = M.time_steps(step, sync, args.warmup, args.iters, args.repeats)
    M.emit(
        M.timing_report(
            "pyro",
            args,
            prob,
            ms,
            sum(p.numel() for p in guide.parameters()),
            threads=torch.get_num_threads(),
            device=str(device),
            final_elbo=-last["loss"],
            gpu_mib=M.gpu_process_mib() if device.type == "cuda" else None,
            gpu_allocator_peak_mib=torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
            version=pyro.__version__,
        )
    )


if __name__ == "__main__":
    main()
