"""`retrack experiment`: a paper-style table from a YAML config, resumable, shardable."""

from __future__ import annotations

import argparse
from dataclasses import replace

from retrack.errors import require
from retrack.experiments import load_config, parse_shard, run_experiment
from retrack.validation import parse_seeds

DESCRIPTION = """\
Run every planned run of an experiment YAML (the pretrained row, each method and ablation, for
each target and seed) and write summary.md/.csv/.json (mean ± std over seeds and targets) with
experiment.json and runs.json.

Everything is checked before the first run (unknown keys at any depth, model, data, targets,
weight files, every method's settings): a bad config ends with one sentence and exit code 2, and
finished runs are left as they were.

Resuming: a run is finished when its metrics.json exists, and a rerun skips it. Each run folder
holds fingerprint.json, the hash of the settings it was computed from (model and data digests,
method and its resolved hyperparameters, seed, metric and sampling settings). If the config
changed since, such a stale run is refused (exit 2, naming the first one and what changed) until
you pass --force, which reruns the stale runs; the table is built only from runs that match.

Several machines: --shard i/n runs the i-th of n deterministic shares (e.g. a SLURM array with
--shard $SLURM_ARRAY_TASK_ID/N, ids 1..N); then `retrack experiment CONFIG --merge` writes the
one table. Under `accelerate launch` (or torchrun) each process runs its own share, one run per
process on its own GPU, and the main process writes the table."""


def register(sub: argparse._SubParsersAction, help: str) -> None:
    p = sub.add_parser(
        "experiment", help=help, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="experiment YAML, e.g. configs/mnist_tshirt.yaml")
    p.add_argument("--methods", default="all",
                   help="comma-separated row labels or method names, or 'all' (default); a row label picks that "
                   "row alone, a method that labels no row picks every row of that method")
    p.add_argument("--seeds", default=None, help="override the config's seeds: 0-9 or 0,3,5")
    p.add_argument("--samples", type=int, default=None, help="override samples per run (sampling.samples)")
    p.add_argument("--out", default=None, help="override the output folder")
    p.add_argument("--no-nll", action="store_true", help="drop the nll metric")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config entry, VALUE read as YAML, e.g. --set train.steps=10 "
                   "or --set model=./local-copy (repeatable)")
    p.add_argument("--shard", default="1/1", help="run only the i-th of n shares of the runs: i/n")
    p.add_argument("--merge", action="store_true", help="run nothing; build the table from finished runs")
    p.add_argument("--partial", action="store_true",
                   help="with --merge: build the table even though some runs have not finished (named in "
                   "experiment.json); without it --merge refuses, naming them")
    p.add_argument("--force", action="store_true", help="rerun finished runs whose settings changed")
    p.add_argument("--dry-run", action="store_true", help="check everything and list this shard's runs")
    p.add_argument("--progress", action="store_true", help="progress bars inside each run")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    sets = list(args.set)
    if args.seeds is not None:
        sets.append(f"seeds={parse_seeds(args.seeds)}")
    if args.samples is not None:
        require(args.samples >= 1, f"--samples must be at least 1, got {args.samples}.")
        sets.append(f"sampling.samples={args.samples}")
    if args.out is not None:
        sets.append(f"out={args.out!r}")
    require(not args.partial or args.merge, "--partial acts only with --merge; add --merge.")
    shard_of = parse_shard(args.shard)
    cfg = load_config(args.config, sets)
    if args.no_nll:
        cfg = replace(cfg, metrics={k: v for k, v in cfg.metrics.items() if k != "nll"})
    methods = None if args.methods == "all" else [m.strip() for m in args.methods.split(",") if m.strip()]
    require(methods is None or bool(methods), "--methods is empty; name a label or method, or 'all'.")
    outcome = run_experiment(cfg, methods, shard_of, force=args.force, only_merge=args.merge,
                             dry_run=args.dry_run, progress=args.progress, partial=args.partial)
    if args.dry_run:
        print(f"{len(outcome.share)} of {len(outcome.planned)} runs in this share:")
        print("\n".join(outcome.share))
        return 0
    if outcome.table is not None:
        print(outcome.table)
        print(f"wrote {cfg.out}/summary.md, summary.csv, summary.json, experiment.json")
    elif not args.merge:
        print(f"ran {len(outcome.ran)} of this share's {len(outcome.share)} runs; "
              f"build the table with: retrack experiment {args.config} --merge")
    return 0
