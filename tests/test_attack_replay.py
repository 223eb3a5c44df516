"""Replays of signed messages captured from the real server never undo a later decision.

Signed messages carry no expiry (docs/protocol.md, section 10): anyone who can write a device's
down topics (a leaked server password, a broker bug) can send them again. The server, a real
agent (in-process) and mosquitto are real; the attacker re-publishes bytes the server sent
earlier. Two replays are checked:

- a `rollback` command, after the device was rolled back and then promoted to a newer model;
- the manifest (and chunks) of a deployment that was promoted and then rolled back, once the
  agent's memory of finished deployments (`agent.store.FINISHED_KEEP` ids) has rolled over.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from attack_support import (
    EventTap,
    Recorder,
    device_events,
    pointer_version,
    preinstall,
    public_key_file,
    raw_link,
    start_agent,
    start_server,
    wait_until,
)

from agent.daemon import Agent
from agent.store import FINISHED_KEEP
from protocol.messages import Command, Manifest
from server.registry import ArtifactRecord, Registry
from server.service import EdgeGuideServer

pytestmark = pytest.mark.network

SETTLE_S = 60.0


@dataclass
class Stand:
    """One device on v1 of three registered versions, its agent, and the recording server."""

    registry: Registry
    server: EdgeGuideServer
    recorder: Recorder
    agent: Agent
    device_id: str
    state_dir: Path
    versions: list[ArtifactRecord]

    def deploy(self, record: ArtifactRecord) -> str:
        dep = self.server.deploy(record.model_id, self.device_id, version=record.version)
        final = self.server.wait(dep.deployment_id, timeout=SETTLE_S, poll_s=0.05)
        assert final.status == "promoted", (final.status, final.reason)
        wait_until(lambda: pointer_version(self.state_dir) == record.version, 10, f"pointer at v{record.version}")
        return dep.deployment_id

    def rollback(self, deployment_id: str) -> bytes:
        """The operator's rollback (as a failed rollout stage sends it); returns the signed bytes sent."""
        previous = json.loads((self.state_dir / "active.json").read_text())["previous"]["version"]
        self.server.deployer.send_command(self.device_id, "rollback", deployment_id)
        wait_until(lambda: pointer_version(self.state_dir) == previous, 10, f"rollback to v{previous}")
        return self.recorder.payloads(self.device_id, "command")[-1]

    def serving(self) -> int | None:
        model = self.agent.active_model
        return model.version if model else None


@pytest.fixture
def stand(tmp_path: Path, mosquitto, topic_prefix: str, tiny_artifact: Path) -> Iterator[Stand]:
    registry = Registry(tmp_path / "server")
    versions = [registry.register(tiny_artifact) for _ in range(3)]
    server, recorder = start_server(registry, mosquitto.url, topic_prefix)
    device_id = f"rp-{uuid.uuid4().hex[:6]}"
    state_dir = tmp_path / device_id
    preinstall(state_dir, versions[0])
    agent = start_agent(device_id, mosquitto.url, state_dir, public_key_file(registry, tmp_path), topic_prefix)
    try:
        wait_until(lambda: registry.find_device(device_id) is not None, 15, f"{device_id} seen by the server")
        yield Stand(registry, server, recorder, agent, device_id, state_dir, versions)
    finally:
        agent.stop()
        server.stop()
        registry.close()


def test_replayed_rollback_command_after_a_later_promotion_changes_nothing(stand: Stand, mosquitto) -> None:
    v1, v2, v3 = stand.versions
    dep2 = stand.deploy(v2)
    captured = stand.rollback(dep2)
    assert Command.from_json(captured).deployment_id == dep2
    dep3 = stand.deploy(v3)  # pointer: v3, previous v1
    replayed_at = time.time()
    with raw_link(mosquitto.url) as attacker:
        attacker.publish(stand.server.topics.down(stand.device_id, "command"), captured).wait(5)
    answered = wait_until(
        lambda: device_events(stand.registry, stand.device_id, "command_rejected", replayed_at)
        or device_events(stand.registry, stand.device_id, "rolled_back", replayed_at), 15, "the agent's answer")
    assert stand.serving() == v3.version and pointer_version(stand.state_dir) == v3.version, (
        f"the replayed rollback of {dep2} switched the device from v3 ({dep3}) to v{stand.serving()}: {answered}")
    assert answered[0]["kind"] == "device:command_rejected" and dep2 in answered[0]["detail"], answered
    # The registry's record of the device still names the promoted model.
    stand.server.deployer.send_command(stand.device_id, "report_state")
    wait_until(lambda: stand.registry.device(stand.device_id).active_version == v3.version, 10, "device on v3")
    assert stand.registry.deployment(dep3).status == "promoted"


def test_replayed_manifest_after_the_finished_memory_rolls_over_is_refused(stand: Stand, mosquitto) -> None:
    v1, v2, _ = stand.versions
    topics = stand.server.topics
    dep2 = stand.deploy(v2)
    manifest = stand.recorder.payloads(stand.device_id, "manifest")[-1]
    chunks = stand.recorder.payloads(stand.device_id, "chunk")
    assert Manifest.from_json(manifest).deployment_id == dep2 and chunks
    stand.rollback(dep2)  # the operator withdrew v2: the device is back on v1
    # The server keeps deploying to this device (newer, signed manifests); each supersedes the one
    # before and ends finished, until the agent's list of finished deployments no longer holds dep2.
    key = stand.server.key
    flood = []
    with raw_link(mosquitto.url) as server_side:
        for i in range(FINISHED_KEEP):
            dep_id = f"d-{uuid.uuid4().hex[:12]}"
            data = bytes(16)
            m = Manifest(deployment_id=dep_id, device_id=stand.device_id, model_id=v2.model_id,
                         version=v2.version + 1 + i, total_size=len(data), sha256=hashlib.sha256(data).hexdigest(),
                         chunk_size=len(data), chunk_sha256=[hashlib.sha256(data).hexdigest()]).signed(key)
            server_side.publish(topics.down(stand.device_id, "manifest"), m.to_json())
            flood.append(dep_id)
        cancel = Command(device_id=stand.device_id, command="cancel", deployment_id=flood[-1]).signed(key)
        server_side.publish(topics.down(stand.device_id, "command"), cancel.to_json()).wait(5)
    finished = wait_until(lambda: (f := stand.agent.store.finished()) and f[-1] == flood[-1] and f, 30,
                          "the flood to finish")
    assert dep2 not in finished and len(finished) <= FINISHED_KEEP, len(finished)  # rolled over, bounded
    # The flood made the device exceed the server's per-device message rate: read its answer directly.
    tap = EventTap(mosquitto.url, topics.up(stand.device_id, "event"))
    replayed_at = time.time()
    with raw_link(mosquitto.url) as attacker:
        infos = [attacker.publish(topics.down(stand.device_id, "manifest"), manifest)]
        infos += [attacker.publish(topics.down(stand.device_id, "chunk"), frame) for frame in chunks]
        infos[-1].wait(5)

    try:
        wait_until(lambda: tap.of(dep2, "manifest_rejected", replayed_at) or tap.of(dep2, "manifest_accepted",
                                                                                    replayed_at),
                   20, "the agent's answer to the replay")
        if tap.of(dep2, "manifest_accepted", replayed_at):  # admitted: let the replayed deployment run its course
            wait_until(lambda: tap.of(dep2, "promoted", replayed_at) or tap.of(dep2, "rolled_back", replayed_at),
                       30, "the replayed deployment to end")
        reasons = [e.reason for e in tap.of(dep2, "manifest_rejected", replayed_at)]
    finally:
        tap.link.stop()
    assert stand.serving() == v1.version and pointer_version(stand.state_dir) == v1.version, (
        f"the replayed manifest of {dep2} re-installed v{stand.serving()} after the operator's rollback")
    assert reasons and "older than" in str(reasons[0]), reasons
    assert not (stand.state_dir / "staging" / dep2).exists()
    # What the agent keeps to refuse replays stays small whatever the history.
    assert sum(p.stat().st_size for p in stand.state_dir.glob("*.json")) < 16 * 1024
