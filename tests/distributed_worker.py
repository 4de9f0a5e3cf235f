"""One process of test_distributed.py's run: trains the tiny model with every method and saves,
per step, the combined gradient and the weights it updates; then runs `unlearn()` end to end.

    RANK=r WORLD_SIZE=n MASTER_ADDR=... MASTER_PORT=... python distributed_worker.py OUT MODEL DATA
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_denoiser, tiny_train_data  # noqa: E402
from retrack import objectives  # noqa: E402
from retrack.api import unlearn  # noqa: E402
from retrack.trainer import TrainSettings, train  # noqa: E402

METHODS = {"retrack": {}, "vanilla": {}, "neggrad": {}, "erasediff": {}, "siss": {},
           "retrack-auto": {"lam": "auto"}, "retrack-nash": {"balance": "nash"}}


def build(method: str):
    return objectives.build(method.split("-")[0], **METHODS[method])
SETTINGS = TrainSettings(steps=2, batch_size=8, grad_accum=2, lr=1e-3)


def main(out: Path, model: str, data: str) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    for method in METHODS:
        denoiser, seen = tiny_denoiser(), []

        def record(step: int, params: list[torch.nn.Parameter], seen=seen) -> None:
            seen.append({"grad": [p.grad.clone() for p in params],
                         "weights": [p.detach().clone() for p in params]})

        train(denoiser, build(method), tiny_train_data(), SETTINGS, "cpu", False, record)
        final = [p.detach().clone() for p in denoiser.parameters()]
        torch.save({"steps": seen, "final": final}, out / f"{method}-{rank}.pt")
    # The saliency mask is made from every process's share of the forget draws, and is the same on each.
    denoiser = tiny_denoiser()
    log = train(denoiser, build("retrack"), tiny_train_data(), replace(SETTINGS, saliency=0.3), "cpu", False)
    torch.save({"saliency": log[0]["saliency"], "final": [p.detach().clone() for p in denoiser.parameters()]},
               out / f"saliency-{rank}.pt")
    # Evaluating on the main process alone: every sample a copy (threshold 100), never stopping ...
    unlearn(model, data, "0,1", str(out / "unlearned"), progress=False, steps=2, batch_size=8,
            grad_accum=2, k=3, device="cpu", cache_dir=str(out / f"cache-{rank}"), eval_every=1,
            eval_samples=2, eval_steps=2, copy_threshold=100.0, stop_at="copies=0")
    # ... and no copy at all (threshold 0): the main process's stop at step 0 reaches both.
    unlearn(model, data, "0,1", str(out / "stopped"), progress=False, steps=2, batch_size=8, k=3, device="cpu",
            cache_dir=str(out / f"cache-{rank}"), eval_every=1, eval_samples=2, eval_steps=2,
            copy_threshold=0.0, stop_at="copies=0")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3])
