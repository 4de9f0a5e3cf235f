"""`retrack evaluate`: the paper's metrics of one model for one forget set, into metrics.json.

Its flags are generated from `EvaluateConfig` (each setting declared once there, with its default,
check and help); this file adds what the evaluation reads and writes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from retrack.evaluate import EvaluateConfig, check_inputs, family_for, resolved, run_evaluate
from retrack.flags import add_flags
from retrack.metrics import registry
from retrack.runrecord import check_output, environment_record, write_json
from retrack.validation import config_from_args


def register(sub: argparse._SubParsersAction, help: str) -> None:
    p = sub.add_parser(
        "evaluate", help=help,
        description="Compute the paper's metrics for the --forget images of --data and write one "
        "JSON object keyed by metric name, each with the settings it was computed with. Every "
        "weight file (SSCD, Inception, CLIP, classifiers) is a local path: nothing is downloaded.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True,
                   help="diffusers pipeline folder, bare UNet folder, or hub id")
    p.add_argument("--data", required=True,
                   help="image folder, .npz with 'images', or MNIST/CIFAR folder")
    p.add_argument("--forget", required=True, help="'17,42', '@indices.txt', or image files")
    p.add_argument("--out", required=True, help="output JSON file (.json; its run record goes beside it)")
    add_flags(p, EvaluateConfig, skip=("sample_cache",))
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(EvaluateConfig, args)
    cfg = resolved(cfg, family_for(args.model, cfg.prompt))
    forget = check_inputs(args.data, args.forget)
    out = Path(args.out)
    record = out.with_name(out.stem + ".run.json")
    inputs = [Path(p) for p in (args.model, args.data) if Path(p).exists()]
    check_output(out, args.overwrite, inputs, suffix=".json")
    check_output(record, args.overwrite, inputs)
    results = run_evaluate(args.model, args.data, forget, cfg, progress=not args.quiet)
    write_json(out, results)
    write_json(record, environment_record(cfg, model=args.model, data=args.data, forget=args.forget))
    for name, res in results.items():
        print(f"{name:>15}: {_headline(name, res)}")
    print(f"wrote {out}")
    return 0


def _headline(name: str, res: dict) -> str:
    value = res[registry.get(name).headline]
    if value is None:
        return f"undefined: {res.get('undefined', 'no value')}"
    extra = f" ({res['descriptor']})" if "descriptor" in res else ""
    return f"{value:.6g}{extra}"
