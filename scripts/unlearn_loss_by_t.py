"""Where does ReTrack's unlearning loss come from? Its expected value on a model, split by timestep.

    python scripts/unlearn_loss_by_t.py --model src/retrack/recipes/mnist_tshirt/model --per-t 4

For the MNIST T-shirt set: the T-shirt's K nearest remain images, then for every timestep t (or
every `--stride`-th) `--per-t` noisy T-shirts x_t, the per-row unlearning term
Σ_k p_k‖ε_θ(x_t) − v_k‖² (what the paper's L_unlearn averages over uniform t), and prints its mean
per timestep band and the share of E_t[L_unlearn] that each band holds.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from retrack.backends.pixel import load_model
from retrack.neighbours import nearest_neighbours
from retrack.objectives.base import noisy, sse
from retrack.objectives.retrack import weighted_target
from retrack.pretrain import recipe_data
from retrack.recipes.mnist_tshirt import load_tshirt

BANDS = ((0, 10), (10, 50), (50, 200), (200, 500), (500, 1000))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="src/retrack/recipes/mnist_tshirt/model")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--per-t", type=int, default=4)
    ap.add_argument("--stride", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    den = load_model(args.model, "cpu").denoiser.eval()
    remain = recipe_data("mnist_tshirt_remain").images
    tshirt = load_tshirt()
    knn = torch.from_numpy(nearest_neighbours(remain, tshirt[None], args.k, progress=False)[0])
    bank = torch.from_numpy(np.ascontiguousarray(remain.transpose(0, 3, 1, 2)))
    a = torch.from_numpy(tshirt.transpose(2, 0, 1)).float().div(127.5).sub(1.0)[None]
    gen = torch.Generator().manual_seed(args.seed)
    ts = torch.arange(0, den.schedule.num_steps, args.stride)
    per_t = []
    with torch.no_grad():
        for t0 in ts.split(64):
            t = t0.repeat_interleave(args.per_t)
            x0 = a.expand(len(t), -1, -1, -1)
            x = noisy(x0, t, torch.randn(x0.shape, generator=gen), den.schedule)
            gamma, sigma = den.schedule.gamma_sigma(t, x)
            target, spread = weighted_target(x, gamma, sigma, bank, knn.expand(len(t), -1))
            row = sse(den(x, t), target) + spread
            per_t.append(row.view(-1, args.per_t).mean(1))
    loss = torch.cat(per_t).double()
    total = float(loss.sum())
    print(f"E_t[L_unlearn] = {total / len(ts):.1f} (K = {args.k}, {args.per_t} draws per t, stride {args.stride})")
    for lo, hi in BANDS:
        m = (ts >= lo) & (ts < hi)
        share = float(loss[m].sum()) / total
        print(f"t in [{lo:4d}, {hi:4d}): mean {float(loss[m].mean()):10.1f}   share {share:6.1%}")


if __name__ == "__main__":
    main()
