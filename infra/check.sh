#!/usr/bin/env bash
# The test command: linters, type checks, then the whole test suite against real components.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${HEADWATER_VENV:-.venv}
# One command per line: under `set -e` a failure on the left of `&&` would not stop the script.
echo "== ruff"
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
echo "== mypy"; "$VENV/bin/mypy"
echo "== pytest"; "$VENV/bin/pytest" "$@"
