#!/usr/bin/env bash
# Fresh clone -> green tests: sets up .venv, lints, runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .  # one formatter for the whole tree
.venv/bin/python -m pytest -q "$@"
