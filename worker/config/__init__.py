"""One Settings object, read from MODQ_* environment variables (or a .env file) at the edge,
and handed out in pieces (``settings``: the fields; ``sections``: the pieces)."""

from worker.config.sections import (
    BankSettings,
    BatchingSettings,
    CacheSettings,
    CallbackSettings,
    DecodeLimits,
    DecodeSettings,
    DeliverySettings,
    EndpointSettings,
    HttpSettings,
    LogSettings,
    MetricsSettings,
    QuarantineAction,
    StorageSettings,
)
from worker.config.settings import (
    Precision,
    ProducerSettings,
    Settings,
    default_cache_dir,
    settings_error,
)

__all__ = [
    "BankSettings",
    "BatchingSettings",
    "CacheSettings",
    "CallbackSettings",
    "DecodeLimits",
    "DecodeSettings",
    "DeliverySettings",
    "EndpointSettings",
    "HttpSettings",
    "LogSettings",
    "MetricsSettings",
    "Precision",
    "ProducerSettings",
    "QuarantineAction",
    "Settings",
    "StorageSettings",
    "default_cache_dir",
    "settings_error",
]
