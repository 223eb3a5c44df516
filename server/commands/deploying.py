"""Commands that change what devices run: deploy, rollout, cancel (with --broker they run the server too)."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

from server import cli_output as out
from server.commands.common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_TIMEOUT,
    deployer_config,
    open_registry,
    say,
    server_config,
)

_LOGGER = logging.getLogger(__name__)


def _print_outcome(args: argparse.Namespace, registry: Any, final: Any) -> None:
    folder = out.report_dir(registry.reports_dir, final.deployment_id)
    if args.json:
        out.print_json(out.deployment_dict(final, registry.reports_dir))
        return
    for check in (final.verdict or {}).get("checks", []):
        print("  " + out.safe(out.check_line(check)))
    print(out.safe(f"{final.deployment_id}: {final.status} - {final.reason}"))
    if folder is not None:
        print(f"report: {folder}")


def cmd_deploy(args: argparse.Namespace, data_dir: Path) -> int:
    from server.deployer import record_deployment
    from server.policy import load_policy
    from server.service import EdgeGuideServer, wait_for_deployment

    model_id, version = args.model
    registry = open_registry(args, data_dir)
    policy = load_policy(args.policy)
    server = None
    if args.broker:
        server = EdgeGuideServer(registry, server_config(args, one_shot=True), policy=policy,
                                 deployer_config=deployer_config(args))
        server.start()
        try:
            record = server.deploy(model_id, args.device, version=version, policy=policy, force=args.force,
                                   chunk_size=args.chunk_size, wait_seen_s=3.0)
        except BaseException:
            server.stop()
            raise
    else:
        config = deployer_config(args)  # checked here too: a running server uses its own
        record = record_deployment(registry, model_id, args.device, version=version, policy=policy,
                                   force=args.force, chunk_size=config.chunk_size, deadline_s=config.deadline_s)
    say(args, f"deployment {record.deployment_id}: {record.model_id}@{record.version} -> {record.device_id} "
               f"({record.status})")
    try:
        if not (args.wait or server):
            if args.json:
                out.print_json(out.deployment_dict(record))
            else:
                print("a running `edgeguide-server serve` will perform it; follow it with "
                      f"`edgeguide-server deployments show {record.deployment_id}`")
            return EXIT_OK
        if server is None:
            say(args, "waiting for a running `edgeguide-server serve` to perform it ...")
        final = wait_for_deployment(registry, record.deployment_id, args.timeout,
                                    on_change=lambda d: say(args, f"  {d.status} {d.reason}".rstrip()))
    except TimeoutError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if args.json:
            out.print_json({**out.deployment_dict(registry.deployment(record.deployment_id), registry.reports_dir),
                            "error": str(exc)})
        return EXIT_TIMEOUT
    finally:
        if server is not None:
            server.stop()
    _print_outcome(args, registry, final)
    return EXIT_OK if final.status == "promoted" else EXIT_FAILED


def cmd_rollout(args: argparse.Namespace, data_dir: Path) -> int:
    from server.policy import load_policy
    from server.rollout import create_rollout, load_plan, make_plan, parse_group
    from server.service import EdgeGuideServer

    model_id, version = args.model
    registry = open_registry(args, data_dir)
    known = [d.device_id for d in registry.devices()]
    if args.plan:
        plan = load_plan(args.plan, known)
    else:
        devices = [d.strip() for d in args.devices.split(",") if d.strip()] if args.devices else known
        plan = make_plan([parse_group(g) for g in args.group], devices, args.waves, args.max_failure_pct)
    policy = load_policy(args.policy) if args.policy else None
    server = None
    config = deployer_config(args)
    if args.broker:
        server = EdgeGuideServer(registry, server_config(args, one_shot=True), policy=load_policy(args.policy),
                                 deployer_config=config).start()
    try:
        rollout = create_rollout(registry, model_id, plan, version=version, policy=policy)
        for stage in plan.stages:
            say(args, f"  {stage.name}: {', '.join(stage.devices)}")
        for device, member in rollout.devices.items():
            if member["outcome"] == "skipped":
                say(args, f"  skip {device}: {member['detail']}")
        say(args, f"rollout {rollout.rollout_id}: {rollout.model_id}@{rollout.version} in {len(plan.stages)} "
                   f"stages, stop above {plan.max_failure_pct:g} % failures")
        if not (args.wait or server):
            if args.json:
                out.print_json(out.rollout_dict(rollout))
            else:
                print("a running `edgeguide-server serve` will perform it; follow it with `edgeguide-server "
                      "rollouts`")
            return EXIT_OK
        deadline = time.monotonic() + args.timeout
        last = None
        while not rollout.finished:
            if (rollout.status, rollout.stage) != last:
                last = (rollout.status, rollout.stage)
                say(args, f"  {rollout.status} stage {rollout.stage} {rollout.reason}".rstrip())
            if time.monotonic() > deadline:
                print(f"error: rollout {rollout.rollout_id} still {rollout.status} after {args.timeout:.0f} s"
                      f"{_rollout_stall(registry, rollout)}", file=sys.stderr)
                if args.json:
                    out.print_json({**out.rollout_dict(rollout), "error": "timeout"})
                return EXIT_TIMEOUT
            time.sleep(0.5)
            rollout = registry.rollout(rollout.rollout_id)
    finally:
        if server is not None:
            server.stop()
    if args.json:
        out.print_json(out.rollout_dict(rollout))
    else:
        for device, member in rollout.devices.items():
            print(out.safe(f"  {device}: {member['outcome'] or '-'} {member['detail']}".rstrip()))
        print(out.safe(f"{rollout.rollout_id}: {rollout.status} - {rollout.reason}"))
    return EXIT_OK if rollout.status == "completed" else EXIT_FAILED


def _rollout_stall(registry: Any, rollout: Any) -> str:
    from server.service import stall_reason

    for member in rollout.devices.values():
        if member["outcome"] is None and member["deployment_id"] not in (None, "claiming"):
            return f": {member['device_id']}: " + stall_reason(registry, registry.deployment(member["deployment_id"]))
    seen = registry.last_server_seen()
    if seen is None or time.time() - seen > 15:
        return ": no server heartbeat seen: no `edgeguide-server serve` runs on this registry"
    return ""


def cmd_cancel(args: argparse.Namespace, data_dir: Path) -> int:
    from server.deployer import cancel_deployment
    from server.service import EdgeGuideServer

    registry = open_registry(args, data_dir)
    if args.broker:
        with EdgeGuideServer(registry, server_config(args, one_shot=True)) as server:
            dep = server.deployer.cancel(args.deployment_id, notify=True)
    else:
        dep = cancel_deployment(registry, args.deployment_id, notify=False)
    if args.json:
        out.print_json(out.deployment_dict(dep))
    else:
        print(out.safe(f"{dep.deployment_id}: {dep.status} - {dep.reason}"))
    return EXIT_OK
