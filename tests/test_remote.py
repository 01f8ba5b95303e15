"""Shards from object storage (``shards/remote.py``), end to end against a real S3-compatible server: moto's
server mode, started on 127.0.0.1 by the tests themselves; skipped when moto or s3fs is not installed."""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

from usjepa.shards.loader import build_loader  # noqa: E402
from usjepa.shards.readers import BadSample, open_sample_table  # noqa: E402
from usjepa.shards.remote import RemoteError, coalesce, mirror_corpus  # noqa: E402
from usjepa.shards.synthetic_shards import write_synthetic_corpus  # noqa: E402

BUCKET = "usjepa-test"


class S3:
    """A moto S3 server on 127.0.0.1 and the fsspec configuration that points s3:// at it."""

    def __init__(self, mp: pytest.MonkeyPatch, port: int = 0):
        import fsspec.config
        import s3fs

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
        self.server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        self.server.start()
        host, self.port = self.server.get_host_and_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        # credentials and endpoint the way a user configures them, never the machine's own AWS settings;
        # botocore's own retries off and short timeouts, so the retries measured are ours
        for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                     "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": "/dev/null",
                     "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}.items():
            mp.setenv(k, v)
        mp.setitem(fsspec.config.conf, "s3", {
            "endpoint_url": self.endpoint, "key": "testing", "secret": "testing",
            "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2, "read_timeout": 10}})
        s3fs.S3FileSystem.clear_instance_cache()
        self.fs = s3fs.S3FileSystem()
        if not self.fs.exists(BUCKET):
            self.fs.mkdir(BUCKET)

    def upload(self, local: Path, name: str) -> str:
        self.fs.put(str(local) + "/", f"{BUCKET}/{name}", recursive=True)
        return f"s3://{BUCKET}/{name}"

    def stop(self):
        import s3fs

        self.server.stop()
        s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def s3():
    mp = pytest.MonkeyPatch()
    server = S3(mp)
    yield server
    server.stop()
    mp.undo()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    # 2 datasets, shards of 8 samples: a batch touches several shards and several samples of each
    return write_synthetic_corpus(tmp_path_factory.mktemp("local"), {"alpha": 24, "beta": 16}, size=(96, 128),
                                  per_shard=8, seed=21)


def _url(s3, corpus, name="corpus"):
    if not s3.fs.exists(f"{BUCKET}/{name}/manifest.json"):
        s3.upload(corpus, name)
    return f"s3://{BUCKET}/{name}"


def test_s3_corpus_reads_byte_identical_and_batches_equal_local(s3, corpus, tmp_path):
    url = _url(s3, corpus)
    local = open_sample_table(corpus, "train")
    remote = open_sample_table(url, "train", cache_dir=str(tmp_path / "cache"), cache_limit_gb=0)
    assert remote.shard_paths[0].startswith(url + "/") and len(remote) == len(local) == 40
    assert list(remote.keys) == list(local.keys) and remote.dataset_sizes == local.dataset_sizes
    for col in ("shard", "jpg_offset", "jpg_size", "mask_offset", "mask_size", "meta_offset", "meta_size"):
        np.testing.assert_array_equal(getattr(remote, col), getattr(local, col))

    lr, rr = local.reader_view(), remote.reader_view()
    batch = np.random.default_rng(0).permutation(len(local))[:16]
    rr.prefetch(batch)
    shards_touched = len(set(remote.shard[batch].tolist()))
    requests = rr.remote.store.requests["range"]
    # coalesced: at most one request per run of a shard's samples, never three per sample
    assert shards_touched <= requests <= len(batch) < 3 * len(batch)
    for i in batch:
        assert rr.read(int(i)) == lr.read(int(i))
        assert rr.median(int(i)) == lr.median(int(i))
    assert rr.remote.store.requests["range"] == requests  # every read came from the batch's ranges
    assert not list((tmp_path / "cache").glob("shards/*.tar"))  # cache_limit_gb=0: nothing cached

    from usjepa.shards.loader import dali_available

    for backend in ("torch", "dali") if dali_available() else ("torch",):  # DALI: its workers get the reader
        kw = dict(batch_size=8, data_cfg={"num_workers": 2}, backend=backend, seed=3)
        want = [b for _, b in zip(range(3), build_loader(corpus, "train", **kw))]
        got = [b for _, b in zip(range(3), build_loader(url, "train", cache_dir=str(tmp_path / backend),
                                                            cache_limit_gb=0, **kw))]
        for a, b in zip(want, got):
            assert a.keys == b.keys
            torch.testing.assert_close(a.images, b.images, rtol=0, atol=0)
            assert torch.equal(a.valid, b.valid) and torch.equal(a.ctx_idx, b.ctx_idx)
            assert torch.equal(a.tgt_idx, b.tgt_idx) and not b.replaced.any()


def test_spawned_workers_get_the_store_from_the_recipe_or_payload(s3, corpus, tmp_path):
    """What a spawned worker receives is a pickle: the table's recipe (torch backend) or DALI's payload (URL,
    cache_dir, cache_limit_gb). Either one reads the remote shards without a pickled store or open file."""
    from usjepa.shards.augment import DataConfig
    from usjepa.shards.dali_pipeline import DaliBatchSource

    url = _url(s3, corpus)
    table = open_sample_table(url, "train", cache_dir=str(tmp_path), cache_limit_gb=0.5)
    local = open_sample_table(corpus, "train").reader_view()
    ids = np.arange(0, len(table), 5)
    want = [local.read(int(i)) for i in ids]
    blob = pickle.dumps(table.reader_view())
    assert len(blob) < 2000  # the recipe, not the columns or the store's state
    reader = pickle.loads(blob)
    assert reader.remote is not None and reader.remote.store.cache_limit_bytes == 500_000_000
    reader.prefetch(ids)
    assert [reader.read(int(i)) for i in ids] == want
    src = DaliBatchSource(table.source, "train", 0.0, str(tmp_path), DataConfig(), None, 0, True,
                          reader=table.reader_view(), cache_dir=table.cache_dir, cache_limit_gb=table.cache_limit_gb)
    worker = pickle.loads(pickle.dumps(src))
    assert worker._reader is None and worker.root == url
    got = worker.reader
    assert got.remote is not None and got.remote.store.cache_dir == table.cache_dir
    assert got.remote.store.cache_limit_bytes == 500_000_000
    got.prefetch(ids)
    assert [got.read(int(i)) for i in ids] == want


def test_shards_are_cached_after_their_bytes_were_read_by_range(s3, corpus, tmp_path):
    url = _url(s3, corpus)
    table = open_sample_table(url, "train", cache_dir=str(tmp_path), cache_limit_gb=1)
    reader, store = table.reader_view(), table.remote
    first = np.flatnonzero(table.shard == 0)
    local = [open_sample_table(corpus, "train").reader_view().read(int(i)) for i in first]
    cached = Path(store.cache_dir) / "shards" / f"{store.sha256[table.shard_paths[0]]}.tar"
    for _ in range(2):  # after two passes over shard 0, range reads have fetched as many bytes as it holds
        reader = table.reader_view()  # a fresh reader each time, as a restarted worker is: the count is shared
        reader.prefetch(first)
        assert [reader.read(int(i)) for i in first] == local
    requests = reader.remote.store.requests
    assert not cached.exists() and (requests["range"], requests["shard"]) == (2, 0)
    reader = table.reader_view()
    reader.prefetch(first)  # the third pass downloads it whole (once) and reads it locally
    assert [reader.read(int(i)) for i in first] == local
    assert (requests["range"], requests["shard"]) == (2, 1)
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == store.sha256[table.shard_paths[0]]


def test_cache_evicts_least_recently_used_shards_past_its_limit(s3, corpus, tmp_path):
    url = _url(s3, corpus)
    _, manifest, store = mirror_corpus(url, str(tmp_path))
    urls = [s["url"] for s in manifest["shards"]][:3]
    sizes = [store.sizes[u] for u in urls]
    store.cache_limit_bytes = sizes[0] + sizes[1] + max(sizes) // 2  # room for two shards, not three
    a, b = store.download(urls[0]), store.download(urls[1])
    time.sleep(0.02)  # mtime resolution
    assert store.cached(urls[0]) == a  # a used again: b is now the least recently used
    c = store.download(urls[2])
    assert a.is_file() and c.is_file() and not b.exists()
    assert sum(p.stat().st_size for p in (tmp_path / "shards").glob("*.tar")) <= store.cache_limit_bytes
    store.cache_limit_bytes = min(sizes) - 1  # a shard larger than the whole cache is read by range only
    assert not store.cacheable(urls[0])


def test_shard_changed_on_the_store_is_refetched_once_then_refused(s3, corpus, tmp_path):
    url = _url(s3, corpus, "changed")
    table = open_sample_table(url, "train", cache_dir=str(tmp_path), cache_limit_gb=1)
    victim = table.shard_paths[1]
    data = bytearray(s3.fs.cat_file(victim))
    data[-2000] ^= 0xFF  # same size, one byte changed after ingest
    s3.fs.pipe_file(victim, bytes(data))
    reader = table.reader_view()
    with pytest.raises(RemoteError, match="sha256 .* does not match the manifest's .* after a refetch"):
        reader.remote.local_path(victim)
    assert reader.remote.store.requests["shard"] == 2
    assert not list((tmp_path / "shards").glob("*"))  # nothing unverified is kept
    with pytest.raises(BadSample, match="sha256"):  # and its samples are refused, not read by range
        reader.read(int(np.flatnonzero(table.shard == 1)[0]))
    reader.read(int(np.flatnonzero(table.shard == 0)[0]))  # the other shards still read


def test_manifest_entry_cannot_escape_the_corpus_prefix(s3, tmp_path):
    manifest = {"format_version": 1, "datasets": {}, "shards": [
        {"path": "../other/x.tar", "index": "../other/x.idx", "dataset": "d", "split": "train", "samples": 1}]}
    s3.fs.pipe_file(f"{BUCKET}/escape/manifest.json", json.dumps(manifest).encode())
    with pytest.raises(ValueError, match="escapes the corpus root"):
        open_sample_table(f"s3://{BUCKET}/escape", "train", cache_dir=str(tmp_path))


def test_transient_errors_are_retried_with_backoff_then_reported(corpus, tmp_path):
    mp = pytest.MonkeyPatch()
    server = S3(mp)
    try:
        url = server.upload(corpus, "retry")
        table = open_sample_table(url, "train", cache_dir=str(tmp_path), cache_limit_gb=0)
        store = table.remote
        store.retries, store.backoff_s = 3, 0.2
        shard = table.shard_paths[0]
        server.server.stop()  # the store goes away
        t0 = time.perf_counter()
        with pytest.raises(RemoteError, match="failed 3 times"):
            store.fetch_ranges(shard, [0], [512])
        assert time.perf_counter() - t0 >= 0.2 + 0.4  # backed off between the tries
        # it comes back (same port, same buckets) while we back off: the read succeeds
        server.server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=server.port, verbose=False)
        restart = threading.Timer(0.3, server.server.start)
        store.retries, store.backoff_s = 5, 0.4
        restart.start()
        assert len(store.fetch_ranges(shard, [0], [512])[0]) == 512
        restart.join()
    finally:
        server.stop()
        mp.undo()


def test_coalesce_merges_close_ranges_only():
    assert coalesce([(100, 10), (0, 50), (50, 20)], max_gap=0) == ([0, 100], [70, 110])
    assert coalesce([(100, 10), (0, 50)], max_gap=50) == ([0], [110])
    assert coalesce([(100, 10), (0, 50)], max_gap=49) == ([0, 100], [50, 110])
    assert coalesce([(0, 10), (0, 10)], max_gap=0) == ([0], [10])


def test_validation_slice_of_an_s3_corpus_is_the_local_one(s3, corpus, tmp_path):
    url = _url(s3, corpus)
    want = [open_sample_table(corpus, split, 0.25) for split in ("train", "val")]
    got = [open_sample_table(url, split, 0.25, cache_dir=str(tmp_path), cache_limit_gb=0) for split in ("train", "val")]
    # the groups come from each sample's metadata, read by range into the mirror's corpus table
    assert list(got[0].group) == list(want[0].group) and pickle.loads(pickle.dumps(got[1])).remote is not None
    for a, b in zip(want, got):
        assert list(a.keys) == list(b.keys) and len(b) > 0
        ra, rb = a.reader_view(), b.reader_view()  # and each slice still reads from the store
        rb.prefetch(np.arange(len(b)))
        assert [rb.read(i) for i in range(len(b))] == [ra.read(i) for i in range(len(a))]


def test_http_url_reads_the_same_bytes(s3, corpus, tmp_path):
    """``http(s)://`` goes through fsspec's HTTP filesystem (aiohttp, Range headers): moto serves the bucket's
    objects at plain paths too, so the same server stands in for a static HTTP file host."""
    pytest.importorskip("aiohttp")
    _url(s3, corpus, "public")
    for path in s3.fs.find(f"{BUCKET}/public"):  # anonymous reads, as from a static file host
        s3.fs.chmod(path, acl="public-read")
    url = f"{s3.endpoint}/{BUCKET}/public"
    local = open_sample_table(corpus, "train")
    remote = open_sample_table(url, "train", cache_dir=str(tmp_path), cache_limit_gb=0)
    assert list(remote.keys) == list(local.keys)
    lr, rr = local.reader_view(), remote.reader_view()
    batch = np.arange(0, len(local), 3)
    rr.prefetch(batch)
    assert [rr.read(int(i)) for i in batch] == [lr.read(int(i)) for i in batch]
    # a refusal (403: these objects are private) is not transient: one clear error at once, no retries
    _url(s3, corpus)
    t0 = time.perf_counter()
    with pytest.raises(RemoteError, match="status=403") as refused:
        open_sample_table(f"{s3.endpoint}/{BUCKET}/corpus", "train", cache_dir=str(tmp_path))
    assert "failed" not in str(refused.value) and time.perf_counter() - t0 < 5


def test_file_url_is_the_local_corpus(corpus):
    table = open_sample_table(f"file://{corpus}", "train")
    assert table.remote is None and list(table.keys) == list(open_sample_table(corpus, "train").keys)
