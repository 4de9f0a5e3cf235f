"""Cost of one ReTrack step against one forward+backward of the same UNet on the 2B images it touches,
the cost of each ReTrack option (--lam auto, --surgery, min-SNR forget weighting, forget t-min)
against a paper ReTrack step, and peak memory of a ReTrack step for K = 1 and K = 1000 (each in a
fresh process, which reads its own VmHWM; also the peak of a process that only builds the same
model and data, so the step's own share shows).

    python bench/bench_step.py [--batch-size 128] [--repeats 10] [--device cpu]

Uses the shipped MNIST T-shirt UNet architecture (randomly initialised) on synthetic 28×28 data.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import torch
import yaml

sys.path.insert(0, os.path.dirname(__file__))
from peak import peak_rss_mb  # noqa: E402

RECIPE = os.path.join(os.path.dirname(__file__), "..", "src", "retrack", "recipes", "mnist_tshirt",
                      "pretrain.yaml")


VARIANTS = {  # label → ReTrack options beside the paper's objective
    "lam auto": {"lam": "auto"},
    "surgery": {"surgery": True},
    "min-snr weighting": {"forget_weighting": "min-snr"},
    "forget t-min 10": {"forget_t_min": 10},
    "all together": {"lam": "auto", "surgery": True, "forget_weighting": "min-snr", "forget_t_min": 10},
}


def setup(batch: int, k: int, device: str):
    from diffusers import DDPMScheduler, UNet2DModel

    from retrack import objectives
    from retrack.models import Denoiser, Schedule
    from retrack.trainer import TrainData

    recipe = yaml.safe_load(open(RECIPE))
    torch.manual_seed(0)
    unet = UNet2DModel(**recipe["unet"])
    sched = DDPMScheduler(**recipe["scheduler"])
    model = Denoiser(unet, Schedule(sched.alphas_cumprod.double())).to(device)
    g = torch.Generator().manual_seed(0)
    remain = torch.randint(0, 256, (5000, 1, 28, 28), generator=g, dtype=torch.uint8)
    forget = torch.randint(0, 256, (51, 1, 28, 28), generator=g, dtype=torch.uint8)
    table = torch.stack([torch.randperm(5000, generator=g)[:k] for _ in range(51)])
    return model, objectives.build("retrack", lam=0.005), TrainData(remain, forget, table)


def retrack_step(model, objective, data, opt, batch, gen, device, accelerator=None):
    from retrack.objectives.base import SplitRule
    from retrack.trainer import draw_batch, split_step

    b = draw_batch(objective, data, batch, gen, device)
    prep = objective.prepare(b, model.schedule, gen)
    if isinstance(objective.rule, SplitRule):
        split_step(objective.rule, model, objective, prep, list(model.parameters()), accelerator)
    else:
        terms = objective.terms(model(prep.x, prep.t), prep)
        loss = sum(w * terms[n] for n, w in objective.rule.weights.items())
        loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def plain_step(model, x, t):
    (model(x, t) - x).pow(2).flatten(1).sum(1).mean().backward()
    model.zero_grad(set_to_none=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(batch: int, repeats: int, device: str, variants: bool = True) -> dict:
    from accelerate import Accelerator

    from retrack import objectives

    model, objective, data = setup(batch, 10, device)
    accelerator = Accelerator(cpu=(device == "cpu"))
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5, betas=(0.95, 0.999), weight_decay=1e-6)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2 * batch, 1, 28, 28, device=device)
    t = torch.randint(0, 1000, (2 * batch,), device=device)
    steps = {"retrack": lambda: retrack_step(model, objective, data, opt, batch, gen, device)}
    for label, options in (VARIANTS.items() if variants else ()):
        variant = objectives.build("retrack", **{"lam": 0.005, **options})
        steps[label] = lambda v=variant: retrack_step(model, v, data, opt, batch, gen, device, accelerator)
    steps["plain"] = lambda: plain_step(model, x, t)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(repeats + 2):  # interleaved, side by side; the first two are warm-up
        for name, step in steps.items():
            sync(device)
            t0 = time.perf_counter()
            step()
            sync(device)
            if i >= 2:
                times[name].append(time.perf_counter() - t0)
    med = {name: sorted(v)[len(v) // 2] for name, v in times.items()}
    r, p = med.pop("retrack"), med.pop("plain")
    return {"retrack_step_s": r, "forward_backward_2B_s": p, "ratio": r / p, "variants_s": med}


def peak_memory_child(batch: int, k: int, device: str) -> None:
    """K > 0: two ReTrack steps; K = 0: only the model and data of K = 1 (the baseline)."""
    model, objective, data = setup(batch, max(k, 1), device)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5)
    gen = torch.Generator().manual_seed(0)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for _ in range(2 if k > 0 else 0):
        retrack_step(model, objective, data, opt, batch, gen, device)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else peak_rss_mb()
    print(json.dumps({"k": k, "peak_mb": peak}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-variants", action="store_true", help="time the paper's ReTrack step only")
    ap.add_argument("--child-k", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_k is not None:
        return peak_memory_child(args.batch_size, args.child_k, args.device)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, device {args.device}, batch {args.batch_size}")
    timing = time_steps(args.batch_size, args.repeats, args.device, not args.no_variants)
    print(f"ReTrack step (K=10, B={args.batch_size}): {timing['retrack_step_s']:.3f} s (median)")
    print(f"forward+backward on 2B={2 * args.batch_size} images: {timing['forward_backward_2B_s']:.3f} s")
    print(f"ratio: {timing['ratio']:.3f} (target ≤ 1.10)")
    for label, seconds in timing["variants_s"].items():
        print(f"ReTrack {label}: {seconds:.3f} s, {seconds / timing['retrack_step_s']:.3f}× a paper "
              "ReTrack step (target ≤ 1.10)")
    peaks = {}
    what = "GPU memory allocated" if args.device.startswith("cuda") else "RSS (VmHWM of a fresh process)"
    for k in (0, 1, 1000):
        out = subprocess.run([sys.executable, __file__, "--child-k", str(k), "--batch-size",
                              str(args.batch_size), "--device", args.device],
                             capture_output=True, text=True, check=True).stdout
        peaks[k] = json.loads(out.strip().splitlines()[-1])["peak_mb"]
        label = "model and data only (no step)" if k == 0 else f"a ReTrack step, K={k}"
        print(f"peak {what}, {label}: {peaks[k]:.0f} MB")
    print(f"K=1000 / K=1: {peaks[1000] / peaks[1]:.3f} (target ≤ 1.05); above the baseline: "
          f"K=1 {peaks[1] - peaks[0]:.0f} MB, K=1000 {peaks[1000] - peaks[0]:.0f} MB")


if __name__ == "__main__":
    main()
