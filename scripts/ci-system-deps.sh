#!/usr/bin/env bash
# System packages from Debian: Chromium (/usr/bin/chromium, driven by Playwright for Python, which downloads no browser
# of its own: never run `playwright install`) and PostgreSQL (the tests start a private cluster on loopback) for the
# browser and team-server tests, and the GCIDE dictionary (dict-gcide, /usr/share/dictd/gcide.dict.dz: the English text
# of the Wordybird presets' offline tokenizer and corpus). Installs only what is missing, without recommended extras,
# so a machine that already has them pays nothing. Run as root (CI does) or with sudo.
set -euo pipefail

need=()
[ -x /usr/bin/chromium ] || need+=(chromium)
compgen -G "/usr/lib/postgresql/*/bin/initdb" > /dev/null || need+=(postgresql)
[ -f /usr/share/dictd/gcide.dict.dz ] || need+=(dict-gcide)
command -v runuser > /dev/null || need+=(util-linux)   # PostgreSQL will not run as root: the tests use runuser

if [ ${#need[@]} -eq 0 ]; then
    echo "ci-system-deps: chromium, postgresql and dict-gcide already installed"
    exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
echo "ci-system-deps: installing ${need[*]}"
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" > /dev/null
/usr/bin/chromium --version
