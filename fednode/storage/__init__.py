"""Content-addressed storage: CIDs computed here (``cid``), and the stores behind one interface (``stores``):
an embedded directory or any IPFS node over its Kubo RPC API."""
from .files import write_atomic
from .stores import (EmbeddedStore, IpfsHttpStore, Storage, StorageError, StorageTooLarge, StorageUnreachable,
                     open_storage)

__all__ = ["EmbeddedStore", "IpfsHttpStore", "Storage", "StorageError", "StorageTooLarge", "StorageUnreachable",
           "open_storage", "write_atomic"]
