"""Feedback on detections: stored in PostgreSQL, the series' adjustment published to Redis.

PostgreSQL's ``feedback`` table is the source of truth. After each change the API recomputes
the series' adjustment from all of its rows with ``detector.feedback.adjustment`` (the rule
the NAB evaluation measures) and writes it to ``feedback:{<series_id>}``; workers re-read
that key at most every ``MODEL_REFRESH_SECONDS`` (``detector.state.adjustments``). A write
carries the newest revision it was computed from and is refused by Redis if an as new one is
stored, so concurrent feedback on one series never leaves an older adjustment in force.

A judgment keeps what the rule reads of the episode's opener, copied from ``anomalies`` when
it is given (retention deletes anomalies, not feedback): its test, its reading's timestamp
(``episode_ts``) and its ``base_score``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from detector.errors import (
    POSTGRES_ERRORS,
    REDIS_FAILURES,
    EpisodeNotFoundError,
    InvalidInputError,
    StoreUnavailableError,
)
from detector.feedback import Adjustment, Feedback, adjustment
from detector.identifiers import format_version
from detector.redis_keys import feedback_key
from detector.scripts import lua

# The episode's opener, as the live stream recorded it.
_EPISODE = """
SELECT series_id, model_version, test, ts, base_score FROM anomalies
WHERE episode_id = %s AND onset AND source = 'stream' AND (%s::text IS NULL OR series_id = %s)
ORDER BY id LIMIT 2
"""

# One judgment per episode: feedback on an episode already judged replaces its label.
_JUDGE = """
INSERT INTO feedback (series_id, episode_id, label, test, model_version, from_ts, to_ts, note,
    episode_ts, base_score)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (series_id, episode_id) WHERE episode_id IS NOT NULL DO UPDATE
SET label = EXCLUDED.label, note = EXCLUDED.note, updated_at = now(),
    revision = nextval('feedback_revision'), mlflow_logged_at = NULL, mlflow_attempts = 0,
    mlflow_next_try = now()
WHERE (feedback.label, feedback.note) IS DISTINCT FROM (EXCLUDED.label, EXCLUDED.note)
RETURNING id, true AS changed
"""

# One row per missed range: the same range again is the same feedback.
_MISSED = """
INSERT INTO feedback (series_id, label, model_version, from_ts, to_ts, note)
VALUES (%s, 'missed', %s, %s, %s, %s)
ON CONFLICT (series_id, from_ts, to_ts) WHERE episode_id IS NULL DO NOTHING
RETURNING id, true AS changed
"""

_EXISTING = """
SELECT id FROM feedback WHERE series_id = %s AND
    (CASE WHEN %s::text IS NULL THEN episode_id IS NULL AND from_ts = %s AND to_ts = %s
          ELSE episode_id = %s END)
"""

_LIST = """
SELECT id, series_id, episode_id, label, test, model_version, from_ts, to_ts, note,
    created_at, updated_at, revision, mlflow_logged_at, episode_ts, base_score
FROM feedback WHERE series_id = %s ORDER BY id
"""


@dataclass(frozen=True, slots=True)
class Episode:
    """The opener of an episode: what feedback on it is about."""

    series_id: str
    version: int
    test: str | None
    timestamp: int
    base_score: float | None = None  # None: recorded before base scores were


def _unavailable(exc: BaseException) -> StoreUnavailableError:
    return StoreUnavailableError("postgres", f"PostgreSQL is unavailable: {exc}")


async def find_episode(
    pool: AsyncConnectionPool, episode_id: str, series_id: str | None
) -> Episode:
    """The episode's opener; EpisodeNotFoundError (404) if none was recorded, and a 422 when
    several series have an episode of that id (streams of several shards) and none is named."""
    try:
        async with pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(_EPISODE, (episode_id, series_id, series_id))
            rows = await cur.fetchall()
    except POSTGRES_ERRORS as exc:
        raise _unavailable(exc) from exc
    if not rows:
        where = f" of series {series_id!r}" if series_id else ""
        raise EpisodeNotFoundError(f"no episode {episode_id!r}{where}")
    if len(rows) > 1:
        raise InvalidInputError(
            f"episode {episode_id!r} is an episode of several series: name one (series_id)"
        )
    row = rows[0]
    return Episode(
        row["series_id"], int(row["model_version"]), row["test"], int(row["ts"]), row["base_score"]
    )


async def record_feedback(
    pool: AsyncConnectionPool,
    *,
    series_id: str,
    label: str,
    episode: Episode | None = None,
    episode_id: str | None = None,
    version: int | None = None,
    from_ts: int | None = None,
    to_ts: int | None = None,
    note: str | None = None,
) -> tuple[int, bool]:
    """Store one piece of feedback; (its row id, whether it was new or changed). Repeating
    the same feedback changes nothing (same row, ``False``)."""
    try:
        async with pool.connection() as conn:
            if episode is not None:
                cur = await conn.execute(
                    _JUDGE,
                    (
                        series_id,
                        episode_id,
                        label,
                        episode.test,
                        episode.version,
                        None,
                        None,
                        note,
                        episode.timestamp,
                        episode.base_score,
                    ),
                )
            else:
                cur = await conn.execute(_MISSED, (series_id, version, from_ts, to_ts, note))
            row = await cur.fetchone()
            if row is not None:
                return int(row[0]), bool(row[1])
            cur = await conn.execute(_EXISTING, (series_id, episode_id, from_ts, to_ts, episode_id))
            found = await cur.fetchone()
            assert found is not None  # the conflicting row
            return int(found[0]), False
    except POSTGRES_ERRORS as exc:
        raise _unavailable(exc) from exc


async def list_feedback(pool: AsyncConnectionPool, series_id: str) -> list[dict[str, Any]]:
    """A series' feedback, oldest first (the order the rule reads it in)."""
    try:
        async with pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(_LIST, (series_id,))
            return await cur.fetchall()
    except POSTGRES_ERRORS as exc:
        raise _unavailable(exc) from exc


def as_feedback(row: dict[str, Any]) -> Feedback:
    """What the rule reads of a feedback row: an episode's judgment at its opener's time, a
    missed range at its end."""
    time = row.get("episode_ts") if row["episode_id"] is not None else row.get("to_ts")
    level = row.get("base_score")
    return Feedback(
        row["label"],
        row["test"],
        time=None if time is None else float(time),
        level=None if level is None else float(level),
    )


def series_adjustment(rows: list[dict[str, Any]]) -> tuple[Adjustment, int]:
    """The adjustment of a series' rows (``list_feedback``) and their newest revision."""
    found = adjustment(as_feedback(r) for r in rows)
    return found, max((int(r["revision"]) for r in rows), default=0)


async def publish_adjustment(redis: Redis, series_id: str, found: Adjustment, through: int) -> bool:
    """Write the adjustment for the workers, unless a newer one is stored: ``adjustment``
    (``Adjustment.to_dict`` as JSON, what workers read) and, for a reader of the hash, each
    test's multiple in force at the latest feedback's time."""
    fields: list[Any] = ["adjustment", orjson.dumps(found.to_dict())]
    for name, value in found.in_force().items():
        fields += [name, repr(value)]
    try:
        script = redis.register_script(lua("set_adjustment"))
        return bool(await script(keys=[feedback_key(series_id)], args=[through, *fields]))
    except REDIS_FAILURES as exc:
        raise StoreUnavailableError("redis", f"Redis is unavailable: {exc}") from exc


def public(row: dict[str, Any]) -> dict[str, Any]:
    """A feedback row as the API shows it."""
    return {
        "id": row["id"],
        "series_id": row["series_id"],
        "episode_id": row["episode_id"],
        "label": row["label"],
        "test": row["test"],
        "model_version": None
        if row["model_version"] is None
        else format_version(int(row["model_version"])),
        "from": row["from_ts"],
        "to": row["to_ts"],
        "note": row["note"],
        "episode_timestamp": row.get("episode_ts"),
        "base_score": row.get("base_score"),
        "created_at": row["created_at"].isoformat(),
        "updated_at": row["updated_at"].isoformat(),
        "mlflow_logged": row["mlflow_logged_at"] is not None,
    }
