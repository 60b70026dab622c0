#!/usr/bin/env bash
# System packages the test suite drives as real parts: Janus (media back-end), Chromium and
# ChromeDriver (browser end-to-end), iproute2 (network namespaces for Janus), coturn (TURN
# credentials of the join response against a real TURN server). Installs only
# what is missing, from Debian's registry; fails loudly when it cannot.
set -euo pipefail
need=()
command -v janus >/dev/null 2>&1 || need+=(janus)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v turnserver >/dev/null 2>&1 || need+=(coturn)
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
echo "installing system packages: ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
if ! $SUDO apt-get install -y -q --no-install-recommends "${need[@]}" >/tmp/classmesh-apt.log 2>&1; then
  $SUDO apt-get update -q >>/tmp/classmesh-apt.log 2>&1
  $SUDO apt-get install -y -q --no-install-recommends "${need[@]}" >>/tmp/classmesh-apt.log 2>&1 || {
    echo "could not install ${need[*]} (see /tmp/classmesh-apt.log)" >&2
    tail -20 /tmp/classmesh-apt.log >&2
    exit 1
  }
fi
