"""Each power reader against fixture files and fixture executables in the real formats."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from agent.measure.commands import CommandError, run_command
from agent.measure.power import (
    HwmonInaPower,
    PowerSource,
    PowerUnavailable,
    RaplPower,
    TermuxBatteryPower,
    VcgencmdPmicPower,
    energy_delta_uj,
    find_ina_hwmon,
    find_rapl_packages,
    parse_battery_status,
    parse_pmic_read_adc,
)

FIXTURES = Path(__file__).parent / "fixtures" / "power"
BIN = FIXTURES / "bin"

# (amps, volts) of every rail in vcgencmd/pi5_pmic_read_adc.txt, copied by hand from the file.
PI5_RAILS = {
    "3V7_WL_SW": (0.00390372, 3.71292200), "3V3_SYS": (0.05172300, 3.31028000),
    "1V8_SYS": (0.16786800, 1.79876800), "DDR_VDD2": (0.02049600, 1.11062600),
    "DDR_VDDQ": (0.00000000, 0.60449300), "1V1_SYS": (0.18347880, 1.10695800),
    "0V8_SW": (0.33178860, 0.80402200), "VDD_CORE": (0.75012000, 0.72178200),
    "3V3_DAC": (0.00042120, 3.30490200), "3V3_ADC": (0.00042120, 3.31028000),
    "0V8_AON": (0.00448392, 0.80127400), "HDMI": (0.02049600, 5.16148000),
}


# --- Raspberry Pi 5 vcgencmd -------------------------------------------------------------------

def test_pmic_rails_pair_by_name_not_index() -> None:
    reading = parse_pmic_read_adc((FIXTURES / "vcgencmd" / "pi5_pmic_read_adc.txt").read_text())
    assert set(reading.rails) == set(PI5_RAILS)
    for rail, (amps, volts) in PI5_RAILS.items():
        assert reading.rails[rail] == pytest.approx((amps, volts)), rail
    assert reading.voltage_only == pytest.approx({"EXT5V": 5.12272, "BATT": 0.009768})
    assert reading.current_only == {}
    assert reading.watts == pytest.approx(sum(a * v for a, v in PI5_RAILS.values()))
    # VDD_CORE: current index 7, voltage index 15; a by-index pairing would not give this.
    assert reading.rails["VDD_CORE"] == pytest.approx((0.75012, 0.721782))


def test_pmic_parser_keeps_unpaired_current_apart() -> None:
    text = ("   VDD_CORE_A current(7)=0.50000000A\n   VDD_CORE_V volt(15)=0.80000000V\n"
            "   ODD_A current(3)=1.0A\n")
    reading = parse_pmic_read_adc(text)
    assert reading.watts == pytest.approx(0.4)
    assert reading.current_only == {"ODD": 1.0}


def test_vcgencmd_reader_runs_the_command() -> None:
    reader = VcgencmdPmicPower(str(BIN / "vcgencmd-pi5"))
    assert isinstance(reader, PowerSource)
    assert reader.read() == pytest.approx(sum(a * v for a, v in PI5_RAILS.values()))
    assert "board-internal" in reader.source and "not wall power" in reader.source


def test_vcgencmd_on_an_older_pi_is_unavailable() -> None:
    with pytest.raises(PowerUnavailable, match="Command not registered"):
        VcgencmdPmicPower(str(BIN / "vcgencmd-pi4")).read()
    with pytest.raises(PowerUnavailable, match="not found"):
        VcgencmdPmicPower(str(FIXTURES / "bin" / "no-such-vcgencmd")).read()


def test_command_runner_reports_exit_code_and_output() -> None:
    with pytest.raises(CommandError) as info:
        run_command([str(BIN / "vcgencmd-pi4"), "pmic_read_adc"])
    assert info.value.returncode == 255
    assert "Command not registered" in info.value.output


# --- INA2xx on hwmon ---------------------------------------------------------------------------

def test_hwmon_finds_ina_sensors_in_numeric_order() -> None:
    found = find_ina_hwmon(FIXTURES / "hwmon_ina226")
    assert [(p.name, chip) for p, chip in found] == [("hwmon1", "ina226")]
    assert find_ina_hwmon(FIXTURES / "hwmon_none") == []
    assert find_ina_hwmon(FIXTURES / "no-such-root") == []


def test_hwmon_power1_input_is_microwatts() -> None:
    reader = HwmonInaPower(FIXTURES / "hwmon_ina226/sys/class/hwmon/hwmon1")
    assert reader.read() == pytest.approx(3.125)
    assert reader.source.startswith("hwmon:ina226:hwmon1")


def test_hwmon_without_power1_multiplies_current_and_bus_voltage() -> None:
    reader = HwmonInaPower(FIXTURES / "hwmon_ina219_nopower/sys/class/hwmon/hwmon2")
    # curr1_input -734 mA (reversed shunt) x in1_input 4980 mV.
    assert reader.read() == pytest.approx(0.734 * 4.980)


def test_hwmon_unreadable_is_unavailable(tmp_path: Path) -> None:
    (tmp_path / "name").write_text("ina226\n")
    with pytest.raises(PowerUnavailable, match="cannot read"):
        HwmonInaPower(tmp_path).read()


# --- Intel RAPL ----------------------------------------------------------------------------------

def test_energy_delta_wraps_at_max_range() -> None:
    assert energy_delta_uj(100, 350, 1000) == 250
    assert energy_delta_uj(900, 50, 1000) == 150
    with pytest.raises(ValueError, match="outside"):
        energy_delta_uj(10, 2000, 1000)


def test_rapl_reads_package_domains_only() -> None:
    domains = find_rapl_packages(FIXTURES / "rapl")
    assert [d.name for d in domains] == ["intel-rapl:0"]


class _Clock:
    """A settable clock so the power from a counter difference is exact."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rapl_power_across_a_wraparound(tmp_path: Path) -> None:
    root = tmp_path / "root"
    shutil.copytree(FIXTURES / "rapl", root)
    domain = root / "sys/class/powercap/intel-rapl:0"
    clock = _Clock()
    reader = RaplPower(find_rapl_packages(root), clock=clock, prime_s=0.0)
    reader.prime()  # counter at 262143000000 uJ
    clock.now += 2.0
    (domain / "energy_uj").write_text("1000000\n")
    # (262143328850 - 262143000000) + 1000000 uJ = 1.32885 J over 2 s.
    assert reader.read() == pytest.approx(1.32885 / 2.0)
    clock.now += 0.5
    (domain / "energy_uj").write_text("3500000\n")
    assert reader.read() == pytest.approx(2.5 / 0.5)
    assert reader.source.startswith("rapl:package-0")


def test_rapl_first_read_without_time_is_refused_and_unreadable_is_unavailable(tmp_path: Path) -> None:
    root = tmp_path / "root"
    shutil.copytree(FIXTURES / "rapl", root)
    reader = RaplPower(find_rapl_packages(root), clock=_Clock(), prime_s=0.0)
    with pytest.raises(PowerUnavailable, match="clock did not advance"):
        reader.read()
    energy = root / "sys/class/powercap/intel-rapl:0/energy_uj"
    energy.unlink()
    energy.mkdir()
    with pytest.raises(PowerUnavailable, match="cannot read"):
        RaplPower(find_rapl_packages(root), prime_s=0.0).read()


# --- Termux battery ------------------------------------------------------------------------------

def test_termux_microamps_negative_while_discharging() -> None:
    reading = parse_battery_status((FIXTURES / "termux/discharging_ua_negative.json").read_text())
    assert reading.current_unit == "uA" and reading.discharge_sign == "negative"
    assert reading.current_a == pytest.approx(0.412345)
    assert reading.voltage_v == pytest.approx(3.987)
    assert reading.watts == pytest.approx(3.987 * 0.412345)


def test_termux_milliamps_positive_vendor() -> None:
    reading = parse_battery_status((FIXTURES / "termux/discharging_ma_positive.json").read_text())
    assert reading.current_unit == "mA" and reading.discharge_sign == "positive"
    assert reading.watts == pytest.approx(4.120 * 0.523)
    assert reading.energy_nwh == 15830000000


@pytest.mark.parametrize("name, reason", [
    ("charging_usb.json", "status=CHARGING plugged=PLUGGED_USB"),
    ("full_ac.json", "status=FULL plugged=PLUGGED_AC"),
    ("old_api_no_voltage.json", "voltage=None"),
])
def test_termux_not_discharging_is_unavailable(name: str, reason: str) -> None:
    with pytest.raises(PowerUnavailable, match=reason):
        parse_battery_status((FIXTURES / "termux" / name).read_text())


def test_termux_reader_runs_a_real_process() -> None:
    discharging = FIXTURES / "termux/discharging_ua_negative.json"
    reader = TermuxBatteryPower((str(BIN / "print-file"), str(discharging)))
    assert reader.out_of_process is True and reader.min_interval_s >= 1.0
    assert reader.read() == pytest.approx(3.987 * 0.412345)
    charging = TermuxBatteryPower((str(BIN / "print-file"), str(FIXTURES / "termux/charging_usb.json")))
    with pytest.raises(PowerUnavailable, match="discharging"):
        charging.read()
    with pytest.raises(PowerUnavailable, match="not found"):
        TermuxBatteryPower(("termux-battery-status-not-installed",)).read()
