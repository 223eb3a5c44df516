"""``python -m agent.measure``: probe and toy commands write honest JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from agent.measure.__main__ import main

FIXTURES = Path(__file__).parent / "fixtures" / "power"


def test_probe_on_an_ina226_root_reads_watts(tmp_path: Path, capsys: object) -> None:
    out = tmp_path / "probe.json"
    assert main(["probe", "--root", str(FIXTURES / "hwmon_ina226"), "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    hwmon = data["power"][0]
    assert hwmon["kind"] == "hwmon" and hwmon["usable"] is True and hwmon["watts"] == 3.125
    assert "measurement" not in data and "cpu_model" in data["context"]


def test_toy_measurement_on_this_machine_says_energy_unavailable(tmp_path: Path) -> None:
    out = tmp_path / "toy.json"
    assert main(["toy", "--json", str(out)]) == 0
    measurement = json.loads(out.read_text())["measurement"]
    assert measurement["mode"] == "quick" and measurement["latency_ms"]["n"] >= 200
    assert measurement["quality"]["agreement_at_k"] == 1.0
    assert measurement["energy"]["available"] is False
    assert "vcgencmd" in measurement["energy"]["reason"] and "rapl" in measurement["energy"]["reason"]


def test_measure_package_never_imports_tensorflow() -> None:
    code = ("import sys, agent.measure, agent.measure.__main__, agent.measure.power.sampling; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in {'tensorflow', 'tf_keras', 'keras'}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.stdout.strip() == "[]", done.stdout
