"""Reproduce the shipped MNIST digit classifier (weights + provenance record).

    .venv/bin/python scripts/train_classifier.py            # writes into the package
    .venv/bin/python scripts/train_classifier.py --out-dir /tmp/clf --epochs 5

Training runs on one CPU thread by default so that the same seed gives the same weights; the
record (classifier.json) holds the data digest, split rule and sizes, seed, epochs, held-out
accuracy, the weights' sha256 and package versions.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from retrack.recipes.mnist_tshirt import classifier as clf
from retrack.recipes.mnist_tshirt.builder import load_digits
from retrack.runrecord import versions, write_json


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = clf.TrainConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", type=Path, default=clf.HERE,
                   help="folder for classifier.safetensors and classifier.json (default: package)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--max-shift", type=int, default=d.max_shift)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 = reproducible)")
    return p.parse_args(argv)


def build_record(split: clf.DigitSplit, source: str, cfg: clf.TrainConfig,
                 model: clf.DigitClassifier, sha: str, seconds: float) -> dict:
    """The provenance written beside the weights; load_digit_classifier checks weights_sha256."""
    return {
        "weights_file": clf.WEIGHTS_PATH.name,
        "weights_sha256": sha,
        "architecture": "DigitClassifier: 4 conv3x3 (32,32,64,64) + ReLU, 3 maxpool2, "
                        "MLP 576-128-10; no BatchNorm, no dropout",
        "parameters": clf.count_parameters(model),
        "feature_dim": model.feature_dim,
        "num_classes": clf.NUM_CLASSES,
        "input": "uint8 (N, 1|3, 28, 28) 0..255; 3 channels averaged; scaled to [-1, 1] inside",
        "data": {"source": source, "n": int(len(split.train_y) + len(split.test_y)),
                 "sha256_images_then_labels": split.digest},
        "split": {"rule": clf.SPLIT_RULE, "test_fraction": clf.TEST_FRACTION,
                  "train": int(len(split.train_y)), "test": int(len(split.test_y))},
        "train": asdict(cfg) | {"optimizer": "AdamW", "schedule": "OneCycleLR",
                                "augmentation": f"random integer shifts of +-{cfg.max_shift} px"},
        "seed": cfg.seed,
        "epochs": cfg.epochs,
        "test_accuracy": clf.accuracy(model, split.test_x, split.test_y),
        "train_accuracy": clf.accuracy(model, split.train_x, split.train_y),
        "train_seconds": round(seconds, 1),
        "torch_threads": torch.get_num_threads(),
        "command": " ".join(["python", *sys.argv]),
        "versions": versions(),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = clf.TrainConfig(seed=args.seed, epochs=args.epochs, batch_size=args.batch_size,
                          lr=args.lr, weight_decay=args.weight_decay, max_shift=args.max_shift)
    images, labels, source = load_digits()
    split = clf.split_digits(images, labels)
    start = time.perf_counter()
    model = clf.train_classifier(split, cfg)
    seconds = time.perf_counter() - start
    weights = args.out_dir / clf.WEIGHTS_PATH.name
    sha = clf.save_classifier(model, weights)
    record = build_record(split, source, cfg, model, sha, seconds)
    write_json(args.out_dir / clf.RECORD_PATH.name, record)
    (args.out_dir / clf.RECORD_PATH.name).chmod(0o644)  # package data: world-readable
    print(f"test accuracy {record['test_accuracy']:.4f} on {record['split']['test']} held-out "
          f"digits; wrote {weights} (sha256 {sha[:12]}...)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
