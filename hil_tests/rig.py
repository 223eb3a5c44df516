"""One device under test plus the real server that drives it, as production has them.

The server is EdgeGuideServer with its own registry and signing key (the device pins the public
half); tests deploy through its deployer API and read outcomes from its registry, and a
`DeviceWatch` shows the wire. The target is only asked to (re)start the agent. Nothing here
depends on whether the device is a local process or a real board.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from hil_tests.artifacts import HilArtifacts
from hil_tests.http_api import AgentHttp
from hil_tests.targets import DeviceTarget, TargetError
from hil_tests.watch import DeviceWatch
from protocol.topics import Topics
from server.deployer import DeployerConfig
from server.policy import Policy, load_policy
from server.registry import ArtifactRecord, DeploymentRecord, DeviceRecord, Registry
from server.service import EdgeGuideServer, ServerConfig

_LOGGER = logging.getLogger(__name__)

DEPLOY_TIMEOUT_S = {"quick": 180.0, "full": 1500.0}
SEEN_TIMEOUT_S = 60.0
# Limits for a device under emulation: its speed and memory are the emulator's (qemu-user leaks
# ~280 KiB per thread and runs ~100x slower), while golden agreement and size are the device's.
EMULATED_POLICY = Path(__file__).with_name("emulated_policy.toml")


class RigError(RuntimeError):
    """The rig cannot run the suite against this device; the message says what to change."""


@dataclass(frozen=True)
class RigSettings:
    """Where the server lives and talks; `mode` is the measurement mode asked for."""

    broker_url: str
    topic_prefix: str
    server_dir: Path
    mode: str = "quick"
    tls_ca: str | None = None
    emulated: str | None = None  # how the device is emulated; None for real hardware or a native agent


class Rig:
    """Server + device + broker watch for one profile (or one remote device) and a test session."""

    def __init__(self, settings: RigSettings, target: DeviceTarget, artifacts: HilArtifacts) -> None:
        self.settings = settings
        self.target = target
        self.artifacts = artifacts
        self.device_id = target.device_id
        self.topics = Topics(prefix=settings.topic_prefix)
        self.registry = Registry(settings.server_dir)
        config = ServerConfig(broker_url=settings.broker_url, client_id=f"hil-server-{uuid.uuid4().hex[:8]}",
                              clean_start=True, topic_prefix=settings.topic_prefix, tls_ca=settings.tls_ca,
                              shared_subscription=False, tick_s=0.5)
        # A HIL run must see every message of its device, so no $share group: another server
        # process on the same broker would otherwise take half of them.
        policy = load_policy(EMULATED_POLICY) if settings.emulated else None
        self.server = EdgeGuideServer(self.registry, config, policy=policy, deployer_config=DeployerConfig())
        self.watch = DeviceWatch(settings.broker_url, self.topics, self.device_id, tls_ca=settings.tls_ca)
        # A real device measures in its own configured mode (and may be slow): give it the long timeout.
        mode = settings.mode if target.kind == "local" else "full"
        self.deploy_timeout_s = DEPLOY_TIMEOUT_S.get(mode, DEPLOY_TIMEOUT_S["full"])
        # What a local profile promises ("name version" of the runtime, interpreter threads); None on a
        # real device, whose own configuration decides.
        self.expected_runtime: str | None = None
        self.expected_threads: int | None = None
        self.http_note: str | None = None

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> Rig:
        """Connect watch and server, start the device, wait until the server has seen it online."""
        started = time.time()
        self.watch.start()
        self.server.start()
        self.target.start()
        self.wait_online(since=started)
        self._check_version_floor()
        self._check_http()
        return self

    def _check_http(self) -> None:
        """A real device's API may be unreachable from here: then serving is judged by its reports."""
        url = self.target.http_url
        if url is None:
            self.http_note = "no URL reaches the device's HTTP API from here (--hil-device-http)"
            return
        problem = AgentHttp(url).reachable()
        if problem is not None:
            if self.target.kind == "local":
                raise RigError(f"local agent {self.device_id} does not answer on {url}: {problem}\n"
                               f"{self.target.log_tail()}")
            self.http_note = f"the device's HTTP API is not reachable: {problem}"
            _LOGGER.warning("%s; serving is judged by the device's reports instead", self.http_note)

    def stop(self) -> None:
        for step in (self.target.stop, self.server.stop, self.watch.stop, self.registry.close):
            try:
                step()
            except Exception:  # every part must get its chance to stop
                _LOGGER.exception("stopping the rig of %s: %s failed", self.device_id, step)

    def wait_online(self, since: float = 0.0, timeout: float = SEEN_TIMEOUT_S) -> DeviceRecord:
        """Until the registry has the device online from a state heard after `since` (a persistent
        registry still remembers the device from an earlier run, maybe no longer true)."""
        deadline = time.monotonic() + timeout
        while True:
            device = self.registry.find_device(self.device_id)
            if device is not None and device.status == "online" and device.last_seen >= since:
                return device
            if time.monotonic() > deadline:
                raise RigError(
                    f"device {self.device_id!r} not online on {self.settings.broker_url} under topic prefix "
                    f"{self.topics.prefix!r} after {timeout:.0f} s (registry says {device}); is its agent running "
                    f"with --device-id {self.device_id} --broker {self.settings.broker_url} and --topic-prefix "
                    f"{self.topics.prefix}?\n{self.target.log_tail()}")
            time.sleep(0.1)

    def _check_version_floor(self) -> None:
        """The agent refuses versions not newer than its active one: the registry must be ahead of it."""
        active = self.device().active_version
        latest = max((a.version for a in self.registry.artifacts()), default=0)
        if active is not None and latest < active:
            raise RigError(
                f"device {self.device_id} runs version {active} but the registry in {self.settings.server_dir} "
                f"has versions up to {latest} only, and the agent refuses versions that are not newer; point "
                f"--hil-server-dir at the data dir of the server that deployed to this device")

    # -- views --------------------------------------------------------------------------------
    def device(self) -> DeviceRecord:
        return self.registry.device(self.device_id)

    @property
    def http(self) -> AgentHttp | None:
        """The device's recommendation API, or None when it cannot be reached (see `http_note`)."""
        url = self.target.http_url
        return AgentHttp(url) if url and self.http_note is None else None

    def runtime_key(self) -> str:
        key = self.device().runtime_key
        if key is None:
            raise RigError(f"device {self.device_id} did not announce its runtime in up/state: {self.device()}")
        return key

    def event_kinds(self, deployment_id: str, until: str, timeout: float = 10.0) -> list[str]:
        """The deployment's event log once `until` is in it (a status row changes just before it is logged)."""
        deadline = time.monotonic() + timeout
        while True:
            kinds = [e["kind"] for e in self.registry.events(deployment_id=deployment_id)]
            if until in kinds or time.monotonic() > deadline:
                return kinds
            time.sleep(0.05)

    def diagnostics(self, deployment_id: str | None = None) -> str:
        events = self.registry.events(deployment_id=deployment_id) if deployment_id else \
            self.registry.events(device_id=self.device_id)[-30:]
        lines = [f"  {e['kind']}: {e['detail'][:200]}" for e in events]
        return "registry events:\n" + "\n".join(lines) + f"\nagent log tail:\n{self.target.log_tail()}"

    # -- deployments --------------------------------------------------------------------------
    def register(self, name_or_folder: str | Path) -> ArtifactRecord:
        folder = self.artifacts.folder(name_or_folder) if isinstance(name_or_folder, str) else Path(name_or_folder)
        return self.registry.register(folder)

    def start_deploy(self, record: ArtifactRecord, *, policy: Policy | None = None, force: bool = False,
                     chunk_size: int | None = None) -> DeploymentRecord:
        """Create and start a deployment through the server (raises what the deployer raises)."""
        return self.server.deploy(record.model_id, self.device_id, version=record.version, policy=policy,
                                  force=force, chunk_size=chunk_size, wait_seen_s=5.0)

    def wait(self, deployment_id: str, timeout: float | None = None) -> DeploymentRecord:
        """The deployment's final record; after a promotion also until the registry shows it active,
        so the next test starts from what the device really runs."""
        try:
            final = self.server.wait(deployment_id, timeout or self.deploy_timeout_s)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{self.diagnostics(deployment_id)}") from exc
        if final.status == "promoted":
            self.wait_active(final.version)
        return final

    def deploy(self, record: ArtifactRecord, **kwargs: object) -> DeploymentRecord:
        """Deploy and wait for the outcome (promoted, rolled back, rejected or timed out)."""
        dep = self.start_deploy(record, **kwargs)  # type: ignore[arg-type]
        return self.wait(dep.deployment_id)

    def ensure_incumbent(self) -> int:
        """The device's active version, after deploying the float model if it has none."""
        active = self.device().active_version
        if active is not None:
            return active
        final = self.deploy(self.register("float"))
        if final.status != "promoted":
            raise AssertionError(f"could not give {self.device_id} a first model: {final.status} {final.reason}\n"
                                 f"{self.diagnostics(final.deployment_id)}")
        return final.version

    def wait_active(self, version: int, timeout: float = 30.0) -> DeviceRecord:
        """Until the registry's view of the device (from its up/state) shows `version` active."""
        deadline = time.monotonic() + timeout
        while True:
            device = self.device()
            if device.active_version == version:
                return device
            if time.monotonic() > deadline:
                raise AssertionError(f"device {self.device_id} still reports version {device.active_version} "
                                     f"active, expected {version}\n{self.diagnostics()}")
            time.sleep(0.1)

    # -- restart hook -------------------------------------------------------------------------
    def restart_device(self, timeout: float = 120.0) -> None:
        """Restart the agent via the target's hook and wait, on the wire, for offline then online."""
        if not self.target.can_restart:
            raise TargetError(f"target {self.device_id} cannot be restarted")
        mark = self.watch.mark()
        self.target.restart()
        offline = self.watch.wait_state("offline", start=mark, timeout=timeout)
        self.watch.wait_state("online", start=offline.index + 1, timeout=timeout)
