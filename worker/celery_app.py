"""The worker's Celery application under its former path, kept so that existing
``celery -A worker.celery_app`` command lines keep working: use ``worker.queue.app``."""

from worker.queue.app import app, celery_config, check_visibility_timeout, create_app

__all__ = ["app", "celery_config", "check_visibility_timeout", "create_app"]
