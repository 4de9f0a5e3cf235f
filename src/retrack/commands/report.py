"""`retrack report`: one self-contained HTML page for a run, the demo's output or an experiment."""

from __future__ import annotations

import argparse

from retrack.report import write_report
from retrack.validation import Int


def register(sub: argparse._SubParsersAction, help: str) -> None:
    p = sub.add_parser(
        "report", help=help,
        description="Write report.html (images embedded, no external files): sample grids before "
        "and after with the same seeds, the forget images beside their K neighbours, the "
        "reconstruction from T/4 (--reconstruction), loss and metric curves over steps, the "
        "tables, the resolved config and provenance. For an unlearning run the samples are drawn "
        "from the input and output models; an experiment's are read from its runs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("folder", help="output of retrack unlearn, retrack demo or retrack experiment")
    p.add_argument("--out", default=None, help="HTML file (default: FOLDER/report.html)")
    p.add_argument("--samples", type=Int(min=0), default=16,
                   help="samples per model shown (a run draws them; 0: none)")
    p.add_argument("--sampling-steps", type=Int(min=1), default=50, help="DDIM steps for a run's samples")
    p.add_argument("--seed", type=Int(min=0), default=None,
                   help="sampling seed (default: the run's seed; experiments: their first seed)")
    p.add_argument("--reconstruction", action="store_true",
                   help="noise each forget image to T/4 and denoise it with every model (T/4 "
                   "model evaluations per image and model)")
    p.add_argument("--max-forget", type=Int(min=1), default=4, help="distinct forget images shown")
    p.add_argument("--max-neighbours", type=Int(min=0), default=10, help="neighbours shown per forget image")
    p.add_argument("--device", default=None, help="torch device for samples and reconstructions (default: cuda "
                   "if available, else cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    path = write_report(args.folder, args.out, args.overwrite, samples=args.samples,
                        sampling_steps=args.sampling_steps, seed=args.seed,
                        reconstruction=args.reconstruction, max_forget=args.max_forget,
                        max_neighbours=args.max_neighbours, device=args.device, progress=not args.quiet)
    print(f"wrote {path}")
    return 0
