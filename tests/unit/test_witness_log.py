"""The witness layout in a directory store: write-once names, newest first, forged notes
reported and passed over."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from audit_worker.crypto import LocalSigner, TrustedKey, TrustedKeys
from audit_worker.crypto.checkpoint import Checkpoint, sign_note
from audit_worker.objectstore import DirectoryStore, ObjectExists, open_store
from audit_worker.witness import WitnessLog, history_key
from tests.aws_stub import stubbed_client

LOG = "hospital-a"


def _key(signer: LocalSigner) -> TrustedKey:
    return TrustedKeys.from_pems([signer.public_key_pem()]).keys[0]


def _note(signer: LocalSigner, size: int, origin: str = LOG) -> bytes:
    root = hashlib.sha256(b"%d" % size).digest()
    return sign_note(Checkpoint(origin, size, root, 1_700_000_000_000 + size), signer, _key(signer))


@pytest.fixture
def signer(tmp_path: Path) -> LocalSigner:
    return LocalSigner(tmp_path / "sth.pem", create=True)


@pytest.fixture
def log(tmp_path: Path, signer: LocalSigner) -> WitnessLog:
    return WitnessLog(DirectoryStore(tmp_path / "archive"), LOG, TrustedKeys((_key(signer),)))


def test_history_names_sort_largest_size_first() -> None:
    names = [history_key(LOG, n) for n in (0, 9, 10, 10**12, 10**19 - 1)]
    assert sorted(names) == names[::-1]


def test_newest_is_the_largest_published_size(log: WitnessLog, signer: LocalSigner) -> None:
    for size in (5, 700, 60):
        assert log.publish(_note(signer, size), size)
    read = log.newest()
    assert read.newest is not None and read.newest.checkpoint.tree_size == 700
    assert read.refused == []


def test_a_size_is_witnessed_once(log: WitnessLog, signer: LocalSigner) -> None:
    assert log.publish(_note(signer, 5), 5)
    assert not log.publish(_note(signer, 5), 5)


def test_forged_checkpoints_above_the_real_one_are_reported_and_skipped(
    log: WitnessLog, signer: LocalSigner, tmp_path: Path
) -> None:
    log.publish(_note(signer, 100), 100)
    forger = LocalSigner(tmp_path / "forger.pem", create=True)
    log.store.put(history_key(LOG, 10**9), _note(forger, 10**9))
    log.store.put(history_key(LOG, 10**8), b"not a note")
    read = log.newest()
    assert read.newest is not None and read.newest.checkpoint.tree_size == 100
    assert [key for key, _ in read.refused] == [history_key(LOG, 10**9), history_key(LOG, 10**8)]
    assert "no signature by a trusted key" in read.refused[0][1]


def test_a_real_note_stored_under_another_size_is_refused(
    log: WitnessLog, signer: LocalSigner
) -> None:
    log.store.put(history_key(LOG, 900), _note(signer, 100))
    read = log.newest()
    assert read.newest is None
    assert "another size" in read.refused[0][1]


def test_another_logs_note_is_refused(log: WitnessLog, signer: LocalSigner) -> None:
    log.store.put(history_key(LOG, 7), _note(signer, 7, origin="hospital-b"))
    assert "hospital-b" in log.newest().refused[0][1]


def test_directory_store_refuses_to_replace_and_leaves_files_read_only(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path)
    store.put("a/b", b"1")
    with pytest.raises(ObjectExists):
        store.put("a/b", b"2")
    assert store.get("a/b") == b"1"
    assert not os.stat(tmp_path / "a" / "b").st_mode & stat.S_IWUSR
    store.put("a/b", b"3", replace=True)
    assert store.get("a/b") == b"3"
    assert store.get("a/c") is None


def test_directory_store_lists_in_order_after_a_key(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path)
    for name in ("p/3", "p/1", "q/1", "p/2"):
        store.put(name, b"")
    assert store.keys("p/") == ["p/1", "p/2", "p/3"]
    assert store.keys("p/", after="p/1", limit=1) == ["p/2"]


@pytest.mark.parametrize("key", ["", "../x", "a//b", "/abs", "a/./b", "a\\b"])
def test_object_keys_that_could_escape_the_store_are_refused(tmp_path: Path, key: str) -> None:
    with pytest.raises(ValueError, match="invalid object key"):
        DirectoryStore(tmp_path).put(key, b"")


def test_open_store_reads_s3_file_and_directory_urls(tmp_path: Path) -> None:
    assert isinstance(open_store(str(tmp_path)), DirectoryStore)
    assert isinstance(open_store(tmp_path.as_uri()), DirectoryStore)
    # A real botocore S3 client behind a Stubber with nothing queued: any request it were
    # sent would be validated against the S3 model and then refused (none is sent here).
    client, stub = stubbed_client("s3")
    s3 = open_store("s3://bucket/some/prefix", s3_client=lambda: client)
    assert s3.url == "s3://bucket/some/prefix/"
    stub.assert_no_pending_responses()
    with pytest.raises(ValueError, match="needs a bucket"):
        open_store("s3:///x")
    with pytest.raises(ValueError, match="use s3://"):
        open_store("gs://bucket")


def test_objects_not_named_for_a_size_are_refused_unopened_and_unnamed(
    log: WitnessLog, signer: LocalSigner
) -> None:
    log.publish(_note(signer, 100), 100)
    for n in range(40):  # a flood that sorts before every real name
        log.store.put(f"{LOG}/checkpoints/0{n:02d}\x1b[31mhostile", b"x")
    read = log.newest()
    assert read.newest is not None and read.newest.checkpoint.tree_size == 100
    assert len(read.refused) == 40
    assert all("hostile" not in key for key, _ in read.refused)


def test_checkpoint_object_only_moves_forward(log: WitnessLog, signer: LocalSigner) -> None:
    log.publish(_note(signer, 700), 700)
    log.publish(_note(signer, 60), 60)  # a standby slot publishing an older head
    newest = log.read(f"{LOG}/checkpoint")
    assert newest.checkpoint.tree_size == 700
