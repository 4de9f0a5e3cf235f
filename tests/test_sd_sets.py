"""retrack sd-sets on a tiny Stable Diffusion pipeline: a planted copy lands in the forget set.

The training image is one of the pipeline's own samples (seed 2 of the run), so its similarity is
exactly 1 and every other sample's similarity is the pixel cosine computed here by hand.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")

from conftest import save_pipeline, save_sd_pipeline  # noqa: E402
from retrack.cli import main  # noqa: E402

PROMPT = "a t-shirt"
OTHER = "a digit"
N, STEPS, PLANTED = 6, 2, 2
ENV_KEYS = {"config", "versions", "threads", "created", "command"}


def _samples(sd: Path, prompt: str = PROMPT) -> np.ndarray:
    from retrack.backends.stable_diffusion import load_text_model, sample_text

    return sample_text(load_text_model(str(sd), prompt, "cpu"), N, steps=STEPS, seed=0, progress=False)


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    from PIL import Image

    ws = tmp_path_factory.mktemp("sdsets")
    save_sd_pipeline(ws / "sd")
    save_pipeline(ws / "pixel")
    samples = _samples(ws / "sd")
    np.save(ws / "samples.npy", samples)
    np.save(ws / "other.npy", _samples(ws / "sd", OTHER))
    Image.fromarray(samples[PLANTED]).save(ws / "train.png")
    grey = np.random.default_rng(0).integers(0, 256, (12, 12), dtype=np.uint8)
    Image.fromarray(grey).save(ws / "grey12.png")
    (ws / "broken.png").write_bytes(b"\x89PNG broken")
    (ws / "notes.txt").write_text("not torchscript\n")
    (ws / "prompts.csv").write_text(f"prompt,image\n{PROMPT},train.png\n{OTHER},{ws / 'train.png'}\n")
    (ws / "noimage.csv").write_text(f"prompt,picture\n{PROMPT},train.png\n")
    (ws / "prompts.jsonl").write_text(json.dumps({"prompt": PROMPT, "image": "train.png"}) + "\n\n"
                                      + json.dumps({"prompt": PROMPT, "image": "train.png"}) + "\n")
    (ws / "nokey.jsonl").write_text(json.dumps({"prompt": PROMPT}) + "\n")
    (ws / "bad.jsonl").write_text("{not json\n")
    (ws / "prompts.txt").write_text("a t-shirt\n")
    (ws / "sdxl" / "unet").mkdir(parents=True)
    (ws / "sdxl" / "unet" / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')
    (ws / "sdxl" / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    (ws / "out").mkdir()
    (ws / "exists").mkdir()
    return ws


def sets(w: Path, *extra) -> list:
    return ["sd-sets", "--model", w / "sd", "--prompt", PROMPT, "--image", w / "train.png", "--out", w / "out" / "s",
            "--samples", str(N), "--steps", str(STEPS), "--quiet", "--device", "cpu", *extra]


def _run(args: list) -> int:
    return main([str(a) for a in args])


def pixel_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of images in [-1, 1] (scaled in float32, as the descriptor does), every row of a with every row of b."""
    x, y = ((v.reshape(len(v), -1).astype(np.float32) / np.float32(127.5) - np.float32(1)).astype(np.float64)
            for v in (a, b))
    x, y = (v / np.linalg.norm(v, axis=1, keepdims=True) for v in (x, y))
    return x @ y.T


def _png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.array(im)


# ---------------------------------------------------------------------------------------------
# The rule
# ---------------------------------------------------------------------------------------------


def test_threshold_and_cluster_rules_on_hand_made_similarities():
    from retrack.sdsets import forget_mask

    to_training = np.array([0.9, 0.3, 0.2, 0.55, 0.1])
    among = np.eye(5)
    for i, j, s in ((0, 1, 0.8), (1, 2, 0.6), (2, 4, 0.4), (3, 4, 0.45)):
        among[i, j] = among[j, i] = s
    assert forget_mask(to_training, 0.5).tolist() == [True, False, False, True, False]
    # 1 is linked to the copy 0, and 2 to 1; 4 is linked to nothing above 0.5.
    assert forget_mask(to_training, 0.5, "cluster", among).tolist() == [True, True, True, True, False]
    assert forget_mask(to_training, 0.35, "cluster", among).tolist() == [True] * 5
    assert forget_mask(to_training, 0.95, "cluster", among).tolist() == [False] * 5


def test_slugs_are_folder_names_and_unique():
    from retrack.sdsets import slugs

    assert slugs(["A T-shirt!", "a t shirt", "???", "x" * 60]) == ["a-t-shirt", "a-t-shirt-2", "prompt", "x" * 48]


# ---------------------------------------------------------------------------------------------
# One prompt
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one(ws) -> Path:
    assert _run(sets(ws, "--out", ws / "one")) == 0
    return ws / "one"


def test_the_planted_copy_is_the_forget_set_and_sets_json_says_so(ws, one):
    from retrack.sdsets import OFFLINE_NOTE

    samples = np.load(ws / "samples.npy")
    sim = pixel_cosine(samples, samples[PLANTED:PLANTED + 1])[:, 0]
    assert sim[PLANTED] == pytest.approx(1.0, abs=1e-12) and np.delete(sim, PLANTED).max() < 0.95
    record = json.loads((one / "sets.json").read_text())
    assert ENV_KEYS <= set(record)
    assert record.pop("similarity") == pytest.approx(sim.tolist(), abs=1e-12)
    remain = [i for i in range(N) if i != PLANTED]
    out = ws / "one"
    assert {k: v for k, v in record.items() if k not in ENV_KEYS} == {
        "prompt": {"text": PROMPT, "tokens": 10, "max_tokens": 12, "truncated": False},
        "model": str((ws / "sd").resolve()), "pipeline": "StableDiffusionPipeline",
        "sampling": {"samples": N, "steps": STEPS, "guidance": 7.5, "sampler": "ddim", "seed": 0, "size": [8, 8]},
        "seeds": list(range(N)),
        "descriptor": "pixel_cosine", "descriptor_note": OFFLINE_NOTE,
        "rule": {"name": "threshold", "threshold": 0.95,
                 "text": "forget: pixel_cosine similarity to the training image > 0.95"},
        "training_image": {"path": str(ws / "train.png"),
                           "sha256": hashlib.sha256((ws / "train.png").read_bytes()).hexdigest(), "size": [8, 8],
                           "preprocessing": {"from": [8, 8], "to": [8, 8], "resized": False, "resample": "lanczos",
                                             "grey_to_rgb": False},
                           "file": "training.png"},
        "forget": {"count": 1, "indices": [PLANTED], "seeds": [PLANTED], "files": [f"forget/seed-{PLANTED}.png"]},
        "remain": {"count": N - 1, "indices": remain, "seeds": remain,
                   "files": [f"remain/seed-{i}.png" for i in remain]},
        "unlearn": {"data": "data.npz", "forget": "@forget.txt",
                    "command": f"retrack unlearn --model {ws / 'sd'} --prompt 'a t-shirt' --data {out / 'data.npz'} "
                               f"--forget @{out / 'forget.txt'} --out {out}-unlearned"}}
    assert record["config"]["descriptor"] == "pixel_cosine" and record["config"]["samples"] == N


def test_the_folders_hold_the_samples_by_seed(ws, one):
    samples = np.load(ws / "samples.npy")
    assert sorted(p.name for p in one.iterdir()) == ["contact_sheet.png", "data.npz", "forget", "forget.txt",
                                                    "remain", "sets.json", "training.png"]
    assert [p.name for p in sorted((one / "forget").iterdir())] == [f"seed-{PLANTED}.png"]
    assert [p.name for p in sorted((one / "remain").iterdir())] == [f"seed-{i}.png" for i in range(N) if i != PLANTED]
    for i in range(N):
        part = "forget" if i == PLANTED else "remain"
        np.testing.assert_array_equal(_png(one / part / f"seed-{i}.png"), samples[i])
    np.testing.assert_array_equal(_png(one / "training.png"), samples[PLANTED])
    with np.load(one / "data.npz") as z:
        np.testing.assert_array_equal(z["images"], samples)
        assert z["seeds"].tolist() == list(range(N)) and z["forget"].tolist() == [i == PLANTED for i in range(N)]
    lines = (one / "forget.txt").read_text().splitlines()
    assert lines[0].startswith("# forget set of ") and lines[1:] == [str(PLANTED)]


def test_the_contact_sheet_frames_the_forget_set(one):
    from retrack.sdsets import COLOURS, FRAME

    sheet = _png(one / "contact_sheet.png")
    side = 96 + 2 * FRAME  # each 8×8 image drawn 96 px high, framed, tiles 2 px apart
    assert sheet.shape == (side + 4, (N + 1) * (side + 2) + 2, 3)
    kinds = ["training"] + ["forget" if i == PLANTED else "remain" for i in range(N)]
    for k, kind in enumerate(kinds):
        x0 = 2 + k * (side + 2)
        frame = np.concatenate([sheet[2, x0:x0 + side], sheet[2 + side - 1, x0:x0 + side],
                                sheet[2:2 + side, x0], sheet[2:2 + side, x0 + side - 1]])
        assert (frame == COLOURS[kind]).all(), kind


def test_the_recorded_unlearn_command_runs_on_the_sets_as_they_are(ws, one, tmp_path):
    cmd = json.loads((one / "sets.json").read_text())["unlearn"]["command"]
    args = shlex.split(cmd)[1:]
    args[args.index("--out") + 1] = str(tmp_path / "u")
    assert _run([*args, "--steps", "1", "--batch-size", "2", "--k", "3", "--quiet", "--device", "cpu",
                 "--cache-dir", tmp_path / "c", "--eval-every", "1", "--eval-target", one / "training.png",
                 "--eval-samples", "3", "--eval-steps", str(STEPS)]) == 0
    data = json.loads((tmp_path / "u" / "retrack_run.json").read_text())["data"]
    assert data["forget_indices"] == [PLANTED] and data["remain_size"] == N - 1
    # Evaluation at step 0 samples the input model with the same seeds: the same similarities.
    first = next(e for e in json.loads((tmp_path / "u" / "retrack_log.json").read_text()) if e.get("kind") == "eval")
    want = json.loads((one / "sets.json").read_text())["similarity"][:3]
    assert first["step"] == 0 and first["details"]["similarity"]["per_sample"] == pytest.approx(want, abs=1e-12)


def test_the_cluster_rule_takes_the_training_images_single_linkage_cluster(ws, tmp_path):
    samples = np.load(ws / "samples.npy")
    everything = np.concatenate([samples[PLANTED:PLANTED + 1], samples])
    linked = pixel_cosine(everything, everything) > 0.5
    reach = linked.copy()
    for _ in range(len(reach)):  # transitive closure by repeated boolean products
        reach = reach | ((reach.astype(int) @ linked.astype(int)) > 0)
    want = np.flatnonzero(reach[0, 1:]).tolist()
    direct = np.flatnonzero(linked[0, 1:]).tolist()
    assert set(direct) < set(want)  # this run has a sample linked only through another copy
    assert _run(sets(ws, "--out", tmp_path / "c", "--rule", "cluster", "--threshold", "0.5")) == 0
    record = json.loads((tmp_path / "c" / "sets.json").read_text())
    assert record["forget"]["indices"] == want and record["rule"]["name"] == "cluster"
    assert _run(sets(ws, "--out", tmp_path / "t", "--threshold", "0.5")) == 0
    assert json.loads((tmp_path / "t" / "sets.json").read_text())["forget"]["indices"] == direct


def test_a_training_image_of_another_size_is_resized_as_the_pipeline_would(ws, tmp_path):
    from PIL import Image

    assert _run(sets(ws, "--out", tmp_path / "g", "--image", ws / "grey12.png", "--threshold", "0.5")) == 0
    record = json.loads((tmp_path / "g" / "sets.json").read_text())["training_image"]
    assert record["size"] == [12, 12] and record["preprocessing"] == {
        "from": [12, 12], "to": [8, 8], "resized": True, "resample": "lanczos", "grey_to_rgb": True}
    with Image.open(ws / "grey12.png") as im:
        want = np.array(im.convert("RGB").resize((8, 8), Image.LANCZOS))
    np.testing.assert_allclose(_png(tmp_path / "g" / "training.png"), want, atol=1)


def test_a_long_prompt_is_truncated_as_the_pipeline_does_and_recorded(ws, tmp_path, capsys):
    assert _run(sets(ws, "--out", tmp_path / "l", "--prompt", "a photo of a t-shirt")) == 0
    assert "is 18 tokens but the tokenizer takes 12; it is truncated to 'a photo of a t'" in capsys.readouterr().err
    prompt = json.loads((tmp_path / "l" / "sets.json").read_text())["prompt"]
    assert prompt["truncated"] and prompt["kept"] == "a photo of a t"


# ---------------------------------------------------------------------------------------------
# Many prompts
# ---------------------------------------------------------------------------------------------


def test_a_prompts_file_writes_one_folder_per_prompt_and_an_index(ws, tmp_path):
    base = sets(ws, "--out", tmp_path / "m")
    i = base.index("--prompt")
    args = base[:i] + base[i + 4:] + ["--prompts", ws / "prompts.csv"]
    assert _run(args) == 0
    index = json.loads((tmp_path / "m" / "index.json").read_text())
    copies = int((pixel_cosine(np.load(ws / "other.npy"), np.load(ws / "samples.npy")[[PLANTED]]) > 0.95).sum())
    assert [(p["prompt"], p["folder"], p["forget"], p["remain"]) for p in index["prompts"]] == [
        (PROMPT, "a-t-shirt", 1, N - 1), (OTHER, "a-digit", copies, N - copies)]
    assert index["prompts"][0]["image"] == str(ws / "train.png") and index["descriptor"] == "pixel_cosine"
    for folder, want in (("a-t-shirt", "samples.npy"), ("a-digit", "other.npy")):
        with np.load(tmp_path / "m" / folder / "data.npz") as z:
            np.testing.assert_array_equal(z["images"], np.load(ws / want))
    other = json.loads((tmp_path / "m" / "a-digit" / "sets.json").read_text())
    assert other["prompt"]["text"] == OTHER and other["forget"]["count"] + other["remain"]["count"] == N
    jsonl = [*base[:i], *base[i + 4:], "--prompts", ws / "prompts.jsonl", "--out", tmp_path / "j"]
    assert _run(jsonl) == 0
    assert sorted(p.name for p in (tmp_path / "j").iterdir()) == ["a-t-shirt", "a-t-shirt-2", "index.json"]


def test_an_interrupted_run_leaves_nothing(ws, tmp_path, monkeypatch):
    import retrack.backends.stable_diffusion as latent

    real, calls = latent.sample_text, []

    def second_fails(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(latent, "sample_text", second_fails)
    base = sets(ws, "--out", tmp_path / "m")
    i = base.index("--prompt")
    assert _run([*base[:i], *base[i + 4:], "--prompts", ws / "prompts.csv"]) == 130
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Bad input: exit 2, one line, nothing written, inputs untouched
# ---------------------------------------------------------------------------------------------


def _without_prompt(w: Path, *extra) -> list:
    base = sets(w, *extra)
    i = base.index("--prompt")
    return base[:i] + base[i + 4:]


CASES = [
    ("pixel-model", lambda w: sets(w, "--model", w / "pixel"), "is an unconditional pixel model"),
    ("model-missing", lambda w: sets(w, "--model", w / "nomodel"), "does not exist"),
    ("sdxl", lambda w: sets(w, "--model", w / "sdxl"), "is a StableDiffusionXLPipeline; supported are"),
    ("image-missing", lambda w: sets(w, "--image", w / "nope.png"), "training image"),
    ("image-broken", lambda w: sets(w, "--image", w / "broken.png"), "could not read image"),
    ("image-without-prompt", lambda w: _without_prompt(w, "--image", w / "train.png"), "needs --prompt and --image"),
    ("prompt-empty", lambda w: sets(w, "--prompt", " "), "--prompt must be a non-empty string"),
    ("samples-0", lambda w: sets(w, "--samples", "0"), "--samples must be an integer ≥ 1, got '0'"),
    ("samples-word", lambda w: sets(w, "--samples", "many"), "--samples must be an integer ≥ 1"),
    ("steps-0", lambda w: sets(w, "--steps", "0"), "--steps must be an integer ≥ 1"),
    ("steps-T", lambda w: sets(w, "--steps", "5000"), "--steps must be in 1..1000 for this model"),
    ("guidance-neg", lambda w: sets(w, "--guidance", "-1"), "--guidance must be a finite number ≥ 0"),
    ("guidance-nan", lambda w: sets(w, "--guidance", "nan"), "--guidance must be a finite number ≥ 0"),
    ("threshold-1", lambda w: sets(w, "--threshold", "1"), "--threshold must be a finite number in [0, 1)"),
    ("threshold-neg", lambda w: sets(w, "--threshold", "-0.1"), "--threshold must be a finite number in [0, 1)"),
    ("threshold-nan", lambda w: sets(w, "--threshold", "nan"), "--threshold must be a finite number"),
    ("rule", lambda w: sets(w, "--rule", "kmeans"), "--rule must be one of threshold, cluster"),
    ("sampler", lambda w: sets(w, "--sampler", "euler"), "--sampler must be one of ddim, ddpm"),
    ("seed-neg", lambda w: sets(w, "--seed", "-1"), "--seed must be an integer in"),
    ("prompts-and-prompt", lambda w: sets(w, "--prompts", w / "prompts.csv"), "--prompts replaces --prompt"),
    ("prompts-missing", lambda w: _without_prompt(w, "--prompts", w / "nope.csv"), "does not exist"),
    ("prompts-column", lambda w: _without_prompt(w, "--prompts", w / "noimage.csv"),
     "has no 'image' column in its header (found: prompt, picture)"),
    ("prompts-key", lambda w: _without_prompt(w, "--prompts", w / "nokey.jsonl"), "line 1 has no 'image'"),
    ("prompts-json", lambda w: _without_prompt(w, "--prompts", w / "bad.jsonl"), "line 1 is not JSON"),
    ("prompts-suffix", lambda w: _without_prompt(w, "--prompts", w / "prompts.txt"), "must be a .csv or .jsonl"),
    ("sscd-not-torchscript", lambda w: sets(w, "--sscd", w / "notes.txt"), "is not a TorchScript module"),
    ("sscd-missing", lambda w: sets(w, "--sscd", w / "sscd.pt"), "sscd descriptor file"),
    ("sscd-other-descriptor", lambda w: sets(w, "--sscd", w / "notes.txt", "--descriptor", "ssim"),
     "does not use it"),
    ("descriptor-no-threshold", lambda w: sets(w, "--descriptor", "ssim"), "has no default copy threshold"),
    ("descriptor-unknown", lambda w: sets(w, "--descriptor", "dino", "--threshold", "0.5"), "is not one of"),
    ("device", lambda w: sets(w, "--device", "tpu"), "--device must be cpu, cuda, cuda:N or mps"),
    ("out-exists", lambda w: sets(w, "--out", w / "exists"), "pass --overwrite"),
    ("out-in-model", lambda w: sets(w, "--out", w / "sd" / "x", "--overwrite"), "overlaps the input"),
    ("out-below-file", lambda w: sets(w, "--out", w / "notes.txt" / "s"), "which is a file"),
]


def tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(path.rglob("*"))}


@pytest.mark.parametrize("name, args, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(name, args, message, ws, capsys):
    before = tree(ws)
    code = _run(args(ws))
    _, err = capsys.readouterr()
    assert code == 2, (code, err)
    assert err.startswith("retrack: error: ") and err.count("\n") == 1, err
    assert message in err and "Traceback" not in err, err
    assert tree(ws) == before


def test_the_python_api_takes_the_flags_names(ws, tmp_path):
    from retrack.errors import UserError
    from retrack.sdsets import sd_sets

    records = sd_sets(str(ws / "sd"), str(tmp_path / "p"), progress=False, prompt=PROMPT, image=str(ws / "train.png"),
                      samples=N, steps=STEPS, device="cpu")
    assert [r["forget"]["indices"] for r in records] == [[PLANTED]]
    with pytest.raises(UserError, match=r"unknown sd-sets setting 'sample' \(did you mean 'samples'\?\)"):
        sd_sets(str(ws / "sd"), str(tmp_path / "q"), prompt=PROMPT, image=str(ws / "train.png"), sample=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]
