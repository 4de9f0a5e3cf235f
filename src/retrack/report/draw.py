"""What the report computes from models and data: samples, reconstructions, forget neighbours.

Kept cheap on purpose (a handful of samples, the first few distinct forget images), and only for
models that are local folders: a report never downloads anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from retrack.backends import LoadOptions, family_of, load
from retrack.backends.pixel import load_model
from retrack.data import ImageSet, image_digest, load_images, to_model_range, to_uint8
from retrack.errors import UserError
from retrack.sampling import reconstruct

DEFAULT_GUIDANCE = 7.5  # the pipelines' and `retrack sample`'s classifier-free guidance


def local_model(spec: Any, base: Path | None = None) -> Path | None:
    """The model folder a record names, if it is on this machine (absolute, or relative to base)."""
    if not isinstance(spec, str) or not spec:
        return None
    for p in (Path(spec), (base / spec) if base else None):
        if p is not None and p.is_dir():
            return p
    return None


def draw_samples(model: Path, num: int, steps: int, seed: int, device: str, prompt: str | None = None,
                 guidance: float = DEFAULT_GUIDANCE, progress: bool = False) -> np.ndarray:
    """`num` DDIM samples with per-sample seeds: the same seed gives the same noise to any model.

    Drawn by the model's own family: a pixel UNet by the DDIM sampler, a text-to-image pipeline (or
    a LoRA adapter on one) through the pipeline under the run's prompt, as `retrack sample` draws."""

    loaded = load(str(model), device, LoadOptions(prompt=prompt if is_text_to_image(model) else None))
    return loaded.sample(num, steps, "ddim", seed, 64, guidance, progress)


def is_text_to_image(model: Path) -> bool:
    """Whether a local model folder is of a family sampled under a prompt."""
    try:
        family = family_of(model)
    except UserError:  # no family claims it: loading it says why, where that is shown
        return False
    return family is not None and family.conditioned


def draw_reconstructions(model: Path, images: np.ndarray, seed: int, device: str) -> np.ndarray:
    """Each image noised to T/4 and denoised with ancestral DDPM (the paper's memorisation probe)."""


    loaded = load_model(model, device)
    x = to_model_range(torch.from_numpy(np.ascontiguousarray(images)).to(device))
    t_start = loaded.denoiser.schedule.num_steps // 4
    return to_uint8(reconstruct(loaded.denoiser, dict(loaded.scheduler.config), x, t_start, seed))


def locate_data(record: dict[str, Any], roots: list[Path]) -> tuple[ImageSet | None, str]:
    """The run's data set, checked against its recorded digest; (images, where) or (None, why).

    Tries the recorded source, the configured --data, then a file of the same name under each
    root (or its data/ folder): a run folder that was moved or built in a temporary place still
    finds the copy beside it, and the digest makes sure it is the same data.
    """
    data = record.get("data") or {}
    named = [data.get("source"), (record.get("config") or {}).get("data")]
    named = [n for n in named if isinstance(n, str) and n]
    candidates = [Path(n) for n in named]
    for root in roots:
        for n in named:
            candidates += [root / "data" / Path(n).name, root / Path(n).name]
    digest = data.get("digest")
    for path in dict.fromkeys(candidates):
        if not path.exists():
            continue
        try:
            images = load_images(path)
        except UserError:
            continue
        if digest is None or images.digest() == digest:
            return images, str(path)
    tried = ", ".join(named) or "nothing recorded"
    return None, f"the run's data set was not found (recorded: {tried}) or its digest differs"


def distinct_rows(images: np.ndarray, limit: int) -> list[int]:
    """Positions of the first `limit` distinct images (a forget set may repeat one image)."""
    seen: dict[str, int] = {}
    for i, im in enumerate(images):
        seen.setdefault(image_digest(im), i)
        if len(seen) >= limit:
            break
    return sorted(seen.values())


def forget_and_neighbours(images: ImageSet, record: dict[str, Any], limit: int,
                          max_k: int) -> tuple[list[np.ndarray], int | None]:
    """Rows [forget image, its first max_k neighbours]; neighbours index the remain set in order."""
    forget = np.asarray((record.get("data") or {}).get("forget_indices") or [], dtype=np.int64)
    if forget.size == 0 or forget.max() >= len(images):
        return [], None
    remain = np.setdiff1d(np.arange(len(images)), forget)
    table = record.get("neighbours")
    rows = []
    for r in distinct_rows(images.images[forget], limit):
        row = [images.images[forget[r]][None]]
        if table is not None and r < len(table):
            idx = np.asarray(table[r][:max_k], dtype=np.int64)
            row.append(images.images[remain[idx]])
        rows.append(np.concatenate(row))
    k = len(table[0]) if table else None
    return rows, k
