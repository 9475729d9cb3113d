#!/usr/bin/env bash
# The image tier (make test-image): lint both Dockerfiles, build the CPU image from this
# checkout, then run it the ways the README and compose file do:
#   modq --version; modq scan of examples/images; a worker answering a request submitted
#   from the host through a Redis on the host network, and its health check; Flower
#   answering HTTP.
# Any missing tool, server or answer fails the tier: nothing is skipped.
# Needs root (buildah and podman without a user namespace set up) and, when the tools are
# missing, apt. No registry is needed: the base image is built from Debian's packages
# (docker/base-image.sh) unless BASE names another one.
#   VENV   the virtual environment with modq and hadolint (make install-dev)   [.venv]
#   BASE   the image to build on                      [localhost/modq-base:py3.11, built here]
#   IMAGE  the tag the tier builds and runs            [localhost/modq:test]
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${VENV:-.venv}
export BASE=${BASE:-localhost/modq-base:py3.11}
export IMAGE=${IMAGE:-localhost/modq:test}
export HOST_PIP=${HOST_PIP:-$venv/bin/pip}
step_started=$SECONDS
step() {
    echo "== $* (at ${SECONDS}s)"
}

# Tools: Debian's packages, installed once. runc, not crun, runs the containers (crun
# cannot start them on every VM); limits stay at what an unprivileged VM grants.
missing=()
for tool in buildah podman debootstrap runc redis-server; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
    step "installing ${missing[*]}"
    pkgs=(buildah podman debootstrap runc)
    command -v redis-server >/dev/null || pkgs+=(redis-server)
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends "${pkgs[@]}" >/dev/null ||
        { apt-get update >/dev/null && apt-get install -y --no-install-recommends "${pkgs[@]}" >/dev/null; }
fi
podman=(podman --runtime runc)
run=("${podman[@]}" run --ulimit nofile=1024:1024 --ulimit nproc=1000:1000)

step "hadolint"
"$venv/bin/hadolint" docker/Dockerfile docker/Dockerfile.cuda

if [ "$BASE" = localhost/modq-base:py3.11 ]; then
    step "base image"
    MODQ_BASE_IMAGE=$BASE docker/base-image.sh
fi

step "build $IMAGE"
started=$SECONDS
mkdir -p build
docker/build.sh >build/image.log 2>&1 || { tail -n 40 build/image.log >&2; exit 1; }
echo "built in $((SECONDS - started)) s; log in build/image.log"
"${podman[@]}" image inspect "$IMAGE" --format 'size {{.Size}} bytes, user {{.Config.User}}'
user=$("${podman[@]}" image inspect "$IMAGE" --format '{{.Config.User}}')
[[ $user =~ ^[0-9]+(:[0-9]+)?$ ]] || { echo "USER is '$user', not numeric" >&2; exit 1; }
"${podman[@]}" image inspect "$IMAGE" --format '{{.Config.Healthcheck.Test}}' | grep -q metrics ||
    { echo "the image has no metrics health check" >&2; exit 1; }

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
containers=()
redis_dir=$(mktemp -d)
cleanup() {
    for c in "${containers[@]}"; do "${podman[@]}" rm -f -t 5 "$c" >/dev/null 2>&1 || true; done
    if [ -f "$redis_dir/redis.pid" ]; then kill "$(cat "$redis_dir/redis.pid")" 2>/dev/null || true; fi
    rm -rf "$redis_dir"
}
trap cleanup EXIT

step "modq --version"
version=$("${run[@]}" --rm --no-healthcheck "$IMAGE" --version)
echo "$version"
[[ $version == "modq "* ]] || { echo "unexpected --version output" >&2; exit 1; }

step "modq scan examples/images"
images=$(find examples/images -name '*.jpg' | wc -l)
"${run[@]}" --rm --no-healthcheck -v "$PWD/examples/images:/data/images:ro" --entrypoint sh \
    "$IMAGE" -c 'modq scan /data/images --report /tmp/report.jsonl >&2 && cat /tmp/report.jsonl' \
    >"$redis_dir/report.jsonl"
python3 - "$redis_dir/report.jsonl" "$images" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
want = int(sys.argv[2])
bad = [r for r in rows if r.get("verdict") not in ("allow", "review", "block")]
assert len(rows) == want and not bad, f"{len(rows)} rows for {want} images; without a verdict: {bad}"
print(f"{len(rows)} images scanned:", sorted({r["verdict"] for r in rows}))
EOF

step "worker answers a request through Redis on the host network"
redis_port=$(free_port)
redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no \
    --daemonize yes --pidfile "$redis_dir/redis.pid" --logfile "$redis_dir/redis.log" --dir "$redis_dir"
for _ in $(seq 50); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.1; done
redis-cli -p "$redis_port" ping
broker=redis://127.0.0.1:$redis_port/0
metrics_port=$(free_port)
worker=modq-smoke-worker-$$
containers+=("$worker")
"${run[@]}" -d --name "$worker" --network host -v "$PWD/examples/images:/data/images:ro" \
    -e MODQ_BROKER_URL="$broker" -e MODQ_CACHE_URL="redis://127.0.0.1:$redis_port/1" \
    -e MODQ_ALLOWED_ROOTS=/data/images -e MODQ_METRICS_PORT="$metrics_port" \
    -e MODQ_CONCURRENCY=2 "$IMAGE" worker >/dev/null
stream=modq-smoke-$$
MODQ_BROKER_URL=$broker "$venv/bin/modq" submit file:///data/images/astronaut.jpg \
    --callback "redis-stream://$stream" >"$redis_dir/sent"
cat "$redis_dir/sent"
if ! "$venv/bin/python" - "$broker" "$stream" "$(cut -f1 "$redis_dir/sent")" <<'EOF'
import json, sys, time
import redis
client, stream, request_id = redis.Redis.from_url(sys.argv[1]), sys.argv[2], sys.argv[3]
deadline = time.monotonic() + 240  # a cold worker loads its model first
while time.monotonic() < deadline:
    for _, entries in client.xread({stream: "0"}, block=1000) or []:
        for _, fields in entries:
            result = json.loads(fields[b"result"])
            assert result["request_id"] == request_id, result
            assert result.get("verdict") in ("allow", "review", "block"), result
            print("answered:", result["verdict"], "for", result["request_id"])
            sys.exit(0)
sys.exit(f"no answer on {stream} within 240 s")
EOF
then
    "${podman[@]}" logs --tail 40 "$worker" >&2
    exit 1
fi
# The image's HEALTHCHECK against the running worker (podman runs it on demand: no timer
# here without systemd).
if ! "${podman[@]}" healthcheck run "$worker"; then
    echo "the worker's health check failed" >&2
    exit 1
fi
echo "health check: healthy"

step "flower"
flower_port=$(free_port)
flower=modq-smoke-flower-$$
containers+=("$flower")
"${run[@]}" -d --name "$flower" --no-healthcheck --network host -e MODQ_BROKER_URL="$broker" \
    --entrypoint celery "$IMAGE" -A worker.queue.app flower --port="$flower_port" \
    --address=127.0.0.1 >/dev/null
if ! python3 - "$flower_port" <<'EOF'
import sys, time, urllib.request
url = f"http://127.0.0.1:{sys.argv[1]}/healthcheck"
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            print("flower:", reply.status, reply.read().decode()[:20])
            sys.exit(0)
    except OSError:
        time.sleep(0.5)
sys.exit(f"flower did not answer {url} within 60 s")
EOF
then
    "${podman[@]}" logs --tail 40 "$flower" >&2
    exit 1
fi

echo "image tier passed in $((SECONDS - step_started)) s"
