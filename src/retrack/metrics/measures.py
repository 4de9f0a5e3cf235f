"""What each built-in metric of `retrack evaluate` measures, on one evaluation run.

Each function takes the run (evaluate.MetricRun: the model under test, its targets, the remain
set, the samples drawn once and shared, the instruments and any second model) and returns the
metric's JSON-able result with the settings it was computed with. They are registered with their
headline value and direction in metrics/registry.py.
"""

from __future__ import annotations

from typing import Any

# Module-qualified calls, so a metric's implementation can be swapped (or patched in tests) where it lives.
from retrack.metrics import likelihood, membership, quality, reference
from retrack.metrics import similarity as descriptors


def nll(run: Any, loaded: Any = None) -> dict[str, Any]:
    c = run.cfg
    bpd = likelihood.nll_bits_per_dim((loaded or run.loaded).denoiser, run.targets, dequantize=c.dequantize,
                           probes=c.probes, seed=c.seed, batch_size=c.batch_size,
                           schedule=c.nll_schedule, progress=run.progress)
    return {"unit": "bits/dim", "mean": float(bpd.mean()), "per_image": bpd.tolist(),
            "settings": {"seed": c.seed, "probes": c.probes, "dequantize": c.dequantize,
                         "offset": likelihood.BPD_OFFSET, "rtol": 1e-5, "atol": 1e-5, "t_start": 1e-5,
                         "divergence": "hutchinson", "schedule": c.nll_schedule}}


def reconstruction(run: Any) -> dict[str, Any]:
    c = run.cfg
    res = descriptors.reconstruction_similarity(run.loaded.denoiser, run.loaded.scheduler_config, run.targets,
                                    run.tools.descriptor, c.t_start, c.seed,
                                    c.batch_size, run.progress)
    out = res.summary()
    out["settings"] = {"seed": c.seed, "descriptor": res.descriptor, "t_start": res.t_start,
                       "sampler": "ddpm"}
    return out


def copies(run: Any) -> dict[str, Any]:
    return {**run.copies().summary(), "targets": run.target_name, "settings": run.sample_settings()}


def similarity(run: Any) -> dict[str, Any]:
    """Each sample's similarity to the most similar target, averaged: with one target, the paper's
    "mean SSCD between the samples and the training image" (higher = remembered)."""
    d = run.tools.descriptor
    per_sample = d.cross(run.samples(), run.targets).max(axis=1)
    return {"mean": float(per_sample.mean()), "descriptor": d.name, "per_sample": per_sample.tolist(),
            "num_samples": len(per_sample), "targets": run.target_name, "num_targets": len(run.targets),
            "settings": run.sample_settings()}


def fid(run: Any) -> dict[str, Any]:
    features = run.instrument("fid_features")
    c, kept = run.cfg, run.kept()
    found = {"real": "remain", "num_real": len(run.remain), "num_generated": len(kept),
             "excluded_copies": int(run.copies().is_copy.sum()), "features": c.fid_features or "inception",
             "settings": run.sample_settings()}
    if len(kept) < 2:
        return {"value": None, "undefined": _too_few(run, "FID", 2), **found}
    if run.tools.fid_reference is None:  # the remain set's features, once for every evaluation
        run.tools.fid_reference = quality.FrechetReference(run.remain, features, c.inception,
                                                   c.batch_size, c.device, run.progress)
    return {"value": run.tools.fid_reference(kept, run.progress), **found}


def inception(run: Any) -> dict[str, Any]:
    classifier = run.instrument("classifier")
    c, kept = run.cfg, run.kept()
    found = {"splits": c.is_splits, "num_generated": len(kept), "excluded_copies": int(run.copies().is_copy.sum()),
             "classifier": c.classifier or "inception", "settings": run.sample_settings()}
    if len(kept) < c.is_splits:
        return {"mean": None, "std": None, "undefined": _too_few(run, "IS", c.is_splits), **found}
    mean, std = quality.inception_score(kept, classifier, c.inception, c.is_splits,
                                c.batch_size, c.device, c.seed, run.progress)
    return {"mean": mean, "std": std, **found}


def _too_few(run: Any, metric: str, needed: int) -> str:
    """Why a quality metric has no value: a destroyed model whose samples all look like the forget
    images leaves nothing to score once the copies are set aside. Undefined, not an error, so an
    experiment over many methods records it and goes on."""
    copies = int(run.copies().is_copy.sum())
    return (f"only {run.cfg.num_samples - copies} of {run.cfg.num_samples} samples are left once the {copies} "
            f"that count as copies of the forget images are set aside; {metric} needs {needed}.")


def clipiqa(run: Any) -> dict[str, Any]:
    c = run.cfg
    value = quality.clip_iqa(run.samples(), c.clip, batch_size=c.batch_size, device=c.device,
                     progress=run.progress)
    return {"mean": value, "prompt": "quality", "num_generated": c.num_samples,
            "settings": run.sample_settings()}


def fid_reference(run: Any) -> dict[str, Any]:
    """FID between this model's samples and the retrained model's, every sample kept: a T-shirt
    the retrained model never draws counts against the model under test."""
    c, features = run.cfg, run.instrument("fid_features")
    value = quality.frechet_distance(run.companion_samples(run.reference), run.samples(), features,
                             c.inception, c.batch_size, c.device, run.progress)
    return {"value": value, "real": "reference model's samples", "reference_model": c.reference_model,
            "num_generated": c.num_samples, "features": c.fid_features or "inception",
            "settings": run.sample_settings()}


def nll_reference(run: Any) -> dict[str, Any]:
    """The forget images' NLL under the retrained model: the value unlearning should reach."""
    return {**nll(run, run.reference), "reference_model": run.cfg.reference_model}


def changed(run: Any) -> dict[str, Any]:
    c = run.cfg
    before = run.companion_samples(run.pretrained)
    out = reference.changed_samples(run.samples(), before, run.find_copies(before).is_copy, c.visible_rms)
    return {**out, "pretrained_model": c.pretrained_model, "settings": run.sample_settings()}


def membership_score(attack: str):
    """The forget images' mean membership score under one attack (metrics/membership.py; lower =
    more like a training image), at the attack's default settings: a forgetting metric like NLL
    that rises as a model forgets. Its calibration against held-out images is `retrack verify`'s."""

    def measure(run: Any) -> dict[str, Any]:
        c = run.cfg
        settings = membership.AttackSettings(seed=c.seed, batch_size=c.batch_size)
        scores = membership.membership_scores(run.loaded.denoiser, run.targets, (attack,), settings,
                                              run.progress, f"membership ({attack})")[attack]
        return {"mean": float(scores.mean()), "per_image": scores.tolist(), "attack": membership.DESCRIPTIONS[attack],
                "lower_is_member": True, "settings": settings.record((attack,))}

    measure.__name__ = f"membership_{attack}"
    return measure
