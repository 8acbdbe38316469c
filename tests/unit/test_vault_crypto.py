"""Envelope encryption of the KeyVault: tampering, moving and nonce reuse all fail closed."""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import hashlib
import hmac
import os

import pytest

from services.keyvault import audit_records as AR
from services.keyvault import crypto as C
from services.keyvault import domain as D

SECRET = b"sk-test-0123456789abcdefghijklmnop"


@pytest.fixture
def master() -> C.MasterKey:
    return C.MasterKey(os.urandom(32))


def _flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def test_sealed_secret_decrypts_with_its_binding(master: C.MasterKey) -> None:
    sealed = C.seal(master, "openai-1", "openai", 1, SECRET)
    assert SECRET not in sealed.ciphertext
    assert C.decrypt(master, "openai-1", "openai", 1, sealed) == SECRET


@pytest.mark.parametrize("part", ["nonce", "ciphertext", "tag", "wrapped_data_key", "wrap_nonce"])
def test_one_flipped_bit_anywhere_fails_closed(master: C.MasterKey, part: str) -> None:
    sealed = C.seal(master, "k", "openai", 1, SECRET)
    if part == "tag":  # the GCM tag is the last 16 bytes of the ciphertext
        bit = (len(sealed.ciphertext) - 16) * 8 + 5
        tampered = dataclasses.replace(sealed, ciphertext=_flip(sealed.ciphertext, bit))
    else:
        value = getattr(sealed, part)
        tampered = dataclasses.replace(sealed, **{part: _flip(value, 3)})
    result = None
    with pytest.raises(C.DecryptionError) as info:
        result = C.decrypt(master, "k", "openai", 1, tampered)
    assert result is None  # nothing, not even a prefix, came back
    assert SECRET.decode() not in str(info.value)


def test_every_single_bit_of_the_body_is_authenticated(master: C.MasterKey) -> None:
    sealed = C.seal(master, "k", "openai", 1, SECRET)
    data_key = C.unwrap_data_key(master, "k", "openai", 1, sealed)
    for bit in range(len(sealed.ciphertext) * 8):
        tampered = dataclasses.replace(sealed, ciphertext=_flip(sealed.ciphertext, bit))
        with pytest.raises(C.DecryptionError):
            C.open_secret(data_key, "k", "openai", 1, tampered)


@pytest.mark.parametrize(
    ("name", "provider", "version"),
    [("other-key", "openai", 1), ("k", "anthropic", 1), ("k", "openai", 2), ("K", "openai", 1)],
)
def test_a_ciphertext_moved_to_another_key_provider_or_version_fails(
    master: C.MasterKey, name: str, provider: str, version: int
) -> None:
    sealed = C.seal(master, "k", "openai", 1, SECRET)
    with pytest.raises(C.DecryptionError):
        C.decrypt(master, name, provider, version, sealed)


def test_a_secret_moved_under_another_rows_data_key_fails(master: C.MasterKey) -> None:
    a = C.seal(master, "a", "openai", 1, SECRET)
    b = C.seal(master, "b", "openai", 1, b"sk-other-secret-value-xxxxxxxx")
    # Row b gets a's ciphertext and nonce but keeps its own wrapped data key.
    moved = dataclasses.replace(b, ciphertext=a.ciphertext, nonce=a.nonce)
    with pytest.raises(C.DecryptionError):
        C.decrypt(master, "b", "openai", 1, moved)
    # Row b gets all of a's columns: the AD (name "b") still refuses it.
    with pytest.raises(C.DecryptionError):
        C.decrypt(master, "b", "openai", 1, a)


def test_associated_data_is_unambiguous() -> None:
    # A separator inside a name cannot make two bindings collide.
    assert C.secret_ad("a|b", "c", 1) != C.secret_ad("a", "b|c", 1)
    assert C.secret_ad("a", "b", 1).startswith(b"igw-keyvault/v1|")


def test_a_wrong_master_key_cannot_unwrap(master: C.MasterKey) -> None:
    sealed = C.seal(master, "k", "openai", 1, SECRET)
    other = C.MasterKey(os.urandom(32))
    with pytest.raises(C.DecryptionError):
        C.decrypt(other, "k", "openai", 1, sealed)
    # Even when the stored master key id is forged to match.
    forged = dataclasses.replace(sealed, master_key_id=other.key_id)
    with pytest.raises(C.DecryptionError):
        C.decrypt(other, "k", "openai", 1, forged)


def test_100000_encryptions_of_one_key_use_distinct_nonces(master: C.MasterKey) -> None:
    n = 100_000
    nonces: set[bytes] = set()
    wrap_nonces: set[bytes] = set()
    ciphertexts: set[bytes] = set()
    for _ in range(n):
        s = C.seal(master, "k", "openai", 1, SECRET)
        nonces.add(s.nonce)
        wrap_nonces.add(s.wrap_nonce)
        ciphertexts.add(s.ciphertext)
    assert len(nonces) == n
    assert len(wrap_nonces) == n  # these all live under the one master key
    assert len(ciphertexts) == n


def test_rewrap_moves_the_data_key_without_touching_the_ciphertext(master: C.MasterKey) -> None:
    sealed = C.seal(master, "k", "openai", 3, SECRET)
    new = C.MasterKey(os.urandom(32))
    moved = C.rewrap_data_key(master, new, "k", "openai", 3, sealed)
    assert (moved.ciphertext, moved.nonce) == (sealed.ciphertext, sealed.nonce)
    assert moved.master_key_id == new.key_id
    assert C.decrypt(new, "k", "openai", 3, moved) == SECRET
    with pytest.raises(C.DecryptionError):
        C.decrypt(master, "k", "openai", 3, moved)


def test_check_value_tells_the_right_master_key_from_a_wrong_one(master: C.MasterKey) -> None:
    value = C.make_check_value(master)
    assert C.verify_check_value(master, value)
    assert not C.verify_check_value(C.MasterKey(os.urandom(32)), value)
    assert not C.verify_check_value(master, _flip(value, 100))


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_master_keys_of_the_wrong_length_are_refused(size: int) -> None:
    raw = os.urandom(size)
    with pytest.raises(C.MasterKeyError) as info:
        C.load_master_key({"IGW_VAULT_MASTER_KEY": base64.b64encode(raw).decode() or " "})
    assert base64.b64encode(raw).decode() not in str(info.value) or size == 0


def test_master_key_errors_never_contain_key_material(tmp_path: object) -> None:
    with pytest.raises(C.MasterKeyError, match=r"no master key"):
        C.load_master_key({})
    with pytest.raises(C.MasterKeyError, match="not valid base64"):
        C.load_master_key({"IGW_VAULT_MASTER_KEY": "!!!not-base64-secretish!!!"})
    good = base64.b64encode(os.urandom(32)).decode()
    key = C.load_master_key({"IGW_VAULT_MASTER_KEY": good})
    assert good not in repr(key) and good not in str(key)
    assert repr(key) == f"MasterKey(key_id={key.key_id!r})"


def test_master_key_from_a_file(tmp_path: pytest.TempPathFactory) -> None:
    raw = os.urandom(32)
    path = tmp_path / "master.key"  # type: ignore[operator]
    path.write_text(base64.b64encode(raw).decode() + "\n")
    key = C.load_master_key({"IGW_VAULT_MASTER_KEY_FILE": str(path)})
    assert key.key_id == C.master_key_id(raw)
    with pytest.raises(C.MasterKeyError, match="cannot be read"):
        C.load_master_key({"IGW_VAULT_MASTER_KEY_FILE": str(path) + ".missing"})


def test_master_key_id_is_the_documented_prefix_hash() -> None:
    import hashlib

    raw = bytes(range(32))
    assert C.master_key_id(raw) == hashlib.sha256(b"igw-master-key-id" + raw).hexdigest()[:8]


def test_lease_hmac_is_keyed_and_never_the_lease_id(master: C.MasterKey) -> None:
    lease = "0123456789abcdef0123456789abcdef"
    mac = master.lease_hmac(lease)
    assert mac.startswith("hmac-sha256:") and lease not in mac
    assert mac == master.lease_hmac(lease)
    assert mac != C.MasterKey(os.urandom(32)).lease_hmac(lease)


def test_reprs_of_objects_holding_secrets_hide_them() -> None:
    lease = D.Lease("ab" * 16, "k", 1, "sk-CANARY-repr", "https://x", dt.datetime.now(dt.UTC))
    assert "sk-CANARY-repr" not in repr(lease) and "ab" * 16 not in repr(lease)
    new = D.NewKey("r", "k", "openai", b"sk-CANARY-repr", "https://x", (), True, {}, None)
    assert "sk-CANARY-repr" not in repr(new)


CHAIN_KEY = bytes(range(32))


def _record() -> AR.AuditRecord:
    draft = AR.AuditDraft(actor="spiffe://igw.local/router", action=AR.AuditAction.ISSUE_CREDENTIAL,
                         provider="openai", key_name="k", key_version=1, team="t", model="m", request_id="r")
    return AR.chain(draft, 1, dt.datetime(2025, 1, 1, tzinfo=dt.UTC), AR.GENESIS_HASH, CHAIN_KEY)


def test_audit_hash_covers_every_field_and_the_previous_hash() -> None:
    rec = _record()
    now = rec.created_at
    assert AR.recompute_hash(rec, CHAIN_KEY) == rec.hash and AR.hash_matches(rec, CHAIN_KEY)
    for name, value in [("team", "u"), ("key_version", 2), ("prev_hash", "1" * 64), ("sequence", 2),
                        ("created_at", now + dt.timedelta(microseconds=1)), ("outcome", "DENIED")]:
        assert AR.recompute_hash(dataclasses.replace(rec, **{name: value}), CHAIN_KEY) != rec.hash


def test_audit_hash_is_an_hmac_under_the_chain_key_not_a_plain_sha256() -> None:
    rec = _record()
    fields = rec.as_row()
    fields.pop("hash")
    canonical = AR.canonical_record(**fields)  # type: ignore[arg-type]
    assert rec.hash == hmac.new(CHAIN_KEY, canonical, hashlib.sha256).hexdigest()
    assert rec.hash != hashlib.sha256(canonical).hexdigest()
    other_key = bytes(32)
    assert not AR.hash_matches(rec, other_key)
    forged = dataclasses.replace(rec, team="u")
    forged = dataclasses.replace(forged, hash=hashlib.sha256(AR.canonical_record(
        **{**fields, "team": "u"})).hexdigest())  # type: ignore[arg-type]
    assert not AR.hash_matches(forged, CHAIN_KEY)
    with pytest.raises(ValueError):
        AR.record_hash(b"short", **fields)


def test_the_chain_key_is_stored_only_wrapped_and_only_this_master_key_unwraps_it(master: C.MasterKey) -> None:
    key = C.generate_chain_key()
    wrapped = master.wrap_chain_key(key)
    assert key not in wrapped and len(wrapped) == 12 + 32 + 16
    assert master.unwrap_chain_key(wrapped) == key
    assert master.wrap_chain_key(key) != wrapped  # fresh nonce each time
    with pytest.raises(C.DecryptionError):
        C.MasterKey(os.urandom(32)).unwrap_chain_key(wrapped)
    for bit in (0, 12 * 8 + 3, len(wrapped) * 8 - 1):
        with pytest.raises(C.DecryptionError):
            master.unwrap_chain_key(_flip(wrapped, bit))
    # Not interchangeable with the other things the master key wraps.
    with pytest.raises(C.DecryptionError):
        master.unwrap_chain_key(C.make_check_value(master))
    assert not C.verify_check_value(master, wrapped)


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("https://api.openai.com/v1", True),
        ("http://127.0.0.1:8080/v1", True),
        ("http://localhost:9000", True),
        ("http://[::1]:9000/x", True),
        ("http://vllm.inference.svc:8000/v1", True),  # a local model server, as the router admits it
        ("http://169.254.169.254/", False),
        ("http://metadata.google.internal/", False),
        ("http://0.0.0.0:8000/", False),
        ("ftp://example.com", False),
        ("https://user:pw@example.com", False),
        ("https://example.com/?q=1", False),
        ("https://example.com/#f", False),
        ("https:///nohost", False),
        ("https://exa mple.com", False),
        ("", False),
    ],
)
def test_base_urls_are_https_or_a_local_providers_http(url: str, ok: bool) -> None:
    if ok:
        assert D.check_base_url(url) == url
    else:
        with pytest.raises(Exception) as info:
            D.check_base_url(url)
        assert getattr(info.value, "reason", "") == "BASE_URL_INVALID"
        assert not url or url not in str(info.value)
