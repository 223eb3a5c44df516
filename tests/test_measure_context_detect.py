"""Context readers and power-source detection on fixture roots and fixture executables."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from agent.measure.context import decode_throttled, parse_cpuinfo, parse_os_release, parse_throttled, read_context
from agent.measure.power import (
    HwmonInaPower,
    RaplPower,
    TermuxBatteryPower,
    VcgencmdPmicPower,
    describe_probes,
    detect_power_source,
    probe_power_sources,
)

FIXTURES = Path(__file__).parent / "fixtures" / "power"
BIN = FIXTURES / "bin"
NOWHERE = str(BIN / "not-installed")


def test_decode_throttled_bits() -> None:
    flags = decode_throttled(0x50005)
    assert flags["raw"] == "0x50005" and flags["active"] is True
    assert flags["under_voltage"] and flags["throttled"] and not flags["arm_frequency_capped"]
    assert flags["under_voltage_occurred"] and flags["throttling_occurred"]
    assert not flags["soft_temperature_limit_occurred"]
    history_only = decode_throttled(0x80000)
    assert history_only["active"] is False and history_only["soft_temperature_limit_occurred"]
    assert parse_throttled("throttled=0x0\n") == 0
    with pytest.raises(ValueError, match="no throttled"):
        parse_throttled('error=1 error_msg="Command not registered"')


def test_pi5_context_from_a_fixture_root() -> None:
    runtime = {"name": "ai-edge-litert", "version": "2.3.0"}
    context = read_context(FIXTURES / "pi5_root", threads=4, runtime=runtime,
                           vcgencmd=str(BIN / "vcgencmd-pi5"))
    assert context["cpu_model"] == "Cortex-A76" and context["cores"] == 4
    assert context["board"] == "Raspberry Pi 5 Model B Rev 1.0"
    assert context["governor"] == "ondemand"
    assert context["freq_mhz"] == 1500.0 and context["max_freq_mhz"] == 2400.0
    assert context["temperature_c"] == pytest.approx(61.35)
    assert context["throttled"] is True and context["throttled_flags"]["raw"] == "0x50005"
    assert context["threads"] == 4 and context["runtime"]["name"] == "ai-edge-litert"


def test_context_without_sysfs_or_vcgencmd_is_null_not_guessed(tmp_path: Path) -> None:
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/cpuinfo").write_text("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) CPU @ 2.20GHz\n"
                                           "model\t\t: 79\n")
    context = read_context(tmp_path, vcgencmd=NOWHERE)
    assert context["os_release"] is None  # no /etc/os-release under this root
    assert context["cpu_model"] == "Intel(R) Xeon(R) CPU @ 2.20GHz" and context["board"] is None
    assert context["governor"] is None and context["freq_mhz"] is None
    assert context["temperature_c"] is None and context["throttled"] is None


def test_cpuinfo_x86_and_unknown_arm_part() -> None:
    x86 = parse_cpuinfo("processor\t: 0\nmodel\t\t: 17\nmodel name\t: AMD EPYC\nprocessor\t: 1\n")
    assert x86 == {"cpu_model": "AMD EPYC", "board": None, "cores": 2}
    arm = parse_cpuinfo("processor\t: 0\nCPU part\t: 0xfff\n")
    assert arm["cpu_model"] == "ARM part 0xfff"


def test_detect_prefers_an_ina_sensor() -> None:
    source = detect_power_source(FIXTURES / "hwmon_ina226", vcgencmd=str(BIN / "vcgencmd-pi5"))
    assert isinstance(source, HwmonInaPower) and source.read() == pytest.approx(3.125)


def test_detect_pi5_pmic_then_rapl_then_termux() -> None:
    pi5 = detect_power_source(FIXTURES / "hwmon_none", vcgencmd=str(BIN / "vcgencmd-pi5"))
    assert isinstance(pi5, VcgencmdPmicPower)
    rapl = detect_power_source(FIXTURES / "rapl", vcgencmd=NOWHERE, termux_argv=(NOWHERE,))
    assert isinstance(rapl, RaplPower) and rapl.read() >= 0.0
    charging = (str(BIN / "print-file"), str(FIXTURES / "termux/charging_usb.json"))
    phone = detect_power_source(FIXTURES / "hwmon_none", vcgencmd=str(BIN / "vcgencmd-pi4"),
                                termux_argv=charging)
    # The tool works; whether the phone is discharging is checked at each energy pass.
    assert isinstance(phone, TermuxBatteryPower)


def test_detect_on_an_older_pi_finds_nothing_and_says_why(tmp_path: Path) -> None:
    probes = probe_power_sources(tmp_path, vcgencmd=str(BIN / "vcgencmd-pi4"), termux_argv=(NOWHERE,))
    assert all(p.source is None for p in probes)
    why = describe_probes(probes)
    assert "Command not registered" in why and "no INA sensor" in why and "intel-rapl" in why
    assert detect_power_source(tmp_path, vcgencmd=str(BIN / "vcgencmd-pi4"), termux_argv=(NOWHERE,)) is None


def test_detect_skips_rapl_it_cannot_read(tmp_path: Path) -> None:
    root = tmp_path / "root"
    shutil.copytree(FIXTURES / "rapl", root)
    energy = root / "sys/class/powercap/intel-rapl:0/energy_uj"
    energy.unlink()
    energy.mkdir()
    probes = probe_power_sources(root, vcgencmd=NOWHERE, termux_argv=(NOWHERE,))
    rapl = next(p for p in probes if p.kind == "rapl")
    assert rapl.source is None and "cannot read" in rapl.reason


def test_os_release_names_the_distribution() -> None:
    bookworm = 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nNAME="Debian GNU/Linux"\nVERSION_ID="12"\n'
    assert parse_os_release(bookworm) == "Debian GNU/Linux 12 (bookworm)"
    assert parse_os_release("NAME=Termux\nVERSION_ID=0.118\n") == "Termux 0.118"
    assert parse_os_release("# nothing here\n") is None
