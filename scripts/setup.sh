#!/usr/bin/env bash
# Set up everything beit3cap needs on a fresh Debian machine: Java (for the PTB tokenizer and METEOR),
# Chromium (browser test of the web page), a .venv in the repository root, and the package with its test extras. Safe to run again (fast when done).
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages: Java runs the COCO PTB tokenizer and METEOR; Chromium drives the web page's browser test.
missing=()
command -v java >/dev/null 2>&1 || missing+=(default-jre-headless)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
if [ ${#missing[@]} -gt 0 ]; then
  echo "[setup] installing system packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  if ! { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null; }; then
    echo "[setup] warning: could not install ${missing[*]}; METEOR/scoring or the browser test will be unavailable" >&2
  fi
fi

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  python3 -m venv .venv
fi

stamp=.venv/.beit3cap-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "[setup] installing beit3cap and its dependencies into .venv (first time: ~2 minutes)"
  # pip (not uv): it takes the pinned torch from this machine's local wheel store (see environment.md).
  if ! .venv/bin/python -m pip install -q -e ".[dev]" > .venv/pip-install.log 2>&1; then
    grep -v "^WARNING: Location" .venv/pip-install.log >&2
    echo "[setup] pip install failed (full log: .venv/pip-install.log)" >&2
    exit 1
  fi
  touch "$stamp"
fi
