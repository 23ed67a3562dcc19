"""`fedchain init`, the shipped example federation and the generated configuration reference stay in step with
the config dataclasses."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from fednode.ops.config import SECTIONS, load_config
from fednode.ops.reference import keys, markdown
from fednode.ops.scaffold import init_federation

ROOT = Path(__file__).resolve().parent.parent


def test_init_writes_loadable_configs_with_every_key(tmp_path):
    done = init_federation(tmp_path / "fed", hospitals=3)
    assert sorted(done.configs) == ["admin", "aggregator", "hospital-0", "hospital-1", "hospital-2"]
    for i in range(3):
        config = load_config(done.configs[f"hospital-{i}"])
        assert (config.data.client, config.data.num_clients, config.federation.min_updates) == (i, 3, 3)
        assert config.wallet.keystore == f"keys/hospital-{i}.json" and config.federation.rounds == 2
    text = done.configs["hospital-0"].read_text()
    assert all(f"[{s}]" in text for s in SECTIONS) and all(f" {k.name} = " in text or f"\n{k.name} = " in text
                                                          for k in keys())
    assert all(k.doc for k in keys()), [k.name for k in keys() if not k.doc]


def test_init_never_overwrites_and_rejects_bad_counts(tmp_path):
    def fedchain(*args):
        return subprocess.run([sys.executable, "-m", "fednode", "init", *args], capture_output=True, text=True,
                              cwd=tmp_path, timeout=120)

    assert fedchain("fed").returncode == 0
    for args, words in ((("fed",), "already exists"), (("other", "--hospitals", "0"), "at least 1")):
        proc = fedchain(*args)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and words in proc.stderr


def test_shipped_example_and_reference_are_current(tmp_path):
    assert (ROOT / "docs" / "configuration.md").read_text() == markdown(), \
        "regenerate: python -m fednode.ops.reference > docs/configuration.md"
    fresh = init_federation(tmp_path / "federation")
    for name, path in fresh.configs.items():
        assert (ROOT / "examples" / "federation" / path.name).read_text() == path.read_text(), \
            "regenerate: rm -r examples/federation && fedchain init examples/federation"
