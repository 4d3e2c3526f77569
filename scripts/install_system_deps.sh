#!/usr/bin/env bash
# Debian packages the browser, postgres and CPU-emulation tests need: headless Chromium + its
# WebDriver, PostgreSQL (a private cluster is started by the tests), and QEMU user mode (int8 export
# checked on an emulated AVX2 CPU without VNNI, tests/export/emulation.py). Idempotent: returns at once when all are
# installed. Needs root (or sudo) to install; CI calls it before `make test`.
set -euo pipefail
packages=(chromium chromium-driver postgresql qemu-user)
missing=()
for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && { echo "system deps present: ${packages[*]}"; exit 0; }
if ! command -v apt-get >/dev/null; then
    echo "warning: no apt-get here; install ${missing[*]} yourself (browser/postgres/emulation tests skip without them)" >&2
    exit 0
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -q
$sudo apt-get install -y -q "${missing[@]}"
