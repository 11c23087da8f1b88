#!/usr/bin/env bash
# install-promtool.sh - make Prometheus' `promtool` available in .tools/bin, without root.
#
# Debian's `prometheus` package ships promtool. Rather than installing the package
# (a system-wide service), the .deb is fetched with `apt-get download` (no root needed)
# and unpacked with `dpkg-deb -x`; only promtool (a binary linked to libc alone) is kept,
# at .tools/bin/promtool.
# The tests run `promtool test rules` on docs/monitoring/prometheus-rules.yaml.
#
# Idempotent. Prints the absolute path of promtool on stdout (diagnostics on stderr).
set -euo pipefail

# Pinned upstream version (Debian 12, bookworm). The Debian revision is not pinned: the
# archive keeps only the newest one (a security update replaces deb12u1 with deb12u2),
# so the candidate is downloaded and refused unless it is this upstream version.
PROMETHEUS_VERSION="2.42.0"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tools="${repo_root}/.tools"
target="${tools}/bin/promtool"

log() { printf 'install-promtool: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

works() { [[ -x "$1" ]] && "$1" --version 2>&1 | grep -q "version ${PROMETHEUS_VERSION}+"; }

if works "${target}"; then
  printf '%s\n' "${target}"
  exit 0
fi

command -v apt-get >/dev/null 2>&1 && command -v dpkg-deb >/dev/null 2>&1 || die \
  "needs apt-get and dpkg-deb (a Debian or Ubuntu machine) to fetch Debian's prometheus" \
  "package; elsewhere put promtool ${PROMETHEUS_VERSION} at ${target} yourself"

work="$(mktemp -d)"
trap 'rm -rf "${work}"' EXIT
chmod 755 "${work}"  # apt's unprivileged _apt user writes the .deb here

download() { (cd "${work}" && apt-get download -q prometheus >&2); }

if ! download; then
  # A fresh machine has no package lists yet; refreshing them is the only change made
  # outside the repository, and only where we may make it.
  if [[ "$(id -u)" == 0 ]]; then
    log "apt-get download failed; refreshing the package lists (apt-get update) once"
    apt-get update -q >&2 || die "apt-get update failed: no Debian mirror reachable"
    download || die "apt-get download prometheus failed after apt-get update"
  else
    die "apt-get download prometheus failed; run 'apt-get update'" \
      "as root once (the package lists are missing or stale), then make setup again"
  fi
fi

deb="$(ls "${work}"/prometheus_*.deb)"
case "$(basename "${deb}")" in
  "prometheus_${PROMETHEUS_VERSION}+"*) ;;
  *) die "$(basename "${deb}") is not Prometheus ${PROMETHEUS_VERSION}: this machine's Debian" \
       "release ships another one; check tests/monitoring against it and update the pin" ;;
esac
dpkg-deb -x "${deb}" "${work}/root"
mkdir -p "${tools}/bin"
install -m 755 "${work}/root/usr/bin/promtool" "${target}.tmp"
mv -f "${target}.tmp" "${target}"

works "${target}" || die "unpacked ${deb} but ${target} does not run as ${PROMETHEUS_VERSION}"
log "installed $("${target}" --version 2>&1 | head -1)"
printf '%s\n' "${target}"
