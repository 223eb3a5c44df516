"""``python -m agent.measure``: what this device can measure, as JSON (why: check a board before a rollout).

``probe`` prints the context and every power source's verdict; ``toy`` also measures the numpy toy
recommender (calibrates the harness on a board without any model file); ``artifact --artifact DIR``
measures a real artifact folder with the agent's runtime, exactly as a deployment would.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from agent.measure.context import read_context
from agent.measure.power import PowerProbe, PowerUnavailable, describe_probes, probe_power_sources
from agent.measure.recommender import Recommender
from agent.measure.report import measure_model
from agent.measure.toy import MatrixRecommender, make_histories

_LOGGER = logging.getLogger(__name__)


def _power(probes: list[PowerProbe]) -> list[dict[str, Any]]:
    power = []
    for probe in probes:
        entry: dict[str, Any] = {"kind": probe.kind, "usable": probe.source is not None,
                                 "reason": probe.reason}
        if probe.source is not None:
            entry["source"] = probe.source.source
            try:
                entry["watts"] = probe.source.read()
            except PowerUnavailable as exc:
                entry["watts"], entry["unavailable"] = None, exc.reason
        power.append(entry)
    return power


def _artifact_inputs(folder: Path, threads: int) -> tuple[Callable[[], Recommender], dict[str, Any]]:
    # Imported here: `probe` and `toy` must work on a board before the agent's runtime is installed.
    from agent.runtime import load_recommender
    from protocol.artifact import read_golden

    golden = read_golden(folder)
    return (lambda: load_recommender(folder / "model.tflite", threads=threads)), golden


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="python -m agent.measure", description=__doc__)
    parser.add_argument("command", choices=("probe", "toy", "artifact"))
    parser.add_argument("--root", type=Path, default=Path("/"), help="filesystem root for sysfs/proc readers")
    parser.add_argument("--mode", choices=("quick", "full"), default="quick", help="run length preset")
    parser.add_argument("--threads", type=int, default=1, help="interpreter threads (artifact)")
    parser.add_argument("--artifact", type=Path, help="artifact folder with model.tflite and golden.json")
    parser.add_argument("--json", type=Path, help="also write the JSON to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    probes = probe_power_sources(args.root)
    result: dict[str, Any] = {"context": read_context(args.root, threads=args.threads),
                              "power": _power(probes)}
    if args.command != "probe":
        if args.command == "artifact":
            if args.artifact is None:
                parser.error("artifact needs --artifact DIR")
            load, golden = _artifact_inputs(args.artifact, args.threads)
        else:
            toy_histories = make_histories(64)
            ids, scores = MatrixRecommender().golden(toy_histories)
            load = MatrixRecommender
            golden = {"histories": toy_histories, "item_ids": ids, "scores": scores}
        source = next((p.source for p in probes if p.source is not None), None)
        result["measurement"] = measure_model(
            load, np.asarray(golden["histories"], dtype=np.int32), mode=args.mode, threads=args.threads,
            power_source=source, golden_ids=np.asarray(golden["item_ids"]),
            golden_scores=np.asarray(golden["scores"]) if golden.get("scores") is not None else None,
            root=args.root, no_power_reason=describe_probes(probes))
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
