"""Someone with write access to a device's down topics attacking a real agent process.

The agent is `python -m agent` (a real child process, its log captured); the attacker publishes
on the real mosquitto through `ServerPeer`, which also signs with the key the agent pins when the
attack needs a valid signature. Each payload must end in a clean `*_rejected` event, never in a
traceback, and a gzip bomb must be refused with the agent's peak RSS (VmHWM) barely moving.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_agent_support import ServerPeer, new_deployment_id, new_keypair

from protocol import artifact, chunking
from protocol.limits import DEFAULT_LIMITS, MIB
from protocol.messages import Manifest
from protocol.topics import Topics
from server.local_agent import LocalAgent

pytestmark = pytest.mark.network

BOMB_BYTES = 300 * MIB  # more than max_unpacked_bytes (256 MiB)
RSS_GROWTH_LIMIT_MIB = 48


class _Zeros(io.RawIOBase):
    """`size` zero bytes as a stream, so a bomb is built without holding it in memory."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buf: memoryview) -> int:  # type: ignore[override]
        n = min(len(buf), self.left)
        buf[:n] = b"\0" * n
        self.left -= n
        return n


def gzip_bomb(real: Path, size: int = BOMB_BYTES) -> bytes:
    """A packed artifact whose model.tflite unpacks to `size` zero bytes (~0.1 % of that packed)."""
    raw = io.BytesIO()
    with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
        for name in artifact.ARTIFACT_FILES:
            info = tarfile.TarInfo(name)
            if name == artifact.MODEL_FILE:
                info.size = size
                tar.addfile(info, io.BufferedReader(_Zeros(size), 1 << 20))
            else:
                data = (real / name).read_bytes()
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return raw.getvalue()


@pytest.fixture(scope="module")
def device(mosquitto, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalAgent, ServerPeer]]:
    """One real agent process with nothing installed, and the peer that attacks it."""
    tmp = tmp_path_factory.mktemp("attacked-agent")
    key, pub = new_keypair(tmp)
    prefix = f"eg-attack-{uuid.uuid4().hex[:8]}"
    device_id = f"victim-{uuid.uuid4().hex[:6]}"
    peer = ServerPeer(mosquitto.url, Topics(prefix), device_id, key).start()
    agent = LocalAgent(device_id, mosquitto.url, tmp / "state", pub, topic_prefix=prefix, log_path=tmp / "agent.log",
                       extra_args=["--chunk-stall-s", "2", "--log-level", "info"])
    agent.start()
    yield agent, peer
    agent.stop()
    peer.stop()


def _publish(peer: ServerPeer, kind: str, payload: bytes) -> None:
    peer.link.publish(peer.topics.down(peer.device_id, kind), payload).wait(10)


def _nested(total: int) -> bytes:
    depth = total // 2
    return b"[" * depth + b"]" * depth


DEP = "d-0123456789ab"
HUGE_INT = b"9" * 5000
ATTACKS = {
    # name: (topic kind, payload, rejection event, text in its reason)
    "manifest int beyond 4300 digits": ("manifest", b'{"deployment_id": "' + DEP.encode() + b'", "version": '
                                        + HUGE_INT + b"}", "manifest_rejected", "malformed manifest"),
    "verdict int beyond 4300 digits": ("verdict", b'{"deployment_id": "' + DEP.encode() + b'", "version": '
                                       + HUGE_INT + b"}", "verdict_rejected", "malformed"),
    "command int beyond 4300 digits": ("command", b'{"device_id": "x", "created": ' + HUGE_INT + b"}",
                                       "command_rejected", "not valid"),
    "manifest of 400 KB nested lists": ("manifest", _nested(400_000), "manifest_rejected", "exceeds the limit"),
    "verdict of 400 KB nested lists": ("verdict", _nested(400_000), "verdict_rejected", "exceeds the limit"),
    "manifest nested within its size": ("manifest", _nested(200_000), "manifest_rejected", "not valid"),
    "verdict nested within its size": ("verdict", _nested(200_000), "verdict_rejected", "not valid"),
    "verdict nested inside an object": ("verdict", b'{"deployment_id": "' + DEP.encode() + b'", "checks": '
                                        + _nested(100_000) + b"}", "verdict_rejected", "not valid"),
    "manifest with an infinite number": ("manifest", b'{"deployment_id": "' + DEP.encode() + b'", "version": 1e999}',
                                         "manifest_rejected", "malformed manifest"),
}


@pytest.mark.parametrize("name", list(ATTACKS))
def test_undecodable_down_messages_are_clean_rejections(device: tuple[LocalAgent, ServerPeer], name: str) -> None:
    agent, peer = device
    kind, payload, event_type, reason = ATTACKS[name]
    log_before = len(agent.log_path.read_bytes())
    mark = peer.mark()
    _publish(peer, kind, payload)
    event = peer.wait_event(event_type, start=mark, timeout=30)
    assert reason in event["reason"], event
    assert len(event["reason"]) <= 1000
    log = agent.log_path.read_bytes()[log_before:].decode(errors="replace")
    assert "Traceback" not in log and "handler_failed" not in log, log[-3000:]
    assert agent.running


def _reset_vm_hwm(pid: int) -> float:
    """Reset the process's peak RSS to its current RSS (Linux: "5" to clear_refs); returns the new peak.

    The agent is module-scoped: without this, a peak from an earlier attack could hide the bomb's."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    status = {line.split(":")[0]: int(line.split()[1]) / 1024
              for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith(("VmHWM", "VmRSS"))}
    assert status["VmHWM"] - status["VmRSS"] < 4, f"VmHWM was not reset: {status}"
    return status["VmHWM"]


def _vm_hwm_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc/PID/status")


def test_a_declared_unpacked_size_over_the_limit_is_refused_before_download(
        device: tuple[LocalAgent, ServerPeer], tiny_artifact: Path) -> None:
    agent, peer = device
    blob = artifact.pack_artifact(tiny_artifact)
    dep = new_deployment_id()
    manifest = Manifest(deployment_id=dep, device_id=peer.device_id, model_id="bomb", version=7,
                        total_size=len(blob), sha256=hashlib.sha256(blob).hexdigest(), chunk_size=16384,
                        chunk_sha256=chunking.digests(blob, 16384), unpacked_size=BOMB_BYTES).signed(peer.key)
    mark = peer.mark()
    peer.send_manifest(manifest)
    event = peer.wait_event("manifest_rejected", dep, start=mark)
    assert "unpacked_size" in event["reason"] and str(DEFAULT_LIMITS.max_unpacked_bytes) in event["reason"], event
    assert not (agent.state_dir / "staging" / dep).exists()


def test_a_gzip_bomb_is_refused_with_bounded_memory(device: tuple[LocalAgent, ServerPeer],
                                                    tiny_artifact: Path) -> None:
    """A signed artifact (a server-side bug or a compromised build) whose manifest does not declare its size."""
    agent, peer = device
    bomb = gzip_bomb(tiny_artifact)
    assert len(bomb) < 2 * MIB
    pid = agent.proc.pid
    before = _reset_vm_hwm(pid)
    mark = peer.mark()
    manifest = peer.deploy(bomb, version=8, model_id="bomb", chunk_size=65536)
    report = peer.wait_for("report", lambda r: r["deployment_id"] == manifest.deployment_id, timeout=120, start=mark)
    assert report["load_ok"] is False and report["error_kind"] == "verify_error", report
    assert "more than" in report["error"] and "unpack" in report["error"], report["error"]
    peak = _vm_hwm_mib(pid)
    print(f"gzip bomb of {len(bomb)} bytes -> {BOMB_BYTES} bytes: agent VmHWM {before:.1f} -> {peak:.1f} MiB")
    assert peak - before < RSS_GROWTH_LIMIT_MIB, (
        f"the agent's peak RSS grew by {peak - before:.0f} MiB ({before:.0f} -> {peak:.0f} MiB) unpacking a bomb")
    peer.wait_event("rolled_back", manifest.deployment_id, start=mark)
    assert not any((agent.state_dir / "slots").glob(".tmp-*")), "a half-unpacked slot was left behind"
