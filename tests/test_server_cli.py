"""`edgeguide-server` commands, including `serve` as a real process and `deploy` from another one."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.cli import COMMANDS, build_parser, main
from server.local_agent import LocalAgent
from server.registry import Registry

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_subcommand_has_help_defaults_and_exit_codes(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    subparser = build_parser()._subparsers._group_actions[0].choices[command]
    assert f"usage: {subparser.prog}" in out and subparser.prog.startswith("edgeguide-server ")
    assert "exit codes:" in out and "3    --wait ran out of time" in out
    assert subparser.description, f"{command} has no description"
    formatter = subparser._get_formatter()
    for action in subparser._actions:  # every option explained, its default shown
        assert action.help, f"{command} {action.option_strings or action.dest} has no help text"
        if action.option_strings and action.default not in (None, False, "==SUPPRESS==") \
                and action.dest != "help":
            assert "default" in formatter._expand_help(action), f"{command} {action.option_strings} hides its default"


def test_register_list_export_key_and_refuse_an_unknown_device(tmp_path: Path, tiny_artifact: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    data = ["--data-dir", str(tmp_path / "data")]
    assert main([*data, "register", str(tiny_artifact), "--model-id", "tiny"]) == 0
    assert "registered tiny@1" in capsys.readouterr().out
    assert main([*data, "artifacts"]) == 0
    assert "tiny@1" in capsys.readouterr().out
    assert main([*data, "export-key", str(tmp_path / "key.pem")]) == 0
    assert (tmp_path / "key.pem").read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    assert main([*data, "deploy", "tiny", "--device", "ghost"]) == 2
    err = capsys.readouterr().err
    assert "device 'ghost' has never been seen" in err and "Traceback" not in err
    assert main([*data, "deploy", "nope:3", "--device", "ghost"]) == 2
    assert "no registered artifact 'nope@3'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*data, "deploy", "tiny:latest", "--device", "x"])
    assert "expects an integer version" in capsys.readouterr().err
    assert main([*data, "deployments"]) == 0 and main([*data, "devices"]) == 0


@pytest.fixture
def serve_process(tmp_path: Path, mosquitto, topic_prefix: str) -> Iterator[subprocess.Popen]:
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "server", "-v", "--data-dir", str(tmp_path / "data"), "serve",
                             "--broker", mosquitto.url, "--topic-prefix", topic_prefix,
                             "--client-id", f"serve-{topic_prefix}"], cwd=REPO, stdout=log, stderr=log)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(15)
        log.close()


@pytest.mark.network
@pytest.mark.slow
def test_serve_process_performs_cli_deployments_and_deploy_can_run_its_own_server(
        tmp_path: Path, mosquitto, topic_prefix: str, tiny_artifact: Path, serve_process: subprocess.Popen,
        capsys: pytest.CaptureFixture[str]) -> None:
    data = ["--data-dir", str(tmp_path / "data")]
    assert main([*data, "register", str(tiny_artifact), "--model-id", "tiny"]) == 0
    assert main([*data, "export-key", str(tmp_path / "key.pem")]) == 0
    with LocalAgent("cli-dev", mosquitto.url, tmp_path / "agent", tmp_path / "key.pem", topic_prefix=topic_prefix):
        registry = Registry(tmp_path / "data")
        deadline = time.monotonic() + 30
        while registry.find_device("cli-dev") is None:  # `serve` records the agent's retained state
            assert serve_process.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(0.1)
        capsys.readouterr()
        # 1) recorded here, performed by the `serve` process
        assert main([*data, "deploy", "tiny", "--device", "cli-dev", "--wait", "--timeout", "120"]) == 0, \
            (tmp_path / "serve.log").read_text()[-3000:]
        out = capsys.readouterr().out
        assert "promoted" in out and "pass" in out and "p90_ms" in out
        # 2) `serve` stopped: `deploy --broker` runs a one-off server for its deployment
        serve_process.terminate()
        assert serve_process.wait(15) == 0
        assert main([*data, "register", str(tiny_artifact), "--model-id", "tiny"]) == 0
        assert main([*data, "deploy", "tiny", "--device", "cli-dev", "--wait", "--timeout", "120",
                     "--broker", mosquitto.url, "--topic-prefix", topic_prefix]) == 0
        assert "tiny@2 -> cli-dev" in capsys.readouterr().out
    assert [d.status for d in Registry(tmp_path / "data").deployments(device_id="cli-dev")] == ["promoted"] * 2
    assert main([*data, "deployments", "--device", "cli-dev"]) == 0
    assert "tiny@2" in capsys.readouterr().out
