"""Envelope encryption of provider keys, and the keys derived from the master key.

    master key (32 bytes, from IGW_VAULT_MASTER_KEY[_FILE]; never stored)
      ├── wraps one fresh data key per key version   AES-256-GCM, AD = wrap binding
      │     └── encrypts that version's secret         AES-256-GCM, AD = secret binding
      ├── encrypts the check value in vault_meta       detects a wrong master key at start
      ├── HKDF -> audit-chain wrapping key
      │     └── wraps the audit chain key (vault_meta)  HMAC-SHA256 key of every audit record
      ├── HKDF -> lease-id HMAC key                    audit records hold HMAC(lease id) only
      └── HKDF -> request fingerprint HMAC key         admin idempotency without storing hashes
                                                       of secrets that anyone could recompute

Associated data binds every ciphertext to (key name, provider, version), and every wrapped
data key additionally to the master key id, so a ciphertext or wrapped key copied into
another row fails to decrypt. Nonces are 96 bits from the OS CSPRNG; a data key encrypts
exactly one secret, so nonce reuse under one key cannot happen by construction.

The audit chain key is random (32 bytes, made once per vault) rather than derived directly
from the master key, so that ``igw vault rewrap`` can move it to a new master key like any
data key: a chain keyed straight off the master key would stop verifying at the first
rewrap, since the old master key is gone by then. Only its wrapped form is stored.

Every failure to decrypt raises :class:`DecryptionError` (fail closed): no partial plaintext
is ever returned, and the error carries no key or ciphertext bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32
NONCE_BYTES = 12
_SECRET_AD = b"igw-keyvault/v1|"
_WRAP_AD = b"igw-keyvault/v1/wrap|"
_CHECK_AD = b"igw-keyvault/v1/check|"
_CHAIN_KEY_AD = b"igw-keyvault/v1/audit-chain-key|"
_CHECK_PLAINTEXT = b"igw-keyvault master key check v1"
_KEY_ID_PREFIX = b"igw-master-key-id"
_URLSAFE_B64 = re.compile(r"^[A-Za-z0-9_-]+={0,2}\Z")


class MasterKeyError(Exception):
    """The master key is missing, malformed or not the one this vault was sealed with.

    Messages name the setting and the problem, never any key bytes.
    """


class DecryptionError(Exception):
    """A ciphertext or wrapped data key did not authenticate (tampered, moved or wrong key)."""


class MasterKey:
    """The 32-byte master key. Its repr and str never show the bytes."""

    __slots__ = ("_chain_wrap_key", "_fingerprint_hmac_key", "_key", "_lease_hmac_key", "key_id")

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, bytes) or len(key) != KEY_BYTES:
            raise MasterKeyError(f"the master key must be exactly {KEY_BYTES} bytes")
        self._key = key
        self.key_id = master_key_id(key)
        self._lease_hmac_key = _hkdf(key, b"igw-keyvault/v1/lease-id-hmac")
        self._fingerprint_hmac_key = _hkdf(key, b"igw-keyvault/v1/request-fingerprint")
        self._chain_wrap_key = _hkdf(key, b"igw-keyvault/v1/audit-chain-key-wrap")

    def __repr__(self) -> str:
        return f"MasterKey(key_id={self.key_id!r})"

    __str__ = __repr__

    def aead(self) -> AESGCM:
        """An AES-256-GCM instance under the master key (for wrapping)."""
        return AESGCM(self._key)

    def lease_hmac(self, lease_id: str) -> str:
        """``hmac-sha256:<hex>`` of a lease id, with a key derived from the master key."""
        mac = hmac.new(self._lease_hmac_key, lease_id.encode(), hashlib.sha256).hexdigest()
        return f"hmac-sha256:{mac}"

    def wrap_chain_key(self, chain_key: bytes) -> bytes:
        """nonce || AES-GCM(HKDF(master), chain key): the audit chain key as stored in vault_meta."""
        if len(chain_key) != KEY_BYTES:
            raise ValueError("the audit chain key must be 32 bytes")
        nonce = os.urandom(NONCE_BYTES)
        return nonce + AESGCM(self._chain_wrap_key).encrypt(nonce, chain_key, _CHAIN_KEY_AD + self.key_id.encode())

    def unwrap_chain_key(self, value: bytes) -> bytes:
        """The audit chain key from its stored form; DecryptionError if it does not authenticate."""
        nonce, body = value[:NONCE_BYTES], value[NONCE_BYTES:]
        try:
            key = AESGCM(self._chain_wrap_key).decrypt(nonce, body, _CHAIN_KEY_AD + self.key_id.encode())
        except (InvalidTag, ValueError):
            raise DecryptionError("the audit chain key does not authenticate") from None
        if len(key) != KEY_BYTES:
            raise DecryptionError("the audit chain key has the wrong length")
        return key

    def request_fingerprint(self, payload: bytes) -> str:
        """A keyed fingerprint of an admin request (which may contain a secret)."""
        return hmac.new(self._fingerprint_hmac_key, payload, hashlib.sha256).hexdigest()


def _hkdf(key: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(key)


def master_key_id(key: bytes) -> str:
    """First 8 hex digits of SHA-256(b"igw-master-key-id" + key): names a key without revealing it."""
    return hashlib.sha256(_KEY_ID_PREFIX + key).hexdigest()[:8]


def decode_master_key(text: str, source: str) -> MasterKey:
    """Parses base64 of exactly 32 bytes; errors name ``source`` and the problem only."""
    stripped = "".join(text.split())
    if not stripped:
        raise MasterKeyError(f"{source} is empty")
    try:
        raw = base64.b64decode(stripped, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
        if _URLSAFE_B64.match(stripped):
            try:
                raw = base64.urlsafe_b64decode(stripped)
            except (binascii.Error, ValueError):
                raw = b""
        if not raw:
            raise MasterKeyError(f"{source} is not valid base64") from None
    if len(raw) != KEY_BYTES:
        raise MasterKeyError(f"{source} decodes to {len(raw)} bytes; exactly {KEY_BYTES} are required")
    return MasterKey(raw)


def load_master_key(env: Mapping[str, str]) -> MasterKey:
    """The master key from IGW_VAULT_MASTER_KEY, else from the file IGW_VAULT_MASTER_KEY_FILE."""
    inline = env.get("IGW_VAULT_MASTER_KEY", "")
    path = env.get("IGW_VAULT_MASTER_KEY_FILE", "")
    if inline:
        return decode_master_key(inline, "IGW_VAULT_MASTER_KEY")
    if path:
        try:
            text = Path(path).read_text()
        except OSError as err:
            raise MasterKeyError(
                f"IGW_VAULT_MASTER_KEY_FILE cannot be read ({err.strerror or type(err).__name__})"
            ) from None
        return decode_master_key(text, "IGW_VAULT_MASTER_KEY_FILE")
    raise MasterKeyError("no master key: set IGW_VAULT_MASTER_KEY or IGW_VAULT_MASTER_KEY_FILE")


def secret_ad(name: str, provider: str, version: int) -> bytes:
    """The associated data of a secret: its key name, provider and version, canonically."""
    return _SECRET_AD + json.dumps([name, provider, int(version)], separators=(",", ":")).encode()


def wrap_ad(name: str, provider: str, version: int, key_id: str) -> bytes:
    """The associated data of a wrapped data key: the secret's binding plus the master key id."""
    return _WRAP_AD + json.dumps([name, provider, int(version), key_id], separators=(",", ":")).encode()


@dataclass(frozen=True, slots=True)
class SealedSecret:
    """One encrypted key version as stored: nothing here is secret without the master key."""

    ciphertext: bytes
    nonce: bytes
    wrapped_data_key: bytes
    wrap_nonce: bytes
    master_key_id: str


def seal(master: MasterKey, name: str, provider: str, version: int, secret: bytes) -> SealedSecret:
    """Encrypts ``secret`` under a fresh data key, and wraps that data key with the master key."""
    data_key = AESGCM.generate_key(bit_length=256)
    nonce = os.urandom(NONCE_BYTES)
    ciphertext = AESGCM(data_key).encrypt(nonce, secret, secret_ad(name, provider, version))
    wrap_nonce = os.urandom(NONCE_BYTES)
    wrapped = master.aead().encrypt(wrap_nonce, data_key, wrap_ad(name, provider, version, master.key_id))
    return SealedSecret(ciphertext, nonce, wrapped, wrap_nonce, master.key_id)


def unwrap_data_key(master: MasterKey, name: str, provider: str, version: int, sealed: SealedSecret) -> bytes:
    """The plaintext data key of one version; DecryptionError if anything does not authenticate."""
    if sealed.master_key_id != master.key_id:
        raise DecryptionError("data key is wrapped by another master key")
    try:
        key = master.aead().decrypt(
            sealed.wrap_nonce, sealed.wrapped_data_key, wrap_ad(name, provider, version, master.key_id)
        )
    except (InvalidTag, ValueError):
        raise DecryptionError("wrapped data key does not authenticate") from None
    if len(key) != KEY_BYTES:
        raise DecryptionError("wrapped data key has the wrong length")
    return key


def open_secret(data_key: bytes, name: str, provider: str, version: int, sealed: SealedSecret) -> bytes:
    """Decrypts one secret with its data key; DecryptionError (never partial output) on failure."""
    try:
        return AESGCM(data_key).decrypt(sealed.nonce, sealed.ciphertext, secret_ad(name, provider, version))
    except (InvalidTag, ValueError):
        raise DecryptionError("secret does not authenticate") from None


def decrypt(master: MasterKey, name: str, provider: str, version: int, sealed: SealedSecret) -> bytes:
    """Unwraps the data key and decrypts the secret."""
    return open_secret(unwrap_data_key(master, name, provider, version, sealed), name, provider, version, sealed)


def rewrap_data_key(
    old: MasterKey, new: MasterKey, name: str, provider: str, version: int, sealed: SealedSecret
) -> SealedSecret:
    """Moves one data key from ``old`` to ``new`` master key; the secret's ciphertext is untouched."""
    data_key = unwrap_data_key(old, name, provider, version, sealed)
    wrap_nonce = os.urandom(NONCE_BYTES)
    wrapped = new.aead().encrypt(wrap_nonce, data_key, wrap_ad(name, provider, version, new.key_id))
    return SealedSecret(sealed.ciphertext, sealed.nonce, wrapped, wrap_nonce, new.key_id)


def generate_chain_key() -> bytes:
    """A fresh audit chain key (HMAC-SHA256 key of the audit log), made once per vault."""
    return os.urandom(KEY_BYTES)


def make_check_value(master: MasterKey) -> bytes:
    """nonce || AES-GCM(master, constant): stored once, proves at start that the key is right."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + master.aead().encrypt(nonce, _CHECK_PLAINTEXT, _CHECK_AD + master.key_id.encode())


def verify_check_value(master: MasterKey, value: bytes) -> bool:
    """True when ``value`` was made by :func:`make_check_value` with this master key."""
    nonce, body = value[:NONCE_BYTES], value[NONCE_BYTES:]
    try:
        plain = master.aead().decrypt(nonce, body, _CHECK_AD + master.key_id.encode())
    except (InvalidTag, ValueError):
        return False
    return hmac.compare_digest(plain, _CHECK_PLAINTEXT)


def secret_fingerprint(secret: bytes) -> str:
    """The last 4 hex digits of SHA-256(secret): tells versions apart, reveals ~16 bits."""
    return hashlib.sha256(secret).hexdigest()[-4:]
