"""Stable Diffusion under a fixed prompt: the unconditional model of latents the paper treats it as.

A StableDiffusionPipeline (SD 1.x/2.x) is loaded without its safety checker and its prompt is
encoded once by the pipeline's own `encode_prompt`; a PromptDenoiser binds that embedding into the
UNet, so objectives, trainer and kNN see an ordinary Denoiser whose "images" are latents. Training
images are resized as the pipeline's image processor would, encoded once by the VAE (posterior
mean × scaling factor) and cached by content. Only the UNet, or a LoRA adapter on its attention
projections, is ever trained: the VAE and the text encoder are frozen and never reach an optimiser.

transformers (and peft for LoRA) are the optional [sd] extra, so they are imported where used.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import sys
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from diffusers.utils import convert_state_dict_to_diffusers
from diffusers.utils import logging as diffusers_logging
from PIL import Image
from tqdm.auto import tqdm

from retrack.backends.base import (
    DEFAULT_LOAD,
    Backend,
    LoadOptions,
    MetricImages,
    TrainingSpace,
    pipeline_class,
    require_hub_reachable,
)
from retrack.backends.registry import FAMILIES, detect, supported
from retrack.data import ImageSet, distinct, read_image_file, to_uint8
from retrack.errors import UserError, first_line, require
from retrack.metrics import registry
from retrack.models import Denoiser, Schedule
from retrack.neighbours import default_cache_dir, save_cached_array
from retrack.sampling import make_scheduler, sample_generators
from retrack.validation import load_json

SD_EXTRA = "pip install 'retrack-unlearning[sd]'"
TEXT_PIPELINES = ("StableDiffusionPipeline",)
LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")  # the attention projections, as diffusers' LoRA scripts
LORA_FILE = "pytorch_lora_weights.safetensors"
# What a text-to-image model's samples support (likelihood and reconstruction are pixel-model probes).
SAMPLE_METRICS = ("similarity", "copies", "fid", "is", "clipiqa")


def require_sd_extra(lora: bool = False) -> None:
    """Text-to-image models need transformers (and peft for LoRA); pixel-model users need neither."""
    wanted = ("transformers", "peft") if lora else ("transformers",)
    missing = [m for m in wanted if importlib.util.find_spec(m) is None]
    require(not missing, f"text-to-image models need {' and '.join(missing)} (the [sd] extra): {SD_EXTRA}")


class PromptDenoiser(Denoiser):
    """A Stable Diffusion UNet with one prompt's embedding bound in: ε(x_t, t) over latents."""

    def __init__(self, unet: torch.nn.Module, schedule: Schedule, prediction_type: str, context: torch.Tensor):
        super().__init__(unet, schedule, prediction_type)
        self.register_buffer("context", context.detach(), persistent=False)

    def unet_output(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ctx = self.context.to(x.dtype).expand(x.shape[0], -1, -1)
        return self.unet(x, t, encoder_hidden_states=ctx).sample


@dataclass
class StableDiffusionModel(Backend):
    """The loaded pipeline, the Denoiser over latents, and what became of the prompt.

    The other text-to-image families (SDXL, SD3, Flux) are subclasses that change what the class
    attributes below name and how the prompt is bound (`_denoiser`); loading, latents, LoRA,
    sampling through the pipeline, saving and the record are this class's.
    """

    name = "stable-diffusion"
    description = "StableDiffusionPipeline folders (SD 1.x/2.x, text-to-image, with --prompt)"
    conditioned = True
    pipelines = TEXT_PIPELINES
    metrics = SAMPLE_METRICS
    resizes_images = True
    # The pipeline's trained network ("unet" or "transformer"), the modules LoRA adapts in it, and
    # whether the pipeline samples with its own scheduler (flow matching) instead of DDIM/DDPM.
    network: ClassVar[str] = "unet"
    lora_targets: ClassVar[tuple[str, ...]] = LORA_TARGETS
    own_sampler: ClassVar[bool] = False

    pipeline: Any
    denoiser: PromptDenoiser
    prompt: dict[str, Any]
    source: str
    lora: dict[str, Any] | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def claims(cls, path: Path) -> bool:
        if is_lora_folder(path):
            return lora_pipeline(path) in cls.pipelines or (
                cls is StableDiffusionModel and not any(lora_pipeline(path) in f.pipelines for f in FAMILIES))
        return (path / cls.network).is_dir() and pipeline_class(path) in cls.pipelines and cls.complete(path)

    @classmethod
    def complete(cls, path: Path) -> bool:
        """Whether a folder of one of the family's pipeline classes holds what it must to load."""
        return True

    @classmethod
    def check_conditioning(cls, model: str, prompt: str | None, flag: str) -> None:
        require(prompt is not None, f"{flag} {model!r} is a text-to-image {cls.pipelines[0]}; pass --prompt "
                                    "with the prompt it is used under.")

    @classmethod
    def check_settings(cls, settings: Mapping[str, Any], command: str) -> None:
        if command == "unlearn":
            require(not is_lora_folder(settings["model"]),
                    f"--model {settings['model']!r} is a LoRA adapter; unlearn its base pipeline, or fuse the "
                    "adapter into it first (pipe.fuse_lora(), then pipe.save_pretrained).")
        if settings.get("eval_every") is not None:
            copies = registry.finds_copies(settings["eval_metrics"])
            require(not copies or settings["copy_rule"] != "l2" or settings["copy_threshold"] is not None,
                    "--copy-rule l2 with --prompt needs --copy-threshold (an L2 distance over [0, 1] pixels at the "
                    "pipeline's image size).")
        require_sd_extra(settings.get("lora") is not None)

    @classmethod
    def check_metrics(cls, names: tuple[str, ...], flag: str, choices: tuple[str, ...]) -> None:
        other = [m for m in names if m not in cls.metrics]
        require(not other, f"{flag} {other[0] if other else ''} needs a pixel model; with --prompt choose from "
                           f"{', '.join(m for m in cls.metrics if m in choices)}.")

    @classmethod
    def eval_defaults(cls, eval_clip: str | None) -> dict[str, Any]:
        """The paper's SD protocol: 16 samples for the prompt, their mean similarity to the training
        image (and CLIP-IQA when a local CLIP is given)."""
        metrics = ("similarity", "copies", "clipiqa") if eval_clip is not None else ("similarity", "copies")
        return {"eval_metrics": metrics, "eval_samples": 16, "copy_rule": "descriptor"}

    @classmethod
    def image_size(cls, model: str) -> tuple[int, int] | None:
        """The pipeline's image size (the UNet's sample size times the VAE's scale factor) from its
        config files; a LoRA folder's from its base; None for a hub id not on disk."""
        path = Path(lora_base(model) if is_lora_folder(model) else model)
        unet, vae = path / "unet" / "config.json", path / "vae" / "config.json"
        if not (unet.is_file() and vae.is_file()):
            return None
        try:
            size = load_json(unet, "UNet config")["sample_size"]
            h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
            scale = 2 ** (len(load_json(vae, "VAE config")["block_out_channels"]) - 1)
        except (KeyError, TypeError, ValueError, IndexError):
            return None  # loading the pipeline then says what is wrong with it
        return int(h) * scale, int(w) * scale

    @classmethod
    def load(cls, model: str, device: str, options: LoadOptions = DEFAULT_LOAD) -> StableDiffusionModel:
        require_sd_extra(options.lora is not None)
        family = cls._hub_family(model)
        if family is not cls:
            return family.load(model, device, options)
        with quiet_libraries():
            return cls._bind(cls._load_pipeline(model, options.flag), model, options.prompt, device, options.lora,
                             options.lora_alpha, options.seed)

    @property
    def scheduler_config(self) -> dict[str, Any]:
        return dict(self.pipeline.scheduler.config)

    def training_space(self, images: ImageSet, cache_dir: Path | None, progress: bool) -> TrainingSpace:
        root = cache_dir or default_cache_dir().parent
        latents, key = cached_latents(self.pipeline, images, root / "latents", progress)
        self.notes.update(latent_key=key, preprocessing=preprocessing(self.pipeline, images))
        return TrainingSpace(np.ascontiguousarray(latents), torch.from_numpy)

    def metric_images(self, images: ImageSet, forget: np.ndarray, remain: np.ndarray | None,
                      target_files: list[Path]) -> MetricImages:
        """The training images as the pipeline sees them (resized, RGB): the target files when
        given, else the distinct forget images."""
        pipe = self.pipeline
        if target_files:
            targets = np.concatenate([pixel_images(pipe, read_image_file(f)[None]) for f in target_files])
            name = ",".join(str(f) for f in target_files)
        else:
            targets, name = distinct(pixel_images(pipe, images.images[forget])), "forget"
        kept = targets[:0] if remain is None else pixel_images(pipe, images.images[remain])
        return MetricImages(targets, kept, name)

    def sample(self, num: int, steps: int, sampler: str, seed: int, batch_size: int, guidance: float,
               progress: bool) -> np.ndarray:
        return sample_text(self, num, steps, sampler, seed, batch_size, guidance, progress)

    def call_kwargs(self) -> dict[str, Any]:
        """What the pipeline's own call is given beside the prompt, steps, guidance and seeds."""
        return {}

    def sample_settings(self, guidance: float) -> dict[str, Any]:
        return {"prompt": self.prompt["text"], "guidance": guidance}

    def save(self, out: Path) -> None:
        save_text_model(self, out)

    def record(self) -> dict[str, Any]:
        base = Path(self.source)
        return {"text_to_image": {
            "base_model": str(base.resolve()) if base.exists() else self.source,
            "pipeline": type(self.pipeline).__name__, "prompt": self.prompt,
            "images": self.notes["preprocessing"], "latent_cache_key": self.notes["latent_key"],
            "latent_shape": list(self.denoiser.sample_shape), "trained": "lora" if self.lora else self.network,
            "lora": self.lora, "output": LORA_FILE if self.lora else "pipeline folder"}}

    # -- how the family loads and binds its prompt (subclasses override these) ------------------

    @classmethod
    def _hub_family(cls, model: str) -> type[StableDiffusionModel]:
        """A hub id cannot be read before it downloads, so detection gives it to the first text-to-image
        family; its model_index.json (one small file) names the family that really loads it."""
        if Path(model).exists():
            return cls
        from diffusers import DiffusionPipeline  # its pipeline classes import transformers, the optional [sd] extra

        require_hub_reachable(model)
        try:
            name = DiffusionPipeline.load_config(model).get("_class_name")
        except Exception:  # noqa: BLE001 - the loader itself says what is wrong with the id
            return cls
        found = [f for f in FAMILIES if name in f.pipelines and issubclass(f, StableDiffusionModel)]
        return found[0] if found else cls

    @classmethod
    def _bind(cls, pipe, model: str, prompt: str, device: str, lora_rank: int | None, lora_alpha: float | None,
              seed: int = 0) -> StableDiffusionModel:
        pipe.set_progress_bar_config(disable=True)
        pipe.to(device)
        for name, module in pipe.components.items():
            if name != cls.network and isinstance(module, torch.nn.Module):
                module.requires_grad_(False)
        info = prompt_record(pipe.tokenizer, prompt)
        denoiser = cls._denoiser(pipe, model, prompt, torch.device(device))
        lora = add_lora(getattr(pipe, cls.network), lora_rank, lora_alpha, seed, cls.lora_targets, cls.network) \
            if lora_rank is not None else None
        return cls(pipe, denoiser, info, str(model), lora)

    @classmethod
    def _denoiser(cls, pipe, model: str, prompt: str, device: torch.device) -> Denoiser:
        """The network with the prompt's conditioning bound in, as an ε-predicting Denoiser."""
        require(hasattr(pipe.scheduler, "alphas_cumprod"),
                f"the scheduler {type(pipe.scheduler).__name__} of {model!r} has no alphas_cumprod (ᾱ_t).")
        with torch.no_grad():
            context, _ = pipe.encode_prompt(prompt, device, 1, False)
        schedule = Schedule(pipe.scheduler.alphas_cumprod.to(torch.float64))
        return PromptDenoiser(pipe.unet, schedule, pipe.scheduler.config.prediction_type, context.float())

    @classmethod
    def _pretrained_kwargs(cls, model: str) -> dict[str, Any]:
        """Arguments of the pipeline's from_pretrained beside the folder."""
        return {"safety_checker": None, "requires_safety_checker": False}

    @classmethod
    def _load_pipeline(cls, model: str, flag: str):
        if is_lora_folder(model):
            base = lora_base(model)
            pipe = cls._load_pipeline(base, f"the base model {base!r} of {flag}")
            try:
                pipe.load_lora_weights(model, weight_name=LORA_FILE)
            except Exception as e:  # noqa: BLE001 - peft and safetensors raise many types
                raise UserError(f"could not load the LoRA adapter of {flag} {model!r}: {first_line(e)}") from None
            return pipe
        # diffusers' pipeline classes import transformers (the optional [sd] extra), which logs notices.
        import diffusers
        from diffusers import DiffusionPipeline

        local = Path(model).exists()
        if not local:
            require_hub_reachable(model)
        try:
            name = DiffusionPipeline.load_config(model).get("_class_name")
            if name in cls.pipelines:
                return getattr(diffusers, name).from_pretrained(model, **cls._pretrained_kwargs(model))
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - diffusers, transformers and the hub raise many types
            where = "" if local else " (a local folder path works offline)"
            raise UserError(f"could not load a {cls.pipelines[0]} from {model!r}{where}: {first_line(e)}") from None
        raise UserError(f"{flag} {model!r} is a {name}; supported are {supported()}.")


def load_text_model(model: str, prompt: str, device: str, lora_rank: int | None = None,
                    lora_alpha: float | None = None, flag: str = "--model", seed: int = 0) -> StableDiffusionModel:
    """Load a text-to-image pipeline (folder or hub id) of the family detection gives it and bind
    `prompt` into its network; a new LoRA adapter's random initial weights come from `seed` (the
    run's), not from the global RNG."""
    family = detect(model, prompt, flag)
    require(issubclass(family, StableDiffusionModel), f"{flag} {model!r} is not a text-to-image pipeline.")
    return family.load(model, device, LoadOptions(prompt, lora_rank, lora_alpha, seed, flag))


def with_prompt(model: StableDiffusionModel, prompt: str) -> StableDiffusionModel:
    """The same loaded pipeline under another prompt, without loading it again."""
    require(model.lora is None, "with_prompt binds a prompt into a model without a trainable LoRA adapter.")
    with quiet_libraries():
        return type(model)._bind(model.pipeline, model.source, prompt, str(model.device), None, None)


def is_lora_folder(model: str | Path) -> bool:
    """A `retrack unlearn --lora` output: the adapter and the run record naming its base model."""
    return (Path(model) / LORA_FILE).is_file()


def lora_pipeline(model: str | Path) -> str | None:
    """The pipeline class a LoRA folder's run record names (None when it names none)."""
    try:
        raw = load_json(Path(model) / "retrack_run.json", "run record")
    except UserError:
        return None
    found = raw.get("text_to_image", {}).get("pipeline") if isinstance(raw, dict) else None
    return found if isinstance(found, str) else None


def lora_base(model: str | Path) -> str:
    record = Path(model) / "retrack_run.json"
    require(record.is_file(), f"the LoRA folder {str(model)!r} has no retrack_run.json naming its base model; "
                              "load it with StableDiffusionPipeline.load_lora_weights on its base pipeline.")
    raw = load_json(record, "run record")
    base = raw.get("text_to_image", {}).get("base_model") if isinstance(raw, dict) else None
    require(isinstance(base, str), f"{str(record)!r} does not name the base model of the LoRA adapter.")
    # retrack never trains an adapter on an adapter, so a base that is one (the folder itself, or
    # a loop of records) is a damaged or edited record: followed, it would never end.
    require(not is_lora_folder(base), f"{str(record)!r} names {base!r} as the base model of the LoRA adapter, "
                                      "but that is a LoRA adapter too; it must name a StableDiffusionPipeline "
                                      "folder.")
    return base


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """diffusers and transformers log progress bars and notices (torchvision missing, the prompt
    truncated) on stderr; a command's stderr is kept for its own one-line errors and warnings."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers.utils import logging as tlog  # the optional [sd] extra

    dlog = diffusers_logging

    levels = dlog.get_verbosity(), tlog.get_verbosity()
    bars = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    dlog.set_verbosity_error(), tlog.set_verbosity_error()
    dlog.disable_progress_bar(), tlog.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # diffusers' advice on old scheduler configs
            yield
    finally:
        dlog.set_verbosity(levels[0]), tlog.set_verbosity(levels[1])
        for lib, on in zip((dlog, tlog), bars, strict=True):
            lib.enable_progress_bar() if on else lib.disable_progress_bar()


def prompt_record(tokenizer, prompt: str) -> dict[str, Any]:
    """Token count of the prompt; one longer than the tokenizer takes is truncated, as the pipeline
    itself does when it generates, and said on stderr (the run record keeps what was kept)."""
    ids = tokenizer(prompt, truncation=False).input_ids
    limit = int(tokenizer.model_max_length)
    record: dict[str, Any] = {"text": prompt, "tokens": len(ids), "max_tokens": limit, "truncated": len(ids) > limit}
    if record["truncated"]:
        kept = tokenizer.decode(ids[1 : limit - 1])
        record["kept"] = kept
        print(f"retrack: warning: --prompt is {len(ids)} tokens but the tokenizer takes {limit}; it is truncated "
              f"to {kept!r}, as the pipeline does when it generates.", file=sys.stderr)
    return record


def add_lora(unet: torch.nn.Module, rank: int, alpha: float | None, seed: int = 0,
             targets: tuple[str, ...] = LORA_TARGETS, network: str = "unet") -> dict[str, Any]:
    """Freeze the network and add a peft LoRA adapter on its attention projections (diffusers' layout).
    peft draws the adapter's A matrices from torch's global RNG: seeded here, in a fork of it, so
    the same run seed gives the same adapter in any process, and nothing else's draws change."""
    from peft import LoraConfig  # the optional [sd] extra

    require(rank >= 1, f"--lora must be an integer ≥ 1, got {rank}.")
    present = [name for name, _ in unet.named_modules()]
    found = [t for t in targets if any(n == t or n.endswith("." + t) for n in present)]
    require(found, f"--lora found no attention projections ({', '.join(targets)}) in the {network} "
                   f"({type(unet).__name__}); LoRA is supported on the attention of the families' own networks.")
    unet.requires_grad_(False)
    alpha = float(rank if alpha is None else alpha)
    device = next(unet.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                    target_modules=found))
    trainable = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    require(trainable > 0, f"--lora found no attention projections ({', '.join(targets)}) in the {network}.")
    return {"rank": rank, "alpha": alpha, "target_modules": found, "trainable_parameters": trainable}


# ---------------------------------------------------------------------------------------------
# Images to latents, once per data set
# ---------------------------------------------------------------------------------------------


def resolution(pipe) -> tuple[int, int]:
    """The pipeline's default image size: the network's latent size times the VAE's scale factor
    (Flux's transformer has no size: its VAE's `sample_size`, in pixels, rounded down to what its
    2×2 latent packing takes)."""
    net = pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer
    size = net.config.get("sample_size")
    if size is None:
        step = pipe.vae_scale_factor * 2
        px = int(pipe.vae.config.sample_size) // step * step
        return px, px
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return int(h) * pipe.vae_scale_factor, int(w) * pipe.vae_scale_factor


def preprocessing(pipe, images: ImageSet) -> dict[str, Any]:
    """What happens to the training images before the VAE: recorded beside the output."""
    _, h0, w0 = images.shape
    h, w = resolution(pipe)
    return {"from": [h0, w0], "to": [h, w], "resized": (h0, w0) != (h, w),
            "resample": pipe.image_processor.config.resample, "grey_to_rgb": images.shape[0] == 1}


@torch.no_grad()
def encode_images(pipe, images: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """uint8 (N, H, W, C) images → float32 latents (N, c, h, w): posterior mean × scaling factor,
    after the pipeline's own resize and [-1, 1] normalisation."""
    h, w = resolution(pipe)
    vae = pipe.vae
    scale, shift = vae.config.scaling_factor, getattr(vae.config, "shift_factor", None) or 0.0
    out = []
    for i in range(0, len(images), batch_size):
        pil = [Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im).convert("RGB")
               for im in images[i : i + batch_size]]
        x = pipe.image_processor.preprocess(pil, height=h, width=w).to(vae.device, vae.dtype)
        out.append(((vae.encode(x).latent_dist.mean - shift) * scale).float().cpu().numpy())
    return np.concatenate(out)


def cached_latents(pipe, images: ImageSet, cache_dir: Path, progress: bool = True) -> tuple[np.ndarray, str]:
    """encode_images() through an on-disk cache keyed by the images, the VAE's weights, its scaling
    and shift factors and the preprocessing, so a changed data set or VAE can never reuse stale
    latents. Returns the latents and their key."""
    vae = pipe.vae.config  # the scaling (and SD3/Flux's shift) live in the config, not the weights
    h = hashlib.sha256(f"latents-v1|{preprocessing(pipe, images)}|{vae.scaling_factor}|"
                       f"{getattr(vae, 'shift_factor', None)}".encode())
    h.update(images.digest().encode())
    for name, tensor in sorted(pipe.vae.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    key = h.hexdigest()[:32]
    path = cache_dir / f"{key}.npy"
    try:
        cached = np.load(path, allow_pickle=False)
        if cached.dtype == np.float32 and cached.ndim == 4 and len(cached) == len(images):
            return cached, key
    except Exception:  # noqa: BLE001 - a missing or unreadable cache only costs recomputation
        pass
    if progress:
        print(f"encoding {len(images)} images with the VAE (cached for next time)", file=sys.stderr)
    latents = encode_images(pipe, images.images)
    save_cached_array(path, latents)
    return latents, key


@torch.no_grad()
def pixel_images(pipe, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """The training images as the pipeline sees them: resized, RGB, uint8 (N, h, w, 3), so that
    samples and training images can be compared pixel by pixel."""
    h, w = resolution(pipe)
    out = []
    for i in range(0, len(images), batch_size):
        pil = [Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im).convert("RGB")
               for im in images[i : i + batch_size]]
        out.append(to_uint8(pipe.image_processor.preprocess(pil, height=h, width=w)))
    return np.concatenate(out)


@torch.no_grad()
def sample_text(model: StableDiffusionModel, num: int, steps: int = 50, sampler: str = "ddim", seed: int = 0,
                batch_size: int = 16, guidance: float = 7.5, progress: bool = True) -> np.ndarray:
    """`num` images for the bound prompt through the pipeline itself (classifier-free guidance
    with the empty prompt), uint8 (N, H, W, 3); sample i depends only on the seed and i.

    The pipeline's own scheduler, and its tokenizer's padding and truncation state (which every
    call of the tokenizer sets, and save_pretrained writes), are put back afterwards: a model sampled
    while it trains (evaluation during fine-tuning) must be saved exactly as one that was not.
    """
    pipe = model.pipeline
    own = pipe.scheduler
    config = own.config
    require(1 <= steps <= config.num_train_timesteps,
            f"--steps must be in 1..{config.num_train_timesteps} for this model, got {steps}.")
    require(not model.own_sampler or sampler == "ddim",
            f"--sampler {sampler} is a DDPM sampler; a {type(pipe).__name__} samples with its own "
            f"{type(own).__name__} (the flow's ODE), which --sampler ddim (the default) stands for.")
    device = model.device
    out = []
    if model.own_sampler:
        pipe.scheduler = type(own).from_config(config)  # the pipeline's own solver, fresh state
    else:
        pipe.scheduler = make_scheduler(config, sampler, config.prediction_type)
    tokenizers = [t for name, t in pipe.components.items() if name.startswith("tokenizer") and t is not None]
    try:
        with quiet_libraries(), contextlib.ExitStack() as stack:
            for tokenizer in tokenizers:
                stack.enter_context(_tokenizer_state(tokenizer))
            for start in tqdm(range(0, num, batch_size), desc=f"sample ({sampler}, {steps} steps)",
                              disable=not progress, dynamic_ncols=True):
                n = min(batch_size, num - start)
                images = pipe([model.prompt["text"]] * n, num_inference_steps=steps, guidance_scale=guidance,
                              generator=sample_generators(seed, start, n, device), output_type="np",
                              **model.call_kwargs()).images
                out.append(np.clip(np.round(images * 255.0), 0, 255).astype(np.uint8))
    finally:
        pipe.scheduler = own
    return np.concatenate(out)


@contextlib.contextmanager
def _tokenizer_state(tokenizer) -> Iterator[None]:
    """A fast tokenizer's backend keeps the padding and truncation of its last call; restore them."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    saved = None if backend is None else (backend.truncation, backend.padding)
    try:
        yield
    finally:
        if saved is not None:
            truncation, padding = saved
            backend.no_truncation() if truncation is None else backend.enable_truncation(**truncation)
            backend.no_padding() if padding is None else backend.enable_padding(**padding)


# ---------------------------------------------------------------------------------------------
# Writing the result
# ---------------------------------------------------------------------------------------------


def save_text_model(model: StableDiffusionModel, out: Path) -> None:
    """A LoRA run writes only the adapter, where `pipeline.load_lora_weights(out)` finds it; a full
    run writes the whole pipeline, loadable by `StableDiffusionPipeline.from_pretrained(out)`."""
    with quiet_libraries():
        if model.lora is None:
            model.pipeline.save_pretrained(out)
        else:
            _save_lora(model, out)


def _save_lora(model: StableDiffusionModel, out: Path) -> None:
    from peft.utils import get_peft_model_state_dict

    name = model.network
    net = getattr(model.pipeline, name)
    layers = get_peft_model_state_dict(net)
    if name == "unet":  # diffusers' UNet LoRA scripts write the UNet's keys converted, its transformers' as peft's
        layers = convert_state_dict_to_diffusers(layers)
    # The adapter's config (rank, α) travels in the file's metadata, so load_lora_weights restores
    # the trained scale α/rank instead of assuming α = rank.
    type(model.pipeline).save_lora_weights(out, weight_name=LORA_FILE, safe_serialization=True,
                                           **{f"{name}_lora_layers": layers,
                                              f"{name}_lora_adapter_metadata": net.peft_config["default"].to_dict()})
