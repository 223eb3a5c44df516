"""The TLS and mutual-TLS listeners under the attacks the plain listener is tested with, and a
client id takeover, while a real deployment runs through them.

The broker is mosquitto started from the shipped config (tests/test_broker_security.py's
`secure` fixture: %u ACL, password file, test CA, mutual-TLS block enabled). The server is real
and sits on the loopback listener with its own account, as deploy/mosquitto/mosquitto.conf
intends; the device is a real in-process agent dialling the TLS (password) or mutual-TLS
(certificate) listener. Attackers are another device with valid credentials of its own, a client
without credentials, and someone holding the server password but not the signing key.
"""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from attack_support import (
    Recorder,
    device_events,
    pointer_version,
    preinstall,
    public_key_file,
    start_agent,
    start_server,
    wait_until,
)
from test_broker_security import (  # noqa: F401  (secure is a fixture)
    MTLS_DEVICE,
    PASSWORDS,
    SERVER_USER,
    SecureBroker,
    _load,
    _run,
    secure,
)

from agent.daemon import Agent
from protocol import chunking, signing
from protocol.messages import Manifest, Report
from protocol.mqtt import ConnectError, MqttLink
from server.registry import ArtifactRecord, Registry
from server.service import EdgeGuideServer

pytestmark = pytest.mark.network

SETTLE_S = 60.0


class Sniffer:
    """An MQTT client that records every message it is delivered."""

    def __init__(self, link: MqttLink, filters: list[str]) -> None:
        self.link = link
        self.got: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        for f in filters:
            link.subscribe(f, self._on)

    def _on(self, topic: str, payload: bytes) -> None:
        with self._lock:
            self.got.append((topic, payload))

    def topics(self) -> set[str]:
        with self._lock:
            return {t for t, _ in self.got}

    def has(self, topic: str, payload: bytes) -> bool:
        with self._lock:
            return (topic, payload) in self.got


def prove_listening(sniffer: Sniffer, server: EdgeGuideServer, own_down: str, what: str,
                    timeout: float = 20.0) -> None:
    """The server account publishes on the listener's own down topic (which the ACL lets it read) until
    the listener has it: its subscriptions are in force, so "it received nothing of the victim's" means
    something."""
    probe = f"probe-{uuid.uuid4().hex[:8]}".encode()
    deadline = time.monotonic() + timeout
    while not sniffer.has(own_down, probe):
        assert time.monotonic() < deadline, f"{what} never received its own {own_down} within {timeout:.0f} s"
        server.link.publish(own_down, probe)
        wait_until_or_none(lambda: sniffer.has(own_down, probe), 0.5)


def wait_until_or_none(cond: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.02)
    return cond()


@dataclass
class Site:
    """The server on the loopback listener with two registered versions of the tiny model."""

    secure: SecureBroker
    registry: Registry
    server: EdgeGuideServer
    recorder: Recorder
    key_file: Path
    v1: ArtifactRecord
    v2: ArtifactRecord
    tmp: Path

    @property
    def prefix(self) -> str:
        return self.secure.topics.prefix

    def agent(self, device_id: str, url: str, **tls: object) -> tuple[Agent, Path]:
        state_dir = self.tmp / f"{device_id}-{uuid.uuid4().hex[:6]}"
        preinstall(state_dir, self.v1)
        agent = start_agent(device_id, url, state_dir, self.key_file, self.prefix, **tls)
        wait_until(lambda: agent.link.connected, 15, f"{device_id} connected to {url}")
        return agent, state_dir

    def deploy_and_wait(self, device_id: str, chunk_size: int | None = None) -> str:
        dep = self.server.deploy(self.v2.model_id, device_id, version=self.v2.version, chunk_size=chunk_size,
                                 wait_seen_s=15)
        final = self.server.wait(dep.deployment_id, timeout=SETTLE_S, poll_s=0.05)
        assert final.status == "promoted", (final.status, final.reason)
        return dep.deployment_id


@pytest.fixture
def site(secure: SecureBroker, tmp_path: Path, tiny_artifact: Path) -> Iterator[Site]:  # noqa: F811
    registry = Registry(tmp_path / "server")
    v1, v2 = registry.register(tiny_artifact), registry.register(tiny_artifact)
    # clean_start: every test of this module shares one prefix, and a stopped server's persistent
    # session would keep taking its turn of the shared subscription's messages (queued for nobody).
    server, recorder = start_server(registry, secure.broker.url, secure.topics.prefix, username=SERVER_USER,
                                    password=PASSWORDS[SERVER_USER], clean_start=True)
    try:
        yield Site(secure, registry, server, recorder, public_key_file(registry, tmp_path), v1, v2, tmp_path)
    finally:
        server.stop()
        registry.close()


def tls_url(port: int) -> str:
    return f"mqtts://localhost:{port}"


def forged_manifest(device_id: str, blob: bytes) -> Manifest:
    """A well-formed manifest for `device_id`, signed by a key that is not the server's."""
    return Manifest(deployment_id=f"d-{uuid.uuid4().hex[:12]}", device_id=device_id, model_id="evil", version=10**6,
                    total_size=len(blob), sha256=hashlib.sha256(blob).hexdigest(), chunk_size=4096,
                    chunk_sha256=chunking.digests(blob, 4096)).signed(signing.generate_private_key())


def tls_pub(secure: SecureBroker, port: int, topic: str, payload: bytes, *creds: str) -> str:  # noqa: F811
    """mosquitto_pub over TLS (MQTT 5, QoS 1, so a refusal comes back as a reason code); returns stderr."""
    res = _run(["mosquitto_pub", "-V", "5", "-h", "localhost", "-p", str(port), "--cafile", str(secure.ca),
                "-q", "1", "-t", topic, "-m", payload.decode(), *creds])
    return res.stderr


def test_tls_listener_refuses_forgeries_while_a_real_deployment_runs(site: Site) -> None:
    t, sec = site.secure.topics, site.secure
    agent, state = site.agent("dev-b", tls_url(sec.tls_port), username="dev-b", password=PASSWORDS["dev-b"],
                              tls_ca=sec.ca)
    spy = MqttLink(tls_url(sec.tls_port), f"dev-a-{uuid.uuid4().hex[:6]}", username="dev-a",
                   password=PASSWORDS["dev-a"], tls_ca=str(sec.ca), clean_start=True)
    spy.start()
    sniffer = Sniffer(spy, [t.device_down_filter("dev-b"), f"{t.prefix}/dev/+/down/#", f"{t.prefix}/dev/+/up/#"])
    try:
        prove_listening(sniffer, site.server, t.down("dev-a", "command"), "dev-a's spy")
        as_a = ("-u", "dev-a", "-P", PASSWORDS["dev-a"])
        forged = forged_manifest("dev-b", site.v2.packed_path.read_bytes())
        fake_report = Report(device_id="dev-b", deployment_id="d-0123456789ab", model_id="evil", version=1,
                             load_ok=True).to_json()
        for topic, payload in ((t.down("dev-b", "manifest"), forged.to_json()), (t.up("dev-b", "report"), fake_report),
                               (t.up("dev-b", "state"), b'{"device_id": "dev-b", "status": "offline"}')):
            err = tls_pub(sec, sec.tls_port, topic, payload, *as_a)
            assert "Not authorized" in err, (topic, err)
        for user, password in (("dev-b", "wrong"), ("dev-a", PASSWORDS["dev-b"]), ("nobody", "x")):
            with pytest.raises(ConnectError, match="Not authorized"):
                MqttLink(tls_url(sec.tls_port), f"bad-{uuid.uuid4().hex[:6]}", username=user, password=password,
                         tls_ca=str(sec.ca)).start(timeout=5)
        # Someone holding the server password but not the signing key reaches the device and is refused by it.
        sent_at = time.time()
        with MqttLink(tls_url(sec.tls_port), f"leak-{uuid.uuid4().hex[:6]}", username=SERVER_USER,
                      password=PASSWORDS[SERVER_USER], tls_ca=str(sec.ca), clean_start=True) as leaked:
            leaked.publish(t.down("dev-b", "manifest"), forged.to_json()).wait(5)
        rejected = wait_until(lambda: device_events(site.registry, "dev-b", "manifest_rejected", sent_at), 15,
                              "the device's rejection")
        assert "pinned server key" in rejected[0]["detail"], rejected
        # The genuine deployment goes through the same TLS listener.
        dep_id = site.deploy_and_wait("dev-b")
        assert pointer_version(state) == site.v2.version and agent.active_model.version == site.v2.version
        assert site.registry.deployment(dep_id).report["device_id"] == "dev-b"
        assert not site.registry.events(kind_prefix="malformed"), "a forged message reached the server"
    finally:
        spy.stop()
        agent.stop()
    leaked_to_a = {tp for tp in sniffer.topics() if "/dev/dev-b/" in tp}
    assert not leaked_to_a, f"dev-a read {sorted(leaked_to_a)} over TLS"
    assert site.recorder.payloads("dev-b", "chunk"), "the deployment sent no chunks for dev-a to miss"


def test_mutual_tls_listener_refuses_forgeries_while_a_real_deployment_runs(site: Site, tmp_path: Path) -> None:
    t, sec = site.secure.topics, site.secure
    certs = sec.etc / "certs"
    dev = MTLS_DEVICE
    agent, state = site.agent(dev, tls_url(sec.mtls_port), tls_ca=sec.ca, tls_cert=certs / f"client-{dev}.crt",
                              tls_key=certs / f"client-{dev}.key")
    a_cert = ("--cert", str(certs / "client-dev-a.crt"), "--key", str(certs / "client-dev-a.key"))
    # Another device's certificate with this device's name as username: the CN decides, not the username.
    spy = MqttLink(tls_url(sec.mtls_port), f"spy-{uuid.uuid4().hex[:6]}", username=dev, password="x",
                   tls_ca=str(sec.ca), tls_cert=str(certs / "client-dev-a.crt"),
                   tls_key=str(certs / "client-dev-a.key"), clean_start=True)
    spy.start()
    sniffer = Sniffer(spy, [t.device_down_filter(dev), f"{t.prefix}/#"])
    try:
        prove_listening(sniffer, site.server, t.down("dev-a", "command"), "dev-a's certificate spy")
        forged = forged_manifest(dev, site.v2.packed_path.read_bytes())
        for topic, payload in ((t.down(dev, "manifest"), forged.to_json()),
                               (t.up(dev, "report"), b'{"device_id": "%s"}' % dev.encode())):
            for creds in (a_cert, (*a_cert, "-u", dev, "-P", "x")):
                err = tls_pub(sec, sec.mtls_port, topic, payload, *creds)
                assert "Not authorized" in err, (topic, creds, err)
        # No certificate, or one from another CA: the TLS handshake itself fails, whatever the password.
        with pytest.raises(ConnectError):
            MqttLink(tls_url(sec.mtls_port), f"nocert-{uuid.uuid4().hex[:6]}", username="dev-a",
                     password=PASSWORDS["dev-a"], tls_ca=str(sec.ca)).start(timeout=5)
        other = _load("make_test_ca").make_test_ca(tmp_path / "rogue-ca", clients=[dev])
        rogue = _run(["mosquitto_pub", "-V", "5", "-h", "localhost", "-p", str(sec.mtls_port), "--cafile",
                      str(sec.ca), "--cert", str(other[f"client:{dev}"]), "--key", str(other[f"client_key:{dev}"]),
                      "-q", "1", "-t", t.up(dev, "report"), "-m", "rogue"])
        assert rogue.returncode != 0, rogue
        dep_id = site.deploy_and_wait(dev)
        assert pointer_version(state) == site.v2.version and agent.active_model.version == site.v2.version
        assert site.registry.deployment(dep_id).report["device_id"] == dev
        assert not site.registry.events(kind_prefix="malformed"), "a forged message reached the server"
    finally:
        spy.stop()
        agent.stop()
    leaked = {tp for tp in sniffer.topics() if f"/dev/{dev}/" in tp}
    assert not leaked, f"dev-a's certificate read {sorted(leaked)}"


def test_client_id_takeover_neither_stops_the_agent_nor_leaks_its_messages(site: Site) -> None:
    """Another device reuses the agent's client id mid-download, several times; the agent reconnects,
    finishes the deployment, and the taker receives none of the agent's messages."""
    t, sec = site.secure.topics, site.secure
    agent, state = site.agent("dev-b", tls_url(sec.tls_port), username="dev-b", password=PASSWORDS["dev-b"],
                              tls_ca=sec.ca)
    connects = []
    agent.link.add_connect_listener(lambda: connects.append(time.monotonic()))
    site.recorder.chunk_delay_s = 0.03  # ~46 chunks of 4 KiB: the takeovers land inside the download
    stolen: list[tuple[str, bytes]] = []
    done = threading.Event()
    result: dict[str, object] = {}

    def deploy() -> None:
        try:
            result["dep"] = site.deploy_and_wait("dev-b", chunk_size=4096)
        except BaseException as exc:  # reported by the main thread
            result["error"] = exc
        finally:
            done.set()

    worker = threading.Thread(target=deploy, daemon=True)
    worker.start()
    wait_until(lambda: any((state / "staging").iterdir()), 20, "the download to start")
    own_down = t.down("dev-a", "command")
    for i in range(3):
        # One takeover at a time: the agent is connected, the thief's CONNECT with its client id makes the
        # broker drop it, and the thief proves it is listening before it leaves.
        wait_until(lambda n=i: len(connects) >= n and agent.link.connected, 20, f"the agent back before takeover {i}")
        thief = Sniffer(MqttLink(tls_url(sec.tls_port), "agent-dev-b", username="dev-a", password=PASSWORDS["dev-a"],
                                 tls_ca=str(sec.ca), clean_start=False),
                        [t.device_down_filter("dev-b"), f"{t.prefix}/#"])
        thief.link.start()
        try:
            prove_listening(thief, site.server, own_down, f"thief {i}")
            thief.link.publish(t.up("dev-b", "report"), b'{"forged": true}')  # refused by the ACL: not dev-a's topic
        finally:
            thief.link.stop()
        stolen += [(tp, p) for tp, p in thief.got if tp != own_down]
        wait_until(lambda n=i: len(connects) >= n + 1, 20, f"the agent to reconnect after takeover {i}")
    assert done.wait(SETTLE_S), "the deployment did not finish"
    worker.join(5)
    if "error" in result:
        raise AssertionError(f"deployment failed after the takeovers: {result['error']}") from result["error"]
    assert len(connects) >= 3, f"the broker dropped the agent {len(connects)} times for 3 takeovers"
    assert pointer_version(state) == site.v2.version and agent.active_model.version == site.v2.version
    wait_until(lambda: agent.link.connected, 15, "the agent to be connected at the end")
    assert not [tp for tp, _ in stolen if "/dev/dev-b/" in tp], sorted({tp for tp, _ in stolen})
    assert not site.registry.events(kind_prefix="malformed"), "the taker's forged report reached the server"
    agent.stop()
