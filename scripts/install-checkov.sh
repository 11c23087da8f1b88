#!/usr/bin/env bash
# install-checkov.sh - install the checkov scanner into its own virtualenv, .tools/checkov.
#
# checkov pins its own dependencies tightly (3.3.30 wants boto3 1.35.x), which the
# project's .venv cannot share, so it gets a venv of its own. The tests run
# .tools/checkov/bin/checkov over every rendered manifest of the Helm chart.
#
# Idempotent: a venv that already runs the pinned version is kept. Prints the
# absolute path of the checkov executable on stdout (diagnostics on stderr).
set -euo pipefail

CHECKOV_VERSION="3.3.30"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${repo_root}/.tools/checkov"
target="${venv}/bin/checkov"

log() { printf 'install-checkov: %s\n' "$*" >&2; }

installed() {
  [[ -x "${target}" ]] && "${venv}/bin/python" -c \
    "import importlib.metadata as m, sys; sys.exit(m.version('checkov') != '${CHECKOV_VERSION}')" \
    2>/dev/null
}

if installed; then
  printf '%s\n' "${target}"
  exit 0
fi

python_bin="${PYTHON:-python3}"
command -v "${python_bin}" >/dev/null 2>&1 || { log "no ${python_bin} found"; exit 1; }

log "installing checkov ${CHECKOV_VERSION} into ${venv} (takes a minute or two)"
rm -rf "${venv}"
"${python_bin}" -m venv "${venv}"
"${venv}/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip >&2
"${venv}/bin/python" -m pip install --quiet --disable-pip-version-check \
  "checkov==${CHECKOV_VERSION}" >&2

if ! installed; then
  log "checkov ${CHECKOV_VERSION} did not install into ${venv}"
  exit 1
fi
printf '%s\n' "${target}"
