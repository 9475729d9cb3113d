"""What `pip install modq` gives a user: the built wheel installed into fresh virtual
environments, with no extras and with ``[torch]``, each scanning the examples and answering
one request through a real worker and Redis. Nothing here uses the development venv's modq.

Run with ``make test-install`` (``pytest -m install tests/install``); CI runs it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest
import redis

from tests.support.redis_server import RedisServer
from tests.support.worker_process import ROOT, free_port

pytestmark = pytest.mark.install

EXAMPLES = ROOT / "examples" / "images"
RESULT_SCHEMA = json.loads((ROOT / "schemas" / "moderation_result.v1.json").read_text())
PIP = ("-m", "pip", "install", "--disable-pip-version-check", "-q")
INSTALL_TIMEOUT = 900


def _pinned(requirement: str) -> str:
    """``requirement`` as constraints.txt pins it (torch goes in first, CPU build, as the
    README's [torch] instructions say)."""
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.split("=")[0].strip() == requirement:
            return line.strip()
    raise AssertionError(f"{requirement} is not pinned in constraints.txt")


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
        check=True, timeout=INSTALL_TIMEOUT, capture_output=True,
    )  # fmt: skip
    [built] = out.glob("modq-*.whl")
    return built


class Venv:
    """A fresh virtual environment with the wheel installed, and nothing of this one's."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.python = folder / "bin" / "python"
        self.modq = folder / "bin" / "modq"

    @classmethod
    def create(
        cls, folder: Path, wheel: Path, extras: str = "", first: tuple[str, ...] = ()
    ) -> Venv:
        venv = cls(folder)
        subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True, timeout=120)
        started = time.monotonic()
        if first:
            venv.pip(*first)
        venv.pip(f"modq{extras} @ {wheel.as_uri()}")
        venv.install_seconds = time.monotonic() - started
        return venv

    def pip(self, *args: str) -> None:
        done = subprocess.run(
            [str(self.python), *PIP, *args],
            capture_output=True, text=True, timeout=INSTALL_TIMEOUT,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr

    def env(self, home: Path, **extra: str) -> dict[str, str]:
        """No MODQ_, HF_ or PYTHON* settings of the test run's; caches under ``home``."""
        keep = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("MODQ_", "HF_", "PYTHON", "VIRTUAL_ENV"))
        }
        return {
            **keep,
            "PATH": f"{self.folder / 'bin'}:{keep.get('PATH', '')}",
            "HOME": str(home),
            "XDG_CACHE_HOME": str(home / "cache"),
            "HF_HOME": str(home / "huggingface"),
            "HF_HUB_OFFLINE": "1",
            "MODQ_CACHE_URL": "",
            "COLUMNS": "200",
            "NO_COLOR": "1",
            **extra,
        }

    def run(
        self, *args: str, home: Path, timeout: float = 300, **env: str
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.modq), *args],
            cwd=home, env=self.env(home, **env), capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip

    def site_packages_mb(self) -> float:
        total = sum(f.stat().st_size for f in self.folder.rglob("*") if f.is_file())
        return total / 2**20


@pytest.fixture(scope="session")
def bare(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Venv:
    return Venv.create(tmp_path_factory.mktemp("venv") / "bare", wheel)


@pytest.fixture(scope="session")
def with_torch(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Venv:
    constraints = str(ROOT / "constraints.txt")
    return Venv.create(
        tmp_path_factory.mktemp("venv") / "torch",
        wheel,
        "[torch]",
        first=(_pinned("torch"), _pinned("torchvision"), "-c", constraints),
    )


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


def _report_lines(stdout: str) -> list[dict[str, object]]:
    lines = [json.loads(line) for line in stdout.splitlines() if line.strip()]
    for line in lines:
        jsonschema.validate(line, RESULT_SCHEMA)
    return lines


def _scan_examples(venv: Venv, home: Path, *model: str) -> list[dict[str, object]]:
    done = venv.run("scan", str(EXAMPLES), "--report", "-", *model, home=home)
    assert done.returncode == 0, done.stderr
    results = _report_lines(done.stdout)
    assert len(results) == len(list(EXAMPLES.glob("*.jpg")))
    assert all(
        r["status"] == "ok" and r["verdict"] in ("allow", "review", "block") for r in results
    )
    return results


def _round_trip(venv: Venv, home: Path, server: RedisServer, *model: str) -> dict[str, object]:
    """`modq worker` from ``venv`` answers one `modq submit` (also ``venv``'s) on a stream."""
    uploads = home / "uploads"
    uploads.mkdir()
    shutil.copy(EXAMPLES / "chelsea-cat.jpg", uploads / "cat.jpg")
    env = {
        "MODQ_BROKER_URL": f"redis://127.0.0.1:{server.port}/0",
        "MODQ_CACHE_URL": f"redis://127.0.0.1:{server.port}/1",
        "MODQ_ALLOWED_ROOTS": str(uploads),
        "MODQ_METRICS_PORT": str(free_port()),
    }
    if model:
        env["MODQ_MODEL"] = model[-1]
    log = (home / "worker.log").open("wb")
    worker = subprocess.Popen(
        [str(venv.modq), "worker"], cwd=home, env=venv.env(home, **env),
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    stream = f"results-{uuid.uuid4().hex[:8]}"
    try:
        submitted = venv.run(
            "submit", str(uploads / "cat.jpg"), "--callback", f"redis-stream://{stream}",
            home=home, **env,
        )  # fmt: skip
        assert submitted.returncode == 0, submitted.stderr
        request_id = submitted.stdout.split("\t")[0]
        client = redis.Redis(port=server.port, db=0)  # streams live on the broker's Redis
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            entries = client.xrange(stream)
            if entries:
                break
            assert worker.poll() is None, (home / "worker.log").read_text()
            time.sleep(0.3)
        else:
            raise AssertionError("no result within 180 s:\n" + (home / "worker.log").read_text())
        [(_, fields)] = entries
        result = json.loads(fields[b"result"])
        jsonschema.validate(result, RESULT_SCHEMA)
        assert result["request_id"] == request_id
        assert result["status"] == "ok", result
        return result
    finally:
        os.killpg(worker.pid, 15)
        worker.wait(60)
        log.close()


def test_the_bare_wheel_scans_lists_and_says_its_version(bare: Venv, tmp_path: Path) -> None:
    version = bare.run("--version", home=tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("modq "), version
    listed = bare.run("models", "list", "--json", home=tmp_path)
    assert listed.returncode == 0, listed.stderr
    available = {row["preset"]: row["available"] for row in json.loads(listed.stdout)}
    assert available["opennsfw"] == "yes (bundled)"
    assert all("modq[torch]" in text for name, text in available.items() if name != "opennsfw")
    _scan_examples(bare, tmp_path)


@pytest.mark.parametrize(
    ("args", "extra"),
    [
        (("scan", str(EXAMPLES), "-m", "marqo"), "torch"),
        (("models", "export-onnx", "falconsai"), "torch"),
        (("index", "build", "embedded.jsonl", "-o", "index"), "analysis"),
    ],
)
def test_a_command_needing_a_missing_extra_names_it(
    bare: Venv, tmp_path: Path, args: tuple[str, ...], extra: str
) -> None:
    """Exit 2 and the extra to install, not a traceback (the index is built from a real
    scan's embeddings, so the command gets as far as needing faiss)."""
    embedded = bare.run(
        "scan", str(EXAMPLES), "--embed", "--report", "embedded.jsonl", home=tmp_path
    )
    assert embedded.returncode == 0, embedded.stderr
    done = bare.run(*args, home=tmp_path)
    assert done.returncode == 2, done
    assert f"modq[{extra}]" in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_the_bare_wheel_worker_answers_a_request(
    bare: Venv, tmp_path: Path, redis_server: RedisServer
) -> None:
    result = _round_trip(bare, tmp_path, redis_server)
    assert result["model"]["id"] == "yahoo/open_nsfw"


def test_the_torch_wheel_runs_a_hub_preset_from_the_cache(
    with_torch: Venv, tmp_path: Path, redis_server: RedisServer
) -> None:
    """A look-alike of falconsai (random weights, the hub's exact layout) in this venv's
    offline hub cache: scanned and served through the transformers path of the installed
    wheel."""
    build = subprocess.run(
        [str(with_torch.python), "-c", (
            "import sys; from pathlib import Path;"
            "from worker.models.lookalike import build_lookalike, install_in_hub_cache,"
            " preset_commit; from worker.models.registry import PRESETS;"
            "p = PRESETS['falconsai'];"
            "src = build_lookalike('falconsai', Path(sys.argv[1]) / 'src', tiny=True);"
            "install_in_hub_cache(src, Path(sys.argv[1]) / 'huggingface' / 'hub', p.hub_id,"
            " preset_commit('falconsai'))"
        ), str(tmp_path)],
        env=with_torch.env(tmp_path), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    listed = with_torch.run("models", "list", "--json", home=tmp_path)
    available = {row["preset"]: row["available"] for row in json.loads(listed.stdout)}
    assert available["falconsai"] == "yes (hub cache)", available
    assert "modq[torch]" not in available["marqo"]  # present extra: only the download is missing
    results = _scan_examples(with_torch, tmp_path, "-m", "falconsai")
    assert {r["model"]["id"] for r in results} == {"Falconsai/nsfw_image_detection"}
    result = _round_trip(with_torch, tmp_path, redis_server, "-m", "falconsai")
    assert result["model"]["id"] == "Falconsai/nsfw_image_detection"
