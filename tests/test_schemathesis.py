"""Property-based API testing: schemathesis generates requests from the OpenAPI schema and sends them in-process
(ASGI) with the admin's token; no answer may be a 500.

Bounded so CI stays fast: a few examples per operation, no shrinking, streams left out (they stay open while a
job runs). schemathesis's pytest plugin (``from_fixture``) does not run under pytest 9 here, so the operations
are walked in one test, each with its own hypothesis run; failures are collected and reported together.
"""

from typing import Any

import schemathesis
from hypothesis import HealthCheck, Phase, given, settings

from tests.conftest import ADMIN_TOKEN

EXAMPLES_PER_OPERATION = 4
HEADERS = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def test_no_request_gets_a_500(client: Any) -> None:
    # given: the studio's schema, served by the in-process app (migrated, admin bootstrapped)
    schema = schemathesis.openapi.from_asgi("/openapi.json", client.app)
    # Left out: streams (open until their job ends), and revoking tokens (it would revoke the test's own).
    schema = schema.exclude(path_regex=r".*/stream$").exclude(method="DELETE", path_regex=r"^/api/v1/tokens/")
    failures: list[str] = []
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        def call(case: Any) -> None:
            # when: a generated request is sent with a valid token
            try:
                response = case.call(headers=HEADERS)
            except Exception as exc:  # the in-process transport re-raises what the app did not handle
                failures.append(f"{case.method} {case.formatted_path}: {type(exc).__name__}: {exc}")
                return
            # then: never a 500 (4xx for bad input; 503 is the studio's own "queue unreachable")
            if response.status_code == 500:
                failures.append(f"{case.method} {case.formatted_path}: {response.text[:300]}")

        call()
    assert operations > 30
    assert not failures, "\n".join(failures)
