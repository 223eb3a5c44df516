"""Shared builders for the agent tests (no tests here): real tiny artifacts and a server stand-in.

`build_artifacts` trains ONE tiny recommender per test process on a data slice and exports it
(float32 and dynamic-range), so every agent test works on real LiteRT models. `ServerPeer` plays
the server over a real broker with protocol/ directly: signed manifests, chunk frames, verdicts,
and (optionally) answering the agent's chunk requests as the real deployer does.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import struct
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol import artifact, chunking, signing
from protocol.messages import Command, Manifest, Verdict
from protocol.mqtt import MqttLink
from protocol.topics import Topics

TFLITE_FULLY_CONNECTED = 9
# Measurement thresholds for in-process agent tests: every pass runs, just briefly.
TINY_MEASURE = {"mode": "quick", "warmup_min_runs": 5, "warmup_min_s": 0.01, "timed_min_runs": 30,
                "timed_min_s": 0.05, "memory_min_runs": 10, "memory_min_s": 0.05, "idle_s": 0.05, "energy_s": 0.1}


@contextmanager
def mounted_tmpfs(mount: Path, size: str) -> Iterator[Path]:
    """A real tmpfs of `size` (e.g. "1m") at `mount` (created): writes past it fail with ENOSPC."""
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


@functools.cache
def build_artifacts(root: str) -> dict[str, Path]:
    """Train one tiny model (200 customers, 1 epoch, dim 8) and export it; cached per process."""
    from compression.data import load_dataset
    from compression.export import export_artifact
    from compression.train import TrainConfig, train_reference

    base = Path(root)
    dataset = load_dataset(max_customers=200)
    model, _ = train_reference(dataset, TrainConfig(epochs=1, dim=8, hidden=16, window=10, batch_size=256),
                               progress=False)
    out = {
        "float": export_artifact(model, dataset, base / "float", model_id="tiny-float", k=10, check_compat=False),
        "dynamic": export_artifact(model, dataset, base / "dynamic", model_id="tiny-dyn", k=10,
                                   quantization="dynamic", check_compat=False),
        "int8": export_artifact(model, dataset, base / "int8", model_id="tiny-int8", k=10,
                                quantization="int8", representative_n=32, check_compat=False),
    }
    # A real model the runtime cannot run: the dynamic one claiming FULLY_CONNECTED version 99.
    bad = base / "opversion"
    shutil.copytree(out["dynamic"], bad)
    tflite = bad / artifact.MODEL_FILE
    tflite.write_bytes(patch_op_version(tflite.read_bytes(), TFLITE_FULLY_CONNECTED, 99))
    out["opversion"] = bad
    return out


def _table_field(buf: bytes, table: int, index: int) -> int:
    """Absolute position of field `index` of the flatbuffer table at `table` (0 if absent)."""
    vtable = table - struct.unpack_from("<i", buf, table)[0]
    vsize = struct.unpack_from("<H", buf, vtable)[0]
    slot = 4 + 2 * index
    if slot >= vsize:
        return 0
    offset = struct.unpack_from("<H", buf, vtable + slot)[0]
    return table + offset if offset else 0


def patch_op_version(tflite: bytes, builtin_code: int, version: int) -> bytes:
    """Rewrite the stored version of one builtin op in a .tflite (Model.operator_codes[i].version)."""
    buf = bytearray(tflite)
    model = struct.unpack_from("<I", buf, 0)[0]
    codes_field = _table_field(buf, model, 1)
    vector = codes_field + struct.unpack_from("<I", buf, codes_field)[0]
    patched = 0
    for i in range(struct.unpack_from("<I", buf, vector)[0]):
        pos = vector + 4 + 4 * i
        table = pos + struct.unpack_from("<I", buf, pos)[0]
        code_pos = _table_field(buf, table, 3)
        code = struct.unpack_from("<i", buf, code_pos)[0] if code_pos else None
        version_pos = _table_field(buf, table, 2)
        if code == builtin_code and version_pos:
            struct.pack_into("<i", buf, version_pos, version)
            patched += 1
    if not patched:
        raise ValueError(f"no stored version for builtin op {builtin_code} in this model")
    return bytes(buf)


def new_deployment_id() -> str:
    return f"d-{uuid.uuid4().hex[:12]}"


@dataclass
class Received:
    kind: str
    payload: bytes
    retained: bool = False

    @property
    def json(self) -> dict[str, Any]:
        return json.loads(self.payload)


@dataclass
class ServerPeer:
    """The server's side of the protocol, for tests: publish down, record everything up."""

    url: str
    topics: Topics
    device_id: str
    key: Ed25519PrivateKey
    auto_chunks: bool = True
    blobs: dict[str, tuple[bytes, int]] = field(default_factory=dict)
    received: list[Received] = field(default_factory=list)
    chunk_filter: Callable[[str, int, bytes], bytes | None] | None = None

    def __post_init__(self) -> None:
        self._cond = threading.Condition()
        self.link = MqttLink(self.url, client_id=f"test-server-{uuid.uuid4().hex[:8]}", clean_start=True)
        self.link.subscribe(f"{self.topics.prefix}/dev/{self.device_id}/up/+", self._on_up)

    def start(self) -> ServerPeer:
        self.link.start()
        return self

    def stop(self) -> None:
        self.link.stop()

    def _on_up(self, topic: str, payload: bytes) -> None:
        kind = topic.rsplit("/", 1)[-1]
        with self._cond:
            self.received.append(Received(kind, payload))
            self._cond.notify_all()
        if kind == "event" and self.auto_chunks:
            event = json.loads(payload)
            if event["type"] in {"manifest_accepted", "need_chunks"} and event.get("deployment_id") in self.blobs:
                self.send_chunks(event["deployment_id"], event.get("missing") or [])

    # -- waiting ----------------------------------------------------------------------------
    def wait_for(self, kind: str, pred: Callable[[dict[str, Any]], bool] = lambda _m: True,
                 timeout: float = 30.0, start: int = 0) -> dict[str, Any]:
        """First message of `kind` (from index `start` on) whose JSON satisfies `pred`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for msg in self.received[start:]:
                    if msg.kind == kind and pred(msg.json):
                        return msg.json
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = [(m.kind, m.payload[:160]) for m in self.received]
                    raise AssertionError(f"no {kind} message matching within {timeout} s; received: {seen}")
                self._cond.wait(left)

    def wait_event(self, type_: str, deployment_id: str | None = None, timeout: float = 30.0,
                   start: int = 0) -> dict[str, Any]:
        return self.wait_for("event", lambda e: e["type"] == type_ and (
            deployment_id is None or e.get("deployment_id") == deployment_id), timeout, start)

    def events(self, deployment_id: str | None = None) -> list[dict[str, Any]]:
        with self._cond:
            return [m.json for m in self.received if m.kind == "event"
                    and (deployment_id is None or m.json.get("deployment_id") == deployment_id)]

    def mark(self) -> int:
        with self._cond:
            return len(self.received)

    # -- sending ----------------------------------------------------------------------------
    def make_manifest(self, blob: bytes, *, version: int, model_id: str = "tiny-float", chunk_size: int = 16384,
                      deployment_id: str | None = None, device_id: str | None = None,
                      key: Ed25519PrivateKey | None | bool = None, rollback: bool = False) -> Manifest:
        """A manifest for `blob`, signed with the server key (or `key`; key=False leaves it unsigned)."""
        dep = deployment_id or new_deployment_id()
        manifest = Manifest(deployment_id=dep, device_id=device_id or self.device_id, model_id=model_id,
                            version=version, total_size=len(blob), sha256=hashlib.sha256(blob).hexdigest(),
                            chunk_size=chunk_size, chunk_sha256=chunking.digests(blob, chunk_size), rollback=rollback)
        self.blobs[dep] = (blob, chunk_size)
        if key is False:
            return manifest
        return manifest.signed(key if isinstance(key, Ed25519PrivateKey) else self.key)

    def send_manifest(self, manifest: Manifest) -> None:
        self.link.publish(self.topics.down(self.device_id, "manifest"), manifest.to_json()).wait(5)

    def deploy(self, blob: bytes, **kwargs: Any) -> Manifest:
        manifest = self.make_manifest(blob, **kwargs)
        self.send_manifest(manifest)
        return manifest

    def send_chunks(self, deployment_id: str, indices: Iterable[int]) -> None:
        blob, size = self.blobs[deployment_id]
        pieces = chunking.split(blob, size)
        for i in indices:
            frame = chunking.encode_chunk(deployment_id, i, len(pieces), pieces[i])
            if self.chunk_filter is not None:
                frame = self.chunk_filter(deployment_id, i, frame)
                if frame is None:
                    continue
            self.link.publish(self.topics.down(self.device_id, "chunk"), frame)

    def send_raw_chunk(self, frame: bytes) -> None:
        self.link.publish(self.topics.down(self.device_id, "chunk"), frame).wait(5)

    def send_verdict(self, manifest: Manifest, verdict: str = "PASS", *, key: Ed25519PrivateKey | None | bool = None,
                     deployment_id: str | None = None, reason: str = "") -> Verdict:
        v = Verdict(deployment_id=deployment_id or manifest.deployment_id, device_id=self.device_id,
                    model_id=manifest.model_id, version=manifest.version, verdict=verdict, reason=reason)
        if key is not False:
            v = v.signed(key if isinstance(key, Ed25519PrivateKey) else self.key)
        self.link.publish(self.topics.down(self.device_id, "verdict"), v.to_json()).wait(5)
        return v

    def send_command(self, command: str, deployment_id: str | None = None) -> None:
        c = Command(device_id=self.device_id, command=command, deployment_id=deployment_id).signed(self.key)
        self.link.publish(self.topics.down(self.device_id, "command"), c.to_json()).wait(5)


def new_keypair(tmp: Path) -> tuple[Ed25519PrivateKey, Path]:
    """A server signing key and the public PEM an agent pins."""
    key = signing.generate_private_key()
    pub = tmp / "server_pub.pem"
    signing.save_public_key(key.public_key(), pub)
    return key, pub


def staging_bitmap(state_dir: Path, deployment_id: str) -> str:
    """The persisted chunk bitmap ('0'/'1' per chunk) of a download in progress."""
    return json.loads((state_dir / "staging" / deployment_id / "bitmap.json").read_text())["have"]
