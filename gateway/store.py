"""Where the Responses API keeps the responses it stored (`store: true`), for `previous_response_id`,
`GET /v1/responses/{id}`, `.../input_items` and `DELETE`.

`ResponseStore` is the interface; `SQLiteResponseStore` its one implementation: an embedded SQLite database (the
standard library's sqlite3: no server to run, durable across restarts, safe for one process), bounded by age and
count. Every record belongs to the API key that made it (by a hash of the key, never the key): another key sees
nothing. Several gateway replicas need one shared store (a request may land on any of them): an implementation over
a shared database (PostgreSQL, Redis) with these four methods, chosen by a flag, is all it takes.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class StoredResponse:
    id: str
    owner: str  # a hash of the API key that made it ("" where the gateway runs without keys)
    created_at: float
    response: dict[str, Any]  # the response object, as returned
    input_items: list[dict[str, Any]]  # this response's input items, with their ids
    conversation: list[dict[str, Any]]  # chat messages up to and including its output, for previous_response_id


class ResponseStore(Protocol):
    async def put(self, record: StoredResponse) -> None: ...

    async def get(self, response_id: str, owner: str) -> StoredResponse | None:
        """The record, if it exists and belongs to `owner`."""
        ...

    async def delete(self, response_id: str, owner: str) -> bool: ...

    async def close(self) -> None: ...


class SQLiteResponseStore:
    """One SQLite file (or ":memory:"), one connection used from worker threads under a lock, WAL journaling.

    Records older than `max_age_s` and the oldest beyond `max_count` are dropped as new ones come in."""

    def __init__(self, path: str, max_age_s: float, max_count: int) -> None:
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        self._max_age_s = max_age_s
        self._max_count = max_count
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS responses ("
                " id TEXT PRIMARY KEY, owner TEXT NOT NULL, created_at REAL NOT NULL, record TEXT NOT NULL)"
            )
            self._db.execute("CREATE INDEX IF NOT EXISTS responses_created ON responses (created_at)")

    async def put(self, record: StoredResponse) -> None:
        body = json.dumps(
            {"response": record.response, "input_items": record.input_items, "conversation": record.conversation},
            ensure_ascii=False,
        )
        await asyncio.to_thread(self._put, record, body)

    def _put(self, record: StoredResponse, body: str) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO responses (id, owner, created_at, record) VALUES (?, ?, ?, ?)",
                (record.id, record.owner, record.created_at, body),
            )
            self._db.execute("DELETE FROM responses WHERE created_at < ?", (time.time() - self._max_age_s,))
            self._db.execute(
                "DELETE FROM responses WHERE id IN (SELECT id FROM responses ORDER BY created_at DESC LIMIT -1 OFFSET ?)",
                (self._max_count,),
            )

    async def get(self, response_id: str, owner: str) -> StoredResponse | None:
        return await asyncio.to_thread(self._get, response_id, owner)

    def _get(self, response_id: str, owner: str) -> StoredResponse | None:
        with self._lock:
            row = self._db.execute(
                "SELECT created_at, record FROM responses WHERE id = ? AND owner = ? AND created_at >= ?",
                (response_id, owner, time.time() - self._max_age_s),
            ).fetchone()
        if row is None:
            return None
        body = json.loads(row[1])
        return StoredResponse(response_id, owner, row[0], body["response"], body["input_items"], body["conversation"])

    async def delete(self, response_id: str, owner: str) -> bool:
        return await asyncio.to_thread(self._delete, response_id, owner)

    def _delete(self, response_id: str, owner: str) -> bool:
        with self._lock:
            cursor = self._db.execute("DELETE FROM responses WHERE id = ? AND owner = ?", (response_id, owner))
        return cursor.rowcount > 0

    def count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    async def close(self) -> None:
        with self._lock:
            self._db.close()
