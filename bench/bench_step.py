"""Cost of one paper ReTrack step in each layout (joint: one forward over the 2B rows; split: one
forward over the B forget rows and one over the B remain rows; auto: the layout the trainer picks
by timing both) against the authors' step, one forward+backward of the same UNet on the 2B images;
the cost of each ReTrack option (--lam auto, --surgery, min-SNR forget weighting, forget t-min,
--balance nash, --distill: one more forward, without gradient, of a frozen copy of the model on the
B remain rows) and of a SalUn weight-saliency mask (--saliency: a step's gradient masking and
write-back of the frozen weights; the mask itself is made once per run and not timed) against a
paper ReTrack step (auto), and peak memory of a ReTrack step for K = 1 and K = 1000 (each
in a fresh process, which reads its own VmHWM; also the peak of a process that only builds the same
model and data, so the step's own share shows).

    python bench/bench_step.py [--batch-size 128] [--repeats 10] [--device cpu] [--threads N]

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
    "balance nash": {"balance": "nash"},
    "distill 1": {"distill": 1.0},
    "all together": {"lam": "auto", "surgery": True, "forget_weighting": "min-snr", "forget_t_min": 10},
}
SALIENCY = {"saliency 0.5": 0.5}  # label → fraction of weights fine-tuned, on a paper ReTrack step


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


def retrack_step(model, objective, data, opt, batch, gen, device, accelerator, split: bool | None = None,
                 mask=None, teacher=None):
    """The trainer's step: draw, prepare, (--distill: the frozen model's ε on the remain rows), its
    gradient in the given layout (None: the method's own), (with a saliency mask: mask the
    gradient), clip, AdamW (and write back the frozen weights)."""
    from retrack.trainer import batch_gradient, draw_batch

    b = draw_batch(objective, data, batch, gen, device)
    prep = objective.prepare(b, model.schedule, gen)
    if teacher is not None:
        teacher.fill(objective, prep)
    params = list(model.parameters())
    batch_gradient(model, objective, prep, 1, params, accelerator, split=split)
    if mask is not None:
        mask.mask_gradient(params)
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    if mask is not None:
        mask.restore(params)
    opt.zero_grad(set_to_none=True)


def saliency_mask(model, data, batch: int, fraction: float, device: str):
    """The mask `train()` makes before the first step (from the forget gradient of the model)."""
    from retrack.saliency import WeightMask, forget_gradient
    from retrack.trainer import to_model_range

    params = list(model.parameters())
    grads = forget_gradient(model, model.schedule, data.forget, params, batch, 1, torch.Generator().manual_seed(0),
                            lambda x: to_model_range(x, device))
    mask = WeightMask.from_gradients(grads, fraction)
    mask.freeze(params)
    return mask


def plain_step(model, x, t):
    (model(x, t) - x).pow(2).flatten(1).sum(1).mean().backward()
    model.zero_grad(set_to_none=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def choose_layout(model, objective, data, batch: int, device: str, accelerator, steps: int = 50):
    """What `train(..., layout="auto")` picks for a `steps`-step run at this batch, timed as the
    trainer times it (on a first batch from its own generator), and the seconds that took."""
    from retrack import layout as layouts
    from retrack.trainer import draw_batch

    gen = torch.Generator().manual_seed(1)
    prep = objective.prepare(draw_batch(objective, data, batch, gen, device), model.schedule, gen)
    model.train()
    sync(device)
    t0 = time.perf_counter()
    chosen = layouts.choose("auto", model, objective, prep, list(model.parameters()), accelerator, steps)
    sync(device)
    return chosen, time.perf_counter() - t0


def time_steps(batch: int, repeats: int, device: str, variants: bool | list[str] = True) -> dict:
    from accelerate import Accelerator

    from retrack import keep, objectives
    from retrack.objectives.base import SplitRule

    model, objective, data = setup(batch, 10, device)
    accelerator = Accelerator(cpu=(device == "cpu"))
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5, betas=(0.95, 0.999), weight_decay=1e-6)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2 * batch, 1, 28, 28, device=device)
    t = torch.randint(0, 1000, (2 * batch,), device=device)
    auto, measuring_s = choose_layout(model, objective, data, batch, device, accelerator)
    steps = {f"retrack {name}": lambda s=split: retrack_step(model, objective, data, opt, batch, gen, device,
                                                             accelerator, s)
             for name, split in (("joint", False), ("split", True), ("auto", auto.split))}
    for label, options in (VARIANTS.items() if variants else ()):
        if variants is not True and label not in variants:
            continue
        variant = objectives.build("retrack", **{"lam": 0.005, **options})
        split = None if isinstance(variant.rule, SplitRule) else auto.split  # as train()'s auto: same shapes
        teacher = keep.teacher_for(model, variant, device)  # --distill: a frozen copy, as train() makes
        steps[label] = lambda v=variant, s=split, f=teacher: retrack_step(model, v, data, opt, batch, gen, device,
                                                                          accelerator, s, teacher=f)
    for label, fraction in (SALIENCY.items() if variants else ()):
        if variants is not True and label not in variants:
            continue
        mask = saliency_mask(model, data, batch, fraction, device)
        steps[label] = lambda m=mask: retrack_step(model, objective, data, opt, batch, gen, device, accelerator,
                                                   auto.split, mask=m)
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
    layouts = {name: med.pop(f"retrack {name}") for name in ("joint", "split", "auto")}
    return {"layouts_s": layouts, "forward_backward_2B_s": med.pop("plain"), "variants_s": med, "auto": auto,
            "measuring_s": measuring_s}


def peak_memory_child(batch: int, k: int, device: str, split: bool) -> None:
    """K > 0: two ReTrack steps in the given layout; K = 0: only the model and data of K = 1 (the
    baseline)."""
    from accelerate import Accelerator

    model, objective, data = setup(batch, max(k, 1), device)
    accelerator = Accelerator(cpu=(device == "cpu"))
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5)
    gen = torch.Generator().manual_seed(0)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for _ in range(2 if k > 0 else 0):
        retrack_step(model, objective, data, opt, batch, gen, device, accelerator, split)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else peak_rss_mb()
    print(json.dumps({"k": k, "peak_mb": peak}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--no-variants", action="store_true", help="time the paper's ReTrack step only")
    ap.add_argument("--variant", action="append", choices=[*VARIANTS, *SALIENCY], default=None,
                    help="time only these options beside the paper's step (repeatable); no peak-memory runs")
    ap.add_argument("--child-k", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-split", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child_k is not None:
        return peak_memory_child(args.batch_size, args.child_k, args.device, bool(args.child_split))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, device {args.device}, batch {args.batch_size}")
    timing = time_steps(args.batch_size, args.repeats, args.device, args.variant or not args.no_variants)
    print_timing(timing, args.batch_size)
    if not args.variant:
        print_peaks(args, timing["auto"].split)


def print_timing(timing: dict, batch: int) -> None:
    steps, plain, auto = timing["layouts_s"], timing["forward_backward_2B_s"], timing["auto"]
    what = {"joint": "joint layout (one forward on the 2B rows)",
            "split": "split layout (one forward on the B forget rows, one on the B remain rows)",
            "auto": f"auto layout (picked {'split' if auto.split else 'joint'}: one forward+backward took "
                    f"{auto.joint_s:.3f} s joint, {auto.split_s:.3f} s split; timing both took "
                    f"{timing['measuring_s']:.1f} s once, {timing['measuring_s'] / (50 * steps['auto']):.1%} "
                    "of a 50-step run)"}
    for name, seconds in steps.items():
        print(f"ReTrack step (K=10, B={batch}), {what[name]}: {seconds:.3f} s (median)")
    print(f"forward+backward on 2B={2 * batch} images (the authors' step): {plain:.3f} s")
    print(f"ratio: joint {steps['joint'] / plain:.3f}, split {steps['split'] / plain:.3f}, auto "
          f"{steps['auto'] / plain:.3f} (target ≤ 1.10; goal for auto < 1)")
    for label, seconds in timing["variants_s"].items():
        target = 1.40 if label.startswith("distill") else 1.10  # distill: one more forward over B rows
        print(f"ReTrack {label}: {seconds:.3f} s, {seconds / steps['auto']:.3f}× a paper "
              f"ReTrack step (auto) (target ≤ {target:.2f})")


def print_peaks(args: argparse.Namespace, split: bool) -> None:
    peaks = {}
    what = "GPU memory allocated" if args.device.startswith("cuda") else "RSS (VmHWM of a fresh process)"
    threads = ["--threads", str(args.threads)] if args.threads else []
    for k in (0, 1, 1000):
        out = subprocess.run([sys.executable, __file__, "--child-k", str(k), "--batch-size", str(args.batch_size),
                              "--device", args.device, "--child-split", str(int(split)), *threads],
                             capture_output=True, text=True, check=True).stdout
        peaks[k] = json.loads(out.strip().splitlines()[-1])["peak_mb"]
        layout = "split" if split else "joint"
        label = "model and data only (no step)" if k == 0 else f"a ReTrack step ({layout}), K={k}"
        print(f"peak {what}, {label}: {peaks[k]:.0f} MB")
    print(f"K=1000 / K=1: {peaks[1000] / peaks[1]:.3f} (target ≤ 1.05); above the baseline: "
          f"K=1 {peaks[1] - peaks[0]:.0f} MB, K=1000 {peaks[1000] - peaks[0]:.0f} MB")


if __name__ == "__main__":
    main()
