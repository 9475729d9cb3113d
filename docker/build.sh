#!/usr/bin/env bash
# Builds docker/Dockerfile with buildah, handing in this machine's pip settings so the
# build reaches the same package index through the same proxy as the host:
#   IMAGE            the tag to build                    [localhost/modq:latest]
#   BASE             the base image (build argument)     [the Dockerfile's python:3.11-slim]
#   EXTRAS           pyproject.toml extras (build argument)
#   TORCH_INDEX_URL  where torch comes from (build argument)
#   EXTRA_CA         a PEM bundle pip trusts in the build (secret "ca"); unset = pip's
#                    PIP_CERT, SSL_CERT_FILE or REQUESTS_CA_BUNDLE, else the system
#                    bundle if present; empty = none
#   HOST_PIP         the pip whose configuration is forwarded       [python3 -m pip]
# index-url, extra-index-url and find-links (environment first, then pip's configuration
# files) go in as the secret "pipconf"; local folders among them are mounted read-only for
# the build at the same paths. Neither secret nor mount is stored in the image.
set -euo pipefail
cd "$(dirname "$0")/.."

image=${IMAGE:-localhost/modq:latest}
command -v buildah >/dev/null || { echo "buildah is not installed" >&2; exit 1; }

secrets=$(mktemp -d)
trap 'rm -rf "$secrets"' EXIT
args=(--isolation chroot --layers --format docker -f docker/Dockerfile -t "$image")
[ -z "${BASE:-}" ] || args+=(--build-arg "BASE=$BASE")
args+=(--build-arg "EXTRAS=${EXTRAS:-}" --build-arg "TORCH_INDEX_URL=${TORCH_INDEX_URL:-}")

if [ -z "${EXTRA_CA+set}" ]; then
    EXTRA_CA=
    for ca in "${PIP_CERT:-}" "${SSL_CERT_FILE:-}" "${REQUESTS_CA_BUNDLE:-}" \
        /etc/ssl/certs/ca-certificates.crt /etc/pki/tls/certs/ca-bundle.crt; do
        if [ -n "$ca" ] && [ -f "$ca" ]; then EXTRA_CA=$ca; break; fi
    done
fi
[ -z "$EXTRA_CA" ] || args+=(--secret "id=ca,src=$EXTRA_CA")

# `pip config list` prints the environment's settings (:env:.key) and every file's
# (global.key, install.key); the environment wins, as it does for pip itself.
${HOST_PIP:-python3 -m pip} config list 2>/dev/null | python3 -c '
import os, shlex, sys
keys = ("index-url", "extra-index-url", "find-links")
found = {}
for line in sys.stdin:
    name, _, value = line.rstrip("\n").partition("=")
    section, _, key = name.rpartition(".")
    if key in keys and section in (":env:", "global", "install"):
        rank = 0 if section == ":env:" else 1
        if key not in found or rank < found[key][0]:
            found[key] = (rank, " ".join(shlex.split(value)))
for key in keys:  # the environment, also when pip itself cannot be run here
    value = os.environ.get("PIP_" + key.upper().replace("-", "_"))
    if value:
        found[key] = (0, value)
conf, mounts = ["[global]"], set()
for key, (_, value) in sorted(found.items()):
    conf.append(f"{key} = {value}")
    for location in value.split():
        path = location.removeprefix("file://")
        if not path.startswith("/"):
            continue  # a remote index: reached over the network
        # a PEP 503 index (.../simple) links its files beside it: mount its parent
        path = os.path.dirname(path.rstrip("/")) if path.rstrip("/").endswith("/simple") else path
        if os.path.exists(path):
            mounts.add(path)
with open(sys.argv[1], "w") as f:
    f.write("\n".join(conf) + "\n")
print("\n".join(sorted(mounts)))
' "$secrets/pip.conf" >"$secrets/mounts"
args+=(--secret "id=pipconf,src=$secrets/pip.conf")
while read -r path; do
    [ -z "$path" ] || args+=(--volume "$path:$path:ro")
done <"$secrets/mounts"

echo "buildah bud ${args[*]} ." >&2
buildah bud "${args[@]}" .
