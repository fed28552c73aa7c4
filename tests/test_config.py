"""The one Config: read from PRIVRANK_* once, refusing bad values with the key named."""

from __future__ import annotations

import pytest

from features.errors import ConfigError
from server.config import Config


def test_defaults_are_valid() -> None:
    config = Config.from_env({})
    assert config.workers == 1
    assert config.concurrent_rpc_cap > config.max_active_rpcs + config.max_queued_rpcs
    raised = Config.from_env({"PRIVRANK_MAX_QUEUED_RPCS": "1000"})
    assert raised.concurrent_rpc_cap > raised.max_active_rpcs + raised.max_queued_rpcs


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"PRIVRANK_WORKERS": "0"}, "PRIVRANK_WORKERS"),
        ({"PRIVRANK_WORKERS": "two"}, "PRIVRANK_WORKERS"),
        ({"PRIVRANK_LISTEN": "nowhere"}, "PRIVRANK_LISTEN"),
        ({"PRIVRANK_MAX_CONCURRENT_RPCS": "-1"}, "PRIVRANK_MAX_CONCURRENT_RPCS"),
        ({"PRIVRANK_MAX_PENDING_RPCS": "-1"}, "PRIVRANK_MAX_PENDING_RPCS"),
        ({"PRIVRANK_GRPC_THREADS_NICE": "20"}, "PRIVRANK_GRPC_THREADS_NICE"),
        ({"PRIVRANK_GRPC_THREADS_NICE": "-1"}, "PRIVRANK_GRPC_THREADS_NICE"),
        (
            {"PRIVRANK_MAX_CONCURRENT_RPCS": "100", "PRIVRANK_MAX_QUEUED_RPCS": "92"},
            "must exceed",
        ),
    ],
)
def test_bad_values_fail_fast_naming_the_key(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Config.from_env(env)
