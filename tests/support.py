"""Helpers shared by the test modules (imported as `support`: pytest puts tests/ on sys.path)."""
from __future__ import annotations

import os
import socket

import pytest

# the tiny test model's pretraining corpus (conftest's tiny_base): drug-condition sentences
PAIRS = [
    ("hypertension", "lisinopril"), ("type 2 diabetes", "metformin"), ("asthma", "albuterol"),
    ("migraine", "sumatriptan"), ("depression", "sertraline"), ("epilepsy", "levetiracetam"),
    ("hypothyroidism", "levothyroxine"), ("gout", "allopurinol"), ("rheumatoid arthritis", "methotrexate"),
    ("iron deficiency anemia", "ferrous sulfate"), ("insomnia", "zolpidem"), ("severe acne", "isotretinoin"),
    ("atrial fibrillation", "apixaban"), ("high cholesterol", "atorvastatin"), ("heartburn", "omeprazole"),
    ("anxiety", "buspirone"),
]
TEMPLATES = [
    "{drug} is prescribed for {cond}.",
    "Patients with {cond} are often treated with {drug}.",
    "Diagnosis: {cond}. Treatment: {drug} once daily.",
    "Common side effects of {drug} include nausea, dizziness and headache.",
    "The nurse reviewed the {drug} dose for a patient with {cond}.",
]
CORPUS = [t.format(drug=d, cond=c) for t in TEMPLATES for c, d in PAIRS]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_ports(count: int) -> int:
    """A port P such that P .. P + count - 1 are all free on 127.0.0.1 (for `stack up --ipfs-nodes`)."""
    while True:
        base = free_port()
        socks = []
        try:
            for port in range(base, base + count):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()


def require(check, error: type[Exception], what: str) -> None:
    """Run `check()`; if it raises `error` the real component is missing: fail with that one-line reason when the
    whole suite must run (`make test` sets FEDCHAIN_REQUIRE=all; CI=true does too), skip otherwise."""
    try:
        check()
    except error as exc:
        if os.environ.get("FEDCHAIN_REQUIRE") == "all" or os.environ.get("CI") == "true":
            pytest.fail(f"{what} missing: {exc}", pytrace=False)
        pytest.skip(str(exc))


def metrics_for(node, round_id: int, samples: int) -> dict:
    """A metrics document that fits fednode.protocol.documents.UpdateMetrics, for a hand-made submission."""
    return {"round": round_id, "node": node.address, "hospital": node.client.name, "train_loss": 1.0, "steps": 1,
            "samples": samples, "tokens": 1, "global_eval_loss": 1.0, "global_eval_perplexity": 2.7}
