"""Power readers behind one small interface, one module per source.

Every reader takes a root path or a command runner so tests point it at fixture files in the real
formats; ``detect_power_source`` picks the best one present, or None ("unavailable").
"""

from agent.measure.power.base import UNAVAILABLE, PowerSource, PowerUnavailable
from agent.measure.power.detect import PowerProbe, describe_probes, detect_power_source, probe_power_sources
from agent.measure.power.hwmon import HwmonInaPower, find_ina_hwmon
from agent.measure.power.rapl import RaplPower, energy_delta_uj, find_rapl_packages
from agent.measure.power.sampling import PowerTrace, ProcessPowerSampler, ThreadPowerSampler, make_sampler
from agent.measure.power.termux import BatteryReading, TermuxBatteryPower, parse_battery_status
from agent.measure.power.vcgencmd import PmicReading, VcgencmdPmicPower, parse_pmic_read_adc

__all__ = [
    "UNAVAILABLE",
    "BatteryReading",
    "HwmonInaPower",
    "PmicReading",
    "PowerProbe",
    "PowerSource",
    "PowerTrace",
    "PowerUnavailable",
    "ProcessPowerSampler",
    "RaplPower",
    "TermuxBatteryPower",
    "ThreadPowerSampler",
    "VcgencmdPmicPower",
    "describe_probes",
    "detect_power_source",
    "energy_delta_uj",
    "find_ina_hwmon",
    "find_rapl_packages",
    "make_sampler",
    "parse_battery_status",
    "parse_pmic_read_adc",
    "probe_power_sources",
]
