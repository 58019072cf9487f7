"""API keys: several at once, from the environment and/or a file that is re-read when it changes or on SIGHUP.

Keys are compared in constant time and never logged or echoed: errors show a masked form, metrics a label
derived from a hash.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from gateway.errors import Unauthorized
from gateway.limits import KeyLimits

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


@dataclass(frozen=True, slots=True)
class Caller:
    label: str
    limits: KeyLimits
    # Whose stored objects (responses) are whose: a full hash of the key, never the key itself.
    owner: str = ""


def parse_key_line(line: str, default: KeyLimits) -> tuple[str, KeyLimits] | None:
    """`sk-abc... rpm=60 tpm=100000`: a key, then optional limits that override the gateway's defaults."""
    line = line.strip()
    if not line or line.startswith("#"):
        return None
    key, *options = line.split()
    values = {"rpm": default.rpm, "tpm": default.tpm}
    for number, option in enumerate(options, start=2):
        name, _, value = option.partition("=")
        if name in values and value.isdigit():
            values[name] = int(value)
        else:
            # Never the option's text: a line holding two keys (an easy mistake) would put the second in the log.
            log.error(
                "ignoring word %d on the API key line of %s: not rpm=N or tpm=N (one key per line)", number, mask(key)
            )
    return key, KeyLimits(**values)


class KeyStore:
    def __init__(self, keys: tuple[str, ...], path: str | None, default_limits: KeyLimits = KeyLimits()) -> None:
        self._default = default_limits
        self._static = tuple(keys)
        self._path = Path(path) if path else None
        self._file_keys: dict[str, KeyLimits] = {}
        self._mtime: float | None = None
        self._keys: tuple[tuple[bytes, Caller], ...] = ()
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
            parsed = (parse_key_line(line, self._default) for line in text.splitlines())
            self._file_keys = dict(p for p in parsed if p is not None)
        keys = {k: self._default for k in self._static} | self._file_keys
        self._keys = tuple(
            (k.encode(), Caller(key_label(k), limits, hashlib.sha256(k.encode()).hexdigest())) for k, limits in keys.items()
        )
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

    def is_key(self, text: str) -> bool:
        """Whether `text` is one of the keys (compared as authenticate compares them)."""
        candidate = text.encode()
        found = False
        for key, _ in self._keys:
            found |= hmac.compare_digest(candidate, key)
        return found

    def authenticate(self, authorization: str | None) -> Caller:
        """Return who is calling (the key's label and limits), or raise Unauthorized."""
        if not authorization:
            raise Unauthorized(MISSING_KEY)
        scheme, _, presented = authorization.partition(" ")
        presented = presented.strip()
        if scheme.lower() != "bearer" or not presented:
            raise Unauthorized(MISSING_KEY)
        candidate = presented.encode()
        caller = None
        # Every key is compared, in constant time each, so the time taken says nothing about which one matched.
        for key, who in self._keys:
            if hmac.compare_digest(candidate, key):
                caller = who
        if caller is None:
            raise Unauthorized(f"Incorrect API key provided: {mask(presented)}.")
        return caller
