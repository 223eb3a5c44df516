"""Raspberry Pi 5 PMIC rails via ``vcgencmd pmic_read_adc`` (board-internal power, not wall power)."""

from __future__ import annotations

import dataclasses
import logging
import re

from agent.measure.commands import CommandError, CommandRunner, run_command
from agent.measure.power.base import PowerUnavailable

_LOGGER = logging.getLogger(__name__)

NOT_REGISTERED = "Command not registered"

# e.g. "   VDD_CORE_A current(7)=0.75012000A" and "   VDD_CORE_V volt(15)=0.72178200V"
_LINE = re.compile(
    r"^\s*(?P<rail>\S+)_(?P<kind>[AV])\s+(?:current|volt)\((?P<index>\d+)\)="
    r"(?P<value>[-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)(?P<unit>[AV])\s*$"
)


@dataclasses.dataclass(frozen=True)
class PmicReading:
    """Rails that have both a current and a voltage, and voltage-only rails (EXT5V_V, BATT_V)."""

    rails: dict[str, tuple[float, float]]
    voltage_only: dict[str, float]
    current_only: dict[str, float]

    @property
    def watts(self) -> float:
        """Sum of amps x volts over the paired rails."""
        return sum(amps * volts for amps, volts in self.rails.values())


def parse_pmic_read_adc(text: str) -> PmicReading:
    """Pair each ``<rail>_A`` line with ``<rail>_V`` BY NAME (their ADC indices differ)."""
    currents: dict[str, float] = {}
    volts: dict[str, float] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        match = _LINE.match(line)
        if match is None:
            _LOGGER.debug("pmic_read_adc: ignoring line %r", line)
            continue
        if match["kind"] != match["unit"]:
            raise ValueError(f"pmic_read_adc line {line.strip()!r}: name says {match['kind']} "
                             f"but value is in {match['unit']}")
        target = currents if match["kind"] == "A" else volts
        target[match["rail"]] = float(match["value"])
    rails = {name: (currents[name], volts[name]) for name in sorted(currents.keys() & volts.keys())}
    return PmicReading(
        rails=rails,
        voltage_only={name: volts[name] for name in sorted(volts.keys() - currents.keys())},
        current_only={name: currents[name] for name in sorted(currents.keys() - volts.keys())},
    )


class VcgencmdPmicPower:
    """Sum of the Pi 5 PMIC rails; needs the ``video`` group (not root). Older Pis lack the command."""

    source = "vcgencmd:pmic_read_adc (Raspberry Pi 5 PMIC rails summed: board-internal, not wall power)"
    out_of_process = False

    def __init__(self, vcgencmd: str = "vcgencmd", runner: CommandRunner = run_command,
                 min_interval_s: float = 0.05) -> None:
        self.vcgencmd = vcgencmd
        self.runner = runner
        self.min_interval_s = min_interval_s

    def reading(self) -> PmicReading:
        """Run the command once and parse it."""
        try:
            text = self.runner([self.vcgencmd, "pmic_read_adc"])
        except CommandError as exc:
            if NOT_REGISTERED in exc.output:
                raise PowerUnavailable(self.source, "this firmware has no pmic_read_adc (not a Pi 5): "
                                       f"{NOT_REGISTERED!r}") from exc
            raise PowerUnavailable(self.source, str(exc)) from exc
        if NOT_REGISTERED in text:
            raise PowerUnavailable(self.source, f"this firmware has no pmic_read_adc: {text.strip()!r}")
        reading = parse_pmic_read_adc(text)
        if not reading.rails:
            raise PowerUnavailable(self.source, f"no <rail>_A/<rail>_V pairs in output {text[:200]!r}")
        return reading

    def read(self) -> float:
        """Watts summed over the paired rails."""
        return self.reading().watts
