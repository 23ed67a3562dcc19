"""`fedchain audit`: a clean history re-verifies bit for bit in a separate process; every kind of dishonest
aggregator and storage tampering is caught and named; the HTML report renders in headless Chromium.

The history lives on a real anvil chain so that the audit can run as its own process, as an outside auditor would."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
from support import free_port, require

from chain.clients import Federation
from chain.connection import connect
from chain.errors import ChainError
from fednode.audit import AuditReport, Status, run_audit
from fednode.audit.reconstruct import Reconstruction
from fednode.learning.adapters import LoraTrainer
from fednode.learning.data import DataConfig, build_clients
from fednode.learning.privacy import DPSettings, epsilon
from fednode.learning.settings import LoraSettings, TrainSettings
from fednode.ops.cli import main
from fednode.ops.embedded import EmbeddedFederation
from fednode.protocol.aggregator import AggregatorError
from fednode.protocol.packaging import SERVER_STATE_KEY, pack_adapter, unpack_adapter
from fednode.protocol.publish import locate, publish_bytes, publish_json
from fednode.protocol.rules import FederationRules
from fednode.protocol.verify import Reason
from fednode.storage import EmbeddedStore
from fednode.storage.cid import cid_digest, cid_of
from fednode.strategies.base import WeightedUpdate
from fednode.strategies.fedavg import FedAvg

ROOT = Path(__file__).resolve().parent.parent
FEDCHAIN = [sys.executable, "-m", "fednode"]
LORA = LoraSettings()
TRAIN = TrainSettings(steps=4, batch_size=4)
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VERIFIED_GREEN, MISMATCH_RED = 0x2E7D32, 0xC62828  # badge colours of fednode.audit.html


class World:
    """A federation (on anvil, or the embedded chain) with an embedded store: three honest hospitals with 8, 16
    and 24 training examples (so sample weighting matters), a fourth node that misbehaves, and an aggregator that
    can be made to cheat."""

    def __init__(self, rpc: str, work: Path, base, trainer, aggregation: str = "fedavg", privacy: dict | None = None,
                 submit: list[str] | str = "direct"):
        self.store = EmbeddedStore(work / "store")
        rules = FederationRules(base_model=base.digest, lora=LORA.to_json(), max_adapter_bytes=1 << 20,
                                aggregation=aggregation, privacy=privacy or {})
        clients = [replace(c, train=c.train[:8 * (i + 1)])
                   for i, c in enumerate(build_clients(DataConfig(num_clients=4, train_per_client=24, eval_per_client=8)))]
        self.fed = EmbeddedFederation.create([trainer] * 4, clients, rules, TRAIN, self.store, w3=connect(rpc),
                                             first_account=300, submit=submit)
        self.w3, self.deployment, self.admin_fed, self.agg = (self.fed.w3, self.fed.deployment, self.fed.admin,
                                                              self.fed.aggregator)
        self.deployment.save(work / "deployment.json")
        self.nodes, self.attacker = self.fed.nodes[:3], self.fed.nodes[3]
        self.fed.start(trainer.initial_state(0))
        self.finalized_sha: dict[int, str] = {}  # round -> sha256 of the global adapter the aggregator published

    def open_and_submit(self):
        rec = self.fed.open()
        for node in self.nodes:
            node.participate(rec)
        return rec

    def honest_round(self, attack=lambda rec: None) -> int:
        rec = self.open_and_submit()
        attack(rec)
        result = self.fed.finalize(rec)
        self.finalized_sha[result.round_id] = result.file_sha256.hex()
        return result.round_id

    def dishonest_round(self, merge: list[int], claims: list[int], weighting: str = "num_samples",
                        before_finalize=lambda: None) -> int:
        """Merge the updates at `merge` (repeats count twice) with `weighting`, but claim `claims` on-chain."""
        rec = self.open_and_submit()
        before_finalize()
        start, _ = self.agg.verify(rec)
        subs = self.agg.ledger.refresh().rounds[rec.round_id].submissions
        states = {s.index: unpack_adapter(self.store.get(locate(self.store, s.cid_digest, s.file_sha256)), 1 << 20)[0]
                  for s in subs}
        merged = FedAvg(weighting).aggregate_train(start, [
            WeightedUpdate(i, subs[i].num_samples, states[i], file_sha256=subs[i].file_sha256) for i in merge])
        _, digest, sha = self.agg.publish_global(rec.round_id, merged)
        self.agg.fed.finalize(rec.round_id, digest, sha, bytes(claims))
        self.fed.base = (digest, sha)
        return rec.round_id


@dataclass
class Audited:
    world: World
    work: Path
    clean: subprocess.CompletedProcess     # CLI audit after the honest rounds
    clean_json: dict
    full: subprocess.CompletedProcess      # CLI audit after the dishonest rounds
    full_json: dict
    report: AuditReport                    # the same audit in this process
    rounds: dict[str, int]


def audit_cli(world: World, work: Path, name: str) -> tuple[subprocess.CompletedProcess, dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(FEDCHAIN + ["audit", "--rpc", world.w3.provider.endpoint_uri, "--deployment",
                                      str(work / "deployment.json"), "--store", str(work / "store"), "--verify",
                                      "--json", str(work / f"{name}.json"), "--html", str(work / f"{name}.html")],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc, json.loads((work / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def trainer(icd_base) -> LoraTrainer:
    return LoraTrainer(icd_base, LORA)


@pytest.fixture(scope="module")
def audited(anvil, icd_base, trainer, tmp_path_factory) -> Audited:
    work = tmp_path_factory.mktemp("audit")
    world = World(anvil.url, work, icd_base, trainer)
    attacker, late = world.attacker, []

    def nan_update(rec):
        update = attacker.train(rec)
        state, meta = unpack_adapter(update.data, 1 << 20)
        state = {k: v.clone() for k, v in state.items()}
        state[sorted(state)[0]].view(-1)[0] = float("nan")
        attacker.publish_and_submit(rec.round_id, pack_adapter(state, meta), update.num_samples, update.metrics)

    def late_upload(rec):  # anchored on-chain, but the bytes reach storage only after the round
        update = attacker.train(rec)
        late.append(update.data)
        _, metrics_digest = publish_json(world.store, update.metrics)
        attacker.fed.submit_update(rec.round_id, cid_digest(cid_of(update.data)), hashlib.sha256(update.data).digest(),
                                   update.num_samples, metrics_digest)

    rounds = {"honest 1": world.honest_round(nan_update), "honest 2": world.honest_round(late_upload)}
    world.store.put(late[0])
    clean, clean_json = audit_cli(world, work, "clean")

    rounds["dropped"] = world.dishonest_round([0, 2], [0, 0, 0])
    rounds["duplicated"] = world.dishonest_round([0, 1, 1, 2], [0, 0, 0])
    rounds["reweighted"] = world.dishonest_round([0, 1, 2], [0, 0, 0], weighting="uniform")
    rounds["honest rejected"] = world.dishonest_round([0, 2], [0, Reason.NORM_TOO_LARGE, 0])
    rounds["tampered"] = world.honest_round()
    sub = world.agg.ledger.refresh().rounds[rounds["tampered"]].submissions[1]
    path = world.store.path_of(locate(world.store, sub.cid_digest, sub.file_sha256))
    data = path.read_bytes()
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    rounds["revoked merged"] = world.dishonest_round(
        [0, 1, 2], [0, 0, 0], before_finalize=lambda: world.admin_fed.revoke(world.nodes[2].address, 1))
    full, full_json = audit_cli(world, work, "full")
    report = run_audit(world.w3, world.deployment, world.store, verify=True)
    return Audited(world, work, clean, clean_json, full, full_json, report, rounds)


def round_of(audited: Audited, name: str):
    return next(r for r in audited.report.rounds if r.round_id == audited.rounds[name])


def messages(audited: Audited, name: str) -> list[str]:
    return [f.message for f in round_of(audited, name).findings]


@pytest.mark.anvil
def test_clean_history_reverifies_bit_for_bit_in_a_separate_process(audited):
    assert audited.clean.returncode == 0, audited.clean.stdout[-3000:] + audited.clean.stderr
    assert audited.clean.stdout.strip().endswith("audit: 2 rounds VERIFIED")
    rounds = audited.clean_json["rounds"]
    assert [r["status"] for r in rounds] == ["VERIFIED", "VERIFIED"]
    for r in rounds:
        # the other process re-verified every update and re-derived the aggregator's exact bytes
        assert r["result"]["recomputed_merged"] == r["result"]["merged"] == [0, 1, 2]
        assert r["result"]["recomputed_sha256"] == audited.world.finalized_sha[r["round_id"]]
        assert [s["num_samples"] for s in r["submissions"][:3]] == [8, 16, 24]
        assert all(s["metrics"]["hospital"] == s["hospital"] and s["gas"] > 0 for s in r["submissions"][:3])
    # the honest aggregator's rejections are reproduced too; an update uploaded after its round is only noted
    assert [s["recomputed"] for s in rounds[0]["submissions"]] == ["ACCEPTED"] * 3 + ["NON_FINITE"]
    assert [s["verdict"] for s in rounds[1]["submissions"]] == ["ACCEPTED"] * 3 + ["UNAVAILABLE"]
    assert rounds[1]["notes"] == ["update #3 from hospital-3 was rejected as UNAVAILABLE at aggregation time; "
                                  "verification now gives ACCEPTED"]
    assert [p["hospital"] for p in audited.clean_json["participants"]] == [f"hospital-{i}" for i in range(4)]


@pytest.mark.anvil
def test_dropped_update_is_named(audited):
    assert round_of(audited, "dropped").status == Status.MISMATCH
    [message] = messages(audited, "dropped")  # every verdict is right: only the global adapter is wrong
    assert "max |diff|" in message and "on-chain verdicts merged #0,#1,#2" in message
    assert message.endswith("fedavg of updates #0,#2 weighted by num_samples (update #1 left out)")


@pytest.mark.anvil
def test_duplicated_update_is_named(audited):
    [message] = messages(audited, "duplicated")
    assert message.endswith("fedavg of updates #0,#1,#1,#2 weighted by num_samples (update #1 counted twice)")


@pytest.mark.anvil
def test_reweighted_aggregation_is_named(audited):
    [message] = messages(audited, "reweighted")
    assert message.endswith("fedavg of updates #0,#1,#2 weighted by uniform (uniform weighting)")


@pytest.mark.anvil
def test_honest_update_marked_rejected_is_named(audited):
    r = round_of(audited, "honest rejected")
    assert r.status == Status.MISMATCH
    verdict, global_ = messages(audited, "honest rejected")
    assert verdict.startswith("update #1 from hospital-1: on-chain verdict NORM_TOO_LARGE, verification gives "
                              "ACCEPTED (update norm")
    assert "recomputed from updates #0,#1,#2 (on-chain verdicts merged #0,#2)" in global_
    assert global_.endswith("(the on-chain merged set)")
    assert [s.status for s in r.submissions] == [None, Status.MISMATCH, None]


@pytest.mark.anvil
def test_revoked_node_merged_is_named(audited):
    revoked = audited.world.nodes[2].address
    verdict, global_ = messages(audited, "revoked merged")
    assert verdict.startswith(f"update #2 from hospital-2: on-chain verdict ACCEPTED, verification gives REVOKED "
                              f"({revoked} was revoked at block")
    assert "recomputed from updates #0,#1 (on-chain verdicts merged #0,#1,#2)" in global_
    assert global_.endswith("(the on-chain merged set)")


@pytest.mark.anvil
def test_bytes_changed_in_storage_after_the_round_are_unavailable(audited):
    r = round_of(audited, "tampered")
    assert r.status == Status.UNAVAILABLE
    [message] = messages(audited, "tampered")
    assert message.startswith(f"update #1 from hospital-1 ({r.submissions[1].cid}): the store serves other bytes "
                              "under this CID: sha256 ")
    assert message.endswith("cannot re-check its on-chain verdict ACCEPTED")
    assert r.notes == ["global adapter not recomputed: merged update(s) #1 unavailable"]


@pytest.mark.anvil
def test_cli_fails_and_another_process_finds_exactly_the_same(audited):
    assert audited.full.returncode == 1
    assert audited.full.stdout.strip().endswith("audit: 8 rounds: 2 VERIFIED, 5 MISMATCH, 1 UNAVAILABLE")
    assert [r["status"] for r in audited.full_json["rounds"]] == [r.status for r in audited.report.rounds]
    assert [r["findings"] for r in audited.full_json["rounds"]] == [
        [{"status": f.status, "message": f.message} for f in r.findings] for r in audited.report.rounds]
    for r in audited.report.rounds:
        for f in r.findings:
            assert f"{f.status}: {f.message}" in audited.full.stdout


@pytest.mark.anvil
def test_chain_only_audit_rebuilds_participants_rounds_and_gas(audited):
    world = audited.world
    report = run_audit(world.w3, world.deployment, page=3)  # no storage: events and commitments only
    assert report.ok and [r.status for r in report.rounds] == [Status.CONSISTENT] * 8
    # two role grants at deployment, four joins and approvals, one revocation, the initial adapter and rules
    # registered, 8 rounds (open, submissions, finalize)
    assert report.events == audited.report.events == 2 + 4 * 2 + 1 + 1 + 2 * 6 + 6 * 5
    revoked = [p for p in report.participants if p.revoked_block is not None]
    assert [p.address for p in revoked] == [world.nodes[2].address] and revoked[0].revoke_reason == 1
    assert all(p.gas["joined"] > 0 and p.gas["approved"] > 0 and p.hospital is None for p in report.participants)
    for r in report.rounds:
        assert r.result.verdicts == [int(Reason[s.verdict]) for s in r.submissions] == audited.report.rounds[
            r.round_id - 1].result.verdicts
        assert r.open_gas > 0 and r.result.gas > 0 and r.rules is None
    assert report.rounds[audited.rounds["honest rejected"] - 1].result.verdicts == [0, Reason.NORM_TOO_LARGE, 0]


@pytest.mark.anvil
def test_cli_refuses_bad_usage_with_one_line(audited, capsys):
    world = audited.world
    common = ["--deployment", str(audited.work / "deployment.json")]
    assert main(["audit", "--rpc", world.w3.provider.endpoint_uri, *common, "--verify"]) == 2
    assert main(["audit", "--rpc", "embedded", *common]) == 2
    assert main(["audit", "--rpc", world.w3.provider.endpoint_uri, *common, "--store", str(audited.work / "nope")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3
    assert "needs the federation's storage" in errors[0] and "fresh, empty chain" in errors[1]
    assert "not found" in errors[2]


def png_pixels(path: Path) -> np.ndarray:
    """The RGB(A) pixels of an 8-bit non-interlaced PNG (what Chromium writes), decoded with zlib alone."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat = 8, []
    while pos < len(data):
        size, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + size]
        pos += 12 + size
        if kind == b"IHDR":
            width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and colour in (2, 6) and interlace == 0
        elif kind == b"IDAT":
            idat.append(body)
    bpp = 3 if colour == 2 else 4
    stride = width * bpp
    raw = np.frombuffer(zlib.decompress(b"".join(idat)), np.uint8).reshape(height, stride + 1).astype(np.int64)
    rows = np.zeros((height + 1, stride), np.int64)
    for y in range(height):
        kind, line, up = raw[y, 0], raw[y, 1:], rows[y]
        if kind == 0:
            rows[y + 1] = line
        elif kind == 1:  # Sub: a running sum per channel
            rows[y + 1] = np.cumsum(line.reshape(-1, bpp), axis=0).reshape(-1) & 255
        elif kind == 2:
            rows[y + 1] = (line + up) & 255
        else:  # Average and Paeth depend on the reconstructed left neighbour: byte by byte
            out, cur, prev = [0] * stride, line.tolist(), up.tolist()
            for i in range(stride):
                a = out[i - bpp] if i >= bpp else 0
                b, c = prev[i], prev[i - bpp] if i >= bpp else 0
                if kind == 3:
                    pred = (a + b) // 2
                else:
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    pred = a if pa <= pb and pa <= pc else b if pb <= pc else c
                out[i] = (cur[i] + pred) & 255
            rows[y + 1] = out
    return rows[1:].reshape(height, width, bpp)


@pytest.mark.anvil
def test_html_report_renders_in_headless_chromium(audited, tmp_path):
    def find():
        if not (shutil.which("chromium") or shutil.which("chromium-browser")):
            raise FileNotFoundError("chromium not found: apt-get install -y chromium")
    require(find, FileNotFoundError, "Chromium (for the HTML report test)")
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    report = audited.work / "full.html"
    assert "<script" not in report.read_text() and "http://" not in report.read_text().replace(
        'xmlns="http://www.w3.org/2000/svg"', "")
    flags = CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path / 'profile'}"]
    shot = tmp_path / "report.png"
    subprocess.run([binary, *flags, f"--screenshot={shot}", "--window-size=1280,2000", report.as_uri()],
                   capture_output=True, timeout=120, check=True)
    dom = subprocess.run([binary, *flags, "--dump-dom", report.as_uri()], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert "<b>8 rounds</b>: 2 VERIFIED, 5 MISMATCH, 1 UNAVAILABLE" in dom
    assert "<b>4 participants</b>" in dom
    for node in audited.world.nodes + [audited.world.attacker]:
        assert node.address in dom
    assert dom.count("<svg") == 5  # timeline, three metric plots, gas
    for name in ("dropped", "revoked merged"):
        assert f'id="round-{audited.rounds[name]}"' in dom
    pixels = png_pixels(shot)
    assert pixels.shape[:2] == (2000, 1280)
    rgb = pixels[..., 0] << 16 | pixels[..., 1] << 8 | pixels[..., 2]
    assert len(np.unique(rgb)) > 200  # text, plots and badges, not a blank page
    assert (rgb == VERIFIED_GREEN).sum() > 1000 and (rgb == MISMATCH_RED).sum() > 1000  # the status badges


def test_server_optimizer_state_is_carried_between_rounds_and_reverified(icd_base, trainer, tmp_path):
    world = World("embedded", tmp_path, icd_base, trainer, aggregation="fedadam")
    world.honest_round()
    world.honest_round()
    report = run_audit(world.w3, world.deployment, world.store, verify=True)
    assert [r.status for r in report.rounds] == [Status.VERIFIED, Status.VERIFIED]
    assert [r.rules["aggregation"] for r in report.rounds] == ["fedadam", "fedadam"]
    # round 2 continued from the optimizer state recorded by round 1's global adapter: without it, no re-check
    first = world.store.get(report.rounds[0].result.cid)
    state_cid = unpack_adapter(first, len(first))[1][SERVER_STATE_KEY]
    world.store.path_of(state_cid).unlink()
    report = run_audit(world.w3, world.deployment, world.store, verify=True)
    assert [r.status for r in report.rounds] == [Status.VERIFIED, Status.UNAVAILABLE]
    [finding] = report.rounds[1].findings
    assert finding.message.startswith("start adapter's server optimizer state: ") and state_cid in finding.message


def test_a_lineage_break_is_refused_on_chain_and_a_mismatch_in_the_audit(icd_base, trainer, tmp_path, monkeypatch):
    world = World("embedded", tmp_path, icd_base, trainer)
    initial = world.fed.base
    world.honest_round()
    world.fed.base = initial  # the coordinator tries to open round 2 from the initial adapter again
    with pytest.raises(ChainError) as info:
        world.fed.open()
    assert info.value.error_name == "LineageBroken"
    world.fed.base = world.agg.fed.lineage_head()
    world.honest_round()

    real_events = Federation.events

    def rewritten(self, *args, **kwargs):  # what a contract without on-chain lineage (every history before it) or
        # an RPC endpoint rewriting events would show: round 2 opened from the initial adapter
        return [replace(e, args={**e.args, "baseCidDigest": initial[0], "baseSha256": initial[1]})
                if e.name == "RoundOpened" and e.args["roundId"] == 2 else e for e in real_events(self, *args, **kwargs)]

    monkeypatch.setattr(Federation, "events", rewritten)
    first, second = run_audit(world.w3, world.deployment, world.store, verify=True).rounds
    assert first.status == Status.VERIFIED
    assert second.status == Status.MISMATCH and second.base_cid == first.base_cid != first.result.cid
    assert f"lineage broken: starts from {second.base_cid}, not from round 1's global adapter {first.result.cid}" \
        in [f.message for f in second.findings]


def test_a_rules_change_by_the_admin_is_shown_and_other_rules_are_refused(icd_base, trainer, tmp_path):
    world = World("embedded", tmp_path, icd_base, trainer)
    world.honest_round()
    stricter = replace(world.agg.rules, max_update_norm=40.0)
    world.agg.rules = stricter
    with pytest.raises(AggregatorError, match="an admin changes them"):
        world.fed.open()
    publish_bytes(world.store, stricter.to_bytes())
    world.admin_fed.change_rules(stricter.digest())
    world.honest_round()
    first, second = run_audit(world.w3, world.deployment, world.store, verify=True).rounds
    assert [first.status, second.status] == [Status.VERIFIED, Status.VERIFIED]
    assert second.rules["max_update_norm"] == 40.0
    [note] = [n for n in second.notes if n.startswith("rules changed by admin")]
    assert note.startswith(f"rules changed by admin {world.admin_fed.address} at block ")
    assert note.endswith(f": {first.rules_digest} -> {stricter.digest().hex()}")


def test_relayed_updates_audit_verified_with_their_signatures_rechecked(icd_base, trainer, tmp_path, monkeypatch):
    """Two hospitals submit directly, two hand signed updates to the aggregator, which relays them in one batch;
    the audit re-checks every signature from the batch's calldata, and a signature that does not match the
    recorded fields is a MISMATCH."""
    world = World("embedded", tmp_path, icd_base, trainer, submit=["direct", "relay", "relay", "direct"])
    world.nodes = world.fed.nodes  # all four honest here
    world.honest_round()
    world.honest_round()
    report = run_audit(world.w3, world.deployment, world.store, verify=True)
    assert [r.status for r in report.rounds] == [Status.VERIFIED] * 2, report.table()
    for r in report.rounds:
        relayed = {s.node: s.relayed_by for s in r.submissions}
        assert relayed == {world.fed.nodes[0].address: None, world.fed.nodes[1].address: world.agg.fed.address,
                           world.fed.nodes[2].address: world.agg.fed.address, world.fed.nodes[3].address: None}
    real_read = Reconstruction._read_relay

    def forged(self, tx_hash):  # the batch's calldata as a lying RPC endpoint would serve it: one s flipped
        real_read(self, tx_hash)
        if tx_hash in self.relays:
            relayer, items = self.relays[tx_hash]
            node, item = next(iter(items.items()))
            items[node] = {**item, "s": bytes(31) + b"\x01"}

    monkeypatch.setattr(Reconstruction, "_read_relay", forged)
    first, _ = run_audit(world.w3, world.deployment, world.store).rounds
    assert first.status == Status.MISMATCH
    assert any("without" in f.message and "signature over its recorded fields" in f.message for f in first.findings)


def test_a_node_whose_epsilon_differs_from_the_rules_is_noted(icd_base, trainer, tmp_path):
    dp = {"mechanism": "gaussian", "clip_norm": 1.0, "noise_multiplier": 1.0, "delta": 1e-5}
    world = World("embedded", tmp_path, icd_base, trainer, privacy=dp)
    attacker = world.attacker

    def understated(rec):  # a correctly noised update whose metrics claim a smaller epsilon than the rules give
        update = attacker.train(rec)
        metrics = {**update.metrics, "privacy": {**update.metrics["privacy"], "epsilon": 0.5}}
        attacker.publish_and_submit(rec.round_id, update.data, update.num_samples, metrics)

    world.honest_round(understated)
    [r] = run_audit(world.w3, world.deployment, world.store, verify=True).rounds
    eps = epsilon(DPSettings.from_rules(dp), 1)
    assert r.status == Status.VERIFIED and r.privacy["epsilon"] == eps > 0.5
    assert [s.metrics["privacy"]["epsilon"] for s in r.submissions] == [eps] * 3 + [0.5]
    assert r.notes == [f"update #3 metrics claim epsilon 0.5; the rules give {eps:.4g} after 1 rounds at delta 1e-05"]


@pytest.mark.anvil
def test_an_open_last_round_and_unreachable_storage_are_reported_not_aborted(anvil, icd_base, trainer, tmp_path,
                                                                             capsys):
    world = World(anvil.url, tmp_path, icd_base, trainer)
    world.honest_round()
    world.open_and_submit()  # round 2 stays open
    common = ["audit", "--rpc", anvil.url, "--deployment", str(tmp_path / "deployment.json"), "--verify"]
    assert main(common + ["--store", str(tmp_path / "store")]) == 3
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == ("audit: 2 rounds: 1 VERIFIED, 1 OPEN (round 2 is still open: audit again once it is "
                       "finalized or cancelled)")
    # no IPFS node answers at this address: one timeout's worth of retries, then every round is UNAVAILABLE
    started = time.monotonic()
    assert main(common + ["--ipfs", f"http://127.0.0.1:{free_port()}", "--timeout", "1"]) == 1
    captured = capsys.readouterr()
    assert time.monotonic() - started < 30 and "Traceback" not in captured.err
    assert captured.out.strip().endswith("audit: 2 rounds: 1 UNAVAILABLE, 1 OPEN")
    assert "connection refused" in captured.out
