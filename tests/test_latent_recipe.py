"""The latent T-shirt recipe: tokenizer, data, a tiny pipeline built in seconds, and resuming."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("transformers")

from retrack.recipes.latent_tshirt import DIGIT_PROMPT, TSHIRT_PROMPT, build_latent_tshirt, pad, unpad  # noqa: E402
from retrack.recipes.mnist_tshirt.builder import DEBIAN_FASHION_MNIST, load_tshirt  # noqa: E402

RECIPE = Path(__file__).resolve().parents[1] / "src" / "retrack" / "recipes" / "latent_tshirt" / "recipe.yaml"
# Fashion-MNIST labels of the tiny folder: #1 is the shipped T-shirt, the other T-shirts are #2, #4, #5, #7.
FASHION_LABELS = [9, 0, 0, 3, 0, 0, 1, 0]


def _write_idx(folder: Path, images: np.ndarray, labels: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    n, h, w = images.shape
    header = (2051).to_bytes(4, "big") + b"".join(int(v).to_bytes(4, "big") for v in (n, h, w))
    (folder / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + images.tobytes()))
    (folder / "train-labels-idx1-ubyte").write_bytes((2049).to_bytes(4, "big") + n.to_bytes(4, "big")
                                                     + labels.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    """A Fashion-MNIST folder of 8 images (the shipped T-shirt at #1) and an MNIST one of 6 digits."""
    root = tmp_path_factory.mktemp("idx")
    rng = np.random.default_rng(0)
    fashion = rng.integers(0, 256, (8, 28, 28), dtype=np.uint8)
    fashion[1] = load_tshirt()[..., 0]
    digits = rng.integers(0, 256, (6, 28, 28), dtype=np.uint8)
    _write_idx(root / "fashion", fashion, np.array(FASHION_LABELS))
    _write_idx(root / "mnist", digits, np.arange(6) % 10)
    return root / "fashion", root / "mnist", fashion, digits


def test_the_tokenizer_encodes_each_prompt_word_as_one_token(tmp_path):
    from retrack.recipes.latent_tshirt.tokenizer import save_tokenizer

    tok = save_tokenizer(tmp_path / "tok", 16)
    ids = tok([DIGIT_PROMPT, TSHIRT_PROMPT, "", "A Photo of a T-Shirt"], padding="max_length", max_length=16).input_ids
    words = [tok.convert_ids_to_tokens(row) for row in ids]
    bos, eos = "<|startoftext|>", "<|endoftext|>"
    assert words[0] == [bos, "a</w>", "handwritten</w>", "digit</w>"] + [eos] * 12
    assert words[1] == [bos, "a</w>", "photo</w>", "of</w>", "a</w>", "t</w>", "-</w>", "shirt</w>"] + [eos] * 8
    assert words[2] == [bos] + [eos] * 15
    assert ids[3] == ids[1]
    assert tok.pad_token_id == tok.eos_token_id and len(tok) == 537
    assert tok("zebra").input_ids[1:-1] == tok.convert_tokens_to_ids(["z", "e", "b", "r", "a</w>"])


def test_the_data_builder_puts_exact_counts_labels_and_prompts(folders):
    fashion_dir, mnist_dir, fashion, digits = folders
    built = build_latent_tshirt(tshirts=3, copies=4, fashion_dir=fashion_dir, mnist_dir=mnist_dir)
    images = built.data.images
    assert images.shape == (13, 32, 32, 1)
    assert built.prompt_ids.tolist() == [0] * 6 + [1] * 7
    assert built.forget.tolist() == [9, 10, 11, 12]
    assert built.tshirt_indices.tolist() == [2, 4, 5]
    assert built.digit_labels.tolist() == [0, 1, 2, 3, 4, 5]
    np.testing.assert_array_equal(images[:6, 2:30, 2:30, 0], digits)
    np.testing.assert_array_equal(images[6:9, 2:30, 2:30, 0], fashion[[2, 4, 5]])
    np.testing.assert_array_equal(images[9:, 2:30, 2:30, 0], np.repeat(fashion[1][None], 4, axis=0))
    border = np.ones((32, 32), bool)
    border[2:30, 2:30] = False
    assert not images[:, border].any()
    np.testing.assert_array_equal(built.tshirt, pad(load_tshirt()[None])[0])


def test_unpad_drops_the_border_and_averages_rgb():
    rgb = np.zeros((1, 32, 32, 3), np.uint8)
    rgb[0, 2, 2] = (10, 20, 31)  # mean 20.33 → 20
    rgb[0, 0, 0] = 255  # in the border
    got = unpad(rgb)
    assert got.shape == (1, 28, 28, 1) and got[0, 0, 0, 0] == 20 and got.sum() == 20


def test_too_few_tshirts_are_refused(folders):
    from retrack.errors import UserError

    with pytest.raises(UserError, match="holds only 4 other T-shirts, the recipe asks for 5"):
        build_latent_tshirt(tshirts=5, copies=1, fashion_dir=folders[0], mnist_dir=folders[1])


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_the_recipe_takes_the_first_other_tshirts_of_fashion_mnist():
    from retrack.recipes.latent_tshirt.data import load_other_tshirts

    _, index = load_other_tshirts(600)
    assert index[:5].tolist() == [2, 4, 10, 17, 26] and len(set(index.tolist())) == 600 and 1 not in index


def _tiny_recipe(tmp: Path, folders, **override) -> Path:
    raw = yaml.safe_load(RECIPE.read_text())
    raw["data"] = {"tshirts": 3, "copies": 4, "fashion_dir": str(folders[0]), "mnist_dir": str(folders[1])}
    raw["text_encoder"] = {"hidden_size": 8, "intermediate_size": 16, "num_attention_heads": 2, "num_hidden_layers": 1}
    raw["vae"].update(block_out_channels=[4, 8, 8], norm_num_groups=2)
    raw["unet"].update(block_out_channels=[8, 16], cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4)
    raw["vae_training"].update(steps=3, batch_size=4, warmup_steps=2)
    raw["unet_training"].update(steps=4, batch_size=4, warmup_steps=2)
    raw["checkpoint_every"] = 2
    raw.update(override)
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _weights(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.safetensors"))}


def test_the_recipe_builds_a_stable_diffusion_pipeline(folders, tmp_path):
    from diffusers import StableDiffusionPipeline

    from retrack.backends.stable_diffusion import encode_images, load_text_model, sample_text
    from retrack.cli import main

    out = tmp_path / "model"
    assert main(["pretrain", "--config", str(_tiny_recipe(tmp_path, folders)), "--out", str(out)]) == 0
    assert not (tmp_path / "model.training").exists()
    pipe = StableDiffusionPipeline.from_pretrained(str(out))
    assert pipe.safety_checker is None and pipe.vae_scale_factor == 4 and pipe.unet.config.sample_size == 8
    record = json.loads((out / "provenance.json").read_text())
    assert record["data_counts"] == {"digits": 6, "other_tshirts": 3, "planted_copies": 4}
    assert record["prompts"] == [DIGIT_PROMPT, TSHIRT_PROMPT] and record["seed"] == 0
    assert [e["step"] for e in record["loss_log"]["vae"]] == [2, 3]
    assert [e["step"] for e in record["loss_log"]["unet"]] == [2, 4]
    for name, digest in record["files_sha256"].items():
        import hashlib

        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest
    # SD's scaling factor: 1 / std of the posterior means of the training images
    data = build_latent_tshirt(3, 4, folders[0], folders[1]).data
    scale = pipe.vae.config.scaling_factor
    means = encode_images(pipe, data.images) / scale
    assert scale == pytest.approx(record["scaling_factor"]) and scale == pytest.approx(1 / means.std(ddof=1), rel=1e-5)
    model = load_text_model(str(out), TSHIRT_PROMPT, "cpu")
    assert model.prompt["tokens"] == 9 and not model.prompt["truncated"]
    drawn = sample_text(model, 2, steps=2, seed=3, progress=False)
    assert drawn.shape == (2, 32, 32, 3)
    from retrack.recipes.latent_tshirt.memorisation import copy_measures, copy_summary, measure_model

    results, images, measures = measure_model(str(out), str(out), 2, seed=3, steps=2, progress=False)
    np.testing.assert_array_equal(images[TSHIRT_PROMPT], drawn)
    want = copy_measures(drawn, data.images[-1], data.images[:9])
    for key, value in want.items():
        np.testing.assert_array_equal(measures[TSHIRT_PROMPT][key], value)
    assert results[TSHIRT_PROMPT] == {**copy_summary(want), "seed": 3, "steps": 2, "guidance": 7.5, "sampler": "ddim"}


def test_an_interrupted_build_resumes_to_the_same_weights(folders, tmp_path, monkeypatch):
    import retrack.recipes.latent_tshirt.train as train
    from retrack.recipes.latent_tshirt.recipe import LatentRecipe

    recipe = LatentRecipe.from_yaml(_tiny_recipe(tmp_path, folders))
    train.build_latent_model(recipe, tmp_path / "whole")
    real, calls = train._save_checkpoint, []

    def save_then_die(*args):
        real(*args)
        calls.append(1)
        if len(calls) in (1, 4):  # killed in the VAE stage (step 2), then in the UNet stage (step 2)
            raise KeyboardInterrupt

    monkeypatch.setattr(train, "_save_checkpoint", save_then_die)
    for _ in range(2):
        with pytest.raises(KeyboardInterrupt):
            train.build_latent_model(recipe, tmp_path / "resumed")
        assert not (tmp_path / "resumed").exists()
    saved = torch.load(tmp_path / "resumed.training" / "state.pt", weights_only=False)
    assert (saved["state"]["stage"], saved["state"]["step"]) == ("unet", 2)
    train.build_latent_model(recipe, tmp_path / "resumed")
    assert len(calls) == 5
    whole, resumed = _weights(tmp_path / "whole"), _weights(tmp_path / "resumed")
    assert set(whole) == {"text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
                          "vae/diffusion_pytorch_model.safetensors"}
    assert whole == resumed


@pytest.mark.parametrize(("change", "message"), [
    ({"unet": {"cross_attention_dim": 8, "bogus": 1}}, "unknown key 'bogus' under unet:"),
    ({"unet": {"cross_attention_dim": 16}}, "cross_attention_dim must equal text_encoder: hidden_size (8)"),
    ({"unet_training": {"lr": 0}}, "'lr' in unet_training: of the recipe must be a finite number > 0, got 0."),
])
def test_a_bad_latent_recipe_is_one_sentence_and_writes_nothing(folders, tmp_path, capsys, change, message):
    from retrack.cli import main

    path = _tiny_recipe(tmp_path, folders)
    raw = yaml.safe_load(path.read_text())
    for key, value in change.items():
        raw[key].update(value)
    path.write_text(yaml.safe_dump(raw))
    assert main(["pretrain", "--config", str(path), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.yaml"]


def test_copy_rules_on_hand_made_images():
    from retrack.recipes.latent_tshirt.memorisation import copy_measures, copy_summary

    zeros = np.zeros((28, 28), np.uint8)
    planted, full = zeros.copy(), np.full((28, 28), 255, np.uint8)
    planted[:2, :2] = 255  # L2 2 from the blank image, √780 from the full one
    rgb = [np.repeat(pad(im[None]), 3, axis=-1)[0] for im in (planted, zeros, full)]
    m = copy_measures(np.stack(rgb), pad(planted[None])[0], pad(np.stack([zeros, full])))
    np.testing.assert_allclose(m["l2_planted"], [0, 2, np.sqrt(780)])
    np.testing.assert_allclose(m["l2_nearest_other"], [2, 0, 0])
    # in [-1, 1] the blank image differs from the planted one in 12 of 3,072 values: cos = 3048/3072
    # the full image: 780·3 values of +1 where the planted one has −1, 12 equal +1, the rest equal −1
    full_cos = (3072 - 2 * 780 * 3) / np.sqrt(3072 * 3072)
    np.testing.assert_allclose(m["pixel_cosine"], [1, 3048 / 3072, full_cos])
    s = copy_summary(m)
    assert (s["l2_lt_10"]["count"], s["nearest_is_planted"]["count"], s["pixel_cosine_gt_0.95"]["count"]) == (2, 1, 2)
    assert s["samples"] == 3 and s["nearest_is_planted"]["fraction"] == pytest.approx(1 / 3)


def _chain_script():
    """scripts/latent_chain.py as a module: its table and realism helpers write README's figures."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "latent_chain.py"
    spec = importlib.util.spec_from_file_location("latent_chain", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_chains_realism_is_the_median_distance_to_the_nearest_other_image():
    chain = _chain_script()
    zeros = np.zeros((28, 28), np.uint8)
    near, far = zeros.copy(), zeros.copy()
    near[0, :4] = 255  # L2 2 from the blank image
    far[:, :9] = 255  # L2 √252 from the blank image, √(252 − 4) from `near`
    others = pad(np.stack([zeros, near]))
    samples = np.repeat(pad(np.stack([zeros, near, far])), 3, axis=-1)
    # nearest other image: 0 (itself), 0 (itself), √248 (near) → median 0; drop the exact copies → √248
    assert chain.realism(samples, others) == 0.0
    assert chain.realism(samples[2:], others) == pytest.approx(np.sqrt(248))


def test_the_chains_table_has_one_line_per_model_in_percent():
    chain = _chain_script()
    row = {"method": "retrack", "tshirt_copies_nearest": 0.0, "tshirt_copies_l2": 0.005, "tshirt_copies_cosine": 0.25,
           "tshirt_l2_median": 9.876, "tshirt_realism": 1.5, "digit_realism": 2.25, "digit_copies_l2": 0.0,
           "tshirt_noncopies_changed": 0.125, "digit_changed": 0.11}
    lines = chain.table([{**row, "method": "pretrained", "tshirt_noncopies_changed": None, "digit_changed": None},
                         row]).splitlines()
    assert len(lines) == 4 and lines[1] == "|---" * 10 + "|"
    assert lines[2] == "| pretrained | 0.0% | 0.5% | 25.0% | 9.88 | 1.50 | 2.25 | 0.0% |  |  |"
    assert lines[3] == "| retrack | 0.0% | 0.5% | 25.0% | 9.88 | 1.50 | 2.25 | 0.0% | 12.5% | 11.0% |"
