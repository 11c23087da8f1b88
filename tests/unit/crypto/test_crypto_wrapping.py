"""Local envelope encryption and DataKeyManager rotation/caching."""

from __future__ import annotations

import base64
import stat
from pathlib import Path

import pytest

from audit_worker.crypto import (
    DataKey,
    DataKeyManager,
    DecryptionError,
    KeyUnavailableError,
    KeyWrapper,
    LocalKeyWrapper,
    data_key_id,
)


class CountingWrapper:
    """KeyWrapper that delegates to another wrapper and counts calls."""

    def __init__(self, inner: KeyWrapper) -> None:
        self.inner = inner
        self.ref = inner.ref
        self.generate_calls = 0
        self.unwrap_calls = 0

    def generate_data_key(self, purpose: str) -> DataKey:
        self.generate_calls += 1
        return self.inner.generate_data_key(purpose)

    def unwrap(self, wrapped: bytes, purpose: str) -> bytes:
        self.unwrap_calls += 1
        return self.inner.unwrap(wrapped, purpose)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def wrapper(tmp_path: Path) -> LocalKeyWrapper:
    return LocalKeyWrapper(tmp_path / "keys" / "master.key", create=True)


@pytest.fixture
def counting(wrapper: LocalKeyWrapper) -> CountingWrapper:
    return CountingWrapper(wrapper)


def test_round_trip(wrapper: LocalKeyWrapper) -> None:
    key = wrapper.generate_data_key("phi")
    assert len(key.plaintext) == 32
    assert key.wrapper_ref == wrapper.ref
    assert key.key_id == data_key_id(key.wrapped)
    assert len(key.key_id) == 16
    assert key.plaintext not in key.wrapped
    assert wrapper.unwrap(key.wrapped, "phi") == key.plaintext


def test_data_keys_are_distinct(wrapper: LocalKeyWrapper) -> None:
    a = wrapper.generate_data_key("phi")
    b = wrapper.generate_data_key("phi")
    assert a.plaintext != b.plaintext
    assert a.key_id != b.key_id


def test_repr_hides_plaintext(wrapper: LocalKeyWrapper) -> None:
    key = wrapper.generate_data_key("phi")
    text = repr(key)
    assert "plaintext" not in text
    assert repr(key.plaintext) not in text
    assert key.plaintext.hex() not in text


def test_purpose_binding(wrapper: LocalKeyWrapper) -> None:
    key = wrapper.generate_data_key("phi")
    with pytest.raises(DecryptionError):
        wrapper.unwrap(key.wrapped, "index")


def test_other_master_key_cannot_unwrap(wrapper: LocalKeyWrapper, tmp_path: Path) -> None:
    other = LocalKeyWrapper(tmp_path / "other.key", create=True)
    assert other.ref != wrapper.ref
    key = wrapper.generate_data_key("phi")
    with pytest.raises(DecryptionError) as info:
        other.unwrap(key.wrapped, "phi")
    assert key.plaintext.hex() not in str(info.value)


@pytest.mark.parametrize("mutate", ["flip", "truncate", "extend"])
def test_corrupted_wrapped_blob(wrapper: LocalKeyWrapper, mutate: str) -> None:
    blob = bytearray(wrapper.generate_data_key("phi").wrapped)
    if mutate == "flip":
        blob[20] ^= 0x01
    elif mutate == "truncate":
        del blob[-1]
    else:
        blob.append(0)
    with pytest.raises(DecryptionError):
        wrapper.unwrap(bytes(blob), "phi")


def test_missing_key_file_without_create(tmp_path: Path) -> None:
    path = tmp_path / "absent.key"
    with pytest.raises(KeyUnavailableError) as info:
        LocalKeyWrapper(path)
    assert str(path) in str(info.value)
    assert "create" in str(info.value)
    assert info.value.ref == str(path)
    assert not path.exists()


def test_key_file_mode_and_format(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "master.key"
    first = LocalKeyWrapper(path, create=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(base64.b64decode(path.read_text().strip(), validate=True)) == 32
    # Re-opening (with or without create) uses the same key rather than replacing it.
    again = LocalKeyWrapper(path, create=True)
    plain = LocalKeyWrapper(path)
    assert first.ref == again.ref == plain.ref
    assert first.ref.startswith("local:")
    assert len(first.ref) == len("local:") + 12
    key = first.generate_data_key("phi")
    assert plain.unwrap(key.wrapped, "phi") == key.plaintext
    # No temporary files are left behind next to the key.
    assert [p.name for p in path.parent.iterdir()] == ["master.key"]


@pytest.mark.parametrize("content", [b"not base64!!\n", base64.b64encode(b"x" * 16) + b"\n"])
def test_malformed_key_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.key"
    path.write_bytes(content)
    with pytest.raises(KeyUnavailableError) as info:
        LocalKeyWrapper(path)
    assert str(path) in str(info.value)
    assert content.decode().strip() not in str(info.value)


def test_manager_generates_once_for_many_current_calls(counting: CountingWrapper) -> None:
    mgr = DataKeyManager(counting)
    first = mgr.current()
    for _ in range(10_000):
        assert mgr.current() is first
    assert counting.generate_calls == 1
    assert mgr.rotations == 0


def test_manager_rotates_after_use_limit(counting: CountingWrapper) -> None:
    mgr = DataKeyManager(counting, rotate_after_uses=100)
    first = mgr.current()
    mgr.note_use(99)
    assert mgr.current() is first
    mgr.note_use(1)
    second = mgr.current()
    assert second.key_id != first.key_id
    assert mgr.rotations == 1
    assert mgr.uses == 0
    assert counting.generate_calls == 2
    for _ in range(1000):
        mgr.current()
    assert counting.generate_calls == 2


def test_manager_rotates_after_age_limit(counting: CountingWrapper) -> None:
    clock = FakeClock()
    mgr = DataKeyManager(counting, rotate_after_seconds=60.0, clock=clock)
    first = mgr.current()
    clock.now += 59.9
    assert mgr.current() is first
    clock.now += 0.1
    second = mgr.current()
    assert second is not first
    assert mgr.rotations == 1
    # The age counts from the rotation, not from manager creation.
    clock.now += 30
    assert mgr.current() is second
    assert counting.generate_calls == 2


def test_manager_get_unwraps_old_key_once(
    tmp_path: Path, wrapper: LocalKeyWrapper, counting: CountingWrapper
) -> None:
    # A key written by an earlier process (different manager, same master key file).
    old = LocalKeyWrapper(wrapper.key_file).generate_data_key("phi")
    mgr = DataKeyManager(counting)
    for _ in range(1000):
        got = mgr.get(old.key_id, old.wrapped)
        assert got.plaintext == old.plaintext
        assert got.key_id == old.key_id
    assert counting.unwrap_calls == 1


def test_manager_get_current_and_previous_need_no_unwrap(counting: CountingWrapper) -> None:
    mgr = DataKeyManager(counting, rotate_after_uses=1)
    first = mgr.current()
    assert mgr.get(first.key_id, first.wrapped) is first
    mgr.note_use(1)
    second = mgr.current()
    assert second is not first
    assert mgr.get(first.key_id, first.wrapped) is first
    assert mgr.get(second.key_id, second.wrapped) is second
    assert counting.unwrap_calls == 0


def test_manager_cache_is_bounded(counting: CountingWrapper, wrapper: LocalKeyWrapper) -> None:
    keys = [wrapper.generate_data_key("phi") for _ in range(3)]
    mgr = DataKeyManager(counting, cache_size=2)
    for k in keys:
        mgr.get(k.key_id, k.wrapped)
    assert counting.unwrap_calls == 3
    mgr.get(keys[2].key_id, keys[2].wrapped)
    mgr.get(keys[1].key_id, keys[1].wrapped)
    assert counting.unwrap_calls == 3
    mgr.get(keys[0].key_id, keys[0].wrapped)  # evicted as least recently used
    assert counting.unwrap_calls == 4


def test_manager_get_rejects_mismatched_id(counting: CountingWrapper) -> None:
    a = counting.inner.generate_data_key("phi")
    b = counting.inner.generate_data_key("phi")
    mgr = DataKeyManager(counting)
    with pytest.raises(DecryptionError):
        mgr.get(a.key_id, b.wrapped)
    assert counting.unwrap_calls == 0


def test_manager_get_enforces_purpose(wrapper: LocalKeyWrapper) -> None:
    key = wrapper.generate_data_key("index")
    mgr = DataKeyManager(wrapper, purpose="phi")
    with pytest.raises(DecryptionError):
        mgr.get(key.key_id, key.wrapped)


def test_manager_validates_arguments(wrapper: LocalKeyWrapper) -> None:
    with pytest.raises(ValueError):
        DataKeyManager(wrapper, rotate_after_seconds=0)
    with pytest.raises(ValueError):
        DataKeyManager(wrapper, rotate_after_uses=0)
    with pytest.raises(ValueError):
        DataKeyManager(wrapper, purpose="")
    with pytest.raises(ValueError):
        DataKeyManager(wrapper).note_use(-1)
