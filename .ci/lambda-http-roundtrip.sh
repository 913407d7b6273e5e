#!/usr/bin/env bash
# The order service's Lambda function (service/src/bin/lambda.rs) under cargo-lambda's
# Lambda Runtime API, on the DynamoDB emulator in CQRS_DYNAMODB_ENDPOINT: `cargo lambda invoke`
# sends an API Gateway HTTP API (payload 2.0) event that places an order and must get 201 with
# its ETag and consistency token; a second event reads the order back with that token (200),
# and the same read through cargo-lambda's function URL route must answer the same.
# Usage: .ci/lambda-http-roundtrip.sh CARGO_LAMBDA_BINARY FUNCTION_BINARY
set -euo pipefail
absolute() { case $1 in /*) printf '%s' "$1" ;; *) printf '%s/%s' "$PWD" "$1" ;; esac; }
cargo_lambda=$(absolute "$1")
function_binary=$(absolute "$2")
: "${CQRS_DYNAMODB_ENDPOINT:?set CQRS_DYNAMODB_ENDPOINT to the DynamoDB emulator}"

port=$(/usr/bin/env python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
work=$(mktemp -d)
run_id=$(date +%s)-$$
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
fail() {
  echo "FATAL: $*" >&2
  cat "$work/watch.log" "$work/function.log" "$work/invoke.log" >&2 2>/dev/null || true
  exit 1
}

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
  CQRS_SERVICE_EVENTS_TABLE="ci-orders-events-$run_id" CQRS_SERVICE_VIEWS_TABLE="ci-orders-views-$run_id" \
  "$function_binary" >"$work/function.log" 2>&1 &
pids+=($!)

# An HTTP API event (payload 2.0) for METHOD PATH with a JSON object of headers and a body.
event() {
  python3 - "$@" <<'PY'
import json, sys, uuid
method, path, headers, body = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
print(json.dumps({
    "version": "2.0", "routeKey": "$default", "rawPath": path, "rawQueryString": "",
    "headers": headers,
    "requestContext": {
        "accountId": "123456789012", "apiId": "orders",
        "domainName": "orders.execute-api.eu-west-1.amazonaws.com", "domainPrefix": "orders",
        "http": {"method": method, "path": path, "protocol": "HTTP/1.1",
                 "sourceIp": "192.0.2.10", "userAgent": "ci"},
        "requestId": str(uuid.uuid4()), "routeKey": "$default", "stage": "$default",
        "time": "03/Dec/2026:13:00:00 +0000", "timeEpoch": 1796302800000,
    },
    "body": body or None, "isBase64Encoded": False,
}))
PY
}
# A field of the JSON on standard input: `statusCode`, `headers.etag`, `body.order_id` (the
# body is JSON text inside the answer).
field() {
  python3 -c '
import json, sys
answer = json.load(sys.stdin)
part, _, name = sys.argv[1].partition(".")
value = answer[part]
if part == "body":
    value = json.loads(value)
print(value[name] if name else value)' "$1"
}
invoke() { # event JSON; prints the function's answer
  local answer=""
  for _ in $(seq 1 10); do
    if answer=$("$cargo_lambda" lambda invoke --invoke-address 127.0.0.1 --invoke-port "$port" _ --data-ascii "$1" 2>"$work/invoke.log"); then
      printf '%s' "$answer"
      return 0
    fi
    sleep 1
  done
  return 1
}

order='{"customer":"ada","lines":[{"sku":"book-1","quantity":2,"unit_price_cents":1250}]}'
placed=$(invoke "$(event POST /orders '{"content-type":"application/json","idempotency-key":"ci-roundtrip-1"}' "$order")") \
  || fail "cargo lambda invoke failed"
echo "POST /orders answered: $placed"
[ "$(field statusCode <<<"$placed")" = 201 ] || fail "expected 201"
[ "$(field headers.etag <<<"$placed")" = '"1"' ] || fail "expected ETag \"1\""
id=$(field body.order_id <<<"$placed")
token=$(field headers.consistency-token <<<"$placed")

shown=$(invoke "$(event GET "/orders/$id" "{\"consistency-token\":\"$token\"}" "")") || fail "cargo lambda invoke failed"
echo "GET /orders/$id answered: $shown"
[ "$(field statusCode <<<"$shown")" = 200 ] || fail "expected 200"
[ "$(field body.status <<<"$shown")" = placed ] || fail "expected the placed order"
[ "$(field body.total_cents <<<"$shown")" = 2500 ] || fail "expected a total of 2500"

# The same read through cargo-lambda's function URL route (what the README's curl uses).
status=$(curl -s -o "$work/url.json" -w '%{http_code}' -H "Consistency-Token: $token" \
  "http://127.0.0.1:$port/lambda-url/_/orders/$id") || fail "curl failed"
echo "GET /lambda-url/_/orders/$id answered $status: $(cat "$work/url.json")"
[ "$status" = 200 ] || fail "expected 200 through the function URL"
grep -q '"status":"placed"' "$work/url.json" || fail "expected the placed order through the function URL"
