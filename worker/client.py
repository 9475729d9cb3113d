"""The producer API's former path, kept so existing producers keep working: use
``worker.queue.client``."""

from worker.queue.client import Client, new_request_id, producer_config, submit

__all__ = ["Client", "new_request_id", "producer_config", "submit"]
