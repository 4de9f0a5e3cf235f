"""The shared parser of every flag and config key: exact values in, one-sentence errors out."""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import pytest

from retrack.errors import UserError
from retrack.validation import (
    SEED,
    SEED_MAX,
    Bool,
    Choice,
    Either,
    Float,
    Int,
    IntList,
    InvalidValue,
    Optional,
    Pair,
    Validated,
    check_output,
    load_yaml,
    option,
    parse_int_text,
    parse_seeds,
    read_text,
)


@pytest.mark.parametrize("check, raw, want", [
    (Int(min=1), "5", 5), (Int(min=1), " +7 ", 7), (Int(), "-3", -3), (Int(min=1), np.int64(4), 4),
    (Int(), 6.0, 6), (SEED, str(SEED_MAX), SEED_MAX), (Float(0, None, True), "1e-3", 1e-3),
    (Float(0, 1, max_open=True), ".5", 0.5), (Float(), np.float32(0.25), 0.25), (Float(), 3, 3.0),
    (Choice("ddpm", "ddim"), " ddim", "ddim"), (Either(Choice("all"), Int(min=1)), "all", "all"),
    (Either(Choice("all"), Int(min=1)), "10", 10), (Optional(Int()), None, None), (Bool(), "yes", True),
    (Bool(), False, False), (Pair(Float(0, 1, max_open=True)), "0.9,0.999", (0.9, 0.999)),
    (IntList(SEED), "0-3,7", [0, 1, 2, 3, 7]), (IntList(SEED), [2, 1], [2, 1]), (IntList(SEED), "4", [4]),
])
def test_accepts_and_converts(check, raw, want):
    assert check(raw, "--x") == want


@pytest.mark.parametrize("check, raw, message", [
    (Int(min=1), "0", "--x must be an integer ≥ 1, got '0'."),
    (Int(min=1), "٣", "--x must be an integer ≥ 1, got '٣'."),  # int() would accept Arabic-Indic digits
    (Int(min=1), "³", "--x must be an integer ≥ 1, got '³'."),  # isdigit() is True, int() raises
    (Int(min=1), "--3", "--x must be an integer ≥ 1, got '--3'."),
    (Int(), "1_000", "--x must be an integer, got '1_000'."),
    (Int(), True, "--x must be an integer, got True."),
    (Int(), 2.5, "--x must be an integer, got 2.5."),
    (SEED, str(2**64), f"--x must be an integer in [0, {SEED_MAX}], got '{2**64}'."),
    (SEED, -1, f"--x must be an integer in [0, {SEED_MAX}], got -1."),
    (Float(0, None, True), "inf", "--x must be a finite number > 0, got 'inf'."),
    (Float(), "nan", "--x must be a finite number, got 'nan'."),
    (Float(), "1e999", "--x must be a finite number, got '1e999'."),
    (Float(), "١.٥", "--x must be a finite number, got '١.٥'."),
    (Float(0, 1, max_open=True), 1.0, "--x must be a finite number in [0, 1), got 1.0."),
    (Float(0), -0.1, "--x must be a finite number ≥ 0, got -0.1."),
    (Choice("ddpm", "ddim"), "DDIM", "--x must be one of ddpm, ddim, got 'DDIM'."),
    (Either(Choice("all"), Int(min=1)), "0", "--x must be 'all' or an integer ≥ 1, got '0'."),
    (Bool(), "maybe", "--x must be true or false, got 'maybe'."),
    (Pair(Float()), "0.9", "--x must be two values, each a finite number, got '0.9'."),
    (IntList(SEED), "3-1", "--x '3-1' runs backwards; write 1-3."),
    (IntList(SEED), "0,2,0", "--x '0,2,0' names 0 twice."),
    (IntList(SEED), "", "--x must be a list like 0-9 or 0,3,5 of values, each an integer in "
                        "[0, 18446744073709551615], got ''."),
    (IntList(SEED), "0-200000", "--x '0-200000' holds more than 100000 values."),
])
def test_rejects_with_one_sentence(check, raw, message):
    with pytest.raises(InvalidValue) as e:
        check(raw, "--x")
    assert str(e.value) == message


def test_is_an_argparse_type_naming_the_flag(capsys):
    p = argparse.ArgumentParser(prog="t", exit_on_error=False)
    p.add_argument("--steps", type=Int(min=1))
    assert p.parse_args(["--steps", "3"]).steps == 3
    with pytest.raises(argparse.ArgumentError) as e:
        p.parse_args(["--steps", "0"])
    assert str(e.value) == "argument --steps: must be an integer ≥ 1, got '0'."


def test_parse_int_text_never_raises():
    assert [parse_int_text(t) for t in ("12", " -3", "--3", "٣", "3.0", "")] == [12, -3, None, None, None, None]
    assert parse_seeds("0-2") == [0, 1, 2]


@dataclasses.dataclass(frozen=True)
class _Cfg(Validated):
    steps: int = option(Int(min=1), 5)
    lr: float = option(Float(0, None, min_open=True), 1e-3)
    sampler: str = option(Choice("ddpm", "ddim"), "ddim", flag="--sampling")


def test_config_dataclass_checks_every_field_and_names_yaml_keys():
    assert _Cfg(steps="7") == _Cfg(steps=7)
    with pytest.raises(UserError, match=r"^--sampling must be one of ddpm, ddim, got 'x'\.$"):
        _Cfg(sampler="x")
    assert _Cfg.from_mapping({"lr": "2e-3"}, "train: of e.yaml") == _Cfg(lr=2e-3)
    with pytest.raises(UserError, match=r"^unknown key 'lrr' in train: of e.yaml \(did you mean 'lr'\?\)\.$"):
        _Cfg.from_mapping({"lrr": 1}, "train: of e.yaml")
    with pytest.raises(UserError, match=r"^'steps' in train: of e.yaml must be an integer ≥ 1, got 0\.$"):
        _Cfg.from_mapping({"steps": 0}, "train: of e.yaml")
    with pytest.raises(UserError, match="must be a mapping of keys to values, got list"):
        _Cfg.from_mapping([1], "train: of e.yaml")
    with pytest.raises(UserError, match=r"unknown setting 'stepz' \(did you mean 'steps'\?\)"):
        _Cfg.check_keys(["steps", "stepz"])


def test_check_output_probes_without_leaving_anything(tmp_path):
    (tmp_path / "file").write_text("x")
    assert check_output(tmp_path / "new" / "deeper" / "o", "--out") == tmp_path / "new" / "deeper" / "o"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
    with pytest.raises(UserError, match="which is a file"):
        check_output(tmp_path / "file" / "o", "--out")
    with pytest.raises(UserError, match="cannot be written"):
        check_output("/proc/retrack-never/o", "--out")
    with pytest.raises(UserError, match="pass --overwrite"):
        check_output(tmp_path / "file", "--out")
    with pytest.raises(UserError, match="overlaps the input"):
        check_output(tmp_path / "in" / "o", "--out", protected=[tmp_path / "in"])
    with pytest.raises(UserError, match=r"--grid must end in \.png"):
        check_output(tmp_path / "g.jpg", "--grid", suffix=".png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_text_loaders_name_the_file(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe1\n")
    with pytest.raises(UserError, match=r"^forget index file '.*bad.txt' is not UTF-8 text \(byte 0\)\.$"):
        read_text(bad, "forget index file")
    y = tmp_path / "c.yaml"
    y.write_text("a: [1, 2\nb: 3\n")
    with pytest.raises(UserError, match=r"^recipe '.*c.yaml' is not valid YAML at line 2, column 2"):
        load_yaml(y, "recipe")
