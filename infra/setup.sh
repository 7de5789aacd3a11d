#!/usr/bin/env bash
# Idempotent set-up for a fresh machine: system packages, the virtualenv and every Python
# dependency. Re-running it is cheap: the pip step is skipped while pyproject.toml and this
# script are unchanged since the last successful install.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${HEADWATER_VENV:-.venv}
# redis-server: the Redis online store's tests; nghttp2-client: h2load, the load generator of benchmarks/serving.py
APT_PACKAGES=(redis-server nghttp2-client)

log() { printf '[setup] %s\n' "$*"; }

install_system_packages() {
  local missing=()
  for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" -ne 0 ]; then
    log "missing system packages: ${missing[*]}. Run as root, or: sudo apt-get install -y ${missing[*]}" >&2
    return 1
  fi
  if ! command -v apt-get >/dev/null; then
    log "missing system packages ${missing[*]} and no apt-get here: install them with your package manager" >&2
    return 1
  fi
  log "installing system packages: ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # Debian starts the packaged service; Headwater runs its own instances on free ports.
  if command -v service >/dev/null && service redis-server status >/dev/null 2>&1; then
    service redis-server stop >/dev/null 2>&1 || true
  fi
}

find_python() {
  for cand in "${PYTHON:-}" python3.11 python3.12 python3.13 python3; do
    [ -n "$cand" ] || continue
    if command -v "$cand" >/dev/null && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      echo "$cand"; return 0
    fi
  done
  log "Python >= 3.11 is required; none found on PATH (set PYTHON=/path/to/python3.11)" >&2
  return 1
}

install_python_packages() {
  local stamp="$VENV/.headwater-installed" want
  want=$(cat pyproject.toml infra/setup.sh | sha256sum | cut -d' ' -f1)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$VENV/bin/headwater" ]; then
    return 0
  fi
  local py; py=$(find_python)
  [ -x "$VENV/bin/python" ] || { log "creating virtualenv $VENV with $py"; "$py" -m venv "$VENV"; }
  log "installing Python dependencies into $VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
  "$VENV/bin/python" -m pip install -q -e '.[dev]'
  echo "$want" > "$stamp"
}

# The prediction API's Python code (serving/api/v1/*_pb2*.py, git-ignored), regenerated when the
# .proto is newer than it. `-I .` from the repository root makes the stubs import
# `serving.api.v1.prediction_pb2`.
generate_grpc_code() {
  local proto=serving/api/v1/prediction.proto out
  for out in serving/api/v1/prediction_pb2.py serving/api/v1/prediction_pb2.pyi serving/api/v1/prediction_pb2_grpc.py; do
    if [ ! -f "$out" ] || [ "$proto" -nt "$out" ]; then
      log "generating the gRPC code of $proto"
      "$VENV/bin/python" -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. "$proto"
      return 0
    fi
  done
}

install_system_packages
install_python_packages
generate_grpc_code
log "ready: $VENV"
