#!/usr/bin/env bash
# One invoke round trip through cargo-lambda: its local Lambda Runtime API serves the example
# projection function (cqrs-aws/examples/lambda_projection.rs), and one invocation with a
# DynamoDB stream batch must answer with the partial batch response that names the damaged
# record. Usage: .ci/lambda-roundtrip.sh CARGO_LAMBDA_BINARY FUNCTION_BINARY
set -euo pipefail
# Absolute paths: the runtime API is served from another directory.
absolute() { case $1 in /*) printf '%s' "$1" ;; *) printf '%s/%s' "$PWD" "$1" ;; esac; }
cargo_lambda=$(absolute "$1")
function_binary=$(absolute "$2")
batch="$(cd "$(dirname "$0")/.." && pwd)/cqrs-aws/examples/lambda_projection_batch.json"
expected='{"batchItemFailures":[{"itemIdentifier":"200"}]}'

port=$(/usr/bin/env python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
work=$(mktemp -d)
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

# cargo-lambda serves its runtime API from a package with a binary target: any will do.
cargo new -q --bin --vcs none "$work/rt"
(cd "$work/rt" && exec "$cargo_lambda" lambda watch --only-lambda-apis --invoke-address 127.0.0.1 --invoke-port "$port") \
  >"$work/watch.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 120); do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then break; fi
  sleep 0.5
done

AWS_LAMBDA_RUNTIME_API="http://127.0.0.1:$port/.rt" AWS_LAMBDA_FUNCTION_NAME=_ \
  AWS_LAMBDA_FUNCTION_VERSION=1 AWS_LAMBDA_FUNCTION_MEMORY_SIZE=128 \
  "$function_binary" >"$work/function.log" 2>&1 &
pids+=($!)

answer=""
for _ in $(seq 1 5); do
  if answer=$("$cargo_lambda" lambda invoke --invoke-address 127.0.0.1 --invoke-port "$port" _ --data-file "$batch" 2>"$work/invoke.log"); then
    break
  fi
  sleep 1
done
echo "cargo lambda invoke answered: $answer"
if [ "$answer" != "$expected" ]; then
  echo "FATAL: expected $expected" >&2
  cat "$work/watch.log" "$work/function.log" "$work/invoke.log" >&2
  exit 1
fi
