"""Run a command inside the arm64 root filesystem: private mount namespace, /proc, /dev, /sys, chroot.

Each command gets its own mount namespace (`unshare --mount --propagation private`), so its mounts
vanish with its last process: nothing to unmount afterwards, even when it crashes or is killed.

Trap handled here: Debian 12's qemu-user (7.2) shows the guest the host's x86 /proc/cpuinfo, and
LiteRT's CPU detection then crashes the agent (SIGSEGV) on its first model load. An ARM cpuinfo
text is bind-mounted over the root filesystem's /proc/cpuinfo. It is a stand-in and says so in its
`Model` line (the agent's reports quote it), with the Pi 4's core (Cortex-A72) as the CPU part.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

_LOGGER = logging.getLogger(__name__)

# Passed from this machine into the chroot: pip's settings (index, certificate, timeouts) and proxies.
_PASSED_ENV_PREFIXES = ("PIP_",)
_PASSED_ENV = ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")
_MOUNT_SCRIPT = (
    'set -e; root="$1"; cpuinfo="$2"; shift 2; '
    'mount -t proc proc "$root/proc"; '
    'mount --rbind /dev "$root/dev"; '
    'mount --rbind /sys "$root/sys"; '
    'mount --bind "$cpuinfo" "$root/proc/cpuinfo"; '
    'exec chroot "$root" "$@"'
)
CPUINFO_MODEL = "QEMU user-mode emulation of aarch64 on an x86-64 host (stand-in cpuinfo, no board)"


def cpuinfo_text(cores: int) -> str:
    """An aarch64 /proc/cpuinfo for `cores` processors (Cortex-A72 part numbers, a stand-in Model line)."""
    block = ("processor\t: {n}\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n"
             "CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\n"
             "CPU revision\t: 3\n")
    blocks = "\n".join(block.format(n=n) for n in range(max(1, cores)))
    return f"{blocks}\nHardware\t: QEMU user-mode emulation\nModel\t\t: {CPUINFO_MODEL}\n"


def guest_env(extra: Mapping[str, str] | None = None, host_env: Mapping[str, str] | None = None) -> dict[str, str]:
    """A clean environment for the chroot: fixed basics, this machine's PIP_* and proxy settings, `extra`."""
    host = os.environ if host_env is None else host_env
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
           "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    env.update({k: v for k, v in host.items() if k.startswith(_PASSED_ENV_PREFIXES) or k in _PASSED_ENV})
    env.update(extra or {})
    return env


def chroot_command(rootfs: Path, cpuinfo: Path, argv: Sequence[str], env: Mapping[str, str]) -> list[str]:
    """The host command that runs `argv` (guest paths) in `rootfs` with exactly `env`.

    The returned process keeps its PID through unshare, sh, chroot and env (all exec), so a signal
    sent to it reaches the guest program (qemu-user forwards it).
    """
    if not argv:
        raise ValueError("chroot_command needs a command to run")
    return ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", _MOUNT_SCRIPT, "arm64-chroot",
            str(rootfs), str(cpuinfo), "/usr/bin/env", "-i", *[f"{k}={v}" for k, v in env.items()], *argv]
