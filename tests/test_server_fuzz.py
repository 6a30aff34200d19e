"""Property-based fuzz of the server's OpenAPI schema (schemathesis, in-process ASGI): never a 5xx.

Bodies are drawn from the schema (valid and invalid: wrong types, out-of-range numbers, missing
fields); whatever arrives, the answer is a 2xx or a 4xx with an OpenAI error body, never a server
error. Bounded: a few dozen examples per operation on the tiny models.
"""

from __future__ import annotations

import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from helios_rl.server import create_app
from test_server import make_runtime

_state: dict = {}


@pytest.fixture(scope="module", autouse=True)
def running(tiny_text_dirs):
    threads = torch.get_num_threads()
    rt = make_runtime(dict(tiny_text_dirs), max_batch=4, max_queue=16, max_len=48)
    _state["app"] = app = create_app(rt)
    rt.start()
    yield app
    rt.stop()
    torch.set_num_threads(threads)


schema = schemathesis.pytest.from_fixture("fuzz_schema")


@pytest.fixture(scope="module")
def fuzz_schema(running):
    return schemathesis.openapi.from_asgi("/openapi.json", running)


@schema.parametrize()
@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_server_errors(case):
    response = case.call()
    case.validate_response(response, checks=[not_a_server_error])
    if response.status_code >= 400:
        err = response.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
