#!/usr/bin/env bash
# Make the CPU flavour's base image from Debian's packages, for machines that reach a Debian
# mirror but no image registry (where `docker pull debian:bookworm-slim` fails).
#
# Usage: scripts/bootstrap_base.sh [--tag TAG] [--mirror URL] [--force]
#   --tag TAG     image to create [default dragon-llm-extractor-base:bookworm]
#   --mirror URL  Debian mirror [default: the first Debian URI in this machine's apt sources,
#                 else http://deb.debian.org/debian]
#   --force       rebuild although TAG exists
# Needs root, debootstrap (apt-get install debootstrap) and a Docker engine. About a minute.
#
# The image is `debootstrap --variant=minbase bookworm` (essential and required packages only:
# about 120 MB, close to debian:bookworm-slim) with bookworm, bookworm-updates and
# bookworm-security in its sources, empty apt lists, and the standard PATH (docker import sets
# no environment, and the Dockerfile extends PATH).
set -euo pipefail

tag="dragon-llm-extractor-base:bookworm"
mirror=""
force=0

die() {
    echo "bootstrap_base: $*" >&2
    exit 1
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        --tag) tag="${2:?--tag needs a tag}"; shift 2 ;;
        --mirror) mirror="${2:?--mirror needs a URL}"; shift 2 ;;
        --force) force=1; shift ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done

command -v docker >/dev/null 2>&1 || die "docker is not installed"
docker info >/dev/null 2>&1 || die "no Docker engine answers"
if [[ ${force} -eq 0 ]] && docker image inspect "${tag}" >/dev/null 2>&1; then
    echo "bootstrap_base: ${tag} exists (--force rebuilds it)"
    exit 0
fi
[[ ${EUID} -eq 0 ]] || die "debootstrap needs root"
command -v debootstrap >/dev/null 2>&1 || die "debootstrap is not installed (apt-get install debootstrap)"

if [[ -z "${mirror}" ]]; then
    # deb822 (URIs: ...) or one-line (deb URL bookworm ...) sources; the first plain Debian one.
    mirror="$(
        {
            cat /etc/apt/sources.list.d/*.sources 2>/dev/null | sed -n 's/^URIs:[[:space:]]*//p' | tr ' ' '\n'
            cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
                awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) { print $i; break } }'
        } | grep -E '/debian/?$' | head -n 1 || true
    )"
    mirror="${mirror:-http://deb.debian.org/debian}"
fi
mirror="${mirror%/}"
security="${mirror%/debian}/debian-security"

root="$(mktemp -d "${TMPDIR:-/tmp}/bootstrap-base.XXXXXX")"
trap 'rm -rf "${root}"' EXIT

echo "bootstrap_base: debootstrap --variant=minbase bookworm from ${mirror}"
debootstrap --variant=minbase bookworm "${root}" "${mirror}" >"${root}.log" 2>&1 || {
    tail -n 20 "${root}.log" >&2
    rm -f "${root}.log"
    die "debootstrap failed"
}
rm -f "${root}.log"

cat >"${root}/etc/apt/sources.list" <<EOF
deb ${mirror} bookworm main
deb ${mirror} bookworm-updates main
deb ${security} bookworm-security main
EOF
# What the official slim image does too: no package caches or lists in the image.
rm -rf "${root}"/var/lib/apt/lists/* "${root}"/var/cache/apt/*.bin "${root}"/var/cache/apt/archives/*.deb \
    "${root}"/var/log/*.log "${root}"/tmp/* "${root}"/var/tmp/*

echo "bootstrap_base: docker import ${tag}"
tar --numeric-owner -C "${root}" -c . |
    docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["bash"]' \
        --message "debootstrap --variant=minbase bookworm ${mirror}" \
        - "${tag}" >/dev/null
echo "bootstrap_base: ${tag}: $(($(docker image inspect --format '{{.Size}}' "${tag}") / 1000 / 1000)) MB"
