#!/usr/bin/env bash
# One-time (idempotent) setup of the development environment in .venv at the project root.
# Re-running is cheap: it reinstalls only when requirements-dev.txt or pyproject.toml changed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3}"
stamp=".venv/.popalign-setup-stamp"
want="$( (cat requirements-dev.txt pyproject.toml; cat requirements-nodeps.txt 2>/dev/null || true) | sha256sum | cut -d' ' -f1)"
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "[setup] creating/updating .venv (first run takes a few minutes: torch is ~5 GB)" >&2
[ -x .venv/bin/python ] || "$py" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip "setuptools>=68" wheel
.venv/bin/python -m pip install --quiet -r requirements-dev.txt
# packages whose own pins are outdated but that work with the pinned set (installed without their dependencies)
if [ -f requirements-nodeps.txt ] && grep -qv '^\s*\(#\|$\)' requirements-nodeps.txt; then
  .venv/bin/python -m pip install --quiet --no-deps -r requirements-nodeps.txt
fi
.venv/bin/python -m pip install --quiet --no-deps --no-build-isolation -e .
echo "$want" > "$stamp"
echo "[setup] done" >&2
