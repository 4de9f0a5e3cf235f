"""What `--layout auto` costs a whole run: the same paper ReTrack run (the shipped MNIST T-shirt UNet
architecture, randomly initialised, synthetic 28×28 data, K = 10) with layout auto and forced to the
layout auto picked, each in a fresh process (so each pays its own cold start, as a real run does),
interleaved; the time of the train() call, median of repeats. The two runs end in bit-identical
weights, which the bench checks.

    python bench/bench_layout_run.py [--steps 50] [--batch-size 128] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))


def child(steps: int, batch: int, layout: str) -> None:
    from bench_step import setup
    from retrack.trainer import TrainSettings, train

    model, objective, data = setup(batch, 10, "cpu")
    t0 = time.perf_counter()
    log = train(model, objective, data, TrainSettings(steps=steps, batch_size=batch, layout=layout), "cpu",
                progress=False)
    seconds = time.perf_counter() - t0
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
    print(json.dumps({"seconds": seconds, "layout": log[0].get("layout"), "weights": digest[:16]}))


def run(args: argparse.Namespace, layout: str) -> dict:
    threads = ["--threads", str(args.threads)] if args.threads else []
    out = subprocess.run([sys.executable, __file__, "--child", layout, "--steps", str(args.steps),
                          "--batch-size", str(args.batch_size), *threads],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        return child(args.steps, args.batch_size, args.child)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, threads "
          f"{torch.get_num_threads()}, {args.steps} steps, batch {args.batch_size}, medians of {args.repeats}")
    times: dict[str, list[float]] = {"auto": [], "forced": []}
    for _ in range(args.repeats):
        auto = run(args, "auto")
        picked = auto["layout"]["layout"]
        forced = run(args, picked)
        assert forced["weights"] == auto["weights"], "auto must give the weights of the layout it picked"
        times["auto"].append(auto["seconds"])
        times["forced"].append(forced["seconds"])
        print(f"auto picked {picked} (one forward+backward: joint {auto['layout']['joint_s']:.3f} s, split "
              f"{auto['layout']['split_s']:.3f} s): run {auto['seconds']:.1f} s; forced {picked}: "
              f"{forced['seconds']:.1f} s; same weights")
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    print(f"median: auto {med['auto']:.1f} s, forced {med['forced']:.1f} s, overhead of timing "
          f"{med['auto'] / med['forced'] - 1:+.1%} (goal: a few percent)")


if __name__ == "__main__":
    main()
