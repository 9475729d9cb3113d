"""The typed errors of modq, split by what the worker must do with them.

Every error carries a stable ``code`` (it ends up in results and metrics, so it never changes
once released) and whether a retry can help::

    ModqError
    ├── PermanentError                 publish an error result now, never retry
    │   ├── ImageError                 the bytes are not an image modq will score
    │   │   ├── EmptyImage             empty_image
    │   │   ├── ImageTooLarge          image_too_large      (bytes over the cap)
    │   │   ├── TooManyPixels          too_many_pixels      (decompression bomb)
    │   │   ├── TooManyFrames          too_many_frames
    │   │   ├── TooComplex             too_complex          (scans, segments, chunks over
    │   │   │                                                a cap: walked before decoding)
    │   │   ├── ExtremeAspectRatio     extreme_aspect_ratio
    │   │   ├── UnsupportedFormat      unsupported_format   (not on the allowlist)
    │   │   ├── CorruptImage           corrupt_image        (truncated, undecodable)
    │   │   ├── DecodeBudgetExceeded   decode_budget_exceeded  (over the decode backstop's
    │   │   │                                                    CPU time or memory)
    │   │   └── DecoderCrashed         decoder_crashed      (the decoder process died on it
    │   │                                                    or answered out of protocol)
    │   ├── ReferenceError_            the reference cannot be read
    │   │   ├── ForbiddenReference     forbidden_reference  (outside roots / buckets)
    │   │   ├── InvalidReference       invalid_reference
    │   │   └── ObjectNotFound         not_found
    │   ├── SourceChanged              source_changed       (bytes changed under us)
    │   ├── InternalError              internal             (a bug; retried, then reported)
    │   ├── TooManyDeliveries          too_many_deliveries  (each delivery ended its worker)
    │   ├── InvalidRequest             invalid_request      (a message that is no request)
    │   ├── InvalidCallback            invalid_callback     (bad URI or the receiver refused)
    │   ├── ModelError                 a model cannot be loaded or run as asked
    │   │   ├── ModelNotFound          model_not_found
    │   │   ├── UnsafeWeights          unsafe_weights       (pickle files only)
    │   │   └── ModelConfigError       model_config
    │   ├── ConfigError                config
    │   │   └── UnknownBank            unknown_bank
    │   ├── InvalidHashList            invalid_hash_list    (a bank file rejected whole)
    │   ├── InvalidDataset             invalid_dataset      (labels, image folders, indexes)
    │   └── MissingExtra               missing_extra        (an optional dependency)
    └── RetryableError                 retry with capped backoff
        ├── StorageUnavailable         storage_unavailable
        ├── CacheUnavailable           cache_unavailable
        ├── BankUnavailable            bank_unavailable     (hash banks unreadable: the
        │                                                    image waits, never skips them)
        ├── DeadlineExceeded           deadline_exceeded
        ├── CallbackFailed             callback_failed      (receiver or broker unreachable)
        ├── InferenceFailed            inference_failed
        └── ResourceExhausted          resource_exhausted   (out of memory: says nothing
                                                             about the image)
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "BankUnavailable",
    "CacheUnavailable",
    "CallbackFailed",
    "ConfigError",
    "CorruptImage",
    "DeadlineExceeded",
    "DecodeBudgetExceeded",
    "DecoderCrashed",
    "EmptyImage",
    "ExtremeAspectRatio",
    "ForbiddenReference",
    "ImageError",
    "ImageTooLarge",
    "InferenceFailed",
    "InternalError",
    "InvalidCallback",
    "InvalidDataset",
    "InvalidHashList",
    "InvalidReference",
    "InvalidRequest",
    "MissingExtra",
    "ModelConfigError",
    "ModelError",
    "ModelNotFound",
    "ModqError",
    "ObjectNotFound",
    "PermanentError",
    "ReferenceError_",
    "ResourceExhausted",
    "RetryableError",
    "SourceChanged",
    "StorageUnavailable",
    "TooComplex",
    "TooManyDeliveries",
    "TooManyFrames",
    "TooManyPixels",
    "UnknownBank",
    "UnsafeWeights",
    "UnsupportedFormat",
]


class ModqError(Exception):
    code: ClassVar[str] = "internal"
    retryable: ClassVar[bool] = False


class PermanentError(ModqError):
    code = "permanent"


class RetryableError(ModqError):
    code = "retryable"
    retryable = True


class ImageError(PermanentError):
    code = "image"


class EmptyImage(ImageError):
    code = "empty_image"


class ImageTooLarge(ImageError):
    code = "image_too_large"


class TooManyPixels(ImageError):
    code = "too_many_pixels"


class TooManyFrames(ImageError):
    code = "too_many_frames"


class TooComplex(ImageError):
    """More structure (scans, marker segments, chunks, blocks, IFD entries) than decoding
    within the time budget allows, counted before decoding."""

    code = "too_complex"


class ExtremeAspectRatio(ImageError):
    code = "extreme_aspect_ratio"


class UnsupportedFormat(ImageError):
    code = "unsupported_format"


class CorruptImage(ImageError):
    code = "corrupt_image"


class DecodeBudgetExceeded(ImageError):
    """Decoding needed more CPU time or memory than the decode backstop allows: a fact about
    the image (the limits hold per decode, whatever else the worker does)."""

    code = "decode_budget_exceeded"


class DecoderCrashed(ImageError):
    """The decoder process died of its own signal on this image, or sent an answer out of
    protocol. Permanent: a crafted input that crashes the decoder must not come back for ever."""

    code = "decoder_crashed"


class ReferenceError_(PermanentError):
    code = "reference"


class ForbiddenReference(ReferenceError_):
    code = "forbidden_reference"


class InvalidReference(ReferenceError_):
    code = "invalid_reference"


class ObjectNotFound(ReferenceError_):
    code = "not_found"


class SourceChanged(PermanentError):
    code = "source_changed"


class InternalError(PermanentError):
    code = "internal"


class TooManyDeliveries(PermanentError):
    """A request whose deliveries kept ending the worker process before they finished (out of
    memory, a native crash): answered and dead-lettered instead of killing the next worker."""

    code = "too_many_deliveries"


class InvalidRequest(PermanentError):
    code = "invalid_request"


class InvalidCallback(PermanentError):
    code = "invalid_callback"


class ModelError(PermanentError):
    code = "model"


class ModelNotFound(ModelError):
    code = "model_not_found"


class UnsafeWeights(ModelError):
    code = "unsafe_weights"


class ModelConfigError(ModelError):
    code = "model_config"


class ConfigError(PermanentError):
    code = "config"


class UnknownBank(ConfigError):
    code = "unknown_bank"


class InvalidHashList(PermanentError):
    code = "invalid_hash_list"


class InvalidDataset(PermanentError):
    code = "invalid_dataset"


class MissingExtra(PermanentError):
    code = "missing_extra"


class StorageUnavailable(RetryableError):
    code = "storage_unavailable"


class CacheUnavailable(RetryableError):
    code = "cache_unavailable"


class BankUnavailable(RetryableError):
    code = "bank_unavailable"


class DeadlineExceeded(RetryableError):
    code = "deadline_exceeded"


class CallbackFailed(RetryableError):
    code = "callback_failed"


class InferenceFailed(RetryableError):
    code = "inference_failed"


class ResourceExhausted(RetryableError):
    code = "resource_exhausted"
