"""The shipped broker configuration keeps every device in its own subtree and requires TLS trust.

A real mosquitto runs from deploy/mosquitto/mosquitto.conf (paths and ports rewritten to a temp
dir) with an ACL rendered from acl.template, a password file written by mosquitto_passwd through
broker_users.py, and certificates from make_test_ca.py. Devices are played by `mosquitto_pub` /
`mosquitto_sub` with their own credentials, the server role by protocol.mqtt.MqttLink.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import pytest

from protocol import chunking, names
from protocol.limits import DEFAULT_LIMITS
from protocol.mqtt import ConnectError, MqttLink
from protocol.topics import Topics
from server.mosquitto import MosquittoBroker, free_port, wait_port

pytestmark = pytest.mark.network

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy" / "mosquitto"
SERVER_USER = "edgeguide-server"
PASSWORDS = {SERVER_USER: "srv-Secret-1", "dev-a": "a-Secret-1", "dev-b": "b-Secret-1"}
MTLS_DEVICE = "dev-m"
WAIT_S = 5.0
# mosquitto_pub words a refused CONNECT "not authorised" on MQTT 3.1.1 and "Not authorized" on 5.
REFUSED = re.compile(r"not authori[sz]ed", re.IGNORECASE)

if shutil.which("mosquitto_pub") is None or shutil.which("mosquitto_passwd") is None:  # pragma: no cover
    raise RuntimeError("mosquitto clients missing: apt-get install -y mosquitto mosquitto-clients")


def _load(name: str) -> ModuleType:
    """Import a deploy script by path: deploy/ is shipped to broker hosts, not installed as a package."""
    spec = importlib.util.spec_from_file_location(f"_deploy_{name}", DEPLOY / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(args: list[str], stdin: str | None = None, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=timeout, check=False)


def shipped_conf_lines(conf: str, etc: Path, tls_port: int, mtls_port: int) -> list[str]:
    """The shipped config as extra lines for MosquittoBroker: same options, test paths and ports.

    The loopback listener is the one MosquittoBroker opens itself; persistence location and log
    destination stay MosquittoBroker's; the commented-out mutual-TLS block is enabled.
    """
    out: list[str] = []
    in_mtls_block = False
    for raw in conf.splitlines():
        line = raw.strip()
        if line.startswith("#listener 8884"):
            in_mtls_block = True
        if in_mtls_block and line.startswith("#") and line[1:2].isalpha():
            line = line[1:]
        if not line or line.startswith("#"):
            continue
        key = line.split()[0]
        if key in {"persistence_location", "log_dest", "user"} or line.startswith("listener 1883"):
            continue
        if line.startswith("listener 8883"):
            line = f"listener {tls_port} 127.0.0.1"
        elif line.startswith("listener 8884"):
            line = f"listener {mtls_port} 127.0.0.1"
        out.append(line.replace("/etc/mosquitto/", f"{etc}/"))
    if os.geteuid() == 0:
        # As root mosquitto drops to the `mosquitto` user, which cannot read pytest's 0700 temp dirs.
        out.append("user root")
    return out


@dataclass
class SecureBroker:
    """The running broker and what a client needs to reach it."""

    broker: MosquittoBroker
    tls_port: int
    mtls_port: int
    etc: Path
    topics: Topics
    conf_lines: list[str] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.broker.port

    @property
    def ca(self) -> Path:
        return self.etc / "certs" / "ca.crt"


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    """mosquitto started from the shipped config, ACL template, password tool and test CA."""
    etc = tmp_path_factory.mktemp("etc-mosquitto")
    prefix = f"eg-sec-{uuid.uuid4().hex[:8]}"
    py = sys.executable
    ca = _run([py, str(DEPLOY / "make_test_ca.py"), str(etc / "certs"), "--client", MTLS_DEVICE,
               "--client", "dev-a"])
    assert ca.returncode == 0, ca.stderr
    acl = _run([py, str(DEPLOY / "broker_users.py"), "acl", "--prefix", prefix, "--server-user", SERVER_USER,
                "--out", str(etc / "edgeguide.acl")])
    assert acl.returncode == 0, acl.stderr
    for user, password in PASSWORDS.items():
        cmd = [py, str(DEPLOY / "broker_users.py"), "add", "--passwd", str(etc / "passwd"), "--user", user,
               "--password-stdin"] + (["--server"] if user == SERVER_USER else [])
        added = _run(cmd, stdin=password + "\n")
        assert added.returncode == 0, added.stderr
    tls_port, mtls_port = free_port(), free_port()
    lines = shipped_conf_lines((DEPLOY / "mosquitto.conf").read_text(), etc, tls_port, mtls_port)
    broker = MosquittoBroker(workdir=etc / "broker", extra_conf=lines)
    broker.start()
    # MosquittoBroker only waits for its own port; the TLS listeners open in the same pass.
    wait_port("127.0.0.1", tls_port)
    wait_port("127.0.0.1", mtls_port)
    yield SecureBroker(broker, tls_port, mtls_port, etc, Topics(prefix), lines)
    broker.stop()


class Collector:
    """Messages one MQTT client received, with a wait for a condition."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self._cond = threading.Condition()

    def __call__(self, topic: str, payload: bytes) -> None:
        with self._cond:
            self.messages.append((topic, payload))
            self._cond.notify_all()

    def wait_for(self, pred: Callable[[list[tuple[str, bytes]]], bool], timeout: float = WAIT_S) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: pred(self.messages), timeout)

    def topics(self) -> set[str]:
        with self._cond:
            return {t for t, _ in self.messages}


@pytest.fixture
def server_view(secure: SecureBroker) -> Iterator[Collector]:
    """The server role subscribed to the whole prefix, through the MQTT 5 shared subscription."""
    got = Collector()
    link = MqttLink(secure.broker.url, f"srv-{uuid.uuid4().hex[:8]}", username=SERVER_USER,
                    password=PASSWORDS[SERVER_USER], clean_start=True)
    link.start()
    assert link.is_v5
    link.subscribe(f"$share/edgeguide-servers/{secure.topics.prefix}/dev/+/up/#", got)
    link.subscribe(f"{secure.topics.prefix}/dev/+/down/#", got)
    link.publish(secure.topics.down("probe", "command"), b"subscribed").wait(WAIT_S)
    assert got.wait_for(lambda m: any(t.endswith("/probe/down/command") for t, _ in m)), "server sees nothing"
    yield got
    link.stop()


def device_pub(secure: SecureBroker, user: str, topic: str, message: str, *extra: str,
               password: str | None = None, version: str = "5") -> subprocess.CompletedProcess[str]:
    """mosquitto_pub as a device with its own credentials (QoS 1, so the broker acknowledges)."""
    pw = PASSWORDS.get(user, "x") if password is None else password
    return _run(["mosquitto_pub", "-V", version, "-h", "127.0.0.1", "-p", str(secure.port), "-u", user, "-P", pw,
                 "-i", f"{user}-pub-{uuid.uuid4().hex[:6]}", "-q", "1", "-t", topic, "-m", message, *extra])


def server_link(secure: SecureBroker, **kw: object) -> MqttLink:
    link = MqttLink(secure.broker.url, f"srv-{uuid.uuid4().hex[:8]}", username=SERVER_USER,
                    password=PASSWORDS[SERVER_USER], clean_start=True, **kw)  # type: ignore[arg-type]
    link.start()
    return link


# -- ACL: writes -----------------------------------------------------------------------------------
@pytest.mark.parametrize("version", ["5", "mqttv311"])
def test_device_cannot_publish_to_another_devices_topics(secure: SecureBroker, server_view: Collector,
                                                         version: str) -> None:
    t = secure.topics
    foreign = [t.up("dev-b", "state"), t.up("dev-b", "report"), t.down("dev-b", "manifest"),
               t.down("dev-b", "chunk"), t.down("dev-a", "verdict"), f"{t.prefix}/dev/dev-b/up/extra"]
    for topic in foreign:
        res = device_pub(secure, "dev-a", topic, "forged", version=version)
        if version == "5":  # MQTT 5 tells the publisher; 3.1.1 brokers drop silently
            assert "Not authorized" in res.stderr, (topic, res.stderr)
    marker = t.up("dev-a", "event")
    assert device_pub(secure, "dev-a", marker, f"marker-{version}", version=version).returncode == 0
    # The broker handles one connection's packets in order, and every forged publish was
    # acknowledged before the marker was sent: had any been accepted, it would be here already.
    assert server_view.wait_for(lambda m: (marker, f"marker-{version}".encode()) in m)
    leaked = server_view.topics() & set(foreign)
    assert not leaked, f"device dev-a wrote to {sorted(leaked)}"


def test_device_can_publish_its_own_up_topics(secure: SecureBroker, server_view: Collector) -> None:
    t = secure.topics
    own = {t.up("dev-a", kind): f"own-{kind}".encode() for kind in ("state", "heartbeat", "event", "report")}
    for topic, payload in own.items():
        res = device_pub(secure, "dev-a", topic, payload.decode(), *(["-r"] if topic.endswith("/state") else []))
        assert res.returncode == 0 and "Not authorized" not in res.stderr, res.stderr
    assert server_view.wait_for(lambda m: all((tp, p) in m for tp, p in own.items())), server_view.messages
    # up/state is retained: a server that starts later still learns the device's state.
    late = Collector()
    link = server_link(secure)
    try:
        link.subscribe(t.up("dev-a", "state"), late)
        assert late.wait_for(lambda m: (t.up("dev-a", "state"), b"own-state") in m)
    finally:
        link.stop()


def test_device_cannot_write_outside_its_subtree(secure: SecureBroker) -> None:
    got = Collector()
    link = server_link(secure)
    try:
        link.subscribe(f"{secure.topics.prefix}/#", got)
        link.wait_connected(WAIT_S)
        # Only the broker's MQTT 5 reason code can show a refusal outside the prefix: no account
        # (not even the server) may read there, so no subscriber could observe a leak.
        for topic in ("elsewhere/x", f"{secure.topics.prefix}/registry", f"{secure.topics.prefix}/dev/dev-a/x",
                      "$SYS/forged"):
            res = device_pub(secure, "dev-a", topic, "forged")
            assert "Not authorized" in res.stderr, (topic, res.stderr)
        marker = secure.topics.up("dev-a", "heartbeat")
        for _ in range(20):  # until the server's SUBSCRIBE is live
            device_pub(secure, "dev-a", marker, "hb")
            if got.wait_for(lambda m: len(m) > 0, timeout=0.25):
                break
        assert (marker, b"hb") in got.messages
        assert not [tp for tp, p in got.messages if p == b"forged"], got.messages
    finally:
        link.stop()


# -- ACL: reads --------------------------------------------------------------------------------------
class LineReader:
    """Lines a subprocess prints, collected by a thread so a test can wait for one."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines = Collector()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines(line.rstrip("\n"), b"")

    def seen(self) -> list[str]:
        return [line for line, _ in self.lines.messages]

    def close(self) -> str:
        self.proc.terminate()
        _, err = self.proc.communicate(timeout=WAIT_S)
        return err


def test_device_cannot_read_another_devices_topics(secure: SecureBroker) -> None:
    t = secure.topics
    sniff = [t.device_down_filter("dev-b"), f"{t.prefix}/dev/+/down/#", f"{t.prefix}/dev/+/up/#", f"{t.prefix}/#"]
    args = ["mosquitto_sub", "-V", "5", "-h", "127.0.0.1", "-p", str(secure.port), "-u", "dev-a",
            "-P", PASSWORDS["dev-a"], "-q", "1", "-v"]
    for f in [*sniff, t.down("dev-a", "command")]:
        args += ["-t", f]
    sniffer = LineReader(subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    server = server_link(secure)
    try:
        for _ in range(40):  # probe dev-a's own command topic until the sniffer's SUBSCRIBE is live
            server.publish(t.down("dev-a", "command"), b"probe").wait(WAIT_S)
            if sniffer.lines.wait_for(lambda m: len(m) > 0, timeout=0.25):
                break
        assert sniffer.seen(), "mosquitto_sub as dev-a never received its own command"
        for topic in (t.down("dev-b", "manifest"), t.down("dev-b", "chunk"), t.up("dev-b", "report")):
            server.publish(topic, b"for-b-only").wait(WAIT_S)
        server.publish(t.down("dev-a", "command"), b"for-a").wait(WAIT_S)
        # Same publisher connection, so had any for-b-only message been delivered it would precede this.
        assert sniffer.lines.wait_for(lambda m: any(x.endswith(" for-a") for x, _ in m)), sniffer.seen()
    finally:
        server.stop()
        err = sniffer.close()
    leaked = [x for x in sniffer.seen() if "for-b-only" in x]
    assert not leaked, f"dev-a read another device's messages: {leaked} ({err})"


def test_own_device_receives_its_down_messages(secure: SecureBroker) -> None:
    t = secure.topics
    got = Collector()
    dev = MqttLink(secure.broker.url, f"dev-b-{uuid.uuid4().hex[:6]}", username="dev-b",
                   password=PASSWORDS["dev-b"], clean_start=True)
    dev.start()
    server = server_link(secure)
    try:
        dev.subscribe(t.device_down_filter("dev-b"), got)
        dev.wait_connected(WAIT_S)
        kinds = ("manifest", "chunk", "verdict", "command")
        deadline_ok = False
        for _ in range(20):  # the SUBSCRIBE may still be in flight: retry until the first one lands
            server.publish(t.down("dev-b", "command"), b"ping").wait(WAIT_S)
            if got.wait_for(lambda m: len(m) > 0, timeout=0.25):
                deadline_ok = True
                break
        assert deadline_ok, "dev-b never received its own command"
        for kind in kinds:
            server.publish(t.down("dev-b", kind), kind.encode()).wait(WAIT_S)
        assert got.wait_for(lambda m: all((t.down("dev-b", k), k.encode()) in m for k in kinds)), got.messages
    finally:
        server.stop()
        dev.stop()


def test_reusing_another_devices_client_id_reads_nothing(secure: SecureBroker) -> None:
    """A device that takes over another's persistent session (same client id) gets none of its messages."""
    t = secure.topics
    victim_id = f"dev-b-{uuid.uuid4().hex[:6]}"
    base = ["mosquitto_sub", "-V", "5", "-h", "127.0.0.1", "-p", str(secure.port), "-q", "1", "-c", "-x", "600",
            "-i", victim_id, "-t", t.device_down_filter("dev-b"), "-v"]
    as_b = [*base, "-u", "dev-b", "-P", PASSWORDS["dev-b"]]
    created = _run([*as_b, "-W", "1"])
    assert "Timed out" in created.stderr, created.stderr  # the session exists, its owner is offline
    server = server_link(secure)
    try:
        server.publish(t.down("dev-b", "chunk"), b"queued-1").wait(WAIT_S)
        control = _run([*as_b, "-W", "3", "-C", "1"])
        assert f"{t.down('dev-b', 'chunk')} queued-1" in control.stdout, control  # queuing works for the owner
        server.publish(t.down("dev-b", "chunk"), b"queued-2").wait(WAIT_S)
    finally:
        server.stop()
    thief = _run([*base, "-u", "dev-a", "-P", PASSWORDS["dev-a"], "-W", "2"])
    assert "queued-2" not in thief.stdout, thief.stdout


def test_last_will_on_another_devices_topic_is_accepted_then_dropped(secure: SecureBroker,
                                                                     server_view: Collector) -> None:
    """What mosquitto 2.0 really does with the shipped ACL: the CONNECT with a will on B's topic is
    accepted (the client works normally), and when the client vanishes the will is not published.
    The same client with a will on its own topic gets it published."""
    t = secure.topics
    wills = {"dev-b": "forged-will", "dev-a": "own-will"}
    server = server_link(secure)
    try:
        for owner, payload in wills.items():
            sub = LineReader(subprocess.Popen(
                ["mosquitto_sub", "-V", "5", "-h", "127.0.0.1", "-p", str(secure.port), "-u", "dev-a",
                 "-P", PASSWORDS["dev-a"], "-t", t.down("dev-a", "command"), "-k", "5", "-v",
                 "--will-topic", t.up(owner, "state"), "--will-payload", payload, "--will-qos", "1"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
            for _ in range(40):  # connected and subscribed: it receives its own command topic
                server.publish(t.down("dev-a", "command"), f"ping-{owner}".encode()).wait(WAIT_S)
                if sub.lines.wait_for(lambda m: len(m) > 0, timeout=0.25):
                    break
            assert sub.proc.poll() is None, f"the CONNECT with a will on {owner}'s topic was refused"
            assert any(x.endswith(f"ping-{owner}") for x in sub.seen()), sub.seen()
            sub.proc.kill()  # no DISCONNECT: the broker handles the will now
            sub.proc.communicate(timeout=WAIT_S)
    finally:
        server.stop()
    assert server_view.wait_for(lambda m: (t.up("dev-a", "state"), b"own-will") in m)
    # The forged will was handled first; the own will arriving proves the broker got past it.
    assert (t.up("dev-b", "state"), b"forged-will") not in server_view.messages
    assert not [p for tp, p in server_view.messages if tp == t.up("dev-b", "state")], server_view.messages


# -- authentication ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("user", "password"), [("dev-a", "wrong"), ("nobody", "a-Secret-1"), ("dev-a", "")])
def test_bad_credentials_are_refused(secure: SecureBroker, user: str, password: str) -> None:
    res = device_pub(secure, user, secure.topics.up("dev-a", "event"), "x", password=password)
    assert res.returncode != 0 and "Not authorized" in res.stderr, res.stderr
    with pytest.raises(ConnectError, match="Not authorized"):
        MqttLink(secure.broker.url, "bad-cred", username=user, password=password or None).start(timeout=5)


def test_anonymous_is_refused(secure: SecureBroker) -> None:
    res = _run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(secure.port), "-q", "1",
                "-t", secure.topics.up("dev-a", "event"), "-m", "anon"])
    assert res.returncode != 0 and REFUSED.search(res.stderr), res.stderr
    with pytest.raises(ConnectError, match="Not authorized"):
        MqttLink(secure.broker.url, "anon").start(timeout=5)


def test_password_file_holds_hashes_only(secure: SecureBroker) -> None:
    passwd = secure.etc / "passwd"
    text = passwd.read_text()
    assert sorted(line.split(":")[0] for line in text.splitlines()) == sorted(PASSWORDS)
    assert not [pw for pw in PASSWORDS.values() if pw in text]
    assert all(line.split(":", 1)[1].startswith("$7$") for line in text.splitlines())  # PBKDF2-SHA512
    assert passwd.stat().st_mode & 0o077 == 0, oct(passwd.stat().st_mode)


# -- TLS ----------------------------------------------------------------------------------------------
def test_tls_listener_works_with_the_test_ca(secure: SecureBroker, server_view: Collector) -> None:
    topic = secure.topics.up("dev-a", "event")
    res = _run(["mosquitto_pub", "-h", "localhost", "-p", str(secure.tls_port), "--cafile", str(secure.ca),
                "-u", "dev-a", "-P", PASSWORDS["dev-a"], "-q", "1", "-t", topic, "-m", "over-tls"])
    assert res.returncode == 0, res.stderr
    link = MqttLink(f"mqtts://localhost:{secure.tls_port}", f"dev-a-{uuid.uuid4().hex[:6]}", username="dev-a",
                    password=PASSWORDS["dev-a"], tls_ca=str(secure.ca), clean_start=True)
    link.start()
    try:
        assert link.is_v5
        link.publish(topic, b"mqttlink-over-tls").wait(WAIT_S)
    finally:
        link.stop()
    assert server_view.wait_for(lambda m: {(topic, b"over-tls"), (topic, b"mqttlink-over-tls")} <= set(m))


def test_tls_listener_still_applies_the_acl(secure: SecureBroker) -> None:
    res = _run(["mosquitto_pub", "-V", "5", "-h", "localhost", "-p", str(secure.tls_port), "--cafile",
                str(secure.ca), "-u", "dev-a", "-P", PASSWORDS["dev-a"], "-q", "1",
                "-t", secure.topics.down("dev-b", "manifest"), "-m", "forged"])
    assert "Not authorized" in res.stderr, res.stderr
    bad = _run(["mosquitto_pub", "-h", "localhost", "-p", str(secure.tls_port), "--cafile", str(secure.ca),
                "-u", "dev-a", "-P", "wrong", "-q", "1", "-t", secure.topics.up("dev-a", "event"), "-m", "x"])
    assert bad.returncode != 0 and REFUSED.search(bad.stderr), bad.stderr


def test_tls_fails_without_the_ca(secure: SecureBroker, tmp_path: Path) -> None:
    topic = secure.topics.up("dev-a", "event")
    creds = ["-u", "dev-a", "-P", PASSWORDS["dev-a"], "-q", "1", "-t", topic, "-m", "x"]
    system_cas = _run(["mosquitto_pub", "-h", "localhost", "-p", str(secure.tls_port), "--capath", "/etc/ssl/certs",
                       *creds])
    assert system_cas.returncode != 0 and "TLS" in system_cas.stderr, system_cas.stderr
    plain = _run(["mosquitto_pub", "-h", "localhost", "-p", str(secure.tls_port), *creds])
    assert plain.returncode != 0, plain.stderr
    with pytest.raises(ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        MqttLink(f"mqtts://localhost:{secure.tls_port}", "no-ca", username="dev-a",
                 password=PASSWORDS["dev-a"]).start(timeout=5)
    other = _load("make_test_ca").make_test_ca(tmp_path / "other-ca")
    with pytest.raises(ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        MqttLink(f"mqtts://localhost:{secure.tls_port}", "wrong-ca", username="dev-a",
                 password=PASSWORDS["dev-a"], tls_ca=str(other["ca"])).start(timeout=5)


def test_mutual_tls_listener_uses_the_certificate_cn_as_username(secure: SecureBroker,
                                                                 server_view: Collector) -> None:
    certs = secure.etc / "certs"
    base = ["mosquitto_pub", "-V", "5", "-h", "localhost", "-p", str(secure.mtls_port), "--cafile", str(secure.ca),
            "-q", "1"]
    client = ["--cert", str(certs / f"client-{MTLS_DEVICE}.crt"), "--key", str(certs / f"client-{MTLS_DEVICE}.key")]
    own = secure.topics.up(MTLS_DEVICE, "event")
    assert _run([*base, *client, "-t", own, "-m", "cert-auth"]).returncode == 0
    forged = _run([*base, *client, "-t", secure.topics.up("dev-a", "event"), "-m", "forged"])
    assert "Not authorized" in forged.stderr, forged.stderr
    no_cert = _run([*base, "-u", "dev-a", "-P", PASSWORDS["dev-a"], "-t", secure.topics.up("dev-a", "event"),
                    "-m", "no-cert"])
    assert no_cert.returncode != 0, no_cert.stderr
    assert server_view.wait_for(lambda m: (own, b"cert-auth") in m)
    assert not [p for _, p in server_view.messages if p in {b"forged", b"no-cert"}]


# -- sizes -------------------------------------------------------------------------------------------
def test_max_packet_size_passes_chunk_frames_and_stops_oversized_packets(secure: SecureBroker,
                                                                         tmp_path: Path) -> None:
    limit = int(next(x.split()[1] for x in secure.conf_lines if x.startswith("max_packet_size ")))
    assert limit >= 2 * (chunking.HEADER_BYTES + DEFAULT_LIMITS.max_chunk_bytes) - 1024 * 1024
    t = secure.topics
    got = Collector()
    dev = MqttLink(secure.broker.url, f"dev-b-{uuid.uuid4().hex[:6]}", username="dev-b",
                   password=PASSWORDS["dev-b"], clean_start=True)
    dev.start()
    dev.subscribe(t.down("dev-b", "chunk"), got)
    server = server_link(secure)
    try:
        default = chunking.encode_chunk("d-0123456789ab", 0, 2, os.urandom(DEFAULT_LIMITS.default_chunk_bytes))
        largest = chunking.encode_chunk("d-0123456789ab", 1, 2, os.urandom(DEFAULT_LIMITS.max_chunk_bytes))
        for _ in range(20):  # until the device's SUBSCRIBE is live
            server.publish(t.down("dev-b", "chunk"), default).wait(WAIT_S)
            if got.wait_for(lambda m: len(m) > 0, timeout=0.25):
                break
        server.publish(t.down("dev-b", "chunk"), largest).wait(WAIT_S)
        assert got.wait_for(lambda m: any(p == largest for _, p in m)), "the largest allowed chunk did not pass"
        assert chunking.decode_chunk(got.messages[0][1]).data == default[chunking.HEADER_BYTES:]
        # MQTT 3.1.1 clients are not told the limit: the broker must drop the packet and the client.
        big = tmp_path / "big.bin"
        big.write_bytes(os.urandom(limit + 1))
        res = _run(["mosquitto_pub", "-V", "mqttv311", "-h", "127.0.0.1", "-p", str(secure.port), "-u", SERVER_USER,
                    "-P", PASSWORDS[SERVER_USER], "-q", "1", "-t", t.down("dev-b", "chunk"), "-f", str(big)])
        assert res.returncode != 0, res
        server.publish(t.down("dev-b", "chunk"), b"after").wait(WAIT_S)
        assert got.wait_for(lambda m: (t.down("dev-b", "chunk"), b"after") in m)
        assert max(len(p) for _, p in got.messages) == len(largest)
    finally:
        server.stop()
        dev.stop()


# -- the deploy helpers themselves -----------------------------------------------------------------
def test_acl_template_renders_prefix_and_server_account() -> None:
    users = _load("broker_users")
    text = users.render_acl("fleet/eu", "srv-main")
    rules = [x for x in text.splitlines() if x and not x.startswith("#")]
    assert rules == ["user srv-main", "topic readwrite fleet/eu/#",
                     "pattern write fleet/eu/dev/%u/up/#", "pattern read fleet/eu/dev/%u/down/#"]
    assert "@" not in text
    for bad_prefix in ("a/#", "+", "a//b", "$SYS", ""):
        with pytest.raises(ValueError, match="prefix"):
            users.render_acl(bad_prefix, "srv")
    with pytest.raises(ValueError, match="placeholder"):
        users.render_acl("eg", "srv", template="user @SERVER_USER@\n")


def test_account_names_follow_the_device_id_rule(tmp_path: Path) -> None:
    users = _load("broker_users")
    assert users.USERNAME_RE.pattern == names.DEVICE_ID_RE.pattern
    passwd = tmp_path / "passwd"
    for bad in ("a+b", "#", "x/y", "", "a b", "-lead", "a" * 65):
        with pytest.raises(ValueError, match="username"):
            users.add_user(passwd, bad, "pw")
    with pytest.raises(ValueError, match="server account"):
        users.add_user(passwd, "edgeguide-server", "pw")
    with pytest.raises(ValueError, match="password"):
        users.add_user(passwd, "pi-01", "")
    generated = users.add_user(passwd, "pi-01")
    assert len(generated) >= 24 and passwd.read_text().startswith("pi-01:$7$")
    cli = _run([sys.executable, str(DEPLOY / "broker_users.py"), "add", "--passwd", str(passwd), "--user", "x+y"])
    assert cli.returncode == 2 and "invalid MQTT username 'x+y'" in cli.stderr
