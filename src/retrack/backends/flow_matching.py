"""What the flow-matching text-to-image families (SD3, Flux) share: the σ table their Denoiser is
trained on, the checks of their folders, and sampling with their own flow solver.

A rectified-flow pipeline under a fixed prompt is an unconditional model of latents noised as
x = (1 − σ)·x0 + σ·ε whose network predicts the velocity ε − x0; the Denoiser converts it to ε
exactly (models.Denoiser, "flow"), and its integer timesteps index a table of σ at the quantiles
of the model's training distribution (models.FlowSchedule): the objectives are unchanged. The
derivation is docs/flow-matching.md.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from retrack.backends.registry import supported
from retrack.backends.stable_diffusion import StableDiffusionModel
from retrack.errors import require
from retrack.models import FlowSchedule, logit_normal_sigmas

# The transformer's attention projections, joint (image) and added (text) streams, as diffusers'
# SD3 and Flux LoRA scripts name them.
FLOW_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
FLOW_SCHEDULER = "FlowMatchEulerDiscreteScheduler"
# SD3's training distribution of σ before any shift: logit-normal(0, 1) (Esser et al. 2024).
LOGIT_MEAN, LOGIT_STD = 0.0, 1.0


def flow_schedule(scheduler_config: Mapping[str, Any], image_seq_len: int,
                  model_timesteps: int) -> tuple[FlowSchedule, dict[str, Any]]:
    """The σ table of a flow model and its description for the run record: the logit-normal's
    quantiles, shifted as the model's own scheduler shifts its time (a static `shift`, or with
    `use_dynamic_shifting` the μ its pipeline computes from the number of image tokens)."""
    cfg = dict(scheduler_config)
    steps = int(cfg.get("num_train_timesteps", 1000))
    if cfg.get("use_dynamic_shifting"):
        base_len, max_len = cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096)
        base, top = cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15)
        mu = image_seq_len * (top - base) / (max_len - base_len) + base - (top - base) / (max_len - base_len) * base_len
        linear = cfg.get("time_shift_type", "exponential") == "linear"
        require(not linear or mu > 0, f"the scheduler's linear time shift needs μ > 0, got {mu}.")
        offset = math.log(mu) if linear else mu
        shift = {"dynamic": True, "mu": mu, "image_seq_len": int(image_seq_len),
                 "time_shift_type": "linear" if linear else "exponential"}
    else:
        s = float(cfg.get("shift", 1.0))
        require(s > 0, f"the scheduler's shift must be positive, got {s}.")
        offset, shift = math.log(s), {"dynamic": False, "shift": s}
    sigmas = logit_normal_sigmas(steps, LOGIT_MEAN + offset, LOGIT_STD)
    record = {"distribution": "logit-normal", "logit_mean": LOGIT_MEAN + offset, "logit_std": LOGIT_STD,
              "steps": steps, **shift}
    return FlowSchedule.from_sigmas(sigmas, model_timesteps), record


def model_index(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return raw if isinstance(raw, dict) else {}


def listed(index: Mapping[str, Any], name: str) -> bool:
    """Whether model_index.json names a component (not [null, null])."""
    value = index.get(name)
    return isinstance(value, list) and bool(value) and value[0] is not None


class FlowTextModel(StableDiffusionModel):
    """A rectified-flow text-to-image pipeline (its `transformer` trained, its own flow sampler)."""

    network = "transformer"
    lora_targets = FLOW_LORA_TARGETS
    own_sampler = True
    # Components the pipeline cannot run without, besides the transformer and the scheduler.
    required: ClassVar[tuple[str, ...]] = ("vae", "text_encoder", "tokenizer")

    @classmethod
    def check_conditioning(cls, model: str, prompt: str | None, flag: str) -> None:
        path = Path(model)
        if path.is_dir() and (path / "model_index.json").is_file():
            index = model_index(path)
            require(listed(index, "scheduler") and (path / "scheduler").is_dir(),
                    f"{flag} {model!r} is a {cls.pipelines[0]} without its scheduler/ (the {FLOW_SCHEDULER} "
                    f"whose shift sets the noise levels it was trained on); supported are {supported()}.")
            missing = [c for c in cls.required if not listed(index, c)]
            require(not missing, f"{flag} {model!r} is a {cls.pipelines[0]} without its {', '.join(missing)}, "
                                 f"which its pipeline needs; supported are {supported()}.")
        super().check_conditioning(model, prompt, flag)

    @classmethod
    def check_settings(cls, settings: Mapping[str, Any], command: str) -> None:
        require(settings.get("sampler") in (None, "ddim"),
                f"--sampler {settings.get('sampler')} is a DDPM sampler; a {cls.pipelines[0]} samples with its own "
                f"{FLOW_SCHEDULER} (the flow's ODE), which --sampler ddim (the default) stands for.")
        super().check_settings(settings, command)

    @classmethod
    def _pretrained_kwargs(cls, model: str) -> dict[str, Any]:
        """Components model_index.json leaves out (SD3 without T5) are passed as None, as diffusers asks."""
        from diffusers import DiffusionPipeline  # its pipeline classes import transformers, the optional [sd] extra

        index = DiffusionPipeline.load_config(model)
        return {k: None for k, v in index.items() if not k.startswith("_") and isinstance(v, list)
                and v and v[0] is None}

    def sample_settings(self, guidance: float) -> dict[str, Any]:
        return {**super().sample_settings(guidance), "scheduler": FLOW_SCHEDULER}

    def record(self) -> dict[str, Any]:
        record = super().record()
        record["text_to_image"]["sigma_table"] = self.denoiser.sigma_table
        return record
