"""Model delivery under faults: the device always ends on a verified model and the server knows which.

Everything is real: mosquitto (its own instance, persistence on, so it can be restarted), the
server (`EdgeGuideServer`: registry, deployer, gate) in this process, and device agents as
`python -m agent` child processes that are killed with SIGKILL. Faults on the wire are injected
by `FaultyNetwork`, which sits between the real deployer and the broker and drops, duplicates,
reorders, corrupts or truncates chunk frames and tampers with manifests; forged and replayed
messages are published by an attacker client of its own.

After every fault the same invariant is checked (`assert_outcome`): the deployment reached a
terminal status with a reason, the agent serves the new model if and only if the registry says
`promoted` (otherwise the previous one), and the registry's device record and the agent's
on-disk active pointer name that same version.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from attack_support import wait_until

from protocol import artifact, chunking, signing
from protocol.messages import Manifest
from protocol.mqtt import MqttLink
from protocol.topics import Topics
from server import keys
from server.deployer import DeployerConfig
from server.local_agent import LocalAgent
from server.mosquitto import MosquittoBroker
from server.registry import ArtifactRecord, DeploymentRecord, Registry
from server.service import EdgeGuideServer, ServerConfig

pytestmark = [pytest.mark.network, pytest.mark.slow]

SEED = 20260611
CHUNK = 2048  # small chunks: ~50-90 per tiny model, so kills and restarts land mid-transfer
KILL_ROUNDS = 7  # three kills per round: download, verification, swap
SETTLE_S = 90.0
PREFIX = f"eg-faults-{uuid.uuid4().hex[:6]}"


# -- fixtures: artifacts, broker, server ---------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tiny_artifacts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The session's tiny float32 and dynamic-range exports, plus a copy whose model file is cut in half."""
    truncated = tmp_path_factory.mktemp("fault-models") / "truncated"
    shutil.copytree(tiny_artifacts["dynamic"], truncated)
    tflite = truncated / artifact.MODEL_FILE
    tflite.write_bytes(tflite.read_bytes()[: tflite.stat().st_size // 2])
    return {"float": tiny_artifacts["float"], "dyn": tiny_artifacts["dynamic"], "truncated": truncated}


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    """A broker of our own: the broker-restart test must not disturb the session broker."""
    # As root mosquitto drops to its own user, which cannot write pytest's 0700 dirs: no persistence.
    extra = ["user root"] if os.geteuid() == 0 else []
    b = MosquittoBroker(workdir=tmp_path_factory.mktemp("fault-broker"), extra_conf=extra)
    b.start()
    yield b
    b.stop()


class FaultyNetwork:
    """The path from the real deployer to the broker, misbehaving on chunk frames and manifests as told.

    Index sets apply to the first transmission of a chunk unless `every_time` is set, so the
    deployer's re-sends get through. Reordering holds frames back and releases them shuffled.
    """

    def __init__(self, publish: Callable[[str, bytes], None]) -> None:
        self._publish = publish
        self._lock = threading.Lock()
        self.reset()

    def reset(self, *, drop: set[int] | None = None, duplicate: set[int] | None = None,
              bitrot: set[int] | None = None, wrong_data: set[int] | None = None, short: set[int] | None = None,
              every_time: bool = False, reorder: bool = False, delay_s: float = 0.0,
              tamper_manifest: Callable[[bytes], bytes] | None = None, seed: int = SEED) -> None:
        with self._lock:
            self.drop, self.duplicate = drop or set(), duplicate or set()
            self.bitrot, self.wrong_data, self.short = bitrot or set(), wrong_data or set(), short or set()
            self.every_time, self.reorder, self.delay_s = every_time, reorder, delay_s
            self.tamper_manifest = tamper_manifest
            self.rng = random.Random(seed)
            self.transmissions: Counter[int] = Counter()
            self.manifests: list[bytes] = []
            self._held: list[tuple[str, bytes]] = []
            self._timer: threading.Timer | None = None

    def __call__(self, topic: str, payload: bytes) -> None:
        kind = topic.rsplit("/", 1)[-1]
        if kind == "manifest":
            self.manifests.append(payload)
            if self.tamper_manifest is not None:
                payload = self.tamper_manifest(payload)
        if kind != "chunk":
            self._publish(topic, payload)
            return
        index = chunking.decode_chunk(payload).index
        with self._lock:
            self.transmissions[index] += 1
            hit = self.every_time or self.transmissions[index] == 1
            frames = self._mangle(index, payload) if hit else [payload]
            if self.reorder:
                self._held.extend((topic, f) for f in frames)
                self._arm_flush()
                frames = [self._held.pop(self.rng.randrange(len(self._held)))[1]] if len(self._held) > 6 else []
        for frame in frames:
            if self.delay_s:
                time.sleep(self.delay_s)
            self._publish(topic, frame)

    def _mangle(self, index: int, frame: bytes) -> list[bytes]:
        if index in self.drop:
            return []
        if index in self.bitrot:  # the frame's own digest no longer matches
            frame = frame[:-1] + bytes([frame[-1] ^ 0x5A])
        chunk = chunking.decode_chunk(frame) if (index in self.wrong_data or index in self.short) else None
        if chunk is not None and index in self.wrong_data:  # self-consistent frame, not what was signed
            frame = chunking.encode_chunk(chunk.deployment_id, index, chunk.count, bytes(reversed(chunk.data)))
        if chunk is not None and index in self.short:  # truncated in transit, digest recomputed
            frame = chunking.encode_chunk(chunk.deployment_id, index, chunk.count, chunk.data[: len(chunk.data) // 2])
        return [frame, frame] if index in self.duplicate else [frame]

    def _arm_flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = threading.Timer(0.05, self._flush)
        self._timer.daemon = True
        self._timer.start()

    def _flush(self) -> None:
        with self._lock:
            held, self._held = self._held, []
            self.rng.shuffle(held)
        for topic, frame in held:
            self._publish(topic, frame)


class KillableAgent(LocalAgent):
    """A real agent process that can also die without warning."""

    def kill9(self) -> None:
        proc, self.proc = self.proc, None
        assert proc is not None and proc.poll() is None, f"agent {self.device_id} is not running"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)


@dataclass
class Device:
    """One device under test: its agent process and where its state lives."""

    agent: KillableAgent
    state_dir: Path
    kills: list[dict] = field(default_factory=list)

    @property
    def device_id(self) -> str:
        return self.agent.device_id

    def serving(self) -> tuple[str | None, int | None]:
        """(model_id, version) the agent's HTTP API says it serves right now."""
        info = self.agent.model()
        return info.get("model_id"), info.get("version")

    def pointer_version(self) -> int | None:
        """The version named by the on-disk active pointer (read only: the agent owns the store)."""
        path = self.state_dir / "active.json"
        return json.loads(path.read_text())["version"] if path.exists() else None

    def bitmap_count(self, deployment_id: str) -> int | None:
        try:
            bitmap = self.state_dir / "staging" / deployment_id / "bitmap.json"
            return json.loads(bitmap.read_text())["have"].count("1")
        except (OSError, ValueError, KeyError):
            return None

    def written_count(self, deployment_id: str, chunk: int) -> int | None:
        """Chunks already written into the staging file, flushed or not (the file is preallocated with
        zeros and a gzip stream has no all-zero chunk)."""
        try:
            data = (self.state_dir / "staging" / deployment_id / "data.bin").read_bytes()
        except OSError:
            return None
        return sum(1 for i in range(0, len(data), chunk) if data[i:i + chunk].count(0) != len(data[i:i + chunk]))

    def kill_and_restart(self, phase: str, detail: dict) -> None:
        self.agent.kill9()
        self.kills.append({"phase": phase, **detail})
        self.agent.start()


class Rig:
    """The server side (registry + real server + faulty network) shared by the tests of this module."""

    def __init__(self, broker: MosquittoBroker, root: Path, models: dict[str, Path]) -> None:
        self.broker = broker
        self.root = root
        self.models = models
        self.registry = Registry(root / "server-data")
        self.topics = Topics(PREFIX)
        self.server = EdgeGuideServer(
            self.registry,
            ServerConfig(broker_url=broker.url, client_id=f"srv-{uuid.uuid4().hex[:6]}", topic_prefix=PREFIX,
                         tick_s=0.2),
            deployer_config=DeployerConfig(chunk_size=CHUNK, max_resends=6, deadline_s=SETTLE_S))
        self.net = FaultyNetwork(self.server.deployer.publish)
        self.server.deployer.publish = self.net
        self.server.start()
        self.pub_key = keys.export_public_key(self.registry.data_dir, root / "server_pub.pem")
        self.base = self.register("float")
        self.devices: list[Device] = []

    def register(self, name: str) -> ArtifactRecord:
        return self.registry.register(self.models[name])

    def device(self, tag: str, *, preinstall: ArtifactRecord | None = None, state_dir: Path | None = None,
               extra_args: tuple[str, ...] = ()) -> Device:
        """Start an agent whose active model is `preinstall` (installed by the agent's own store code)."""
        device_id = f"{tag}-{uuid.uuid4().hex[:6]}"
        state_dir = state_dir or self.root / device_id / "state"
        if preinstall is not None:
            from agent.store import ModelStore

            store = ModelStore(state_dir)
            ref = store.install_candidate(preinstall.packed_path.read_bytes(), model_id=preinstall.model_id,
                                          version=preinstall.version, deployment_id="d-000000000000",
                                          max_unpacked_bytes=64 << 20)
            store.promote(ref)
            store.mark_finished(ref.deployment_id)  # as after the deployment that installed it
        agent = KillableAgent(device_id, self.broker.url, state_dir, self.pub_key, topic_prefix=PREFIX,
                              log_path=self.root / f"{device_id}.log",
                              extra_args=["--chunk-stall-s", "1", "--heartbeat-s", "2", "--verdict-timeout-s", "60",
                                          *extra_args])
        agent.start()
        dev = Device(agent, state_dir)
        self.devices.append(dev)
        wait_until(lambda: self.registry.find_device(device_id) is not None, 15, f"{device_id} seen by the server")
        return dev

    def deploy(self, record: ArtifactRecord, dev: Device) -> str:
        return self.server.deploy(record.model_id, dev.device_id, version=record.version).deployment_id

    def status(self, deployment_id: str) -> str:
        return self.registry.deployment(deployment_id).status

    def device_events(self, deployment_id: str) -> list[str]:
        return [e["kind"] for e in self.registry.events(deployment_id=deployment_id)]

    def stop_devices(self) -> None:
        for dev in self.devices:
            dev.agent.stop()
        self.devices.clear()

    def close(self) -> None:
        self.stop_devices()
        self.server.stop()
        self.registry.close()


@pytest.fixture(scope="module")
def rig(broker: MosquittoBroker, models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    r = Rig(broker, tmp_path_factory.mktemp("fault-rig"), models)
    yield r
    r.close()


@pytest.fixture(autouse=True)
def clean_rig(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test starts with a well-behaved network and ends with its agents stopped."""
    if "rig" not in request.fixturenames:
        yield
        return
    rig = request.getfixturevalue("rig")
    rig.net.reset()
    yield
    rig.net.reset()
    rig.stop_devices()


def assert_outcome(rig: Rig, dev: Device, deployment_id: str, old: ArtifactRecord | None,
                   new: ArtifactRecord) -> DeploymentRecord:
    """The device serves `new` iff the registry says promoted, else `old`; every record agrees."""
    try:
        dep = rig.server.wait(deployment_id, timeout=SETTLE_S, poll_s=0.05)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}; events: {rig.device_events(deployment_id)}; "
                             f"agent log:\n{dev.agent.log_tail()}") from exc
    assert dep.reason, f"{deployment_id} ended {dep.status} without a reason"
    expected = new if dep.status == "promoted" else old
    want = (expected.model_id, expected.version) if expected else (None, None)
    assert dev.serving() == want, (f"registry says {dep.status} ({dep.reason}) but the agent serves "
                                   f"{dev.serving()}, expected {want}")
    assert dev.pointer_version() == want[1]
    wait_until(lambda: rig.registry.device(dev.device_id).active_version == want[1], 15,
               f"the registry's record of {dev.device_id} to say version {want[1]}")
    # The server may end a deployment first (e.g. giving up, then sending `cancel`): allow the agent a moment.
    wait_until(lambda: not any((dev.state_dir / "staging").iterdir()), 10,
               f"{dev.device_id} to clean up the staging of the finished {deployment_id}")
    return dep


# -- kill -9 --------------------------------------------------------------------------------------------
def test_kill_9_at_seeded_random_points_during_download_verification_and_swap(rig: Rig) -> None:
    rng = random.Random(SEED)
    dev = rig.device("kill", preinstall=rig.base)
    current = rig.base
    outcomes = []
    for round_no in range(KILL_ROUNDS):
        new = rig.register("dyn" if round_no % 2 == 0 else "float")
        chunks = -(-new.size // CHUNK)
        # 1. download: kill once a random number of chunks was written; chunks are flushed (fsync +
        # bitmap) in batches, so some of them are usually not yet claimed by the bitmap: those must
        # be re-requested. The stream is paced so a 10 ms poll can land mid-download.
        rig.net.reset(delay_s=0.004)
        dep_id = rig.deploy(new, dev)
        target = rng.randint(1, chunks - 1)
        have = wait_until(lambda d=dep_id, t=target: (c := dev.written_count(d, CHUNK)) is not None and c >= t and c,
                          60, f"{target} chunks of {dep_id} written")
        dev.kill_and_restart("download", {"round": round_no, "target": target, "written": have,
                                          "bitmap": dev.bitmap_count(dep_id), "of": chunks})
        rig.net.reset()
        # 2. verification (whole-file hash, unpack, load, measure): a random moment after the download
        wait_until(lambda d=dep_id: rig.status(d) != "transferring", 60, f"{dep_id} to finish downloading")
        delay = rng.uniform(0.0, 1.5)
        time.sleep(delay)
        dev.kill_and_restart("verification", {"round": round_no, "delay_s": round(delay, 3),
                                              "status": rig.status(dep_id)})
        # 3. swap: a random moment after the verdict was sent, or right after the pointer switched
        if round_no % 2 == 0:
            wait_until(lambda d=dep_id: rig.status(d) not in {"pending", "transferring", "measuring"}, 60,
                       f"the verdict on {dep_id}")
            trigger, delay = "verdict", rng.uniform(0.0, 0.4)
        else:
            switched = lambda v=new.version, d=dep_id: (  # noqa: E731
                dev.pointer_version() == v or rig.registry.deployment(d).terminal)
            wait_until(switched, 60, f"the pointer switch to version {new.version}")
            trigger, delay = "pointer", rng.uniform(0.0, 0.15)
        time.sleep(delay)
        dev.kill_and_restart("swap", {"round": round_no, "after": trigger, "delay_s": round(delay, 3),
                                      "status": rig.status(dep_id), "pointer": dev.pointer_version()})
        dep = assert_outcome(rig, dev, dep_id, current, new)
        outcomes.append((new.version, dep.status, dep.reason))
        current = new if dep.status == "promoted" else current
    phases = Counter(k["phase"] for k in dev.kills)
    assert sum(phases.values()) >= 20 and min(phases.values()) == KILL_ROUNDS, phases
    mid_download = [k for k in dev.kills if k["phase"] == "download" and k["written"] < k["of"]]
    assert len(mid_download) >= KILL_ROUNDS - 1, dev.kills  # the kills really hit partial downloads
    mid_verification = [k for k in dev.kills if k["phase"] == "verification" and k["status"] == "measuring"]
    assert len(mid_verification) >= KILL_ROUNDS // 2, dev.kills  # ... and candidates being checked
    assert [s for _, s, _ in outcomes].count("promoted") >= 1, outcomes


# -- the broker goes away ----------------------------------------------------------------------------------
def test_broker_restart_mid_transfer(rig: Rig, broker: MosquittoBroker) -> None:
    dev = rig.device("brk", preinstall=rig.base)
    new = rig.register("dyn")
    rig.net.reset(delay_s=0.02)  # a slow link, so the restart lands inside the transfer
    dep_id = rig.deploy(new, dev)
    chunks = -(-new.size // CHUNK)
    have = wait_until(lambda: (c := dev.bitmap_count(dep_id)) is not None and c >= chunks // 3 and c, 60,
                      "a third of the chunks")
    restarted_at = time.time()
    broker.restart()
    assert have < chunks
    dep = assert_outcome(rig, dev, dep_id, rig.base, new)
    assert dep.status == "promoted", dep.reason
    # Both ends came back by themselves: the device's retained state reached the re-subscribed server.
    states = [e for e in rig.registry.events(device_id=dev.device_id, kind_prefix="device:state")
              if e["ts"] > restarted_at]
    assert states, "the server heard nothing from the device after the broker restart"


# -- the wire misbehaves -----------------------------------------------------------------------------------
def test_dropped_duplicated_reordered_corrupt_and_truncated_chunks(rig: Rig) -> None:
    dev = rig.device("wire", preinstall=rig.base)
    new = rig.register("dyn")
    chunks = -(-new.size // CHUNK)
    rng = random.Random(SEED + 1)
    picks = rng.sample(range(chunks), 15)
    rig.net.reset(drop=set(picks[0:3]), duplicate=set(picks[3:8]), bitrot=set(picks[8:10]),
                  wrong_data=set(picks[10:12]), short={picks[12], chunks - 1}, reorder=True)
    dep_id = rig.deploy(new, dev)
    dep = assert_outcome(rig, dev, dep_id, rig.base, new)
    assert dep.status == "promoted", dep.reason
    events = rig.registry.events(deployment_id=dep_id)
    rejected = " | ".join(e["detail"] for e in events if e["kind"] == "device:chunk_rejected")
    assert "does not match its digest" in rejected  # bit rot
    assert "differs from the manifest" in rejected  # self-consistent frame with other data
    assert "manifest says" in rejected  # truncated chunk
    assert any(e["kind"] == "device:need_chunks" for e in events)
    resent = {int(i) for i, n in dep.resends.items() if n > 0}
    assert set(picks[0:3]) | set(picks[8:12]) <= resent, (sorted(resent), picks)  # every damaged chunk came again


def test_a_chunk_corrupted_every_time_ends_the_deployment_and_keeps_the_old_model(rig: Rig) -> None:
    dev = rig.device("rot", preinstall=rig.base)
    new = rig.register("dyn")
    rig.net.reset(wrong_data={3}, every_time=True)
    dep_id = rig.deploy(new, dev)
    dep = assert_outcome(rig, dev, dep_id, rig.base, new)
    assert dep.status == "rejected" and "chunk 3" in dep.reason and "re-sends" in dep.reason, dep.reason


# -- manifests and signatures ------------------------------------------------------------------------------
def _edit_json(field_name: str, value: object) -> Callable[[bytes], bytes]:
    def edit(payload: bytes) -> bytes:
        body = json.loads(payload)
        body[field_name] = value if not callable(value) else value(body[field_name])
        return json.dumps(body).encode()
    return edit


TAMPERING = {
    "version_raised": (_edit_json("version", lambda v: v + 100), "bad signature"),
    "digest_swapped": (_edit_json("sha256", "0" * 64), "bad signature"),
    "signature_flipped": (_edit_json("signature", lambda s: ("A" if s[0] != "A" else "B") + s[1:]), "bad signature"),
    "signature_removed": (_edit_json("signature", None), "not signed"),
    "signed_by_another_key": (
        lambda p: Manifest.from_json(p).signed(signing.generate_private_key()).to_json(), "pinned server key"),
}


@pytest.mark.parametrize("case", sorted(TAMPERING))
def test_tampered_manifest_is_rejected_before_any_download(rig: Rig, case: str) -> None:
    tamper, expected = TAMPERING[case]
    dev = rig.device("tamper", preinstall=rig.base)
    new = rig.register("dyn")
    rig.net.reset(tamper_manifest=tamper)
    dep_id = rig.deploy(new, dev)
    dep = assert_outcome(rig, dev, dep_id, rig.base, new)
    assert dep.status == "rejected" and expected in dep.reason, dep.reason
    assert rig.net.transmissions.total() == 0, "chunks were sent for a rejected manifest"
    assert not (dev.state_dir / "staging" / dep_id).exists()


def test_unreadable_manifest_is_rejected_and_recorded_against_the_device(rig: Rig) -> None:
    dev = rig.device("garbled", preinstall=rig.base)
    new = rig.register("dyn")
    rig.net.reset(tamper_manifest=lambda p: p[: len(p) // 2])
    dep_id = rig.deploy(new, dev)
    # No readable deployment id: the server records the device's rejection in its event log; the
    # deployment itself ends at its deadline.
    detail = wait_until(lambda: next((e["detail"] for e in rig.registry.events(device_id=dev.device_id)
                                      if e["kind"] == "device:manifest_rejected"), None), 20, "the rejection")
    assert "malformed manifest" in detail and "not valid UTF-8 JSON" in detail, detail
    assert rig.status(dep_id) == "transferring" and rig.net.transmissions.total() == 0
    assert dev.serving() == (rig.base.model_id, rig.base.version)
    assert rig.registry.device(dev.device_id).active_version == rig.base.version
    assert not any((dev.state_dir / "staging").iterdir())


@contextmanager
def attacker(rig: Rig) -> Iterator[MqttLink]:
    link = MqttLink(rig.broker.url, f"mallory-{uuid.uuid4().hex[:6]}", clean_start=True)
    link.start()
    try:
        yield link
    finally:
        link.stop()


def test_forged_and_replayed_manifests_never_change_the_model(rig: Rig) -> None:
    dev = rig.device("forge", preinstall=rig.base)
    new = rig.register("dyn")
    dep_id = rig.deploy(new, dev)
    dep = assert_outcome(rig, dev, dep_id, rig.base, new)
    assert dep.status == "promoted", dep.reason
    genuine = rig.net.manifests[-1]
    blob = rig.register("float").packed_path.read_bytes()
    forged_id = f"d-{uuid.uuid4().hex[:12]}"
    forged = Manifest(deployment_id=forged_id, device_id=dev.device_id, model_id="evil", version=10**6,
                      total_size=len(blob), sha256=hashlib.sha256(blob).hexdigest(), chunk_size=CHUNK,
                      chunk_sha256=chunking.digests(blob, CHUNK)).signed(signing.generate_private_key())
    with attacker(rig) as mallory:
        down = rig.topics.down(dev.device_id, "manifest")
        mallory.publish(down, forged.to_json()).wait(5)
        for i, piece in enumerate(chunking.split(blob, CHUNK)):  # chunks of the forged model, just in case
            mallory.publish(rig.topics.down(dev.device_id, "chunk"),
                            chunking.encode_chunk(forged_id, i, forged.chunk_count, piece))
        mallory.publish(down, genuine).wait(5)  # replay of the deployment just finished
    reasons = wait_until(lambda: (r := [e["detail"] for e in rig.registry.events(device_id=dev.device_id)
                                        if e["kind"] == "device:manifest_rejected"]) and len(r) >= 2 and r, 20,
                         "both rejections")
    assert any("pinned server key" in r for r in reasons), reasons
    assert any("already finished" in r or "not newer" in r for r in reasons), reasons
    time.sleep(0.5)
    assert dev.serving() == (new.model_id, new.version)
    assert dev.pointer_version() == new.version
    assert not (dev.state_dir / "staging" / forged_id).exists()


# -- bad models and full disks -----------------------------------------------------------------------------
def test_truncated_model_fails_on_the_device_and_the_old_model_keeps_serving(rig: Rig) -> None:
    dev = rig.device("trunc", preinstall=rig.base)
    bad = rig.register("truncated")
    dep_id = rig.deploy(bad, dev)
    dep = assert_outcome(rig, dev, dep_id, rig.base, bad)
    assert dep.status == "rolled_back", dep.reason
    assert dep.report and dep.report["load_ok"] is False and dep.report["error_kind"] == "load_error", dep.report
    assert dep.verdict and dep.verdict["verdict"] == "FAIL"


@contextmanager
def small_disk(path: Path, size: str = "1m") -> Iterator[bool]:
    """A real tmpfs of `size` at `path`; yields False (and leaves a plain dir) when mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
                             capture_output=True, text=True, check=False).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def _fill(path: Path, leave_bytes: int) -> Path:
    """Take all but `leave_bytes` of the file system holding `path` (another program filling the disk)."""
    filler = path / f"filler-{uuid.uuid4().hex[:6]}"
    st = os.statvfs(path)
    size = st.f_bavail * st.f_frsize - leave_bytes
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.posix_fallocate(fd, 0, max(size, 1))
    finally:
        os.close(fd)
    return filler


def _active_slot_digests(state: Path) -> dict[str, str]:
    slot = state / "slots" / json.loads((state / "active.json").read_text())["slot"]
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(slot.iterdir())}


def test_full_disk_fails_cleanly_and_the_active_model_stays(rig: Rig, tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    with small_disk(disk) as mounted:
        if not mounted:  # documented fallback: the agent's quota setting refuses the model instead
            dev = rig.device("full", preinstall=rig.base, extra_args=("--quota-bytes", "1000"))
            new = rig.register("dyn")
            dep = assert_outcome(rig, dev, rig.deploy(new, dev), rig.base, new)
            assert dep.status == "rejected" and "exceeds the device quota" in dep.reason, dep.reason
            pytest.fail("tmpfs could not be mounted: only the quota fallback ran (run as root for the real check)")
        state = disk / "state"
        dev = rig.device("full", preinstall=rig.base, state_dir=state)
        before = _active_slot_digests(state)
        # 1. the disk fills up while the model downloads: unpacking hits ENOSPC
        new = rig.register("dyn")
        rig.net.reset(delay_s=0.01)
        dep_id = rig.deploy(new, dev)
        wait_until(lambda: (state / "staging" / dep_id / "data.bin").exists(), 30, "the staging file")
        filler = _fill(disk, leave_bytes=48 * 1024)
        dep = assert_outcome(rig, dev, dep_id, rig.base, new)
        assert dep.status == "rolled_back", dep.reason
        assert dep.report and dep.report["error_kind"] == "disk_full", dep.report
        assert _active_slot_digests(state) == before, "the active slot changed"
        # 2. a disk already too full: refused at the manifest, nothing downloaded
        newer = rig.register("dyn")
        dep2 = assert_outcome(rig, dev, rig.deploy(newer, dev), rig.base, newer)
        assert dep2.status == "rejected" and "not enough free disk" in dep2.reason, dep2.reason
        # 3. space freed: the next deployment goes through
        filler.unlink()
        newest = rig.register("dyn")
        dep3 = assert_outcome(rig, dev, rig.deploy(newest, dev), rig.base, newest)
        assert dep3.status == "promoted", dep3.reason
        rig.stop_devices()  # before the tmpfs goes away
