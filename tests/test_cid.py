import hashlib
import random

import pytest
from aleph_cid import CidHasher

from fednode.storage.cid import (
    CHUNK_SIZE,
    MAX_LINKS,
    CIDError,
    cid_codec,
    cid_digest,
    cid_from_digest,
    cid_of,
    normalize_cid,
)

EMPTY_FILE = "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"
# The empty UnixFS directory, a well-known dag-pb block, as CIDv0 / base58btc CIDv1 / base32 CIDv1.
EMPTY_DIR_V0 = "QmUNLLsPACCz1vLxQVkXqqLX5R1X345qqfHbsf67hvA3Nn"
EMPTY_DIR_Z = "zdj7WbTaiJT1fgatdet9Ei9iDB5hdCxkbVyhyh8YTUnXMiwYi"
EMPTY_DIR = "bafybeiczsscdsbs7ffqz55asqdf3smv6klcw3gofszvwlyarci47bgf354"
EMPTY_FILE_Z = "zb2rhmy65F3REf8SZp7De11gxtECBGgUKaLdiDj7MCGCHxbDW"


def payload(size: int) -> bytes:
    return random.Random(size).randbytes(size)


def reference_cid(data: bytes) -> str:
    """aleph-cid's independent implementation of Kubo's ``add --cid-version=1`` (raw leaves)."""
    hasher = CidHasher.for_ipfs_v1_raw_leaves()
    hasher.update(data)
    return hasher.finalize()


SIZES = {
    "0 B": 0,
    "1 B": 1,
    "1 KiB": 1024,
    "one full chunk": CHUNK_SIZE,
    "two chunks": CHUNK_SIZE + 1,
    "5 MiB": 5 * 2**20,
    "one full tree level": MAX_LINKS * CHUNK_SIZE,
    "two tree levels": MAX_LINKS * CHUNK_SIZE + 1,
}


@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
def test_cid_of_matches_aleph_cid(size):
    data = payload(size)
    assert cid_of(data) == reference_cid(data)


def test_empty_file_cid_is_the_known_one():
    assert cid_of(b"") == EMPTY_FILE


def test_single_chunk_is_a_raw_block_of_its_sha256():
    data = payload(CHUNK_SIZE)
    cid = cid_of(data)
    assert cid_codec(cid) == "raw"
    assert cid_digest(cid) == hashlib.sha256(data).digest()


def test_multi_chunk_root_is_dag_pb():
    assert cid_codec(cid_of(payload(CHUNK_SIZE + 1))) == "dag-pb"


@pytest.mark.parametrize("size", [0, 1024, 3 * CHUNK_SIZE])
def test_digest_round_trip(size):
    cid = cid_of(payload(size))
    digest = cid_digest(cid)
    assert len(digest) == 32
    assert cid_from_digest(digest, cid_codec(cid)) == cid


def test_cid_from_digest_codec_changes_the_cid():
    digest = hashlib.sha256(b"x").digest()
    raw, dag = cid_from_digest(digest, "raw"), cid_from_digest(digest, "dag-pb")
    assert raw.startswith("bafkrei") and dag.startswith("bafybei")
    assert cid_digest(raw) == cid_digest(dag) == digest


@pytest.mark.parametrize(
    "text, expected",
    [
        (EMPTY_DIR_V0, EMPTY_DIR),
        (EMPTY_DIR_Z, EMPTY_DIR),
        (EMPTY_DIR, EMPTY_DIR),
        (EMPTY_DIR.upper(), EMPTY_DIR),
        (EMPTY_FILE_Z, EMPTY_FILE),
    ],
)
def test_normalize_known_pairs(text, expected):
    assert normalize_cid(text) == expected


def test_cidv0_is_dag_pb_with_the_same_digest():
    assert cid_codec(EMPTY_DIR_V0) == "dag-pb"
    assert cid_digest(EMPTY_DIR_V0) == cid_digest(EMPTY_DIR)


@pytest.mark.parametrize("size", [1024, 3 * CHUNK_SIZE])
def test_normalize_agrees_with_py_cid(size):
    py_cid = pytest.importorskip("cid")
    cid = cid_of(payload(size))
    parsed = py_cid.make_cid(cid)
    assert normalize_cid(parsed.encode("base58btc").decode()) == cid
    if cid_codec(cid) == "dag-pb":
        assert normalize_cid(str(parsed.to_v0())) == cid


@pytest.mark.parametrize(
    "text",
    [
        "",
        "hello",
        "bafy",
        "b" + "a" * 200,
        EMPTY_DIR[:-4],
        EMPTY_DIR_V0[:-1] + "0",  # '0' is not base58btc
        "bagaaierasords4njcts6vs7qvdjfcvgnume4hqohf65zsfguprqphs3icwea",  # dag-json codec
        "../etc/passwd",
    ],
)
def test_not_a_cid(text):
    with pytest.raises(CIDError):
        normalize_cid(text)


def test_identity_multihash_is_unsupported():
    with pytest.raises(CIDError, match="^unsupported multihash"):
        cid_digest("bafkqaaa")


@pytest.mark.parametrize("digest, codec", [(b"\0" * 31, "raw"), (b"\0" * 32, "dag-cbor")])
def test_cid_from_digest_rejects_bad_input(digest, codec):
    with pytest.raises(CIDError):
        cid_from_digest(digest, codec)

