"""The reliability table: every fault, load and hostile-input scenario the tests inject, what
should happen, and what the test run observed.

Scenarios are declared here, once; a test reports what it saw with the ``observe`` fixture
(``tests/conftest.py``), and the run writes every observation to ``build/reliability.json``.
``python -m tests.support.reliability_report`` renders ``docs/reliability.md`` from that file,
so the table says what the tests measured, and a unit test checks the page still lists exactly
the scenarios declared here.
"""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = [
    "GROUPS",
    "SCENARIOS",
    "Observation",
    "Scenario",
    "full_scale",
    "load_observations",
    "observations_path",
    "save_observations",
    "scaled",
]

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Scenario:
    group: str
    title: str
    expected: str


@dataclass
class Observation:
    scenario: str
    #: what the test saw, in words: outcomes, codes, counts that do not fit the columns
    observed: str
    sent: int = 0
    received: int = 0
    lost: int = 0
    #: extra results for one request (re-deliveries publish the identical stored result)
    duplicates: int = 0
    test: str = ""
    outcome: str = ""
    scale: str = ""
    extra: dict[str, float | int | str] = field(default_factory=dict)


GROUPS = ("Faults", "Load", "Hostile images", "Hostile references", "Hostile messages", "Models",
          "Cache poisoning")  # fmt: skip

_F, _L, _I, _R, _M, _O, _C = GROUPS

SCENARIOS: dict[str, Scenario] = {
    # --- faults, injected for real ---------------------------------------------------------
    "fault.kill9": Scenario(
        _F,
        "`kill -9` of the worker with a full batch in flight",
        "every in-flight request is redelivered and finishes; no request gets two different "
        "results; no quarantine half-done",
    ),
    "fault.redis_restart": Scenario(
        _F,
        "Redis (broker and cache) killed and restarted mid-run",
        "the worker reconnects and every request gets its result",
    ),
    "fault.cache_db_gone": Scenario(
        _F,
        "the cache Redis gone for good",
        "the worker keeps classifying without the cache",
    ),
    "fault.s3_outage": Scenario(
        _F,
        "S3 server stopped, started again, then answering 5xx for a while",
        "retries, then success; no image lost, none left in both places",
    ),
    "fault.crash_quarantine": Scenario(
        _F,
        "crash between quarantine copy and source delete",
        "the retry completes the move; the source is deleted only after a verified copy",
    ),
    "fault.crash_publish_ack": Scenario(
        _F,
        "crash between publish and ack",
        "the re-delivery re-publishes the identical stored result; nothing re-runs",
    ),
    "fault.lost_in_transport": Scenario(
        _F,
        "crash between the broker's pop and the unacked record (Redis transport)",
        "the message, gone from the broker, is re-sent from the producers' record; "
        "every request answered",
    ),
    "fault.sigterm": Scenario(
        _F,
        "SIGTERM during load",
        "the worker stops taking work, finishes or requeues what it holds, exits 0; "
        "the next worker answers the rest",
    ),
    "fault.webhook_down": Scenario(
        _F,
        "webhook endpoint down",
        "retries with backoff, then the result is kept in the dead-letter queue",
    ),
    "fault.overlap": Scenario(
        _F,
        "every request sent three times at once to three workers; one killed (`kill -9`) mid-run",
        "one delivery per request fetches, classifies and acts; the others re-publish its "
        "result: all copies identical, every blocked image in quarantine exactly once",
    ),
    "fault.unbuildable_runtime": Scenario(
        _F,
        "a worker that cannot build its runtime (no weights, missing model or policy, bad "
        "quarantine URI, unreachable required banks)",
        "one error naming the setting, exit non-zero, never ready; no message taken",
    ),
    "fault.stage_raises": Scenario(
        _F,
        "an exception at each stage of a delivery (validate, stored, assess, store, act, "
        "publish, dead letter, forget), once",
        "retried; every request ends with its published result",
    ),
    "fault.stage_raises_always": Scenario(
        _F,
        "an exception at each stage of a delivery, every time",
        "an error result is published where one can be; a request that cannot be answered "
        "is never acked",
    ),
    "fault.poison": Scenario(
        _F,
        "a message whose processing kills the worker process, every time",
        "after `MODQ_MAX_DELIVERIES` deaths it is answered `too_many_deliveries` and "
        "dead-lettered before any work; the requests beside it get their verdicts",
    ),
    # --- load -------------------------------------------------------------------------------
    "load.soak": Scenario(
        _L,
        "many requests through one worker, duplicates mixed in",
        "every request answered exactly once; resident memory flat after warm-up; Redis keys "
        "grow only by TTL'd cache and result entries",
    ),
    # --- hostile images ---------------------------------------------------------------------
    "image.zero_bytes": Scenario(_I, "zero bytes", "`empty_image` error"),
    "image.random_bytes": Scenario(_I, "random bytes", "`unsupported_format` error"),
    "image.truncated_jpeg": Scenario(_I, "truncated JPEG", "`corrupt_image` error"),
    "image.truncated_png": Scenario(_I, "truncated PNG", "`corrupt_image` error"),
    "image.png_bomb": Scenario(
        _I,
        "PNG declaring 100k x 100k pixels",
        "`too_many_pixels` from the header, nothing allocated",
    ),
    "image.gif_10k_frames": Scenario(_I, "GIF with 10,000 frames", "`too_many_frames` error"),
    "image.svg": Scenario(_I, "SVG", "`unsupported_format` error"),
    "image.polyglot": Scenario(_I, "JPEG/ZIP polyglot", "decoded as the JPEG it starts with"),
    "image.png16": Scenario(_I, "16-bit PNG", "a verdict, scaled not clipped"),
    "image.cmyk_jpeg": Scenario(_I, "CMYK JPEG", "a verdict on the RGB conversion"),
    "image.over_byte_cap": Scenario(_I, "file over the byte cap", "`image_too_large` error"),
    "image.wrong_extension": Scenario(
        _I, "PNG named .jpg, JPEG named .gif", "a verdict: the format is sniffed, not trusted"
    ),
    "image.fuzz": Scenario(
        _I,
        "decoder fuzzed (random and mutated images) for a fixed budget",
        "no crash, no hang, memory bounded: a typed error or RGB frames for every input",
    ),
    "image.hostile_structure": Scenario(
        _I,
        "hostile structure, a few MB each: 50k JPEG scans, 1M marker segments, 300k PNG "
        "chunks, 1M GIF extensions, 1000-frame animations on 2500x2500 canvases, 40k TIFF "
        "pages, 1M strips, a 65520x65520 tile, IFD loops, 2M BMP RLE commands, 1x100000 PNGs",
        "each refused by the structure walk or the aspect/frame-walk caps with its typed error, "
        "within 5 s CPU and 1 GiB over the baseline (fresh process)",
    ),
    "image.extreme_aspect_preprocess": Scenario(
        _I,
        "1x100000, 100000x1 and 1x2000000 images through every preset's preprocessing",
        "classified within 5 s CPU and 1 GiB: only the crop is resized",
    ),
    "image.at_the_caps": Scenario(
        _I,
        "the dearest input each class may be at the default caps, through every preset",
        "classified within 5 s CPU and 1 GiB over the baseline (fresh process)",
    ),
    "image.fuzz_structure": Scenario(
        _I,
        "decoder fuzzed with structure-aware inputs (valid headers, random hostile counts)",
        "a typed error or RGB frames for every input, each within its time and memory bound",
    ),
    "image.worker_memory": Scenario(
        _I,
        "all the hostile images through one worker",
        "each gets its typed error or a verdict; nothing hangs; worker memory bounded",
    ),
    "image.backstop_memory": Scenario(
        _I,
        "well-formed image within every cap whose decode needs more memory than the decode "
        "backstop allows",
        "`decode_budget_exceeded` from the decoder process, which is replaced; the worker "
        "stays up and answers the next request",
    ),
    # --- hostile references -----------------------------------------------------------------
    "ref.file_dotdot": Scenario(_R, "`file://` with `..`", "`forbidden_reference`"),
    "ref.file_outside": Scenario(
        _R, "`file://` absolute path outside the roots", "`forbidden_reference`"
    ),
    "ref.file_symlink": Scenario(
        _R, "`file://` symlink escaping the root", "`forbidden_reference`"
    ),
    "ref.s3_bucket": Scenario(_R, "`s3://` bucket not allowed", "`forbidden_reference`"),
    "ref.http_private": Scenario(
        _R,
        "`http(s)://` to 127.0.0.1, [::1], 10/8, 172.16/12, 192.168/16, 169.254.169.254",
        "`forbidden_reference`; no connection made",
    ),
    "ref.http_name_private": Scenario(
        _R, "a hostname that resolves to a private address", "`forbidden_reference`; no connection"
    ),
    "ref.http_redirect": Scenario(
        _R, "a redirect to a private address", "`forbidden_reference`; the target never contacted"
    ),
    "ref.http_oversize": Scenario(
        _R, "an oversize body", "`image_too_large`; the read stops at the cap"
    ),
    "ref.http_slowloris": Scenario(
        _R,
        "an image server dripping its headers, body or TLS handshake one byte at a time",
        "`storage_unavailable` (retryable) at the one download deadline, not per byte",
    ),
    "ref.webhook_slowloris": Scenario(
        _R,
        "a webhook receiver dripping its answer one byte at a time",
        "each attempt ends at its deadline; the publish ends within its budget",
    ),
    "ref.file_special": Scenario(
        _R,
        "`file://` naming a FIFO, a socket, a device, a directory; NUL bytes, over-long names",
        "refused at once without blocking (`forbidden_reference`, `not_found`, "
        "`invalid_reference`)",
    ),
    "ref.file_race": Scenario(
        _R,
        "`file://` path component swapped for a symlink to outside while being read",
        "no read ever returns the outside file's bytes",
    ),
    "ref.ipv6_embedded": Scenario(
        _R,
        "IPv6 forms embedding a private IPv4 (compatible, mapped, SIIT, NAT64, 6to4, Teredo), "
        "site-local `fec0::/10`",
        "`forbidden_reference`; every form judged as its IPv4 address",
    ),
    # --- hostile messages -------------------------------------------------------------------
    "msg.pickle": Scenario(_M, "a pickle-serialized task", "refused unread; the worker survives"),
    "msg.bad_json": Scenario(_M, "malformed JSON", "refused; the worker survives"),
    "msg.missing_fields": Scenario(
        _M, "a request missing fields", "`invalid_request` result and dead letter"
    ),
    "msg.big_metadata": Scenario(
        _M, "a 10 MB metadata blob", "`invalid_request` result and dead letter"
    ),
    # --- models -----------------------------------------------------------------------------
    "model.pickle_only": Scenario(
        _O, "a model directory holding only pickle weights", "refused (`unsafe_weights`)"
    ),
    "model.trust_remote_code": Scenario(_O, "`trust_remote_code`", "never set on any loading path"),
    # --- cache poisoning --------------------------------------------------------------------
    "cache.collision_safe": Scenario(
        _C,
        "a different image crafted to the pHash of a cached **safe** image",
        "the safe verdict is not reused: the model scores it",
    ),
    "cache.collision_unsafe": Scenario(
        _C,
        "a near-duplicate of a cached **unsafe** image",
        "the unsafe verdict propagates (perceptual hit)",
    ),
    "cache.near_never_lowers_sqlite": Scenario(
        _C,
        "near-duplicates either side of every policy threshold, SQLite cache (`modq scan`)",
        "only a cached block is reused; every other image is classified: never below its own "
        "verdict",
    ),
    "cache.near_never_lowers_redis": Scenario(
        _C,
        "near-duplicates either side of every policy threshold, Redis cache (worker)",
        "only a cached block is reused; every other image is classified: never below its own "
        "verdict",
    ),
    "cache.near_review_then_block": Scenario(
        _C,
        "`modq scan` of a near-duplicate scoring block after one scoring review",
        "the second is classified and blocked, not given the cached review",
    ),
}


def observations_path() -> Path:
    return Path(os.environ.get("MODQ_RELIABILITY_JSON", ROOT / "build" / "reliability.json"))


def save_observations(observations: list[Observation], path: Path | None = None) -> Path:
    """Merge into the file: a run that reached only some scenarios updates their rows and
    keeps the others' (each row names its test and outcome)."""
    path = path or observations_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    # Parallel test processes (pytest -n) each merge their rows: one at a time.
    with (path.parent / f".{path.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        kept = {o.scenario: o for o in load_observations(path)} if path.exists() else {}
        kept.update({o.scenario: o for o in observations})
        path.write_text(json.dumps([asdict(o) for o in kept.values()], indent=2) + "\n")
    return path


def load_observations(path: Path | None = None) -> list[Observation]:
    path = path or observations_path()
    return [Observation(**item) for item in json.loads(path.read_text())]


def full_scale() -> bool:
    """``make soak`` sets ``MODQ_SOAK=1``: the fault and load tests run at full counts."""
    return os.environ.get("MODQ_SOAK", "") == "1"


def scaled(ci: int, full: int) -> int:
    return full if full_scale() else ci
