"""Agent configuration (file < env < options), validation messages, and the CLI in a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_agent_support import new_keypair

from agent.config import AgentConfig, ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


def test_file_env_and_overrides_layer_in_that_order(tmp_path: Path) -> None:
    _, pub = new_keypair(tmp_path)
    conf = tmp_path / "agent.toml"
    conf.write_text(f'[agent]\ndevice_id = "pi-1"\nbroker_url = "mqtt://10.0.0.2:1883"\nserver_key = "{pub}"\n'
                    f'state_dir = "{tmp_path / "s"}"\nthreads = 2\nmeasure_mode = "full"\nhttp_port = 9000\n')
    env = {"EDGEGUIDE_THREADS": "3", "EDGEGUIDE_PASSWORD": "pw", "EDGEGUIDE_USERNAME": "pi-1",
           "EDGEGUIDE_HTTP_PORT": "none"}
    config = load_config(conf, {"threads": 4, "device_id": None}, env=env)
    assert config.device_id == "pi-1" and config.broker_url == "mqtt://10.0.0.2:1883"
    assert config.threads == 4  # option beats env beats file
    assert config.measure_mode == "full" and config.http_port is None and config.server_key == pub
    assert config.to_dict()["password"] == "***" and config.to_dict(mask_secrets=False)["password"] == "pw"
    assert load_config(conf, env={}).threads == 2 and load_config(conf, env={}).http_port == 9000


def test_every_problem_is_listed_with_its_value(tmp_path: Path) -> None:
    conf = tmp_path / "agent.toml"
    conf.write_text('device_id = "has space"\nbroker_url = "http://x"\nthreads = 0\nmeasure_mode = "slow"\n'
                    'quota_bytes = 999999999999\nverdict_timeout_s = -1\ncolour = "blue"\n'
                    f'server_key = "{tmp_path / "missing.pem"}"\ntls_cert = "{conf}"\n')
    with pytest.raises(ConfigError) as info:
        load_config(conf, env={})
    text = str(info.value)
    for fragment in ("invalid device id 'has space'", "'http://x' must look like mqtt://", "threads: must be in "
                     "1..64, got 0", "measure_mode: must be one of ('quick', 'full'), got 'slow'",
                     "quota_bytes: must be in 1..67108864, got 999999999999", "verdict_timeout_s: must be > 0",
                     "unknown keys ['colour']", "missing.pem does not exist", "tls_cert and tls_key go together"):
        assert fragment in text
    assert len(info.value.problems) == 9


def test_bad_toml_and_bad_types_name_the_culprit(tmp_path: Path) -> None:
    conf = tmp_path / "agent.toml"
    conf.write_text("device_id = \n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(conf, env={})
    with pytest.raises(ConfigError, match="threads: cannot use 'two'"):
        load_config(None, {"threads": "two"}, env={})


def test_defaults_are_the_documented_ones() -> None:
    c = AgentConfig()
    assert (c.http_host, c.http_port, c.threads, c.quota_bytes, c.measure_mode) == \
        ("127.0.0.1", 8700, 1, 64 * 1024 * 1024, "full")


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True, timeout=60,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


def test_check_config_prints_masked_config_and_loads_no_tensorflow(tmp_path: Path) -> None:
    _, pub = new_keypair(tmp_path)
    done = _cli("--check-config", "--device-id", "pi-9", "--broker", "mqtt://127.0.0.1:1", "--state-dir",
                str(tmp_path / "s"), "--server-key", str(pub), "--username", "pi-9", "--http-port", "0",
                env={"EDGEGUIDE_PASSWORD": "hunter2"})
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["config"]["password"] == "***" and "hunter2" not in done.stdout
    assert out["config"]["device_id"] == "pi-9" and out["config"]["http_port"] == 0
    assert out["runtime"] == {"name": "ai-edge-litert", "version": "2.3.0"}
    assert out["heavy_modules"] == []  # agent.daemon, measure and serving imported, TensorFlow not


def test_check_config_exits_2_with_the_reasons(tmp_path: Path) -> None:
    done = _cli("--check-config", "--device-id", "../etc", "--state-dir", str(tmp_path))
    assert done.returncode == 2
    assert "invalid device id '../etc'" in done.stderr and "server_key: required" in done.stderr


def test_help_explains_every_option() -> None:
    done = _cli("--help")
    assert done.returncode == 0
    for option in ("--device-id", "--broker", "--state-dir", "--server-key", "--config", "--http-port", "--threads",
                   "--username", "--password", "--tls-ca", "--tls-cert", "--tls-key", "--measure-mode",
                   "--check-config", "--once-ready-file", "--quota-bytes", "--runtime"):
        assert option in done.stdout


def test_a_server_key_that_is_not_an_ed25519_pem_is_refused(tmp_path: Path) -> None:
    not_a_key = tmp_path / "key.pem"
    not_a_key.write_text("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
    with pytest.raises(ConfigError, match="is not an Ed25519 public key PEM"):
        load_config(None, {"device_id": "d1", "server_key": str(not_a_key), "state_dir": str(tmp_path)}, env={})


def test_mqtt_protocol_and_report_resend_from_file_env_and_options(tmp_path: Path) -> None:
    _, pub = new_keypair(tmp_path)
    conf = tmp_path / "agent.toml"
    conf.write_text(f'device_id = "pi-1"\nserver_key = "{pub}"\nstate_dir = "{tmp_path / "s"}"\n'
                    'mqtt_protocol = "3.1.1"\nreport_resend_s = 12.5\n')
    from_file = load_config(conf, env={})
    assert (from_file.mqtt_protocol, from_file.report_resend_s) == ("3.1.1", 12.5)
    from_env = load_config(conf, env={"EDGEGUIDE_MQTT_PROTOCOL": "5", "EDGEGUIDE_REPORT_RESEND_S": "4"})
    assert (from_env.mqtt_protocol, from_env.report_resend_s) == ("5", 4.0)
    assert load_config(conf, {"mqtt_protocol": "auto"}, env={"EDGEGUIDE_MQTT_PROTOCOL": "5"}).mqtt_protocol == "auto"
    assert (AgentConfig().mqtt_protocol, AgentConfig().report_resend_s) == ("auto", 30.0)
    with pytest.raises(ConfigError) as info:
        load_config(conf, {"mqtt_protocol": "3", "report_resend_s": 0}, env={})
    assert "mqtt_protocol: must be one of ('auto', '5', '3.1.1'), got '3'" in str(info.value)
    assert "report_resend_s: must be > 0 seconds, got 0.0" in str(info.value)


def test_check_config_shows_mqtt_protocol_and_report_resend(tmp_path: Path) -> None:
    _, pub = new_keypair(tmp_path)
    base = ("--check-config", "--device-id", "pi-9", "--state-dir", str(tmp_path / "s"), "--server-key", str(pub))
    done = _cli(*base, "--mqtt-protocol", "3.1.1", "--report-resend-s", "7.5")
    assert done.returncode == 0, done.stderr
    config = json.loads(done.stdout)["config"]
    assert (config["mqtt_protocol"], config["report_resend_s"]) == ("3.1.1", 7.5)
    from_env = _cli(*base, env={"EDGEGUIDE_MQTT_PROTOCOL": "5", "EDGEGUIDE_REPORT_RESEND_S": "2"})
    assert json.loads(from_env.stdout)["config"]["mqtt_protocol"] == "5"
    assert json.loads(from_env.stdout)["config"]["report_resend_s"] == 2.0
    bad = _cli(*base, env={"EDGEGUIDE_MQTT_PROTOCOL": "4", "EDGEGUIDE_REPORT_RESEND_S": "-1"})
    assert bad.returncode == 2
    assert "mqtt_protocol: must be one of" in bad.stderr and "got '4'" in bad.stderr
    assert "report_resend_s: must be > 0 seconds, got -1.0" in bad.stderr
    assert _cli(*base, "--mqtt-protocol", "4").returncode == 2  # argparse refuses it too
    help_text = _cli("--help").stdout
    assert "--mqtt-protocol" in help_text and "--report-resend-s" in help_text and "amqtt" in help_text


def test_example_config_names_only_real_keys() -> None:
    import tomllib
    from dataclasses import fields

    example = tomllib.loads((REPO / "deploy" / "agent.example.toml").read_text())
    known = {f.name for f in fields(AgentConfig)} - {"extra"}
    assert set(example) <= known, set(example) - known
    assert example["mqtt_protocol"] == "auto" and example["report_resend_s"] == 30.0


def test_http_allowed_hosts_must_be_host_names() -> None:
    ok = AgentConfig(device_id="pi-1", server_key=None, http_allowed_hosts=" Pi-01.local, kiosk ")
    assert ok.allowed_hosts == ["pi-01.local", "kiosk"]
    with pytest.raises(ConfigError, match="http_allowed_hosts: not host names"):
        AgentConfig(device_id="pi-1", http_allowed_hosts="evil.example:80,a b").validate()


def test_version_exit_codes_and_the_names_shared_with_the_server(tmp_path: Path) -> None:
    version = _cli("--version")
    assert version.returncode == 0 and version.stdout.startswith("edgeguide-agent ")
    assert "exit codes:" in _cli("--help").stdout
    _, pub = new_keypair(tmp_path)
    base = ("--check-config", "--device-id", "pi-9", "--state-dir", str(tmp_path / "s"), "--server-key", str(pub))
    # The server's env name and the agent's older one both set the broker; the option beats both.
    for env_name in ("EDGEGUIDE_BROKER", "EDGEGUIDE_BROKER_URL"):
        done = _cli(*base, env={env_name: "mqtt://broker.test:1884"})
        assert done.returncode == 0, done.stderr
        config = json.loads(done.stdout)["config"]
        assert config["broker_url"] == "mqtt://broker.test:1884", env_name
        assert config["measure_mode"] == "full"  # production measurement unless asked otherwise
    done = _cli(*base, "--broker-url", "mqtt://opt.test:1", "-v", env={"EDGEGUIDE_BROKER": "mqtt://env.test:1"})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["config"]["broker_url"] == "mqtt://opt.test:1"
    assert _cli(*base, "--log-level", "debug").returncode == 0
    conf = tmp_path / "agent.toml"
    conf.write_text(f'device_id = "pi-1"\nserver_key = "{pub}"\nstate_dir = "{tmp_path / "s"}"\n'
                    'broker = "mqtt://file.test:1"\n')
    assert load_config(conf, env={}).broker_url == "mqtt://file.test:1"


def test_a_missing_server_key_points_to_export_key(tmp_path: Path) -> None:
    done = _cli("--check-config", "--device-id", "pi-9", "--state-dir", str(tmp_path))
    assert done.returncode == 2
    assert "edgeguide-server export-key" in done.stderr and "--server-key" in done.stderr
    done = _cli("--check-config", "--device-id", "pi-9", "--state-dir", str(tmp_path), "--server-key",
                str(tmp_path / "nope.pem"))
    assert done.returncode == 2 and "export-key" in done.stderr


def test_http_port_in_use_is_one_line_and_the_pinned_key_fingerprint_is_logged(tmp_path: Path) -> None:
    import socket

    from protocol import signing
    from server.mosquitto import free_port

    _, pub = new_keypair(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = _cli("--device-id", "pi-9", "--state-dir", str(tmp_path / "s"), "--server-key", str(pub),
                    "--broker", f"mqtt://127.0.0.1:{free_port()}", "--http-port", str(port))
    assert done.returncode == 1, done.stderr  # a start-up failure a supervisor retries, not a config error
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr and "--http-port" in done.stderr
    assert "Traceback" not in done.stderr
    fingerprint = signing.fingerprint(signing.load_public_key(pub))
    assert f"server_key_pinned path={pub} fingerprint={fingerprint}" in done.stderr
