"""One Settings object, read from MODQ_* environment variables (or a .env file) at the edge."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Precision", "Settings", "default_cache_dir"]

Precision = Literal["auto", "fp32", "bf16", "fp16"]


def default_cache_dir() -> Path:
    import os

    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "modq"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MODQ_", env_file=".env", extra="ignore")

    model: str = Field("opennsfw", description="preset, directory, .onnx file or Org/name[@rev]")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    precision: Precision = "auto"
    policy: str = Field("default", description="default, strict, lenient or a JSON policy file")
    max_batch_size: int = Field(32, ge=1, le=1024)
    max_wait_ms: float = Field(10.0, ge=0)
    threads: int = Field(0, ge=0, description="inference threads; 0 = all cores")
    exact_decode: bool = Field(False, description="decode JPEGs at full size (no draft mode)")
    cache_dir: Path = Field(default_factory=default_cache_dir)
    max_image_bytes: int = Field(40 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(50_000_000, ge=1)
    max_frames: int = Field(1_000, ge=1)
    sample_frames: int = Field(8, ge=1)
    log_level: str = "INFO"

    @property
    def verdict_db(self) -> Path:
        return self.cache_dir / "verdicts.sqlite3"

    @property
    def onnx_dir(self) -> Path:
        return self.cache_dir / "onnx"
