"""The wire package: names, topics, signed messages, chunk frames, artifact container, MQTT link."""

from __future__ import annotations

import gzip
import io
import socket
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest

from protocol import chunking, names, signing
from protocol.artifact import ARTIFACT_FILES, pack_artifact, read_golden, unpack_artifact
from protocol.errors import ProtocolError, SignatureError
from protocol.messages import Command, DeviceState, Event, Manifest, Report, Verdict
from protocol.mqtt import BrokerAddress, ConnectError, MqttLink
from protocol.topics import Topics

DEP = "d-0123456789ab"


def _manifest(blob: bytes = b"0123456789", **kw: object) -> Manifest:
    base = dict(deployment_id=DEP, device_id="pi-01", model_id="ref.int8", version=3, total_size=len(blob),
                sha256="a" * 64, chunk_size=4, chunk_sha256=chunking.digests(blob, 4))
    base.update(kw)
    return Manifest(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["", "../x", "a/b", "a+b", "#", "x" * 65, "-lead", "a b", 7, None])
def test_device_id_rejects_unsafe_names(bad: object) -> None:
    with pytest.raises(ProtocolError, match="device id"):
        names.device_id(bad)


def test_model_id_rejects_dot_dot() -> None:
    with pytest.raises(ProtocolError, match=r"\.\."):
        names.model_id("a..b")


def test_topics_roundtrip_and_reject_foreign() -> None:
    t = Topics("eg")
    ref = t.parse(t.up("pi-01", "report"))
    assert (ref.device_id, ref.direction, ref.kind) == ("pi-01", "up", "report")
    assert t.shared_up_filter("report") == "$share/edgeguide-servers/eg/dev/+/up/report"
    for bad in ["eg/dev/pi-01/up/evil", "other/dev/pi-01/up/state", "eg/dev/pi/01/up/state", "eg/dev/+/up/state"]:
        with pytest.raises(ProtocolError):
            t.parse(bad)
    with pytest.raises(ProtocolError):
        Topics("eg/#")


def test_manifest_signature_roundtrip_and_tamper() -> None:
    key = signing.generate_private_key()
    signed = _manifest().signed(key)
    decoded = Manifest.from_json(signed.to_json())
    decoded.verify(key.public_key())
    assert decoded.chunk_count == 3
    tampered = Manifest.from_dict({**signed.to_dict(), "version": 4})
    with pytest.raises(SignatureError, match="does not match"):
        tampered.verify(key.public_key())
    with pytest.raises(SignatureError, match="not signed"):
        _manifest().verify(key.public_key())
    other = signing.generate_private_key()
    with pytest.raises(SignatureError):
        decoded.verify(other.public_key())


def test_manifest_rejects_inconsistent_chunk_count_and_bad_types() -> None:
    body = _manifest().to_dict()
    with pytest.raises(ProtocolError, match="chunk digests"):
        Manifest.from_dict({**body, "chunk_sha256": body["chunk_sha256"][:2]})
    with pytest.raises(ProtocolError, match="manifest.version"):
        Manifest.from_dict({**body, "version": "3"})
    with pytest.raises(ProtocolError, match="total_size"):
        Manifest.from_dict({**body, "total_size": 10**12})
    with pytest.raises(ProtocolError, match="not valid UTF-8 JSON"):
        Manifest.from_json(b"{nope")
    with pytest.raises(ProtocolError, match="exceeds"):
        Manifest.from_json(b" " * 400_000)
    with pytest.raises(ProtocolError, match="NaN"):
        Manifest.from_json(b'{"version": NaN}')


def test_verdict_and_command_are_signed() -> None:
    key = signing.generate_private_key()
    v = Verdict(deployment_id=DEP, device_id="pi-01", model_id="m", version=2, verdict="PASS",
                checks=[{"name": "p90_ms", "figure": 1.0, "limit": 5.0, "outcome": "pass"}]).signed(key)
    back = Verdict.from_json(v.to_json())
    back.verify(key.public_key())
    assert back.passed
    with pytest.raises(ProtocolError, match="verdict"):
        Verdict.from_dict({**v.to_dict(), "verdict": "MAYBE"})
    c = Command(device_id="pi-01", command="report_state").signed(key)
    Command.from_json(c.to_json()).verify(key.public_key())
    with pytest.raises(ProtocolError, match="command"):
        Command.from_dict({**c.to_dict(), "command": "rm -rf /"})


def test_up_messages_validate() -> None:
    s = DeviceState(device_id="pi-01", status="online", active_model_id="m", active_version=1)
    assert DeviceState.from_json(s.to_json()).active_version == 1
    e = Event(device_id="pi-01", type="need_chunks", deployment_id=DEP, missing=[1, 2])
    assert Event.from_json(e.to_json()).missing == [1, 2]
    with pytest.raises(ProtocolError, match="event.missing"):
        Event.from_dict({**e.to_dict(), "missing": [-1]})
    r = Report(device_id="pi-01", deployment_id=DEP, model_id="m", version=1, load_ok=True,
               latency_ms={"p90": 1.5}, energy={"available": False})
    back = Report.from_json(r.to_json())
    assert back.figure("latency_ms.p90") == 1.5
    assert back.figure("energy.net_mj_per_inference") is None
    with pytest.raises(ProtocolError, match="error_kind"):
        Report.from_dict({**r.to_dict(), "error_kind": "whatever"})


def test_chunk_frames_verify_themselves() -> None:
    blob = bytes(range(256)) * 1000
    parts = chunking.split(blob, 65536)
    frames = [chunking.encode_chunk(DEP, i, len(parts), p) for i, p in enumerate(parts)]
    decoded = [chunking.decode_chunk(f) for f in reversed(frames)]
    assert b"".join(c.data for c in sorted(decoded, key=lambda c: c.index)) == blob
    corrupt = bytearray(frames[1])
    corrupt[-1] ^= 0xFF
    with pytest.raises(ProtocolError, match="does not match its digest"):
        chunking.decode_chunk(bytes(corrupt))
    with pytest.raises(ProtocolError, match="shorter"):
        chunking.decode_chunk(frames[0][:10])
    with pytest.raises(ProtocolError, match="exceeds"):
        chunking.decode_chunk(frames[0], max_chunk_bytes=100)


def _fake_artifact(folder: Path) -> Path:
    folder.mkdir()
    (folder / "model.tflite").write_bytes(b"TFL3" + bytes(100))
    items = '{"format": 1, "items": [["", "<padding>"], ["85123A", "HEART"]], "popular": [1]}'
    (folder / "items.json").write_text(items)
    (folder / "metrics.json").write_text('{"format": 1}')
    (folder / "golden.json").write_text('{"format": 1, "histories": [[0, 1]], "item_ids": [[1]]}')
    return folder


def test_artifact_pack_is_deterministic_and_unpacks(tmp_path: Path) -> None:
    src = _fake_artifact(tmp_path / "a")
    blob = pack_artifact(src)
    assert blob == pack_artifact(src)
    out = unpack_artifact(blob, tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == sorted(ARTIFACT_FILES)
    assert read_golden(out)["item_ids"] == [[1]]
    with pytest.raises(FileExistsError):
        unpack_artifact(blob, out)


def _tar_gz(members: dict[str, bytes], symlink: str | None = None) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if symlink:
            info = tarfile.TarInfo(symlink)
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            tar.addfile(info)
    return gzip.compress(raw.getvalue())


def test_artifact_unpack_refuses_traversal_links_and_bombs(tmp_path: Path) -> None:
    good = {n: b"x" for n in ARTIFACT_FILES}
    with pytest.raises(ProtocolError, match="expected exactly"):
        unpack_artifact(_tar_gz({**good, "../evil": b"x"}), tmp_path / "t1")
    with pytest.raises(ProtocolError, match="not a regular file"):
        unpack_artifact(_tar_gz({k: v for k, v in good.items() if k != "model.tflite"},
                                symlink="model.tflite"), tmp_path / "t2")
    with pytest.raises(ProtocolError, match="more than"):
        unpack_artifact(_tar_gz({**good, "model.tflite": bytes(2_000_000)}), tmp_path / "t3", max_unpacked_bytes=10_000)
    with pytest.raises(ProtocolError, match="gzip"):
        unpack_artifact(b"not gzip at all", tmp_path / "t4")
    assert not (tmp_path / "t1").exists() and not (tmp_path / "t3").exists()


def test_broker_address_parsing() -> None:
    a = BrokerAddress.parse("mqtts://dev:s3cr%40t@broker.local")
    assert (a.host, a.port, a.tls, a.username, a.password) == ("broker.local", 8883, True, "dev", "s3cr@t")
    with pytest.raises(ValueError, match="mqtt://HOST:PORT"):
        BrokerAddress.parse("http://x")


@pytest.mark.network
def test_mqtt_link_routes_survives_bad_handler_and_resubscribes(mosquitto, topic_prefix: str) -> None:
    got: list[tuple[str, bytes]] = []
    arrived = threading.Event()

    def record(topic: str, payload: bytes) -> None:
        got.append((topic, payload))
        if payload == b"after":
            arrived.set()

    def explode(topic: str, payload: bytes) -> None:
        raise RuntimeError("handler bug")

    sub = MqttLink(mosquitto.url, f"{topic_prefix}-sub")
    pub = MqttLink(mosquitto.url, f"{topic_prefix}-pub", protocol="3.1.1")
    sub.start()
    pub.start()
    try:
        assert sub.is_v5 and not pub.is_v5
        assert _no_delay(sub) and _no_delay(pub)  # small messages are not held back by Nagle's algorithm
        sub.subscribe(f"{topic_prefix}/ok", record)
        sub.subscribe(f"{topic_prefix}/bad", explode)
        assert sub.wait_subscribed(5), "no SUBACK for two subscriptions"
        pub.publish(f"{topic_prefix}/bad", b"boom").wait(5)
        pub.publish(f"{topic_prefix}/ok", b"after").wait(5)
        assert arrived.wait(5), "the network loop died after a handler raised"
        mosquitto.restart()
        deadline = time.monotonic() + 20
        while not (sub.connected and pub.connected) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sub.connected and pub.connected, "links did not reconnect after a broker restart"
        assert _no_delay(sub) and _no_delay(pub)  # the new sockets too
        arrived.clear()
        assert sub.wait_subscribed(5), "the resubscription after reconnect was not acknowledged"
        pub.publish(f"{topic_prefix}/ok", b"after").wait(5)
        assert arrived.wait(5), "subscription was not restored after reconnect"
    finally:
        sub.stop()
        pub.stop()


def test_mqtt_link_wait_subscribed_means_routed(mosquitto, topic_prefix: str) -> None:
    """Once wait_subscribed() returns True, a message published at once to any new filter arrives."""
    got: set[str] = set()
    done = threading.Event()
    filters = [f"{topic_prefix}/w/{i}" for i in range(30)]

    def record(topic: str, _payload: bytes) -> None:
        got.add(topic)
        if len(got) == len(filters):
            done.set()

    sub = MqttLink(mosquitto.url, f"{topic_prefix}-wsub")
    pub = MqttLink(mosquitto.url, f"{topic_prefix}-wpub")
    sub.start()
    pub.start()
    try:
        for topic_filter in filters:
            sub.subscribe(topic_filter, record)
        assert sub.wait_subscribed(5)
        for topic in filters:  # QoS 0: nothing is resent, so a missed route would show as a missing topic
            pub.publish(topic, b"x", qos=0)
        assert done.wait(5), f"routed only {len(got)} of {len(filters)} right after the SUBACKs"
    finally:
        sub.stop()
        pub.stop()


def _no_delay(link: MqttLink) -> bool:
    return bool(link._client.socket().getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))


def test_mqtt_link_unreachable_broker_is_a_clear_error() -> None:
    from server.mosquitto import free_port

    link = MqttLink(f"mqtt://127.0.0.1:{free_port()}", "nobody")
    with pytest.raises(ConnectError, match="Not connected to mqtt://127.0.0.1") as caught:
        link.start(timeout=2)
    assert not caught.value.refused_credentials  # unreachable is transient: worth retrying
    assert ConnectError("mqtt://x:1883", "Not authorized").refused_credentials


def test_artifact_unpack_bounds_the_declared_size_and_trailing_data(tmp_path: Path) -> None:
    good = {n: b"x" * 100 for n in ARTIFACT_FILES}
    blob = _tar_gz(good)
    assert sorted(p.name for p in unpack_artifact(blob, tmp_path / "ok", declared_size=400).iterdir()) == \
        sorted(ARTIFACT_FILES)
    with pytest.raises(ProtocolError, match="more than its declared unpacked_size of 399 bytes"):
        unpack_artifact(blob, tmp_path / "t1", declared_size=399)
    # A bomb hidden after the end of the tar archive, as a second gzip member: bounded all the same.
    with pytest.raises(ProtocolError, match="unpacks to more than 100000 bytes"):
        unpack_artifact(blob + gzip.compress(bytes(200_000)), tmp_path / "t2", max_unpacked_bytes=100_000)
    with pytest.raises(ProtocolError, match="a second 'model.tflite'"):
        unpack_artifact(_tar_gz_pairs([*good.items(), ("model.tflite", b"y")]), tmp_path / "t3")
    packed = tmp_path / "packed.tar.gz"
    packed.write_bytes(blob)  # the agent unpacks from its staging file, not from memory
    assert (unpack_artifact(packed, tmp_path / "from-file") / "model.tflite").read_bytes() == b"x" * 100
    assert not any((tmp_path / f"t{i}").exists() for i in (1, 2, 3))


def _tar_gz_pairs(members: list[tuple[str, bytes]]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue())


def test_key_pair_created_by_racing_processes_matches(tmp_path: Path) -> None:
    """`serve` and a CLI command starting at once on a fresh data dir end with ONE key pair whose
    public file matches the signing key (the agents pin the public file)."""
    script = ("import sys, time, hashlib; from pathlib import Path; from protocol import signing\n"
              "d = Path(sys.argv[1])\n"
              "while not (d / 'go').exists(): time.sleep(0.001)\n"
              "key = signing.ensure_keypair(d / 'keys' / 'priv.pem', d / 'keys' / 'pub.pem')\n"
              "print(key.public_key().public_bytes_raw().hex())\n")
    for round_no in range(3):
        d = tmp_path / f"round-{round_no}"
        d.mkdir()
        procs = [subprocess.Popen([sys.executable, "-c", script, str(d)], stdout=subprocess.PIPE, text=True,
                                  cwd=str(Path(__file__).resolve().parents[1]))
                 for _ in range(8)]
        time.sleep(0.5)  # every process imported and waiting
        (d / "go").touch()
        seen = {p.communicate(timeout=30)[0].strip() for p in procs}
        assert all(p.returncode == 0 for p in procs)
        pinned = signing.load_public_key(d / "keys" / "pub.pem").public_bytes_raw().hex()
        signer = signing.load_private_key(d / "keys" / "priv.pem").public_key().public_bytes_raw().hex()
        assert seen == {signer} and pinned == signer, (round_no, seen, pinned, signer)
        assert not [p.name for p in (d / "keys").iterdir() if p.name.endswith(".tmp")]
