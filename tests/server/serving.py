"""What the server tests share: the server as users run it (a ``dami-jax serve`` process on
127.0.0.1 and a free port, the toy pair, the API key from the environment), and OpenAI's
published response schemas (``openai_schemas.json``, extracted from openai/openai-openapi, MIT:
the file says which commit). A test file takes the fixtures with ``from serving import pair, server``
(not a conftest.py: ``from conftest import`` elsewhere must find the suite's own); each file
starts its server once."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

import dami_jax as dj

HOST = "127.0.0.1"
KEY = "test-key"
START_TIMEOUT_S = 180
# The toy pair's whole context, given: picked from the host's free memory, a server's context would
# follow whatever else the host runs at that moment, and so would the tests that fill it.
MAX_LEN = 512
SCHEMAS = json.loads((Path(__file__).with_name("openai_schemas.json")).read_text())


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Server:
    """A ``dami-jax serve`` process; ``url`` once it has printed its ready line."""

    def __init__(self, *args: str, env: dict[str, str] | None = None):
        self.port = free_port()
        context = [] if "--max-len" in args else ["--max-len", str(MAX_LEN)]
        command = [sys.executable, "-m", "dami_jax.cli", "serve", "--host", HOST, "--port", str(self.port), *context, *args]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        env={**os.environ, **(env or {})})  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT_S
        self.ready = ""
        while time.monotonic() < deadline and self.process.poll() is None:
            line = self.process.stdout.readline()
            if "serving" in line:
                self.ready = line
                break
        assert self.ready, f"the server did not start: {self.process.stderr.read() if self.process.poll() is not None else 'timeout'}"
        self.url = f"http://{HOST}:{self.port}"

    def client(self, key: str = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=120)

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        found = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
        return float(found.group(1)) if found else 0.0

    def rss_bytes(self) -> int:
        """The server process's resident memory."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1)) * 1024

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=60)
        finally:
            if self.process.poll() is None:
                self.process.kill()


@pytest.fixture(scope="module")
def server():
    """The toy pair on 4 slots; its API key comes from DAMI_JAX_API_KEY."""
    running = Server("--slots", "4", "--steps-per-call", "1", env={"DAMI_JAX_API_KEY": KEY})
    yield running
    running.stop()


@pytest.fixture(scope="module")
def pair():
    return dj.load_toy_pair()


def _unless_null(check):
    """OpenAPI 3.0's ``nullable: true`` (which this 3.1 document still uses in places) admits null."""

    def validate(validator, value, instance, schema):
        if instance is None and schema.get("nullable"):
            return
        yield from check(validator, value, instance, schema)

    return validate


_Validator = jsonschema.validators.extend(
    Draft202012Validator, {key: _unless_null(Draft202012Validator.VALIDATORS[key]) for key in ("type", "enum", "$ref")}
)
_REGISTRY = Registry().with_resource("openai", Resource.from_contents(SCHEMAS, default_specification=DRAFT202012))


def assert_openai(body: Any, schema: str) -> None:
    """``body`` is valid under OpenAI's published ``schema`` (a name in components.schemas)."""
    _Validator({"$ref": f"openai#/components/schemas/{schema}"}, registry=_REGISTRY).validate(body)
