"""The fleet's back end on one machine: PostgreSQL, a core mosquitto, edge mosquittos bridged to it
(optionally through the delay-line relay, so a test can drop a bridge), and server processes
sharing the device traffic through the MQTT 5 `$share` group.

Every part is a real process with its own lifecycle: `PostgresCluster.restart()`,
`Stack.kill_server(i)` / `start_server(i)` and `Stack.cut_bridge(i)` are the faults the fleet
tests and the benchmark inject.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.mosquitto import MosquittoBroker, free_port

_LOGGER = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
PG_BIN = Path("/usr/lib/postgresql/15/bin")


def _as_postgres(*cmd: str) -> subprocess.CompletedProcess:
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    return subprocess.run([*prefix, *cmd], capture_output=True, text=True, timeout=120, check=False)


class PostgresCluster:
    """A throwaway PostgreSQL 15 cluster on a free loopback port (initdb + pg_ctl; as `postgres` under root)."""

    def __init__(self) -> None:
        if not (PG_BIN / "initdb").exists():
            raise RuntimeError(f"PostgreSQL 15 is not installed ({PG_BIN}/initdb missing): "
                               "apt-get install -y postgresql")
        self.root = Path(tempfile.mkdtemp(prefix="edgeguide-fleet-pg-"))
        self.data = self.root / "data"
        self.port = free_port()

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> PostgresCluster:
        if not self.data.exists():
            self.data.mkdir(mode=0o700)
            if os.geteuid() == 0:
                shutil.chown(self.root, "postgres")
                shutil.chown(self.data, "postgres")
            done = _as_postgres(str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres")
            if done.returncode != 0:
                raise RuntimeError(f"initdb failed:\n{done.stdout}\n{done.stderr}")
        self._ctl("start")
        return self

    def _ctl(self, action: str, *extra: str) -> None:
        opts = f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1 -c max_connections=200"
        done = _as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-o", opts, "-l",
                            str(self.data / "server.log"), "-w", *extra, action)
        if done.returncode != 0:
            raise RuntimeError(f"pg_ctl {action} failed:\n{done.stdout}\n{done.stderr}")

    def pid(self) -> int:
        """The postmaster's pid (its children are the backends, one per connection)."""
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def restart(self) -> None:
        """Stop (fast: connections are dropped) and start again: what a failover or upgrade looks like."""
        self._ctl("restart", "-m", "fast")

    def stats(self) -> dict[str, int]:
        """Commits and rows written so far in the database (pg_stat_database)."""
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            row = conn.execute("SELECT xact_commit, tup_inserted, tup_updated, tup_deleted FROM pg_stat_database "
                               "WHERE datname = 'postgres'").fetchone()
        return {"xact_commit": row[0], "tup_inserted": row[1], "tup_updated": row[2], "tup_deleted": row[3]}

    def stop(self) -> None:
        with contextlib.suppress(RuntimeError):
            self._ctl("stop", "-m", "immediate")
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class Relay:
    """The delay-line relay in the current namespace (no delay): a bridge link that a test can cut."""

    target_port: int
    workdir: Path
    cut_s: float = 5.0
    port: int = 0
    proc: subprocess.Popen | None = None

    def start(self) -> Relay:
        from hil_tests.netlink.profiles import LinkProfile

        self.port = free_port()
        ready = self.workdir / f"relay-{self.port}.ready"
        profile = LinkProfile("bridge", rate_mbit=10_000, rtt_ms=0)
        cmd = [sys.executable, "-m", "hil_tests.netlink.relay", "--listen", f"127.0.0.1:{self.port}",
               "--target", f"127.0.0.1:{self.target_port}", "--profile-json", json.dumps(profile.to_dict()),
               "--ready", str(ready), "--stats", str(self.workdir / f"relay-{self.port}.json"),
               "--manual-cut-s", str(self.cut_s)]
        with open(self.workdir / f"relay-{self.port}.log", "ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=str(REPO), stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                         env={**os.environ, "PYTHONPATH": str(REPO)})
        deadline = time.monotonic() + 20
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"bridge relay did not start (exit {self.proc.poll()})")
            time.sleep(0.05)
        return self

    def cut(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGUSR1)

    def stop(self) -> dict[str, Any]:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        with contextlib.suppress(OSError, ValueError):
            return json.loads((self.workdir / f"relay-{self.port}.json").read_text())
        return {}


def bridge_conf(name: str, core_port: int, prefix: str) -> list[str]:
    """mosquitto bridge lines: device up topics out to the core, down topics in from it, QoS 1, persistent."""
    # MQTT 3.1.1 for the bridge: mosquitto 2.0's MQTT 5 bridge sends no session expiry, so the core
    # drops its session when the link drops and whatever was published for its devices meanwhile
    # (seen: manifests lost for good). 3.1.1's clean session false keeps it. The servers still use
    # MQTT 5 on the core for `$share`. (And max_inflight_messages 0 from the base config would go
    # out as an MQTT 5 Receive Maximum of 0: a protocol error.)
    return ["max_inflight_messages 1000", f"connection {name}", f"address 127.0.0.1:{core_port}",
            "bridge_protocol_version mqttv311",
            f"remote_clientid {name}", "cleansession false", "restart_timeout 1 5", "keepalive_interval 20",
            "try_private false", f"topic {prefix}/dev/+/up/# out 1", f"topic {prefix}/dev/+/down/# in 1"]


@dataclass
class Stack:
    """PostgreSQL, one core broker, `edges` bridged edge brokers and `servers` server processes."""

    workdir: Path
    prefix: str
    edges: int = 2
    servers: int = 2
    relay_bridges: bool = False
    bridge_cut_s: float = 5.0
    db: PostgresCluster | None = None
    core: MosquittoBroker | None = None
    edge_brokers: list[MosquittoBroker] = field(default_factory=list)
    relays: list[Relay] = field(default_factory=list)
    server_procs: dict[int, subprocess.Popen] = field(default_factory=dict)
    data_dir: Path | None = None

    def start(self) -> Stack:
        try:
            self.db = PostgresCluster().start()
            self.core = MosquittoBroker(workdir=self.workdir / "core").start()
            for n in range(self.edges):
                target = self.core.port
                if self.relay_bridges:
                    relay = Relay(self.core.port, self.workdir, self.bridge_cut_s).start()
                    self.relays.append(relay)
                    target = relay.port
                edge = MosquittoBroker(workdir=self.workdir / f"edge-{n}",
                                       extra_conf=bridge_conf(f"edge-{n}", target, self.prefix))
                self.edge_brokers.append(edge.start())
            from server import keys
            from server.db import open_database
            from server.registry import Registry

            self.data_dir = self.workdir / "server"
            registry = Registry(self.data_dir, open_database(self.db.url))
            self.server_key = keys.export_public_key(registry.data_dir, self.workdir / "server_pub.pem")
            registry.close()
            for n in range(self.servers):
                self.start_server(n)
        except BaseException:
            self.stop()
            raise
        return self

    def registry(self) -> Any:
        from server.db import open_database
        from server.registry import Registry

        assert self.db is not None and self.data_dir is not None
        return Registry(self.data_dir, open_database(self.db.url))

    def start_server(self, n: int) -> None:
        """Server process n (same client id every time: it resumes its own session in the $share group)."""
        assert self.core is not None and self.db is not None
        log = open(self.workdir / f"server-{n}.log", "ab")  # noqa: SIM115 - the child keeps it
        cmd = [sys.executable, "-m", "server", "--data-dir", str(self.data_dir), "--database", self.db.url,
               "--log-level", "WARNING", "serve", "--broker", self.core.url, "--topic-prefix", self.prefix,
               "--client-id", f"fleet-server-{n}", "--protocol", "5"]
        self.server_procs[n] = subprocess.Popen(cmd, cwd=str(REPO), stdout=log, stderr=log,
                                                env={**os.environ, "PYTHONPATH": str(REPO)})
        log.close()

    def kill_server(self, n: int) -> None:
        """SIGKILL: no clean disconnect, whatever it held in memory is gone."""
        proc = self.server_procs.pop(n)
        proc.kill()
        proc.wait(10)

    def cut_bridge(self, n: int) -> None:
        """Drop edge n's bridge connection; the relay refuses it for `bridge_cut_s`, then mosquitto reconnects."""
        self.relays[n].cut()

    def edge_endpoints(self) -> list[tuple[str, int]]:
        return [(b.host, b.port) for b in self.edge_brokers]

    def server_rss_mib(self) -> dict[str, float]:
        import psutil

        out = {}
        for n, proc in self.server_procs.items():
            with contextlib.suppress(psutil.Error):
                out[f"fleet-server-{n}"] = psutil.Process(proc.pid).memory_info().rss / 2**20
        return out

    def stop(self) -> dict[str, Any]:
        """Everything down, in reverse order; returns the bridge relays' stats."""
        for n in list(self.server_procs):
            proc = self.server_procs.pop(n)
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        for edge in self.edge_brokers:
            edge.stop()
        relay_stats = [r.stop() for r in self.relays]
        if self.core is not None:
            self.core.stop()
        if self.db is not None:
            self.db.stop()
        return {"bridge_relays": relay_stats}
