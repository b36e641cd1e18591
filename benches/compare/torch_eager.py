"""PyTorch eager reference of one training iteration, in the authors' style.

Plain tensors with `requires_grad` (F-VI and the polynomial) or `nn.Linear`
layers (the MLPs, as the authors' `Inference_NN`), the log joint written term
by term as in `models.log_joint_np`, `log q` from the draws as
`-log s - (v - m)² / (2 s²) - ½ log 2π`, and `torch.optim.Adam` (default
betas and eps). One iteration: draws → ELBO → backward → Adam step. The loss
stays on the device (no `.item()` inside the timed loop).

    python torch_eager.py --model saw --method avi --init saw-avi.json
    python torch_eager.py --model saw --method avi --init saw-avi.json --check
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

import models as M

HALF_LN_2PI = M.HALF_LN_2PI


class Objective:
    """Variational parameters and the Monte Carlo ELBO of one problem."""

    def __init__(self, prob: M.Problem, params: dict, device: torch.device):
        self.prob, self.device = prob, device
        dt = torch.float32
        t = lambda a: torch.tensor(np.asarray(a), dtype=dt, device=device)  # noqa: E731
        self.x = t(prob.x)
        s = prob.settings
        if prob.model == "saw":
            self.x_prev = torch.cat([t([s["x0"]]), self.x[:-1]])
        leaf = lambda a: t(a).requires_grad_(True)  # noqa: E731
        self.m_theta = leaf(params["theta_mean"])
        self.log_s_theta = leaf(params["theta_log_sd"])
        self.leaves = [self.m_theta, self.log_s_theta]
        self.modules: list[nn.Module] = []
        if prob.method == "fvi":
            self.m_z = leaf(params["z"][:, 0])
            self.log_s_z = leaf(params["z"][:, 1])
            self.leaves += [self.m_z, self.log_s_z]
            return
        self.u = t(prob.inputs())
        f = prob.function
        if f["kind"] == "poly":
            self.coef = leaf(params["fn.coefficients"])
            self.log_s_shared = leaf(params["fn.log_sd"])
            self.leaves += [self.coef, self.log_s_shared]
            return

        def mlp(prefix: str, head: str) -> nn.Sequential:
            w0 = params[f"{prefix}.hidden0.weight"]
            k, i = w0.shape
            out = params[f"{head}.weight"].shape[0]
            net = nn.Sequential(
                nn.Linear(i, k), nn.ReLU(), nn.Linear(k, k), nn.ReLU(), nn.Linear(k, out)
            ).to(device)
            names = [f"{prefix}.hidden0", f"{prefix}.hidden1", head]
            with torch.no_grad():
                for layer, name in zip((net[0], net[2], net[4]), names):
                    layer.weight.copy_(t(params[f"{name}.weight"]))
                    layer.bias.copy_(t(params[f"{name}.bias"]))
            return net

        self.mean_net = mlp("fn.trunk", "fn.head")
        self.modules.append(self.mean_net)
        if f["heads"] == "separate":
            self.log_sd_net = mlp("fn.log_sd_trunk", "fn.log_sd_head")
            self.modules.append(self.log_sd_net)

    def parameters(self) -> list[torch.Tensor]:
        return self.leaves + [p for m in self.modules for p in m.parameters()]

    def local(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`[N]` means and log sds of q(z_n)."""
        if self.prob.method == "fvi":
            return self.m_z, self.log_s_z
        f = self.prob.function
        if f["kind"] == "poly":
            u = self.u[:, 0]
            mean = self.coef[-1] * torch.ones_like(u)
            for k in range(self.coef.shape[0] - 2, -1, -1):
                mean = mean * u + self.coef[k]
            return mean, self.log_s_shared.expand_as(u)
        if f["heads"] == "separate":
            return self.mean_net(self.u)[:, 0], self.log_sd_net(self.u)[:, 0]
        out = self.mean_net(self.u)
        return out[:, 0], out[:, 1]

    def log_joint(self, theta: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log p(θ, z, x) for `[M, 1]` θ and `[M, N]` z; `[M]`."""
        x, s, model = self.x, self.prob.settings, self.prob.model
        if model == "linear":
            tau, sigma = s["tau"], s["sigma"]
            lp = -0.5 * z**2 - 0.5 * ((x - theta - tau * z) / sigma) ** 2 - math.log(sigma) - 2 * HALF_LN_2PI
            return lp.sum(1)
        prior = (-0.5 * theta**2 - HALF_LN_2PI).sum(1)
        if model == "nonlinear":
            resid = (x - theta - z * (1 + torch.sin(z))) / torch.exp(torch.cos(z))
            lp = -0.5 * z**2 - 0.5 * resid**2 - torch.cos(z) - 2 * HALF_LN_2PI
            return prior + lp.sum(1)
        alpha = s["alpha"]
        lp = -0.5 * (z - self.x_prev) ** 2 - 0.5 * (x - alpha * (theta + z)) ** 2 - 2 * HALF_LN_2PI
        return prior + lp.sum(1)

    def elbo_draws(self, eps_theta: torch.Tensor, eps_z: torch.Tensor) -> torch.Tensor:
        """Per-draw `log p - log q` at the given standard normal draws."""
        s_theta = torch.exp(self.log_s_theta)
        theta = self.m_theta + s_theta * eps_theta  # [M, 1]
        m_z, log_s_z = self.local()
        s_z = torch.exp(log_s_z)
        z = m_z + s_z * eps_z  # [M, N]
        log_q_theta = (-self.log_s_theta - (theta - self.m_theta) ** 2 / (2 * s_theta**2) - HALF_LN_2PI).sum(1)
        log_q_z = (-log_s_z - (z - m_z) ** 2 / (2 * s_z**2) - HALF_LN_2PI).sum(1)
        return self.log_joint(theta, z) - log_q_theta - log_q_z

    def elbo(self) -> torch.Tensor:
        m = self.prob.draws
        eps_theta = torch.randn(m, 1, device=self.device)
        eps_z = torch.randn(m, self.prob.n, device=self.device)
        return self.elbo_draws(eps_theta, eps_z).mean()


def main() -> None:
    args = M.cli(__doc__.splitlines()[0])
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "cuda" else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    torch.manual_seed(args.seed)
    prob = M.load_problem(args.model, args.method, args.init, args.seed)

    if args.check:
        params = prob.check_params if prob.check_params is not None else prob.params
        obj = Objective(prob, params, device)
        et, ez = M.check_draws(prob)
        with torch.no_grad():
            got = obj.elbo_draws(
                torch.tensor(et, dtype=torch.float32, device=device)[:, None],
                torch.tensor(ez, dtype=torch.float32, device=device),
            )
            estimates = [obj.elbo().item() for _ in range(args.check_estimates)]
        report = M.check_report(prob, got.double().cpu().numpy(), M.elbo_draws_np(prob, params, et, ez), estimates)
        M.emit({"framework": "torch", "model": prob.model, "method": prob.method, "check": report})
        return

    obj = Objective(prob, prob.params, device)
    opt = torch.optim.Adam(obj.parameters(), lr=prob.lr)
    last = {}

    def step() -> None:
        opt.zero_grad()
        loss = -obj.elbo()
        loss.backward()
        opt.step()
        last["loss"] = loss.detach()

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ms = M.time_steps(step, sync, args.warmup, args.iters, args.repeats)
    M.emit(
        M.timing_report(
            "torch",
            args,
            prob,
            ms,
            sum(p.numel() for p in obj.parameters()),
            threads=torch.get_num_threads(),
            device=str(device),
            final_elbo=-float(last["loss"]),
            gpu_mib=M.gpu_process_mib() if device.type == "cuda" else None,
            gpu_allocator_peak_mib=torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
            version=torch.__version__,
        )
    )


if __name__ == "__main__":
    main()
