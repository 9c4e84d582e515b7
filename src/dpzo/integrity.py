"""This installation's key, and the message authentication codes (HMAC-SHA256) made with it.

A cell's snapshot and its attempt log are files under ``results/``: anyone who can write there
can edit them, and a plain digest of a file can be recomputed by whoever edits it.  So the
trainer signs what it writes with a key that lives outside ``results/`` and is never published:
only a trainer of this installation (one that can read the key) can write a snapshot or an
attempt-log line that verifies.

The key is 32 random bytes in ``$DPZO_KEY_FILE``, by default
``$XDG_CONFIG_HOME/dpzo/installation.key`` (``~/.config/dpzo/installation.key``), made on
first use with mode 0600.  On a cluster every node that runs jobs must see the same file: point
``DPZO_KEY_FILE`` at a shared file system, outside ``results/``.

What it protects against: edits, copies between cells and rollbacks of those files by someone
who can write ``results/`` (a colleague, a script, a careless ``cp``), and files from another
installation.  What it does not: someone who can read the key or change the code (the owner of
the installation can always train more than the ledger says); it is integrity, not secrecy.

Torch-free, standard library only.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path

KEY_ENV = "DPZO_KEY_FILE"
KEY_BYTES = 32

_cache: dict[str, bytes] = {}


class KeyUnavailable(RuntimeError):
    """The installation key can be neither read nor made."""


def key_path() -> Path:
    """Where the installation key is: ``$DPZO_KEY_FILE``, else under the user's config folder."""
    explicit = os.environ.get(KEY_ENV)
    if explicit:
        return Path(explicit).expanduser()
    config_home = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config_home) / "dpzo" / "installation.key"


def state_dir() -> Path:
    """A folder beside the key for the installation's own records (never under ``results/``)."""
    return key_path().parent


def installation_key() -> bytes:
    """The key, made on first use (atomically: concurrent first jobs agree on one key)."""
    path = key_path()
    cached = _cache.get(str(path))
    if cached is not None:
        return cached
    try:
        key = _read_or_make(path)
    except OSError as exc:
        raise KeyUnavailable(
            f"cannot read or create this installation's key {path} ({exc}); it signs the cells' snapshots and "
            f"attempt logs. Set {KEY_ENV} to a file path in a writable folder outside results/ (on a cluster: "
            "on a file system every node sees)"
        ) from exc
    _cache[str(path)] = key
    return key


def _read_or_make(path: Path) -> bytes:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, secrets.token_bytes(KEY_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # fails if another process made the key first: then use theirs
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    key = path.read_bytes()
    if len(key) != KEY_BYTES:
        raise OSError(f"{path} holds {len(key)} bytes, not a {KEY_BYTES}-byte key")
    return key


def canonical(obj: object) -> str:
    """``obj`` as canonical JSON (sorted keys; what JSON cannot hold as its ``str``): the text
    every digest and MAC of a record is taken over."""
    return json.dumps(obj, sort_keys=True, default=str)


def canonical_digest(obj: object) -> str:
    """SHA-256 (hex) of :func:`canonical` ``obj``: a public name of a record (a run's identity, a ledger)."""
    return hashlib.sha256(canonical(obj).encode()).hexdigest()


def sign(*parts: str) -> str:
    """HMAC-SHA256 (hex) of ``parts`` under the installation key; each part is length-prefixed,
    so no two different sequences of parts are signed alike."""
    message = b"".join(len(p.encode()).to_bytes(8, "big") + p.encode() for p in parts)
    return hmac.new(installation_key(), message, hashlib.sha256).hexdigest()


def verifies(tag: object, *parts: str) -> bool:
    """Whether ``tag`` is :func:`sign` of ``parts`` (compared in constant time)."""
    return isinstance(tag, str) and hmac.compare_digest(tag, sign(*parts))
