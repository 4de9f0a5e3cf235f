"""Peak memory and time of exact kNN on a CelebA-HQ-sized set: streamed from a store vs. in RAM.

    python bench/bench_knn.py [--n 30000] [--size 256] [--forget 4] [--k 10] [--dir DIR]
                              [--in-ram-n 500,1000] [--keep]

Writes a synthetic store of N random uint8 3×size×size images (30,000 × 3 × 256 × 256 = 5.9 GB)
with `write_store`, then, each in a fresh process so peak RSS is its own:
- streamed: the store opened memory-mapped, the remain set read chunk by chunk (nearest_neighbours
  on store.Rows, the path `retrack unlearn` takes), plus the content hash the cache key needs;
- in RAM: the approach without a store, as `retrack unlearn` took it before stores: the whole set
  read into RAM, the remain set copied out of it, and distances taken 4096 remain images at a
  time (with today's distance kernel, so only the memory layout differs). At full size it
  would need far more memory than this machine can spare, so it runs on the first `--in-ram-n`
  images and the figure at N is extrapolated from the model printed beside it (said so in the
  output); the streamed path also runs on those N for a like-for-like time.
The store is deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from peak import peak_rss_mb  # noqa: E402

OLD_CHUNK = 4096  # remain images per chunk in the in-RAM kNN before streaming stores


def make_store(path: Path, n: int, size: int) -> None:
    from retrack.store import write_store

    rng = np.random.default_rng(0)
    shape = (n, size, size, 3)
    rows = max(1, (256 << 20) // (size * size * 3))

    def chunks():
        for start in range(0, n, rows):
            m = min(rows, n - start)
            yield np.frombuffer(rng.bytes(m * size * size * 3), dtype=np.uint8).reshape(m, size, size, 3)

    write_store(chunks(), shape, path, f"synthetic uniform uint8, seed 0, {n}×{size}×{size}×3")




def child(mode: str, store: Path, n: int, forget: int, k: int) -> None:
    import torch  # noqa: F401  (imported before the baseline RSS, as in any real run)

    from retrack.data import load_images
    from retrack.neighbours import cache_key, nearest_neighbours
    from retrack.store import Rows

    base = peak_rss_mb()
    images = load_images(store).images[:n]
    f_idx, r_idx = np.arange(forget), np.arange(forget, n)
    t0 = time.perf_counter()
    if mode == "streamed":
        remain, forget_imgs = Rows(images, r_idx), np.asarray(images[f_idx])
        idx, _ = nearest_neighbours(remain, forget_imgs, k, progress=False)
        t1 = time.perf_counter()
        cache_key(remain, forget_imgs, k)
        hashed = time.perf_counter() - t1
    else:
        everything = np.fromfile(images.filename, dtype=np.uint8, count=images.size).reshape(images.shape)
        remain, forget_imgs = everything[r_idx], everything[f_idx]
        idx, _ = nearest_neighbours(remain, forget_imgs, k, chunk=OLD_CHUNK, progress=False)
        t1, hashed = time.perf_counter(), float("nan")
    print(json.dumps({"mode": mode, "n": n, "knn_s": t1 - t0, "hash_s": hashed, "peak_rss_mb": peak_rss_mb(),
                      "import_rss_mb": base, "first": idx[0, :3].tolist()}))


def run_child(mode: str, store: Path, n: int, forget: int, k: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", mode, "--dir", str(store.parent), "--n", str(n),
                          "--forget", str(forget), "--k", str(k)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def in_ram_model_mb(n: int, row_bytes: int, base_mb: float) -> float:
    """Baseline + the set + the remain copy + one float64 chunk of remain images."""
    chunk = min(n, OLD_CHUNK)
    return base_mb + (2 * n * row_bytes + chunk * row_bytes * 8) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=30_000)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--forget", type=int, default=4)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--dir", default="bench-knn-store")
    ap.add_argument("--in-ram-n", default="500,1000")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    store = Path(args.dir) / "store"
    if args.child:
        return child(args.child, store, args.n, args.forget, args.k)
    import torch

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}; N={args.n} images 3×{args.size}×{args.size}, "
          f"{args.forget} forget images, K={args.k}")
    try:
        t0 = time.perf_counter()
        make_store(store, args.n, args.size)
        size_gb = (store / "images.u8").stat().st_size / 1e9
        print(f"wrote the store: {size_gb:.2f} GB in {time.perf_counter() - t0:.0f} s")
        row_bytes = 3 * args.size * args.size
        small = [int(x) for x in args.in_ram_n.split(",") if x]
        rows = [run_child("streamed", store, args.n, args.forget, args.k)]
        for n in small:
            rows += [run_child(mode, store, n, args.forget, args.k) for mode in ("in-ram", "streamed")]
        print(f"{'approach':<10} {'N':>7} {'kNN s':>8} {'hash s':>7} {'peak RSS MB':>12}")
        for r in rows:
            print(f"{r['mode']:<10} {r['n']:>7} {r['knn_s']:>8.1f} {r['hash_s']:>7.1f} {r['peak_rss_mb']:>12.0f}")
        ram = [r for r in rows if r["mode"] == "in-ram"]
        if ram:
            big = ram[-1]
            base = big["import_rss_mb"]
            for r in ram:
                print(f"in-RAM memory model at N={r['n']}: {in_ram_model_mb(r['n'], row_bytes, base):.0f} MB "
                      f"(measured {r['peak_rss_mb']:.0f} MB)")
            print(f"EXTRAPOLATED, not measured: in-RAM kNN at N={args.n} needs about "
                  f"{in_ram_model_mb(args.n, row_bytes, base) / 1024:.1f} GB peak RSS by that model and "
                  f"about {big['knn_s'] * args.n / big['n']:.0f} s by linear scaling of its N={big['n']} time")
        goal = rows[0]["peak_rss_mb"] <= 2048
        print(f"streamed at N={args.n}: peak RSS {rows[0]['peak_rss_mb']:.0f} MB (goal ≤ 2048 MB: "
              f"{'met' if goal else 'NOT met'}), kNN {rows[0]['knn_s']:.0f} s + content hash {rows[0]['hash_s']:.0f} s")
    finally:
        if not args.keep:
            shutil.rmtree(store, ignore_errors=True)


if __name__ == "__main__":
    main()
