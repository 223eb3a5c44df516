"""Find the best power source on this device, or none (why: one place decides, and says why not)."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from agent.measure.commands import CommandError, CommandRunner, run_command
from agent.measure.power.base import PowerSource, PowerUnavailable
from agent.measure.power.hwmon import HwmonInaPower, find_ina_hwmon
from agent.measure.power.rapl import RaplPower, find_rapl_packages
from agent.measure.power.termux import TermuxBatteryPower
from agent.measure.power.vcgencmd import VcgencmdPmicPower

_LOGGER = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PowerProbe:
    """Outcome of trying one kind of source: the usable reader, or the reason there is none."""

    kind: str
    source: PowerSource | None
    reason: str


def _probe_hwmon(root: Path) -> PowerProbe:
    sensors = find_ina_hwmon(root)
    if not sensors:
        return PowerProbe("hwmon", None, f"no INA sensor under {root / 'sys/class/hwmon'}")
    reasons = []
    for path, chip in sensors:
        reader = HwmonInaPower(path, chip)
        try:
            reader.read()
        except PowerUnavailable as exc:
            reasons.append(exc.reason)
            continue
        return PowerProbe("hwmon", reader, f"{chip} at {path}")
    return PowerProbe("hwmon", None, "; ".join(reasons))


def _probe_vcgencmd(vcgencmd: str, runner: CommandRunner, which: Callable[[str], str | None]) -> PowerProbe:
    if which(vcgencmd) is None:
        return PowerProbe("vcgencmd", None, f"{vcgencmd} not found on PATH")
    reader = VcgencmdPmicPower(vcgencmd, runner)
    try:
        reader.read()
    except PowerUnavailable as exc:
        return PowerProbe("vcgencmd", None, exc.reason)
    return PowerProbe("vcgencmd", reader, "pmic_read_adc answers")


def _probe_rapl(root: Path) -> PowerProbe:
    domains = find_rapl_packages(root)
    if not domains:
        return PowerProbe("rapl", None, f"no intel-rapl package domain under {root / 'sys/class/powercap'}")
    reader = RaplPower(domains)
    try:
        reader.read()
    except PowerUnavailable as exc:
        return PowerProbe("rapl", None, exc.reason)
    return PowerProbe("rapl", reader, f"{len(domains)} package domain(s)")


def _probe_termux(argv: Sequence[str], runner: CommandRunner,
                  which: Callable[[str], str | None]) -> PowerProbe:
    if which(argv[0]) is None:
        return PowerProbe("termux", None, f"{argv[0]} not found on PATH (not Termux with termux-api)")
    try:
        data = json.loads(runner(list(argv)))
    except (CommandError, json.JSONDecodeError) as exc:
        return PowerProbe("termux", None, f"termux-battery-status unusable: {exc}")
    if not isinstance(data, dict) or "current" not in data or "voltage" not in data:
        return PowerProbe("termux", None, "termux-battery-status reports no current/voltage on this phone")
    # Charging now does not rule it out: each energy pass checks the discharging state itself.
    return PowerProbe("termux", TermuxBatteryPower(argv, runner), f"status {data.get('status')}")


def probe_power_sources(root: str | Path = "/", *, runner: CommandRunner = run_command,
                        vcgencmd: str = "vcgencmd", termux_argv: Sequence[str] = ("termux-battery-status",),
                        which: Callable[[str], str | None] = shutil.which) -> list[PowerProbe]:
    """Try every kind, best first: an INA sensor, the Pi 5 PMIC, RAPL, then the Android battery."""
    base = Path(root)
    return [
        _probe_hwmon(base),
        _probe_vcgencmd(vcgencmd, runner, which),
        _probe_rapl(base),
        _probe_termux(tuple(termux_argv), runner, which),
    ]


def detect_power_source(root: str | Path = "/", *, runner: CommandRunner = run_command,
                        vcgencmd: str = "vcgencmd", termux_argv: Sequence[str] = ("termux-battery-status",),
                        which: Callable[[str], str | None] = shutil.which) -> PowerSource | None:
    """The first usable source from :func:`probe_power_sources`, or None (energy is then "unavailable")."""
    probes = probe_power_sources(root, runner=runner, vcgencmd=vcgencmd, termux_argv=termux_argv, which=which)
    for probe in probes:
        if probe.source is not None:
            _LOGGER.info("power source: %s (%s)", probe.source.source, probe.reason)
            return probe.source
    _LOGGER.info("no power source: %s", describe_probes(probes))
    return None


def describe_probes(probes: Sequence[PowerProbe]) -> str:
    """One line saying why each kind was not used, for the report's ``energy.reason``."""
    return "; ".join(f"{p.kind}: {p.reason}" for p in probes if p.source is None)
