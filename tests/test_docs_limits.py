"""docs/protocol.md section 9 lists every limit with the value the code enforces, and nothing else.

The expected table is built from the code (dataclass defaults, module constants, the shipped
broker config), so changing a limit without its documentation, or the other way round, fails here.
"""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

from agent.config import AgentConfig
from agent.daemon import EVENT_REASON_MAX_CHARS
from agent.serving import http
from agent.serving.service import DEFAULT_MAX_HISTORY
from agent.store import FINISHED_KEEP
from agent.transfer import DISK_FACTOR
from protocol.limits import DEFAULT_LIMITS, KIB, MIB, Limits
from protocol.mqtt import SESSION_EXPIRY_S
from server.deployer import DeployerConfig
from server.ingest import IngestLimits
from server.registry import EVENT_DETAIL_MAX_CHARS

REPO = Path(__file__).resolve().parents[1]
ROW = re.compile(r"^\|\s*`([a-z_.]+)`\s*\|\s*([^|]+?)\s*\|")


def human(name: str, value: float) -> str:
    """How the docs write a value: sizes in KiB/MiB, durations in s or days, counts as numbers."""
    if name.endswith(("_bytes", "max_packet_size", "chunk_size")):
        for unit, size in (("MiB", MIB), ("KiB", KIB)):
            if value >= size and value % size == 0:
                return f"{value // size} {unit}"
        return f"{value} bytes"
    if name.endswith("_s"):
        return f"{value / 86400:g} days" if value >= 86400 and value % 86400 == 0 else f"{value:g} s"
    return f"{value:g}" if isinstance(value, float) else str(value)


def expected_limits() -> dict[str, str]:
    # Every field of the limit dataclasses, so a new field without its row in the docs fails here.
    out = {f.name: human(f.name, getattr(DEFAULT_LIMITS, f.name)) for f in fields(Limits)}
    ingest = IngestLimits()
    out |= {f"ingest.{f.name}": human(f.name, getattr(ingest, f.name)) for f in fields(IngestLimits)}
    deployer = DeployerConfig()
    out |= {f"deployer.{f.name}": human(f.name, getattr(deployer, f.name)) for f in fields(DeployerConfig)}
    out |= {
        "http.max_body_bytes": human("_bytes", http.DEFAULT_MAX_BODY),
        "http.io_timeout_s": human("_s", http.DEFAULT_IO_TIMEOUT_S),
        "http.keepalive_idle_s": human("_s", http.KEEPALIVE_IDLE_S),
        "http.workers": str(http.DEFAULT_WORKERS),
        "http.queue": str(http.DEFAULT_QUEUE),
        "registry.event_detail_chars": str(EVENT_DETAIL_MAX_CHARS),
        "agent.event_reason_chars": str(EVENT_REASON_MAX_CHARS),
        "agent.disk_factor": str(DISK_FACTOR),
        "agent.finished_keep": str(FINISHED_KEEP),
        "serving.max_history": str(DEFAULT_MAX_HISTORY),
        "mqtt.session_expiry_s": human("_s", SESSION_EXPIRY_S),
    }
    agent = AgentConfig()
    out |= {f"agent.{n}": human(n, getattr(agent, n))
            for n in ("quota_bytes", "outbox_max_bytes", "chunk_stall_s", "verdict_timeout_s")}
    conf = (REPO / "deploy" / "mosquitto" / "mosquitto.conf").read_text()
    for key in ("max_packet_size", "max_queued_messages", "max_queued_bytes", "max_inflight_messages"):
        value = int(re.search(rf"^{key}\s+(\d+)", conf, re.MULTILINE).group(1))
        out[f"broker.{key}"] = human(key, value)
    return out


def documented_limits() -> dict[str, str]:
    text = (REPO / "docs" / "protocol.md").read_text()
    section = text.split("## 9. Limits", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        match = ROW.match(line)
        if match:
            assert match.group(1) not in rows, f"{match.group(1)} is documented twice"
            rows[match.group(1)] = match.group(2)
    return rows


def test_every_limit_is_documented_with_the_value_the_code_enforces() -> None:
    code, docs = expected_limits(), documented_limits()
    missing = sorted(set(code) - set(docs))
    unknown = sorted(set(docs) - set(code))
    wrong = {name: (docs[name], code[name]) for name in sorted(set(code) & set(docs)) if docs[name] != code[name]}
    assert not wrong, f"documented value differs from the code (docs, code): {wrong}"
    assert not missing, f"limits enforced but not in docs/protocol.md section 9: {missing}"
    assert not unknown, f"documented limits the code does not have: {unknown}"


def test_the_manifest_bound_in_the_docs_follows_from_the_limits() -> None:
    """The prose under the table: how many chunk digests fit in a manifest."""
    text = (REPO / "docs" / "protocol.md").read_text()
    per_digest = 67  # 64 hex characters, quotes and a comma
    chunks = DEFAULT_LIMITS.max_manifest_bytes // per_digest
    assert chunks >= DEFAULT_LIMITS.max_chunks, "max_manifest_bytes cannot hold max_chunks digests"
    assert f"all {DEFAULT_LIMITS.max_chunks} chunk digests" in text
