"""Measured device-memory bandwidth and the floor of one F-VI step.

Times a device-to-device copy of a 1 GiB float32 tensor with CUDA events
(median of 20 after 3 warm-ups; 4 buffers in rotation so the 50 MB L2
holds none of them) and reports bytes read + written per second. Then
writes down the bytes an F-VI iteration must move at N observations and M
draws, and the time floor that gives:

    ideal (a fused kernel: draws made in registers, never stored):
        read  μ, log s, Adam m and v for the 2N local parameters  4 × 2N × 4 B
        write the same                                           4 × 2N × 4 B
        = 64 N bytes (θ's 2 parameters and the ELBO are negligible)
    materialised draws (any implementation that stores the [M, N] draws and
    the sampled z, as libtorch's autograd does, reads each back once in the
    backward pass):
        ideal + 4 × M × N × 4 B  (write ε, write z, read ε, read z)

    python benches/gpu/bandwidth.py --out bandwidth.json [--n 1000000 --draws 100]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--draws", type=int, default=100)
    a = ap.parse_args()
    assert torch.cuda.is_available(), "no CUDA device"
    elems = (1 << 30) // 4
    srcs = [torch.randn(elems, device="cuda") for _ in range(4)]
    dsts = [torch.empty_like(s) for s in srcs]
    for i in range(3):
        dsts[i % 4].copy_(srcs[i % 4])
    torch.cuda.synchronize()
    ms = []
    for i in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dsts[i % 4].copy_(srcs[i % 4])
        end.record()
        end.synchronize()
        ms.append(start.elapsed_time(end))
    assert torch.equal(dsts[19 % 4], srcs[19 % 4]), "copy check failed"
    med = statistics.median(ms)
    bw = 2 * elems * 4 / (med / 1e3)
    n, m = a.n, a.draws
    ideal = 64 * n
    materialised = ideal + 16 * m * n
    out = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "copy_bytes_each_way": elems * 4,
        "copy_ms_median": med,
        "copy_ms": ms,
        "bandwidth_bytes_per_s": bw,
        "n": n,
        "draws": m,
        "fvi_bytes_ideal": ideal,
        "fvi_floor_ms_ideal": ideal / bw * 1e3,
        "fvi_bytes_materialised": materialised,
        "fvi_floor_ms_materialised": materialised / bw * 1e3,
    }
    with open(a.out, "w") as f:
        json.dump(out, f, indent=2)
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s (read + write); F-VI floor at N = {n:,}, M = {m}: "
          f"{out['fvi_floor_ms_ideal'] * 1e3:.1f} µs ideal, {out['fvi_floor_ms_materialised']:.3f} ms with "
          f"materialised draws")


if __name__ == "__main__":
    main()
