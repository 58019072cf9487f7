"""The Responses API's store (gateway/store.py) on a real SQLite file: ownership, deletion, bounds, restarts."""

from __future__ import annotations

import time

from gateway.store import SQLiteResponseStore, StoredResponse


def record(rid: str, owner: str = "a", age_s: float = 0.0) -> StoredResponse:
    return StoredResponse(rid, owner, time.time() - age_s, {"id": rid, "object": "response"},
                          [{"type": "message", "id": "msg_1"}], [{"role": "user", "content": "hi"}])


async def test_a_record_belongs_to_its_owner_and_survives_a_restart(tmp_path):
    path = str(tmp_path / "r.sqlite3")
    store = SQLiteResponseStore(path, max_age_s=3600, max_count=10)
    await store.put(record("resp_1", "a"))
    got = await store.get("resp_1", "a")
    assert got.response == {"id": "resp_1", "object": "response"} and got.conversation[0]["content"] == "hi"
    assert await store.get("resp_1", "b") is None
    assert not await store.delete("resp_1", "b")
    await store.close()
    reopened = SQLiteResponseStore(path, max_age_s=3600, max_count=10)
    assert (await reopened.get("resp_1", "a")).input_items == [{"type": "message", "id": "msg_1"}]
    assert await reopened.delete("resp_1", "a") and await reopened.get("resp_1", "a") is None
    await reopened.close()


async def test_old_and_excess_records_are_dropped():
    store = SQLiteResponseStore(":memory:", max_age_s=60, max_count=3)
    await store.put(record("old", age_s=120))
    assert await store.get("old", "a") is None  # past its age even before the next write prunes it
    for i in range(5):
        await store.put(record(f"r{i}", age_s=10 - i))
    assert store.count() == 3
    assert [await store.get(f"r{i}", "a") is not None for i in range(5)] == [False, False, True, True, True]
    await store.close()
