"""Commands that manage what the registry holds and proves: register, unregister, export the key, the demo."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from server import cli_output as out
from server.commands.common import EXIT_OK, open_registry

_LOGGER = logging.getLogger(__name__)


def cmd_register(args: argparse.Namespace, data_dir: Path) -> int:
    record = open_registry(args, data_dir).register(args.artifact_dir, model_id=args.model_id)
    if args.json:
        out.print_json(out.artifact_dict(record))
        return EXIT_OK
    m = record.metrics
    hr10 = m.get("hr10")
    tflite = m.get("tflite_bytes")
    print(f"registered {record.id}: {record.size} bytes packed, sha256 {record.sha256}"
          f" (HR@10 {f'{hr10:.3f}' if isinstance(hr10, float) else 'n/a'}, tflite "
          f"{out.human_bytes(tflite) if isinstance(tflite, int) else 'n/a'}); "
          f"deploy it with `edgeguide-server deploy {record.id} --device DEVICE`")
    return EXIT_OK


def cmd_unregister(args: argparse.Namespace, data_dir: Path) -> int:
    model_id, version = args.model
    record = open_registry(args, data_dir).unregister(model_id, version)
    if args.json:
        out.print_json({"unregistered": record.id})
    else:
        print(f"unregistered {record.id}: it can no longer be deployed; its past deployments stay listed")
    return EXIT_OK


def cmd_export_key(args: argparse.Namespace, data_dir: Path) -> int:
    from protocol import signing
    from server.keys import export_public_key

    written = export_public_key(data_dir, args.out)
    fingerprint = signing.fingerprint(signing.load_public_key(written))
    if args.json:
        out.print_json({"path": str(written), "fingerprint": fingerprint})
    else:
        print(f"wrote the server public key to {written} (fingerprint {fingerprint}); start agents with "
              f"--server-key {written}")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace, _data_dir: Path) -> int:
    from server.demo import DemoOptions, run_demo

    return run_demo(DemoOptions(full=args.full, broker=args.broker, max_customers=args.max_customers,
                                workdir=args.workdir, measure_mode=args.measure_mode, verbose=args.verbose,
                                keep=args.keep))
