"""edgeguide-compress as an operator types it: version, shown defaults, exit codes, clear errors."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _compress(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "compression", *args], capture_output=True, text=True,
                          timeout=120)


def test_version_and_exit_codes_in_help() -> None:
    done = _compress("--version")
    assert done.returncode == 0 and done.stdout.startswith("edgeguide-compress "), done
    top = _compress("--help")
    assert top.returncode == 0 and "exit codes:" in top.stdout and "130" in top.stdout


@pytest.mark.parametrize("command", ["train", "export", "evaluate", "search"])
def test_every_subcommand_has_help_defaults_and_global_options(command: str) -> None:
    done = _compress(command, "--help")
    assert done.returncode == 0, done.stderr
    assert "exit codes:" in done.stdout and "--log-level" in done.stdout and "-v, --verbose" in done.stdout
    if command == "search":
        text = " ".join(done.stdout.split())  # help wraps lines
        assert "(default: 0.99)" in text and "(default: reports/search)" in text


def test_an_unknown_variant_is_a_one_line_usage_error() -> None:
    done = _compress("search", "--variants", "svd,nope", "--list", "-v")
    assert done.returncode == 2, done
    assert "Traceback" not in done.stderr
    assert "error: unknown variants ['nope']; known:" in done.stderr and "svd" in done.stderr


def test_list_names_each_variant_with_its_steps() -> None:
    done = _compress("search", "--list", "--log-level", "warning")
    assert done.returncode == 0, done.stderr
    lines = dict(line.split(": ", 1) for line in done.stdout.splitlines())
    assert lines["distill-soft+dynamic"] == "distill-soft -> ptq-dynamic"
    assert lines["svd-r24-f8+dynamic"] == "svd -> ptq-dynamic"
    assert {"svd", "cp", "qat", "ptq-int8"} <= set(lines)
