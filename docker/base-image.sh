#!/usr/bin/env bash
# Builds a local base image with Debian's Python 3.11 for machines that cannot pull
# python:3.11-slim from a registry: a minimal Debian root file system from debootstrap,
# imported into podman's store. docker/Dockerfile builds on it with
#   --build-arg BASE=localhost/modq-base:py3.11
# Does nothing when the image is already there (MODQ_BASE_REBUILD=1 rebuilds it).
#
#   MODQ_BASE_IMAGE   the image's name        [localhost/modq-base:py3.11]
#   DEBIAN_SUITE      Debian release          [bookworm: its python3 is 3.11, the tested one]
#   DEBIAN_MIRROR     the archive to read     [the first Debian archive in this machine's
#                                              apt sources, else http://deb.debian.org/debian]
set -euo pipefail

image=${MODQ_BASE_IMAGE:-localhost/modq-base:py3.11}
suite=${DEBIAN_SUITE:-bookworm}

if [ "${MODQ_BASE_REBUILD:-0}" != 1 ] && podman image exists "$image"; then
    echo "base image $image is present"
    exit 0
fi

# The archive this machine's apt already uses (one-line and deb822 sources alike), so the
# base comes from the same mirror or proxy; security and third-party archives are skipped.
host_mirror() {
    local files=() f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] && files+=("$f")
    done
    [ ${#files[@]} -gt 0 ] || return 0
    awk '
        /^[[:space:]]*#/ { next }
        $1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i; break } }
        $1 == "URIs:" { for (i = 2; i <= NF; i++) print $i }
    ' "${files[@]}" | grep -E '/debian/?$' | grep -v -- '-security' | head -n 1
}
mirror=${DEBIAN_MIRROR:-$(host_mirror)}
mirror=${mirror:-http://deb.debian.org/debian}

for tool in debootstrap podman; do
    command -v "$tool" >/dev/null || { echo "$tool is not installed" >&2; exit 1; }
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/root
echo "debootstrap $suite from $mirror"
# minbase: dpkg, apt and the essential set only; python3-venv brings ensurepip's wheels,
# ca-certificates what the slim image has for TLS at run time.
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    "$suite" "$root" "$mirror" >"$work/debootstrap.log" 2>&1 || {
    tail -n 30 "$work/debootstrap.log" >&2
    exit 1
}
# Room the image does not need: apt's downloaded packages and lists, documentation.
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* \
    "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/locale/*
"$root"/usr/bin/python3 -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' || {
    echo "$suite's python3 is not 3.11; pick a suite that ships it (DEBIAN_SUITE=bookworm)" >&2
    exit 1
}
tar --numeric-owner -C "$root" -c . | podman import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    - "$image" >/dev/null
echo "built $image"
