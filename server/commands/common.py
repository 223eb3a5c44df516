"""What the command groups share: exit codes, opening the registry, progress lines, server settings."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.deployer import DeployerConfig
    from server.registry import Registry
    from server.service import ServerConfig

_LOGGER = logging.getLogger(__name__)

DEFAULT_BROKER = "mqtt://127.0.0.1:1883"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_TIMEOUT = 0, 1, 2, 3


def open_registry(args: argparse.Namespace, data_dir: Path) -> Registry:
    """The registry in `data_dir`, on PostgreSQL when --database/EDGEGUIDE_DATABASE gives a URL."""
    from server.db import open_database
    from server.registry import Registry

    url = getattr(args, "database", None)
    return Registry(data_dir, db=open_database(url) if url else None)


def server_config(args: argparse.Namespace, one_shot: bool = False) -> ServerConfig:
    from server.service import ServerConfig

    client_id = args.client_id or (f"edgeguide-deploy-{os.getpid()}" if one_shot else "edgeguide-server")
    return ServerConfig(broker_url=args.broker or DEFAULT_BROKER, client_id=client_id,
                        clean_start=one_shot and not args.client_id,
                        topic_prefix=args.topic_prefix, protocol=args.protocol, username=args.username,
                        password=args.password, tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key,
                        # A one-off process must see every reply itself: in the $share group the broker could
                        # hand the device's report to a stopped `serve` session that queues it for later.
                        shared_subscription=not (args.no_shared_subscription or one_shot))


def deployer_config(args: argparse.Namespace) -> DeployerConfig:
    from server.deployer import DeployerConfig

    return DeployerConfig(chunk_size=args.chunk_size, deadline_s=args.deadline, max_resends=args.max_resends)


def say(args: argparse.Namespace, text: str) -> None:
    """Progress for people: stdout in text mode, stderr with --json (stdout holds only the JSON)."""
    print(text, file=sys.stderr if args.json else sys.stdout, flush=True)
