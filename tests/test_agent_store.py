"""State directory, resumable staging, manifest admission, chunk receiving and the report outbox.

Artifacts here are packed from small files of random bytes: these tests are about storage, not
about models (loading is covered in test_agent_runtime / test_loop_agent).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_agent_support import mounted_tmpfs, new_keypair

from agent.outbox import Outbox, OutboxFlusher
from agent.store import ModelStore, Staging, StoreError
from agent.transfer import Admission, ChunkRejected, ManifestRejected, Receiver, VerifyError, check_manifest
from protocol import artifact, chunking, signing
from protocol.messages import Manifest
from protocol.mqtt import MqttLink
from server.mosquitto import MosquittoBroker


def make_blob(tmp: Path, tag: str, model_bytes: int = 4096) -> bytes:
    folder = tmp / f"art-{tag}"
    folder.mkdir()
    (folder / artifact.MODEL_FILE).write_bytes(os.urandom(model_bytes))
    (folder / artifact.ITEMS_FILE).write_text(json.dumps({"format": 1, "items": [["", "<padding>"], ["A", tag]]}))
    (folder / artifact.METRICS_FILE).write_text(json.dumps({"format": 1, "model_id": tag}))
    (folder / artifact.GOLDEN_FILE).write_text(json.dumps({"format": 1, "histories": [[1]], "item_ids": [[1]]}))
    return artifact.pack_artifact(folder)


def install(store: ModelStore, blob: bytes, version: int, model_id: str = "m") -> object:
    return store.install_candidate(blob, model_id=model_id, version=version, deployment_id=f"d-{version:012x}",
                                   max_unpacked_bytes=64 << 20)


def test_slots_pointer_previous_and_rollback(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "state")
    assert store.active() is None and store.inactive_slot() == "a"
    one = install(store, make_blob(tmp_path, "one"), 1)
    assert store.active() is None  # installing never activates
    store.promote(one)
    two = install(store, make_blob(tmp_path, "two"), 2)
    assert two.slot == "b"
    pointer = store.promote(two)
    assert (pointer.current.version, pointer.previous.version) == (2, 1)
    assert store.active() == pointer
    assert json.loads((store.root / "active.json").read_text())["previous"]["slot"] == "a"
    assert [p.name for p in store.root.iterdir() if p.name.endswith(".tmp")] == []
    back = store.rollback()
    assert back.current.version == 1 and back.previous is None
    with pytest.raises(StoreError, match="no previous model"):
        store.rollback()
    with pytest.raises(StoreError, match="it is the active slot"):
        store.discard_candidate(back.current)


def test_installing_over_the_previous_slot_forgets_it(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "state")
    store.promote(install(store, make_blob(tmp_path, "one"), 1))
    store.promote(install(store, make_blob(tmp_path, "two"), 2))
    three = install(store, make_blob(tmp_path, "three"), 3)
    assert three.slot == "a" and store.active().previous is None
    assert store.slot_contents("a").version == 3
    store.discard_candidate(three)
    assert store.slot_contents("a") is None and not store.slot_path("a").exists()
    assert store.active().current.version == 2


def test_corrupt_pointer_and_leftover_tmp_slots(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "state")
    store.promote(install(store, make_blob(tmp_path, "one"), 1))
    (store.slots_dir / ".tmp-b-deadbeef").mkdir()
    (store.root / "active.json").write_text('{"slot": "z"')
    reopened = ModelStore(tmp_path / "state")
    assert not (reopened.slots_dir / ".tmp-b-deadbeef").exists()
    assert reopened.active() is None


def test_unpack_failure_is_a_verify_error_and_leaves_no_slot(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "state")
    with pytest.raises(StoreError, match="cannot be unpacked") as info:
        store.install_candidate(b"not gzip at all", model_id="m", version=1, deployment_id="d-000000000001",
                                max_unpacked_bytes=1 << 20)
    assert info.value.kind == "verify_error"
    assert list(store.slots_dir.iterdir()) == []


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB filesystem (tmpfs): writes past it fail with ENOSPC."""
    with mounted_tmpfs(tmp_path / "disk", "1m") as mount:
        yield mount


def test_disk_full_fails_cleanly_and_keeps_the_active_model(small_disk: Path, tmp_path: Path) -> None:
    store = ModelStore(small_disk / "state")
    active_blob = make_blob(tmp_path, "active", 200_000)
    store.promote(install(store, active_blob, 1))
    active_file = store.slot_path("a") / artifact.MODEL_FILE
    before = hashlib.sha256(active_file.read_bytes()).hexdigest()
    filler = small_disk / "filler"
    free = store.free_bytes()
    filler.write_bytes(b"\0" * (free - 150_000))
    with pytest.raises(StoreError) as info:
        install(store, make_blob(tmp_path, "big", 300_000), 2)
    assert info.value.kind == "disk_full" and "No space left" in str(info.value)
    assert store.active().current.version == 1
    assert hashlib.sha256(active_file.read_bytes()).hexdigest() == before
    assert [p.name for p in store.slots_dir.iterdir()] == ["a"]  # the temporary dir is gone
    manifest = Manifest(deployment_id="d-00000000000f", device_id="dev", model_id="m", version=2,
                        total_size=400_000, sha256="0" * 64, chunk_size=65536,
                        chunk_sha256=["0" * 64] * 7)
    with pytest.raises(StoreError) as staged:
        Staging.create(store.staging(manifest.deployment_id), manifest)
    assert staged.value.kind == "disk_full"
    assert not store.staging(manifest.deployment_id).exists()


def _manifest(blob: bytes, chunk_size: int = 1000, **kw: object) -> Manifest:
    body = {"deployment_id": "d-0000000000aa", "device_id": "dev-1", "model_id": "m", "version": 2,
            "total_size": len(blob), "sha256": hashlib.sha256(blob).hexdigest(), "chunk_size": chunk_size,
            "chunk_sha256": chunking.digests(blob, chunk_size)} | kw
    return Manifest(**body)  # type: ignore[arg-type]


def test_staging_resume_reverifies_what_the_bitmap_claims(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "state")
    blob = os.urandom(5500)
    manifest = _manifest(blob)
    receiver = Receiver.start(store, manifest)
    pieces = chunking.split(blob, 1000)
    for i in (4, 0, 5, 2):
        assert receiver.accept(chunking.decode_chunk(chunking.encode_chunk(manifest.deployment_id, i, 6, pieces[i])))
    assert receiver.accept(chunking.decode_chunk(chunking.encode_chunk(manifest.deployment_id, 2, 6, pieces[2]))) \
        is False  # duplicate
    assert receiver.missing() == [1, 3]
    receiver.flush()  # chunks are durable (and claimed by the bitmap) only once flushed
    data = store.staging(manifest.deployment_id) / "data.bin"
    assert data.stat().st_size == len(blob)  # preallocated
    with open(data, "r+b") as fh:  # a torn write on chunk 5 that the bitmap already counts
        fh.seek(5000)
        fh.write(b"\xff" * 10)
    resumed = Receiver.resume(store, manifest.deployment_id)
    assert resumed.missing() == [1, 3, 5]
    again = Receiver.start(store, manifest)  # the same manifest redelivered: resume, not restart
    assert again.missing() == [1, 3, 5]
    for i in (1, 3, 5):
        resumed.accept(chunking.decode_chunk(chunking.encode_chunk(manifest.deployment_id, i, 6, pieces[i])))
    assert resumed.complete and resumed.assemble() == blob


def test_chunks_are_flushed_in_batches_and_on_completion(tmp_path: Path) -> None:
    blob = os.urandom(7 * 1000 + 1)
    manifest = _manifest(blob)
    staging = Staging.create(tmp_path / manifest.deployment_id, manifest, flush_every=3, flush_interval_s=3600)
    bitmap = tmp_path / manifest.deployment_id / Staging.BITMAP
    pieces = chunking.split(blob, 1000)
    for i in range(7):
        staging.write_chunk(i, pieces[i])
    assert staging.flushes == 2 and staging.unflushed == 1  # after chunks 3 and 6, not per chunk
    assert json.loads(bitmap.read_text())["have"] == "11111100"
    staging.write_chunk(7, pieces[7])  # the last chunk flushes whatever is pending
    assert staging.complete and staging.unflushed == 0 and staging.flushes == 3
    assert json.loads(bitmap.read_text())["have"] == "1" * 8
    staging.flush()  # nothing pending: no extra fsyncs
    assert staging.flushes == 3 and staging.read_blob() == blob
    with pytest.raises(ValueError, match="flush_every must be >= 1"):
        Staging(tmp_path, manifest, [False] * 8, flush_every=0)


_KILL_BETWEEN_FLUSHES = """
import os, signal, sys
from pathlib import Path
from agent.store import Staging
from protocol.messages import Manifest
path = Path(sys.argv[1])
staging = Staging.open(path, flush_every=4, flush_interval_s=3600)
blob = Path(sys.argv[2]).read_bytes()
for i in range(10):  # flushes after chunks 3 and 7; chunks 8 and 9 are written but not yet flushed
    staging.write_chunk(i, blob[i * 1000:(i + 1) * 1000])
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_kill_9_between_flushes_loses_only_the_unflushed_chunks(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "state")
    blob = os.urandom(12 * 1000)
    manifest = _manifest(blob)
    Receiver.start(store, manifest)
    (tmp_path / "blob.bin").write_bytes(blob)
    proc = subprocess.run([sys.executable, "-c", _KILL_BETWEEN_FLUSHES, str(store.staging(manifest.deployment_id)),
                           str(tmp_path / "blob.bin")], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    resumed = Receiver.resume(store, manifest.deployment_id)
    assert resumed.missing() == [8, 9, 10, 11]  # the unflushed chunks are simply asked for again
    pieces = chunking.split(blob, 1000)
    for i in resumed.missing():
        resumed.accept(chunking.decode_chunk(chunking.encode_chunk(manifest.deployment_id, i, 12, pieces[i])))
    assert resumed.complete and resumed.assemble() == blob


def test_chunks_that_do_not_fit_the_manifest_are_rejected(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "state")
    blob = os.urandom(2500)
    manifest = _manifest(blob)
    receiver = Receiver.start(store, manifest)
    dep = manifest.deployment_id
    with pytest.raises(ChunkRejected, match="differs from the manifest") as info:
        receiver.accept(chunking.decode_chunk(chunking.encode_chunk(dep, 1, 3, os.urandom(1000))))
    assert info.value.index == 1
    with pytest.raises(ChunkRejected, match="has 999 bytes, manifest says 1000"):
        receiver.accept(chunking.decode_chunk(chunking.encode_chunk(dep, 0, 3, blob[:999])))
    with pytest.raises(ChunkRejected, match="does not fit the manifest's 3 chunks"):
        receiver.accept(chunking.decode_chunk(chunking.encode_chunk(dep, 0, 4, blob[:1000])))
    with pytest.raises(ChunkRejected, match="does not belong"):
        receiver.accept(chunking.decode_chunk(chunking.encode_chunk("d-0000000000bb", 0, 3, blob[:1000])))
    assert receiver.missing() == [0, 1, 2]


def test_whole_file_digest_is_checked_after_the_chunks(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "state")
    blob = os.urandom(1500)
    manifest = _manifest(blob, sha256="ab" * 32)  # chunk digests right, file digest wrong
    receiver = Receiver.start(store, manifest)
    for i, piece in enumerate(chunking.split(blob, 1000)):
        receiver.accept(chunking.decode_chunk(chunking.encode_chunk(manifest.deployment_id, i, 2, piece)))
    with pytest.raises(VerifyError, match="manifest says 1500 bytes with sha256 abab"):
        receiver.assemble()


def test_manifest_admission(tmp_path: Path) -> None:
    key, pub = new_keypair(tmp_path)
    blob = os.urandom(3000)
    adm = Admission(device_id="dev-1", server_key=signing.load_public_key(pub), active_version=2,
                    quota_bytes=10_000, free_bytes=1 << 30)

    def reason(m: Manifest, admission: Admission = adm) -> str:
        with pytest.raises(ManifestRejected) as info:
            check_manifest(m.to_json(), admission)
        return info.value.reason

    good = _manifest(blob, version=3).signed(key)
    assert check_manifest(good.to_json(), adm) == good
    assert check_manifest(_manifest(blob, version=1, rollback=True).signed(key).to_json(), adm).rollback
    assert "not newer than the active version 2" in reason(_manifest(blob, version=2).signed(key))
    assert "for device 'dev-2'" in reason(_manifest(blob, version=3, device_id="dev-2").signed(key))
    assert "not signed" in reason(_manifest(blob, version=3))
    tampered = Manifest(**{**good.__dict__, "version": 9})
    assert "pinned server key" in reason(tampered)
    assert "exceeds the device quota 1000" in reason(good, Admission(**{**adm.__dict__, "quota_bytes": 1000}))
    assert "not enough free disk" in reason(good, Admission(**{**adm.__dict__, "free_bytes": 5000}))
    with pytest.raises(ManifestRejected, match="malformed manifest"):
        check_manifest(b'{"deployment_id": "d-0000000000aa"}', adm)


def test_manifest_older_than_the_newest_admitted_is_a_replay(tmp_path: Path) -> None:
    key, pub = new_keypair(tmp_path)
    blob = os.urandom(3000)
    store = ModelStore(tmp_path / "state")
    assert store.newest_admitted() is None  # a fresh device (or one from before this rule) checks nothing
    store.note_admitted("2026-12-01T10:00:00.000+00:00")
    adm = Admission(device_id="dev-1", server_key=signing.load_public_key(pub), active_version=2,
                    quota_bytes=10_000, free_bytes=1 << 30, newest_admitted=ModelStore(store.root).newest_admitted())
    same = _manifest(blob, version=3, created="2026-12-01T10:00:00.000+00:00").signed(key)
    later = _manifest(blob, version=3, created="2026-12-01T10:00:00.001+00:00").signed(key)
    assert check_manifest(same.to_json(), adm) == same  # its own re-send: equal times are not older
    assert check_manifest(later.to_json(), adm) == later
    with pytest.raises(ManifestRejected, match="older than the newest manifest this device admitted"):
        check_manifest(_manifest(blob, version=9, created="2026-12-01T09:59:59.999+00:00").signed(key).to_json(), adm)
    with pytest.raises(ManifestRejected, match="is not an ISO 8601 time"):
        check_manifest(_manifest(blob, version=3, created="yesterday").signed(key).to_json(), adm)
    (store.root / "admitted.json").write_text("[not an object")  # unreadable: treated as a fresh device
    assert store.newest_admitted() is None


# -- outbox -----------------------------------------------------------------------------------

def test_outbox_is_bounded_ordered_and_survives_a_restart(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox", max_bytes=70_000)
    for i in range(4):
        box.put("t/report", json.dumps({"n": i, "pad": "x" * 20_000}).encode())
    reopened = Outbox(tmp_path / "outbox", max_bytes=70_000)
    kept = [json.loads(reopened.read(p)[1])["n"] for p in reopened.pending()]
    assert kept == [1, 2, 3]  # the oldest went when the bound was reached
    delivered: list[int] = []

    def flaky(topic: str, payload: bytes) -> bool:
        if len(delivered) == 1:
            delivered.append(-1)
            return False
        delivered.append(json.loads(payload)["n"])
        return True

    assert reopened.flush(flaky) == 1
    assert [json.loads(reopened.read(p)[1])["n"] for p in reopened.pending()] == [2, 3]
    assert reopened.flush(flaky) == 2 and reopened.pending() == []
    assert delivered == [1, -1, 2, 3]
    with pytest.raises(ValueError, match="exceeds the outbox bound"):
        reopened.put("t", b"x" * 80_000)


def test_outbox_delivers_after_the_broker_comes_back(tmp_path: Path) -> None:
    # "user root": as root, mosquitto otherwise drops to user mosquitto and cannot save its
    # persistence file in our temp dir, so the receiver's session would not survive the restart.
    broker = MosquittoBroker(workdir=tmp_path / "broker", extra_conf=["user root"]).start()
    topic = f"eg-outbox-{uuid.uuid4().hex[:8]}/report"
    got: list[bytes] = []
    arrived = threading.Event()
    sender = MqttLink(broker.url, client_id=f"box-{uuid.uuid4().hex[:6]}")
    receiver = MqttLink(broker.url, client_id=f"rx-{uuid.uuid4().hex[:6]}")
    receiver.subscribe(topic, lambda _t, p: (got.append(p), arrived.set()))
    box = Outbox(tmp_path / "outbox", max_bytes=1 << 20)

    def send(t: str, payload: bytes) -> bool:
        return sender.publish(t, payload, qos=1).wait(5)

    flusher = OutboxFlusher(box, send, lambda: sender.connected, min_backoff_s=0.2, max_backoff_s=1.0)
    sender.add_connect_listener(flusher.kick)
    try:
        sender.start()
        receiver.start()
        broker.stop()
        deadline = time.monotonic() + 10
        while sender.connected and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not sender.connected
        flusher.start()
        box.put(topic, b'{"report": 1}')
        flusher.kick()
        time.sleep(0.5)
        assert len(box.pending()) == 1  # kept on disk while the broker is away
        broker.start()
        assert arrived.wait(30), "report not delivered after the broker came back"
        assert got == [b'{"report": 1}']
        deadline = time.monotonic() + 5
        while box.pending() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert box.pending() == []
    finally:
        flusher.stop()
        sender.stop()
        receiver.stop()
        broker.stop()
