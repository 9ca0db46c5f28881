"""The OpenAPI fuzz loop both API fuzz tests run: every operation of the live schema, each generated request
sent without and with the token; no answer may be a 5xx."""

import httpx
import schemathesis
from hypothesis import HealthCheck, given, settings

HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


def schema_operation_count(base_url: str) -> int:
    """How many operations the served schema declares, /events left out (as fuzz_api leaves it out)."""
    paths = httpx.get(f"{base_url}/openapi.json", timeout=10).json()["paths"]
    return sum(1 for path, item in paths.items() if path != "/events" for method in item if method in HTTP_METHODS)


def fuzz_api(base_url: str, token: str, examples: int) -> tuple[list, list[int]]:
    """Fuzz the API at ``base_url`` (not the /events stream); returns (operations, status codes seen)."""
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json").exclude(path="/events")
    auth = {"Authorization": f"Bearer {token}"}
    operations = [r.ok() for r in schema.get_all_operations()]
    calls: list[int] = []
    for op in operations:
        @given(case=op.as_strategy())
        @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def fuzz(case):
            for headers in (None, auth):
                response = case.call(headers=headers, timeout=10)
                calls.append(response.status_code)
                assert response.status_code < 500, (case.method, case.formatted_path, response.status_code,
                                                    response.text[:300])

        fuzz()
    return operations, calls
