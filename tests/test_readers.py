"""Reading samples under real limits and real damage: more shards than open files allowed, a shard truncated after
its index was read. Limits are set in a subprocess (``resource.setrlimit``), which also bounds each case by a
timeout."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from usjepa.shards import readers as R
from usjepa.shards.synthetic_shards import write_synthetic_corpus

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def run_script(code: str, timeout: float = 120) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=ENV, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory) -> Path:
    # 150 one-sample shards: more than the 64 open files the scripts below allow
    return write_synthetic_corpus(tmp_path_factory.mktemp("many"), {"d": 150}, size=(48, 64), per_shard=1)


def test_more_shards_than_the_open_file_limit_all_read(many_shards):
    out = run_script(f"""
    import resource
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))  # a hard limit the reader cannot raise
    from usjepa.shards.loader import build_loader
    from usjepa.shards.readers import open_sample_table
    reader = open_sample_table({str(many_shards)!r}, "train").reader_view()
    for rnd in range(2):  # the second round reopens what the LRU closed
        for i in range(150):
            reader.read(i)
    assert reader.open_files() == 64 // 4, reader.open_files()
    reader.close()
    ld = build_loader({str(many_shards)!r}, "train", 10, {{"num_workers": 1, "cap": None}}, None, 0, 1, "cpu", 0,
                      "torch")
    keys = [k for b in ld for k in b.keys]
    assert len(set(keys)) == 150 and ld.read_errors == 0, (len(set(keys)), ld.read_errors)
    ld.close()
    print("OK", resource.getrlimit(resource.RLIMIT_NOFILE))
    """)
    assert "OK (64, 64)" in out


def test_soft_open_file_limit_is_raised_toward_the_hard_limit(many_shards):
    out = run_script(f"""
    import resource
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 512))
    from usjepa.shards.readers import open_sample_table
    reader = open_sample_table({str(many_shards)!r}, "train").reader_view()
    for i in range(150):
        reader.read(i)
    print("limit", resource.getrlimit(resource.RLIMIT_NOFILE), "open", reader.open_files())
    """)
    assert "limit (512, 512) open 128" in out, out


READ_FAULTS = """
    import logging, sys
    logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(levelname)s %(message)s")
    from usjepa.shards.loader import build_loader
    from usjepa.shards.readers import UnreadableData
    root = {root!r}
    ld = build_loader(root, "val", 8, {{"num_workers": 1}}, None, 0, 1, "cpu", 0, "torch")
    t = ld.table
    def cut(shard, first_lost):  # truncate a shard after the table was built: samples from first_lost on are lost
        shard = sorted({{int(t.shard[i]) for i in range(len(t))}})[shard]  # the split's; table ids are corpus-wide
        rows = [i for i in range(len(t)) if t.shard[i] == shard]
        os.truncate(t.shard_paths[shard], int(t.jpg_offset[rows[first_lost]]) + 10)
    import os
"""


def test_read_errors_are_counted_warned_once_per_kind_and_stop_the_run_past_the_limit(tmp_path):
    root = write_synthetic_corpus(tmp_path, {"d": 8}, size=(48, 64), per_shard=40, val={"d": 80})
    out = run_script(READ_FAULTS.format(root=str(root)) + """
    cut(0, 37)  # 3 samples lost: counted and warned, the pass goes on
    n = sum(len(b) for b in ld)
    print("pass", n, "errors", ld.read_errors, "skipped", ld.skipped["unreadable"])
    cut(1, 0)  # all 40 samples of the second shard lost: the loader stops
    try:
        ld.set_epoch(1)
        for b in ld:
            pass
        print("NOT STOPPED")
    except UnreadableData as e:
        print("STOPPED", e)
    """)
    assert "pass 80 errors 3 skipped 3" in out, out
    # the cause, once per kind and worker process (one per pass here), and the loader's note, once
    assert out.count("unreadable sample (short read") == 2, out
    assert out.count("unreadable samples are replaced by others of their batch") == 1, out
    assert "STOPPED 14 of 128 reads on this rank were unreadable" in out, out  # 3 + 3 + the 8 of one batch


def test_read_error_budget_allows_ten_plus_one_percent_and_31_in_a_row():
    few = R.ReadErrorBudget()
    few.count([True] * 10)  # a few bad files early on: allowed
    with pytest.raises(R.UnreadableData, match=r"11 of 11 reads on this rank were unreadable"):
        few.count([True])
    many = R.ReadErrorBudget()
    many.count(([True] + [False] * 99) * 30)  # 1 %: 30 of 3000, within 10 + 1 %
    many.count([False] * 1000 + [True] * 20)  # 50 of 4020
    with pytest.raises(R.UnreadableData, match=r"51 of 4021 reads"):
        many.count([True])
    row = R.ReadErrorBudget()
    row.count(np.zeros(10_000, bool))
    row.count([True] * (R.MAX_UNREADABLE_IN_A_ROW - 1))  # 31 of 10 031: well within 10 + 1 %
    with pytest.raises(R.UnreadableData, match=r"32 samples in a row were unreadable"):
        row.count([True])
