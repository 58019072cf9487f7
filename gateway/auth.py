"""API keys: several at once, from the environment and/or a file that is re-read when it changes or on SIGHUP.

Keys are compared in constant time and never logged or echoed: errors show a masked form, metrics a label
derived from a hash.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from pathlib import Path

from gateway.errors import Unauthorized

log = logging.getLogger(__name__)

MISSING_KEY = (
    "You didn't provide an API key. You need to provide your API key in an Authorization header using "
    "Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
)


def mask(key: str) -> str:
    """What an error may show of a key: its first three and last four characters, when it is long enough."""
    if len(key) < 12:
        return "*" * min(len(key), 8)
    return f"{key[:3]}{'*' * 8}{key[-4:]}"


def key_label(key: str) -> str:
    """A stable, non-secret name for a key, for metrics and logs."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:8]


class KeyStore:
    def __init__(self, keys: tuple[str, ...], path: str | None) -> None:
        self._static = tuple(keys)
        self._path = Path(path) if path else None
        self._file_keys: tuple[str, ...] = ()
        self._mtime: float | None = None
        self._keys: tuple[bytes, ...] = ()
        self.reload()

    @property
    def enabled(self) -> bool:
        return bool(self._keys) or self._path is not None

    def __len__(self) -> int:
        return len(self._keys)

    def reload(self) -> None:
        if self._path is not None:
            try:
                stat = self._path.stat()
                text = self._path.read_text(encoding="utf-8")
            except OSError as e:
                # Keep serving with the keys we had: a rotation that briefly removes the file must not lock everyone out.
                log.error("cannot read the API keys file %s: %s; keeping %d keys", self._path, e.strerror, len(self._keys))
                return
            self._mtime = stat.st_mtime_ns
            self._file_keys = tuple(
                line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")
            )
        keys = dict.fromkeys(self._static + self._file_keys)
        self._keys = tuple(k.encode() for k in keys)
        log.info("API keys loaded: %d", len(self._keys))

    def reload_if_changed(self) -> None:
        if self._path is None:
            return
        try:
            mtime = os.stat(self._path).st_mtime_ns
        except OSError:
            return
        if mtime != self._mtime:
            self.reload()

    def authenticate(self, authorization: str | None) -> str:
        """Return the key's label, or raise Unauthorized."""
        if not authorization:
            raise Unauthorized(MISSING_KEY)
        scheme, _, presented = authorization.partition(" ")
        presented = presented.strip()
        if scheme.lower() != "bearer" or not presented:
            raise Unauthorized(MISSING_KEY)
        candidate = presented.encode()
        match = False
        # Every key is compared, in constant time each, so the time taken says nothing about which one matched.
        for key in self._keys:
            match |= hmac.compare_digest(candidate, key)
        if not match:
            raise Unauthorized(f"Incorrect API key provided: {mask(presented)}.")
        return key_label(presented)
