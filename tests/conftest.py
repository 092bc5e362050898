"""Shared fixtures: a real S3 server process (moto) on loopback and a bucket in it.

The helpers that test files import (tiny specs, checkpoints, the server class) are in
helpers.py. A test that uses the server is an integration test: it must carry the
`integration` mark, which `make test-fast` (`-m "not integration"`) leaves out, so that the
fast lane never starts moto. Collection fails, naming the test, where the mark is missing.
"""

from __future__ import annotations

import os

import pytest
from helpers import S3Server

os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")

S3_FIXTURES = ("s3_server", "s3_bucket")


def pytest_collection_modifyitems(config, items):
    unmarked = [
        item.nodeid
        for item in items
        if any(f in item.fixturenames for f in S3_FIXTURES) and item.get_closest_marker("integration") is None
    ]
    if unmarked:
        raise pytest.UsageError(
            "these tests start the S3 server (moto) but are not marked integration: " + ", ".join(unmarked)
        )


@pytest.fixture(scope="session")
def s3_server():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        server = S3Server()
        server.start()
        yield server
        server.stop()


@pytest.fixture
def s3_bucket(s3_server) -> str:
    return s3_server.new_bucket()
