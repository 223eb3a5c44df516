"""Build (once, cached) the arm64 bookworm userland with the agent installed from this checkout's wheel.

Three cached layers under `.cache/arm64/`, each rebuilt only when its inputs change:
1. `rootfs/`: debootstrap of Debian 12 arm64 (Raspberry Pi OS 64-bit's base, Python 3.11), keyed
   by suite, architecture, packages and mirror (the machine's own Debian mirror from its apt sources);
2. per profile, a venv in `rootfs/opt/edgeguide/<profile>` with the runtime and the agent's
   dependencies, keyed by those requirements (read from pyproject's `agent` extra);
3. the agent itself, the wheel built from this checkout, keyed by the wheel's content.
pip inside the chroot reaches the same package index as this machine: its pip configuration files
and the files they name (certificate, constraints) are copied to the same paths in the rootfs.
"""

from __future__ import annotations

import configparser
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from compression.runtimes import LEGACY_REQUIREMENTS
from hil_tests.arm64.chroot import chroot_command, cpuinfo_text, guest_env
from hil_tests.legacy_env import agent_requirements

_LOGGER = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache" / "arm64"
SUITE = "bookworm"  # Raspberry Pi OS 64-bit's Debian release
ARCH = "arm64"
INCLUDE = ("python3", "python3-venv", "python3-pip", "ca-certificates")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
HOST_PACKAGES = ("qemu-user-static", "binfmt-support", "debootstrap")
BASE_MARKER = ".edgeguide-base.json"
DEPS_MARKER = ".edgeguide-deps.json"
AGENT_MARKER = ".edgeguide-agent.json"
GUEST_DIST = "/opt/edgeguide/dist"
# Files of this checkout that make up the wheel (pyproject's [tool.setuptools] packages + metadata).
_WHEEL_SOURCES = ("pyproject.toml", "README.md", "LICENSE", "protocol", "agent", "server", "compression", "hil_tests")
_PIP_PATH_KEYS = ("cert", "client-cert", "constraint", "constraints", "requirement")
_STEP_TIMEOUT_S = 1800


class BuildError(RuntimeError):
    """The userland could not be built; the message names the step and what to do."""


@dataclass(frozen=True)
class ArmProfile:
    """One agent environment inside the rootfs."""

    name: str
    device_id: str
    runtime: str  # "name version" the device must announce
    requirements: tuple[str, ...]  # what the venv holds besides the agent (its cache key)
    extra: str | None = None  # install the requirements as the wheel's extra (WHEEL[extra]) instead

    @property
    def venv(self) -> str:
        return f"/opt/edgeguide/{self.name}"


def _litert_requirements(pyproject: Path = REPO / "pyproject.toml") -> tuple[str, ...]:
    extras = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    return tuple(extras["agent"])


def arm_profiles() -> dict[str, ArmProfile]:
    """LiteRT 2.3.0 with numpy 2 (the agent extra as pinned), and tflite-runtime 2.14.0 with numpy<2."""
    litert = _litert_requirements()
    version = next(r.split("==")[1] for r in litert if r.startswith("ai-edge-litert=="))
    legacy_version = LEGACY_REQUIREMENTS[0].split("==")[1]
    return {
        "litert": ArmProfile("litert", "pi64-litert", f"ai-edge-litert {version}", litert, extra="agent"),
        "legacy": ArmProfile("legacy", "pi64-legacy", f"tflite-runtime {legacy_version}",
                             (*LEGACY_REQUIREMENTS, *agent_requirements())),
    }


def say(message: str) -> None:
    """Progress for the person waiting (the build takes minutes)."""
    print(f"[hil-arm64 {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _run(cmd: Sequence[str], what: str, *, timeout: float = _STEP_TIMEOUT_S, log: Path | None = None) -> None:
    """Run one build step; its output goes to `log` (tail shown on failure)."""
    started = time.monotonic()
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
    with open(log or os.devnull, "ab") as out:
        out.write(f"\n# {what}: {' '.join(cmd)}\n".encode())
        out.flush()
        try:
            proc = subprocess.run(list(cmd), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  timeout=timeout, check=False)
        except subprocess.TimeoutExpired as exc:
            raise BuildError(f"{what}: no result after {timeout:.0f} s (log {log})") from exc
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:] if log else ""
        raise BuildError(f"{what} failed with exit code {proc.returncode} (log {log}):\n{tail}")
    say(f"{what}: done in {time.monotonic() - started:.0f} s")


# ---- this machine ------------------------------------------------------------------------------

def check_host() -> None:
    """Root, the host tools, and binfmt_misc with qemu-aarch64 enabled (mounted/enabled if needed)."""
    if os.geteuid() != 0:
        raise BuildError("the arm64 userland needs root (debootstrap, chroot, mounts): run `sudo make hil-arm64`")
    missing = [tool for tool in ("debootstrap", "unshare", "chroot", "update-binfmts") if shutil.which(tool) is None]
    if not Path("/usr/bin/qemu-aarch64-static").exists():
        missing.append("qemu-aarch64-static")
    if missing:
        raise BuildError(f"missing {', '.join(missing)}: apt-get install -y {' '.join(HOST_PACKAGES)} "
                         "(scripts/install-system-deps.sh arm64 does it)")
    binfmt = Path("/proc/sys/fs/binfmt_misc")
    if not (binfmt / "status").exists():
        say("mounting binfmt_misc (left mounted: it is system configuration, like an installed package)")
        _run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(binfmt)], "mount binfmt_misc")
    entry = binfmt / "qemu-aarch64"
    if not entry.exists() or not entry.read_text().startswith("enabled"):
        _run(["update-binfmts", "--enable", "qemu-aarch64"], "enable qemu-aarch64 in binfmt_misc")
    text = entry.read_text() if entry.exists() else ""
    if not text.startswith("enabled"):
        raise BuildError(f"binfmt_misc has no enabled qemu-aarch64 entry ({entry}: {text[:200]!r}); "
                         "reinstall qemu-user-static and binfmt-support")
    flags = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("flags:")), "")
    if "F" not in flags:
        raise BuildError(f"qemu-aarch64's binfmt entry lacks the F flag ({flags!r}): the chroot cannot find the "
                         "emulator; Debian's qemu-user-static registers it with F")


def debian_mirror(sources: Sequence[Path] | None = None) -> str:
    """The first Debian archive URI of this machine's apt sources (not -security); override with
    EDGEGUIDE_DEBIAN_MIRROR."""
    if os.environ.get("EDGEGUIDE_DEBIAN_MIRROR"):
        return os.environ["EDGEGUIDE_DEBIAN_MIRROR"].rstrip("/")
    if sources is None:
        sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in sources:
        if not path.is_file() or not path.name.endswith((".list", ".sources")):
            continue
        for uri in _source_uris(path.read_text(errors="replace"), deb822=path.name.endswith(".sources")):
            if "debian" in uri and "security" not in uri and "debian-ports" not in uri:
                return uri.rstrip("/")
    return DEFAULT_MIRROR


def _source_uris(text: str, deb822: bool) -> list[str]:
    uris = []
    if deb822:
        for stanza in text.split("\n\n"):
            fields = {}
            for line in stanza.splitlines():
                key, sep, value = line.partition(":")
                if sep and not line.startswith((" ", "#")):
                    fields[key.strip().lower()] = value.strip()
            if "deb" in fields.get("types", "").split() and fields.get("enabled", "yes").lower() != "no":
                uris += fields.get("uris", "").split()
    else:
        for line in text.splitlines():
            parts = re.sub(r"\[[^\]]*\]", " ", line).split() if line.startswith("deb ") else []
            if len(parts) >= 2:
                uris.append(parts[1])
    return [u for u in uris if u.startswith(("http://", "https://"))]


def pip_files(env: dict[str, str] | None = None, home: Path | None = None) -> list[Path]:
    """This machine's pip configuration files and the files they name (certificates, constraints)."""
    env = dict(os.environ) if env is None else env
    home = Path(env.get("HOME", "/root")) if home is None else home
    xdg_dirs = env.get("XDG_CONFIG_DIRS", "/etc/xdg").split(":")
    configs = [Path("/etc/pip.conf"), *(Path(d) / "pip" / "pip.conf" for d in xdg_dirs if d),
               Path(env.get("XDG_CONFIG_HOME", home / ".config")) / "pip" / "pip.conf", home / ".pip" / "pip.conf"]
    if env.get("PIP_CONFIG_FILE"):
        configs.append(Path(env["PIP_CONFIG_FILE"]))
    found = [c for c in configs if c.is_file()]
    named = [env[k] for k in ("PIP_CERT", "PIP_CLIENT_CERT", "PIP_CONSTRAINT", "REQUESTS_CA_BUNDLE") if env.get(k)]
    for config in found:
        parser = configparser.ConfigParser(interpolation=None)
        try:
            parser.read(config)
        except configparser.Error as exc:
            raise BuildError(f"cannot read pip configuration {config}: {exc}") from exc
        for section in parser.sections():
            for key in _PIP_PATH_KEYS:
                named += parser.get(section, key, fallback="").split()
    return list(dict.fromkeys(found + [Path(p) for p in named if p and Path(p).is_file()]))


# ---- the layers --------------------------------------------------------------------------------

def _read_marker(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


class Userland:
    """The cached arm64 rootfs under `cache` and how to run things in it."""

    def __init__(self, cache: Path = CACHE) -> None:
        self.cache = cache
        self.rootfs = cache / "rootfs"
        self.cpuinfo = cache / "cpuinfo"
        self.logs = cache / "logs"

    def command(self, argv: Sequence[str], extra_env: dict[str, str] | None = None) -> list[str]:
        return chroot_command(self.rootfs, self.cpuinfo, argv, guest_env(extra_env))

    def host_path(self, guest: str) -> Path:
        return self.rootfs / guest.lstrip("/")

    def guest_run(self, argv: Sequence[str], what: str, timeout: float = _STEP_TIMEOUT_S) -> None:
        _run(self.command(argv), what, timeout=timeout, log=self.logs / "build.log")

    def guest_output(self, argv: Sequence[str], timeout: float = 300) -> str:
        proc = subprocess.run(self.command(argv), capture_output=True, text=True, timeout=timeout, check=False)
        if proc.returncode != 0:
            raise BuildError(f"{' '.join(argv)} in the arm64 userland failed ({proc.returncode}): "
                             f"{proc.stderr.strip()[-2000:]}")
        return proc.stdout

    # -- layer 1 --------------------------------------------------------------------------------
    def ensure_base(self) -> bool:
        """debootstrap unless the cached rootfs was made with the same inputs; True if it was built."""
        mirror = debian_mirror()
        key = {"suite": SUITE, "arch": ARCH, "variant": "minbase", "include": list(INCLUDE), "mirror": mirror}
        if _read_marker(self.rootfs / BASE_MARKER) == key:
            say(f"arm64 {SUITE} rootfs: cached ({self.rootfs})")
            return False
        tmp = self.cache / "rootfs.building"
        shutil.rmtree(tmp, ignore_errors=True)  # only ever mounted inside private namespaces: safe to delete
        self.cache.mkdir(parents=True, exist_ok=True)
        say(f"debootstrap {SUITE} {ARCH} from {mirror} (about 3-4 minutes; log {self.logs / 'debootstrap.log'})")
        _run(["debootstrap", f"--arch={ARCH}", "--variant=minbase", f"--include={','.join(INCLUDE)}", SUITE,
              str(tmp), mirror], f"debootstrap {SUITE} {ARCH}", log=self.logs / "debootstrap.log")
        shutil.rmtree(self.rootfs, ignore_errors=True)
        tmp.rename(self.rootfs)
        (self.rootfs / BASE_MARKER).write_text(json.dumps(key, indent=1) + "\n")
        return True

    def configure(self) -> None:
        """Per run (cheap): cpuinfo stand-in, DNS, and this machine's pip configuration in the rootfs."""
        self.cpuinfo.write_text(cpuinfo_text(os.cpu_count() or 1))
        files = [Path("/etc/resolv.conf"), *pip_files()]
        for path in (p for p in files if p.is_file()):
            dest = self.host_path(str(path))  # the same path as named here (content of a symlink's target)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.unlink(missing_ok=True)  # a symlink in the rootfs would be followed out of it
            shutil.copyfile(path, dest)
        say(f"copied into the rootfs: {', '.join(str(p) for p in files if p.is_file())}")

    def describe(self) -> dict:
        """machine, OS and Python of the userland, read from inside it."""
        probe = ("import json, platform, sys; print(json.dumps({'machine': platform.machine(), "
                 "'python': platform.python_version(), 'os_release': platform.freedesktop_os_release()"
                 "['PRETTY_NAME']}))")
        return json.loads(self.guest_output(["/usr/bin/python3", "-c", probe]).strip().splitlines()[-1])

    # -- layers 2 and 3 -------------------------------------------------------------------------
    def ensure_profile(self, profile: ArmProfile, wheel: Path, wheel_key: str) -> None:
        """The profile's venv with its requirements (rebuilt when they change) and this wheel."""
        venv = self.host_path(profile.venv)
        dist = self.host_path(GUEST_DIST)
        dist.mkdir(parents=True, exist_ok=True)
        shutil.copy2(wheel, dist / wheel.name)
        guest_wheel = f"{GUEST_DIST}/{wheel.name}"
        deps_key = {"requirements": list(profile.requirements), "extra": profile.extra,
                    "base": _read_marker(self.rootfs / BASE_MARKER)}
        if _read_marker(venv / DEPS_MARKER) != deps_key:
            shutil.rmtree(venv, ignore_errors=True)
            wanted = [f"{guest_wheel}[{profile.extra}]"] if profile.extra else list(profile.requirements)
            say(f"{profile.name}: venv {profile.venv} with {' '.join(wanted)} (pip under emulation, about a minute)")
            self.guest_run(["/usr/bin/python3", "-m", "venv", profile.venv], f"{profile.name}: python3 -m venv")
            what = "the agent wheel with its extra" if profile.extra else "the runtime and the agent's dependencies"
            self.guest_run([f"{profile.venv}/bin/pip", "install", "--progress-bar", "off", *wanted],
                           f"{profile.name}: pip install {what}")
            (venv / DEPS_MARKER).write_text(json.dumps(deps_key, indent=1) + "\n")
            if profile.extra:
                (venv / AGENT_MARKER).write_text(json.dumps({"wheel": wheel_key}) + "\n")
            else:
                (venv / AGENT_MARKER).unlink(missing_ok=True)
        else:
            say(f"{profile.name}: venv cached")
        if _read_marker(venv / AGENT_MARKER) == {"wheel": wheel_key}:
            say(f"{profile.name}: agent wheel {wheel_key} installed")
            return
        # --no-deps: the requirements above are the environment; the wheel must not change them
        # (for the legacy venv, its agent extra would pull in ai-edge-litert and numpy 2).
        self.guest_run([f"{profile.venv}/bin/pip", "install", "--progress-bar", "off", "--force-reinstall",
                        "--no-deps", guest_wheel], f"{profile.name}: pip install the agent wheel")
        (venv / AGENT_MARKER).write_text(json.dumps({"wheel": wheel_key}) + "\n")


def build_wheel(out: Path, python: str = sys.executable) -> tuple[Path, str]:
    """The project's wheel built from this checkout (a copy of its package sources), and a key of
    its content (file names and bytes, not zip timestamps)."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.whl"):
        old.unlink()
    with tempfile.TemporaryDirectory(prefix="edgeguide-wheel-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
        for name in _WHEEL_SOURCES:
            path = REPO / name
            if path.is_dir():
                shutil.copytree(path, src / name, ignore=ignore)
            elif path.is_file():
                shutil.copy2(path, src / name)
        _run([python, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(src)],
             "build the agent wheel from this checkout", timeout=600, log=CACHE / "logs" / "wheel.log")
    wheels = sorted(out.glob("edgeguide-*.whl"))
    if len(wheels) != 1:
        raise BuildError(f"expected one edgeguide wheel in {out}, found {[w.name for w in wheels]}")
    digest = hashlib.sha256()
    with zipfile.ZipFile(wheels[0]) as zf:
        for name in sorted(zf.namelist()):
            digest.update(name.encode() + b"\0" + zf.read(name) + b"\0")
    return wheels[0], digest.hexdigest()[:16]


def build(profiles: Sequence[ArmProfile], cache: Path = CACHE) -> Userland:
    """Everything `run` needs, built or taken from the cache."""
    started = time.monotonic()
    check_host()
    land = Userland(cache)
    land.ensure_base()
    land.configure()
    wheel, key = build_wheel(cache / "dist")
    for profile in profiles:
        land.ensure_profile(profile, wheel, key)
    say(f"arm64 userland ready in {time.monotonic() - started:.0f} s: {land.describe()}")
    return land
