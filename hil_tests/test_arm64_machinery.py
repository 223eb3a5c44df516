"""The emulated-Pi runner's own parts, without building anything: mirror and pip-config discovery,
the chroot command, the cpuinfo stand-in, the report check, several remote devices per run, and
the set-up script's message to a non-root user. Fast; `make hil-arm64` runs the real thing."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from agent.measure.context import parse_cpuinfo
from hil_tests.arm64.__main__ import check_report
from hil_tests.arm64.chroot import CPUINFO_MODEL, chroot_command, cpuinfo_text, guest_env
from hil_tests.arm64.device import AgentRun
from hil_tests.arm64.rootfs import DEFAULT_MIRROR, arm_profiles, debian_mirror, pip_files
from hil_tests.plugin import HilSettings
from hil_tests.report import HilReport, summarize_deployment
from server.registry import DeploymentRecord

REPO = Path(__file__).resolve().parents[1]


def test_the_mirror_comes_from_the_machines_apt_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGEGUIDE_DEBIAN_MIRROR", raising=False)
    deb822 = tmp_path / "debian.sources"
    deb822.write_text("Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n\n"
                      "Types: deb-src\nURIs: http://src.example/debian\n\n"
                      "Types: deb\nURIs: http://mirror.example/debian/\nSuites: bookworm bookworm-updates\n")
    assert debian_mirror([deb822]) == "http://mirror.example/debian"
    legacy = tmp_path / "sources.list"
    legacy.write_text("# deb http://commented.example/debian bookworm main\n"
                      "deb [arch=amd64 signed-by=/k.gpg] https://other.example/debian bookworm main\n")
    assert debian_mirror([legacy]) == "https://other.example/debian"
    assert debian_mirror([tmp_path / "none.list"]) == DEFAULT_MIRROR
    monkeypatch.setenv("EDGEGUIDE_DEBIAN_MIRROR", "http://override.example/debian/")
    assert debian_mirror([deb822]) == "http://override.example/debian"


def test_pip_configuration_and_the_files_it_names_are_found(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / ".config" / "pip").mkdir(parents=True)
    cert, constraints = tmp_path / "ca.pem", tmp_path / "constraints.txt"
    cert.write_text("PEM")
    constraints.write_text("torch<=2\n")
    user_conf = home / ".config" / "pip" / "pip.conf"
    user_conf.write_text(f"[global]\ncert = {cert}\nconstraint = {constraints}\nindex-url = https://idx.example/\n")
    env = {"HOME": str(home), "XDG_CONFIG_DIRS": str(tmp_path / "nowhere"), "PIP_CERT": str(cert)}
    found = pip_files(env, home)
    assert user_conf in found and cert in found and constraints in found
    assert len(found) == len(set(found))  # the certificate is named twice, copied once


def test_the_chroot_command_mounts_privately_and_covers_cpuinfo(tmp_path: Path) -> None:
    env = guest_env({"X": "1"}, host_env={"PIP_INDEX_URL": "https://idx.example/", "SECRET_TOKEN": "t",
                                          "https_proxy": "http://proxy:3128"})
    assert env["PIP_INDEX_URL"] == "https://idx.example/" and env["https_proxy"] == "http://proxy:3128"
    assert "SECRET_TOKEN" not in env and env["X"] == "1" and env["HOME"] == "/root"
    cmd = chroot_command(tmp_path / "root", tmp_path / "cpuinfo", ["/usr/bin/python3", "-V"], env)
    assert cmd[:5] == ["unshare", "--mount", "--propagation", "private", "--"]
    script = cmd[7]
    assert 'mount --bind "$cpuinfo" "$root/proc/cpuinfo"' in script and script.endswith('exec chroot "$root" "$@"')
    assert cmd[9:11] == [str(tmp_path / "root"), str(tmp_path / "cpuinfo")]
    assert cmd[11:13] == ["/usr/bin/env", "-i"] and cmd[-2:] == ["/usr/bin/python3", "-V"]
    with pytest.raises(ValueError):
        chroot_command(tmp_path, tmp_path, [], env)


def test_the_cpuinfo_stand_in_is_arm_and_says_it_is_emulated() -> None:
    parsed = parse_cpuinfo(cpuinfo_text(3))
    assert parsed == {"cpu_model": "Cortex-A72", "board": CPUINFO_MODEL, "cores": 3}
    assert "emulation" in parsed["board"] and "model name" not in cpuinfo_text(1)


def test_agent_command_and_profiles() -> None:
    profiles = arm_profiles()
    assert profiles["litert"].runtime == "ai-edge-litert 2.3.0" and profiles["litert"].extra == "agent"
    legacy = profiles["legacy"]
    assert legacy.runtime == "tflite-runtime 2.14.0" and legacy.extra is None
    assert "numpy<2" in legacy.requirements and not any(r.startswith("ai-edge-litert") for r in legacy.requirements)
    run = AgentRun("legacy", legacy.device_id, legacy.venv, "mqtt://127.0.0.1:1", 8701, "full", "/tmp/l.log")
    argv = run.argv(2)
    assert argv[0] == "/opt/edgeguide/legacy/bin/edgeguide-agent"
    assert argv[argv.index("--measure-mode") + 1] == "full" and argv[argv.index("--http-port") + 1] == "8701"
    assert argv[-1].endswith("pi64-legacy.modules-2.txt")


def _deployment(machine: str, agreement: float) -> DeploymentRecord:
    report = {"load_ok": True, "mode": "quick", "runtime": {"name": "ai-edge-litert", "version": "2.3.0"},
              "latency_ms": {"p50": 0.3, "p90": 0.4, "p99": 1.0, "n": 200}, "memory": {"peak_rss_mib": 140.0},
              "quality": {"agreement_at_k": agreement}, "energy": {"source": "unavailable", "available": False},
              "context": {"machine": machine, "python": "3.11.2", "os_release": "Debian GNU/Linux 12 (bookworm)"}}
    return DeploymentRecord("d-0123456789ab", "pi64-litert", "hil-float@1", "hil-float", 1, "promoted", "", None,
                            8192, report, {"verdict": "PASS", "reason": "", "checks": []})


def test_the_report_names_each_devices_platform_and_the_runner_checks_it(tmp_path: Path) -> None:
    report = HilReport({"target": "remote"})
    report.device("pi64-litert").update(device_id="pi64-litert", announced_runtime="ai-edge-litert 2.3.0",
                                        emulated="qemu-user 7.2", figures_note="emulated")
    entry = report.test("hil_tests/t.py::test_x[pi64-litert]", "test_x", "pi64-litert")
    entry.deployments.append(summarize_deployment(_deployment("aarch64", 1.0)))
    report.outcome(entry.nodeid, "call", "passed", 1.0)
    platform = report.platform("pi64-litert")
    assert platform["machine"] == "aarch64" and platform["os_release"] == "Debian GNU/Linux 12 (bookworm)"
    assert platform["agreement_at_k_min"] == 1.0 and platform["measured_deployments"] == 1
    json_path, md_path = report.write(tmp_path / "hil-report.json")
    assert "**emulated devices (pi64-litert)**" in md_path.read_text()
    problems = check_report(json_path, {"pi64-litert": "ai-edge-litert 2.3.0", "pi64-legacy": "tflite-runtime 2.14.0"})
    assert "pi64-legacy: not in the report" in problems
    assert any(p.startswith("acceptance FAILED") for p in problems)  # coverage: 1 test of 5
    assert not [p for p in problems if p.startswith("pi64-litert")]

    entry.deployments.append(summarize_deployment(_deployment("x86_64", 0.95)))
    report.write(json_path)
    problems = check_report(json_path, {"pi64-litert": "ai-edge-litert 2.3.0"})
    assert any("machine ['aarch64', 'x86_64']" in p for p in problems)
    assert any("golden agreement across ISAs 0.95" in p for p in problems)
    assert check_report(tmp_path / "missing.json", {})[0].startswith("no HIL report at")
    assert json.loads(json_path.read_text())["devices"][0]["machine"] == ["aarch64", "x86_64"]


def test_several_remote_devices_each_get_their_hook_and_url() -> None:
    settings = HilSettings(target="remote", broker="mqtt://b:1", device="a,b", profiles=("a", "b"), mode="quick",
                           restart_cmd="svc restart {device}", report=Path("r.json"), device_http=None,
                           server_dir=None, topic_prefix="edgeguide", devices=("a", "b"),
                           device_urls=("http://127.0.0.1:1", None))
    assert settings.remote("a") == ("a", "svc restart a", "http://127.0.0.1:1")
    assert settings.remote("b") == ("b", "svc restart b", None)
    single = HilSettings(target="remote", broker="mqtt://b:1", device="pi", profiles=("remote",), mode="quick",
                         restart_cmd="ssh pi restart", report=Path("r.json"), device_http="http://h:1",
                         server_dir=None, topic_prefix="edgeguide", devices=("pi",), device_urls=("http://h:1",))
    assert single.remote("remote") == ("pi", "ssh pi restart", "http://h:1")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the script as another user")
def test_the_set_up_script_prints_the_apt_command_to_a_non_root_user() -> None:
    proc = subprocess.run(["runuser", "-u", "nobody", "--", "env", "PYTHON=/nonexistent/python3", "bash",
                           str(REPO / "scripts" / "install-system-deps.sh"), "base"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 1
    assert "sudo apt-get update && sudo apt-get install -y python3 python3-venv" in proc.stderr
