"""What explains a figure: CPU, governor, frequency, temperature, throttling, runtime (measurement.md).

Readers take a root path (and a command runner for ``vcgencmd``) so tests use fixture trees.
Anything unreadable is None, never guessed.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.measure.commands import CommandError, CommandRunner, run_command

_LOGGER = logging.getLogger(__name__)

# vcgencmd get_throttled bits (Raspberry Pi documentation).
THROTTLE_BITS: dict[int, str] = {
    0: "under_voltage",
    1: "arm_frequency_capped",
    2: "throttled",
    3: "soft_temperature_limit",
    16: "under_voltage_occurred",
    17: "arm_frequency_capping_occurred",
    18: "throttling_occurred",
    19: "soft_temperature_limit_occurred",
}
_NOW_MASK = 0xF

# ARM "CPU part" ids of common edge cores, for /proc/cpuinfo files without a "model name".
ARM_PARTS: dict[str, str] = {
    "0xd03": "Cortex-A53", "0xd04": "Cortex-A35", "0xd05": "Cortex-A55", "0xd07": "Cortex-A57",
    "0xd08": "Cortex-A72", "0xd09": "Cortex-A73", "0xd0a": "Cortex-A75", "0xd0b": "Cortex-A76",
    "0xd0d": "Cortex-A77", "0xd41": "Cortex-A78", "0xd44": "Cortex-X1", "0xd46": "Cortex-A510",
    "0xd47": "Cortex-A710", "0xd48": "Cortex-X2", "0xd4d": "Cortex-A715", "0xd4e": "Cortex-X3",
    "0xd80": "Cortex-A520", "0xd81": "Cortex-A720", "0xd82": "Cortex-X4",
}

_THROTTLED = re.compile(r"throttled=(0x[0-9a-fA-F]+|\d+)")


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def parse_os_release(text: str) -> str | None:
    """PRETTY_NAME of an os-release file (e.g. "Debian GNU/Linux 12 (bookworm)"), else NAME VERSION_ID."""
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key.strip()] = value.strip().strip('"').strip("'")
    pretty = fields.get("PRETTY_NAME") or " ".join(v for v in (fields.get("NAME"), fields.get("VERSION_ID")) if v)
    return pretty or None


def parse_cpuinfo(text: str) -> dict[str, Any]:
    """``cpu_model``, ``board``, ``cores`` from /proc/cpuinfo (x86 "model name"; ARM "CPU part", "Model")."""
    fields: dict[str, list[str]] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip().lower(), []).append(value.strip())
    cpu_model = next(iter(fields.get("model name", []) or fields.get("processor name", [])), None)
    if cpu_model is None and fields.get("cpu part"):
        parts = sorted({ARM_PARTS.get(p.lower(), f"ARM part {p}") for p in fields["cpu part"]})
        cpu_model = " + ".join(parts)
    if cpu_model is None and fields.get("hardware"):
        cpu_model = fields["hardware"][0]
    # Capital "Model" is the board name on ARM; x86's lower-case "model" is a CPU model number.
    board = next((line.partition(":")[2].strip() for line in text.splitlines()
                  if line.partition(":")[0].strip() == "Model"), None)
    cores = len(fields.get("processor", [])) or None
    return {"cpu_model": cpu_model, "board": board, "cores": cores}


def decode_throttled(value: int) -> dict[str, Any]:
    """Named flags of a ``get_throttled`` value; ``active`` is any of the four "now" bits."""
    flags = {name: bool(value >> bit & 1) for bit, name in THROTTLE_BITS.items()}
    return {"raw": hex(value), "active": bool(value & _NOW_MASK), **flags}


def parse_throttled(text: str) -> int:
    """The integer in ``throttled=0x50005``."""
    match = _THROTTLED.search(text)
    if match is None:
        raise ValueError(f"no throttled=0x... in vcgencmd output {text.strip()[:200]!r}")
    return int(match[1], 0)


def read_throttled(vcgencmd: str = "vcgencmd", runner: CommandRunner = run_command,
                   which: Callable[[str], str | None] = shutil.which) -> dict[str, Any] | None:
    """Decoded ``vcgencmd get_throttled``, or None where there is no vcgencmd."""
    if which(vcgencmd) is None:
        return None
    try:
        return decode_throttled(parse_throttled(runner([vcgencmd, "get_throttled"])))
    except (CommandError, ValueError) as exc:
        _LOGGER.info("get_throttled unreadable: %s", exc)
        return None


def read_temperatures(root: str | Path = "/") -> dict[str, float]:
    """Degrees C per thermal zone (``type`` or zone name -> value); unreadable zones are left out."""
    base = Path(root) / "sys" / "class" / "thermal"
    result: dict[str, float] = {}
    if not base.is_dir():
        return result
    for zone in sorted(base.glob("thermal_zone*"), key=lambda p: int(p.name[12:] or 0)):
        raw = _read_text(zone / "temp")
        if raw is None:
            continue
        try:
            celsius = int(raw) / 1000.0
        except ValueError:
            continue
        label = _read_text(zone / "type") or zone.name
        if label in result:
            label = f"{label}:{zone.name}"
        result[label] = celsius
    return result


def read_cpufreq(root: str | Path = "/", cpu: int = 0) -> dict[str, Any]:
    """``governor`` and ``freq_mhz`` of one CPU from cpufreq sysfs (kHz), else "cpu MHz" of /proc/cpuinfo."""
    base = Path(root) / "sys" / "devices" / "system" / "cpu" / f"cpu{cpu}" / "cpufreq"
    governor = _read_text(base / "scaling_governor")
    freq_mhz: float | None = None
    source = None
    for name in ("scaling_cur_freq", "cpuinfo_cur_freq"):
        raw = _read_text(base / name)
        if raw and raw.isdigit():
            freq_mhz, source = int(raw) / 1000.0, f"cpufreq/{name}"
            break
    if freq_mhz is None:
        cpuinfo = _read_text(Path(root) / "proc" / "cpuinfo") or ""
        match = re.search(r"^cpu MHz\s*:\s*([0-9.]+)", cpuinfo, re.MULTILINE)
        if match:
            freq_mhz, source = float(match[1]), "/proc/cpuinfo"
    max_raw = _read_text(base / "scaling_max_freq")
    return {
        "governor": governor,
        "freq_mhz": freq_mhz,
        "freq_source": source,
        "max_freq_mhz": int(max_raw) / 1000.0 if max_raw and max_raw.isdigit() else None,
    }


def read_dynamic(root: str | Path = "/", *, vcgencmd: str = "vcgencmd", runner: CommandRunner = run_command,
                 which: Callable[[str], str | None] = shutil.which) -> dict[str, Any]:
    """The parts that drift during a run (frequency, temperature, throttling): read before and after."""
    temps = read_temperatures(root)
    throttled = read_throttled(vcgencmd, runner, which)
    return {
        **read_cpufreq(root),
        "temperature_c": max(temps.values()) if temps else None,
        "temperatures_c": temps,
        "throttled": None if throttled is None else throttled["active"],
        "throttled_flags": throttled,
    }


def read_context(root: str | Path = "/", *, threads: int | None = None, runtime: dict[str, Any] | None = None,
                 vcgencmd: str = "vcgencmd", runner: CommandRunner = run_command,
                 which: Callable[[str], str | None] = shutil.which) -> dict[str, Any]:
    """The ``report.context`` object (design.md) plus board, cores, affinity, Python and kernel."""
    cpuinfo = parse_cpuinfo(_read_text(Path(root) / "proc" / "cpuinfo") or "")
    board = cpuinfo["board"] or _read_text(Path(root) / "proc" / "device-tree" / "model")
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    context = {
        "cpu_model": cpuinfo["cpu_model"],
        "board": board.rstrip("\x00") if board else None,
        "cores": cpuinfo["cores"],
        "affinity_cpus": affinity,
        **read_dynamic(root, vcgencmd=vcgencmd, runner=runner, which=which),
        "threads": threads,
        "runtime": runtime,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "os_release": parse_os_release(_read_text(Path(root) / "etc" / "os-release")
                                       or _read_text(Path(root) / "usr" / "lib" / "os-release") or ""),
        "kernel": platform.release(),
    }
    _LOGGER.debug("context: %s", context)
    return context
