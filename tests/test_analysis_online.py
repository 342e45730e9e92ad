"""The online loader against a small fake of wandb's public API (no W&B server is reachable).

The fake (in tests/analysis_records.py) pages like ``wandb.Api().runs``: a lazy iterable that
fetches ``per_page`` runs per request, and can answer a request with HTTP 429.
"""

from __future__ import annotations

import pandas as pd
import pytest

from analysis.load import load, runs_frame
from analysis.online import (fetch_records, is_rate_limited, load_online, online_record,
                             server_filters)
from tests.analysis_records import RECORDS, FakeApi, FakeHTTPError, FakeRun


class FakeCommError(Exception):
    """Shaped like wandb.errors.CommError: the HTTP error is on .exc."""

    def __init__(self, exc: Exception):
        super().__init__("could not reach the server")
        self.exc = exc


def fake_runs():
    return [FakeRun(rec) for rec in RECORDS]


def test_server_filters():
    assert server_filters() == {}
    assert server_filters("demo", ["a", "b"], "finished") == {
        "group": "demo", "tags": {"$in": ["a", "b"]}, "state": "finished"}
    assert server_filters(tags="a") == {"tags": {"$in": ["a"]}}


def test_online_frame_equals_result_json_frame():
    api = FakeApi(fake_runs())
    df = load_online("team/kd", group="demo", tags=["kd"], state="finished", api=api,
                     per_page=2)
    pd.testing.assert_frame_equal(df, runs_frame(RECORDS))
    assert api.calls == [("team/kd", {"group": "demo", "tags": {"$in": ["kd"]},
                                      "state": "finished"}, 2)]
    assert api.requests == 3  # 5 runs, 2 per page
    record = online_record(api.all_runs[0])
    assert "_wandb" not in record["config"] and record["summary"]["_runtime"] == 12.5


def test_retries_429_mid_paging_without_losing_or_repeating_runs():
    waits = []
    api = FakeApi(fake_runs(), fail_at=[2, 4])  # page 2, then page 2 again after the restart
    records = fetch_records(api, "team/kd", {}, per_page=2, sleep=waits.append)
    assert sorted(r["run_id"] for r in records) == sorted(r["run_id"] for r in RECORDS)
    assert waits == [2.0, 4.0]  # exponential: nothing new arrived between the two limits
    assert len(api.calls) == 3 and all(call == ("team/kd", {}, 2) for call in api.calls)


def test_wait_resets_once_progress_is_made():
    waits = []
    api = FakeApi(fake_runs(), fail_at=[2, 5])  # 2nd attempt reads pages 1-2, fails on page 3
    fetch_records(api, "p/q", {}, per_page=2, sleep=waits.append)
    assert waits == [2.0, 2.0]


def test_gives_up_after_max_retries():
    waits = []
    api = FakeApi(fake_runs(), fail_at=range(1, 100))
    with pytest.raises(FakeHTTPError):
        fetch_records(api, "p/q", {}, max_retries=3, sleep=waits.append)
    assert waits == [2.0, 4.0, 8.0]


def test_asks_for_full_runs_where_the_api_can_be_lazy():
    """wandb's runs(lazy=True) would fetch each run's config and summary separately."""
    class LazyApi(FakeApi):
        def runs(self, path, filters=None, order="+created_at", per_page=50, lazy=True):
            self.lazy = lazy
            return super().runs(path, filters=filters, per_page=per_page)

    api = LazyApi(fake_runs())
    assert len(load_online("p/q", api=api)) == len(RECORDS) and api.lazy is False


def test_other_errors_are_not_retried():
    waits = []
    api = FakeApi(fake_runs(), fail_at=[1], error=lambda: FakeHTTPError(403))
    with pytest.raises(FakeHTTPError, match="403"):
        fetch_records(api, "p/q", {}, sleep=waits.append)
    assert waits == []


def test_rate_limit_detection():
    assert is_rate_limited(FakeHTTPError(429))
    assert is_rate_limited(FakeCommError(FakeHTTPError(429)))  # wandb wraps requests' error
    assert is_rate_limited(RuntimeError("HTTP 429: Too Many Requests"))
    try:
        try:
            raise FakeHTTPError(429)
        except FakeHTTPError as inner:
            raise RuntimeError("query failed") from inner
    except RuntimeError as outer:
        assert is_rate_limited(outer)
    assert not is_rate_limited(FakeHTTPError(500))
    assert not is_rate_limited(RuntimeError("run 14290 not found"))


def test_load_dispatches_entity_project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no local folder named like the entity
    api = FakeApi(fake_runs())
    pd.testing.assert_frame_equal(load("team/kd:demo", api=api), runs_frame(RECORDS))
    load("team/kd", group="demo", tags=["kd"], api=api)
    assert [call[1] for call in api.calls] == [
        {"group": "demo"}, {"group": "demo", "tags": {"$in": ["kd"]}}]
    with pytest.raises(ValueError, match="give one"):
        load("team/kd:demo", group="other", api=api)
