#!/usr/bin/env bash
# Debian packages the browser and postgres tests need: headless Chromium + its WebDriver, and
# PostgreSQL (a private cluster is started by the tests). Idempotent: returns at once when all are
# installed. Needs root (or sudo) to install; CI calls it before `make test`.
set -euo pipefail
packages=(chromium chromium-driver postgresql)
missing=()
for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && { echo "system deps present: ${packages[*]}"; exit 0; }
if ! command -v apt-get >/dev/null; then
    echo "warning: no apt-get here; install ${missing[*]} yourself (browser/postgres tests skip without them)" >&2
    exit 0
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -q
$sudo apt-get install -y -q "${missing[@]}"
