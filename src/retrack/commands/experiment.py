"""`retrack experiment`: methods × seeds (+ ablations) from a YAML config, resumable, paper-style table."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "experiment", help="run a paper-style comparison from a YAML config (resumable)",
        description="Run every method × seed of a YAML config (plus its ablations), skipping runs "
        "that already finished, and write summary.md/.csv/.json (mean ± std over seeds).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("config", help="experiment YAML, e.g. configs/mnist_tshirt.yaml")
    p.add_argument("--methods", default="all", help="comma-separated methods, or 'all'")
    p.add_argument("--seeds", default=None, help="override the config's seeds: 0-9 or 0,3,5")
    p.add_argument("--samples", type=int, default=None, help="override samples per run")
    p.add_argument("--out", default=None, help="override the output folder")
    p.add_argument("--no-nll", action="store_true", help="skip the NLL of the forget image")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from retrack.experiments import ExperimentConfig, parse_seeds, run_experiment

    cfg = ExperimentConfig.from_yaml(args.config, samples=args.samples, out=args.out,
                                     seeds=parse_seeds(args.seeds) if args.seeds else None,
                                     nll=False if args.no_nll else None)
    methods = None if args.methods == "all" else [m.strip() for m in args.methods.split(",")]
    print(run_experiment(cfg, methods))
    print(f"wrote {cfg.out}/summary.md, summary.csv, summary.json")
    return 0
