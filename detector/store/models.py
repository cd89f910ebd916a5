"""The versioned model store: PostgreSQL holds the truth, Redis the hot copy, RAM the cache.

Layout in Redis: one hash per series (``detector.redis_keys.model_key``) with a field per
version number (the model, ``detector.store.codec``) and a ``latest`` field.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import psycopg
import redis.exceptions
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from detector.errors import (
    POSTGRES_ERRORS,
    REDIS_FAILURES,
    ModelNotFoundError,
    StoreRefusedError,
    StoreUnavailableError,
    TrainingDataDeletedError,
    describe_redis_error,
    redis_unavailable,
)
from detector.identifiers import format_version
from detector.kinds.static import StaticModel
from detector.kinds.training import TrainingData
from detector.redis_keys import model_key, write_probe_key
from detector.store.caches import PointerCache, VersionCache
from detector.store.codec import ModelVersion, parse_arrays, parse_points
from detector.store.connections import is_cluster
from detector.store.fields import FieldReads
from detector.store.fit_jobs import create_job, finish_job
from detector.store.fit_rows import NewFit, allocate_versions, version_exists, write_fits
from detector.store.publish import PutOutcome, VersionPublisher
from detector.store.replication import ReplicaWait

log = logging.getLogger(__name__)

T = TypeVar("T")


# Kind-specific parameters (a multiscale initial state is ~1 KB) kept in process.
_PARAMS_CACHE = 10_000

# A version's MLflow run: its own, or for a bulk fit's version its job's (``fit_jobs``).
_VERSIONS = (
    "SELECT m.series_id, m.version, m.kind, m.mean, m.std, m.sigma, m.direction, m.points_used,"
    " m.created_at, coalesce(m.mlflow_run_id, j.mlflow_run_id) AS mlflow_run_id"
    " FROM model_versions m LEFT JOIN fit_jobs j ON j.id = m.fit_job"
)


class ModelStore:
    """Fit storage and model lookup, used alike by the API and the stream worker."""

    def __init__(
        self,
        redis_client: Redis,
        pool: AsyncConnectionPool,
        *,
        cache_size: int = 200_000,
        replica_wait: ReplicaWait | None = None,
    ):
        self.redis = redis_client
        self.pool = pool
        self.cache = VersionCache(cache_size)
        # Optional: latest pointers cached in process, invalidated by Redis key tracking.
        self.pointers: PointerCache | None = None
        # With a replica wait (REDIS_WAIT_REPLICAS) a fit is done once replicas have it too.
        self.publisher = VersionPublisher(redis_client, replica_wait)
        self._read_fields = FieldReads(redis_client)
        # Set by a PostgreSQL failure, cleared by a successful probe (see ``_postgres_gate``).
        self._postgres_down = False
        self._params: OrderedDict[tuple[str, int], dict[str, Any]] = OrderedDict()

    # ------------------------------------------------------------------ writing

    async def save_fit(
        self,
        series_id: str,
        data: TrainingData,
        model: StaticModel,
        params: dict[str, Any] | None = None,
    ) -> ModelVersion:
        """Store a new version durably, then make it the latest in Redis (``save_fits``)."""
        (stored,) = await self.save_fits([NewFit(series_id, data, model, params or {})])
        return stored

    async def save_fits(
        self,
        fits: Sequence[NewFit],
        *,
        job: int | None = None,
        cache: bool = True,
        versions: Sequence[int] | None = None,
    ) -> list[ModelVersion]:
        """Store new versions of distinct series durably, all or none, then make each the
        latest in Redis. One fit is a batch of one; a bulk fit's batches (``detector.bulk_fit``)
        name their ``job``, leave the in-process cache (``cache``) to the predictions, and
        store a refused batch's halves again under the ``versions`` allocated for it (numbers
        no other fit can hold: allocated, never committed).

        Order: allocate the version numbers in their own committed statement (a fit that fails
        later leaves a gap, never a number handed out twice); insert the versions, their points
        and their MLflow record in one transaction and commit; only then put them into Redis.
        So Redis, and every cache fed from it, only ever sees committed versions. A Redis
        failure after the commit does not fail the fits: they are stored, and the publisher
        puts them into Redis again until Redis confirms them. Unless the fits must be on
        replicas (REDIS_WAIT_REPLICAS): then a put Redis did not confirm on enough of them
        fails the fits with StoreUnavailableError (a 503) naming the versions stored, since a
        failover before the publisher's retry succeeds could take the series back to their
        previous version in Redis.
        """
        if not fits:
            return []
        consequence = (
            "the fit was not stored" if len(fits) == 1 else f"the {len(fits)} fits were not stored"
        )
        version = 0
        # Refuse while Redis cannot take writes (down, out of memory, a read-only replica …):
        # the versions could only be owed to Redis, and were this process to stop before Redis
        # returned, Redis would come back with the old `latest`. The probe is a short-lived
        # key in a series' own slot: one for a batch on one Redis, which serves every slot;
        # one a series on a cluster (pipelined, so each master serving the batch is asked). A
        # failure past this point is rare and repaired in the background (``VersionPublisher``).
        try:
            if len(fits) > 1 and is_cluster(self.redis):
                async with self.redis.pipeline(transaction=False) as pipe:
                    for fit in fits:
                        pipe.set(write_probe_key(fit.series_id), "1", px=10_000)
                    await pipe.execute()
            else:
                await self.redis.set(write_probe_key(fits[0].series_id), "1", px=10_000)
        except REDIS_FAILURES as exc:
            if not redis_unavailable(exc):
                raise
            raise StoreUnavailableError(
                "redis", f"Redis is unavailable, {consequence}: {describe_redis_error(exc)}"
            ) from exc
        try:
            await self._postgres_gate(consequence)
            async with self.pool.connection() as conn:
                if versions is None:
                    versions = await allocate_versions(conn, [fit.series_id for fit in fits])
                version = versions[0]
                committing = False
                try:
                    async with conn.transaction():
                        created_at = await write_fits(conn, fits, versions, job=job)
                        committing = True
                except psycopg.OperationalError:
                    # All or none were committed: the first version tells which.
                    if not (
                        committing and await self._committed_after_all(fits[0].series_id, version)
                    ):
                        raise
        except POSTGRES_ERRORS as exc:
            self._postgres_down = True
            raise StoreUnavailableError(
                "postgres", f"PostgreSQL is unavailable, {consequence}: {_brief(exc)}"
            ) from exc
        except psycopg.Error as exc:  # the commit refused (a constraint, a trigger …)
            log.error(
                "fit of %s %s%s rolled back: %s",
                fits[0].series_id,
                format_version(version),
                f" and {len(fits) - 1} more series" if len(fits) > 1 else "",
                exc,
            )
            refused = (
                "the fit, it was not stored"
                if len(fits) == 1
                else f"the {len(fits)} fits, none was stored"
            )
            raise StoreRefusedError(
                "postgres", f"PostgreSQL refused {refused}: {_brief(exc)}", list(versions or ())
            ) from exc
        stored = [
            ModelVersion(
                series_id=fit.series_id,
                version=version,
                model=fit.model,
                points_used=len(fit.data),
                created_at=created_at,
            )
            for fit, version in zip(fits, versions, strict=True)
        ]
        if cache:
            for found in stored:
                self.cache.put((found.series_id, found.version), found)
        put = await self.publisher.put_many(stored, make_latest=True)
        if put.unconfirmed and self.publisher.wait is not None:
            raise StoreUnavailableError("redis", _not_on_replicas(stored, put))
        return stored

    async def start_fit_job(self, *, source: str, kind: str, sigma: float, direction: str) -> int:
        """A new bulk fit job (``detector.store.fit_jobs``): its id, for ``save_fits``."""

        async def query() -> int:
            async with self.pool.connection() as conn:
                return await create_job(
                    conn, source=source, kind=kind, sigma=sigma, direction=direction
                )

        return await self._pg(query)

    async def finish_fit_job(
        self,
        job: int,
        *,
        failed: bool,
        refused: int,
        refusals: list[dict[str, str]],
        seconds: float,
    ) -> None:
        async def query() -> None:
            async with self.pool.connection() as conn:
                await finish_job(
                    conn, job, failed=failed, refused=refused, refusals=refusals, seconds=seconds
                )

        await self._pg(query)

    async def _committed_after_all(self, series_id: str, version: int) -> bool:
        """After the connection failed during COMMIT the outcome is unknown: ask again."""
        try:
            async with self.pool.connection(timeout=3.0) as conn:
                return await version_exists(conn, series_id, version)
        except POSTGRES_ERRORS:
            return False  # cannot tell: answered as not stored

    # ------------------------------------------------------------------ reading

    async def get(self, series_id: str, version: int | None = None) -> ModelVersion:
        """The model of ``version`` (None: the latest), or ModelNotFoundError."""
        if version is None:
            version = await self.latest_version(series_id)
        cached = self.cache.get((series_id, version))
        if cached is not None:
            return cached
        found = await self._load_version(series_id, version)
        self.cache.put((series_id, version), found)
        return found

    async def latest_version(self, series_id: str) -> int:
        """The newest version number: from the tracked in-process cache when one is attached
        (see ``api.pointer_cache``), else from Redis; falling back to PostgreSQL and
        repairing Redis when the pointer is gone."""
        pointers, generation = self.pointers, 0
        if pointers is not None:
            cached = pointers.get(series_id)
            if cached is not None:
                return cached
            generation = pointers.generation
        try:
            raw = await self.redis.hget(model_key(series_id), "latest")
        except REDIS_FAILURES as exc:
            if not redis_unavailable(exc):
                raise
            raw = None
            redis_up = False
        else:
            redis_up = True
        if raw is not None:
            if pointers is not None:
                pointers.put(series_id, int(raw), generation)
            return int(raw)
        row = await self._pg_fetchone(
            "SELECT last_version FROM series WHERE series_id = %s", (series_id,)
        )
        if row is None:
            raise ModelNotFoundError(f"no model for series '{series_id}'")
        version = int(row["last_version"])
        if redis_up:
            found = await self._load_version(series_id, version, from_redis=False)
            await self._repair(found, make_latest=True)
        return version

    async def prefetch(self, keys: Sequence[tuple[str, int]]) -> None:
        """Load the (series, version)s of ``keys`` not cached from Redis into the cache, in one
        script call (``read_models.lua``): a batch of series new to the process costs one round
        trip, not one each. Those Redis lacks, or all when it fails, are left to ``get``
        (PostgreSQL, repair). For the stream's batches (``FieldReads``: one script call, or
        on Redis Cluster one pipeline split by master)."""
        wanted = [key for key in dict.fromkeys(keys) if self.cache.get(key) is None]
        if not wanted:
            return
        try:
            replies = await self._read_fields(
                [model_key(s) for s, _ in wanted], [str(v) for _, v in wanted]
            )
        except REDIS_FAILURES as exc:
            if not redis_unavailable(exc):
                raise
            return
        for (series_id, version), raw in zip(wanted, replies, strict=True):
            if raw is not None:
                found = ModelVersion.from_redis(series_id, version, str(raw))
                self.cache.put((series_id, version), found)

    async def _load_version(
        self, series_id: str, version: int, *, from_redis: bool = True
    ) -> ModelVersion:
        if from_redis:
            try:
                raw = await self.redis.hget(model_key(series_id), str(version))
            except REDIS_FAILURES as exc:
                if not redis_unavailable(exc):
                    raise
                raw, from_redis = None, False
            if raw is not None:
                return ModelVersion.from_redis(series_id, version, str(raw))
        row = await self._pg_fetchone(
            f"{_VERSIONS} WHERE m.series_id = %s AND m.version = %s",
            (series_id, version),
        )
        if row is None:
            raise ModelNotFoundError(
                f"no version {format_version(version)} for series '{series_id}'"
            )
        found = ModelVersion.from_row(row)
        if from_redis:  # Redis is up but had lost it: put it back.
            await self._repair(found, make_latest=False)
        return found

    async def _repair(self, found: ModelVersion, *, make_latest: bool) -> None:
        if await self.publisher.put(found, make_latest=make_latest):
            log.info("reloaded %s %s into Redis from PostgreSQL", found.series_id, found.name)

    async def versions(self, series_id: str) -> list[ModelVersion]:
        """Every version of a series, oldest first (from PostgreSQL)."""
        rows = await self._pg_fetchall(
            f"{_VERSIONS} WHERE m.series_id = %s ORDER BY m.version",
            (series_id,),
        )
        if not rows:
            raise ModelNotFoundError(f"no model for series '{series_id}'")
        return [ModelVersion.from_row(r) for r in rows]

    async def list_series(self, *, limit: int, after: str | None) -> list[tuple[str, int, str]]:
        """(series_id, latest version, its kind) ordered by id, after ``after`` (keyset
        paging)."""
        rows = await self._pg_fetchall(
            "SELECT s.series_id, s.last_version, coalesce(m.kind, 'static') AS kind "
            "FROM series s LEFT JOIN model_versions m "
            "ON m.series_id = s.series_id AND m.version = s.last_version "
            "WHERE s.series_id > %s ORDER BY s.series_id LIMIT %s",
            (after or "", limit),
        )
        return [(r["series_id"], int(r["last_version"]), str(r["kind"])) for r in rows]

    async def params(self, series_id: str, version: int) -> dict[str, Any]:
        """A version's kind-specific parameters (``model_versions.params``: for the multiscale
        kind its detector parameters and initial state), cached: versions never change."""
        key = (series_id, version)
        found = self._params.get(key)
        if found is not None:
            self._params.move_to_end(key)
            return found
        row = await self._pg_fetchone(
            "SELECT params FROM model_versions WHERE series_id = %s AND version = %s",
            (series_id, version),
        )
        if row is None:
            raise ModelNotFoundError(
                f"no version {format_version(version)} for series '{series_id}'"
            )
        found = dict(row["params"] or {})
        self._params[key] = found
        while len(self._params) > _PARAMS_CACHE:
            self._params.popitem(last=False)
        return found

    async def prefetch_params(self, keys: Sequence[tuple[str, int]]) -> None:
        """Load the ``params`` of many versions into the cache in one query (a refit of many
        series, a worker's first batch), so that ``params`` answers them without a round trip
        each; versions not found are left for ``params`` to report."""
        missing = sorted({key for key in keys if key not in self._params})
        for start in range(0, len(missing), _PARAMS_CACHE // 2):
            chunk = missing[start : start + _PARAMS_CACHE // 2]
            rows = await self._pg_fetchall(
                "SELECT m.series_id, m.version, m.params FROM model_versions m"
                " JOIN unnest(%s::text[], %s::int[]) AS k(series_id, version)"
                " ON m.series_id = k.series_id AND m.version = k.version",
                ([s for s, _ in chunk], [v for _, v in chunk]),
            )
            for row in rows:
                self._params[(row["series_id"], int(row["version"]))] = dict(row["params"] or {})
        while len(self._params) > _PARAMS_CACHE:
            self._params.popitem(last=False)

    async def training_data(self, series_id: str, version: int) -> TrainingData:
        """The stored training points of a version, sorted by timestamp."""

        async def query() -> TrainingData:
            async with self.pool.connection() as conn:
                cur = await conn.execute(
                    "SELECT id, points_used, points_deleted_at FROM model_versions"
                    " WHERE series_id = %s AND version = %s",
                    (series_id, version),
                )
                row = await cur.fetchone()
                if row is None:
                    raise ModelNotFoundError(
                        f"no version {format_version(version)} for series '{series_id}'"
                    )
                if row[2] is not None:
                    raise _points_deleted(series_id, version)
                arrays = await _copy_out(
                    conn,
                    "COPY (SELECT ts, value FROM training_arrays WHERE model_id = %s)"
                    " TO STDOUT (FORMAT BINARY)",
                    row[0],
                )
                found = parse_arrays(arrays)
                if found is None:  # stored before training_arrays: a row a point
                    rows = await _copy_out(
                        conn,
                        "COPY (SELECT ts, value FROM training_points WHERE model_id = %s"
                        " ORDER BY ts) TO STDOUT (FORMAT BINARY)",
                        row[0],
                    )
                    found = parse_points(rows)
            data = found
            if len(data) < int(row[1]):  # retention is deleting them right now
                raise _points_deleted(series_id, version)
            return data

        return await self._pg(query)

    async def count_series(self) -> int:
        row = await self._pg_fetchone("SELECT count(*) AS n FROM series", ())
        assert row is not None
        return int(row["n"])

    async def count_versions(self) -> int:
        row = await self._pg_fetchone("SELECT count(*) AS n FROM model_versions", ())
        assert row is not None
        return int(row["n"])

    # ------------------------------------------------------------------ health

    async def ping_redis(self) -> str | None:
        """None when Redis answers (on a cluster: every master), else why not."""
        try:
            if is_cluster(self.redis):
                await self.redis.execute_command(  # type: ignore[no-untyped-call]
                    "PING", target_nodes="primaries"
                )
            else:
                await self.redis.ping()
        except (*REDIS_FAILURES, redis.exceptions.RedisError) as exc:
            return _brief(exc)
        return None

    async def ping_postgres(self) -> str | None:
        try:
            async with self.pool.connection(timeout=3.0) as conn:
                await conn.execute("SELECT 1")
        except (*POSTGRES_ERRORS, psycopg.Error) as exc:
            return _brief(exc)
        return None

    # ------------------------------------------------------------------ plumbing

    async def _postgres_gate(self, consequence: str) -> None:
        """Fail fast while PostgreSQL is known to be down; a no-op on the healthy path.

        After a PostgreSQL failure, each request first tries a direct connection, which is
        refused at once while the server is down: a 503 in milliseconds instead of waiting
        the pool's 5 s for a connection that cannot come. Once the probe connects, the pool
        drops the connections the outage broke (``check``), so the next request does not get
        a dead one, and requests go through the pool again.
        """
        if not self._postgres_down:
            return
        conninfo, kwargs = self.pool.conninfo, self.pool.kwargs
        if not isinstance(conninfo, str) or not isinstance(kwargs, dict):
            return  # configured by callables (not ours): let the pool find out
        try:
            probe = await psycopg.AsyncConnection.connect(
                conninfo, **{**kwargs, "connect_timeout": 2}
            )
        except psycopg.OperationalError as exc:
            raise StoreUnavailableError(
                "postgres", f"PostgreSQL is unavailable, {consequence}: {_brief(exc)}"
            ) from exc
        await probe.close()
        self._postgres_down = False
        await self.pool.check()

    async def _pg(self, query: Callable[[], Awaitable[T]]) -> T:
        try:
            await self._postgres_gate("try again later")
            return await query()
        except POSTGRES_ERRORS as exc:
            self._postgres_down = True
            raise StoreUnavailableError(
                "postgres", f"PostgreSQL is unavailable: {_brief(exc)}"
            ) from exc

    async def _pg_fetchone(self, sql: str, params: tuple[Any, ...]) -> dict[str, Any] | None:
        async def query() -> dict[str, Any] | None:
            async with self.pool.connection() as conn:
                cur = conn.cursor(row_factory=dict_row)
                await cur.execute(sql, params)
                return await cur.fetchone()

        return await self._pg(query)

    async def _pg_fetchall(self, sql: str, params: tuple[Any, ...]) -> list[dict[str, Any]]:
        async def query() -> list[dict[str, Any]]:
            async with self.pool.connection() as conn:
                cur = conn.cursor(row_factory=dict_row)
                await cur.execute(sql, params)
                return await cur.fetchall()

        return await self._pg(query)


async def _copy_out(conn: psycopg.AsyncConnection[Any], sql: str, model_id: int) -> bytes:
    buffer = bytearray()
    async with conn.cursor().copy(sql, (model_id,)) as copy:
        async for chunk in copy:
            buffer += chunk
    return bytes(buffer)


def _points_deleted(series_id: str, version: int) -> TrainingDataDeletedError:
    return TrainingDataDeletedError(
        f"the training points of {format_version(version)} of series '{series_id}' were deleted"
        " by retention (RETENTION_TRAINING_VERSIONS keeps the points of each series' newest"
        " versions); the version itself is still listed and served"
    )


def _brief(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _not_on_replicas(stored: Sequence[ModelVersion], put: PutOutcome) -> str:
    """Why fits PostgreSQL committed are answered 503: Redis did not confirm them on enough
    replicas (``save_fits``)."""
    first = stored[0]
    if len(stored) == 1:
        what, them, are = f"the fit was stored as {first.name} of '{first.series_id}'", "it", "is"
    else:
        what = (
            f"the {len(stored)} fits were stored ({first.series_id} {first.name} and"
            f" {len(stored) - 1} more)"
        )
        them, are = f"{put.unconfirmed} of them", "are"
    cause = describe_redis_error(put.cause) if put.cause is not None else "no answer"
    return (
        f"{what} in PostgreSQL, but Redis did not confirm {them} on replicas"
        f" (REDIS_WAIT_REPLICAS): {cause}. Until a replica has {them}, a failover could leave"
        f" predictions on the previous version; {them} {are} put into Redis again in the"
        " background. Fitting again makes another version: GET /models/{series_id} lists"
        " the stored ones"
    )
