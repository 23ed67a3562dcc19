"""What the audit reads from storage: documents, rules and adapters named on-chain, each fetched once, verified
against its digests, and either returned or replaced by the reason it cannot be had. The small documents (model
cards, metrics, rules) are fetched all at once, in parallel, before the rounds are checked, and every answer is
kept (`fednode.storage.caching`): a missing document costs one timeout, however often the history names it."""
from __future__ import annotations

import json
from collections.abc import Iterable

from ..protocol.documents import MAX_DOCUMENT_BYTES, ModelCard, read_cards
from ..protocol.publish import (
    PublishError,
    fetch_adapter,
    fetch_rules,
    fetch_server_state,
    fetch_verified,
)
from ..protocol.rules import FederationRules
from ..storage import (
    EmbeddedStore,
    IpfsHttpStore,
    Storage,
    StorageError,
    StorageUnreachable,
)
from ..storage.caching import CachingStore, prefetch
from ..storage.cid import cid_from_digest
from ..timing import Stopwatch


class Sources:
    """The federation's storage as the audit sees it; fetch time goes to `watch` under "fetch"."""

    def __init__(self, store: Storage | None, watch: Stopwatch):
        self.label = _label(store)
        self.store = None if store is None else CachingStore(store)
        self.watch = watch
        self._rules: dict[bytes, FederationRules | str] = {}
        self._adapters: dict[tuple[bytes, bytes], tuple[dict, dict] | str] = {}
        self._cards: dict[bytes, ModelCard | str] = {}

    def prefetch(self, digests: Iterable[bytes]) -> None:
        """Fetch the small documents named by these raw CID digests, in parallel, into the cache."""
        if self.store is not None:
            with self.watch("fetch"):
                prefetch(self.store, (cid_from_digest(d, "raw") for d in digests if d != bytes(32)),
                         MAX_DOCUMENT_BYTES)

    def document(self, digest: bytes) -> dict | None:
        """A small JSON document (model card, metrics) named by its raw CID digest, or None."""
        if self.store is None or digest == bytes(32):
            return None
        with self.watch("fetch"):
            try:
                value = json.loads(fetch_verified(self.store, digest, digest, MAX_DOCUMENT_BYTES))
            except (PublishError, StorageError, ValueError):
                return None
        return value if isinstance(value, dict) else None

    def cards(self, participants) -> dict[str, ModelCard | str]:
        """Every participant's model card, or why it cannot be had."""
        with self.watch("fetch"):
            try:
                return read_cards(self.store, participants, self._cards)
            except StorageUnreachable as exc:
                return {address: f"model card unavailable: {exc}" for address in participants}

    def rules(self, digest: bytes) -> FederationRules | str:
        """The rules a round committed to, or why they cannot be had."""
        if digest not in self._rules:
            with self.watch("fetch"):
                try:
                    self._rules[digest] = fetch_rules(self.store, digest)
                except (PublishError, StorageError) as exc:
                    self._rules[digest] = f"rules {cid_from_digest(digest, 'raw')}: {exc}"
        return self._rules[digest]

    def adapter(self, digest: bytes, sha: bytes, rules: FederationRules) -> tuple[dict, dict] | str:
        """An adapter's tensors and metadata, or why they cannot be had."""
        key = (digest, sha)
        if key not in self._adapters:
            with self.watch("fetch"):
                try:
                    self._adapters[key] = fetch_adapter(self.store, digest, sha, rules.max_adapter_bytes,
                                                        rules.base_model)
                except (PublishError, StorageError) as exc:
                    self._adapters[key] = str(exc)
        return self._adapters[key]

    def server_state(self, meta: dict, rules: FederationRules) -> dict | None:
        """The server optimizer state a global adapter's metadata records (PublishError if it cannot be had)."""
        with self.watch("fetch"):
            return fetch_server_state(self.store, meta, rules)

    def verified(self, digest: bytes, sha: bytes, max_bytes: int) -> bytes:
        """The stored bytes named by an on-chain digest pair (PublishError if they cannot be had intact)."""
        with self.watch("fetch"):
            try:
                return fetch_verified(self.store, digest, sha, max_bytes)
            except StorageError as exc:
                raise PublishError(str(exc)) from None


def _label(store: Storage | None) -> str | None:
    if isinstance(store, EmbeddedStore):
        return f"embedded {store.root}"
    if isinstance(store, IpfsHttpStore):
        return f"ipfs {store.address}"
    return None if store is None else type(store).__name__
