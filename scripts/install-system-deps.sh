#!/usr/bin/env bash
# Install the Debian packages a make target needs, when they are missing.
#
#   scripts/install-system-deps.sh base    python3 >= 3.11 with venv support (every target's .venv)
#   scripts/install-system-deps.sh test    base + mosquitto, mosquitto-clients, openssl, PostgreSQL, util-linux, iproute2,
#                                          chromium (the dashboard's browser tests drive it headless)
#   scripts/install-system-deps.sh arm64   test + qemu-user-static, binfmt-support, debootstrap (make hil-arm64)
#
# As root it runs apt-get itself (update once, then install); otherwise it prints the exact
# command to run and exits 1. Nothing outside Debian's own packages is installed.
set -euo pipefail

group="${1:-test}"
python="${PYTHON:-python3}"
need=()

want_base() {
    if ! command -v "$python" >/dev/null 2>&1; then
        need+=(python3 python3-venv)
    elif ! "$python" -c 'import ensurepip, venv' >/dev/null 2>&1; then
        need+=(python3-venv)
    fi
}

want_test() {
    want_base
    command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
    command -v mosquitto_pub >/dev/null 2>&1 || need+=(mosquitto-clients)
    command -v openssl >/dev/null 2>&1 || need+=(openssl)
    # The registry's PostgreSQL tests start their own server with initdb/pg_ctl (no system service).
    compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || need+=(postgresql)
    command -v taskset >/dev/null 2>&1 || need+=(util-linux)
    # Emulated device links: network namespaces, veth pairs and tbf rate limits (ip, tc).
    { command -v ip >/dev/null 2>&1 && command -v tc >/dev/null 2>&1; } || need+=(iproute2)
    # Playwright drives Debian's Chromium (its own browser download is not used).
    command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ] || need+=(chromium)
}

want_arm64() {
    want_test
    [ -x /usr/bin/qemu-aarch64-static ] || need+=(qemu-user-static)
    command -v update-binfmts >/dev/null 2>&1 || need+=(binfmt-support)
    command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || need+=(debootstrap)
}

case "$group" in
    base) want_base ;;
    test) want_test ;;
    arm64) want_arm64 ;;
    *) echo "usage: $0 base|test|arm64" >&2; exit 2 ;;
esac

if [ "${#need[@]}" -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "EdgeGuide needs these Debian packages (run as root, or rerun this make target as root):" >&2
    echo "  sudo apt-get update && sudo apt-get install -y ${need[*]}" >&2
    exit 1
fi
echo "installing Debian packages: ${need[*]}"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
