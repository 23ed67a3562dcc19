"""Answers kept for the length of one job (a round's verification, an audit): small objects by CID and every
failure, so a missing object costs one timeout however often it is named; and many small objects fetched at
once, in parallel."""
from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

from .stores import Storage, StorageError, StorageTooLarge

CACHED_BYTES = 1 << 20  # objects up to this size are kept in memory (documents, small adapters)
PARALLEL_FETCHES = 16


class CachingStore:
    """A store whose answers are kept: small objects by CID, and every failure (not found, timed out)."""

    def __init__(self, store: Storage):
        self.store = store
        self._got: dict[str, bytes | StorageError] = {}
        self._has: dict[str, bool | StorageError] = {}

    def get(self, cid: str, max_bytes: int | None = None) -> bytes:
        answer = self._got.get(cid)
        if answer is None:
            try:
                answer = self.store.get(cid, max_bytes=max_bytes)
            except StorageTooLarge:
                raise
            except StorageError as exc:
                answer = exc
            if isinstance(answer, StorageError) or len(answer) <= CACHED_BYTES:
                self._got[cid] = answer
        if isinstance(answer, StorageError):
            raise answer
        if max_bytes is not None and len(answer) > max_bytes:
            raise StorageTooLarge(f"CID {cid} is over the {max_bytes}-byte limit")
        return answer

    def has(self, cid: str) -> bool:
        if cid not in self._has:
            try:
                self._has[cid] = self.store.has(cid)
            except StorageError as exc:
                self._has[cid] = exc
        answer = self._has[cid]
        if isinstance(answer, StorageError):
            raise answer
        return answer

    def put(self, data: bytes) -> str:
        return self.store.put(data)

    def pin(self, cid: str) -> None:
        self.store.pin(cid)


def prefetch(store: CachingStore, cids: Iterable[str], max_bytes: int) -> None:
    """Fetch these objects in parallel into the cache (failures are kept too, for whoever needs them)."""
    cids = sorted(set(cids))
    if not cids:
        return

    def quietly(cid: str) -> None:
        try:
            store.get(cid, max_bytes=max_bytes)
        except StorageError:
            pass

    with ThreadPoolExecutor(min(PARALLEL_FETCHES, len(cids))) as pool:
        list(pool.map(quietly, cids))
