#!/usr/bin/env bash
# Installs Debian's chromium + chromium-driver for the front-end tests (tests/nodes/test_comfyui_js.py) when they are
# missing and this is a Debian machine run as root; otherwise says so (those tests then skip). Idempotent.
# POPALIGN_NO_BROWSER_INSTALL=1 turns the install off.
set -uo pipefail
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  exit 0
fi
if [ "${POPALIGN_NO_BROWSER_INSTALL:-0}" = 1 ]; then
  echo "[setup] chromium missing (POPALIGN_NO_BROWSER_INSTALL=1): the browser tests will skip" >&2
  exit 0
fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "[setup] installing chromium + chromium-driver (Debian) for the browser tests" >&2
  export DEBIAN_FRONTEND=noninteractive
  if ! { apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; }; then
    echo "[setup] could not install chromium: the browser tests will skip" >&2
  fi
else
  echo "[setup] chromium missing: the browser tests will skip (install: apt-get install chromium chromium-driver)" >&2
fi
exit 0
