#!/usr/bin/env bash
# Creates the separate virtualenv that the streaming benchmark runs Quix Streams in.
# Quix Streams pins its own confluent-kafka, rocksdict and pydantic ranges, so it never
# shares Headwater's virtualenv (as a competing stream processor would not in production).
# Idempotent: re-running it skips the install while QUIX_VERSION is unchanged.
# fastavro is installed beside it so that Quix decodes the same Avro clicks Headwater does.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${QUIX_VENV:-.venv-quix}
QUIX_VERSION=${QUIX_VERSION:-}   # empty: the newest Quix Streams that pip resolves for this Python
SPEC="quixstreams${QUIX_VERSION:+==$QUIX_VERSION}"
stamp="$VENV/.quix-installed"

log() { printf '[quix-env] %s\n' "$*" >&2; }

find_python() {
  for cand in "${PYTHON:-}" python3.11 python3.12 python3; do
    [ -n "$cand" ] || continue
    if command -v "$cand" >/dev/null && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 9))'; then
      echo "$cand"; return 0
    fi
  done
  log "Python >= 3.9 is required for Quix Streams; none found on PATH (set PYTHON=/path/to/python3)"
  return 1
}

# Keep the virtualenv out of git, as Python >= 3.13's venv does by itself.
[ -d "$VENV" ] && echo '*' > "$VENV/.gitignore"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$SPEC" ] \
    && "$VENV/bin/python" -c 'import quixstreams, fastavro' 2>/dev/null; then
  echo "$VENV"; exit 0
fi
py=$(find_python)
[ -x "$VENV/bin/python" ] || { log "creating virtualenv $VENV with $py"; "$py" -m venv "$VENV"; }
echo '*' > "$VENV/.gitignore"
log "installing $SPEC into $VENV (a minute the first time)"
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
if ! "$VENV/bin/python" -m pip install -q "$SPEC" fastavro; then
  log "pip could not install $SPEC into $VENV: see pip's error above; the benchmark reports Quix as unavailable"
  exit 1
fi
echo "$SPEC" > "$stamp"
echo "$VENV"
