"""SDXL, SD3 and Flux under a fixed prompt, each on a tiny pipeline built from configs (no downloads):
loading, the Denoiser as the pipeline's own network call, every method's step, saving in the
family's layout, LoRA for load_lora_weights, and the commands that read a text-to-image model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from retrack.errors import UserError  # noqa: E402
from text_families import save_flux_pipeline, save_sd3_pipeline, save_sdxl_pipeline  # noqa: E402

PROMPT = "a t-shirt"
FAMILIES = ("sdxl", "sd3", "flux")
NETWORK = {"sdxl": "unet", "sd3": "transformer", "flux": "transformer"}
FROZEN = {"sdxl": ("vae", "text_encoder", "text_encoder_2"), "sd3": ("vae", "text_encoder", "text_encoder_2"),
          "flux": ("vae", "text_encoder", "text_encoder_2")}
SIZE = {"sdxl": 8, "sd3": 8, "flux": 16}


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    ws = tmp_path_factory.mktemp("families")
    save_sdxl_pipeline(ws / "sdxl")
    save_sd3_pipeline(ws / "sd3")
    save_flux_pipeline(ws / "flux")
    rng = np.random.default_rng(0)
    np.savez(ws / "rgb.npz", images=rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8))
    return ws


def _family(name: str):
    from retrack.backends import FluxModel, StableDiffusion3Model, StableDiffusionXLModel

    return {"sdxl": StableDiffusionXLModel, "sd3": StableDiffusion3Model, "flux": FluxModel}[name]


def _load(ws: Path, name: str, model: Path | None = None, **kw):
    from retrack.backends import LoadOptions

    return _family(name).load(str(model or ws / name), "cpu", LoadOptions(PROMPT, **kw))


def _inputs(model, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, *model.denoiser.sample_shape, generator=g), torch.tensor([10, 900])


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _one_step(model, method: str = "retrack"):
    from retrack import objectives
    from retrack.trainer import TrainData, TrainSettings, train

    g = torch.Generator().manual_seed(3)
    shape = model.denoiser.sample_shape
    data = TrainData(torch.randn(6, *shape, generator=g), torch.randn(2, *shape, generator=g),
                     torch.tensor([[0, 1, 2], [3, 4, 5]]))
    train(model.denoiser, objectives.build(method, lam=0.5), data, TrainSettings(steps=1, batch_size=2, lr=1e-2),
          "cpu", progress=False)


def _unlearn(ws: Path, name: str, out: Path, method: str = "retrack", *extra: str) -> int:
    from retrack.cli import main

    return main(["unlearn", "--model", str(ws / name), "--data", str(ws / "rgb.npz"), "--forget", "0,1",
                 "--out", str(out), "--method", method, "--prompt", PROMPT, "--steps", "1", "--batch-size", "2",
                 "--k", "3", "--quiet", "--device", "cpu", "--cache-dir", str(out.parent / "cache"), *extra])


def _files(folder: Path, part: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (folder / part).iterdir() if p.suffix == ".safetensors"}


@pytest.mark.parametrize("name", FAMILIES)
def test_detected_loaded_and_only_the_network_trainable(ws, name):
    from retrack.backends import family_of

    assert family_of(ws / name) is _family(name)
    m = _load(ws, name)
    trainable = {n for n, c in m.pipeline.components.items()
                 if isinstance(c, torch.nn.Module) and any(p.requires_grad for p in c.parameters())}
    assert trainable == {NETWORK[name]}
    assert m.denoiser.sample_shape == ((4, 8, 8) if name == "flux" else (4, 4, 4))
    assert m.prompt["text"] == PROMPT
    if name != "sdxl":
        assert m.denoiser.prediction_type == "flow" and m.denoiser.schedule.num_steps == 1000


@pytest.mark.parametrize("name", FAMILIES)
def test_the_denoiser_is_the_pipelines_own_call_of_its_network(ws, name):
    """ε of the Denoiser = what the pipeline's network returns for the prompt at that noise level,
    converted (ε = x + (1 − σ)·v for the flows), with the pipeline's own encodings."""
    from diffusers import FluxPipeline

    m = _load(ws, name)
    pipe, (x, t) = m.pipeline, _inputs(m)
    with torch.no_grad():
        got = m.denoiser(x, t)
        if name == "sdxl":
            ctx, _, pooled, _ = pipe.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=False)
            ids = pipe._get_add_time_ids((8, 8), (0, 0), (8, 8), dtype=torch.float32,
                                         text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
            want = pipe.unet(x, t, encoder_hidden_states=ctx.expand(2, -1, -1),
                             added_cond_kwargs={"text_embeds": pooled.expand(2, -1), "time_ids": ids.expand(2, -1)}
                             ).sample
        else:
            sigma = m.denoiser.schedule.sigmas[t].float()
            if name == "sd3":
                ctx, _, pooled, _ = pipe.encode_prompt(PROMPT, None, None, device="cpu",
                                                       do_classifier_free_guidance=False)
                v = pipe.transformer(hidden_states=x, timestep=sigma * 1000,
                                     encoder_hidden_states=ctx.expand(2, -1, -1),
                                     pooled_projections=pooled.expand(2, -1), return_dict=False)[0]
            else:
                ctx, pooled, text_ids = pipe.encode_prompt(PROMPT, None, device="cpu")
                packed = FluxPipeline._pack_latents(x, 2, 4, 8, 8)
                ids = FluxPipeline._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32)
                out = pipe.transformer(hidden_states=packed, timestep=sigma, guidance=None,
                                       pooled_projections=pooled.expand(2, -1),
                                       encoder_hidden_states=ctx.expand(2, -1, -1),
                                       txt_ids=text_ids, img_ids=ids, return_dict=False)[0]
                v = FluxPipeline._unpack_latents(out, 16, 16, pipe.vae_scale_factor)
            want = x + (1 - sigma).view(-1, 1, 1, 1) * v
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_latents_are_shifted_and_scaled_as_the_pipeline_decodes_them(ws, name):
    from PIL import Image

    from retrack.backends.stable_diffusion import encode_images
    from retrack.data import load_images

    m = _load(ws, name)
    vae, size = m.pipeline.vae, SIZE[name]
    images = load_images(ws / "rgb.npz").images[:3]
    got = encode_images(m.pipeline, images)
    assert got.shape == (3, *m.denoiser.sample_shape)
    x = m.pipeline.image_processor.preprocess([Image.fromarray(i) for i in images], height=size, width=size)
    with torch.no_grad():
        want = (vae.encode(x).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor
    np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["retrack", "vanilla", "neggrad", "erasediff", "siss"])
@pytest.mark.parametrize("name", FAMILIES)
def test_each_method_trains_only_the_network(ws, tmp_path, name, method):
    out = tmp_path / "o"
    assert _unlearn(ws, name, out, method) == 0
    for frozen in FROZEN[name]:
        assert _files(out, frozen) == _files(ws / name, frozen)
    assert _files(out, NETWORK[name]) != _files(ws / name, NETWORK[name])
    record = json.loads((out / "retrack_run.json").read_text())["text_to_image"]
    assert record["trained"] == NETWORK[name] and record["pipeline"] == _family(name).pipelines[0]
    if name != "sdxl":
        assert record["sigma_table"]["distribution"] == "logit-normal"


@pytest.mark.parametrize("name", FAMILIES)
def test_the_saved_pipeline_loads_with_from_pretrained_and_gives_the_trained_eps(ws, tmp_path, name):
    import diffusers

    m = _load(ws, name)
    _one_step(m)
    m.save(tmp_path / "o")
    cls = getattr(diffusers, _family(name).pipelines[0])
    kwargs = {"text_encoder_3": None, "tokenizer_3": None} if name == "sd3" else {}
    again = cls.from_pretrained(str(tmp_path / "o"), **kwargs)
    trained = getattr(m.pipeline, NETWORK[name]).state_dict()
    for k, v in getattr(again, NETWORK[name]).state_dict().items():
        assert torch.equal(v, trained[k]), k
    x, t = _inputs(m)
    with torch.no_grad():
        torch.testing.assert_close(_load(ws, name, tmp_path / "o").denoiser(x, t), m.denoiser(x, t), rtol=0, atol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_lora_trains_only_the_adapter_and_loads_with_load_lora_weights(ws, tmp_path, name):
    from retrack.backends.stable_diffusion import LORA_FILE

    m = _load(ws, name, lora=2, lora_alpha=4.0)
    net = getattr(m.pipeline, NETWORK[name])
    assert {n for n, p in net.named_parameters() if p.requires_grad} == {
        n for n, _ in net.named_parameters() if "lora_" in n}
    before = _state(net)
    _one_step(m)
    changed = {k for k, v in net.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and all("lora_B" in k for k in changed)
    m.save(tmp_path / "o")
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [LORA_FILE]
    base = _load(ws, name)
    x, t = _inputs(m)
    with torch.no_grad():
        plain = base.denoiser(x, t)
        base.pipeline.load_lora_weights(str(tmp_path / "o"))
        torch.testing.assert_close(base.denoiser(x, t), m.denoiser(x, t), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(plain, m.denoiser(x, t))


@pytest.mark.parametrize("name", FAMILIES)
def test_a_lora_run_samples_evaluates_and_reports(ws, tmp_path, name, capsys):
    """unlearn --lora with --eval-every, then sample and evaluate its output (found by its run record,
    loaded onto its base) and report the run."""
    from retrack.cli import main

    out = tmp_path / "o"
    assert _unlearn(ws, name, out, "vanilla", "--lora", "2", "--lr", "0.1", "--eval-every", "1",
                    "--eval-samples", "2", "--eval-steps", "2", "--copy-rule", "l2", "--copy-threshold", "1.0") == 0, \
        capsys.readouterr().err
    evals = [e for e in json.loads((out / "retrack_log.json").read_text()) if e.get("kind") == "eval"]
    assert [e["step"] for e in evals] == [0, 1] and "similarity" in evals[0]["eval"]
    from retrack.backends import family_of

    assert family_of(out) is _family(name)
    npz = tmp_path / "s.npz"
    assert main(["sample", "--model", str(out), "--prompt", PROMPT, "--num", "2", "--steps", "2", "--quiet",
                 "--device", "cpu", "--out", str(npz)]) == 0, capsys.readouterr().err
    with np.load(npz) as z:
        assert z["images"].shape == (2, SIZE[name], SIZE[name], 3) and str(z["prompt"]) == PROMPT
        assert ("scheduler" in z.files) == (name != "sdxl")
    metrics = tmp_path / "m.json"
    assert main(["evaluate", "--model", str(out), "--prompt", PROMPT, "--data", str(ws / "rgb.npz"), "--forget", "0,1",
                 "--metrics", "similarity,copies", "--copy-threshold", "1.0", "--num-samples", "2", "--steps", "2",
                 "--quiet", "--device", "cpu", "--out", str(metrics)]) == 0, capsys.readouterr().err
    assert set(json.loads(metrics.read_text())) >= {"similarity", "copies"}
    assert main(["report", str(out), "--out", str(tmp_path / "report.html")]) == 0, capsys.readouterr().err
    page = (tmp_path / "report.html").read_text()
    assert "retrack" in page and PROMPT in page


@pytest.mark.parametrize("name", FAMILIES)
def test_sd_sets_samples_the_family_under_its_prompt(ws, tmp_path, name, capsys):
    from PIL import Image

    from retrack.cli import main

    Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(tmp_path / "train.png")
    out = tmp_path / "sets"
    assert main(["sd-sets", "--model", str(ws / name), "--prompt", PROMPT, "--image", str(tmp_path / "train.png"),
                 "--out", str(out), "--samples", "4", "--steps", "2", "--quiet", "--device", "cpu",
                 "--threshold", "0.5"]) == 0, capsys.readouterr().err
    record = json.loads((out / "sets.json").read_text())
    assert record["pipeline"] == _family(name).pipelines[0]
    assert record["forget"]["count"] + record["remain"]["count"] == 4
    with np.load(out / "data.npz") as z:
        assert z["images"].shape == (4, SIZE[name], SIZE[name], 3)


# -- what is refused, before anything is written -------------------------------------------------


def _refused(args: list, match: str, capsys) -> None:
    from retrack.cli import main

    capsys.readouterr()
    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1, err


def test_an_sdxl_refiner_is_refused_naming_the_supported_families(tmp_path, capsys):
    save_sdxl_pipeline(tmp_path / "refiner", refiner=True)
    _refused(["unlearn", "--model", tmp_path / "refiner", "--data", tmp_path / "d.npz", "--forget", "0",
              "--prompt", PROMPT, "--out", tmp_path / "o"],
             "is a StableDiffusionXLImg2ImgPipeline; supported are unconditional UNet2DModel", capsys)
    assert "FluxPipeline folders" in (msg := str(_family("flux").description)) and msg
    assert not (tmp_path / "o").exists()


def test_a_flux_model_without_its_scheduler_is_refused(tmp_path, capsys):
    save_flux_pipeline(tmp_path / "flux", scheduler=False)
    _refused(["sample", "--model", tmp_path / "flux", "--prompt", PROMPT, "--num", "1", "--out", tmp_path / "s.npz"],
             "is a FluxPipeline without its scheduler/", capsys)
    assert not (tmp_path / "s.npz").exists()


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_a_ddpm_sampler_is_refused_for_a_flow_model(ws, tmp_path, name, capsys):
    _refused(["sample", "--model", ws / name, "--prompt", PROMPT, "--num", "1", "--sampler", "ddpm",
              "--out", tmp_path / "s.npz"], "samples with its own FlowMatchEulerDiscreteScheduler", capsys)


@pytest.mark.parametrize("name", FAMILIES)
def test_mixed_precision_on_a_cpu_is_refused(ws, tmp_path, name, capsys):
    _refused(["unlearn", "--model", ws / name, "--data", ws / "rgb.npz", "--forget", "0", "--prompt", PROMPT,
              "--out", tmp_path / "o", "--device", "cpu", "--mixed-precision", "bf16"], "needs a CUDA device", capsys)
    assert not (tmp_path / "o").exists()


def test_lora_on_a_network_without_the_attention_modules_is_refused(ws, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(_family("sd3"), "lora_targets", ("qkv_fused",))
    with pytest.raises(UserError, match=r"--lora found no attention projections \(qkv_fused\) in the transformer"):
        _load(ws, "sd3", lora=2)
    assert _unlearn(ws, "sd3", tmp_path / "o", "retrack", "--lora", "2") == 2
    assert "--lora found no attention projections" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_sd3_loads_with_or_without_t5(tmp_path):
    from retrack.backends import LoadOptions

    save_sd3_pipeline(tmp_path / "t5", t5=True)
    m = _family("sd3").load(str(tmp_path / "t5"), "cpu", LoadOptions(PROMPT))
    assert m.pipeline.text_encoder_3 is not None
    assert m.sample(1, 2, "ddim", 0, 1, 7.5, False).shape == (1, 8, 8, 3)


def test_a_hub_id_is_loaded_by_the_family_its_model_index_names(monkeypatch):
    """Detection gives a hub id with --prompt to the first text-to-image family; its model_index.json
    (read from the hub, here stubbed) hands it to the family that loads it."""
    from diffusers import DiffusionPipeline

    from retrack.backends import StableDiffusionModel, stable_diffusion

    monkeypatch.setattr(stable_diffusion, "require_hub_reachable", lambda repo: None)
    for pipeline, family in (("FluxPipeline", "flux"), ("StableDiffusion3Pipeline", "sd3"),
                             ("StableDiffusionXLPipeline", "sdxl")):
        monkeypatch.setattr(DiffusionPipeline, "load_config", lambda repo, p=pipeline: {"_class_name": p})
        assert StableDiffusionModel._hub_family("someone/model") is _family(family)
    monkeypatch.setattr(DiffusionPipeline, "load_config", lambda repo: {"_class_name": "StableDiffusionPipeline"})
    assert StableDiffusionModel._hub_family("someone/model") is StableDiffusionModel


def test_sd_sets_refuses_a_ddpm_sampler_for_a_flow_model(ws, tmp_path, capsys):
    from PIL import Image

    Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(tmp_path / "train.png")
    _refused(["sd-sets", "--model", ws / "flux", "--prompt", PROMPT, "--image", tmp_path / "train.png",
              "--out", tmp_path / "sets", "--sampler", "ddpm"], "samples with its own FlowMatchEulerDiscreteScheduler",
             capsys)
    assert not (tmp_path / "sets").exists()


@pytest.mark.parametrize("name", FAMILIES)
def test_retracks_options_run_on_each_family(ws, tmp_path, name):
    """λ auto with gradient surgery, min-SNR forget weighting (SNR = γ²/σ² for the flows), a forget
    t-min, the untruncated objective, gradient checkpointing and accumulation."""
    out = tmp_path / "o"
    assert _unlearn(ws, name, out, "retrack", "--lam", "auto", "--surgery", "--forget-weighting", "min-snr",
                    "--forget-t-min", "500", "--k", "all", "--gradient-checkpointing", "--grad-accum", "2") == 0
    cfg = json.loads((out / "retrack_run.json").read_text())["config"]
    assert cfg["k"] == "all" and cfg["surgery"] and cfg["forget_t_min"] == 500
    assert _files(out, NETWORK[name]) != _files(ws / name, NETWORK[name])


@pytest.mark.parametrize("name", FAMILIES)
def test_nash_balance_and_a_saliency_mask_run_on_each_family(ws, tmp_path, name):
    """The forget gradient of the mask in the family's own noising (the flows' γ = 1 − σ), with
    gradient checkpointing and accumulation, and the bargained step."""
    out = tmp_path / "o"
    assert _unlearn(ws, name, out, "retrack", "--balance", "nash", "--saliency", "0.3", "--gradient-checkpointing",
                    "--grad-accum", "2") == 0
    log = json.loads((out / "retrack_log.json").read_text())
    assert abs(log[0]["saliency"]["kept_fraction"] - 0.3) < 0.01 and log[0]["alpha_unlearn"] > 0
    assert _files(out, NETWORK[name]) != _files(ws / name, NETWORK[name])


def test_the_latent_cache_is_keyed_by_the_vaes_scaling_and_shift(ws, tmp_path):
    from retrack.backends.stable_diffusion import cached_latents
    from retrack.data import load_images

    m, images = _load(ws, "sd3"), load_images(ws / "rgb.npz")
    first, key = cached_latents(m.pipeline, images, tmp_path, progress=False)
    m.pipeline.vae.register_to_config(shift_factor=0.5)
    second, other = cached_latents(m.pipeline, images, tmp_path, progress=False)
    assert other != key and not np.allclose(first, second)


def test_a_flux_model_without_t5_is_refused(ws, tmp_path, capsys):
    import shutil

    shutil.copytree(ws / "flux", tmp_path / "flux")
    index = json.loads((tmp_path / "flux" / "model_index.json").read_text())
    index["text_encoder_2"] = [None, None]
    (tmp_path / "flux" / "model_index.json").write_text(json.dumps(index))
    _refused(["sample", "--model", tmp_path / "flux", "--prompt", PROMPT, "--num", "1", "--out", tmp_path / "s.npz"],
             "is a FluxPipeline without its text_encoder_2, which its pipeline needs", capsys)
