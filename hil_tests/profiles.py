"""Device profiles of the local rig: which interpreter environment and which limits an agent runs under.

Profiles are descriptions only (labgrid's resources); `targets.LocalTarget` turns one into a process.
They stand in for the devices we ship to: a 64-bit board with LiteRT, a Raspberry Pi 4-class board
(one slow core, little memory), and a board pinned to tflite-runtime 2.14 with numpy<2.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

_LOGGER = logging.getLogger(__name__)

MIB = 1024 * 1024
PROJECT_ENV = "project"  # this venv: ai-edge-litert + numpy 2
LEGACY_ENV = "legacy"  # cached venv: tflite-runtime 2.14 + numpy<2, no TensorFlow


@dataclass(frozen=True)
class DeviceProfile:
    """How a local agent process is set up; `expected_runtime` is what its reports must name."""

    name: str
    description: str
    environment: str
    expected_runtime: str
    expected_version: str | None = None  # None: the version installed in `environment`
    threads: int = 1
    pin_one_core: bool = False
    address_space_bytes: int | None = None
    env: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.environment not in (PROJECT_ENV, LEGACY_ENV):
            raise ValueError(f"profile {self.name!r}: environment must be {PROJECT_ENV!r} or {LEGACY_ENV!r}, "
                             f"got {self.environment!r}")
        if not 1 <= self.threads <= 64:
            raise ValueError(f"profile {self.name!r}: threads must be in 1..64, got {self.threads}")
        if self.address_space_bytes is not None and self.address_space_bytes < 64 * MIB:
            raise ValueError(f"profile {self.name!r}: an address-space cap below 64 MiB cannot run Python, "
                             f"got {self.address_space_bytes}")

    def constraints(self) -> dict[str, object]:
        """The limits as plain data, for the HIL report."""
        return {"threads": self.threads, "pin_one_core": self.pin_one_core,
                "address_space_mib": self.address_space_bytes // MIB if self.address_space_bytes else None,
                "env": dict(self.env)}


PROFILES: dict[str, DeviceProfile] = {
    "litert": DeviceProfile(
        "litert", "ai-edge-litert with numpy 2 in the project venv (64-bit Pi OS, x86-64 boxes)",
        PROJECT_ENV, "ai-edge-litert"),
    # A Pi 4 runs the agent beside other work: one core, one interpreter thread and a hard cap on
    # the address space (prlimit --as). glibc reserves 64 MiB of address space per malloc arena
    # and thread, so the arena count is bounded as one does on small boards; measured here, the
    # agent peaks at ~290 MiB of address space with a model loaded, so 384 MiB leaves little slack.
    "pi4-like": DeviceProfile(
        "pi4-like", "ai-edge-litert pinned to one core, 1 interpreter thread, 384 MiB address-space cap",
        PROJECT_ENV, "ai-edge-litert", threads=1, pin_one_core=True, address_space_bytes=384 * MIB,
        env={"MALLOC_ARENA_MAX": "2", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}),
    "legacy": DeviceProfile(
        "legacy", "tflite-runtime 2.14.0 + numpy<2 in its own venv without TensorFlow (a board without LiteRT)",
        LEGACY_ENV, "tflite-runtime", expected_version="2.14.0"),
}
ALL_PROFILES = tuple(PROFILES)


def select_profiles(value: str) -> list[DeviceProfile]:
    """Profiles named by `--hil-profile`: "all", one name, or a comma-separated list."""
    names = list(ALL_PROFILES) if value.strip() == "all" else [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in PROFILES]
    if unknown or not names:
        raise ValueError(f"unknown device profile(s) {unknown or value!r}; choose from {list(ALL_PROFILES)} or 'all'")
    return [PROFILES[n] for n in dict.fromkeys(names)]
