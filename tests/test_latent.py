"""Stable Diffusion under a fixed prompt, on a tiny pipeline built from configs (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from conftest import save_sd_pipeline  # noqa: E402
from retrack.errors import UserError  # noqa: E402

PROMPT = "a t-shirt"  # 10 tokens with the tiny tokenizer (one per character, start and end)


@pytest.fixture(scope="module")
def sd(tmp_path_factory) -> Path:
    ws = tmp_path_factory.mktemp("sd")
    save_sd_pipeline(ws / "sd")
    rng = np.random.default_rng(0)
    np.savez(ws / "rgb.npz", images=rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8))
    np.savez(ws / "grey12.npz", images=rng.integers(0, 256, (6, 12, 12), dtype=np.uint8))
    return ws


def _load(sd: Path, prompt: str = PROMPT, **kw):
    from retrack.backends.stable_diffusion import load_text_model

    return load_text_model(str(sd / "sd"), prompt, "cpu", **kw)


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> set[str]:
    return {k for k, v in module.state_dict().items() if not torch.equal(before[k], v)}


def test_loads_without_safety_checker_and_binds_the_prompt(sd):
    from retrack.backends import StableDiffusionModel, family_of
    from retrack.backends.stable_diffusion import PromptDenoiser

    assert family_of(sd / "sd") is StableDiffusionModel
    m = _load(sd)
    assert isinstance(m.denoiser, PromptDenoiser) and m.pipeline.safety_checker is None
    assert m.denoiser.sample_shape == (4, 4, 4)
    assert not any(p.requires_grad for p in [*m.pipeline.vae.parameters(), *m.pipeline.text_encoder.parameters()])
    assert m.prompt == {"text": PROMPT, "tokens": 10, "max_tokens": 12, "truncated": False}
    assert torch.equal(m.denoiser.schedule.alphas_cumprod, m.pipeline.scheduler.alphas_cumprod.double())


def test_the_prompt_reaches_the_unet(sd):
    a, b = _load(sd), _load(sd, "a digit")
    assert not torch.equal(a.denoiser.context, b.denoiser.context)
    x, t = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 500, 999])
    with torch.no_grad():
        ctx, _ = a.pipeline.encode_prompt("a digit", "cpu", 1, False)
        want = a.pipeline.unet(x, t, encoder_hidden_states=ctx.expand(3, -1, -1)).sample
        ea, eb = a.denoiser(x, t), b.denoiser(x, t)
    assert not torch.allclose(ea, eb)
    torch.testing.assert_close(eb, want, rtol=0, atol=0)


def test_latents_are_the_vae_posterior_mean_and_are_cached(sd, tmp_path, monkeypatch):
    import retrack.backends.stable_diffusion as latent
    from retrack.data import load_images

    m, images = _load(sd), load_images(sd / "rgb.npz")
    got, key = latent.cached_latents(m.pipeline, images, tmp_path, progress=False)
    x = torch.from_numpy(images.images).permute(0, 3, 1, 2).float() / 255 * 2 - 1
    with torch.no_grad():
        want = m.pipeline.vae.encode(x).latent_dist.mean * m.pipeline.vae.config.scaling_factor
    np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-6)
    monkeypatch.setattr(latent, "encode_images", lambda *a, **k: pytest.fail("the cache was not used"))
    again, key2 = latent.cached_latents(m.pipeline, images, tmp_path, progress=False)
    assert key2 == key and np.array_equal(again, got)


def test_other_sizes_are_resized_as_the_pipeline_would_and_recorded(sd):
    from PIL import Image

    from retrack.backends.stable_diffusion import encode_images, preprocessing
    from retrack.data import load_images

    m, images = _load(sd), load_images(sd / "grey12.npz")
    assert preprocessing(m.pipeline, images) == {"from": [12, 12], "to": [8, 8], "resized": True,
                                                  "resample": "lanczos", "grey_to_rgb": True}
    small = np.stack([np.array(Image.fromarray(im[..., 0]).convert("RGB").resize((8, 8), Image.LANCZOS))
                      for im in images.images])
    x = torch.from_numpy(small).permute(0, 3, 1, 2).float() / 255 * 2 - 1
    with torch.no_grad():
        want = m.pipeline.vae.encode(x).latent_dist.mean * m.pipeline.vae.config.scaling_factor
    np.testing.assert_allclose(encode_images(m.pipeline, images.images), want.numpy(), rtol=0, atol=1e-6)


def _unlearn(sd: Path, out: Path, method: str, *extra: str, data: str = "rgb.npz") -> int:
    from retrack.cli import main

    return main(["unlearn", "--model", str(sd / "sd"), "--data", str(sd / data), "--forget", "0,1",
                 "--out", str(out), "--method", method, "--prompt", PROMPT, "--steps", "1", "--batch-size", "2",
                 "--k", "3", "--quiet", "--device", "cpu", "--cache-dir", str(out.parent / "cache"), *extra])


def _files(folder: Path, part: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (folder / part).iterdir() if p.suffix == ".safetensors"}


@pytest.mark.parametrize("method", ["retrack", "vanilla", "neggrad", "erasediff", "siss"])
def test_each_method_trains_only_the_unet(sd, tmp_path, method):
    out = tmp_path / "o"
    assert _unlearn(sd, out, method) == 0
    for frozen in ("vae", "text_encoder"):
        assert _files(out, frozen) == _files(sd / "sd", frozen)
    assert _files(out, "unet") != _files(sd / "sd", "unet")
    record = json.loads((out / "retrack_run.json").read_text())["text_to_image"]
    assert record["prompt"]["text"] == PROMPT and record["trained"] == "unet"
    assert record["images"] == {"from": [8, 8], "to": [8, 8], "resized": False, "resample": "lanczos",
                                "grey_to_rgb": False}


def test_neighbours_are_searched_among_the_latents(sd, tmp_path):
    from retrack.backends.stable_diffusion import encode_images
    from retrack.data import load_images

    out = tmp_path / "o"
    assert _unlearn(sd, out, "retrack") == 0
    latents = encode_images(_load(sd).pipeline, load_images(sd / "rgb.npz").images)
    flat = torch.from_numpy(latents).flatten(1).double()
    d = torch.cdist(flat[:2], flat[2:])
    want = d.argsort(dim=1, stable=True)[:, :3].tolist()
    assert json.loads((out / "retrack_run.json").read_text())["neighbours"] == want


def test_a_resized_grey_data_set_runs_and_is_recorded(sd, tmp_path):
    out = tmp_path / "o"
    assert _unlearn(sd, out, "vanilla", data="grey12.npz") == 0
    record = json.loads((out / "retrack_run.json").read_text())["text_to_image"]
    assert record["images"]["resized"] and record["images"]["from"] == [12, 12] and record["images"]["grey_to_rgb"]


def _one_step(model, method: str = "retrack"):
    from retrack import objectives
    from retrack.trainer import TrainData, TrainSettings, train

    g = torch.Generator().manual_seed(3)
    data = TrainData(torch.randn(6, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g),
                     torch.tensor([[0, 1, 2], [3, 4, 5]]))
    train(model.denoiser, objectives.build(method, lam=0.5), data, TrainSettings(steps=1, batch_size=2, lr=1e-2),
          "cpu", progress=False)


def test_the_saved_pipeline_loads_and_gives_the_trained_eps(sd, tmp_path):
    from diffusers import StableDiffusionPipeline

    from retrack.backends.stable_diffusion import save_text_model

    m = _load(sd)
    _one_step(m)
    save_text_model(m, tmp_path / "o")
    again = StableDiffusionPipeline.from_pretrained(str(tmp_path / "o"))
    x, t = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1)), torch.tensor([10, 900])
    with torch.no_grad():
        want = m.denoiser(x, t)
        got = again.unet(x, t, encoder_hidden_states=m.denoiser.context.expand(2, -1, -1)).sample
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_lora_trains_only_the_adapter_and_loads_with_load_lora_weights(sd, tmp_path):
    from diffusers import StableDiffusionPipeline

    from retrack.backends.stable_diffusion import LORA_FILE, save_text_model

    m = _load(sd, lora_rank=2, lora_alpha=4.0)
    assert m.lora["rank"] == 2 and m.lora["alpha"] == 4.0
    trainable = {n for n, p in m.pipeline.unet.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    before = _state(m.pipeline.unet)
    _one_step(m)
    changed = _changed(before, m.pipeline.unet)
    assert changed and all("lora_B" in k for k in changed)  # B starts at 0, so A gets no gradient on step 1
    save_text_model(m, tmp_path / "o")
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [LORA_FILE]
    pipe = StableDiffusionPipeline.from_pretrained(str(sd / "sd"))
    pipe.load_lora_weights(str(tmp_path / "o"))
    x, t = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1)), torch.tensor([10, 900])
    with torch.no_grad():
        want = m.denoiser(x, t)
        got = pipe.unet(x, t, encoder_hidden_states=m.denoiser.context.expand(2, -1, -1)).sample
        base = StableDiffusionPipeline.from_pretrained(str(sd / "sd")).unet(
            x, t, encoder_hidden_states=m.denoiser.context.expand(2, -1, -1)).sample
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(base, want)


def test_lora_run_writes_the_adapter_and_its_record(sd, tmp_path):
    out = tmp_path / "o"
    assert _unlearn(sd, out, "retrack", "--lora", "2", "--gradient-checkpointing") == 0
    assert sorted(p.name for p in out.iterdir()) == ["pytorch_lora_weights.safetensors", "retrack_log.json",
                                                     "retrack_run.json"]
    record = json.loads((out / "retrack_run.json").read_text())
    assert record["text_to_image"]["trained"] == "lora" and record["text_to_image"]["lora"]["rank"] == 2
    assert record["config"]["gradient_checkpointing"] is True


def test_saliency_ranks_the_lora_adapter_and_leaves_the_zero_gradient_a_matrices(sd, tmp_path):
    out = tmp_path / "o"
    assert _unlearn(sd, out, "retrack", "--lora", "2", "--gradient-checkpointing", "--saliency", "0.9",
                    "--balance", "nash") == 0
    mask = json.loads((out / "retrack_log.json").read_text())[0]["saliency"]
    trainable = [(n, p) for n, p in _load(sd, lora_rank=2).denoiser.named_parameters() if p.requires_grad]
    assert mask["total"] == sum(p.numel() for _, p in trainable)
    # B starts at 0, so no A entry has a forget gradient and none is kept, though 90% were asked for.
    assert 0 < mask["kept"] <= sum(p.numel() for n, p in trainable if "lora_B" in n) < 0.9 * mask["total"]


def test_a_long_prompt_is_truncated_with_a_warning_and_recorded(sd, tmp_path, capsys):
    out = tmp_path / "o"
    from retrack.cli import main

    code = main(["unlearn", "--model", str(sd / "sd"), "--data", str(sd / "rgb.npz"), "--forget", "0",
                 "--out", str(out), "--method", "vanilla", "--prompt", "a photo of a t-shirt", "--steps", "1",
                 "--batch-size", "2", "--quiet", "--device", "cpu", "--cache-dir", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert code == 0
    assert err == ("retrack: warning: --prompt is 18 tokens but the tokenizer takes 12; it is truncated to "
                   "'a photo of a t', as the pipeline does when it generates.\n")
    prompt = json.loads((out / "retrack_run.json").read_text())["text_to_image"]["prompt"]
    assert prompt == {"text": "a photo of a t-shirt", "tokens": 18, "max_tokens": 12, "truncated": True,
                      "kept": "a photo of a t"}


def test_a_missing_extra_names_the_pip_command(monkeypatch):
    import importlib.util

    import retrack.backends.stable_diffusion as latent

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    latent.require_sd_extra()
    with pytest.raises(UserError, match=r"need peft \(the \[sd\] extra\): pip install 'retrack-unlearning\[sd\]'"):
        latent.require_sd_extra(lora=True)


def test_the_stable_diffusion_recipe_is_the_papers_column_and_flags_override_it(sd, tmp_path):
    from retrack.api import unlearn_recipe

    common = {"steps": 30, "batch_size": 16, "grad_accum": 16, "lr": 1e-5, "betas": (0.9, 0.999),
              "weight_decay": 1e-2, "clip": 1.0, "k": 10}
    assert unlearn_recipe("stable-diffusion", "retrack") == {**common, "lam": 0.5}
    assert unlearn_recipe("stable-diffusion", "siss") == {**common, "lam": 0.5, "s": 750.0}
    assert unlearn_recipe("stable-diffusion", "erasediff") == {**common, "eta": 1e-2}
    out = tmp_path / "o"
    assert _unlearn(sd, out, "siss", "--recipe", "stable-diffusion", "--steps", "1", "--grad-accum", "2",
                    "--beta1", "0.5") == 0
    cfg = json.loads((out / "retrack_run.json").read_text())["config"]
    assert (cfg["steps"], cfg["batch_size"], cfg["grad_accum"], cfg["lr"], cfg["s"], cfg["lam"]) == (
        1, 2, 2, 1e-5, 750.0, 0.5)
    assert cfg["betas"] == [0.5, 0.999] and cfg["weight_decay"] == 1e-2 and cfg["recipe"] == "stable-diffusion"


def test_sample_prompt_is_the_pipelines_own_guided_sampling_per_seed_and_index(sd, tmp_path):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from retrack.backends.stable_diffusion import sample_text
    from retrack.cli import main

    out = tmp_path / "s.npz"
    assert main(["sample", "--model", str(sd / "sd"), "--prompt", PROMPT, "--num", "3", "--steps", "2",
                 "--batch-size", "2", "--seed", "5", "--quiet", "--device", "cpu", "--out", str(out)]) == 0
    with np.load(out) as z:
        got, prompt = z["images"], str(z["prompt"])
    assert got.shape == (3, 8, 8, 3) and got.dtype == np.uint8 and prompt == PROMPT
    pipe = StableDiffusionPipeline.from_pretrained(str(sd / "sd"))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    for i in range(3):
        g = torch.Generator().manual_seed(5 * 1_000_003 + i)
        want = pipe(PROMPT, num_inference_steps=2, guidance_scale=7.5, generator=g, output_type="np").images
        np.testing.assert_array_equal(got[i], np.clip(np.round(want[0] * 255), 0, 255).astype(np.uint8))
    unguided = sample_text(_load(sd), 3, steps=2, seed=5, guidance=1.0, progress=False)
    assert not np.array_equal(unguided, got)


def test_a_lora_output_samples_with_its_adapter(sd, tmp_path):
    from retrack.backends.stable_diffusion import load_text_model, sample_text

    out = tmp_path / "o"
    assert _unlearn(sd, out, "vanilla", "--lora", "2", "--lr", "0.1") == 0
    record = json.loads((out / "retrack_run.json").read_text())["text_to_image"]
    assert record["base_model"] == str((sd / "sd").resolve())
    assert _unlearn(sd, tmp_path / "again", "vanilla", "--model", str(out)) == 2  # refused: unlearn its base
    adapted = load_text_model(str(out), PROMPT, "cpu")
    x, t = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1)), torch.tensor([10, 900])
    with torch.no_grad():
        assert not torch.allclose(adapted.denoiser(x, t), _load(sd).denoiser(x, t))
    assert sample_text(adapted, 1, steps=2, progress=False).shape == (1, 8, 8, 3)


def test_evaluate_prompt_counts_copies_among_the_pipelines_samples(sd, tmp_path):
    from retrack.backends.stable_diffusion import pixel_images, sample_text
    from retrack.cli import main
    from retrack.data import load_images

    m = _load(sd)
    samples = sample_text(m, 4, steps=2, seed=1, progress=False).astype(np.float64) / 255
    targets = pixel_images(m.pipeline, load_images(sd / "rgb.npz").images)[[0, 1]].astype(np.float64) / 255
    nearest = np.sqrt(((samples[:, None] - targets[None]) ** 2).sum((2, 3, 4))).min(1)
    threshold = float(np.sort(nearest)[1] + 1e-6)  # exactly two of the four samples fall below it
    out = tmp_path / "m.json"
    assert main(["evaluate", "--model", str(sd / "sd"), "--prompt", PROMPT, "--data", str(sd / "rgb.npz"),
                 "--forget", "0,1", "--metrics", "copies", "--copy-rule", "l2", "--copy-threshold", str(threshold),
                 "--num-samples", "4",
                 "--steps", "2", "--seed", "1", "--batch-size", "3", "--quiet", "--device", "cpu",
                 "--out", str(out)]) == 0
    copies = json.loads(out.read_text())["copies"]
    assert copies["fraction"] == 0.5
    assert copies["settings"]["prompt"] == PROMPT and copies["settings"]["guidance"] == 7.5


@pytest.mark.parametrize("lora", [False, True], ids=["unet", "lora"])
def test_report_draws_a_text_to_image_runs_samples_through_its_pipeline(sd, tmp_path, lora):
    from report_pages import decode, parse_report
    from retrack.backends.stable_diffusion import load_text_model, sample_text
    from retrack.grid import grid_image
    from retrack.report import write_report
    from retrack.report.sections import scale_for

    out = tmp_path / "o"
    assert _unlearn(sd, out, "vanilla", "--lr", "0.1", *(["--lora", "2"] if lora else [])) == 0
    text = write_report(out, tmp_path / "r.html", samples=2, sampling_steps=2, reconstruction=True).read_text()
    page = parse_report(text)
    assert {"samples-before", "samples-after"} <= set(page.figures)
    for tag, model in (("before", sd / "sd"), ("after", out)):
        drawn = sample_text(load_text_model(str(model), PROMPT, "cpu"), 2, steps=2, seed=0, progress=False)
        assert np.array_equal(decode(page.figures[f"samples-{tag}"]),
                              np.asarray(grid_image(drawn, scale=scale_for(drawn))))
    assert "Not drawn" not in text and "UNet2DModel" not in text and "through the pipeline under the prompt" in text
    assert "is a text-to-image model, and this probe noises pixel images" in text


def test_a_lora_record_naming_itself_as_its_base_is_one_sentence(sd, tmp_path, capsys):
    from retrack.cli import main

    out = tmp_path / "o"
    assert _unlearn(sd, out, "vanilla", "--lora", "2") == 0
    capsys.readouterr()
    record = json.loads((out / "retrack_run.json").read_text())
    for base in (out, tmp_path / "other"):  # itself, or a loop of two adapters
        record["text_to_image"]["base_model"] = str(base)
        (out / "retrack_run.json").write_text(json.dumps(record))
        if base != out:
            (base / "pytorch_lora_weights.safetensors").parent.mkdir(exist_ok=True)
            (base / "pytorch_lora_weights.safetensors").write_bytes((out / "pytorch_lora_weights.safetensors")
                                                                    .read_bytes())
            (base / "retrack_run.json").write_text(json.dumps({"text_to_image": {"base_model": str(out)}}))
        assert main(["sample", "--model", str(out), "--prompt", PROMPT, "--num", "1", "--steps", "2", "--quiet",
                     "--device", "cpu", "--out", str(tmp_path / "s.npz")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err and "but that is a LoRA adapter too" in err, err
        assert not (tmp_path / "s.npz").exists()


def test_evaluate_prompt_defaults_to_the_descriptor_copy_rule(sd, tmp_path):
    from retrack.cli import main

    out = tmp_path / "m.json"
    assert main(["evaluate", "--model", str(sd / "sd"), "--prompt", PROMPT, "--data", str(sd / "rgb.npz"),
                 "--forget", "0,1", "--metrics", "copies", "--num-samples", "2", "--steps", "2", "--quiet",
                 "--device", "cpu", "--out", str(out)]) == 0
    copies = json.loads(out.read_text())["copies"]
    assert (copies["rule"], copies["threshold"]) == ("pixel_cosine", 0.95)  # the descriptor rule, not L2


def test_unlearn_prompt_resizes_a_folder_of_mixed_sizes_and_channels_like_the_pipeline(sd, tmp_path):
    from PIL import Image

    from retrack.backends.stable_diffusion import pixel_images
    from retrack.data import load_images, read_image_file

    rng = np.random.default_rng(0)
    folder = tmp_path / "mixed"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    Image.fromarray(rng.integers(0, 256, (12, 12), dtype=np.uint8)).save(folder / "4.png")  # grey, larger
    Image.fromarray(rng.integers(0, 256, (10, 6, 3), dtype=np.uint8)).save(folder / "5.png")  # another shape
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    out = tmp_path / "o"
    assert _unlearn(sd, out, "vanilla", data=str(folder)) == 0
    data = json.loads((out / "retrack_run.json").read_text())["data"]
    assert data["conversion"] == {"resized": {"to": [8, 8], "rgb": True, "resample": "lanczos", "files": 2}}
    pipe = _load(sd).pipeline
    fitted = load_images(folder, (8, 8)).images
    for i, f in enumerate(sorted(folder.iterdir())):  # each file as the pipeline's own processor sees it
        np.testing.assert_array_equal(fitted[i], pixel_images(pipe, read_image_file(f)[None])[0])
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
