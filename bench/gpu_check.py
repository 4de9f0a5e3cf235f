"""What one GPU does with the paper's CIFAR-10 setting; run through bench/gpu_check.sh (≤ 10 min).

    bench/gpu_check.sh                        # CUDA, the real google/ddpm-cifar10-32 UNet, B = 128
    bench/gpu_check.sh --small --device cpu   # a narrow UNet of the same layout, B = 4: checks the script

Randomly initialised (nothing is downloaded), on synthetic CIFAR-sized data:
1. exact kNN of the forget image among the remain images on the device;
2. per method (ReTrack K = 10, λ = 0.02; SISS; ReTrack with --grad-accum 4): median time of one
   whole unlearning step (the trainer's draw, noise, gradient rule, clip, AdamW) against one
   forward+backward of the UNet on the 2B images a step touches, and the peak memory of the step;
3. the NLL (probability-flow ODE, RK45, the paper's rtol = atol = 1e-5) of one image: time and
   model evaluations (stopped after --nll-budget seconds if a random-init UNet makes it stiff).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from architectures import DDPM_CIFAR10_32  # noqa: E402
from step_timing import median_seconds, sync  # noqa: E402

SMALL = {**DDPM_CIFAR10_32, "block_out_channels": (32, 64, 64, 64), "layers_per_block": 1, "norm_num_groups": 8}
METHODS = {"retrack": ("retrack", {"lam": 0.02}, 1), "siss": ("siss", {}, 1),
           "retrack, grad-accum 4": ("retrack", {"lam": 0.02}, 4)}


def peak_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def model(small: bool, device: str):
    from diffusers import DDPMScheduler, UNet2DModel

    from retrack.models import Denoiser, Schedule

    torch.manual_seed(0)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    unet = UNet2DModel(**(SMALL if small else DDPM_CIFAR10_32))
    return Denoiser(unet, Schedule(sched.alphas_cumprod.double())).to(device)


def data(n: int, k: int, device: str):
    from retrack.neighbours import nearest_neighbours
    from retrack.trainer import TrainData

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    sync(device)
    t0 = time.perf_counter()
    table, _ = nearest_neighbours(images[1:], images[:1], k, progress=False, device=device)
    sync(device)
    print(f"kNN of 1 forget image among {n - 1} remain images (K={k}) on {device}: {time.perf_counter() - t0:.3f} s")
    nchw = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    return TrainData(nchw[1:], nchw[:1], torch.from_numpy(table)), images[:1]


def time_method(net, train_data, method: str, options: dict, accum: int, batch: int, repeats: int,
                device: str) -> tuple[float, float, float]:
    from accelerate import Accelerator

    from retrack import objectives
    from retrack.trainer import batch_gradient, draw_batch

    objective = objectives.build(method, **options)
    accelerator = Accelerator(cpu=(device == "cpu"))
    params = list(net.parameters())
    opt = torch.optim.AdamW(params, lr=2e-5, betas=(0.95, 0.999), weight_decay=1e-6)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2 * batch, 3, 32, 32, device=device)
    t = torch.randint(0, 1000, (2 * batch,), device=device)

    def step() -> None:
        prepared = objective.prepare(draw_batch(objective, train_data, batch, gen, device), net.schedule, gen)
        batch_gradient(net, objective, prepared, accum, params, accelerator)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def plain() -> None:
        (net(x, t) - x).pow(2).flatten(1).sum(1).mean().backward()
        net.zero_grad(set_to_none=True)

    reset_peak(device)
    med = median_seconds({"step": step, "plain": plain}, repeats, device)
    reset_peak(device)
    step()
    sync(device)
    return med["step"], med["plain"], peak_mb(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="narrow UNet, B = 4, 1 repeat: a quick check anywhere")
    ap.add_argument("--batch-size", type=int, default=None, help="B (default 128, the paper's; 4 with --small)")
    ap.add_argument("--repeats", type=int, default=None, help="timed steps per method (default 5; 1 with --small)")
    ap.add_argument("--n", type=int, default=None, help="synthetic images (default 50,000; 200 with --small)")
    ap.add_argument("--nll-rtol", type=float, default=None, help="ODE tolerance (default 1e-5; 1e-3 with --small)")
    ap.add_argument("--nll-budget", type=float, default=None,
                    help="seconds after which the NLL solve stops (default 240; 20 with --small)")
    args = ap.parse_args()
    small, device = args.small, args.device
    batch = args.batch_size or (4 if small else 128)
    repeats = args.repeats or (1 if small else 5)
    args.nll_budget = args.nll_budget or (20.0 if small else 240.0)
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit("gpu_check: no CUDA device here; pass --device cpu (with --small).")
        name = torch.cuda.get_device_name()
    else:
        name = f"{platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; {'narrow test UNet' if small else 'DDPM CIFAR-10 UNet'}, "
          f"random init; B={batch}, medians of {repeats}")
    net = model(small, device)
    print(f"UNet parameters: {sum(p.numel() for p in net.parameters()) / 1e6:.1f}M")
    train_data, forget = data(args.n or (200 if small else 50_000), 10, device)
    for label, (method, options, accum) in METHODS.items():
        step, plain, peak = time_method(net, train_data, method, options, accum, batch, repeats, device)
        print(f"{label}: step {step:.3f} s, forward+backward on 2B={2 * batch} images {plain:.3f} s, "
              f"ratio {step / plain:.3f}; peak memory of a step {peak:.0f} MB")
    nll_timing(net, forget, args.nll_rtol or (1e-3 if small else 1e-5), args.nll_budget, device)


class _OverBudget(Exception):
    pass


def nll_timing(net, image: np.ndarray, rtol: float, budget: float, device: str) -> None:
    """Time the 1-image NLL; a random-init UNet can make the ODE stiff, so stop after `budget` s
    and report the model evaluations done and their rate instead of running past the time limit."""
    from retrack.metrics.likelihood import BPD_OFFSET, log_likelihood, to_ode_input

    calls, reached = [0], [0.0]

    def count(*_) -> None:  # every model evaluation, so a stiff solve that keeps rejecting steps stops too
        calls[0] += 1
        if time.perf_counter() - t0 > budget:
            raise _OverBudget

    def on_step(frac: float) -> None:
        reached[0] = frac

    hook = net.register_forward_hook(count)
    sync(device)
    t0 = time.perf_counter()
    try:
        res = log_likelihood(net, to_ode_input(image, False, 0), rtol=rtol, atol=rtol, on_step=on_step)
        outcome = f"{float(res.bits_per_dim(BPD_OFFSET)[0]):.3f} bits/dim (random init: a timing, not a result)"
    except _OverBudget:
        outcome = f"stopped at the {budget:g} s budget, {reached[0]:.0%} of the way from t = 1e-5 to 1"
    finally:
        hook.remove()
    sync(device)
    seconds = time.perf_counter() - t0
    print(f"NLL of 1 image (RK45, rtol = atol = {rtol:g}, 1 Hutchinson probe): {seconds:.1f} s, "
          f"{calls[0]} model evaluations ({1000 * seconds / max(calls[0], 1):.1f} ms each, forward + "
          f"divergence); {outcome}")


if __name__ == "__main__":
    main()
