"""Agent robustness: every candidate failure becomes a report, a dead network machinery ends the
process (so its supervisor restarts it), and chunk frames can carry a precomputed digest.

Candidates are real tiny LiteRT artifacts (session fixture `tiny_artifacts`) measured by the real
agent.measure; the fatal-exit test runs `python -m agent` in a real pids cgroup.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_agent_support import TINY_MEASURE, mounted_tmpfs, new_deployment_id, new_keypair

from agent.deployment import Deployment, EvalSettings, evaluate_candidate, failure_kind
from agent.measure import MeasureConfig, measure_model
from agent.store import ModelStore, StoreError
from agent.transfer import Receiver, VerifyError
from protocol import artifact, chunking
from protocol.errors import ProtocolError
from protocol.messages import Manifest

REPO = Path(__file__).resolve().parents[1]
CHUNK = 65536
SETTINGS = EvalSettings(device_id="dev-1", threads=1, mode="quick", max_unpacked_bytes=64 << 20,
                        measure_config=MeasureConfig(**TINY_MEASURE), power_source=None)


def _variant(src: Path, dest: Path, golden_change: dict) -> bytes:
    """A copy of a real artifact with some golden.json fields replaced, packed for the wire."""
    shutil.copytree(src, dest)
    golden = json.loads((dest / artifact.GOLDEN_FILE).read_text())
    golden.update(golden_change)
    (dest / artifact.GOLDEN_FILE).write_text(json.dumps(golden))
    return artifact.pack_artifact(dest)


def _downloaded(store: ModelStore, blob: bytes, version: int) -> Deployment:
    """A deployment whose chunks have all arrived in the store's staging, as after a real download."""
    dep_id = new_deployment_id()
    manifest = Manifest(deployment_id=dep_id, device_id="dev-1", model_id="tiny-float", version=version,
                        total_size=len(blob), sha256=hashlib.sha256(blob).hexdigest(), chunk_size=CHUNK,
                        chunk_sha256=chunking.digests(blob, CHUNK))
    receiver = Receiver.start(store, manifest)
    pieces = chunking.split(blob, CHUNK)
    for i, piece in enumerate(pieces):
        receiver.accept(chunking.decode_chunk(chunking.encode_chunk(dep_id, i, len(pieces), piece)))
    assert receiver.complete
    return Deployment(manifest, receiver)


def _with_incumbent(state: Path, tiny_artifacts: dict[str, Path]) -> ModelStore:
    store = ModelStore(state)
    blob = artifact.pack_artifact(tiny_artifacts["float"])
    store.promote(store.install_candidate(blob, model_id="tiny-float", version=1, deployment_id="d-00000000000a",
                                          max_unpacked_bytes=64 << 20))
    return store


def test_golden_ids_beyond_int32_give_a_load_error_report(tmp_path: Path, tiny_artifacts: dict[str, Path]) -> None:
    """Used to escape evaluate_candidate (OverflowError) and leave the server waiting for its deadline."""
    store = _with_incumbent(tmp_path / "state", tiny_artifacts)
    histories = json.loads((tiny_artifacts["float"] / artifact.GOLDEN_FILE).read_text())["histories"]
    histories[0][-1] = 2 ** 40  # one id beyond int32
    blob = _variant(tiny_artifacts["float"], tmp_path / "huge-ids", {"histories": histories})
    dep = _downloaded(store, blob, version=2)
    result = evaluate_candidate(dep, store, SETTINGS, measure=measure_model)
    assert result.report.load_ok is False and result.report.error_kind == "load_error"
    assert "golden.json unusable: OverflowError" in result.report.error and "1099511627776" in result.report.error
    assert result.failed_event == "load_failed" and result.candidate is None and result.loaded is None
    assert store.active().current.version == 1  # the incumbent's pointer is untouched
    assert store.slot_contents(store.inactive_slot()) is None  # the candidate was discarded


def test_golden_of_the_wrong_window_fails_the_real_measurement(tmp_path: Path,
                                                                tiny_artifacts: dict[str, Path]) -> None:
    store = ModelStore(tmp_path / "state")
    golden = json.loads((tiny_artifacts["float"] / artifact.GOLDEN_FILE).read_text())
    blob = _variant(tiny_artifacts["float"], tmp_path / "short", {"histories": [h[-3:] for h in golden["histories"]]})
    result = evaluate_candidate(_downloaded(store, blob, version=1), store, SETTINGS, measure=measure_model)
    assert result.report.load_ok is False and result.report.error_kind == "measure_error", result.report.error
    assert result.failed_event == "error" and result.report.model_bytes > 0
    assert store.slot_contents(store.inactive_slot()) is None and store.active() is None


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 2 MiB filesystem (tmpfs): writes past it fail with ENOSPC."""
    with mounted_tmpfs(tmp_path / "disk", "2m") as mount:
        yield mount


def test_a_full_disk_while_installing_is_reported_as_disk_full(small_disk: Path,
                                                               tiny_artifacts: dict[str, Path]) -> None:
    store = ModelStore(small_disk / "state")
    blob = artifact.pack_artifact(tiny_artifacts["float"])
    dep = _downloaded(store, blob, version=1)
    unpacked = sum(p.stat().st_size for p in tiny_artifacts["float"].iterdir())
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * max(0, store.free_bytes() - unpacked // 2))  # staging fits, the unpacked slot not
    result = evaluate_candidate(dep, store, SETTINGS, measure=measure_model)
    assert result.report.load_ok is False and result.report.error_kind == "disk_full", result.report.error
    assert "No space left" in result.report.error and result.failed_event == "error"
    assert [p.name for p in store.slots_dir.iterdir()] == []  # no half-written slot is left behind


def test_a_file_that_does_not_match_the_manifest_is_a_verify_error(tmp_path: Path,
                                                                   tiny_artifacts: dict[str, Path]) -> None:
    store = ModelStore(tmp_path / "state")
    dep = _downloaded(store, artifact.pack_artifact(tiny_artifacts["float"]), version=1)
    staged = dep.receiver.staging.path / dep.receiver.staging.DATA
    staged.write_bytes(b"\0" * dep.manifest.total_size)  # rot on the device's disk after the chunks checked out
    result = evaluate_candidate(dep, store, SETTINGS, measure=measure_model)
    assert result.report.error_kind == "verify_error" and result.failed_event == "verify_failed"
    assert "manifest says" in result.report.error


@pytest.mark.parametrize(("exc", "default", "kind"), [
    (OSError(errno.ENOSPC, "No space left on device"), "load_error", "disk_full"),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), "measure_error", "disk_full"),
    (StoreError("cannot write", "disk_full"), "load_error", "disk_full"),
    (StoreError("bad tar", "verify_error"), "load_error", "verify_error"),
    (StoreError("EIO", "io"), "load_error", "load_error"),
    (VerifyError("sha mismatch"), "load_error", "verify_error"),
    (MemoryError(), "measure_error", "measure_error"),  # a memory cap hit while measuring
    (MemoryError(), "load_error", "load_error"),  # ... or while installing/loading
    (ProtocolError("golden.json"), "load_error", "load_error"),
])
def test_failure_kinds(exc: BaseException, default: str, kind: str) -> None:
    assert failure_kind(exc, default) == kind


def test_chunk_frames_can_carry_the_manifests_digest() -> None:
    dep_id = new_deployment_id()
    data = os.urandom(3000)
    digest = hashlib.sha256(data).digest()
    computed = chunking.encode_chunk(dep_id, 1, 3, data)
    assert chunking.encode_chunk(dep_id, 1, 3, data, digest=digest) == computed
    assert chunking.encode_chunk(dep_id, 1, 3, data, digest=digest.hex()) == computed  # as in chunk_sha256
    assert chunking.decode_chunk(computed).data == data
    wrong = chunking.encode_chunk(dep_id, 1, 3, data, digest=hashlib.sha256(b"other").digest())
    with pytest.raises(ProtocolError, match="does not match its digest"):  # never trusted blindly
        chunking.decode_chunk(wrong)
    with pytest.raises(ValueError, match="must be 32 bytes of SHA-256, got 16"):
        chunking.encode_chunk(dep_id, 1, 3, data, digest=b"\0" * 16)
    with pytest.raises(ValueError, match="is not hex"):
        chunking.encode_chunk(dep_id, 1, 3, data, digest="zz" * 32)


# -- a fatal error in the network machinery ends the process ---------------------------------------
PIDS_ROOT = Path("/sys/fs/cgroup/pids")


@pytest.fixture
def pids_cgroup() -> Iterator[Path]:
    """A real pids cgroup (what systemd's TasksMax= sets): once full, no new thread can start."""
    group = PIDS_ROOT / f"edgeguide-test-{uuid.uuid4().hex[:8]}"
    group.mkdir()
    try:
        yield group
    finally:
        for _ in range(50):
            try:
                group.rmdir()
                break
            except OSError:  # still has tasks for a moment after the process exited
                time.sleep(0.1)


def _wait_for_line(path: Path, text: str, count: int, proc: subprocess.Popen, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = path.read_text(errors="replace")
        if log.count(text) >= count:
            return log
        if proc.poll() is not None:
            raise AssertionError(f"agent exited with {proc.returncode} before {count}x {text!r}:\n{log[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"no {count}x {text!r} within {timeout} s:\n{path.read_text(errors='replace')[-3000:]}")


def test_agent_exits_non_zero_when_it_cannot_start_its_network_thread(tmp_path: Path, pids_cgroup: Path) -> None:
    _, pub = new_keypair(tmp_path)
    broker = socket.socket()
    broker.bind(("127.0.0.1", 0))  # bound, not listening yet: connecting is refused (a transient error)
    port = broker.getsockname()[1]
    log = tmp_path / "agent.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "--device-id", "fatal-1", "--broker", f"mqtt://127.0.0.1:{port}",
             "--state-dir", str(tmp_path / "state"), "--server-key", str(pub), "--http-port", "0",
             "--mqtt-protocol", "3.1.1"],
            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=out, stderr=out, stdin=subprocess.DEVNULL)
    try:
        _wait_for_line(log, "broker_unreachable", 2, proc, 60)  # transient: retried with backoff, still up
        assert proc.poll() is None
        (pids_cgroup / "cgroup.procs").write_text(str(proc.pid))
        (pids_cgroup / "pids.max").write_text((pids_cgroup / "pids.current").read_text().strip())
        broker.listen(8)  # the next attempt connects, then paho's loop_start cannot start its thread
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        broker.close()
    text = log.read_text(errors="replace")
    assert code == 3, text[-3000:]
    assert "AGENT_FATAL device=fatal-1 reason=connect thread died: RuntimeError: can't start new thread" in text
    assert "agent_exiting code=3" in text
