"""The small JSON documents a federation publishes beside its adapters, with their schemas: the model card a
hospital joins with (its model, adapter and the size of the training set it declares, committed on-chain as the
card's digest) and the metrics document every update carries (committed on-chain as `metricsDigest`)."""
from __future__ import annotations

import json
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from ..storage import Storage
from .publish import PublishError, fetch_verified

MAX_DOCUMENT_BYTES = 64 * 1024
Finite = Annotated[float, Field(allow_inf_nan=False)]


class DocumentError(ValueError):
    """A document that is missing (`missing`) or does not fit its schema."""

    def __init__(self, message: str, missing: bool = False):
        super().__init__(message)
        self.missing = missing


class ModelCard(BaseModel):
    """What a hospital publishes when it joins; `dataset_size` bounds the samples any of its updates may claim."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    node: StrictStr
    hospital: StrictStr
    base_model: StrictStr
    adapter: dict
    dataset_size: StrictInt = Field(ge=1)
    description: StrictStr | None = None
    secagg_key: StrictStr | None = None        # X25519 public key for secure aggregation (hex) ...
    secagg_signature: StrictStr | None = None  # ... signed by the node's wallet (fednode.protocol.secagg.keys)


class UpdateMetrics(BaseModel):
    """What a node reports with each update."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    round: StrictInt = Field(ge=1)
    node: StrictStr
    hospital: StrictStr
    train_loss: Finite
    steps: StrictInt = Field(ge=1)
    samples: StrictInt = Field(ge=1)
    tokens: StrictInt = Field(ge=0)
    global_eval_loss: Finite
    global_eval_perplexity: Finite
    personal_eval_loss: Finite | None = None
    orthogonality: Finite | None = None
    privacy: dict | None = None


def fetch_document(store: Storage, digest: bytes, schema: type[BaseModel], max_bytes: int = MAX_DOCUMENT_BYTES):
    """The document named by a raw CID digest, parsed with `schema`; DocumentError says why not (StorageUnreachable
    when the store does not answer at all: no verdict on the document)."""
    try:
        data = fetch_verified(store, digest, digest, max_bytes)
    except PublishError as exc:
        raise DocumentError(str(exc), missing=True) from None
    try:
        return schema.model_validate(json.loads(data))
    except (ValueError, ValidationError) as exc:
        first = exc.errors()[0] if isinstance(exc, ValidationError) else None
        where = f"{'.'.join(map(str, first['loc'])) or 'document'}: {first['msg']}" if first else str(exc)
        raise DocumentError(f"{schema.__name__}: {where}") from None


def read_cards(store: Storage, participants, cache: dict[bytes, ModelCard | str]) -> dict[str, ModelCard | str]:
    """Every participant's model card (by the digest it joined with), or why it has none; `cache` keeps them
    between rounds (a card's digest names its bytes for good)."""
    out = {}
    for address, p in participants.items():
        if p.metadata_digest not in cache:
            try:
                cache[p.metadata_digest] = fetch_document(store, p.metadata_digest, ModelCard)
            except DocumentError as exc:
                cache[p.metadata_digest] = str(exc)
        out[address] = cache[p.metadata_digest]
    return out
