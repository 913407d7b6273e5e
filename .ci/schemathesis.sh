#!/usr/bin/env bash
# Fuzzes the order service against its own OpenAPI document with schemathesis: every
# check (`--checks all`), positive and negative data, the stateful phase that chains
# operations through the document's links. Fails on any finding: a 5xx, a response the
# document does not describe, a schema-valid request refused or an invalid one accepted.
#
#   .ci/schemathesis.sh [SERVICE_BINARY]
#
# Starts the service (built with cargo unless a binary is given) on a temporary SQLite file
# on a free local port, waits for it, runs schemathesis (installed when missing into the
# virtual environment $CQRS_CI_VENV, .ci/.venv by default), and stops the service. The run
# is bounded by examples per operation and by time (SCHEMATHESIS_MAX_EXAMPLES,
# SCHEMATHESIS_MAX_TIME) so that it takes a few minutes.
# The failures that are not the service's are dropped, each for a stated reason, by
# .ci/schemathesis_hooks.py.
set -euo pipefail
cd "$(dirname "$0")/.."

max_examples="${SCHEMATHESIS_MAX_EXAMPLES:-40}"
max_time="${SCHEMATHESIS_MAX_TIME:-120}"

venv="${CQRS_CI_VENV:-.ci/.venv}"
schemathesis="$venv/bin/schemathesis"
if ! "$schemathesis" --version 2>/dev/null | grep -q 'version 4\.'; then
  echo "schemathesis 4 is not installed; installing it into $venv"
  { [ -x "$venv/bin/pip" ] || python3 -m venv "$venv"; } \
    && "$venv/bin/pip" install -q 'schemathesis>=4.3,<5' \
    || { echo "FATAL: cannot install schemathesis" >&2; exit 1; }
fi
echo "$("$schemathesis" --version)"

binary="${1:-}"
if [ -z "$binary" ]; then
  cargo build -q -p cqrs-service --bin cqrs-service
  binary="${CARGO_TARGET_DIR:-target}/debug/cqrs-service"
fi

work=$(mktemp -d)
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
base="http://127.0.0.1:$port"
# The operator pages are served behind a token made for this run; schemathesis sends it
# where the document's `operator_token` scheme asks for it (.ci/schemathesis.toml) and checks
# that a request without it is refused.
CQRS_SERVICE_OPERATOR_TOKEN=$(python3 -c 'import secrets; print(secrets.token_urlsafe(24))')
export CQRS_SERVICE_OPERATOR_TOKEN
RUST_LOG="${RUST_LOG:-warn}" "$binary" --sqlite "$work/orders.sqlite" --listen "127.0.0.1:$port" \
  >"$work/service.log" 2>&1 &
service_pid=$!
stop_service() {
  kill "$service_pid" 2>/dev/null || true
  wait "$service_pid" 2>/dev/null || true
}
trap 'stop_service; rm -rf "$work"' EXIT

up=""
for _ in $(seq 1 100); do
  if python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' \
    "$base/openapi.json" 2>/dev/null; then up=1; break; fi
  if ! kill -0 "$service_pid" 2>/dev/null; then break; fi
  sleep 0.2
done
if [ -z "$up" ]; then
  echo "FATAL: the service did not answer at $base" >&2
  cat "$work/service.log" >&2
  exit 1
fi
echo "service up: $base"

status=0
SCHEMATHESIS_HOOKS=.ci/schemathesis_hooks.py \
  "$schemathesis" --config-file .ci/schemathesis.toml run "$base/openapi.json" \
  --checks all \
  --mode all \
  --phases examples,coverage,fuzzing,stateful \
  --max-examples "$max_examples" \
  --max-time "$max_time" \
  --request-timeout 10 \
  --output-sanitize false \
  --no-color \
  || status=$?

if ! kill -0 "$service_pid" 2>/dev/null; then
  echo "FATAL: the service died during the run" >&2
  status=1
fi
if grep -q 'panicked' "$work/service.log"; then
  echo "FATAL: the service panicked during the run:" >&2
  grep -A5 'panicked' "$work/service.log" >&2
  status=1
fi
if [ "$status" -ne 0 ]; then
  echo "schemathesis found problems (exit $status); the service's log:" >&2
  tail -n 50 "$work/service.log" >&2
fi
exit "$status"
