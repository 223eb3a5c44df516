"""Commands that read the registry: rollouts (and aborting one), devices (and removing one), deployments,
models, logs."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

from server import cli_output as out
from server.commands.common import EXIT_OK, open_registry
from server.registry import Registry

_LOGGER = logging.getLogger(__name__)


def cmd_rollouts(args: argparse.Namespace, data_dir: Path) -> int:
    registry = open_registry(args, data_dir)
    if getattr(args, "rollouts_action", None) == "abort":
        return _abort_rollout(args, registry)
    rollouts = registry.rollouts()
    if args.json:
        out.print_json([out.rollout_dict(r) for r in rollouts])
        return EXIT_OK
    tty = out.is_tty()
    rows = []
    for r in rollouts:
        outcomes = ", ".join(f"{d}={m['outcome'] or ('-' if m['deployment_id'] is None else 'running')}"
                             for d, m in r.devices.items())
        rows.append([r.rollout_id, f"{r.model_id}@{r.version}", r.status,
                     f"{r.stage + 1}/{len(r.plan.stages)} {r.plan.stages[r.stage].name}", outcomes,
                     r.reason[:80] if tty else r.reason])
    out.print_table(["rollout", "model", "status", "stage", "devices (outcome)", "reason"], rows)
    return EXIT_OK


def _abort_rollout(args: argparse.Namespace, registry: Registry) -> int:
    from server.deployer import cancel_deployment
    from server.rollout import abort_rollout

    # No broker here: cancels are recorded as pending and the running server's tick sends them.
    rollout = abort_rollout(registry, args.rollout_id, args.reason,
                            cancel=lambda dep_id: cancel_deployment(registry, dep_id, notify=False))
    if args.json:
        out.print_json(out.rollout_dict(rollout))
    else:
        print(out.safe(f"{rollout.rollout_id}: {rollout.status} - {rollout.reason} (the running server cancels "
                       "its deployments in progress and rolls back its promoted devices on its next tick)"))
    return EXIT_OK


def cmd_devices(args: argparse.Namespace, data_dir: Path) -> int:
    registry = open_registry(args, data_dir)
    if getattr(args, "devices_action", None) == "remove":
        device = registry.remove_device(args.device_id)
        if args.json:
            out.print_json({"removed": device.device_id})
        else:
            print(f"removed device {device.device_id} (its deployments stay listed; a running agent re-appears)")
        return EXIT_OK
    devices = registry.devices()
    if args.json:
        out.print_json([out.device_dict(d) for d in devices])
        return EXIT_OK
    rows = [[d.device_id, d.status, f"{d.active_model_id}@{d.active_version}" if d.active_model_id else "-",
             d.runtime_key or "-", out.local_time(d.last_seen), d.last_error or ""] for d in devices]
    out.print_table(["device", "status", "active model", "runtime", "last seen", "last error"], rows)
    return EXIT_OK


def cmd_deployments(args: argparse.Namespace, data_dir: Path) -> int:
    registry = open_registry(args, data_dir)
    if getattr(args, "deployments_action", None) == "show":
        return _show_deployment(args, registry)
    deps = registry.deployments(active_only=args.active, device_id=args.device, limit=args.limit)
    if args.json:
        out.print_json([out.deployment_dict(d) for d in deps])
        return EXIT_OK
    tty = out.is_tty()
    rows = [[d.deployment_id, d.device_id, f"{d.model_id}@{d.version}", d.status,
             (d.verdict or {}).get("verdict", "-"), out.local_time(d.created), d.reason[:80] if tty else d.reason]
            for d in deps]
    out.print_table(["deployment", "device", "model", "status", "verdict", "created", "reason"], rows)
    return EXIT_OK


def _show_deployment(args: argparse.Namespace, registry: Any) -> int:
    from server.service import stall_reason

    dep = registry.deployment(args.deployment_id)
    info = out.deployment_dict(dep, registry.reports_dir)
    if not dep.terminal:
        info["waiting_on"] = stall_reason(registry, dep)
    events = registry.events(deployment_id=dep.deployment_id, limit=200)
    info["events"] = [{"ts": out.iso(e["ts"]), "kind": e["kind"], "detail": e["detail"]} for e in events]
    if args.json:
        out.print_json(info)
        return EXIT_OK
    for key in ("deployment_id", "device_id", "model", "status", "reason", "verdict", "created", "updated",
                "report_dir", "waiting_on"):
        if info.get(key) not in (None, ""):
            print(f"{key + ':':15s} {out.safe(info[key])}")
    if info["checks"]:
        print("checks:")
        for check in info["checks"]:
            print("  " + out.safe(out.check_line(check)))
    print("events:")
    for e in events:
        print(out.safe(f"  {out.local_time(e['ts'])} {e['kind']} {e['detail']}".rstrip()))
    return EXIT_OK


def cmd_models(args: argparse.Namespace, data_dir: Path) -> int:
    artifacts = open_registry(args, data_dir).artifacts()
    if args.json:
        out.print_json([out.artifact_dict(a) for a in artifacts])
        return EXIT_OK
    rows = []
    for a in artifacts:
        m = a.metrics
        hr = m.get("hr10")
        rows.append([a.id, str(a.size), str(m.get("tflite_bytes", "-")), f"{hr:.3f}" if isinstance(hr, float) else "-",
                     ",".join(m.get("techniques") or []) or "-", out.local_time(a.created)])
    out.print_table(["model", "packed bytes", "tflite bytes", "HR@10", "techniques", "registered"], rows)
    return EXIT_OK


def cmd_logs(args: argparse.Namespace, data_dir: Path) -> int:
    registry = open_registry(args, data_dir)
    rows = registry.events(device_id=args.device, deployment_id=args.deployment, limit=1_000_000)[-args.limit:]
    last_id = rows[-1]["id"] if rows else 0
    while True:
        for e in rows:
            entry = {"ts": out.iso(e["ts"]), "device_id": e["device_id"], "deployment_id": e["deployment_id"],
                     "kind": e["kind"], "detail": e["detail"]}
            if args.json:  # one JSON object per line, so -f output can be streamed
                print(json.dumps(entry, sort_keys=True), flush=True)
            else:
                print(out.safe(f"{out.local_time(e['ts'])} {e['kind']:24s} {e['device_id'] or '-'} "
                               f"{e['deployment_id'] or '-'} {e['detail']}".rstrip()), flush=True)
            last_id = max(last_id, e["id"])
        if not args.follow:
            return EXIT_OK
        time.sleep(0.5)
        rows = [e for e in registry.events(device_id=args.device, deployment_id=args.deployment, limit=1_000_000)
                if e["id"] > last_id]
