"""pytest plugin of the HIL suite: target selection, the device fixtures, restart skips, the report.

Load it with `-p hil_tests.plugin`. `--hil-target local` (default) starts one agent per device
profile on this machine; `--hil-target remote --broker URL --device ID[,ID...]` drives devices that
already run `edgeguide-agent` (several: one after the other, each its own profile named by its id).
`--hil-emulated WHAT` marks remote devices as emulated: the gate then uses the emulated policy
and the report says their timings and memory are not device figures. Test bodies get a `hil` Rig
either way. Tests that restart the
agent carry `@pytest.mark.hil_restart` and are skipped, with the fix, when a remote target has no
`--hil-restart-cmd`. Every run that selected HIL tests writes `--hil-report` (JSON + Markdown).
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import sys
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytest

from hil_tests.artifacts import HilArtifacts, build_hil_artifacts
from hil_tests.profiles import LEGACY_ENV, PROFILES, select_profiles
from hil_tests.report import HilReport, TestEntry, summarize_deployment
from hil_tests.rig import Rig, RigSettings
from hil_tests.targets import RESTART_FIX, AgentSpec, DeviceTarget, LocalTarget, RemoteTarget
from protocol import names
from protocol.errors import ProtocolError
from protocol.mqtt import BrokerAddress
from protocol.redact import redact_text
from server.registry import DeploymentRecord

_LOGGER = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
RESTART_MARKER = "hil_restart"
REMOTE_PROFILE = "remote"  # the profile name of a run against one remote device
EMULATED_NOTE = ("timings and memory are emulated ({how}), not device speed or device memory; the gate used "
                 "the emulated policy")
_SETTINGS = pytest.StashKey["HilSettings"]()
_REPORT = pytest.StashKey[HilReport]()


@dataclass(frozen=True)
class HilSettings:
    """The command-line choices, validated once."""

    target: str
    broker: str | None
    device: str | None
    profiles: tuple[str, ...]
    mode: str
    restart_cmd: str | None
    report: Path
    device_http: str | None
    server_dir: Path | None
    topic_prefix: str
    tls_ca: str | None = None
    devices: tuple[str, ...] = ()
    device_urls: tuple[str | None, ...] = ()
    emulated: str | None = None

    def remote(self, profile: str) -> tuple[str, str | None, str | None]:
        """Device id, restart command ({device} filled in) and HTTP URL of a remote profile."""
        index = 0 if profile == REMOTE_PROFILE else self.devices.index(profile)
        device = self.devices[index]
        restart = self.restart_cmd.replace("{device}", device) if self.restart_cmd else None
        http = self.device_urls[index] if index < len(self.device_urls) else None
        return device, restart, http

    def summary(self) -> dict[str, Any]:
        """For the report: plain values, the broker password masked."""
        data = asdict(self)
        data.update(report=str(self.report), server_dir=str(self.server_dir) if self.server_dir else None,
                    broker=_masked(self.broker), profiles=list(self.profiles),
                    command=" ".join(_masked(a) or "" for a in ["pytest", *sys.argv[1:]]))
        return data


def _masked(url: str | None) -> str | None:
    """`url` (or any argument holding one) without its password: the protocol's one redaction helper."""
    return redact_text(url) if url else url


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("hil", "EdgeGuide hardware-in-the-loop suite (hil_tests/)")
    group.addoption("--hil-target", choices=("local", "remote"), default="local",
                    help="local: start agents on this machine under device profiles (default); remote: drive a "
                         "device already running edgeguide-agent (needs --broker and --device)")
    group.addoption("--broker", default=None, help="broker URL mqtt://HOST:PORT (local default: a mosquitto "
                    "started for the session; remote: the broker the device uses)")
    group.addoption("--device", default=None, help="remote target: the device's --device-id, or several "
                    "separated by commas (each becomes a profile named by its id)")
    group.addoption("--hil-profile", default="all",
                    help=f"local device profile(s): {', '.join(PROFILES)}, a comma list, or all (default)")
    group.addoption("--hil-quick", dest="hil_mode", action="store_const", const="quick", default="quick",
                    help="quick on-device measurement (seconds per model; default)")
    group.addoption("--hil-full", dest="hil_mode", action="store_const", const="full",
                    help="full measurement (>= 1024 runs and >= 60 s per model, MLPerf rules); slow")
    group.addoption("--hil-restart-cmd", default=None,
                    help="remote target: shell command that restarts the agent, e.g. "
                         "'ssh pi sudo systemctl restart edgeguide-agent'; {device} is replaced by the device id")
    group.addoption("--hil-report", default="reports/hil-report.json",
                    help="where to write the HIL report (a .md twin goes next to it)")
    group.addoption("--hil-device-http", default=None,
                    help="remote target: base URL of the device's recommendation API as reachable from here "
                         "(e.g. http://127.0.0.1:8700 through ssh -L 8700:127.0.0.1:8700 pi); with several "
                         "devices a comma list in the same order; without it the serving checks use the "
                         "device's reports")
    group.addoption("--hil-server-dir", default=None,
                    help="data dir of the server the suite runs (registry + signing key). Remote: the one whose "
                         "public key the device pins (default $EDGEGUIDE_DATA_DIR or ~/.local/share/edgeguide); "
                         "local: a fresh temp dir per profile")
    group.addoption("--hil-topic-prefix", default="edgeguide",
                    help="remote target: the device's topic prefix (default edgeguide)")
    group.addoption("--hil-tls-ca", default=None,
                    help="CA certificate (PEM) of an mqtts:// broker, for the suite's server and broker watch")
    group.addoption("--hil-emulated", default=None, metavar="WHAT",
                    help="remote target: the devices run under emulation (e.g. 'qemu-user 7.2, aarch64 on "
                         "x86_64'); the gate uses hil_tests/emulated_policy.toml and the report marks their "
                         "timings and memory as emulated")


def _settings(config: pytest.Config) -> HilSettings:
    opt = config.option
    target = opt.hil_target
    problems = []
    devices = tuple(d.strip() for d in (opt.device or "").split(",") if d.strip())
    http = tuple(u.strip() or None for u in opt.hil_device_http.split(",")) if opt.hil_device_http else ()
    if target == "remote":
        if not opt.broker or not devices:
            problems.append("--hil-target remote needs --broker URL and --device ID (the device's --device-id)")
        profiles: tuple[str, ...] = devices if len(devices) > 1 else (REMOTE_PROFILE,)
        if len(set(devices)) != len(devices):
            problems.append(f"--device names a device twice: {opt.device}")
        if http and len(http) != len(devices):
            problems.append(f"--hil-device-http has {len(http)} URL(s) for {len(devices)} device(s); give one per "
                            "device, in the same order (an empty entry for a device without one)")
    else:
        if opt.hil_emulated:
            problems.append("--hil-emulated applies to remote targets (local agents run natively)")
        try:
            profiles = tuple(p.name for p in select_profiles(opt.hil_profile))
        except ValueError as exc:
            problems.append(f"--hil-profile: {exc}")
            profiles = ()
    if opt.broker:
        try:
            BrokerAddress.parse(opt.broker)
        except ValueError as exc:
            problems.append(f"--broker: {exc}")
    for device in devices:
        try:
            names.device_id(device)
        except ProtocolError as exc:
            problems.append(f"--device: {exc}")
    server_dir = Path(opt.hil_server_dir).expanduser() if opt.hil_server_dir else None
    if target == "remote" and server_dir is None:
        from server.cli import ENV_DATA_DIR
        from server.registry import DEFAULT_DATA_DIR
        server_dir = Path(os.environ.get(ENV_DATA_DIR) or DEFAULT_DATA_DIR)
    if problems:
        raise pytest.UsageError("; ".join(problems))
    report = Path(opt.hil_report)
    return HilSettings(target=target, broker=opt.broker, device=opt.device, profiles=profiles, mode=opt.hil_mode,
                       restart_cmd=opt.hil_restart_cmd, device_http=opt.hil_device_http, server_dir=server_dir,
                       report=report if report.is_absolute() else config.rootpath / report,
                       topic_prefix=opt.hil_topic_prefix, tls_ca=opt.hil_tls_ca, devices=devices,
                       device_urls=http, emulated=opt.hil_emulated)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{RESTART_MARKER}: the test restarts the device's agent (local process "
                                       "control, or --hil-restart-cmd on a remote target)")
    settings = _settings(config)
    config.stash[_SETTINGS] = settings
    config.stash[_REPORT] = HilReport({k: v for k, v in settings.summary().items() if k != "report"})
    config.pluginmanager.register(HilSession(config, settings, config.stash[_REPORT]), "edgeguide-hil-session")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "hil_profile" in metafunc.fixturenames:
        profiles = list(metafunc.config.stash[_SETTINGS].profiles)
        metafunc.parametrize("hil_profile", profiles, indirect=True, scope="session", ids=profiles)


class HilSession:
    """Per-run hooks: which items are HIL tests, restart skips, outcomes into the report, writing it."""

    def __init__(self, config: pytest.Config, settings: HilSettings, report: HilReport) -> None:
        self.config = config
        self.settings = settings
        self.report = report
        self.nodes: dict[str, tuple[str, str]] = {}
        self.written: tuple[Path, Path, bool] | None = None

    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        settings = self.settings
        for item in items:
            callspec = getattr(item, "callspec", None)
            if callspec is None or "hil_profile" not in callspec.params:
                continue
            self.nodes[item.nodeid] = (callspec.params["hil_profile"], getattr(item, "originalname", item.name))
            if item.get_closest_marker(RESTART_MARKER) and settings.target == "remote" and not settings.restart_cmd:
                item.add_marker(pytest.mark.skip(reason=f"restarts the agent, and remote device {settings.device} "
                                                        f"has no restart hook: {RESTART_FIX}"))
            if settings.mode == "full" and self.config.pluginmanager.hasplugin("timeout"):
                item.add_marker(pytest.mark.timeout(3600))

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.nodeid not in self.nodes:
            return
        profile, name = self.nodes[report.nodeid]
        self.report.test(report.nodeid, name, profile)  # deselected tests never get here
        detail = ""
        if report.skipped and isinstance(report.longrepr, tuple):
            detail = str(report.longrepr[2])
        elif report.failed:
            detail = report.longreprtext[-3000:]
        self.report.outcome(report.nodeid, report.when, report.outcome, report.duration, detail)

    def pytest_sessionfinish(self) -> None:
        if self.report.tests and not self.config.option.collectonly:
            json_path, md_path = self.report.write(self.settings.report)
            self.written = (json_path, md_path, self.report.acceptance()["passed"])

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.written:
            json_path, md_path, passed = self.written
            terminalreporter.write_sep("-", f"HIL report, acceptance {'PASSED' if passed else 'FAILED'}: "
                                            f"{json_path} (+ {md_path.name})")


# ---- fixtures ---------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def hil_settings(pytestconfig: pytest.Config) -> HilSettings:
    return pytestconfig.stash[_SETTINGS]


@pytest.fixture(scope="session")
def hil_report(pytestconfig: pytest.Config) -> HilReport:
    return pytestconfig.stash[_REPORT]


@pytest.fixture(scope="session")
def hil_broker_url(hil_settings: HilSettings, hil_report: HilReport,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The given broker, or a real mosquitto started for a local session."""
    if hil_settings.broker:
        yield hil_settings.broker
        return
    from server.mosquitto import MosquittoBroker

    broker = MosquittoBroker(workdir=tmp_path_factory.mktemp("hil-mosquitto"))
    broker.start()
    hil_report.settings["broker"] = f"{broker.url} (mosquitto started for this run)"
    try:
        yield broker.url
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def hil_artifacts(tmp_path_factory: pytest.TempPathFactory) -> HilArtifacts:
    """Tiny real models (TensorFlow is imported here, in the test process: it is the server side)."""
    base = tmp_path_factory.getbasetemp()
    # Same root as tests/test_loop_agent.py's fixture: one training per `pytest tests hil_tests` run.
    return build_hil_artifacts(tmp_path_factory.mktemp("hil-artifacts"), str(base / "agent-artifacts"))


@pytest.fixture(scope="session")
def hil_profile(request: pytest.FixtureRequest) -> str:
    """The device profile of this test ("remote" on a remote target); parametrized by --hil-profile."""
    return request.param


def _expected_runtime(profile_name: str) -> str | None:
    profile = PROFILES.get(profile_name)
    if profile is None:
        return None
    version = profile.expected_version or importlib.metadata.version(profile.expected_runtime)
    return f"{profile.expected_runtime} {version}"


def _local_target(profile_name: str, broker_url: str, prefix: str, server_dir: Path, workdir: Path,
                  mode: str) -> LocalTarget:
    from server.keys import export_public_key

    profile = PROFILES[profile_name]
    legacy = None
    if profile.environment == LEGACY_ENV:
        from hil_tests.legacy_env import legacy_agent_env

        legacy = legacy_agent_env()
    key = export_public_key(server_dir, workdir / "server_ed25519.pub.pem")
    spec = AgentSpec(device_id=f"hil-{profile_name}-{uuid.uuid4().hex[:6]}", broker_url=broker_url,
                     topic_prefix=prefix, server_key=key, workdir=workdir / "agent", measure_mode=mode)
    return LocalTarget(profile, spec, legacy)


@pytest.fixture(scope="session")
def hil(hil_profile: str, hil_settings: HilSettings, hil_broker_url: str, hil_artifacts: HilArtifacts,
        hil_report: HilReport, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    """The Rig (server + device + broker watch) of one profile; the device runs for the whole session."""
    workdir = tmp_path_factory.mktemp(f"hil-{hil_profile}")
    target: DeviceTarget
    if hil_settings.target == "remote":
        server_dir = hil_settings.server_dir
        prefix = hil_settings.topic_prefix
        device, restart, http = hil_settings.remote(hil_profile)
        target = RemoteTarget(device, restart, http, profile=hil_profile)
    else:
        server_dir = hil_settings.server_dir / hil_profile if hil_settings.server_dir else workdir / "server"
        prefix = f"hil-{uuid.uuid4().hex[:8]}"
        target = _local_target(hil_profile, hil_broker_url, prefix, server_dir, workdir, hil_settings.mode)
    rig = Rig(RigSettings(hil_broker_url, prefix, server_dir, hil_settings.mode, hil_settings.tls_ca,
                          emulated=hil_settings.emulated), target, hil_artifacts)
    rig.expected_runtime = _expected_runtime(hil_profile)
    rig.expected_threads = PROFILES[hil_profile].threads if hil_profile in PROFILES else None
    entry = hil_report.device(hil_profile)
    entry.update(device_id=target.device_id, topic_prefix=prefix, server_dir=str(server_dir),
                 expected_runtime=rig.expected_runtime, emulated=hil_settings.emulated,
                 figures_note=EMULATED_NOTE.format(how=hil_settings.emulated) if hil_settings.emulated else None,
                 policy=rig.server.deployer.policy.name)
    try:
        rig.start()
        runtime = rig.device().runtime or {}
        entry.update(target.describe(), announced_runtime=f"{runtime.get('name')} {runtime.get('version')}",
                     http_note=rig.http_note)
        # Export-time checks for this device's runtime only (a LiteRT device needs no tflite-runtime venv).
        entry.update(runtime_checked_here=hil_artifacts.check_runtime(rig.device().runtime_key))
        yield rig
    finally:
        running_evidence = target.tensorflow_evidence()
        rig.stop()
        evidence = target.tensorflow_evidence()
        if evidence is not None and running_evidence:
            evidence = sorted(set(evidence) | set(running_evidence))
        entry.update(tensorflow_evidence=evidence,
                     modules_checked=target.modules_checked() if isinstance(target, LocalTarget) else None)


class Recorder:
    """What one test adds to the HIL report: deployments with their figures, named figures, notes."""

    def __init__(self, entry: TestEntry) -> None:
        self.entry = entry

    def deployment(self, dep: DeploymentRecord) -> dict[str, Any]:
        summary = summarize_deployment(dep)
        self.entry.deployments.append(summary)
        return summary

    def figure(self, name: str, value: Any) -> None:
        self.entry.figures[name] = value

    def note(self, text: str) -> None:
        _LOGGER.info("%s: %s", self.entry.nodeid, text)
        self.entry.notes.append(text)


@pytest.fixture
def hil_record(request: pytest.FixtureRequest, hil_report: HilReport) -> Recorder:
    """Record deployments, figures and notes of the running test into the HIL report."""
    node = request.node
    profile = node.callspec.params.get("hil_profile") if hasattr(node, "callspec") else None
    return Recorder(hil_report.test(node.nodeid, getattr(node, "originalname", node.name), profile))
