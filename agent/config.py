"""The agent's configuration: defaults < TOML file < EDGEGUIDE_<FIELD> env vars < command line.

Every field is validated once, at start-up, with an error that names the field and the value, so a
misconfigured device fails before it touches the broker or its state directory.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm

from protocol import names, signing
from protocol.errors import ProtocolError
from protocol.limits import DEFAULT_LIMITS, MIB
from protocol.mqtt import BrokerAddress
from protocol.redact import redact_text
from protocol.topics import Topics

_LOGGER = logging.getLogger(__name__)

ENV_PREFIX = "EDGEGUIDE_"
MEASURE_MODES = ("quick", "full")
MQTT_PROTOCOLS = ("auto", "5", "3.1.1")
_PATH_FIELDS = {"state_dir", "server_key", "tls_ca", "tls_cert", "tls_key"}
_SECRET_FIELDS = {"password"}
_HOST_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,62}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,62}[a-z0-9])?)*$")


class ConfigError(ValueError):
    """The configuration is invalid; the message lists every problem found."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = [redact_text(p) for p in problems]  # a bad broker URL must not print its password
        super().__init__("invalid agent configuration:\n  - " + "\n  - ".join(self.problems))


@dataclass
class AgentConfig:
    """Everything one device agent needs to run (see `edgeguide-agent --help` for each field)."""

    device_id: str = ""
    broker_url: str = "mqtt://127.0.0.1:1883"
    state_dir: Path = Path("/var/lib/edgeguide-agent")
    server_key: Path | None = None
    username: str | None = None
    password: str | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    topic_prefix: str = "edgeguide"
    http_host: str = "127.0.0.1"
    http_port: int | None = 8700  # 0 = any free port, None = no HTTP server
    # Host names (comma-separated) the HTTP API answers to besides its address and localhost, e.g.
    # "pi-01.local" for a LAN bind; any other name in the Host header is refused (DNS rebinding).
    http_allowed_hosts: str = ""
    threads: int = 1
    quota_bytes: int = 64 * MIB
    measure_mode: str = "full"  # production rules; "quick" only where a test or demo asks for it
    verdict_timeout_s: float = 600.0
    heartbeat_s: float = 30.0
    outbox_max_bytes: int = 4 * MIB
    chunk_stall_s: float = 15.0
    runtime: str | None = None  # force an interpreter (same as EDGEGUIDE_RUNTIME)
    # auto tries MQTT 5 for up to 5 s, then 3.1.1: name the version when the broker is known
    # (amqtt, the demo's embedded broker, speaks only 3.1.1 and never answers an MQTT 5 CONNECT).
    mqtt_protocol: str = "auto"
    # How often a report still waiting for its verdict is published again (also on every reconnect).
    report_resend_s: float = 30.0
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def validate(self) -> AgentConfig:
        """Raise ConfigError listing every invalid field; return self so calls chain."""
        problems: list[str] = []
        try:
            names.device_id(self.device_id)
        except ProtocolError as exc:
            problems.append(f"device_id: {exc}")
        try:
            BrokerAddress.parse(self.broker_url)
        except ValueError as exc:
            problems.append(f"broker_url: {exc}")
        try:
            Topics(prefix=self.topic_prefix)
        except ProtocolError as exc:
            problems.append(f"topic_prefix: {exc}")
        if self.server_key is None:
            problems.append("server_key: required (path of the server's Ed25519 public key PEM); write it on the "
                            "server with `edgeguide-server export-key server-key.pem`, copy it to the device and "
                            "pass --server-key server-key.pem")
        elif not Path(self.server_key).is_file():
            problems.append(f"server_key: file {self.server_key} does not exist (write it on the server with "
                            "`edgeguide-server export-key FILE`)")
        else:
            try:
                signing.load_public_key(Path(self.server_key))
            except (ValueError, TypeError, ProtocolError, UnsupportedAlgorithm) as exc:
                problems.append(f"server_key: {self.server_key} is not an Ed25519 public key PEM ({exc})")
        for name in ("tls_ca", "tls_cert", "tls_key"):
            value = getattr(self, name)
            if value is not None and not Path(value).is_file():
                problems.append(f"{name}: file {value} does not exist")
        if (self.tls_cert is None) != (self.tls_key is None):
            problems.append(f"tls_cert and tls_key go together, got tls_cert={self.tls_cert} tls_key={self.tls_key}")
        if self.password and not self.username:
            problems.append("password given without username")
        if self.http_port is not None and not 0 <= self.http_port <= 65535:
            problems.append(f"http_port: must be in 0..65535 (0 = any free port), got {self.http_port}")
        bad_hosts = [h for h in self.allowed_hosts if not _HOST_NAME.fullmatch(h)]
        if bad_hosts:
            problems.append(f"http_allowed_hosts: not host names: {bad_hosts!r:.200}")
        if not 1 <= self.threads <= 64:
            problems.append(f"threads: must be in 1..64, got {self.threads}")
        if not 1 <= self.quota_bytes <= DEFAULT_LIMITS.max_artifact_bytes:
            problems.append(f"quota_bytes: must be in 1..{DEFAULT_LIMITS.max_artifact_bytes}, got {self.quota_bytes}")
        if self.measure_mode not in MEASURE_MODES:
            problems.append(f"measure_mode: must be one of {MEASURE_MODES}, got {self.measure_mode!r}")
        if self.mqtt_protocol not in MQTT_PROTOCOLS:
            problems.append(f"mqtt_protocol: must be one of {MQTT_PROTOCOLS}, got {self.mqtt_protocol!r}")
        for name in ("verdict_timeout_s", "heartbeat_s", "chunk_stall_s", "report_resend_s"):
            if not getattr(self, name) > 0:
                problems.append(f"{name}: must be > 0 seconds, got {getattr(self, name)}")
        if self.outbox_max_bytes < 64 * 1024:
            problems.append(f"outbox_max_bytes: must be at least 65536 (one report), got {self.outbox_max_bytes}")
        if self.extra:
            known = sorted(f.name for f in fields(self) if f.name != "extra")
            problems.append(f"unknown keys {sorted(self.extra)}; known keys: {known}")
        if problems:
            raise ConfigError(problems)
        return self

    def to_dict(self, mask_secrets: bool = True) -> dict[str, Any]:
        """Plain JSON-able dict; the password is masked unless asked otherwise."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if isinstance(value, Path):
                value = str(value)
            if f.name in _SECRET_FIELDS and value and mask_secrets:
                value = "***"
            elif isinstance(value, str) and mask_secrets:
                value = redact_text(value)  # e.g. a password inside broker_url
            out[f.name] = value
        return out

    @property
    def allowed_hosts(self) -> list[str]:
        """`http_allowed_hosts` as a list of lower-case names."""
        return [h.strip().lower() for h in self.http_allowed_hosts.split(",") if h.strip()]

    @property
    def topics(self) -> Topics:
        return Topics(prefix=self.topic_prefix)


def _field_types() -> dict[str, str]:
    return {f.name: str(f.type) for f in fields(AgentConfig) if f.name != "extra"}


def _coerce(name: str, value: Any) -> Any:
    """Turn a TOML/env/CLI value into the field's type, naming the field when it cannot."""
    kind = _field_types()[name]
    if value is None:
        return None
    if isinstance(value, str) and value.strip().lower() in {"", "none", "null"} and "None" in kind:
        return None
    try:
        if name in _PATH_FIELDS:
            return Path(os.path.expanduser(str(value)))
        if kind.startswith("int"):
            if isinstance(value, bool):
                raise ValueError("a boolean is not an integer")
            return int(value)
        if kind.startswith("float"):
            if isinstance(value, bool):
                raise ValueError("a boolean is not a number")
            return float(value)
        return str(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError([f"{name}: cannot use {value!r} ({exc})"]) from exc


def _from_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError([f"config file {path}: {exc.strerror or exc}"]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"config file {path}: invalid TOML ({exc})"]) from exc
    # Accept either top-level keys or an [agent] table (so one file can hold several sections).
    section = data.get("agent", data)
    if not isinstance(section, dict):
        raise ConfigError([f"config file {path}: [agent] must be a table"])
    out = {k: v for k, v in section.items() if not (k == "agent" and section is data)}
    if "broker" in out:  # the command line's name; broker_url stays the field's name
        if "broker_url" in out:
            raise ConfigError([f"config file {path}: give broker or broker_url, not both"])
        out["broker_url"] = out.pop("broker")
    return out


# Environment names that mean the same field as EDGEGUIDE_<FIELD> (the server's spelling first).
ENV_ALIASES = {"broker_url": (ENV_PREFIX + "BROKER",)}


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    out = {}
    for name in _field_types():
        for key in (ENV_PREFIX + name.upper(), *ENV_ALIASES.get(name, ())):
            if key in env:
                out[name] = env[key]
                break
    return out


def load_config(path: Path | str | None = None, overrides: Mapping[str, Any] | None = None,
                env: Mapping[str, str] | None = None) -> AgentConfig:
    """Build and validate the effective config: defaults < file < env < overrides (None values ignored)."""
    env = os.environ if env is None else env
    merged: dict[str, Any] = {}
    config_path = path or env.get(ENV_PREFIX + "CONFIG")
    if config_path:
        merged.update(_from_toml(Path(config_path)))
    merged.update(_from_env(env))
    merged.update({k: v for k, v in (overrides or {}).items() if v is not None})
    known = _field_types()
    extra = {k: v for k, v in merged.items() if k not in known}
    values = {k: _coerce(k, v) for k, v in merged.items() if k in known}
    config = AgentConfig(**values, extra=extra)
    _LOGGER.debug("config_loaded file=%s fields=%s", config_path, sorted(values))
    return config.validate()


def replace(config: AgentConfig, **changes: Any) -> AgentConfig:
    """A validated copy with some fields changed (tests and the CLI use it)."""
    return dataclasses.replace(config, **changes).validate()
