"""Where does an unlearned model depart from the model retrained without the image? By timestep.

    python scripts/departure_by_t.py --reference src/retrack/recipes/mnist_tshirt/retrained \
        --models src/retrack/recipes/mnist_tshirt/model runs/verify-study/tshirt/models/retrack ...

For each model and each timestep band: the mean of ‖ε_θ(x_t, t) − ε_ref(x_t, t)‖² over noisy copies
x_t of the forgotten image (its departure from the retrained model where the image is) and over
noisy remain digits (its collateral departure), with the same noise and timesteps for every model;
and the mean true denoising error ‖ε_θ − ε‖² on the forgotten image, the quantity the loss
attack measures at t = 100. A model that forgets as retraining does departs little in both.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from retrack.backends.pixel import load_model
from retrack.objectives.base import noisy, sse
from retrack.pretrain import recipe_data

BANDS = ((0, 10), (10, 50), (50, 200), (200, 500), (500, 1000))


def probes(images: np.ndarray, per_t: int, stride: int, T: int, seed: int):
    """(x0, t, ε): every image at every stride-th timestep, `per_t` noise draws each."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).float().div(127.5).sub(1.0)
    ts = torch.arange(0, T, stride)
    t = ts.repeat_interleave(per_t * len(x))
    x0 = x.repeat(per_t, 1, 1, 1).repeat(len(ts), 1, 1, 1)
    return x0, t, torch.randn(x0.shape, generator=gen)


@torch.no_grad()
def predictions(path: str, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, batch: int = 512) -> torch.Tensor:
    den = load_model(path, "cpu").denoiser.eval()
    out = [den(noisy(x0[i:i + batch], t[i:i + batch], eps[i:i + batch], den.schedule), t[i:i + batch])
           for i in range(0, len(t), batch)]
    return torch.cat(out)


def by_band(values: torch.Tensor, t: torch.Tensor) -> list[float]:
    return [float(values[(t >= lo) & (t < hi)].mean()) for lo, hi in BANDS]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="mnist_tshirt", help="a built-in planted set (mnist_tshirt, mnist_boot, …)")
    ap.add_argument("--reference", required=True, help="the retrained model")
    ap.add_argument("--models", nargs="+", required=True)
    ap.add_argument("--per-t", type=int, default=4)
    ap.add_argument("--stride", type=int, default=10)
    ap.add_argument("--digits", type=int, default=16, help="remain digits for the collateral column")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from retrack.experiments.builtins import builtin_data

    built = builtin_data(args.data)
    forget = np.unique(built.images.images[built.forget], axis=0)
    remain = recipe_data(args.data + "_remain").images
    digits = remain[np.random.default_rng(args.seed).choice(len(remain), args.digits, replace=False)]
    T = load_model(args.reference, "cpu").denoiser.schedule.num_steps
    sets = {"forget": probes(forget, args.per_t, args.stride, T, args.seed),
            "digits": probes(digits, 1, args.stride, T, args.seed + 1)}
    ref = {k: predictions(args.reference, *v) for k, v in sets.items()}
    head = " | ".join(f"t {lo}–{hi}" for lo, hi in BANDS)
    print(f"departure from the retrained model, ‖ε_θ − ε_ref‖² per image, on the forgotten image | on {args.digits} "
          f"remain digits; then the denoising error ‖ε_θ − ε‖² on the forgotten image\n")
    print(f"| model | what | {head} |\n|---|---|" + "---|" * len(BANDS))
    for path in [args.reference, *args.models]:
        name = Path(path).name if Path(path).name not in ("model", "retrained") else "/".join(Path(path).parts[-2:])
        found = {k: predictions(path, *v) for k, v in sets.items()}
        for what, values, t in (("from ref, forget", sse(found["forget"], ref["forget"]), sets["forget"][1]),
                                ("from ref, digits", sse(found["digits"], ref["digits"]), sets["digits"][1]),
                                ("error, forget", sse(found["forget"], sets["forget"][2]), sets["forget"][1])):
            print(f"| {name} | {what} | " + " | ".join(f"{v:.4g}" for v in by_band(values, t)) + " |")


if __name__ == "__main__":
    main()
