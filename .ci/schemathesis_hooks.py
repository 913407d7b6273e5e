"""schemathesis hooks for .ci/schemathesis.sh: the failures that are not the service's.

Each rule below drops one kind of failure, recognised by the check that reported it, the
problem `type` the service answered and the request that caused it, and says why it is not
a defect. Anything else fails the run.
"""

from __future__ import annotations

import atexit
import json
import re
import sys
from collections import Counter
import urllib.request
from functools import lru_cache
from urllib.parse import urlsplit

import schemathesis

PROBLEM_TYPE_BASE = "https://example.invalid/problems/"

# Problems a schema-valid command can meet because of the state of the store or a rule
# across fields that JSON Schema cannot say. Each is documented as a response of the
# operation; `positive_data_acceptance` takes any 4xx but 404/409 as a rejected input.
STATE_DEPENDENT = {
    # `If-Match` names a sequence the order is not at: the header is well formed, the
    # order moved on (or never got there).
    "precondition-failed",
    # The `Idempotency-Key` was sent before with another request: schemathesis draws keys
    # such as "0" again and again for different bodies.
    "idempotency-key-reused",
    # A payment must be the order's total, which only the stored order knows.
    "wrong-payment-amount",
    # The lines' total must fit 64 bits: quantity times unit price, summed over the lines.
    "invalid-order-line",
}

# The request headers the service checks, by the slug of the problem that refuses them.
HEADER_PROBLEMS = {
    "invalid-if-match": "If-Match",
    "invalid-consistency-token": "Consistency-Token",
    "invalid-idempotency-key": "Idempotency-Key",
}


# How many failures each rule dropped, printed when the run ends.
DROPPED: Counter[str] = Counter()


@atexit.register
def _report_dropped() -> None:
    if DROPPED:
        rules = ", ".join(f"{rule}: {count}" for rule, count in sorted(DROPPED.items()))
        print(f"failures dropped by .ci/schemathesis_hooks.py: {rules}", file=sys.stderr)


def _drop(rule: str) -> bool:
    DROPPED[rule] += 1
    return False


def _problem_slug(response) -> str | None:
    try:
        body = json.loads(response.content)
    except (ValueError, TypeError):
        return None
    kind = body.get("type") if isinstance(body, dict) else None
    if isinstance(kind, str) and kind.startswith(PROBLEM_TYPE_BASE):
        return kind[len(PROBLEM_TYPE_BASE) :]
    return None


def _origin(response) -> str:
    url = urlsplit(response.request.url)
    return f"{url.scheme}://{url.netloc}"


@lru_cache(maxsize=None)
def _header_pattern(origin: str, path: str, method: str, header: str) -> str | None:
    """The `pattern` the served document gives `header` on the operation."""
    with urllib.request.urlopen(f"{origin}/openapi.json", timeout=10) as answer:
        document = json.load(answer)
    operation = document["paths"].get(path, {}).get(method.lower(), {})
    for parameter in operation.get("parameters", []):
        if parameter.get("in") == "header" and parameter.get("name", "").lower() == header.lower():
            return parameter.get("schema", {}).get("pattern")
    return None


def _store_head(origin: str) -> int | None:
    """The store's last position, as `GET /metrics` tells it now."""
    with urllib.request.urlopen(f"{origin}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    found = re.search(r"^cqrs_service_store_head_position (\d+)$", text, re.MULTILINE)
    return int(found.group(1)) if found else None


def _sent_header(case, name: str):
    for key, value in (case.headers or {}).items():
        if key.lower() == name.lower():
            return value
    return None


def _integral(value):
    """`value` with every float that has no fraction written as an integer."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**70:
        return int(value)
    if isinstance(value, dict):
        return {key: _integral(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_integral(item) for item in value]
    return value


# Integers are sent as integers. JSON Schema counts `2.0` as an integer, so schemathesis
# sends integer fields as floats half of the time; the service, like serde and most typed
# readers, takes an integer field only from a number written without a fraction, and
# answers 422. The rewrite keeps each case's meaning (the same number, valid or invalid
# alike) and lets its positive cases reach the commands. Fuzzing and the stateful phase
# build bodies through `map_body`, the coverage phase through `map_case`.
@schemathesis.hook
def map_body(context, body):
    return _integral(body)


@schemathesis.hook
def map_case(context, case):
    if isinstance(case.body, (dict, list)):
        case.body = _integral(case.body)
    return case


@schemathesis.hook
def filter_failure(context, failure, case, response) -> bool:
    slug = _problem_slug(response)
    status = response.status_code

    if failure.code == "ST202" and slug in STATE_DEPENDENT:
        return _drop(f"{slug} (state-dependent)")

    if failure.code == "ST202" and status == 400 and slug in HEADER_PROBLEMS:
        # schemathesis draws some headers from generators of its own that do not follow the
        # parameter's schema (for `If-Match` it sends an unquoted `0` as a valid value). A
        # header that does not match the document's pattern was not schema-valid: the 400
        # is the right answer.
        header = HEADER_PROBLEMS[slug]
        sent = _sent_header(case, header)
        pattern = _header_pattern(_origin(response), case.operation.path, case.method, header)
        if sent is not None and pattern is not None and not re.search(pattern, str(sent)):
            return _drop(f"{header} outside its pattern, sent as valid")

    if failure.code == "ST101" and status == 503 and slug == "view-behind":
        # A `Consistency-Token` past every event the store holds is not one a command
        # answered: schemathesis invents it (any digits fit the document). The service waits
        # for the view to get there and answers 503 `view-behind` with `Retry-After`, as the
        # document says. A token the store has reached must not be answered so: that stays
        # a failure.
        token = _sent_header(case, "Consistency-Token")
        head = _store_head(_origin(response))
        if token is not None and head is not None and int(str(token).strip()) > head:
            return _drop("Consistency-Token past the store's head")

    return True
