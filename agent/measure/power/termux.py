"""Android battery discharge via Termux's ``termux-battery-status`` (whole phone, coarse, costly)."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence

from agent.measure.commands import CommandError, CommandRunner, run_command
from agent.measure.power.base import PowerUnavailable

_LOGGER = logging.getLogger(__name__)

# |current| at or above this is microamps: 10 mA in uA vs 10 A in mA, and a phone running a model
# draws between ~50 mA and ~5 A, so the two readings cannot be confused.
MICROAMP_THRESHOLD = 10_000

SOURCE = "termux:battery-status (whole-phone battery discharge, sampled slowly from a separate process)"


@dataclasses.dataclass(frozen=True)
class BatteryReading:
    """One parsed ``termux-battery-status`` answer while discharging."""

    voltage_v: float
    current_a: float
    current_raw: float
    current_unit: str
    discharge_sign: str
    status: str
    plugged: str
    energy_nwh: float | None

    @property
    def watts(self) -> float:
        """Battery voltage x discharge current magnitude."""
        return self.voltage_v * self.current_a


def _voltage_volts(raw: float) -> float:
    # Android's EXTRA_VOLTAGE is millivolts; a few builds report volts or microvolts.
    if raw < 100:
        return raw
    if raw > 100_000:
        return raw / 1e6
    return raw / 1e3


def parse_battery_status(text: str) -> BatteryReading:
    """Parse the JSON; raises :class:`PowerUnavailable` unless the phone is discharging on battery."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PowerUnavailable(SOURCE, f"termux-battery-status printed no JSON: {text[:200]!r}") from exc
    if not isinstance(data, dict):
        raise PowerUnavailable(SOURCE, f"termux-battery-status JSON is not an object: {text[:200]!r}")
    status = str(data.get("status", "UNKNOWN"))
    plugged = str(data.get("plugged", "UNKNOWN"))
    if status != "DISCHARGING" or plugged != "UNPLUGGED":
        raise PowerUnavailable(SOURCE, f"battery current is only meaningful while discharging; "
                               f"status={status} plugged={plugged}")
    voltage, current = data.get("voltage"), data.get("current")
    if not isinstance(voltage, int | float) or not isinstance(current, int | float) or voltage <= 0:
        raise PowerUnavailable(SOURCE, f"need numeric voltage > 0 and current, got voltage={voltage!r} "
                               f"current={current!r}")
    if current == 0:
        raise PowerUnavailable(SOURCE, "battery reports current=0 while discharging (no current sensor)")
    unit = "uA" if abs(current) >= MICROAMP_THRESHOLD else "mA"
    amps = abs(current) / (1e6 if unit == "uA" else 1e3)
    # AOSP documents negative = discharging; some vendors flip it. Status says discharging, so the
    # magnitude is the drain and the sign only tells the vendor's convention.
    sign = "negative" if current < 0 else "positive"
    energy = data.get("energy")
    return BatteryReading(
        voltage_v=_voltage_volts(float(voltage)),
        current_a=amps,
        current_raw=float(current),
        current_unit=unit,
        discharge_sign=sign,
        status=status,
        plugged=plugged,
        energy_nwh=float(energy) if isinstance(energy, int | float) else None,
    )


class TermuxBatteryPower:
    """Each call starts an Android app process that loads the CPU ~3 s: sample rarely, out of process."""

    source = SOURCE
    out_of_process = True

    def __init__(self, argv: Sequence[str] = ("termux-battery-status",), runner: CommandRunner = run_command,
                 min_interval_s: float = 5.0) -> None:
        self.argv = tuple(argv)
        self.runner = runner
        self.min_interval_s = min_interval_s

    def reading(self) -> BatteryReading:
        """Run the command once and parse it."""
        try:
            text = self.runner(self.argv)
        except CommandError as exc:
            raise PowerUnavailable(self.source, str(exc)) from exc
        return parse_battery_status(text)

    def read(self) -> float:
        """Watts drawn from the battery now."""
        return self.reading().watts
