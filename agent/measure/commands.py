"""One injectable way to run a helper command (why: tests point readers at real fixture executables)."""

from __future__ import annotations

import dataclasses
import logging
import subprocess
from collections.abc import Callable, Sequence

_LOGGER = logging.getLogger(__name__)

CommandRunner = Callable[[Sequence[str]], str]
"""Takes argv, returns stdout; raises :class:`CommandError` on failure."""


class CommandError(Exception):
    """A helper command could not run or exited non-zero; keeps argv, exit code and both outputs."""

    def __init__(self, argv: Sequence[str], returncode: int | None, stdout: str = "", stderr: str = "",
                 reason: str = "") -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        detail = reason or f"exit code {returncode}"
        output = (stderr.strip() or stdout.strip())[:300]
        super().__init__(f"command {self.argv} failed: {detail}" + (f": {output}" if output else ""))

    @property
    def output(self) -> str:
        """stdout and stderr together, for matching known error texts."""
        return f"{self.stdout}\n{self.stderr}"


@dataclasses.dataclass(frozen=True)
class SubprocessRunner:
    """Runs argv with a timeout and returns stdout (picklable, so a sampler process can use it)."""

    timeout_s: float = 15.0

    def __call__(self, argv: Sequence[str]) -> str:
        try:
            done = subprocess.run(list(argv), capture_output=True, text=True, timeout=self.timeout_s,
                                  check=False)
        except FileNotFoundError as exc:
            raise CommandError(argv, None, reason=f"not found ({exc.strerror})") from exc
        except PermissionError as exc:
            raise CommandError(argv, None, reason=f"not executable ({exc.strerror})") from exc
        except subprocess.TimeoutExpired as exc:
            raise CommandError(argv, None, reason=f"timed out after {self.timeout_s} s") from exc
        if done.returncode != 0:
            raise CommandError(argv, done.returncode, done.stdout, done.stderr)
        _LOGGER.debug("ran %s", argv)
        return done.stdout


run_command: CommandRunner = SubprocessRunner()
