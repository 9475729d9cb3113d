"""The worker's Celery application, configured from ``Settings``: ``celery -A
worker.queue.app`` and ``modq worker`` run it. Producers do not import this module
(``worker.queue.client`` builds its own app from ``ProducerSettings``).

Delivery is at-least-once: a message is acked only when its task returns, after the result
was published (``task_acks_late``); a worker that dies mid-task has its messages re-delivered
(``task_reject_on_worker_lost``). Messages are JSON only: a pickled message is refused before
anything reads it. With a Redis broker, an unacked message comes back after the visibility
timeout, so the worker refuses to start when a task, or a retry's countdown, could outlast it.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from worker.config import Settings
from worker.errors import ConfigError
from worker.messages import DEAD_LETTER_TASK, MODERATE_TASK
from worker.queue.client import producer_config

__all__ = [
    "DEAD_LETTER_TASK",
    "MODERATE_TASK",
    "celery_config",
    "check_visibility_timeout",
    "create_app",
]


def celery_config(settings: Settings) -> dict[str, Any]:
    return {
        **producer_config(settings),
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {
            **settings.broker_transport_options,
            "visibility_timeout": settings.visibility_timeout_s,
        },
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "task_time_limit": settings.task_time_limit_s,
        "task_routes": {
            MODERATE_TASK: {"queue": settings.queue},
            DEAD_LETTER_TASK: {"queue": settings.dead_letter_queue},
        },
        "worker_prefetch_multiplier": settings.prefetch_multiplier,
        # A message for a task modq does not run is dead-lettered, not dropped
        # (worker.queue.foreign).
        "worker_consumer": "worker.queue.foreign:Consumer",
        # One process, one model, task threads feeding its batcher: `celery -A … worker`
        # gets the same pool as `modq worker` (a forked pool child would inherit the runtime
        # without its threads and hang every task).
        "worker_pool": "threads",
        "worker_concurrency": settings.task_threads,
        # Tasks keep running through a lost broker connection: the threads pool cannot
        # cancel them (Celery's cancel raises NotImplementedError there and the worker
        # dies), and a message handed out again meanwhile is harmless, because the first
        # stored result wins and quarantine moves are idempotent.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        # Task events cost every task three messages; Flower turns them on when it connects.
        "worker_send_task_events": settings.task_events,
        "worker_hijack_root_logger": False,
    }


def check_visibility_timeout(settings: Settings) -> None:
    """A message must not come back to another worker while its task, or the countdown of
    its next retry, is still running: that would run it twice."""
    longest = settings.task_time_limit_s + settings.retry_backoff_max_s
    if settings.broker_url.startswith(("redis", "rediss")) and (
        settings.visibility_timeout_s <= longest
    ):
        raise ConfigError(
            f"MODQ_VISIBILITY_TIMEOUT_S={settings.visibility_timeout_s} must exceed the longest "
            f"task plus retry wait ({settings.task_time_limit_s} + "
            f"{settings.retry_backoff_max_s} = {longest} s)"
        )


def create_app(settings: Settings | None = None, *, worker: bool = False) -> Celery:
    """A Celery app for ``settings``. ``worker=True`` also registers the tasks."""
    settings = settings or Settings()
    app = Celery("modq", include=["worker.queue.tasks"] if worker else [])
    app.conf.update(celery_config(settings))
    app.conf.modq_settings = settings
    return app


# `celery -A worker.queue.app worker` and `celery -A worker.queue.app flower` find this.
app = create_app(worker=True)
