#!/usr/bin/env bash
# Set up everything beit3cap needs on a fresh Debian machine: Java (for the PTB tokenizer and METEOR),
# a .venv in the repository root, and the package with its test extras. Safe to run again (fast when done).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v java >/dev/null 2>&1; then
  echo "[setup] installing Java (default-jre-headless) for the COCO tokenizer and METEOR"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq default-jre-headless >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  python3 -m venv .venv
fi

stamp=.venv/.beit3cap-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "[setup] installing beit3cap and its dependencies into .venv (first time: ~2 minutes)"
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q -e ".[dev]"
  touch "$stamp"
fi
