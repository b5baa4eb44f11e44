#!/usr/bin/env bash
# System packages for the browser and team-server tests, from Debian: Chromium (/usr/bin/chromium, driven by
# Playwright for Python, which downloads no browser of its own: never run `playwright install`) and PostgreSQL (the
# tests start a private cluster on loopback). Installs only what is missing, without recommended extras, so a
# machine that already has them pays nothing. Run as root (CI does) or with sudo.
set -euo pipefail

need=()
[ -x /usr/bin/chromium ] || need+=(chromium)
compgen -G "/usr/lib/postgresql/*/bin/initdb" > /dev/null || need+=(postgresql)
command -v runuser > /dev/null || need+=(util-linux)   # PostgreSQL will not run as root: the tests use runuser

if [ ${#need[@]} -eq 0 ]; then
    echo "ci-system-deps: chromium and postgresql already installed"
    exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
echo "ci-system-deps: installing ${need[*]}"
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" > /dev/null
/usr/bin/chromium --version
