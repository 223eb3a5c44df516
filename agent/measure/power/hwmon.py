"""INA219/INA226/INA260-class current sensors on the kernel hwmon interface (``ina2xx`` and kin)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from agent.measure.power.base import PowerUnavailable, numbered_sysfs_entries

_LOGGER = logging.getLogger(__name__)

INA_NAMES = frozenset({"ina209", "ina219", "ina220", "ina226", "ina230", "ina231", "ina234", "ina237",
                       "ina238", "ina260"})
_HWMON = re.compile(r"^hwmon(\d+)$")


def find_ina_hwmon(root: str | Path = "/") -> list[tuple[Path, str]]:
    """``(hwmon dir, chip name)`` of every INA sensor under ROOT/sys/class/hwmon, in hwmonN order."""
    entries = numbered_sysfs_entries(Path(root) / "sys" / "class" / "hwmon", _HWMON)
    return [(path, name) for path, name in entries if name in INA_NAMES]


def _read_int(path: Path) -> int:
    return int(path.read_text().strip())


class HwmonInaPower:
    """Power from ``power1_input`` (microwatts), else ``curr1_input`` (mA) x ``in1_input`` (bus mV).

    What it measures depends on where the shunt is wired (often the board's supply): the label says so.
    """

    out_of_process = False

    def __init__(self, hwmon_dir: str | Path, chip: str | None = None, min_interval_s: float = 0.02) -> None:
        self.hwmon_dir = Path(hwmon_dir)
        self.chip = chip or (self.hwmon_dir / "name").read_text().strip()
        self.min_interval_s = min_interval_s
        self.source = f"hwmon:{self.chip}:{self.hwmon_dir.name} (INA shunt sensor; the rail it is wired on)"

    def read(self) -> float:
        """Watts now."""
        power = self.hwmon_dir / "power1_input"
        try:
            if power.exists():
                return _read_int(power) / 1e6
            milliamps = _read_int(self.hwmon_dir / "curr1_input")
            millivolts = _read_int(self.hwmon_dir / "in1_input")
        except (OSError, ValueError) as exc:
            raise PowerUnavailable(self.source, f"cannot read {self.hwmon_dir}: {exc}") from exc
        # Shunt direction decides the sign of curr1_input; the magnitude is the power drawn.
        return abs(milliamps) * millivolts / 1e6
