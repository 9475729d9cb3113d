"""The worker's Celery application under its former path, kept so that existing
``celery -A worker.celery_app`` command lines keep working: use ``worker.queue.app``."""

from worker.messages import DEAD_LETTER_TASK, MODERATE_TASK
from worker.queue.app import app, celery_config, check_visibility_timeout, create_app

__all__ = [
    "DEAD_LETTER_TASK",
    "MODERATE_TASK",
    "app",
    "celery_config",
    "check_visibility_timeout",
    "create_app",
]
