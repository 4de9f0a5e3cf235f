"""audit(): which training images does a model regurgitate, and how often?

The question to ask before unlearning. Draw N samples, find each sample's nearest training
images (L2 over pixels in [0, 1]; identical training images are grouped first, so 51 copies of
one T-shirt are one candidate, not 51), and call a sample a copy of its nearest group when both
- the paper's absolute rule holds: L2 < 10 at 28×28, scaled to the same RMS for other sizes,
  i.e. 10·√(D/784) (`--threshold` overrides), and
- it is far closer to that group than to the rest of the data (Carlini et al. 2023's relative
  rule): L2 < α · mean L2 to the next n nearest groups, α = 0.5, n = 50. Digits drawn by a
  healthy model lie within the absolute threshold of many training digits alike; a regurgitated
  image lies close to one training image and far from all others.
The report lists each copied group (all its indices, the samples that copy it, the closest L2),
and the forget file names every index of every copied group, ready for
`retrack unlearn --forget @forget.txt`.
"""

from __future__ import annotations

import math
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retrack.backends.pixel import load_model
from retrack.data import image_digest, load_images
from retrack.errors import UserError, first_line, require
from retrack.grid import save_grid
from retrack.runrecord import atomic_directory, check_output, environment_record, write_json
from retrack.sampling import sample

PAPER_L2, PAPER_PIXELS = 10.0, 784
RATIO, NEXT = 0.5, 50
REPORT, SHEET, FORGET_FILE, SAMPLES = "audit.json", "contact_sheet.png", "forget.txt", "samples.npz"


@dataclass(frozen=True)
class AuditConfig:
    """Every setting of one audit; each is a flag of `retrack audit` of the same name."""

    model: str
    data: str
    num: int = 500
    out: str | None = None
    seed: int = 0
    steps: int = 50
    sampler: str = "ddim"
    batch_size: int = 64
    threshold: float | None = None  # None: 10·√(D/784)
    ratio: float = RATIO
    next: int = NEXT
    device: str | None = None
    overwrite: bool = False
    samples: str | None = None  # an .npz of samples already drawn (`retrack sample`) instead of drawing


def group_identical(images: np.ndarray) -> tuple[np.ndarray, list[list[int]]]:
    """(one representative per distinct image, the training indices of each group), in order of
    first appearance."""

    groups: dict[str, list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(image_digest(im), []).append(i)
    members = list(groups.values())
    return images[[m[0] for m in members]], members


def nearest(samples: np.ndarray, reps: np.ndarray, k: int, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """(N, k) smallest L2 distances over [0, 1] pixels and their indices into `reps`, ascending;
    streamed over chunks of `reps`, so memory does not grow with the training set."""
    k = min(k, len(reps))
    x = torch.from_numpy(samples.reshape(len(samples), -1)).double() / 255
    best_d = torch.full((len(x), 0), math.inf, dtype=torch.float64)
    best_i = torch.zeros((len(x), 0), dtype=torch.long)
    for start in range(0, len(reps), chunk):
        y = torch.from_numpy(reps[start:start + chunk].reshape(-1, x.shape[1])).double() / 255
        d = torch.cat([best_d, torch.cdist(x, y)], 1)
        i = torch.cat([best_i, torch.arange(start, start + len(y)).expand(len(x), -1)], 1)
        best_d, order = d.topk(min(k, d.shape[1]), dim=1, largest=False, sorted=True)
        best_i = i.gather(1, order)
    return best_d.numpy(), best_i.numpy()


def copy_rule(dist: np.ndarray, threshold: float, ratio: float) -> np.ndarray:
    """(N,) bool: absolute L2 below `threshold` and, if `ratio` > 0 and there are other groups,
    below `ratio` × the mean L2 to the next nearest groups."""
    d1 = dist[:, 0]
    ok = d1 < threshold
    if ratio > 0 and dist.shape[1] > 1:
        ok &= d1 < ratio * dist[:, 1:].mean(1)
    return ok


def default_threshold(shape: tuple[int, ...]) -> float:
    return PAPER_L2 * math.sqrt(int(np.prod(shape)) / PAPER_PIXELS)


def find_copies(samples: np.ndarray, train: np.ndarray, threshold: float | None = None,
                ratio: float = RATIO, next_: int = NEXT) -> dict[str, Any]:
    """The audit itself on arrays: uint8 (N, H, W, C) samples against the training images."""
    require(samples.shape[1:] == train.shape[1:],
            f"the model makes {samples.shape[1:]} images but the data holds {train.shape[1:]}.")
    reps, members = group_identical(train)
    threshold = default_threshold(train.shape[1:]) if threshold is None else float(threshold)
    dist, idx = nearest(samples, reps, next_ + 1)
    is_copy = copy_rule(dist, threshold, ratio)
    copied: dict[int, list[int]] = {}
    for s in np.flatnonzero(is_copy):
        copied.setdefault(int(idx[s, 0]), []).append(int(s))
    groups = [{"indices": members[g], "size": len(members[g]), "count": len(s),
               "fraction": len(s) / len(samples), "samples": s,
               "min_l2": float(dist[s, 0].min())} for g, s in copied.items()]
    groups.sort(key=lambda r: (-r["count"], r["indices"][0]))
    return {"rule": {"distance": "L2 over pixels in [0, 1]", "threshold": threshold,
                     "ratio": ratio, "next": min(next_, len(reps) - 1),
                     "text": f"copy: L2 to the nearest group < {threshold:.3g} and < {ratio:g} × mean "
                             f"L2 to the next {min(next_, len(reps) - 1)} groups"},
            "num_samples": int(len(samples)), "num_train": int(len(train)), "distinct_train": int(len(reps)),
            "copies": int(is_copy.sum()), "fraction": float(is_copy.mean()) if len(samples) else 0.0,
            "groups": groups, "nearest_l2": dist[:, 0].tolist(),
            "nearest_group": idx[:, 0].tolist()}


def contact_sheet(samples: np.ndarray, train: np.ndarray, groups: list[dict], path: Path,
                  per_row: int = 8) -> None:
    """One row per copied group: its training image, then up to `per_row` samples that copy it."""

    blank = np.full_like(train[:1], 255)
    rows = []
    for g in groups or []:
        picks = [train[g["indices"][0]][None]] + [samples[s][None] for s in g["samples"][:per_row]]
        picks += [blank] * (per_row + 1 - len(picks))
        rows.append(np.concatenate(picks))
    sheet = np.concatenate(rows) if rows else blank
    save_grid(sheet, path, ncol=per_row + 1, scale=max(1, 112 // train.shape[1]))


def audit(model: str, data: str, progress: bool = True, **settings: Any) -> dict[str, Any]:
    """Sample `num` images from `model` and report the training images of `data` it copies.

    Args:
        model: diffusers pipeline folder, bare UNet folder or hub id.
        data: image folder, .npz or torchvision-style folder: the model's training set.
        **settings: any other field of AuditConfig (num, out, seed, steps, threshold, ratio, ...).
    Returns:
        The report (also written to out/audit.json with the contact sheet and forget file).
    """

    cfg = _validated(AuditConfig(model=model, data=data, **settings))
    if cfg.out is not None:
        check_output(Path(cfg.out), cfg.overwrite, [Path(p) for p in (model, data) if Path(p).exists()])
    images = load_images(cfg.data)
    loaded = load_model(cfg.model, cfg.device)
    want = loaded.denoiser.sample_shape
    require(images.shape == want, f"the data's images are {images.shape} (C, H, W) but the model makes {want}.")
    if cfg.samples is not None:
        samples = _read_samples(cfg.samples)
        require(samples.ndim == 4 and samples.shape[1:] == images.images.shape[1:] and samples.dtype == np.uint8,
                f"--samples {cfg.samples!r} holds {samples.shape} {samples.dtype} images, not uint8 "
                f"(N, {', '.join(map(str, images.images.shape[1:]))}) like the data.")
    else:
        samples = sample(loaded.denoiser, dict(loaded.scheduler.config), cfg.num, cfg.steps, cfg.sampler,
                         cfg.seed, cfg.batch_size, progress)
    report = find_copies(samples, images.images, cfg.threshold, cfg.ratio, cfg.next)
    if cfg.out is not None:
        with atomic_directory(Path(cfg.out)) as tmp:
            write_json(tmp / REPORT, {**report, **environment_record(cfg, data_digest=images.digest())})
            contact_sheet(samples, images.images, report["groups"], tmp / SHEET)
            indices = sorted(i for g in report["groups"] for i in g["indices"])
            (tmp / FORGET_FILE).write_text(f"# copied training images of {cfg.data}; "
                                           f"{report['rule']['text']}\n" + "".join(f"{i}\n" for i in indices))
            np.savez_compressed(tmp / SAMPLES, images=samples)
    return report


def _read_samples(path: str) -> np.ndarray:
    """The `images` array of an .npz of samples (`retrack sample --out`), or one sentence."""

    try:
        with open(path, "rb") as fh:
            magic = fh.read(6)
        require(magic[:4] in (b"PK\x03\x04", b"PK\x05\x06") or magic == b"\x93NUMPY",
                f"--samples {path!r} is not an .npz archive (as `retrack sample` writes).")
        loaded = np.load(path, allow_pickle=False)
        require(isinstance(loaded, np.lib.npyio.NpzFile),
                f"--samples {path!r} is a bare array, not an .npz holding 'images' (as `retrack sample` writes).")
        with loaded as z:
            require("images" in z.files, f"--samples {path!r} holds no 'images' array.")
            return z["images"]
    except ValueError as e:  # objects, which would need pickle
        raise UserError(f"--samples {path!r}: its 'images' array is not plain numbers "
                        f"({first_line(e)[:80]}).") from None
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"--samples {path!r} is not an .npz archive ({type(e).__name__}).") from None


def _validated(cfg: AuditConfig) -> AuditConfig:
    for name in ("num", "steps", "batch_size", "next"):
        require(getattr(cfg, name) >= 1, f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}.")
    require(cfg.sampler in ("ddpm", "ddim"), f"--sampler must be ddpm or ddim, got {cfg.sampler!r}.")
    require(cfg.threshold is None or cfg.threshold > 0, f"--threshold must be positive, got {cfg.threshold}.")
    require(cfg.samples is None or Path(cfg.samples).is_file(), f"--samples {cfg.samples!r} does not exist.")
    require(cfg.ratio >= 0, f"--ratio must be ≥ 0 (0: absolute rule only), got {cfg.ratio}.")
    require(cfg.ratio < 1, f"--ratio {cfg.ratio:g} never decides: the nearest group is never farther than the "
            f"next ones, so any ratio ≥ 1 keeps every sample the --threshold keeps; use a value below 1, or 0 for "
            f"the --threshold rule alone.")
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return AuditConfig(**{**asdict(cfg), "device": device})
