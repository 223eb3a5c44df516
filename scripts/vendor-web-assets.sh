#!/usr/bin/env bash
# Refresh the dashboard's vendored browser assets from their npm packages (no CDN at run time).
#
#   scripts/vendor-web-assets.sh        writes server/web/static/vendor/{htmx.min.js,chart.umd.min.js,*LICENSE*}
#
# Pinned versions; after a bump, run the dashboard tests (tests/test_dashboard.py) and commit the files
# with VERSIONS.txt (name, version, sha256 of each file), which this script rewrites.
set -euo pipefail

HTMX_VERSION=2.0.11
CHARTJS_VERSION=4.6.1
dest="$(cd "$(dirname "$0")/.." && pwd)/server/web/static/vendor"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

cd "$work"
npm pack --silent "htmx.org@${HTMX_VERSION}" "chart.js@${CHARTJS_VERSION}" >/dev/null
mkdir htmx chartjs
tar -xzf "htmx.org-${HTMX_VERSION}.tgz" -C htmx
tar -xzf "chart.js-${CHARTJS_VERSION}.tgz" -C chartjs
mkdir -p "$dest"
cp htmx/package/dist/htmx.min.js "$dest/htmx.min.js"
cp htmx/package/LICENSE "$dest/htmx.LICENSE"
cp chartjs/package/dist/chart.umd.min.js "$dest/chart.umd.min.js"
cp chartjs/package/LICENSE.md "$dest/chart.js.LICENSE.md"
{
    echo "htmx.org ${HTMX_VERSION} (npm) htmx.min.js sha256 $(sha256sum "$dest/htmx.min.js" | cut -d' ' -f1)"
    echo "chart.js ${CHARTJS_VERSION} (npm) chart.umd.min.js sha256 $(sha256sum "$dest/chart.umd.min.js" | cut -d' ' -f1)"
} > "$dest/VERSIONS.txt"
echo "vendored into $dest:"
cat "$dest/VERSIONS.txt"
