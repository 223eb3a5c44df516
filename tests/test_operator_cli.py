"""`edgeguide-server` driven as an operator would: the real entry point in a subprocess, its text,
its JSON (parsed) and its exit code, including the mistakes people make (issue: scriptable CLI).

The second test runs a real `serve`, a real mosquitto and two real agents, one of them pinned to
another server's key.
"""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest
from test_agent_support import new_keypair

from protocol import signing
from server.cli_output import check_line
from server.local_agent import LocalAgent

REPO = Path(__file__).resolve().parents[1]


class Cli:
    """`python -m server` with a fixed data dir; stdout is a pipe, as in a script."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir

    def __call__(self, *args: str, code: int | None = 0, timeout: float = 120) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEGUIDE_")}
        done = subprocess.run([sys.executable, "-m", "server", *args], capture_output=True, text=True, cwd=REPO,
                              timeout=timeout, env={**env, "PYTHONPATH": str(REPO), "COLUMNS": "60"})
        if code is not None:
            assert done.returncode == code, f"{args}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
        assert "Traceback" not in done.stderr, done.stderr
        return done

    def json(self, *args: str, code: int | None = 0) -> object:
        return json.loads(self(*args, "--json", "--data-dir", str(self.data_dir), code=code).stdout)

    def text(self, *args: str, code: int | None = 0) -> subprocess.CompletedProcess:
        return self("--data-dir", str(self.data_dir), *args, code=code)


def test_gate_checks_print_in_human_units() -> None:
    assert check_line({"outcome": "pass", "name": "model_bytes", "figure": 1023960.0, "op": "<=",
                       "limit": 16777216.0, "unit": "B"}).endswith("model_bytes: 0.98 MiB <= 16 MiB")
    energy = check_line({"outcome": "unavailable-skipped", "name": "energy_mj_per_inference", "figure": None,
                         "op": "<=", "limit": 50.0, "unit": "mJ", "note": "no power source detected"})
    assert energy.endswith("energy_mj_per_inference: unavailable (limit <= 50 mJ): no power source detected")
    assert check_line({"outcome": "fail", "name": "p90_ms", "figure": 61.234, "op": "<=", "limit": 50.0,
                       "unit": "ms"}).endswith("p90_ms: 61.23 ms <= 50 ms")


def test_rollouts_abort_stops_a_running_rollout_without_a_broker(tmp_path: Path, tiny_artifact: Path) -> None:
    """The command line records the abort; a running server's tick sends the signed cancel."""
    from server.deployer import CANCEL_PENDING
    from server.registry import Registry

    cli = Cli(tmp_path / "data")
    cli.json("register", str(tiny_artifact), "--model-id", "tiny")
    registry = Registry(cli.data_dir)
    try:
        for device in ("ab-1", "ab-2", "ab-3"):
            registry.upsert_device(device, status="online", from_state=True)
        rollout = cli.json("rollout", "tiny@1", "--devices", "ab-1,ab-2,ab-3", "--waves", "1")
        rollout_id = rollout["rollout_id"]
        # As a server's tick would have done: ab-1's deployment is under way.
        assert registry.claim_rollout_device(rollout_id, "ab-1")
        dep = registry.create_deployment(registry.artifact("tiny", 1), "ab-1", chunk_size=65536, policy=None,
                                         deadline_s=600, status="transferring")
        registry.attach_rollout_deployment(rollout_id, "ab-1", dep.deployment_id)
        aborted = cli.json("rollouts", "abort", rollout_id, "--reason", "wrong model")
        assert aborted["status"] == "rolling_back" and aborted["reason"] == "aborted: wrong model"
        assert {d: m["outcome"] for d, m in aborted["devices"].items()} == {"ab-1": None, "ab-2": "skipped",
                                                                          "ab-3": "skipped"}
        cancelled = registry.deployment(dep.deployment_id)
        assert (cancelled.status, cancelled.reason) == ("cancelled", CANCEL_PENDING)  # the server's tick tells ab-1
        again = cli.text("rollouts", "abort", rollout_id, code=2).stderr
        assert f"rollout {rollout_id} is rolling_back, not running: nothing to abort" in again
        assert "no rollout 'r-000000000000'" in cli.text("rollouts", "abort", "r-000000000000", code=2).stderr
        assert "abort ID" in cli.text("rollouts", "--help").stdout
    finally:
        registry.close()


def test_listings_versions_and_mistakes_without_a_broker(tmp_path: Path, tiny_artifact: Path) -> None:
    cli = Cli(tmp_path / "data")
    assert cli("--version").stdout.startswith("edgeguide-server ")
    assert "exit codes:" in cli("--help").stdout
    registered = cli.json("register", str(tiny_artifact), "--model-id", "tiny")
    assert registered["id"] == "tiny@1" and registered["version"] == 1
    assert "registered tiny@2" in cli.text("register", str(tiny_artifact), "--model-id", "tiny").stdout
    # Global options before or after the command, --json or -o json: the same answer.
    after = cli("models", "--data-dir", str(cli.data_dir), "-o", "json", "-v").stdout
    before = cli("--json", "-v", "--data-dir", str(cli.data_dir), "models").stdout
    assert json.loads(after) == json.loads(before)
    assert [m["id"] for m in json.loads(after)] == ["tiny@1", "tiny@2"]

    # One version syntax both ways, printed MODEL@VERSION; the errors name what exists.
    for ref in ("tiny@9", "tiny:9"):
        err = cli.text("deploy", ref, "--device", "ghost", code=2).stderr
        assert "no registered artifact 'tiny@9'; registered: ['tiny@1', 'tiny@2']" in err
    assert "device 'ghost' has never been seen" in cli.text("deploy", "tiny@1", "--device", "ghost", code=2).stderr
    assert "expects an integer version" in cli.text("deploy", "tiny@latest", "--device", "x", code=2).stderr
    assert "give the version" in cli.text("unregister", "tiny", code=2).stderr

    # A deployment nobody performs: the wait says why and how to end it; `show` and `cancel` work.
    created = cli.json("deploy", "tiny:1", "--device", "ghost-device-with-a-long-name", "--force")
    dep_id = created["deployment_id"]
    assert created["model"] == "tiny@1" and created["status"] == "pending"
    waited = cli.text("deploy", "tiny@2", "--device", "ghost-device-with-a-long-name", "--force", "--wait",
                      "--timeout", "1", code=3)
    assert "no server heartbeat seen (never)" in waited.stderr and "device 'ghost-device-with-a-long-name' has " \
        "never been seen" in waited.stderr and "edgeguide-server cancel d-" in waited.stderr
    listed = cli.text("deployments").stdout  # piped: full ids, nothing cut at the terminal width
    assert dep_id in listed and "ghost-device-with-a-long-name" in listed and "…" not in listed
    shown = cli.json("deployments", "show", dep_id)
    assert shown["status"] == "pending" and "no server heartbeat seen" in shown["waiting_on"]
    assert [e["kind"] for e in shown["events"]] == ["deployment_created"]
    assert f"deployment_id:  {dep_id}" in cli.text("deployments", "show", dep_id).stdout
    assert "no deployment 'd-000000000000'" in cli.text("deployments", "show", "d-000000000000", code=2).stderr
    cancelled = cli.json("cancel", dep_id)
    assert cancelled["status"] == "cancelled" and "a running server tells the device" in cancelled["reason"]
    assert "already ended: cancelled" in cli.text("cancel", dep_id, code=2).stderr
    assert {d["status"] for d in cli.json("deployments", "--active")} == {"pending"}  # the tiny@2 one

    # Withdraw a version: refused while in use, then gone from deploys and listings.
    assert "deployments in progress" in cli.text("unregister", "tiny@2", code=2).stderr
    assert cli.json("unregister", "tiny@1") == {"unregistered": "tiny@1"}
    assert [m["id"] for m in cli.json("models")] == ["tiny@2"]
    assert "no registered artifact 'tiny@1'" in cli.text("deploy", "tiny@1", "--device", "x", "--force",
                                                         code=2).stderr
    # Rollouts refuse never-seen devices up front, one reason each.
    err = cli.text("rollout", "tiny", "--group", "canary=ghost-a", "--devices", "ghost-b", code=2).stderr
    assert "device 'ghost-a' has never been seen" in err and "device 'ghost-b' has never been seen" in err
    assert cli.json("rollouts") == []
    # Policy range checks reach the operator as one line.
    bad = tmp_path / "bad.toml"
    bad.write_text("[limits.agreement_at_k]\nmin = 90\n")
    err = cli.text("deploy", "tiny", "--device", "x", "--force", "--policy", str(bad), code=2).stderr
    assert "for 90 % write 0.90" in err
    # The key, with a fingerprint an agent's log can be compared with.
    key = cli.json("export-key", str(tmp_path / "key.pem"))
    assert key["fingerprint"] == signing.fingerprint(signing.load_public_key(tmp_path / "key.pem"))
    assert f"fingerprint {key['fingerprint']}" in cli.text("export-key", str(tmp_path / "k2.pem")).stdout
    assert "'ghost' has never been seen" in cli.text("devices", "remove", "ghost", code=2).stderr
    assert cli.json("devices") == []
    events = [json.loads(line) for line in cli("logs", "--json", "--data-dir", str(cli.data_dir)).stdout.splitlines()]
    assert {"registered", "unregistered", "status:cancelled"} <= {e["kind"] for e in events}
    # -f keeps printing what is logged after it started.
    follow = subprocess.Popen([sys.executable, "-m", "server", "logs", "-f", "--json", "--limit", "1", "--data-dir",
                               str(cli.data_dir)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    lines = _line_reader(follow.stdout)
    try:
        assert json.loads(_next_line(lines, 30, "logs -f printing the last event"))["kind"] == events[-1]["kind"]
        cli.json("register", str(tiny_artifact), "--model-id", "later")
        assert json.loads(_next_line(lines, 30, "logs -f printing the new registration"))["kind"] == "registered"
    finally:
        follow.terminate()
        follow.wait(10)


def _line_reader(stream: IO[str]) -> queue.Queue[str | None]:
    """Lines of `stream` read by a daemon thread (None at EOF), so a test can wait for one with a deadline."""
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in stream:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def _next_line(lines: queue.Queue[str | None], timeout: float, what: str) -> str:
    try:
        line = lines.get(timeout=timeout)
    except queue.Empty:
        raise AssertionError(f"no line within {timeout:.0f} s waiting for {what}") from None
    assert line is not None, f"the output ended waiting for {what}"
    return line


@pytest.fixture
def serve(tmp_path: Path, mosquitto, topic_prefix: str) -> Iterator[Path]:
    """A real `serve` with no -v: it must log state changes at INFO on its own."""
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "server", "serve", "--data-dir", str(tmp_path / "data"),
                                 "--broker", mosquitto.url, "--topic-prefix", topic_prefix,
                                 "--client-id", f"serve-{topic_prefix}"], cwd=REPO, stdout=log, stderr=log,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        yield log_path
    finally:
        proc.terminate()
        proc.wait(15)


def _until(cli: Cli, what: str, check: object, timeout: float = 30) -> object:
    deadline = time.monotonic() + timeout
    while True:
        devices = {d["device_id"]: d for d in cli.json("devices")}
        if check(devices):  # type: ignore[operator]
            return devices
        assert time.monotonic() < deadline, f"{what}: {devices}"
        time.sleep(0.3)


@pytest.mark.network
@pytest.mark.slow
def test_deploy_rollout_and_the_wrong_key_with_real_agents(tmp_path: Path, mosquitto, topic_prefix: str,
                                                           tiny_artifact: Path, serve: Path) -> None:
    cli = Cli(tmp_path / "data")
    cli.json("register", str(tiny_artifact), "--model-id", "tiny")
    key = cli.json("export-key", str(tmp_path / "key.pem"))
    (tmp_path / "other").mkdir()
    _, other_key = new_keypair(tmp_path / "other")  # another server's key: the agent's mistake
    good = LocalAgent("op-good", mosquitto.url, tmp_path / "good", tmp_path / "key.pem", topic_prefix=topic_prefix)
    wrong = LocalAgent("op-wrong", mosquitto.url, tmp_path / "wrong", other_key, topic_prefix=topic_prefix)
    with good, wrong:
        _until(cli, "both agents seen", lambda d: {"op-good", "op-wrong"} <= set(d))
        # The agent logs which key it pinned: compare with what export-key printed.
        assert f"fingerprint={key['fingerprint']}" in good.log_tail(20000)
        assert f"fingerprint={signing.fingerprint(signing.load_public_key(other_key))}" in wrong.log_tail(20000)

        done = cli.text("deploy", "tiny@1", "--device", "op-good", "--wait", "--timeout", "120")
        assert "promoted" in done.stdout
        assert re.search(r"model_bytes: [0-9.]+ (KiB|MiB) <= 16 MiB", done.stdout)  # human units
        assert "None" not in done.stdout and "energy_mj_per_inference: unavailable (limit <= " in done.stdout
        report_dir = Path(done.stdout.split("report: ")[1].split()[0])
        assert (report_dir / "report.json").is_file()

        # Wrong key: rejected, with the fingerprint pinned vs the one this server signs with.
        rejected = cli.text("deploy", "tiny", "--device", "op-wrong", "--wait", "--timeout", "60", code=1)
        assert "rejected" in rejected.stdout and "does not match the pinned server key" in rejected.stdout
        assert f"this server signs with {key['fingerprint']}" in rejected.stdout
        assert "edgeguide-server export-key" in rejected.stdout
        devices = cli.json("devices")
        wrong_row = next(d for d in devices if d["device_id"] == "op-wrong")
        assert wrong_row["status"] == "online" and "pinned server key" in wrong_row["last_error"]
        assert "pinned server key" in cli.text("devices").stdout
        # The fix the message gives: restart the agent with this server's key; the error then clears.
        wrong.stop()
        with LocalAgent("op-wrong", mosquitto.url, tmp_path / "wrong", tmp_path / "key.pem",
                        topic_prefix=topic_prefix):
            cli.text("deploy", "tiny", "--device", "op-wrong", "--wait", "--timeout", "120")
        assert next(d for d in cli.json("devices") if d["device_id"] == "op-wrong")["last_error"] is None

        # Rollout: the device already on the version is skipped, not a failure; JSON of the outcome.
        rollout = cli.json("rollout", "tiny@1", "--group", "canary=op-good", "--devices", "op-good", "--wait",
                           "--timeout", "60")
        assert rollout["status"] == "completed" and rollout["devices"]["op-good"]["outcome"] == "skipped"
        assert [r["rollout_id"] for r in cli.json("rollouts")] == [rollout["rollout_id"]]
        good.stop()
        _until(cli, "op-good offline", lambda d: d["op-good"]["status"] == "offline")
    # The device is offline: the wait names it.
    stuck = cli.text("deploy", "tiny", "--device", "op-good", "--wait", "--timeout", "2", code=3)
    assert "device 'op-good' is offline" in stuck.stderr
    dep_id = stuck.stdout.split()[1].rstrip(":")
    assert cli.json("cancel", dep_id)["status"] == "cancelled"
    deadline = time.monotonic() + 15  # the running serve sends the signed cancel on its next tick
    while cli.json("deployments", "show", dep_id)["reason"] != "cancelled by the operator":
        assert time.monotonic() < deadline, cli.json("deployments", "show", dep_id)
        time.sleep(0.3)
    # With --broker, `cancel` tells the device itself.
    queued = cli.json("deploy", "tiny", "--device", "op-good")["deployment_id"]
    told = cli.json("cancel", queued, "--broker", mosquitto.url, "--topic-prefix", topic_prefix)
    assert (told["status"], told["reason"]) == ("cancelled", "cancelled by the operator")
    assert cli.json("devices", "remove", "op-good") == {"removed": "op-good"}
    serve_log = serve.read_text()
    assert "INFO" in serve_log and "device op-good online" in serve_log and "-> promoted" in serve_log
