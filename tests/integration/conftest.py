"""Servers the integration tests own: started once per session, stopped at the end.

Each server has a handle fixture (to stop and restart it inside a test) and an address
fixture. Tests that stop a server start it again before they finish.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.redis_server import DATABASES, RedisServer
from tests.support.s3_server import CREDENTIALS, S3Server
from tests.support.worker_process import WorkerProcess

# --- S3 (moto in server mode) -----------------------------------------------------------------


@pytest.fixture(scope="session")
def s3_moto() -> Iterator[S3Server]:
    server = S3Server()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_server(s3_moto: S3Server) -> str:
    """The endpoint URL of the session's S3-compatible server."""
    return s3_moto.endpoint_url


# --- Redis (broker, verdict cache, result store, stream callbacks) ----------------------------


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


# --- a real `modq worker` process ---------------------------------------------------------


@dataclass
class WorkerFactory:
    """Starts `modq worker` processes wired to this session's Redis and S3 server, on a pair
    of Redis databases (broker, cache) that belong to one test."""

    folder: Path
    redis: RedisServer
    s3: S3Server
    db: int
    started: list[WorkerProcess] = field(default_factory=list)

    @property
    def broker_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis.port}/{self.db}"

    @property
    def cache_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis.port}/{self.db + 1}"

    def __call__(
        self,
        env: dict[str, str],
        args: tuple[str, ...] = (),
        launcher: tuple[str, ...] | None = None,
        separate_stderr: bool = False,
    ) -> WorkerProcess:
        base = {
            "MODQ_BROKER_URL": self.broker_url,
            "MODQ_CACHE_URL": self.cache_url,
            "MODQ_S3_ENDPOINT_URL": self.s3.endpoint_url,
            "MODQ_CACHE_DIR": str(self.folder / "modq-cache"),
            "MODQ_MAX_WAIT_MS": "5",
            "MODQ_RETRY_BACKOFF_MAX_S": "2",
            "AWS_ACCESS_KEY_ID": CREDENTIALS["aws_access_key_id"],
            "AWS_SECRET_ACCESS_KEY": CREDENTIALS["aws_secret_access_key"],
            "AWS_DEFAULT_REGION": CREDENTIALS["region_name"],
        }
        log = self.folder / f"worker-{len(self.started)}.log"
        worker = WorkerProcess({**base, **env}, log, args, launcher, separate_stderr)
        self.started.append(worker)
        return worker.start()


_dbs = iter(range(2, DATABASES, 2))


@pytest.fixture
def db_pair() -> int:
    """A broker database of this test's own on the session's Redis; the next one is its cache."""
    return next(_dbs)


@pytest.fixture
def start_worker(
    tmp_path: Path, redis_server: RedisServer, s3_moto: S3Server, db_pair: int
) -> Iterator[WorkerFactory]:
    factory = WorkerFactory(tmp_path, redis_server, s3_moto, db_pair)
    yield factory
    for worker in factory.started:
        worker.stop()
