"""`retrack verify`: is a forgotten image really gone? Membership inference, calibrated against
held-out images, beside the pretrained and the retrained model, and relearning.

For every distinct forget image and every attack (metrics/membership.py) the image's score under
the model is placed among the scores of held-out images the model never saw (the non-members):
its percentile and the one-sided empirical p-value (metrics/calibration.py). The image is
*flagged as a member* by an attack when p ≤ α/m (m attacks, Bonferroni). Per image:
- "not forgotten": some attack flags it under the model under test;
- "forgotten": no attack flags it, and at least one flags it under the pretrained model (so the
  tests had the power to see it there);
- "inconclusive": no attack flags it under the pretrained model either.
Each attack's AUC on a sample of remain images (members) against the non-members says whether it
has power on this model at all (held-out images of another distribution inflate it). With a
retrained model (--reference-model) every score is shown beside the retrained model's, image by
image, and the difference model − retrained is placed among the non-members' differences.
Relearning (relearn.py) follows the membership score, and optionally copies and NLL, while the
model is fine-tuned on the remain set only.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retrack.backends import Backend, detect, load
from retrack.data import ForgetSpec, ImageSet, check_forget_file, image_digest, load_images, parse_forget, split
from retrack.errors import require
from retrack.evaluate import EvaluateConfig, Instruments, measure
from retrack.metrics import calibration
from retrack.metrics.membership import ATTACKS, DESCRIPTIONS, AttackSettings, membership_scores
from retrack.neighbours import default_cache_dir, save_cached_array
from retrack.relearn import Signal, relearn
from retrack.runrecord import atomic_directory, check_output, environment_record, tree_sha256, write_json
from retrack.trainer import TrainSettings
from retrack.unlearn_config import UnlearnConfig
from retrack.validation import (
    POSITIVE_INT,
    SEED,
    Bool,
    Check,
    Choice,
    Device,
    Float,
    Int,
    IntList,
    InvalidValue,
    Optional,
    Text,
    Validated,
    default_device,
    option,
)

VERDICT_FILE = "verdict.json"
RECORD_FILE = "verdict.run.json"
RELEARN_SIGNALS = ("membership", "copies", "nll")
RELEARN_SETTINGS = ("auto", "training", "unlearning")
MIN_AUC_NONMEMBERS = 10


class Names(Check):
    """'loss,pia' or a list: names from `allowed`, each once, in the order given."""

    def __init__(self, *allowed: str) -> None:
        self.allowed = allowed

    def describe(self) -> str:
        return "comma-separated names from " + ", ".join(self.allowed)

    def __call__(self, value: Any, name: str | None = None) -> tuple[str, ...]:
        items = value.split(",") if isinstance(value, str) else list(value) if isinstance(value, list | tuple) else None
        names = [str(v).strip().lower() for v in items or [] if str(v).strip()]
        if not names or any(n not in self.allowed for n in names) or len(set(names)) != len(names):
            raise InvalidValue(f"{name or 'the list'} must be {self.describe()}, each once; got {value!r}.")
        return tuple(names)


_PATH = Optional(Text())


@dataclass(frozen=True)
class VerifyConfig(Validated):
    """Every setting of one verification: the flags of `retrack verify` are generated from these fields."""

    model: str = option(
        Text(),
        help="the unlearned model (diffusers folder)")
    pretrained: str = option(
        Text(),
        help="the model before unlearning")
    data: str = option(
        Text(),
        help="the training data (image folder, .npz, MNIST folder)")
    forget: str = option(
        ForgetSpec(),
        help="'17,42', '@indices.txt', or image files")
    out: str = option(
        Text(),
        help="output folder (verdict.json, verdict.run.json)")
    heldout: str = option(
        Text(),
        help="non-members: images of the model's shape that it never saw, like the forget images (at "
        "least 20, more with several attacks: the message says how many)")
    auc_heldout: str | None = option(
        _PATH, None,
        help="non-members like the remain images (e.g. unseen digits), for each attack's AUC against the "
        "remain members (default: --heldout, whose AUC also measures how unlike the remain images they are)")
    reference_model: str | None = option(
        _PATH, None,
        help="the model retrained without the forget images: its scores beside the model's, image by "
        "image, and the same relearning")
    attacks: tuple[str, ...] = option(
        Names(*ATTACKS), ATTACKS,
        help="membership attacks: loss, secmi, pia")
    alpha: float = option(
        Float(0.0, 1.0, min_open=True, max_open=True), 0.05,
        help="significance of the verdict, over all attacks together")
    members: int = option(
        POSITIVE_INT, 100,
        help="remain images scored as members (each attack's AUC)")
    seed: int = option(
        SEED, 0,
        help="seed of the loss attack's noise, the member sample and relearning")
    batch_size: int = option(
        POSITIVE_INT, 128,
        help="images per forward pass")
    loss_timesteps: tuple[int, ...] = option(
        IntList(Int(min=0)), (100,),
        help="loss attack: timesteps (e.g. 50,100,200)")
    loss_draws: int = option(
        POSITIVE_INT, 4,
        help="loss attack: noise draws per timestep")
    secmi_t: int = option(
        POSITIVE_INT, 100,
        help="SecMI: the timestep whose t-error is measured")
    secmi_k: int = option(
        POSITIVE_INT, 10,
        help="SecMI: the DDIM inversion interval")
    pia_t: int = option(
        POSITIVE_INT, 200,
        help="PIA: the timestep")
    pia_p: float = option(
        Float(0.0, min_open=True), 4.0,
        help="PIA: the norm's p")
    relearn_steps: int = option(
        Int(min=0), 0,
        help="fine-tune on the remain set only for this many steps (0: no relearning)")
    eval_every: int = option(
        POSITIVE_INT, 10,
        help="relearning: measure every N steps")
    relearn_signals: tuple[str, ...] = option(
        Names(*RELEARN_SIGNALS), ("membership",),
        help="relearning: membership (the first attack's score of the forget images), copies, nll")
    relearn_fraction: float = option(
        Float(0.0, 1.0, min_open=True), 0.9,
        help="a signal has returned once it has covered this fraction of the way to the pretrained "
        "model's value")
    relearn_settings: str = option(
        Choice(*RELEARN_SETTINGS), "auto",
        help="relearning optimiser: training (the pretrained model's own training settings, from the "
        "provenance.json retrack pretrain writes: a relearning attack), unlearning (the unlearning run's, "
        "a gentle fine-tune), auto (training where recorded, else unlearning)")
    relearn_lr: float | None = option(
        Optional(Float(0.0, min_open=True)), None,
        help="relearning learning rate (default: from --relearn-settings)")
    relearn_batch_size: int | None = option(
        Optional(POSITIVE_INT), None,
        help="relearning batch (default: from --relearn-settings)")
    relearn_with: str | None = option(
        _PATH, None,
        help="relearning: images added to the remain set, related to the forget images but not them (e.g. "
        "unseen images of their class, disjoint from --heldout): a relearning attack with auxiliary data, "
        "as DiMRA; checked like --heldout")
    relearn_reference: bool = option(
        Bool(), True,
        help="also relearn the --reference-model (false: only the model, e.g. when the retrained model's "
        "relearning is already known from an earlier verification)")
    relearn_samples: int = option(
        POSITIVE_INT, 256,
        help="relearning with copies: samples per evaluation")
    relearn_sampling_steps: int = option(
        POSITIVE_INT, 50,
        help="relearning with copies: DDIM steps")
    device: str | None = option(
        Optional(Device()), None,
        help="torch device (default: cuda if available, else cpu)")
    overwrite: bool = option(
        Bool(), False,
        help="replace an existing --out")

    @property
    def attack_settings(self) -> AttackSettings:
        return AttackSettings(tuple(self.loss_timesteps), self.loss_draws, self.secmi_t, self.secmi_k, self.pia_t,
                              self.pia_p, self.seed, self.batch_size)


def resolve_verify(cfg: VerifyConfig) -> VerifyConfig:
    """Everything checkable before data or a model loads: paths, families, the output."""

    for flag, path in (("--model", cfg.model), ("--pretrained", cfg.pretrained),
                       ("--reference-model", cfg.reference_model)):
        if path is not None:
            detect(path, None, flag)
    require(Path(cfg.data).exists(), f"--data: data path {cfg.data!r} does not exist.")
    require(Path(cfg.heldout).exists(), f"--heldout: held-out images {cfg.heldout!r} do not exist.")
    for flag, path in (("--auc-heldout", cfg.auc_heldout), ("--relearn-with", cfg.relearn_with)):
        require(path is None or Path(path).exists(), f"{flag}: images {path!r} do not exist.")
    require(cfg.relearn_settings != "training" or cfg.relearn_steps == 0 or training_settings(cfg.pretrained),
            f"--relearn-settings training: {cfg.pretrained!r} records no training settings (the provenance.json "
            "that retrack pretrain writes); pass --relearn-settings unlearning or --relearn-lr and "
            "--relearn-batch-size.")
    check_forget_file(cfg.forget)
    calibration.needed_nonmembers(cfg.alpha, len(cfg.attacks))
    inputs = [Path(p) for p in (cfg.model, cfg.pretrained, cfg.data, cfg.heldout, cfg.auc_heldout,
                                cfg.relearn_with, cfg.reference_model)
              if p is not None and Path(p).exists()]
    check_output(Path(cfg.out), cfg.overwrite, inputs)
    return replace(cfg, device=default_device(cfg.device))


# ---------------------------------------------------------------------------------------------
# The images: distinct forget images, a sample of members, the non-members
# ---------------------------------------------------------------------------------------------


@dataclass
class Images:
    forget: np.ndarray  # distinct forget images, uint8 (F, H, W, C)
    forget_indices: list[list[int]]  # the data indices of each
    members: np.ndarray
    member_indices: np.ndarray
    nonmembers: np.ndarray
    remain: np.ndarray  # every remain image (relearning)
    auc_nonmembers: np.ndarray | None = None  # --auc-heldout: non-members like the remain images
    relearn_with: np.ndarray | None = None  # --relearn-with: added to the remain set for relearning


def gather_images(cfg: VerifyConfig, data: ImageSet, heldout: ImageSet, shape: tuple[int, int, int],
                  auc_heldout: ImageSet | None = None, relearn_with: ImageSet | None = None) -> Images:
    """The sets, checked: shapes, enough non-members, no held-out image that was trained on."""
    require(data.shape == shape, f"the --data images are {_fmt(data.shape)} (C×H×W) but the model takes "
                                 f"{_fmt(shape)}.")
    calibration.check_nonmembers(len(heldout), cfg.alpha, len(cfg.attacks))
    parts = split(data, parse_forget(cfg.forget, data))
    digests = data.image_digests()
    forget_of: dict[str, list[int]] = {}
    for i in parts.forget:
        forget_of.setdefault(digests[i], []).append(int(i))
    trained = set(digests[i] for i in parts.remain)
    for flag, held in (("--heldout", heldout), ("--auc-heldout", auc_heldout), ("--relearn-with", relearn_with)):
        if held is not None:
            _check_nonmembers(flag, held, shape, forget_of, trained)
    if relearn_with is not None:
        tested = set(heldout.image_digests())
        require(not any(d in tested for d in relearn_with.image_digests()),
                "an image of --relearn-with is also in --heldout: the images the forget images are compared with "
                "after relearning must stay unseen; give disjoint sets.")
    require(auc_heldout is None or len(auc_heldout) >= MIN_AUC_NONMEMBERS,
            f"--auc-heldout gives {len(auc_heldout or [])} images; an AUC needs at least {MIN_AUC_NONMEMBERS}.")
    firsts = [v[0] for v in forget_of.values()]
    rng = np.random.default_rng(cfg.seed)
    n = min(cfg.members, len(parts.remain))
    member_indices = np.sort(rng.choice(parts.remain, size=n, replace=False))
    return Images(data.images[firsts], list(forget_of.values()), data.images[member_indices], member_indices,
                  heldout.images, data.images[parts.remain],
                  None if auc_heldout is None else auc_heldout.images,
                  None if relearn_with is None else relearn_with.images)


def _check_nonmembers(flag: str, held: ImageSet, shape: tuple[int, int, int], forget_of: dict[str, list[int]],
                      trained: set[str]) -> None:
    """Non-members are of the model's shape, and neither a forget image nor a training image."""
    require(held.shape == shape, f"the {flag} images are {_fmt(held.shape)} (C×H×W) but the model takes "
                                 f"{_fmt(shape)}; give held-out images of the model's shape.")
    for j, d in enumerate(held.image_digests()):
        require(d not in forget_of, f"held-out image {j} of {flag} is also a forget image (data index "
                                    f"{forget_of.get(d, [0])[0]}); a non-member cannot be one of the images tested.")
        require(d not in trained, f"held-out image {j} of {flag} occurs in --data (a training image), so it is "
                                  "no non-member; remove it.")


def _fmt(shape: tuple[int, ...]) -> str:
    return "×".join(str(s) for s in shape)


# ---------------------------------------------------------------------------------------------
# Scores and the verdict
# ---------------------------------------------------------------------------------------------


def score_model(model: Backend, images: Images, cfg: VerifyConfig, progress: bool, name: str) -> dict[str, dict]:
    """{set: {attack: scores}} for the forget images, members and non-members under one model.

    Scores of a local model folder are cached by the folder's content, the images and the attack
    settings: verifying several unlearned models against the same pretrained and retrained models
    scores those once."""
    s = cfg.attack_settings
    weights = tree_sha256(Path(model.source)) if Path(model.source).is_dir() else None
    out = {}
    for part in ("forget", "members", "nonmembers", "auc_nonmembers"):
        rows = getattr(images, part)
        if rows is None:
            continue
        path = None if weights is None else _cache_path(weights, rows, cfg, str(model.device))
        cached = _read_scores(path, len(rows), len(cfg.attacks))
        if cached is None:
            found = membership_scores(model.denoiser, rows, cfg.attacks, s, progress, f"{name}: {part}")
            if path is not None:
                save_cached_array(path, np.stack([found[a] for a in cfg.attacks], axis=1))
        else:
            found = {a: cached[:, j] for j, a in enumerate(cfg.attacks)}
        out[part] = found
    return out


def _cache_path(weights: str, rows: np.ndarray, cfg: VerifyConfig, device: str) -> Path:
    h = hashlib.sha256(json.dumps({"v": 1, "weights": weights, "attacks": cfg.attacks, "device": device,
                                   "settings": cfg.attack_settings.record(cfg.attacks),
                                   "shape": list(rows.shape)}, sort_keys=True).encode())
    h.update(np.ascontiguousarray(rows).data)
    return default_cache_dir().parent / "membership" / f"scores-{h.hexdigest()[:32]}.npy"


def _read_scores(path: Path | None, n: int, attacks: int) -> np.ndarray | None:
    """A cached (n, attacks) float64 array, or None (missing, damaged or foreign: recomputed)."""
    if path is None or not path.is_file():
        return None
    try:
        found = np.load(path, allow_pickle=False)
    except Exception:  # noqa: BLE001 - a damaged entry only costs recomputation
        return None
    ok = found.dtype == np.float64 and found.shape == (n, attacks) and bool(np.isfinite(found).all())
    return found if ok else None


def judge(scores: dict[str, dict[str, dict[str, np.ndarray]]], images: Images, cfg: VerifyConfig) -> dict[str, Any]:
    """The verdict from the scores of each model ('model', 'pretrained', optionally 'reference')."""
    m = len(cfg.attacks)
    level = cfg.alpha / m
    per_image = []
    for i, indices in enumerate(images.forget_indices):
        entry: dict[str, Any] = {"data_indices": indices, "digest": image_digest(images.forget[i])}
        flagged: dict[str, list[str]] = {}
        for who, by in scores.items():
            tests = {a: calibration.test_image(by["forget"][a][i], by["nonmembers"][a], level) for a in cfg.attacks}
            entry[who] = tests
            flagged[who] = [a for a in cfg.attacks if tests[a]["member"]]
        if "reference" in scores:
            entry["model_minus_reference"] = {a: _difference_test(scores, a, i, level) for a in cfg.attacks}
        if flagged["model"]:
            verdict, why = "not forgotten", f"behaves as a member under {', '.join(flagged['model'])}"
        elif flagged["pretrained"]:
            verdict, why = "forgotten", ("behaves as a non-member under every attack; the pretrained model is "
                                         f"flagged by {', '.join(flagged['pretrained'])}")
        else:
            verdict, why = "inconclusive", ("no attack flags it under the pretrained model either, so the tests "
                                            "cannot tell here")
        over = [a for a in cfg.attacks if entry["model"][a]["p_unfamiliar"] <= level]
        entry.update({"verdict": verdict, "why": why, "flagged_by": flagged["model"],
                      "pretrained_flagged_by": flagged["pretrained"],
                      "reference_flagged_by": flagged.get("reference"), "less_familiar_than_nonmembers": over})
        per_image.append(entry)
    attacks = {}
    auc_part = "auc_nonmembers" if images.auc_nonmembers is not None else "nonmembers"
    for a in cfg.attacks:
        attacks[a] = {"description": DESCRIPTIONS[a], "lower_is_member": True,
                      "auc": {who: calibration.auc(by["members"][a], by[auc_part][a]) for who, by in scores.items()},
                      "auc_against": "--auc-heldout" if auc_part == "auc_nonmembers" else "--heldout",
                      "members": {who: calibration.distribution(by["members"][a]) for who, by in scores.items()},
                      "nonmembers": {who: calibration.distribution(by["nonmembers"][a])
                                     for who, by in scores.items()},
                      "forget": {who: by["forget"][a].tolist() for who, by in scores.items()}}
        if auc_part == "auc_nonmembers":
            attacks[a]["auc_vs_heldout"] = {who: calibration.auc(by["members"][a], by["nonmembers"][a])
                                            for who, by in scores.items()}
            attacks[a]["auc_nonmembers"] = {who: calibration.distribution(by["auc_nonmembers"][a])
                                            for who, by in scores.items()}
    return {"alpha": cfg.alpha, "tests": m, "level": level, "correction": "Bonferroni over the attacks",
            "images": per_image, "attacks": attacks}


def _difference_test(scores: dict, attack: str, i: int, level: float) -> dict[str, float | bool]:
    """score(model) − score(retrained) of the image among the same differences of the non-members:
    low when the model finds the image more familiar than the retrained model does, relative to
    how the two models differ on images neither saw."""
    d = scores["model"]["forget"][attack][i] - scores["reference"]["forget"][attack][i]
    null = scores["model"]["nonmembers"][attack] - scores["reference"]["nonmembers"][attack]
    return calibration.test_image(d, null, level)


def summary_sentence(result: dict[str, Any], relearning: dict[str, Any] | None) -> str:
    images = result["images"]
    n = len(images)
    counts = {v: sum(e["verdict"] == v for e in images) for v in ("forgotten", "not forgotten", "inconclusive")}
    head = (f"{counts['forgotten']} of {n} forget image{'s' if n != 1 else ''} behave{'s' if n == 1 else ''} as "
            f"a non-member under every attack ({', '.join(result['attacks'])}; α = {result['alpha']:g}, "
            f"each attack at {result['level']:.3g})")
    parts = [head]
    if counts["not forgotten"]:
        parts.append(f"{counts['not forgotten']} still behave{'s' if counts['not forgotten'] == 1 else ''} "
                     "as a member")
    if counts["inconclusive"]:
        parts.append(f"{counts['inconclusive']} {'is' if counts['inconclusive'] == 1 else 'are'} inconclusive "
                     "(not flagged under the pretrained model either)")
    sentence = "; ".join(parts) + "."
    if relearning is not None:
        sentence += " " + _relearn_sentence(relearning)
    return sentence


def _relearn_sentence(relearning: dict[str, Any]) -> str:
    out = []
    for who, rec in relearning.items():
        if not isinstance(rec, dict) or "signals" not in rec:
            continue
        back = [f"{name} after {s['returned_at']} steps" for name, s in rec["signals"].items()
                if s["returned_at"] is not None]
        never = [name for name, s in rec["signals"].items() if s["returned_at"] is None]
        label = "the model" if who == "model" else "the retrained model"
        how = rec["settings"]
        kinds = {"training": "the pretrained model's training settings", "unlearning": "the unlearning settings"}
        kind = kinds.get(relearning.get("settings_kind"), "the given settings")
        added = (relearning.get("data") or {}).get("added")
        data = f"the remain set and {added} --relearn-with images" if added else "the remain set"
        text = f"relearning {label} on {data} at {kind} (lr {how['lr']:g}, batch {how['batch_size']}): "
        text += ", ".join(back) + " back to the pretrained level" if back else "nothing back to the pretrained level"
        if never:
            text += f" ({', '.join(never)} not within {rec['steps_done']} steps)" if back else \
                f" within {rec['steps_done']} steps"
        after = rec.get("after")
        if after:
            flagged, n = sum(t["member"] for t in after["images"]), len(after["images"])
            text += (f", after which {flagged} of {n} forget image{'s are' if n != 1 else ' is'} flagged as a "
                     f"member again by {after['attack']}")
        out.append(text)
    return ("Relearning: " + "; ".join(out) + ".") if out else ""


# ---------------------------------------------------------------------------------------------
# Relearning
# ---------------------------------------------------------------------------------------------


def training_settings(pretrained: str) -> dict[str, Any] | None:
    """The optimiser settings the pretrained model was trained with, from the provenance.json that
    `retrack pretrain` writes (AdamW with torch's betas, gradients clipped to norm 1), else None."""
    try:
        found = json.loads((Path(pretrained) / "provenance.json").read_text())["config"]
        return {"batch_size": int(found["batch_size"]), "lr": float(found["lr"]), "betas": (0.9, 0.999),
                "weight_decay": float(found.get("weight_decay", 0.0)), "clip": 1.0}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def relearn_settings(cfg: VerifyConfig) -> tuple[TrainSettings, dict[str, Any]]:
    """The optimiser of relearning: the pretrained model's training settings (a relearning attack at
    the strength that taught the model the image), or the unlearning run's (its retrack_run.json, else
    the unlearning defaults), per --relearn-settings; --relearn-lr and --relearn-batch-size override."""

    trained = None if cfg.relearn_settings == "unlearning" else training_settings(cfg.pretrained)
    if trained is not None:
        settings = _train_settings(cfg, trained)
        return settings, {"settings_from": str(Path(cfg.pretrained) / "provenance.json"),
                          "settings_kind": "training"}
    record = Path(cfg.model) / "retrack_run.json"
    base = {f: UnlearnConfig.__dataclass_fields__[f].default
            for f in ("batch_size", "lr", "betas", "weight_decay", "clip")}
    source = "unlearning defaults"
    if record.is_file():
        try:
            found = json.loads(record.read_text())["config"]
            base.update({k: found[k] for k in base if k in found})
            source = str(record)
        except (ValueError, KeyError, TypeError):
            pass
    return _train_settings(cfg, base), {"settings_from": source, "settings_kind": "unlearning"}


def _train_settings(cfg: VerifyConfig, base: dict[str, Any]) -> TrainSettings:
    lr = cfg.relearn_lr if cfg.relearn_lr is not None else base["lr"]
    batch = cfg.relearn_batch_size if cfg.relearn_batch_size is not None else base["batch_size"]
    return TrainSettings(steps=cfg.relearn_steps, batch_size=int(batch), lr=float(lr), betas=tuple(base["betas"]),
                         weight_decay=float(base["weight_decay"]), clip=float(base["clip"]), seed=cfg.seed)


def _signals(cfg: VerifyConfig, model: Backend, pretrained: Backend, images: Images,
             pretrained_levels: dict[str, float]) -> list[Signal]:

    out = []
    attack = cfg.attacks[0]
    s = cfg.attack_settings
    for name in cfg.relearn_signals:
        if name == "membership":
            def value(m: Backend = model) -> float:
                return float(membership_scores(m.denoiser, images.forget, (attack,), s)[attack].mean())

            out.append(Signal(f"membership_{attack}", value, pretrained_levels["membership"], True))
            continue
        ecfg = EvaluateConfig(metrics=(name,), seed=cfg.seed, num_samples=cfg.relearn_samples,
                              steps=cfg.relearn_sampling_steps, batch_size=cfg.batch_size,
                              copy_threshold=10.0 if name == "copies" else None, device=cfg.device)

        def value(m: Backend = model, e: EvaluateConfig = ecfg, n: str = name) -> float:
            res = measure(e, m, images.forget, images.remain[:0], Instruments(), False)[n]
            return float(res["fraction"] if n == "copies" else res["mean"])

        out.append(Signal(name, value, pretrained_levels[name], name != "copies"))
    return out


def _levels(cfg: VerifyConfig, pretrained: Backend, images: Images, scores: dict) -> dict[str, float]:
    """The pretrained model's value of each relearning signal."""
    levels = {"membership": float(scores["pretrained"]["forget"][cfg.attacks[0]].mean())}
    dummy = [s for s in _signals(cfg, pretrained, pretrained, images, {**levels, "copies": 0.0, "nll": 0.0})
             if s.name in ("copies", "nll")]
    with torch.no_grad():
        for s in dummy:
            levels[s.name] = s.measure()
    return levels


def run_relearning(cfg: VerifyConfig, loaded: dict[str, Backend], images: Images, scores: dict,
                   progress: bool) -> dict[str, Any]:
    settings, provenance = relearn_settings(cfg)
    levels = _levels(cfg, loaded["pretrained"], images, scores)
    rows = images.remain if images.relearn_with is None else np.concatenate([images.remain, images.relearn_with])
    remain = torch.from_numpy(np.ascontiguousarray(rows.transpose(0, 3, 1, 2)))
    out: dict[str, Any] = {"pretrained_levels": levels, **provenance,
                           "data": {"remain": len(images.remain), "added": 0 if images.relearn_with is None
                                    else len(images.relearn_with), "added_from": cfg.relearn_with}}
    for who in ("model", "reference"):
        if who not in loaded or (who == "reference" and not cfg.relearn_reference):
            continue
        model = loaded[who]
        signals = _signals(cfg, model, loaded["pretrained"], images, levels)
        start = time.perf_counter()
        out[who] = relearn(model.denoiser, remain, settings, cfg.eval_every, signals, cfg.relearn_fraction,
                           cfg.device, progress)
        out[who]["seconds"] = round(time.perf_counter() - start, 1)
        out[who]["after"] = after_relearning(cfg, model, images)
    return out


def after_relearning(cfg: VerifyConfig, model: Backend, images: Images) -> dict[str, Any]:
    """The first attack's test of each forget image under the relearned model, among the
    non-members' scores under the same model: is it flagged as a member again?"""
    attack, s = cfg.attacks[0], cfg.attack_settings
    forget = membership_scores(model.denoiser, images.forget, (attack,), s)[attack]
    null = membership_scores(model.denoiser, images.nonmembers, (attack,), s)[attack]
    level = cfg.alpha / len(cfg.attacks)
    return {"attack": attack, "images": [calibration.test_image(x, null, level) for x in forget]}


# ---------------------------------------------------------------------------------------------
# One verification
# ---------------------------------------------------------------------------------------------


def verify(model: str, pretrained: str, data: str, forget: str, heldout: str, out: str, progress: bool = True,
           **settings: Any) -> dict[str, Any]:
    """Verify that the `forget` images of `data` are forgotten by `model`; writes `out`/verdict.json
    and its run record, and returns the verdict. Settings: any field of VerifyConfig."""
    VerifyConfig.check_keys(settings, "verify setting")
    cfg = resolve_verify(VerifyConfig(model=model, pretrained=pretrained, data=data, forget=forget,
                                      heldout=heldout, out=out, **settings))
    return run_verify(cfg, progress)


def run_verify(cfg: VerifyConfig, progress: bool = True) -> dict[str, Any]:
    """The expensive part, on a resolved config; nothing is written unless it all succeeds."""
    start = time.perf_counter()
    data, held = load_images(cfg.data), load_images(cfg.heldout)
    auc_held = None if cfg.auc_heldout is None else load_images(cfg.auc_heldout)
    extra = None if cfg.relearn_with is None else load_images(cfg.relearn_with)
    loaded = {"model": load(cfg.model, cfg.device), "pretrained": load(cfg.pretrained, cfg.device)}
    shape = loaded["model"].denoiser.sample_shape
    require(not loaded["model"].resizes_images and loaded["model"].training_space(data, None, False).rows.dtype
            == np.uint8, "retrack verify measures pixel models (their data are the images themselves).")
    for flag, who in (("--pretrained", "pretrained"), ("--reference-model", "reference")):
        if who == "reference":
            if cfg.reference_model is None:
                continue
            loaded[who] = load(cfg.reference_model, cfg.device)
        got = loaded[who].denoiser.sample_shape
        require(got == shape, f"{flag} makes {_fmt(got)} images (C×H×W) but --model makes {_fmt(shape)}; "
                              f"pass a {flag} of the same shape.")
    for m in loaded.values():
        cfg.attack_settings.check(m.num_timesteps, cfg.attacks)
    images = gather_images(cfg, data, held, shape, auc_held, extra)
    require(cfg.relearn_steps == 0 or "copies" not in cfg.relearn_signals or shape == (1, 28, 28),
            "relearning with copies counts them by the paper's L2 rule, set for 1×28×28 images; leave copies "
            "out of --relearn-signals for other sizes.")
    scores = {who: score_model(m, images, cfg, progress, who) for who, m in loaded.items()}
    result = judge(scores, images, cfg)
    relearning = run_relearning(cfg, loaded, images, scores, progress) if cfg.relearn_steps > 0 else None
    verdict = {"summary": summary_sentence(result, relearning),
               "verdict": _overall(result["images"]),
               "model": cfg.model, "pretrained": cfg.pretrained, "reference_model": cfg.reference_model,
               **result,
               "members": {"n": len(images.member_indices), "source": "remain images of --data",
                           "indices": images.member_indices.tolist()},
               "nonmembers": {"n": len(images.nonmembers), "source": cfg.heldout, "digest": held.digest()},
               "auc_nonmembers": None if auc_held is None else {"n": len(auc_held), "source": cfg.auc_heldout,
                                                                  "digest": auc_held.digest()},
               "relearning": relearning,
               "settings": {"attacks": cfg.attack_settings.record(cfg.attacks), "alpha": cfg.alpha,
                            "members": cfg.members, "batch_size": cfg.batch_size},
               "seconds": round(time.perf_counter() - start, 1)}
    record = environment_record(cfg, data={"source": data.source, "digest": data.digest(), "size": len(data)},
                                heldout={"source": held.source, "digest": held.digest(), "size": len(held)},
                                auc_heldout=None if auc_held is None else {"source": auc_held.source,
                                                                           "digest": auc_held.digest(),
                                                                           "size": len(auc_held)},
                                models={who: tree_sha256(Path(m.source)) for who, m in loaded.items()
                                        if Path(m.source).is_dir()})
    with atomic_directory(Path(cfg.out)) as tmp:
        write_json(tmp / VERDICT_FILE, verdict)
        write_json(tmp / RECORD_FILE, record)
    return verdict


def _overall(images: list[dict[str, Any]]) -> str:
    verdicts = {e["verdict"] for e in images}
    if "not forgotten" in verdicts:
        return "not forgotten"
    return "forgotten" if verdicts == {"forgotten"} else "inconclusive"
