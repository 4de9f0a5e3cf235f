"""Membership scores of images under a diffusion model: does it treat an image as training data?

Three attacks from the literature on diffusion models, written from their papers; every score is
"lower = more like a training image", one number per image, computed in batches:

- `loss`: the denoising loss at chosen timesteps (Carlini et al. 2023, "Extracting training data
  from diffusion models", their loss-threshold attack and the per-example statistic LiRA builds on):
  mean over timesteps t and noise draws ε of mean((ε_θ(γ_t·x₀ + σ_t·ε, t) − ε)²). Each image's noise
  comes from (seed, its row, the draw), so the forget image and non-members see the same draws.
- `secmi`: SecMI's t-error (Duan et al., ICML 2023): carry x₀ deterministically to x_t by DDIM
  inversion in steps of k (x_s → x_{s+k} with ε_θ(x_s, s)), take one more deterministic step to
  x_{t+k}, come back one DDIM step to x̃_t, and measure mean((x̃_t − x_t)²). A training image's
  posterior is estimated more exactly, so its error is smaller. t/k + 2 model evaluations.
- `pia`: PIA's proximal initialisation (Kong et al., ICLR 2024): ε₀ = ε_θ(x₀, 0), x_t =
  γ_t·x₀ + σ_t·ε₀, score (mean |ε_θ(x_t, t) − ε₀|^p)^(1/p). Two model evaluations (the first is
  shared with SecMI's first inversion step when both run).

Pure functions of a Denoiser and uint8 images; calibration against non-members is
metrics/calibration.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from retrack.errors import require
from retrack.metrics.likelihood import model_device_dtype
from retrack.models import Denoiser

ATTACKS: tuple[str, ...] = ("loss", "secmi", "pia")
DESCRIPTIONS = {
    "loss": "denoising loss (Carlini et al. 2023)",
    "secmi": "SecMI t-error (Duan et al. 2023)",
    "pia": "PIA proximal initialisation (Kong et al. 2024)",
}


@dataclass(frozen=True)
class AttackSettings:
    """Each attack's settings; the defaults are the ones used in this project's measurements."""

    loss_timesteps: tuple[int, ...] = (100,)
    loss_draws: int = 4  # noise draws per timestep
    secmi_t: int = 100
    secmi_k: int = 10
    pia_t: int = 200
    pia_p: float = 4.0
    seed: int = 0
    batch_size: int = 128

    def check(self, num_timesteps: int, attacks: tuple[str, ...]) -> None:
        """Timesteps within the model's 0..T−1, named by the setting that fixes them."""
        T = num_timesteps
        bad = [a for a in attacks if a not in ATTACKS]
        require(not bad, f"unknown attack {bad[0]!r}; choose from {', '.join(ATTACKS)}." if bad else "")
        require(self.batch_size >= 1 and self.loss_draws >= 1, "batch size and loss draws must be at least 1.")
        if "loss" in attacks:
            require(len(self.loss_timesteps) > 0 and all(0 <= t < T for t in self.loss_timesteps),
                    f"the loss attack's timesteps must be in 0..{T - 1} for this model, got "
                    f"{','.join(map(str, self.loss_timesteps))}.")
        if "secmi" in attacks:
            require(self.secmi_k >= 1 and self.secmi_t >= self.secmi_k and self.secmi_t % self.secmi_k == 0
                    and self.secmi_t + self.secmi_k < T,
                    f"SecMI needs 1 ≤ k ≤ t, t a multiple of k and t + k < {T} for this model, got "
                    f"t = {self.secmi_t}, k = {self.secmi_k}.")
        if "pia" in attacks:
            require(1 <= self.pia_t < T and self.pia_p > 0,
                    f"PIA needs a timestep in 1..{T - 1} and p > 0, got t = {self.pia_t}, p = {self.pia_p}.")

    def evaluations(self, attacks: tuple[str, ...]) -> int:
        """Model evaluations per image for these attacks (ε_θ(x₀, 0) shared by SecMI and PIA)."""
        n = 0
        if "loss" in attacks:
            n += len(self.loss_timesteps) * self.loss_draws
        if "secmi" in attacks:
            n += self.secmi_t // self.secmi_k + 2
        if "pia" in attacks:
            n += 1 if "secmi" in attacks else 2
        return n

    def record(self, attacks: tuple[str, ...]) -> dict:
        out: dict = {"seed": self.seed}
        if "loss" in attacks:
            out["loss"] = {"timesteps": list(self.loss_timesteps), "draws": self.loss_draws}
        if "secmi" in attacks:
            out["secmi"] = {"t": self.secmi_t, "k": self.secmi_k}
        if "pia" in attacks:
            out["pia"] = {"t": self.pia_t, "p": self.pia_p}
        return out


def row_noise(seed: int, rows: range | list[int], draw: int, shape: tuple[int, ...]) -> torch.Tensor:
    """(len(rows), *shape) standard normal noise, row i from (seed, i, draw) only: a score never
    depends on the batch an image shares, nor on the other images of its set."""
    out = torch.empty((len(rows), *shape))
    gen = torch.Generator()
    for j, i in enumerate(rows):
        gen.manual_seed((int(seed) * 1_000_003 + int(i) * 1_009 + int(draw)) % 2**63)
        out[j] = torch.randn(shape, generator=gen)
    return out


def _abar(denoiser: Denoiser, t: int, like: torch.Tensor) -> torch.Tensor:
    return denoiser.schedule.alphas_cumprod[int(t)].to(device=like.device, dtype=like.dtype)


def _eps(denoiser: Denoiser, x: torch.Tensor, t: int) -> torch.Tensor:
    return denoiser(x, torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long))


def ddim_move(denoiser: Denoiser, x: torch.Tensor, eps: torch.Tensor, s: int, t: int) -> torch.Tensor:
    """The deterministic DDIM map from timestep s to t (either way) with the noise estimate `eps`:
    x̂₀ = (x − √(1−ᾱ_s)·ε)/√ᾱ_s, then √ᾱ_t·x̂₀ + √(1−ᾱ_t)·ε."""
    a_s, a_t = _abar(denoiser, s, x), _abar(denoiser, t, x)
    x0 = (x - (1 - a_s).sqrt() * eps) / a_s.sqrt()
    return a_t.sqrt() * x0 + (1 - a_t).sqrt() * eps


def _per_image(err: torch.Tensor) -> torch.Tensor:
    return err.flatten(1).mean(dim=1)


@torch.no_grad()
def score_batch(denoiser: Denoiser, x0: torch.Tensor, rows: range, attacks: tuple[str, ...],
                settings: AttackSettings) -> dict[str, torch.Tensor]:
    """Each attack's score of one batch of model-range images x₀ (B, C, H, W); `rows` are their
    positions in the whole set (they choose the loss attack's noise)."""
    s = settings
    out: dict[str, torch.Tensor] = {}
    if "loss" in attacks:
        total = torch.zeros(x0.shape[0], dtype=torch.float64, device=x0.device)
        for draw in range(s.loss_draws):
            eps = row_noise(s.seed, rows, draw, tuple(x0.shape[1:])).to(x0.device, x0.dtype)
            for t in s.loss_timesteps:
                a = _abar(denoiser, t, x0)
                pred = _eps(denoiser, a.sqrt() * x0 + (1 - a).sqrt() * eps, t)
                total += _per_image((pred - eps) ** 2).double()
        out["loss"] = total / (s.loss_draws * len(s.loss_timesteps))
    eps0 = _eps(denoiser, x0, 0) if ("secmi" in attacks or "pia" in attacks) else None
    if "secmi" in attacks:
        x, k = x0, s.secmi_k
        for step in range(0, s.secmi_t, k):
            eps = eps0 if step == 0 else _eps(denoiser, x, step)
            x = ddim_move(denoiser, x, eps, step, step + k)
        x_t = x
        x_next = ddim_move(denoiser, x_t, _eps(denoiser, x_t, s.secmi_t), s.secmi_t, s.secmi_t + k)
        back = ddim_move(denoiser, x_next, _eps(denoiser, x_next, s.secmi_t + k), s.secmi_t + k, s.secmi_t)
        out["secmi"] = _per_image((back - x_t) ** 2).double()
    if "pia" in attacks:
        a = _abar(denoiser, s.pia_t, x0)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps0
        diff = (_eps(denoiser, x_t, s.pia_t) - eps0).abs().double()
        out["pia"] = _per_image(diff ** s.pia_p) ** (1.0 / s.pia_p)
    return out


def membership_scores(denoiser: Denoiser, images: np.ndarray, attacks: tuple[str, ...] = ATTACKS,
                      settings: AttackSettings | None = None, progress: bool = False,
                      desc: str = "membership") -> dict[str, np.ndarray]:
    """{attack: (N,) float64 scores} of uint8 (N, H, W, C) images; lower = more member-like.

    The model is put in eval mode for the call and restored; its weights are not touched."""
    settings = settings or AttackSettings()
    attacks = tuple(attacks)
    settings.check(denoiser.schedule.num_steps, attacks)
    require(images.ndim == 4 and images.dtype == np.uint8, "membership scores take uint8 (N, H, W, C) images.")
    device, dtype = model_device_dtype(denoiser)
    found: dict[str, list[np.ndarray]] = {a: [] for a in attacks}
    was = denoiser.training
    denoiser.eval()
    try:
        n, b = len(images), settings.batch_size
        for start in tqdm(range(0, n, b), desc=desc, disable=not progress, dynamic_ncols=True):
            stop = min(n, start + b)
            rows = torch.from_numpy(np.ascontiguousarray(images[start:stop])).permute(0, 3, 1, 2)
            x0 = rows.to(device, dtype).div(127.5).sub(1.0)  # the training range, in the model's precision
            for name, value in score_batch(denoiser, x0, range(start, stop), attacks, settings).items():
                found[name].append(value.cpu().numpy())
    finally:
        denoiser.train(was)
    return {a: np.concatenate(v) if v else np.zeros(0) for a, v in found.items()}
