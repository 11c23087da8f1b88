"""The image holds the CA the worker's default setting names, pinned, readable, not hidden."""

from __future__ import annotations

import re
from pathlib import Path

from audit_worker import tls
from audit_worker.config import WorkerSettings

DOCKERFILE = Path(__file__).resolve().parents[2] / "Dockerfile"
RDS_BUNDLE_URL = "https://truststore.pki.rds.amazonaws.com/global/global-bundle.pem"


def _runtime_instructions() -> str:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    return text.split(" AS runtime", 1)[1]


def test_the_runtime_image_adds_the_rds_bundle_pinned_at_the_default_ca_path() -> None:
    add = next(line for line in _runtime_instructions().splitlines()
               if line.startswith("ADD ") and RDS_BUNDLE_URL in line)
    assert re.search(r"--checksum=sha256:[0-9a-f]{64}\b", add), add
    assert add.split()[-1] == str(tls.DEFAULT_DATABASE_CA_FILE)
    mode = re.search(r"--chmod=(\d+)", add)
    assert mode and int(mode.group(1), 8) & 0o004, "uid 10001 must be able to read it"


def test_the_default_ca_path_is_outside_the_tmp_emptydir() -> None:
    # The chart mounts an emptyDir on /tmp: a CA there would be hidden at run time.
    default = WorkerSettings.model_fields["database_ca_file"].default
    assert default == tls.DEFAULT_DATABASE_CA_FILE
    assert not str(default).startswith("/tmp/")
