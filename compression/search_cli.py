"""The `edgeguide-compress search` argument parser, kept free of TensorFlow imports.

Building the CLI (and `--help`) stays instant; TensorFlow is imported only when a search runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _run_search(args: argparse.Namespace) -> int:
    from compression.search import SearchError

    try:
        return search_command(args)
    except SearchError as exc:  # every one is about the input: names, floor, reference path, --out state
        print(f"error: {exc}", file=sys.stderr)
        return 2


def register_search_subcommand(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``search`` to the ``edgeguide-compress`` CLI; the parser's ``func`` runs it."""
    from compression.cli import EXIT_CODES, HelpFormatter, add_global_options

    parser = subparsers.add_parser(
        "search", help="accuracy-aware compression search (Pareto report, resumable)",
        formatter_class=HelpFormatter, epilog=EXIT_CODES,
        description="Try every technique and recipe on the reference, keep the Pareto frontier and "
                    "export the smallest model with NDCG@10 >= floor x reference. Without --reference it "
                    "trains the reference candidates first (full data: about 30 min on 2 cores for the "
                    "whole run; --list shows the variants, --variants picks some).")
    add_global_options(parser)
    parser.add_argument("--floor", type=float, default=0.99,
                        help="NDCG@10 floor as a fraction of the reference's")
    parser.add_argument("--out", default="reports/search", help="output folder (re-running resumes it)")
    parser.add_argument("--profile", choices=("quick", "full"), default="full",
                        help="training lengths of the variants")
    parser.add_argument("--reference", default=None,
                        help="saved Keras reference (.keras/.h5 or .weights.h5); default: train one")
    parser.add_argument("--train-preset", choices=("quick", "full"), default="full",
                        help="TrainConfig preset when the reference must be trained")
    parser.add_argument("--max-customers", type=int, default=None, help="use the first N customers only")
    parser.add_argument("--data", default=None, help="data source folder (default: compression.data's)")
    parser.add_argument("--variants", default=None,
                        help="comma-separated variant names to run (default: all)")
    parser.add_argument("--no-compat", action="store_true", help="skip the runtime loadability checks")
    parser.add_argument("--fresh", action="store_true", help="discard the state of an earlier run in --out")
    parser.add_argument("--list", action="store_true", help="list the variant names and exit")
    parser.set_defaults(func=_run_search)
    return parser


def search_command(args: argparse.Namespace) -> int:
    """Entry point of ``edgeguide-compress search``; returns the exit code."""
    from compression.data import load_dataset
    from compression.reference import load_reference_model, obtain_references
    from compression.search import LatencyConfig, SearchRun, run_search
    from compression.variants import default_variants, select_variants

    variants = select_variants(default_variants(args.profile), args.variants)
    if args.list:
        for variant in variants:
            print(f"{variant.name}: {' -> '.join(step.name for step in variant.steps)}")
        return 0
    out = Path(args.out)
    if args.fresh and (out / "state.json").exists():
        (out / "state.json").unlink()
    dataset = load_dataset(args.data, max_customers=args.max_customers)
    if args.reference:
        reference = load_reference_model(args.reference, dataset)
        training, bases = {"source": str(args.reference)}, {}
        variants = [v for v in variants if v.base == "reference"]
    else:
        reference, training, bases = obtain_references(dataset, out, preset=args.train_preset,
                                                       check_compat=not args.no_compat)
    run = SearchRun(out_dir=out, floor=args.floor, check_compat=not args.no_compat,
                    latency=LatencyConfig.for_profile(args.profile))
    result = run_search(reference, dataset, variants, run, training=training, bases=bases)
    best = result["best"]
    recipe = " -> ".join(best["recipe"]) or "reference"
    print(f"best: {best['name']} ({recipe}) {best['tflite_bytes']} bytes, "
          f"{best['x_smaller']:.1f}x smaller, NDCG@10 {best['ndcg10']:.4f} ({best['ndcg_ratio']:.3f} x ref)")
    print(f"artifact: {best['artifact']}\nreport: {out / 'report.md'}\nplot: {out / 'pareto.png'}")
    return 0 if best["met_floor"] else 1
