"""`python -m hil_tests.arm64 run|build|restart|stop`: the HIL suite against emulated Raspberry Pi OS 64-bit.

`run` (what `make hil-arm64` does): build or reuse the userland, start a mosquitto here and one
agent per profile inside the userland, run the whole HIL suite with `--hil-target remote` against
them (restart hook and HTTP URLs included), stop everything, and check the report: every device
`aarch64`, announcing the runtime its venv has, golden agreement 1.0 and acceptance PASSED. Exit
code 0 only then. `restart --device ID` is the restart hook the suite calls.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from hil_tests.arm64 import device
from hil_tests.arm64.rootfs import CACHE, REPO, BuildError, Userland, arm_profiles, build, say

_LOGGER = logging.getLogger(__name__)

RUN_DIR = CACHE / "run"
SUMMARY = "hil-arm64.json"


def emulator() -> str:
    """e.g. "qemu-user 7.2.19 (Debian 1:7.2+dfsg-7+deb12u18), aarch64 on x86_64"."""
    try:
        out = subprocess.run(["/usr/bin/qemu-aarch64-static", "--version"], capture_output=True, text=True,
                             timeout=30, check=False).stdout
    except OSError:
        out = ""
    first = out.splitlines()[0] if out else "qemu-aarch64 version unknown"
    version = first.split("version", 1)[1].strip() if "version" in first else first
    return f"qemu-user {version}, aarch64 on {platform.machine()}"


def _pytest_command(args: argparse.Namespace, broker_url: str, server_dir: Path,
                    runs: list[device.AgentRun]) -> list[str]:
    restart = f"{sys.executable} -m hil_tests.arm64 restart --run-dir {args.run_dir} --device {{device}}"
    return [sys.executable, "-m", "pytest", "hil_tests", "-p", "hil_tests.plugin", "--hil-target", "remote",
            "--broker", broker_url, "--device", ",".join(r.device_id for r in runs),
            "--hil-server-dir", str(server_dir), "--hil-restart-cmd", restart,
            "--hil-device-http", ",".join(f"http://127.0.0.1:{r.http_port}" for r in runs),
            "--hil-emulated", emulator(), "--hil-report", str(args.report),
            "--hil-full" if args.mode == "full" else "--hil-quick", *args.pytest_args]


def check_report(report_path: Path, expected: dict[str, str]) -> list[str]:
    """What is wrong with the run's report: machine, runtime, agreement, acceptance ([] = all fine)."""
    try:
        data = json.loads(report_path.read_text())
    except (OSError, ValueError) as exc:
        return [f"no HIL report at {report_path}: {exc}"]
    problems = []
    devices = {d.get("device_id"): d for d in data.get("devices", [])}
    for device_id, runtime in expected.items():
        dev = devices.get(device_id)
        if dev is None:
            problems.append(f"{device_id}: not in the report")
            continue
        if dev.get("machine") != "aarch64":
            problems.append(f"{device_id}: its reports name machine {dev.get('machine')!r}, not 'aarch64'")
        if dev.get("announced_runtime") != runtime:
            problems.append(f"{device_id}: announced {dev.get('announced_runtime')!r}, its venv has {runtime!r}")
        if dev.get("agreement_at_k_min") != 1.0:
            problems.append(f"{device_id}: golden agreement across ISAs {dev.get('agreement_at_k_min')} (expected "
                            "1.0: the same float model on another ISA must rank the same)")
        if not dev.get("emulated"):
            problems.append(f"{device_id}: the report does not mark it as emulated")
    if not data.get("acceptance", {}).get("passed"):
        failed = [f"{c['name']}: {c['detail'][:300]}" for c in data.get("acceptance", {}).get("criteria", [])
                  if c.get("status") == "fail"]
        problems.append(f"acceptance FAILED: {'; '.join(failed)}")
    return problems


def device_figures(report_path: Path) -> list[dict[str, Any]]:
    """Per device, the lifecycle test's figures (the promoted float deployment), for the summary."""
    data = json.loads(report_path.read_text())
    out = []
    for dev in data.get("devices", []):
        lifecycle = next((d for t in data.get("tests", []) if t["profile"] == dev["profile"]
                          and t["name"] == "test_deploy_measure_gate_promote" for d in t["deployments"]), {})
        out.append({k: dev.get(k) for k in ("device_id", "machine", "os_release", "python", "announced_runtime",
                                            "agreement_at_k_min", "measured_deployments", "emulated")}
                   | {k: lifecycle.get(k) for k in ("mode", "runs", "p50_ms", "p90_ms", "p99_ms", "peak_rss_mib")})
    return out


def run(args: argparse.Namespace) -> int:
    from server.keys import export_public_key
    from server.mosquitto import MosquittoBroker, free_port

    started = time.monotonic()
    profiles = [arm_profiles()[name] for name in args.profiles.split(",")]
    land = build(profiles)
    build_s = time.monotonic() - started
    run_dir: Path = args.run_dir
    for stale in sorted(run_dir.glob("*.json")):  # agents a killed earlier run left behind
        pid = device.stop(run_dir, stale.stem)
        if pid:
            say(f"stopped {stale.stem} (pid {pid}) left running by an earlier run")
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.rmtree(land.host_path(device.GUEST_STATE), ignore_errors=True)  # fresh devices for a fresh registry
    run_dir.mkdir(parents=True)
    server_dir = run_dir / "server"
    export_public_key(server_dir, land.host_path(device.GUEST_KEY))
    broker = MosquittoBroker(workdir=run_dir / "mosquitto")
    runs: list[device.AgentRun] = []
    suite_s = 0.0
    code = 1
    try:
        broker.start()
        say(f"mosquitto on {broker.url}")
        for profile in profiles:
            agent = device.profile_run(profile, broker.url, free_port(), args.mode, run_dir)
            runs.append(agent)
            t0 = time.monotonic()
            pid = device.start(land, agent, run_dir)
            say(f"{agent.device_id} ({profile.runtime}) running in the arm64 userland: pid {pid}, HTTP "
                f"127.0.0.1:{agent.http_port}, ready in {time.monotonic() - t0:.0f} s, log {agent.log}")
        cmd = _pytest_command(args, broker.url, server_dir, runs)
        say(f"HIL suite ({args.mode} measurement): {' '.join(cmd[1:])}")
        t0 = time.monotonic()
        code = subprocess.run(cmd, cwd=REPO, check=False).returncode
        suite_s = time.monotonic() - t0
    finally:
        for agent in runs:
            try:
                device.stop(run_dir, agent.device_id)
            except OSError as exc:
                _LOGGER.error("stopping %s: %s", agent.device_id, exc)
        broker.stop()
    tf = {r.device_id: device.imported_modules(land, r.device_id) for r in runs}
    problems = check_report(args.report, {p.device_id: p.runtime for p in profiles})
    problems += [f"{dev}: {name} imported {mods}" for dev, files in tf.items() for name, mods in files.items() if mods]
    problems += [f"{dev}: no exited agent left its module list" for dev, files in tf.items() if not files]
    summary = {"emulator": emulator(), "mode": args.mode, "build_s": round(build_s, 1), "suite_s": round(suite_s, 1),
               "total_s": round(time.monotonic() - started, 1), "pytest_exit": code,
               "tensorflow_modules": tf, "problems": problems,
               "devices": device_figures(args.report) if args.report.is_file() else []}
    summary_path = args.report.with_name(SUMMARY)
    summary_path.write_text(json.dumps(summary, indent=1) + "\n")
    for dev in summary["devices"]:
        say(f"{dev['device_id']}: {dev['machine']}, {dev['os_release']}, Python {dev['python']}, "
            f"{dev['announced_runtime']}, agreement {dev['agreement_at_k_min']}, {dev['mode']} p50/p90 "
            f"{dev['p50_ms']}/{dev['p90_ms']} ms (emulated), peak RSS {dev['peak_rss_mib']} MiB (emulated)")
    say(f"build {build_s:.0f} s, suite {suite_s:.0f} s; summary {summary_path}")
    if code != 0 or problems:
        for problem in problems:
            say(f"PROBLEM: {problem}")
        say(f"hil-arm64 FAILED (pytest exit {code})")
        return code or 1
    say("hil-arm64 PASSED: every device aarch64, acceptance PASSED")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hil_tests.arm64", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="build (cached), start the emulated devices, run the HIL suite, check")
    p_run.add_argument("--mode", choices=("quick", "full"), default="quick",
                       help="the devices' measurement mode (full: >= 1024 runs and >= 60 s per model; slow)")
    p_run.add_argument("--profiles", default="litert,legacy", help="comma list of litert, legacy")
    p_run.add_argument("--report", type=Path, default=REPO / "reports" / "hil-report.json")
    p_run.add_argument("pytest_args", nargs="*", help="more pytest arguments, after --")
    sub.add_parser("build", help="build or refresh the cached userland only")
    for name in ("restart", "stop"):
        p = sub.add_parser(name, help=f"{name} an emulated device's agent (the suite's restart hook)")
        p.add_argument("--device", required=name == "restart", help="device id (stop: all when omitted)")
    for p in sub.choices.values():
        p.add_argument("--run-dir", type=Path, default=RUN_DIR, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup in `finally` on SIGTERM too
    try:
        if args.command == "run":
            if not args.report.is_absolute():
                args.report = Path.cwd() / args.report
            return run(args)
        if args.command == "build":
            build(list(arm_profiles().values()))
            return 0
        if args.command == "restart":
            pid = device.restart(Userland(), args.run_dir, args.device)
            print(f"{args.device} restarted: pid {pid}")
            return 0
        states = sorted(args.run_dir.glob("*.json"))
        for path in states:
            if args.device in (None, path.stem):
                print(f"{path.stem}: stopped pid {device.stop(args.run_dir, path.stem)}")
        return 0
    except (BuildError, device.DeviceError) as exc:
        print(f"hil-arm64: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
