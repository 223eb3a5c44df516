"""edgeguide-compress: train the reference, export artifacts, evaluate them.

Subcommands live in a registry: a module adds one with ``@subcommand(name, help)`` on a
function that fills its argparse parser and returns the handler. ``PLUGINS`` names modules
(imported when present) and their ``register(subparsers)`` function, which adds a parser
whose ``func`` default is the handler (this is how ``compression.search`` plugs in).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from compression.quantizations import QUANTIZATIONS
from protocol.cli_help import HelpFormatter

_LOGGER = logging.getLogger(__name__)

Handler = Callable[[argparse.Namespace], int]
Configure = Callable[[argparse.ArgumentParser], Handler]

PLUGINS = {"compression.search_cli": "register_search_subcommand"}
MODEL_FILE = "reference.keras"
RUN_FILE = "training.json"
_REGISTRY: dict[str, tuple[str, Configure]] = {}
EXIT_CODES = """exit codes:
  0    success
  1    the work ran and fell short (search: no variant kept NDCG@10 >= floor x reference)
  2    bad input, nothing written: unknown option or variant, an artifact that does not match the data
  130  interrupted (Ctrl-C); a search resumes from its --out folder"""
# Accepted before or after the subcommand, as with edgeguide-server and edgeguide-agent.
_GLOBAL_DEFAULTS: dict[str, object] = {"verbose": 0, "log_level": None}



def add_global_options(parser: argparse.ArgumentParser) -> None:
    """`-v/-vv` and `--log-level`, with SUPPRESS defaults so a subparser never overwrites the top level."""
    group = parser.add_argument_group("global options (before or after the command)")
    group.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                       help="more logging: -v keeps info, -vv debug (default: info)")
    group.add_argument("--log-level", type=str.upper, default=argparse.SUPPRESS,
                       choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="set the log level outright")


def subcommand(name: str, help: str) -> Callable[[Configure], Configure]:
    """Register ``configure(parser) -> handler`` as subcommand ``name``."""

    def decorator(configure: Configure) -> Configure:
        if name in _REGISTRY:
            raise ValueError(f"subcommand {name!r} registered twice")
        _REGISTRY[name] = (help, configure)
        return configure

    return decorator


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", metavar="PATH", default=None,
                        help="directory with the raw UCI CSV parts or the derived copy "
                             "(default: ../shared/data if present, else data/retail)")
    parser.add_argument("--max-customers", type=int, default=None, metavar="N",
                        help="use only the first N customers by id (fast smoke runs)")


def _dump(payload: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(payload, indent=1))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=payload.get("title", ""))
    for col in ("model", "HR@10", "NDCG@10", "MRR"):
        table.add_column(col)
    for name, figures in payload["rows"].items():
        if figures:
            table.add_row(name, *(f"{figures[k]:.4f}" for k in ("hr10", "ndcg10", "mrr")))
    Console().print(table)
    for key, value in payload.items():
        if key not in ("rows", "title"):
            print(f"{key}: {value}")


@subcommand("train", help="train the float32 reference model (and optionally export it)")
def _configure_train(parser: argparse.ArgumentParser) -> Handler:
    preset = parser.add_mutually_exclusive_group()
    preset.add_argument("--quick", dest="preset", action="store_const", const="quick",
                        help="demo preset: ~1.5 min on two cores (default)")
    preset.add_argument("--full", dest="preset", action="store_const", const="full",
                        help="reference preset: a few minutes, best NDCG@10")
    parser.set_defaults(preset="quick")
    _add_data_options(parser)
    parser.add_argument("--out", type=Path, default=Path("runs/reference"), metavar="DIR",
                        help=f"run directory for {MODEL_FILE} and {RUN_FILE} (default: runs/reference)")
    parser.add_argument("--epochs", type=int, default=None, help="override the preset's number of epochs")
    parser.add_argument("--seed", type=int, default=None, help="override the preset's random seed")
    parser.add_argument("--export", nargs="*", default=[], metavar="QUANT",
                        help="also export artifacts with these quantizations into DIR/artifact-QUANT "
                             f"({', '.join(QUANTIZATIONS)})")
    parser.add_argument("--no-progress", action="store_true", help="hide the Keras progress bar")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    return _run_train


def _run_train(args: argparse.Namespace) -> int:
    from compression.baselines import evaluate_baselines
    from compression.data import load_dataset
    from compression.train import TrainConfig, evaluate_keras, train_reference

    overrides = {k: v for k, v in (("epochs", args.epochs), ("seed", args.seed)) if v is not None}
    config = getattr(TrainConfig, args.preset)(max_customers=args.max_customers, **overrides)
    dataset = load_dataset(args.data, max_customers=args.max_customers)
    model, history = train_reference(dataset, config, progress=not args.no_progress)
    reference = evaluate_keras(model, dataset, "test")
    baselines = evaluate_baselines(dataset, "test")
    args.out.mkdir(parents=True, exist_ok=True)
    model.save(args.out / MODEL_FILE)
    run = {"preset": args.preset, "data": args.data, "config": config.to_dict(), "history": history,
           "reference": reference, "baselines": baselines, "split": dataset.split_summary()}
    (args.out / RUN_FILE).write_text(json.dumps(run, indent=1) + "\n")
    for quant in args.export:
        _export(model, dataset, run, args.out / f"artifact-{quant}", quant,
                f"reference-{args.preset}-{quant}", check_compat=True)
    _dump({"title": f"{args.preset} reference on test ({dataset.source})",
           "rows": {"reference (keras)": reference, **baselines},
           "train_seconds": round(history["seconds"], 1), "params": model.count_params(),
           "run_dir": str(args.out)}, args.json)
    return 0


def _export(model, dataset, run: dict, out: Path, quantization: str, model_id: str,
            check_compat: bool) -> Path:
    from compression.export import export_artifact

    path = export_artifact(model, dataset, out, model_id=model_id, quantization=quantization,
                           training=run["config"], reference=run["reference"], check_compat=check_compat)
    _LOGGER.info("exported %s", path)
    return path


@subcommand("export", help="export a trained run as an artifact folder")
def _configure_export(parser: argparse.ArgumentParser) -> Handler:
    parser.add_argument("run", type=Path, metavar="RUN_DIR",
                        help=f"directory written by 'train' ({MODEL_FILE}, {RUN_FILE})")
    parser.add_argument("--quantization",
                        choices=QUANTIZATIONS,
                        default="none",
                        help="post-training quantization of the .tflite (default: none = float32)")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="artifact directory (default: RUN_DIR/artifact-QUANT)")
    parser.add_argument("--model-id", default=None, help="model id stored in metrics.json "
                                                         "(default: reference-QUANT)")
    parser.add_argument("--data", metavar="PATH", default=None,
                        help="dataset directory (default: the one recorded in the run)")
    parser.add_argument("--no-compat", action="store_true",
                        help="skip the runtime loadability checks (tflite-runtime needs a cached venv)")
    return _run_export


def _run_export(args: argparse.Namespace) -> int:
    import tf_keras as keras

    from compression.data import load_dataset

    run = json.loads((args.run / RUN_FILE).read_text())
    model = keras.models.load_model(args.run / MODEL_FILE)
    dataset = load_dataset(args.data or run.get("data"), max_customers=run["config"].get("max_customers"))
    out = args.out or args.run / f"artifact-{args.quantization}"
    path = _export(model, dataset, run, out, args.quantization,
                   args.model_id or f"reference-{args.quantization}", check_compat=not args.no_compat)
    metrics = json.loads((path / "metrics.json").read_text())
    print(json.dumps({k: metrics[k] for k in ("model_id", "tflite_bytes", "gzip_bytes", "hr10", "ndcg10",
                                              "mrr", "runtimes")}, indent=1))
    return 0


@subcommand("evaluate", help="re-measure an artifact's model.tflite on the test split")
def _configure_evaluate(parser: argparse.ArgumentParser) -> Handler:
    parser.add_argument("artifact", type=Path, metavar="ARTIFACT",
                        help="artifact directory (model.tflite, items.json, metrics.json)")
    _add_data_options(parser)
    parser.add_argument("--runtimes", action="store_true", help="also check loadability in every runtime")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    return _run_evaluate


def _run_evaluate(args: argparse.Namespace) -> int:
    from compression.data import load_dataset
    from compression.tflite_eval import evaluate_tflite

    items = json.loads((args.artifact / "items.json").read_text())["items"]
    recorded = json.loads((args.artifact / "metrics.json").read_text())
    dataset = load_dataset(args.data, max_customers=args.max_customers)
    codes = [code for code, _ in items]
    if codes != dataset.codes:
        print(f"error: the artifact's {len(codes) - 1} items differ from the dataset's {dataset.num_items} "
              f"({dataset.source}); pass the --data/--max-customers it was trained with", file=sys.stderr)
        return 2
    histories, targets = dataset.eval_histories("test", recorded["window"])
    measured = evaluate_tflite(args.artifact / "model.tflite", histories, targets)
    payload = {"title": f"{recorded['model_id']} on test ({dataset.source})",
               "rows": {"tflite (now)": measured, "tflite (metrics.json)": recorded,
                        "reference": recorded.get("reference"), **recorded.get("baselines", {})},
               "tflite_bytes": recorded["tflite_bytes"]}
    if args.runtimes:
        from compression.runtimes import check_runtimes

        payload["runtimes"] = check_runtimes(args.artifact / "model.tflite")
    _dump(payload, args.json)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The full parser, with every registered (and plugged-in) subcommand."""
    from importlib.metadata import version

    parser = argparse.ArgumentParser(prog="edgeguide-compress", description=__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter, epilog=EXIT_CODES)
    parser.add_argument("--version", action="version", version=f"edgeguide-compress {version('edgeguide')}")
    add_global_options(parser)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, configure) in _REGISTRY.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter,
                                    epilog=EXIT_CODES)
        add_global_options(sub)
        sub.set_defaults(func=configure(sub))
    for module_name, register in PLUGINS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            _LOGGER.debug("plugin %s not installed", module_name)
            continue
        getattr(module, register)(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Console entry point."""
    args = build_parser().parse_args(argv)
    for name, default in _GLOBAL_DEFAULTS.items():
        if not hasattr(args, name):
            setattr(args, name, default)
    level = args.log_level or ("DEBUG" if args.verbose >= 2 else "INFO")
    logging.basicConfig(level=getattr(logging, level),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)
