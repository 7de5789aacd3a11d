#!/usr/bin/env bash
# Creates the separate virtualenv that the online-read benchmark runs Feast in.
# Feast pins its own versions of pyarrow, pandas, protobuf and friends, so it never shares
# Headwater's virtualenv (as it would not share a serving process in production).
# Idempotent: re-running it skips the install while FEAST_VERSION is unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${FEAST_VENV:-.venv-feast}
FEAST_VERSION=${FEAST_VERSION:-}   # empty: the newest Feast that pip resolves for this Python
SPEC="feast${FEAST_VERSION:+==$FEAST_VERSION}"
stamp="$VENV/.feast-installed"

log() { printf '[feast-env] %s\n' "$*" >&2; }

find_python() {
  for cand in "${PYTHON:-}" python3.11 python3.12 python3; do
    [ -n "$cand" ] || continue
    if command -v "$cand" >/dev/null && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
      echo "$cand"; return 0
    fi
  done
  log "Python >= 3.10 is required for Feast; none found on PATH (set PYTHON=/path/to/python3)"
  return 1
}

# Keep the virtualenv out of git, as Python >= 3.13's venv does by itself.
[ -d "$VENV" ] && echo '*' > "$VENV/.gitignore"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$SPEC" ] && "$VENV/bin/python" -c 'import feast' 2>/dev/null; then
  echo "$VENV"; exit 0
fi
py=$(find_python)
[ -x "$VENV/bin/python" ] || { log "creating virtualenv $VENV with $py"; "$py" -m venv "$VENV"; }
echo '*' > "$VENV/.gitignore"
log "installing $SPEC into $VENV (a few minutes the first time)"
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
if ! "$VENV/bin/python" -m pip install -q "$SPEC"; then
  log "pip could not install $SPEC into $VENV: see pip's error above; the benchmark reports Feast as unavailable"
  exit 1
fi
echo "$SPEC" > "$stamp"
echo "$VENV"
