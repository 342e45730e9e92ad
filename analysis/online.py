"""Runs of an online W&B project, read through the public API (``wandb.Api``).

Each run is joined from its config and its summary only: the final values a
run recorded. ``run.history()`` is never read; it is sampled (500 points by
default) and one request per run, so it would be both slower and less exact.
"""

from __future__ import annotations

import inspect
import logging
import re
import time
from typing import Any, Callable, Iterable

import pandas as pd

from analysis.frame import runs_frame, wandb_status

log = logging.getLogger(__name__)

# Runs per page. wandb's default is 50; a page of config + summary of a few
# hundred keys each is small, so fewer, larger pages mean fewer requests,
# while staying well below sizes that make the server's query slow.
DEFAULT_PER_PAGE = 100
# Consecutive rate-limited attempts before giving up; with BASE_DELAY_S the
# waits are 2, 4, ..., 64 s (two minutes in all), longer than W&B's
# one-minute rate-limit window.
MAX_RETRIES = 6
BASE_DELAY_S = 2.0
# job_type of a sweep's summary run (as analysis.wandb_offline.SUMMARY_JOB_TYPE; not imported
# from there, which loads wandb's protobufs).
SUMMARY_JOB_TYPE = "summary"
# What a 429 says when the status code itself did not survive the wrapping.
_RATE_LIMIT_TEXT = re.compile(r"\b429\b|too many requests|rate[- ]limit", re.IGNORECASE)


def server_filters(group: str | None = None, tags: str | Iterable[str] | None = None,
                   state: str | None = None) -> dict:
    """W&B's MongoDB-style run filters; the server applies them, so only matches travel."""
    filters: dict[str, Any] = {}
    if group:
        filters["group"] = group
    if tags:
        filters["tags"] = {"$in": [tags] if isinstance(tags, str) else list(tags)}
    if state:
        filters["state"] = state
    return filters


def _status_code(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    code = getattr(response, "status_code", None) or getattr(exc, "status_code", None)
    return code if isinstance(code, int) else None


def is_rate_limited(exc: BaseException) -> bool:
    """Whether exc (or what it wraps) is an HTTP 429 from the server.

    wandb wraps the requests error in its own CommError (``.exc``), so the
    chain of causes is searched for a response status, then for the message.
    """
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        err = todo.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        if _status_code(err) == 429:
            return True
        if _RATE_LIMIT_TEXT.search(str(err)):
            return True
        todo += [getattr(err, "exc", None), err.__cause__, err.__context__]
    return False


def _plain(value: Any) -> Any:
    """A summary (wandb's dict-like SummarySubDict, nested) as plain dicts."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "items"):
        return value
    return {str(key): _plain(item) for key, item in value.items()}


def online_record(run) -> dict:
    """A public-API run as a result.json-shaped record (same shape as offline runs)."""
    summary = _plain(run.summary) or {}
    # result.json keeps the error outside the summary; the W&B run carries it inside.
    error = summary.pop("error", None)
    config = {key: value for key, value in (_plain(run.config) or {}).items()
              if not key.startswith("_")}  # _wandb: wandb's own bookkeeping
    # W&B id = <point id>-<sweep> (kd_sweeps.wandb_naming.wandb_run_id); result.json keeps the point id.
    return {"run_id": run.id.split("-", 1)[0], "sweep": run.group, "status": wandb_status(run.state),
            "error": error, "config": config, "summary": summary}


def _query(api, path: str, filters: dict, per_page: int):
    kwargs: dict[str, Any] = {"filters": filters, "per_page": per_page}
    try:
        # lazy=False: configs and summaries arrive with each page; lazy runs
        # would fetch them with one more request per run.
        if "lazy" in inspect.signature(api.runs).parameters:
            kwargs["lazy"] = False
    except (TypeError, ValueError):  # no signature to inspect: call it plainly
        pass
    return api.runs(path, **kwargs)


def fetch_records(api, path: str, filters: dict, per_page: int = DEFAULT_PER_PAGE,
                  max_retries: int = MAX_RETRIES, base_delay_s: float = BASE_DELAY_S,
                  sleep: Callable[[float], None] = time.sleep) -> list[dict]:
    """Every matching run's record, paging through and backing off on HTTP 429.

    A rate limit can strike in the middle of paging; the query then starts
    over after a wait (2, 4, 8 ... s) and runs already read are skipped by
    id, so none is lost or counted twice. The wait resets once an attempt
    brings new runs; after max_retries fruitless ones the error is raised.
    """
    records: dict[str, dict] = {}
    failures = 0
    while True:
        before = len(records)
        try:
            for run in _query(api, path, filters, per_page):
                # A sweep's summary run (job_type summary) holds its table, not a grid point.
                if run.id not in records and getattr(run, "job_type", None) != SUMMARY_JOB_TYPE:
                    records[run.id] = online_record(run)  # may itself hit the API
            return list(records.values())
        except Exception as exc:
            if not is_rate_limited(exc):
                raise
            failures = 1 if len(records) > before else failures + 1
            if failures > max_retries:
                raise
            delay = base_delay_s * 2 ** (failures - 1)
            log.warning("W&B rate limit after %d runs of %s; retrying in %.0f s",
                        len(records), path, delay)
            sleep(delay)


def load_online(path: str, group: str | None = None, tags: str | Iterable[str] | None = None,
                state: str | None = None, api=None, per_page: int = DEFAULT_PER_PAGE,
                **retry) -> pd.DataFrame:
    """Frame of the runs of W&B project ``entity/project``, filtered on the server.

    ``api`` defaults to ``wandb.Api()`` (which needs a login); pass any object
    with the same ``runs(path, filters=..., per_page=...)`` method. ``retry``
    goes to ``fetch_records`` (max_retries, base_delay_s, sleep).
    """
    if api is None:
        import wandb  # here: loading local runs never needs wandb's API client

        api = wandb.Api(timeout=60)  # s; the default 19 s is short for large pages
    records = fetch_records(api, path, server_filters(group, tags, state), per_page, **retry)
    log.info("read %d runs from W&B project %s", len(records), path)
    return runs_frame(records)
