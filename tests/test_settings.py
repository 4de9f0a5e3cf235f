"""One declaration per setting: the flags, config keys, keywords and run record of a command all
come from its dataclass, and the recipe merge happens in one place."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from retrack.cli import build_parser
from retrack.errors import UserError
from retrack.evaluate import EvaluateConfig
from retrack.flags import given_settings
from retrack.generate import SampleConfig
from retrack.sdsets import SetsConfig
from retrack.training_eval import TrainingEvaluation
from retrack.unlearn_config import UnlearnConfig, UnlearnSettings, config_of
from retrack.validation import config_from_args, flag_of, setting_fields
from retrack.verify import VerifyConfig

REQUIRED = ["--model", "m", "--data", "d.npz", "--forget", "0", "--out", "o"]


def _flags(command: str) -> dict[str, argparse.Action]:
    parser = build_parser([command])
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    return {opt: a for a in sub._actions for opt in a.option_strings if opt.startswith("--") and opt != "--help"}


@pytest.mark.parametrize(("command", "cls", "extra"), [
    ("unlearn", UnlearnConfig, {"--quiet"}),
    ("sample", SampleConfig, {"--quiet"}),
    ("sd-sets", SetsConfig, {"--quiet"}),
    ("verify", VerifyConfig, {"--quiet"}),
    ("evaluate", EvaluateConfig, {"--model", "--data", "--forget", "--out", "--overwrite", "--quiet"}),
])
def test_every_setting_is_exactly_one_flag_and_every_flag_a_setting(command, cls, extra):
    flags = _flags(command)
    declared = {part for key, (_, f) in setting_fields(cls).items() if key != "sample_cache"
                for part in flag_of(f).split("/")}
    assert set(flags) == declared | extra
    for _, f in setting_fields(cls).values():
        for part in flag_of(f).split("/"):
            if part in flags:
                assert flags[part].help, part  # the help is declared with the setting


def test_untyped_flags_give_the_dataclass_defaults_through_the_config():
    args = build_parser(["unlearn"]).parse_args(["unlearn", *REQUIRED])
    cfg = config_of(given_settings(UnlearnConfig, args, args.flag_defaults))
    assert cfg == UnlearnConfig(model="m", data="d.npz", forget="0", out="o")
    assert given_settings(UnlearnConfig, args, args.flag_defaults) == {"model": "m", "data": "d.npz", "forget": "0",
                                                                       "out": "o"}


def test_a_typed_flag_equal_to_its_default_still_overrides_the_recipe():
    args = build_parser(["unlearn"]).parse_args(["unlearn", *REQUIRED, "--recipe", "stable-diffusion",
                                                 "--steps", "50", "--beta2", "0.99"])
    given = given_settings(UnlearnConfig, args, args.flag_defaults)
    assert given["steps"] == "50" and given["betas"] == (0.95, "0.99")
    cfg = config_of(given)
    # typed: steps 50 and (β1 default, β2 typed); the recipe: lr, batch, accumulation, decay; method's λ
    assert (cfg.steps, cfg.betas, cfg.lr, cfg.batch_size, cfg.grad_accum, cfg.weight_decay, cfg.lam) == (
        50, (0.95, 0.99), 1e-5, 16, 16, 1e-2, 0.5)


def test_the_python_keywords_are_the_flags_and_the_recipe_merges_the_same_way():
    from_flags = build_parser(["unlearn"]).parse_args(
        ["unlearn", *REQUIRED, "--recipe", "stable-diffusion", "--eval-every", "3", "--stop-at", "copies=0"])
    cfg = config_of(given_settings(UnlearnConfig, from_flags, from_flags.flag_defaults))
    assert cfg == config_of({"model": "m", "data": "d.npz", "forget": "0", "out": "o", "recipe": "stable-diffusion",
                             "eval_every": 3, "stop_at": "copies=0"})
    assert cfg.evaluation == TrainingEvaluation(every=3, stop_at=("copies", 0.0))
    with pytest.raises(UserError, match="unknown unlearn setting 'eval_evry' \\(did you mean 'eval_every'\\?\\)"):
        config_of({"model": "m", "data": "d", "forget": "0", "out": "o", "eval_evry": 3})


def test_the_evaluation_is_one_nested_group_given_and_recorded_flat():
    cfg = UnlearnConfig.from_settings({"model": "m", "data": "d", "forget": "0", "out": "o", "eval_every": 2,
                                       "eval_metrics": "copies,nll", "eval_samples": 8, "copy_rule": "l2",
                                       "copy_threshold": 7, "eval_clip": "c"})
    assert cfg.evaluation.every == 2 and cfg.evaluation.metrics == ("copies", "nll")
    assert cfg.evaluation.copy_threshold == 7.0 and cfg.evaluation.clip == "c"
    flat = cfg.settings()
    assert list(flat)[:4] == ["model", "data", "forget", "out"]  # required first, as in --help
    assert {k for k in flat if k.startswith("eval_")} == {"eval_every", "eval_metrics", "eval_samples", "eval_steps",
                                                          "eval_seed", "eval_guidance", "eval_target", "eval_clip"}
    assert "evaluation" not in flat and UnlearnConfig.from_settings(flat) == cfg
    ev = cfg.evaluation.evaluate_config("cpu", None)
    assert (ev.metrics, ev.num_samples, ev.steps, ev.copy_threshold, ev.clip) == (("copies", "nll"), 8, 50, 7.0, "c")


def test_evaluation_settings_without_eval_every_are_refused_by_their_flag():
    for key, flag in (("eval_samples", "--eval-samples"), ("copy_rule", "--copy-rule"), ("eval_clip", "--eval-clip")):
        value = {"eval_samples": 4, "copy_rule": "l2", "eval_clip": "c"}[key]
        with pytest.raises(UserError, match=f"^{flag} acts only at evaluations during fine-tuning; add --eval-every N"):
            TrainingEvaluation.from_settings({key: value}).check_inert()


def test_an_experiment_checks_its_runs_settings_without_paths():
    from retrack.unlearn_config import resolve_method

    settings = resolve_method(UnlearnSettings.from_settings({"method": "siss", "seed": 3}), processes=1)
    assert type(settings) is UnlearnSettings and (settings.lam, settings.s) == (0.5, 5.0)
    assert not {"model", "data", "forget", "out"} & set(settings.settings())


def test_evaluate_flags_parse_to_the_config_of_the_same_defaults():
    args = build_parser(["evaluate"]).parse_args(["evaluate", *REQUIRED])
    assert config_from_args(EvaluateConfig, args) == EvaluateConfig()
    args = build_parser(["sample"]).parse_args(["sample", "--model", "m", "--num", "3", "--out", "o.npz"])
    assert config_from_args(SampleConfig, args) == SampleConfig(model="m", num=3, out="o.npz")


def test_only_the_command_run_declares_its_flags():
    parser = build_parser(["sample"])
    choices = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert any(a.dest == "num" for a in choices["sample"]._actions)
    assert not any(a.dest == "steps" for a in choices["unlearn"]._actions)  # listed, not declared
    assert all(f.metadata.get("help") for f in dataclasses.fields(UnlearnSettings) if "nested" not in f.metadata)


@pytest.mark.parametrize(("command", "page"), [("unlearn", "unlearn.md"), ("evaluate", "evaluate.md"),
                                               ("sample", "sample.md"), ("sd-sets", "sd-sets.md"),
                                               ("verify", "verify.md")])
def test_every_flag_is_in_its_reference_page(command, page):
    text = (Path(__file__).parents[1] / "docs" / "commands" / page).read_text()
    missing = [flag for flag in _flags(command) if f"`{flag}" not in text]
    assert not missing, f"docs/commands/{page} does not describe {missing}"
