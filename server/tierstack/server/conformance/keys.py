"""The contract every KeyStore backend keeps, as pytest tests that take a ``store`` fixture."""

from __future__ import annotations

import asyncio

from tierstack.server.auth.keys import MAX_LISTED, KeyStore, Role, issue, matches, parse

__all__ = [
    "test_a_key_is_kept_as_a_digest_and_found_by_its_id",
    "test_a_key_is_revoked_once",
    "test_keys_are_listed_a_page_at_a_time",
]


async def test_a_key_is_kept_as_a_digest_and_found_by_its_id(store: KeyStore) -> None:
    issued = issue("acme", Role.RUN, "ci")
    await store.add(issued)
    found = await store.find(issued.key.key_id)
    assert found is not None
    key, digest = found
    assert key == issued.key
    parsed = parse(issued.token)
    assert parsed is not None and parsed[0] == key.key_id
    assert matches(parsed[1], digest) and not matches(parsed[1][::-1], digest)
    assert parsed[1].encode() not in digest
    assert await store.find("0" * 16) is None


async def test_a_key_is_revoked_once(store: KeyStore) -> None:
    issued = issue("acme", Role.READ)
    await store.add(issued)
    revoked = await asyncio.gather(*(store.revoke(issued.key.key_id) for _ in range(4)))
    assert revoked.count(True) == 1  # of concurrent revokers, one revoked it
    found = await store.find(issued.key.key_id)
    assert found is not None and found[0].revoked
    assert not await store.revoke("f" * 16)


async def test_keys_are_listed_a_page_at_a_time(store: KeyStore) -> None:
    made = sorted([issue(f"t{n}", Role.READ) for n in range(7)], key=lambda i: i.key.key_id)
    for issued in made:
        await store.add(issued)
    first = await store.keys(limit=4)
    rest = await store.keys(after=first[-1].key_id, limit=4)
    assert [k.key_id for k in first + rest] == [i.key.key_id for i in made]
    assert await store.keys(after=made[-1].key.key_id) == []
    assert len(await store.keys(limit=MAX_LISTED * 2)) == 7
