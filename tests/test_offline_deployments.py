"""A deployment whose device went offline ends with that reason instead of waiting out its deadline.

The device's retained state (its Last Will, or the state a clean stop publishes) says offline; a
device back within `offline_grace_s` (an agent restart, a reboot) keeps its deployment going.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from protocol.messages import Command, DeviceState, Event
from protocol.mqtt import MqttLink
from protocol.topics import Topics
from server import keys
from server.deployer import Deployer, DeployerConfig
from server.policy import parse_policy
from server.registry import Registry
from server.service import EdgeGuideServer, ServerConfig

RUNTIME = {"name": "ai-edge-litert", "version": "2.3.0"}


def _deployer(registry: Registry, data_dir: Path, grace: float) -> tuple[Deployer, list[tuple[str, bytes]]]:
    sent: list[tuple[str, bytes]] = []
    policy = parse_policy('name = "t"\n[limits.agreement_at_k]\nmin = 0.9\nrequired = true\n', "t")
    config = DeployerConfig(deadline_s=1800.0, offline_grace_s=grace)
    return Deployer(registry, keys.server_key(data_dir), lambda t, p: sent.append((t, p)), topics=Topics("t"),
                    policy=policy, config=config), sent


def _measuring(registry: Registry, deployer: Deployer, artifact: Path, device: str) -> str:
    """A deployment the device has fully received and is measuring."""
    registry.upsert_device(device, status="online", runtime=RUNTIME, from_state=True)
    record = registry.register(artifact)
    dep = deployer.create(record.model_id, device)
    assert deployer.start(dep.deployment_id)
    deployer.handle_event(Event(device_id=device, type="download_complete", deployment_id=dep.deployment_id))
    assert registry.deployment(dep.deployment_id).status == "measuring"
    return dep.deployment_id


def test_a_device_offline_past_the_grace_ends_its_deployment_with_the_reason(tmp_path: Path,
                                                                             tiny_artifact: Path) -> None:
    registry = Registry(tmp_path)
    deployer, sent = _deployer(registry, tmp_path, grace=30.0)
    dep_id = _measuring(registry, deployer, tiny_artifact, "pi-20")
    registry.upsert_device("pi-20", status="offline", from_state=True)  # its Last Will arrived
    gone_at = registry.device("pi-20").last_seen

    deployer.tick(now=gone_at + 29.0)  # a restart or reboot may still bring it back
    assert registry.deployment(dep_id).status == "measuring"
    deployer.tick(now=gone_at + 31.0)
    final = registry.deployment(dep_id)
    assert final.status == "timeout", final
    assert final.reason.startswith("device_offline: pi-20 went offline at ")
    assert "within 30 s; last status measuring" in final.reason
    cancel = Command.from_json(sent[-1][1])
    assert sent[-1][0] == "t/dev/pi-20/down/command" and (cancel.command, cancel.deployment_id) == ("cancel", dep_id)
    deployer.close()


def test_a_device_back_within_the_grace_keeps_its_deployment(tmp_path: Path, tiny_artifact: Path) -> None:
    registry = Registry(tmp_path)
    deployer, _ = _deployer(registry, tmp_path, grace=30.0)
    dep_id = _measuring(registry, deployer, tiny_artifact, "pi-21")
    registry.upsert_device("pi-21", status="offline", from_state=True)
    registry.upsert_device("pi-21", status="online", runtime=RUNTIME, from_state=True)  # restarted
    deployer.tick(now=time.time() + 600.0)
    assert registry.deployment(dep_id).status == "measuring"
    deployer.close()


def test_the_grace_counts_from_the_deployment_when_the_device_was_already_offline(tmp_path: Path,
                                                                                  tiny_artifact: Path) -> None:
    registry = Registry(tmp_path)
    deployer, _ = _deployer(registry, tmp_path, grace=30.0)
    registry.upsert_device("pi-22", status="online", runtime=RUNTIME, from_state=True)
    registry.upsert_device("pi-22", status="offline", from_state=True)
    record = registry.register(tiny_artifact)
    dep = deployer.create(record.model_id, "pi-22")
    deployer.tick(now=dep.created + 10.0)  # starts it: the broker keeps the manifest for the device
    assert registry.deployment(dep.deployment_id).status == "transferring"
    deployer.tick(now=dep.created + 31.0)
    final = registry.deployment(dep.deployment_id)
    assert final.status == "timeout" and "last status transferring" in final.reason
    deployer.close()


def test_offline_grace_must_be_positive() -> None:
    with pytest.raises(ValueError, match="offline_grace_s must be > 0"):
        DeployerConfig(offline_grace_s=0)


@pytest.mark.network
def test_the_server_fails_a_measuring_deployment_soon_after_the_devices_last_will(
        tmp_path: Path, mosquitto, topic_prefix: str, device_link: MqttLink, tiny_artifact: Path) -> None:
    """Over a real broker: the retained offline state ends the deployment in seconds, not at its deadline."""
    server = EdgeGuideServer(Registry(tmp_path / "data"),
                             ServerConfig(broker_url=mosquitto.url, topic_prefix=topic_prefix,
                                          client_id=f"srv-{topic_prefix}", tick_s=0.1),
                             deployer_config=DeployerConfig(deadline_s=1500.0, offline_grace_s=1.0)).start()
    topics = server.topics
    try:
        online = DeviceState(device_id="pi-23", status="online", runtime=RUNTIME)
        device_link.publish(topics.up("pi-23", "state"), online.to_json(), retain=True).wait(5)
        record = server.registry.register(tiny_artifact)
        dep = server.deploy(record.model_id, "pi-23", wait_seen_s=10.0)
        event = Event(device_id="pi-23", type="download_complete", deployment_id=dep.deployment_id)
        device_link.publish(topics.up("pi-23", "event"), event.to_json()).wait(5)
        deadline = time.monotonic() + 10
        while server.registry.deployment(dep.deployment_id).status != "measuring":
            assert time.monotonic() < deadline, server.registry.deployment(dep.deployment_id)
            time.sleep(0.05)
        started = time.monotonic()
        offline = DeviceState(device_id="pi-23", status="offline")  # the agent's Last Will payload
        device_link.publish(topics.up("pi-23", "state"), offline.to_json(), retain=True).wait(5)
        final = server.wait(dep.deployment_id, timeout=15)
        took = time.monotonic() - started
        assert final.status == "timeout" and final.reason.startswith("device_offline: pi-23"), final
        assert 1.0 <= took < 10.0, took
        device_link.publish(topics.up("pi-23", "state"), b"", retain=True)  # clear the retained message
    finally:
        server.stop()
