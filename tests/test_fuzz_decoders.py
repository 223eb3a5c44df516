"""Property-based attacks on everything that decodes bytes from the network (bounded in time).

Each decoder must either return a valid value or raise its one documented error (ProtocolError,
ManifestRejected); anything else is a traceback an attacker can trigger. Payloads mix real field
names with hostile values: integers past Python's 4300-digit limit, 1e999, NaN, deep nesting,
lone surrogates, wrong types. The server's ingestion runs on a real SQLite registry.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.transfer import Admission, ManifestRejected, check_manifest
from protocol import chunking, names, signing
from protocol.artifact import ARTIFACT_FILES, unpack_artifact
from protocol.errors import ProtocolError
from protocol.messages import Command, DeviceState, Event, Heartbeat, Manifest, Report, Verdict
from protocol.schema import decode_object
from protocol.topics import Topics
from server.registry import Registry
from server.service import EdgeGuideServer, ServerConfig

# No deadline: the examples write to a real SQLite file, and a loaded CI machine must not turn a slow
# example into DeadlineExceeded/Flaky; max_examples bounds the run instead.
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                         HealthCheck.too_slow])
MESSAGES = (Manifest, Verdict, Command, DeviceState, Heartbeat, Event, Report)
FIELDS = sorted({"deployment_id", "device_id", "model_id", "version", "total_size", "sha256", "chunk_size",
                 "chunk_sha256", "chunk_count", "created", "requirements", "rollback", "unpacked_size",
                 "signature", "verdict", "checks", "reason", "command", "status", "active_model_id",
                 "active_version", "runtime", "agent_version", "ts", "uptime_s", "last_error", "type",
                 "missing", "load_ok", "error_kind", "error", "mode", "model_bytes", "latency_ms", "memory",
                 "energy", "quality", "context", "paired"})
RAW = ["9" * 5000, "-" + "1" * 4400, "1e999", "-1e999", "NaN", "Infinity", '"\\ud800"', "[" * 3000 + "]" * 3000,
       '{"a":' * 2000 + "1" + "}" * 2000, "1" * 4300, "0.1e-99999", '"d-0123456789ab"', "true", "null"]
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20) | st.sampled_from(["d-0123456789ab", "dev-1", "m", "PASS", "online", "error", "a" * 64]),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=12,
)


@st.composite
def hostile_json(draw: st.DrawFn) -> bytes:
    """A JSON object of real and random field names; some values are spliced-in raw hostile text."""
    keys = draw(st.lists(st.sampled_from(FIELDS) | st.text(max_size=6), max_size=12, unique=True))
    obj, raws = {}, {}
    for i, key in enumerate(keys):
        if draw(st.integers(0, 4)) == 0:
            raws[f"\u0001RAW{i}\u0001"] = draw(st.sampled_from(RAW))
            obj[key] = f"\u0001RAW{i}\u0001"
        else:
            obj[key] = draw(_JSON)
    text = json.dumps(obj)
    for token, raw in raws.items():
        text = text.replace(json.dumps(token), raw)
    return text.encode("utf-8", "surrogatepass")


PAYLOADS = hostile_json() | st.binary(max_size=300) | st.sampled_from([r.encode() for r in RAW])


@FUZZ
@given(payload=PAYLOADS, cls=st.sampled_from(MESSAGES))
def test_message_decoders_return_a_message_or_raise_protocol_error(payload: bytes, cls: type) -> None:
    try:
        message = cls.from_json(payload)
    except ProtocolError:
        return
    assert isinstance(message, cls)
    cls.from_json(message.to_json())  # what decoded encodes back to something that decodes


@FUZZ
@given(payload=PAYLOADS)
def test_decode_object_never_raises_anything_but_protocol_error(payload: bytes) -> None:
    try:
        assert isinstance(decode_object(payload, "fuzz"), dict)
    except ProtocolError as exc:
        assert len(str(exc)) < 1000, "an error message quotes the whole payload"


@pytest.fixture(scope="module")
def admission() -> Admission:
    return Admission(device_id="dev-1", server_key=signing.generate_private_key().public_key(), active_version=3,
                     quota_bytes=1 << 20, free_bytes=1 << 30)


@FUZZ
@given(payload=PAYLOADS)
def test_manifest_admission_only_ever_rejects(admission: Admission, payload: bytes) -> None:
    with pytest.raises(ManifestRejected) as info:  # unsigned by the pinned key: never admitted
        check_manifest(payload, admission)
    assert info.value.reason
    assert info.value.deployment_id is None or names.DEPLOYMENT_ID_RE.fullmatch(info.value.deployment_id)


def _frame() -> bytes:
    return chunking.encode_chunk("d-0123456789ab", 2, 5, bytes(range(200)))


@FUZZ
@given(data=st.data())
def test_chunk_frames_decode_only_when_self_consistent(data: st.DataObject) -> None:
    frame = bytearray(_frame())
    for _ in range(data.draw(st.integers(0, 4))):
        kind = data.draw(st.sampled_from(["flip", "cut", "grow"]))
        if kind == "flip" and frame:
            i = data.draw(st.integers(0, len(frame) - 1))
            frame[i] ^= data.draw(st.integers(1, 255))
        elif kind == "cut":
            del frame[data.draw(st.integers(0, len(frame))):]
        else:
            frame += data.draw(st.binary(max_size=50))
    try:
        chunk = chunking.decode_chunk(bytes(frame))
    except ProtocolError:
        return
    assert hashlib.sha256(chunk.data).digest() == chunk.digest and 0 <= chunk.index < chunk.count


def _artifact_blob() -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in ARTIFACT_FILES:
            info = tarfile.TarInfo(name)
            data = name.encode() * 40
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue(), mtime=0)


@FUZZ
@given(data=st.data())
def test_the_unpacker_refuses_damaged_archives_cleanly(tmp_path_factory: pytest.TempPathFactory,
                                                      data: st.DataObject) -> None:
    blob = bytearray(_artifact_blob())
    raw_tar = bytearray(gzip.decompress(bytes(blob)))
    target = data.draw(st.sampled_from(["gzip", "tar"]))
    buf = blob if target == "gzip" else raw_tar
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(buf) - 1))
        if data.draw(st.booleans()):
            buf[i] ^= data.draw(st.integers(1, 255))
        else:
            del buf[i:]
            break
    payload = bytes(blob) if target == "gzip" else gzip.compress(bytes(raw_tar))
    root = tmp_path_factory.mktemp("unpack")
    dest = root / "out"
    try:
        unpack_artifact(payload, dest, max_unpacked_bytes=64 << 10, declared_size=data.draw(
            st.none() | st.integers(0, 8000)))
    except ProtocolError:
        assert not dest.exists(), "a refused archive left files behind"
    else:
        assert sorted(p.name for p in dest.iterdir()) == sorted(ARTIFACT_FILES)
    assert [p.name for p in root.iterdir()] in ([], ["out"]), "something was written outside dest"


@FUZZ
@given(topic=st.text(max_size=60) | st.sampled_from(["edgeguide/dev/x/up/state", "edgeguide/dev/../up/event",
                                                      "edgeguide/dev/a+b/up/report", "edgeguide/dev/x/down/chunk"]))
def test_topic_parsing_refuses_every_other_shape(topic: str) -> None:
    try:
        ref = Topics().parse(topic)
    except ProtocolError:
        return
    assert names.DEVICE_ID_RE.fullmatch(ref.device_id) and topic.startswith("edgeguide/dev/")


@pytest.fixture(scope="module")
def offline_server(tmp_path_factory: pytest.TempPathFactory) -> EdgeGuideServer:
    """The real server's ingestion on a real SQLite registry; not started: nothing here needs the broker."""
    registry = Registry(tmp_path_factory.mktemp("fuzz-server"))
    server = EdgeGuideServer(registry, ServerConfig(broker_url="mqtt://127.0.0.1:1", client_id="fuzz"))
    yield server
    registry.close()


@FUZZ
@given(payload=PAYLOADS, kind=st.sampled_from(["state", "heartbeat", "event", "report", "chunk", "x"]),
       device=st.sampled_from(["dev-1", "dev-2", "bad+id", "a" * 70]))
def test_server_ingestion_never_raises(offline_server: EdgeGuideServer, payload: bytes, kind: str,
                                       device: str) -> None:
    before = offline_server.malformed
    offline_server.handle(f"edgeguide/dev/{device}/up/{kind}", payload)  # must not raise
    assert offline_server.malformed in (before, before + 1)
    rows = offline_server.registry.events(limit=5, kind_prefix="handler_error")
    assert not rows, rows


_FIGURES = st.dictionaries(st.sampled_from(["p50", "p90", "p99", "peak_rss_mib", "agreement_at_k",
                                            "net_mj_per_inference", "median_ratio_p50", "x"]),
                           _JSON | st.integers(-2**63, 2**63 - 1) | st.floats(-1e308, 1e308), max_size=6)


# Figure values a decodable report can carry: every JSON type, extremes that still parse, nesting.
_HOSTILE_FIGURE = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from([0, -0.0, 1e308, -1e308, 5e-324, 2**53 + 1, -1, 1e-300]) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
_GATE_KEYS = ["p50", "p90", "p99", "peak_rss_mib", "agreement_at_k", "net_mj_per_inference", "median_ratio_p50",
              "x"]


@st.composite
def decodable_report(draw: st.DrawFn) -> bytes:
    """A report every decoder check accepts (valid ids, types), whose figures are hostile values."""
    body: dict = {"device_id": "dev-1", "deployment_id": "d-0123456789ab", "model_id": "m", "version": 1,
                  "load_ok": draw(st.booleans()), "model_bytes": draw(st.none() | st.integers(0, 2**53))}
    for section in draw(st.lists(st.sampled_from(["latency_ms", "memory", "energy", "quality", "paired",
                                                  "context"]), unique=True)):
        body[section] = draw(st.dictionaries(st.sampled_from(_GATE_KEYS), _HOSTILE_FIGURE, max_size=6))
    return json.dumps(body).encode()


@st.composite
def spliced_report(draw: st.DrawFn) -> bytes:
    """A report with hostile figures and one raw hostile token spliced in (often not decodable)."""
    figures = draw(st.fixed_dictionaries({}, optional={k: _FIGURES for k in ("latency_ms", "memory", "energy",
                                                                             "quality", "paired", "context")}))
    body = {"device_id": "dev-1", "deployment_id": "d-0123456789ab", "model_id": "m", "version": 1,
            "load_ok": draw(st.booleans()), "model_bytes": draw(st.none() | st.integers(0, 2**53)), **figures,
            "memory": {"peak_rss_mib": "RAW"}}
    return json.dumps(body).replace('"RAW"', draw(st.sampled_from(RAW + ["1"]))).encode()


def test_the_gate_judges_every_decodable_report() -> None:
    """Whatever figures a device reports, the gate answers PASS or FAIL with JSON-able checks; a real
    share of the examples must get past the decoder to the gate (counted), not only its refusals."""
    from server import gate
    from server.policy import load_policy

    policy = load_policy(None)
    runs = {"examples": 0, "judged": 0}

    @FUZZ
    @given(payload=decodable_report() | spliced_report())
    def judge(payload: bytes) -> None:
        runs["examples"] += 1
        try:
            report = Report.from_json(payload)
        except ProtocolError:
            return
        runs["judged"] += 1
        result = gate.evaluate(report, policy)
        assert result.verdict in {"PASS", "FAIL"}
        json.dumps(result.checks, allow_nan=False)

    judge()
    assert runs["judged"] >= 50 and runs["judged"] >= 0.3 * runs["examples"], runs
    print(f"gate fuzz: {runs['judged']} of {runs['examples']} examples reached the gate")
