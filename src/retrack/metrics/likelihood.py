"""NLL in bits/dim through the probability-flow ODE of the VP-SDE that matches the model's schedule.

Song et al. 2021 (score-SDE, Appendix D.2): integrate dx/dt = −½β(t)[x + ∇log p_t(x)] from the
data (t = 1e-5) to t = 1, accumulate the divergence of the drift, and add the log-density of the
N(0, I) prior at the end. Unlike the reference code, which went through numpy on the CPU at every
function evaluation and solved one image at a time, everything here stays in torch on the model's
device and a whole batch is solved at once: every image keeps its own time and step size (a
per-sample Dormand–Prince RK45 controller identical to scipy's), so an image's result does not
depend on which other images share its batch.

Two conventions for the continuous schedule (`schedule=`):
- "model" (default, `VPSchedule`): log ᾱ(t) is the monotone cubic through log ᾱ(0) = 0 and
  log ᾱ(t_i) = log ᾱ_i at t_i = (i + 1)/T, β(t) = −d log ᾱ/dt, model label t·T − 1; the model is
  only ever asked about the ᾱ it was trained on.
- "score-sde" (`LinearVPSchedule`): the score-SDE code's VP-SDE, β linear from T·β_1 to T·β_T
  (0.1 to 20 for the DDPM linear schedule), model label t·(T − 1); what that code reports, so
  figures computed with it compare with papers that used it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from retrack.errors import UserError, require

Divergence = Literal["hutchinson", "exact"]
FlowConvention = Literal["model", "score-sde"]
FLOW_CONVENTIONS: tuple[str, ...] = ("model", "score-sde")
# The paper's bpd offset for data in [-1, 1]: log2(128) = 7 bits per dimension (see bits_per_dim).
BPD_OFFSET = 7.0


@dataclass(frozen=True)
class VPSchedule:
    """The continuous VP-SDE that passes exactly through the model's own discrete ᾱ_i.

    log ᾱ(t) is the monotone cubic (PCHIP, Fritsch–Carlson as in scipy's PchipInterpolator)
    through the knots log ᾱ(0) = 0 and log ᾱ(t_i) = log ᾱ_i at t_i = (i + 1)/T, and
    β(t) = −d log ᾱ/dt. Why this choice: it reproduces ᾱ_i at every trained timestep for any
    schedule (linear, cosine, scaled-linear); monotonicity keeps β ≥ 0; and β is continuous, which
    matters because piecewise-linear log ᾱ makes β a 1000-step staircase whose jumps cost RK45 a
    hundred times more evaluations at tight tolerances and degrade its accuracy. For the linear
    schedule β(t_i) ≈ T·β_i, Song et al.'s DDPM↔VP-SDE correspondence. The model is queried at
    the fractional label t·T − 1, so t_i maps to the integer timestep i it was trained on; labels in
    (−1, 0) below t = 1/T are a mild extrapolation, as in the reference code.
    """

    knots: torch.Tensor  # (T + 1,) float64: log ᾱ at t = 0, 1/T, ..., 1
    slopes: torch.Tensor  # (T + 1,) float64: d log ᾱ/dt at the knots

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: torch.Tensor) -> VPSchedule:
        ab = torch.as_tensor(alphas_cumprod, dtype=torch.float64).cpu()
        require(bool((ab > 0).all() and (ab < 1).all() and (ab[1:] < ab[:-1]).all()),
                "the NLL needs a schedule with 1 > ᾱ_0 > ... > ᾱ_T > 0 (not zero terminal SNR).")
        knots = torch.cat([ab.new_zeros(1), ab.log()])
        return cls(knots, _pchip_slopes(knots, 1 / (knots.shape[0] - 1)))

    @property
    def num_steps(self) -> int:
        return int(self.knots.shape[0] - 1)

    def _segment(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u = t.to(torch.float64) * self.num_steps
        i = u.floor().clamp(0, self.num_steps - 1)
        return i.long(), u - i

    def _hermite(self, t: torch.Tensor, derivative: bool) -> torch.Tensor:
        i, w = self._segment(t)
        knots, slopes = self.knots.to(t.device), self.slopes.to(t.device)
        y0, y1, d0, d1, h = knots[i], knots[i + 1], slopes[i], slopes[i + 1], 1 / self.num_steps
        if derivative:
            return ((6 * w**2 - 6 * w) * (y0 - y1) / h + (3 * w**2 - 4 * w + 1) * d0
                    + (3 * w**2 - 2 * w) * d1)
        return ((2 * w**3 - 3 * w**2 + 1) * y0 + (w**3 - 2 * w**2 + w) * h * d0
                + (3 * w**2 - 2 * w**3) * y1 + (w**3 - w**2) * h * d1)

    def log_alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        return self._hermite(t, derivative=False)

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        return -self._hermite(t, derivative=True)

    def gamma_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _gamma_sigma(self.log_alpha_bar(t))

    def label(self, t: torch.Tensor) -> torch.Tensor:
        """The (fractional) model timestep of continuous time t."""
        return t.to(torch.float64) * self.num_steps - 1


@dataclass(frozen=True)
class LinearVPSchedule:
    """The score-SDE code's VP-SDE (Song et al. 2021): β(t) = β_min + t(β_max − β_min) on [0, 1].

    For a DDPM with linear β_1 … β_T, β_min = T·β_1 and β_max = T·β_T (0.1 and 20 for the usual
    1e-4 … 0.02 over T = 1000), log ᾱ(t) = −½t²(β_max − β_min) − tβ_min, and the model is asked
    at label t·(T − 1), as that code does for DDPM checkpoints. Why offer it beside `VPSchedule`:
    it is how published bits/dim were computed. Its ᾱ at a label differs from the ᾱ the model was
    trained with there (ᾱ(t) ≠ ᾱ_i at t = i/(T − 1)), so it reads a slightly different ODE off the
    same network; it only exists for linear schedules.
    """

    beta_min: float
    beta_max: float
    num_steps: int

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: torch.Tensor) -> LinearVPSchedule:
        ab = torch.as_tensor(alphas_cumprod, dtype=torch.float64).cpu()
        betas = 1 - ab / torch.cat([ab.new_ones(1), ab[:-1]])
        n = betas.shape[0]
        line = torch.linspace(float(betas[0]), float(betas[-1]), n, dtype=torch.float64)
        require(n >= 2 and float((betas - line).abs().max()) <= 1e-3 * float(betas.abs().max()),
                "--nll-schedule score-sde needs a model with a linear β schedule (the score-SDE "
                "VP-SDE is linear in β); use --nll-schedule model.")
        return cls(float(betas[0]) * n, float(betas[-1]) * n, n)

    def log_alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to(torch.float64)
        return -0.5 * t**2 * (self.beta_max - self.beta_min) - t * self.beta_min

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        return self.beta_min + t.to(torch.float64) * (self.beta_max - self.beta_min)

    def gamma_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _gamma_sigma(self.log_alpha_bar(t))

    def label(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.float64) * (self.num_steps - 1)


FlowSchedule = VPSchedule | LinearVPSchedule


def flow_schedule(alphas_cumprod: torch.Tensor, convention: str = "model") -> FlowSchedule:
    """The continuous schedule of the probability-flow ODE under `convention` (module docstring)."""
    require(convention in FLOW_CONVENTIONS,
            f"--nll-schedule must be one of {', '.join(FLOW_CONVENTIONS)}, got {convention!r}.")
    if convention == "score-sde":
        return LinearVPSchedule.from_alphas_cumprod(alphas_cumprod)
    return VPSchedule.from_alphas_cumprod(alphas_cumprod)


def _gamma_sigma(log_alpha_bar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (0.5 * log_alpha_bar).exp(), (-torch.expm1(log_alpha_bar)).sqrt()


def _pchip_slopes(y: torch.Tensor, h: float) -> torch.Tensor:
    """Fritsch–Carlson knot slopes on a uniform grid (harmonic mean; Moler's end-point rule)."""
    m = (y[1:] - y[:-1]) / h
    d = torch.zeros_like(y)
    same = (m[1:] * m[:-1]) > 0
    d[1:-1] = torch.where(same, 2 / (1 / m[:-1] + 1 / m[1:]).where(same, torch.ones_like(m[1:])),
                          torch.zeros_like(m[1:]))
    for end, (m0, m1) in ((0, (m[0], m[1])), (-1, (m[-1], m[-2]))):
        e = (3 * m0 - m1) / 2
        if torch.sign(e) != torch.sign(m0):
            e = torch.zeros_like(e)
        elif torch.sign(m0) != torch.sign(m1) and e.abs() > 3 * m0.abs():
            e = 3 * m0
        d[end] = e
    return d


# ---------------------------------------------------------------------------------------------
# Dormand–Prince RK45 with one step-size controller per sample
# ---------------------------------------------------------------------------------------------

# Butcher tableau, 5th-order weights and error weights of scipy's RK45 (Dormand & Prince 1980).
_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0)
_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
)
_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84)
_E = (-71 / 57600, 0.0, 71 / 16695, -71 / 1920, 17253 / 339200, -22 / 525, 1 / 40)
_SAFETY, _MIN_FACTOR, _MAX_FACTOR, _EXPONENT = 0.9, 0.2, 10.0, -1 / 5

# fun(t (b,), y (b, n), rows (b,)) -> dy/dt (b, n); `rows` says which images of the batch these are.
OdeFunction = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.square().mean(dim=1).sqrt()


def _initial_step(fun: OdeFunction, t0: torch.Tensor, y0: torch.Tensor, f0: torch.Tensor,
                  t1: float, rtol: float, atol: float) -> torch.Tensor:
    """Hairer, Nørsett & Wanner, Sec. II.4, as scipy's select_initial_step, per sample."""
    interval = t1 - t0
    scale = atol + y0.abs() * rtol
    d0, d1 = _rms(y0 / scale), _rms(f0 / scale)
    h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1)
    h0 = torch.minimum(h0.nan_to_num(nan=1e-6), interval)  # NaN output at t0: rejected later
    f1 = fun(t0 + h0, y0 + h0[:, None] * f0, torch.arange(y0.shape[0], device=y0.device))
    d2 = _rms((f1 - f0) / scale) / h0
    tiny = (d1 <= 1e-15) & (d2 <= 1e-15)
    h1 = torch.where(tiny, torch.clamp(h0 * 1e-3, min=1e-6),
                     (0.01 / torch.maximum(d1, d2)) ** (1 / 5))
    h = torch.minimum(torch.minimum(100 * h0, h1), interval)
    return torch.where(torch.isfinite(h) & (h > 0), h, torch.full_like(h, 1e-6))  # NaN output


def _dopri_step(fun: OdeFunction, t: torch.Tensor, y: torch.Tensor, f: torch.Tensor,
                h: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One Dormand–Prince step of size h per row: (y_new, f(t + h, y_new), error estimate)."""
    k = [f]
    for s in range(1, 6):
        dy = sum(a * ks for a, ks in zip(_A[s], k, strict=False))
        k.append(fun(t + _C[s] * h, y + h[:, None] * dy, rows))
    y_new = y + h[:, None] * sum(b * ks for b, ks in zip(_B, k, strict=True))
    f_new = fun(t + h, y_new, rows)
    k.append(f_new)
    err = h[:, None] * sum(e * ks for e, ks in zip(_E, k, strict=True))
    return y_new, f_new, err


def solve_rk45(fun: OdeFunction, y0: torch.Tensor, t0: float, t1: float, rtol: float = 1e-5,
               atol: float = 1e-5, max_steps: int = 100_000,
               on_step: Callable[[float], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Integrate dy/dt = fun(t, y) for every row of y0 (B, n) from t0 to t1 > t0.

    Each row has its own time, step size and accept/reject decisions, exactly as scipy's RK45
    would take for that row alone (same tableau, RMS error norm, initial step, safety factors);
    finished rows leave the batch so stiff images do not make easy ones pay. Returns (y(t1), nfe)
    with nfe the function evaluations per row. `on_step` receives the slowest row's progress.
    """
    y, n = y0.clone(), y0.shape[0]
    t = torch.full((n,), float(t0), dtype=y0.dtype, device=y0.device)
    rows = torch.arange(n, device=y0.device)
    f = fun(t, y, rows)
    h = _initial_step(fun, t, y, f, t1, rtol, atol)
    nfe = torch.full((n,), 2, dtype=torch.long, device=y0.device)
    rejected = torch.zeros(n, dtype=torch.bool, device=y0.device)
    active = rows
    for _ in range(max_steps):
        if active.numel() == 0:
            return y, nfe
        ta, ya = t[active], y[active]
        min_step = 10 * (torch.nextafter(ta, torch.full_like(ta, math.inf)) - ta)
        too_small = rejected[active] & (h[active] < min_step)
        if bool(too_small.any()):
            raise FloatingPointError(f"RK45 step size underflow at t={float(ta[too_small][0]):.3g}")
        t_new = torch.clamp(ta + torch.maximum(h[active], min_step), max=t1)
        ha = t_new - ta
        y_new, f_new, err = _dopri_step(fun, ta, ya, f[active], ha, active)
        nfe[active] += 6
        scale = atol + torch.maximum(ya.abs(), y_new.abs()) * rtol
        norm = _rms(err / scale).nan_to_num(nan=math.inf)  # a non-finite step is rejected
        ok = norm < 1
        grow = torch.where(norm == 0, torch.full_like(norm, _MAX_FACTOR),
                           (_SAFETY * norm.pow(_EXPONENT)).clamp(max=_MAX_FACTOR))
        grow = torch.where(rejected[active], grow.clamp(max=1.0), grow)
        shrink = (_SAFETY * norm.pow(_EXPONENT)).clamp(min=_MIN_FACTOR)
        h[active] = ha * torch.where(ok, grow, shrink)
        done_rows = active[ok]
        t[done_rows], y[done_rows], f[done_rows] = t_new[ok], y_new[ok], f_new[ok]
        rejected[active] = ~ok
        active = active[t[active] < t1]
        if on_step is not None and active.numel():
            on_step(float((t[active].min() - t0) / (t1 - t0)))
    raise FloatingPointError(f"RK45 did not reach t={t1} within {max_steps} steps")


# ---------------------------------------------------------------------------------------------
# The probability-flow ODE and its divergence
# ---------------------------------------------------------------------------------------------


def _epsilon(denoiser: torch.nn.Module, x: torch.Tensor, t: torch.Tensor,
             vp: FlowSchedule) -> torch.Tensor:
    """ε at continuous time t; v/x0 models are converted with the continuous γ(t), σ(t)."""
    label = vp.label(t).to(x.dtype)
    kind = getattr(denoiser, "prediction_type", "epsilon")
    if kind == "epsilon":
        return denoiser(x, label)
    out = denoiser.unet(x, label).sample
    gamma, sigma = (v.to(x.dtype).view(-1, *([1] * (x.ndim - 1))) for v in vp.gamma_sigma(t))
    return gamma * out + sigma * x if kind == "v_prediction" else (x - gamma * out) / sigma


def _trace_jacobian(out: torch.Tensor, x: torch.Tensor,
                    probes: torch.Tensor | None) -> torch.Tensor:
    """tr(∂out/∂x) per sample: exact (one backward per dimension) or Hutchinson (one per probe).

    Hutchinson: E_v[vᵀ J v] = tr J for Rademacher v; the probes (b, P, D) are fixed per image for
    the whole integration, so the ODE stays deterministic and RK45's error control stays valid.
    """
    b, d = out.shape[0], out[0].numel()
    if probes is None:
        eye = torch.eye(d, dtype=out.dtype, device=out.device)
        vs = [eye[i].expand(b, d) for i in range(d)]
    else:
        vs = [probes[:, p].to(out.dtype) for p in range(probes.shape[1])]
    total = out.new_zeros(b)
    for i, v in enumerate(vs):
        (g,) = torch.autograd.grad(out, x, v.view_as(out), retain_graph=i < len(vs) - 1)
        total = total + (g.flatten(1) * v).sum(1)
    return total / len(vs) if probes is not None else total


def _flow_rhs(denoiser: torch.nn.Module, vp: FlowSchedule, shape: tuple[int, ...],
              model_dtype: torch.dtype, probes: torch.Tensor | None) -> OdeFunction:
    """State = [x (D), Δlog p]; dx/dt = −½β(x − ε/σ), dΔlog p/dt = div of that drift."""
    d = math.prod(shape)

    def rhs(t: torch.Tensor, y: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        beta = vp.beta(t)
        _, sigma = vp.gamma_sigma(t)
        with torch.enable_grad():
            x = y[:, :d].reshape(-1, *shape).to(model_dtype).requires_grad_(True)
            eps = _epsilon(denoiser, x, t, vp)
            trace = _trace_jacobian(eps, x, None if probes is None else probes[rows])
        eps = eps.detach().to(y.dtype).flatten(1)
        drift = -0.5 * beta[:, None] * (y[:, :d] - eps / sigma[:, None])
        div = -0.5 * beta * (d - trace.detach().to(y.dtype) / sigma)
        return torch.cat([drift, div[:, None]], dim=1)

    return rhs


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlowLikelihood:
    """Per-image results of one probability-flow integration, in nats (float64, shape (B,))."""

    log_p: torch.Tensor  # log p(x) at t_start = prior_log_p + delta_log_p
    prior_log_p: torch.Tensor  # log N(z; 0, I) of the ODE's end point z = x(1)
    delta_log_p: torch.Tensor  # ∫ div(drift) dt along the trajectory
    nfe: torch.Tensor  # function evaluations per image
    dim: int

    def bits_per_dim(self, offset: float = 0.0) -> torch.Tensor:
        return bits_per_dim(self.log_p, self.dim, offset)


def bits_per_dim(log_p: torch.Tensor, dim: int, offset: float = BPD_OFFSET) -> torch.Tensor:
    """bpd = −log p/(D·ln 2) + offset.

    offset = 7 for models of data in [−1, 1]: pixel values in [0, 256) are mapped to [−1, 1] by
    v/128 − 1, a scaling by 1/128 per dimension, so a density over the original pixel scale is
    p(x)·128^(−D) and its −log2 gains D·log2(128) = 7·D bits (Song et al.'s `offset = 7`).
    Use offset = 0 for the density of the [−1, 1] data itself.
    """
    return -log_p / (dim * math.log(2)) + offset


def image_generator(seed: int, index: int, stream: int) -> torch.Generator:
    """A CPU generator per (seed, image index, stream): results never depend on batch or device."""
    state = np.random.SeedSequence([seed, index, stream]).generate_state(2, dtype=np.uint32)
    return torch.Generator("cpu").manual_seed(int(state[0]) << 32 | int(state[1]))


def rademacher_probes(n: int, probes: int, dim: int, seed: int,
                      first_index: int = 0) -> torch.Tensor:
    """(n, probes, dim) of ±1, drawn per image from (seed, first_index + i)."""
    out = torch.empty(n, probes, dim)
    for i in range(n):
        g = image_generator(seed, first_index + i, stream=1)
        out[i] = torch.randint(0, 2, (probes, dim), generator=g).float() * 2 - 1
    return out


def model_device_dtype(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where the model lives and what it computes in (parameters first, then buffers)."""
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.float32


def log_likelihood(
    denoiser: torch.nn.Module,
    x: torch.Tensor,
    *,
    divergence: Divergence = "hutchinson",
    probes: int = 1,
    seed: int = 0,
    first_index: int = 0,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    t_start: float = 1e-5,
    t_end: float = 1.0,
    schedule: FlowConvention = "model",
    on_step: Callable[[float], None] | None = None,
) -> FlowLikelihood:
    """log p(x) in nats of model-range images x (B, C, H, W) under the probability-flow ODE.

    Args:
        denoiser: ε-predictor with the Denoiser interface (`denoiser(x, t)`, `.schedule`).
        divergence: "hutchinson" (Rademacher probes, unbiased) or "exact" (D backward passes:
            only for tiny D, e.g. tests).
        probes: Hutchinson probes per image, averaged at every evaluation (paper: 1).
        seed, first_index: image i draws its probes from (seed, first_index + i).
        schedule: "model" (the model's own ᾱ, default) or "score-sde" (the score-SDE code's
            linear VP-SDE, for comparison with figures computed that way); module docstring.
    Returns:
        FlowLikelihood with per-image log p, its two parts and the number of evaluations.
    """
    require(divergence in ("hutchinson", "exact"),
            f"divergence {divergence!r} is not hutchinson or exact.")
    require(probes >= 1, f"--probes must be at least 1, got {probes}.")
    require(0 < t_start < t_end <= 1, f"need 0 < t_start < t_end <= 1, got {t_start}, {t_end}.")
    device, dtype = model_device_dtype(denoiser)
    vp = flow_schedule(denoiser.schedule.alphas_cumprod, schedule)
    shape, dim = tuple(x.shape[1:]), x[0].numel()
    probe = None
    if divergence == "hutchinson":
        probe = rademacher_probes(x.shape[0], probes, dim, seed, first_index).to(device)
    x64 = x.to(device, torch.float64).flatten(1)
    y0 = torch.cat([x64, x64.new_zeros(x64.shape[0], 1)], dim=1)
    was_training = denoiser.training
    denoiser.eval()
    try:
        rhs = _flow_rhs(denoiser, vp, shape, dtype, probe)
        y1, nfe = solve_rk45(rhs, y0, t_start, t_end, rtol, atol, on_step=on_step)
    except FloatingPointError as e:
        raise UserError(f"the probability-flow ODE failed ({e}): the model's output is not finite "
                        "or its ODE is too stiff.") from None
    finally:
        denoiser.train(was_training)
    z, delta = y1[:, :dim], y1[:, dim]
    prior = -0.5 * dim * math.log(2 * math.pi) - 0.5 * z.square().sum(1)
    return FlowLikelihood(prior + delta, prior, delta, nfe, dim)


def to_ode_input(images: np.ndarray, dequantize: bool, seed: int,
                 first_index: int = 0) -> torch.Tensor:
    """uint8 (N, H, W, C) to model range (N, C, H, W), optionally uniformly dequantised.

    Without dequantisation x = v/127.5 − 1 (the training range); with it, x = 2(v + u)/256 − 1,
    u ~ U[0, 1) per pixel, drawn per image from (seed, index) as Song et al. evaluate bpd.
    """
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).to(torch.float64)
    if not dequantize:
        return x / 127.5 - 1
    gens = [image_generator(seed, first_index + i, stream=0) for i in range(x.shape[0])]
    noise = torch.stack([torch.rand(x.shape[1:], generator=g, dtype=torch.float64) for g in gens])
    return (x + noise) / 128 - 1


def nll_bits_per_dim(
    denoiser: torch.nn.Module,
    images: np.ndarray,
    *,
    dequantize: bool = False,
    probes: int = 1,
    seed: int = 0,
    batch_size: int = 64,
    offset: float = BPD_OFFSET,
    schedule: FlowConvention = "model",
    progress: bool = True,
    **ode_options,
) -> np.ndarray:
    """The paper's NLL: bits/dim (+7 offset by default) of uint8 (N, H, W, C) images.

    Images are solved `batch_size` at a time on the model's device; image i's probes and
    dequantisation noise depend only on (seed, i), never on the batch size.
    """
    require(images.ndim == 4 and images.dtype == np.uint8, "NLL images must be uint8 (N, H, W, C).")
    require(batch_size >= 1, f"--batch-size must be at least 1, got {batch_size}.")
    out = []
    bar = tqdm(total=len(images), desc="NLL (probability-flow ODE)", disable=not progress,
               dynamic_ncols=True)
    for start in range(0, len(images), batch_size):
        x = to_ode_input(images[start:start + batch_size], dequantize, seed, start)
        res = log_likelihood(denoiser, x, probes=probes, seed=seed, first_index=start, schedule=schedule,
                             on_step=lambda frac: bar.set_postfix(batch_t=f"{frac:.3f}"),
                             **ode_options)
        out.append(res.bits_per_dim(offset).cpu().numpy())
        bar.update(x.shape[0])
    bar.close()
    return np.concatenate(out)
