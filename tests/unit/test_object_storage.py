"""Shards on object storage: built to and streamed from a real S3-compatible server (moto on 127.0.0.1), and read
over http with byte ranges from a server that fails on demand. Also the interop check: the webdataset library reads
our shards and yields the same samples as our reader."""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import closing
from pathlib import Path

import pytest
import webdataset
from raw_dataset_fixtures import write_cirr
from storage_servers import FAKE_CREDENTIALS, RangeServer, moto_server

from shards.builder.publish import publish
from shards.builder.shard_set import build_shards
from shards.config import DataConfig, NounPhraseConfig, SourceConfig
from shards.format import INDEX_NAME, SIDECAR_SUFFIX, ShardIndex, member_offsets, split_member_name
from shards.model_inputs import TINY_BACKBONE
from shards.storage import ShardStorageError, ShardStore
from shards.stream.decode import read_records
from shards.stream.plan import Piece
from shards.stream.reader import ShardStream, verified_index

TRIPLETS = 40
BUCKET_URL = "s3://ctx-shards/sets/tiny"


def data_config(root: Path, shards_dir: str, **overrides) -> DataConfig:
    return DataConfig(
        sources=[SourceConfig(name="cirr", kind="cirr", path=str(root), trees=str(root / "trees.jsonl"))],
        shards_dir=shards_dir,
        samples_per_shard=6,
        image_short_side=12,
        build_workers=1,
        noun_phrases=NounPhraseConfig(parser="trees"),
        **overrides,
    )


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cirr")
    write_cirr(root, TRIPLETS)
    return root


@pytest.fixture(scope="module")
def local_set(raw, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("local") / "shards"
    build_shards(data_config(raw, str(directory)), TINY_BACKBONE, progress=False)
    return directory


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """(endpoint, storage options) of a moto server holding one empty bucket; fake credentials in the environment."""
    saved = {name: os.environ.get(name) for name in FAKE_CREDENTIALS}
    os.environ.update(FAKE_CREDENTIALS)
    try:
        with moto_server(tmp_path_factory.mktemp("moto") / "moto.log") as endpoint:
            options = {"endpoint_url": endpoint}
            import s3fs

            s3fs.S3FileSystem(**options).mkdir("ctx-shards")
            yield endpoint, options
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="module")
def s3_set(raw, s3, tmp_path_factory) -> tuple[ShardStore, Path]:
    staging = tmp_path_factory.mktemp("staging") / "set"
    data = data_config(raw, BUCKET_URL, storage_options=s3[1], staging_dir=str(staging))
    report = build_shards(data, TINY_BACKBONE, progress=False)
    assert report.index_path == f"{BUCKET_URL}/{INDEX_NAME}"
    return ShardStore(BUCKET_URL, s3[1]), staging


def make_stream(shards, rank: int, **overrides) -> ShardStream:
    arguments = dict(
        backbone=TINY_BACKBONE, batch_size=4, rank=rank, world_size=2, num_workers=2, seed=3, shuffle_buffer=8
    )
    return ShardStream(shards, **(arguments | overrides))


def keys_and_states(stream: ShardStream, steps: int) -> tuple[list[list[str]], list[dict]]:
    states, keys = [json.loads(json.dumps(stream.state_dict()))], []
    with closing(iter(stream)) as batches:
        for _ in range(steps):
            keys.append(next(batches)["keys"])
            states.append(json.loads(json.dumps(stream.state_dict())))
    return keys, states


def test_build_to_s3_publishes_the_same_set_and_a_rebuild_uploads_nothing(s3_set, local_set):
    store, staging = s3_set
    local = ShardIndex.load(local_set)
    assert ShardIndex.load(store) == local  # the same deterministic build, wherever it lands
    names = set(store.names())
    for entry in local.shards:
        assert {entry.name, entry.name + SIDECAR_SUFFIX} <= names
        assert store.read_bytes(entry.name) == (local_set / entry.name).read_bytes()
    assert publish(staging, store, progress=False) == (0, len(local.shards))
    # A shard object of an earlier, larger build goes; anything else under the prefix is the user's and stays.
    (staging / "shard-000099.tar").write_bytes(b"old")
    store.upload(staging / "shard-000099.tar", "shard-000099.tar")
    store.upload(staging / INDEX_NAME, "notes.json")
    publish(staging, store, progress=False)
    assert "shard-000099.tar" not in store.names() and "notes.json" in store.names()


@pytest.mark.timeout(300)
def test_reader_on_s3_matches_local_and_resumes_mid_epoch_exactly(s3_set, local_set):
    store, _ = s3_set
    for rank in range(2):
        steps = 2 * make_stream(local_set, rank).steps_per_epoch
        local_keys, _ = keys_and_states(make_stream(local_set, rank), steps)
        remote_keys, states = keys_and_states(make_stream(store, rank), steps)
        assert remote_keys == local_keys
        for stop in (1, steps // 2 + 1):
            resumed = make_stream(store, rank)
            resumed.load_state_dict(states[stop])
            assert keys_and_states(resumed, steps - stop)[0] == local_keys[stop:], f"rank {rank} from step {stop}"


def test_a_slot_starting_mid_shard_reads_from_its_first_sample_by_range(local_set):
    index = ShardIndex.load(local_set)
    shard = index.shards[1]
    with RangeServer(local_set) as server:
        store = ShardStore(server.url)
        assert member_offsets(store, shard.name, "the sha256 of another build") is None
        offsets = member_offsets(store, shard.name, shard.sha256)
        assert offsets is not None and len(offsets) == shard.count and offsets[0] == 0
        records = list(read_records(store, [Piece(shard.name, 3, 5)], _raise, digests={shard.name: shard.sha256}))
        gets = [served for served in server.log if served.method == "GET" and served.path == shard.name]
    local = list(read_records(ShardStore(str(local_set)), [Piece(shard.name, 3, 5)], _raise))
    assert [(r.key, r.fields) for r in records] == [(r.key, r.fields) for r in local] and len(records) == 2
    assert gets and min(served.start for served in gets) == offsets[3] > 0  # never the bytes before sample 3
    assert sum(served.length for served in gets) < (local_set / shard.name).stat().st_size


def test_without_sidecars_a_slot_walks_the_headers_to_the_same_samples(local_set, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(local_set, bare, ignore=shutil.ignore_patterns(f"*{SIDECAR_SUFFIX}", "noun_phrases"))
    for rank in range(2):
        steps = make_stream(local_set, rank).steps_per_epoch + 3
        assert (
            keys_and_states(make_stream(bare, rank), steps)[0]
            == keys_and_states(make_stream(local_set, rank), steps)[0]
        )


def test_http_reads_retry_transient_errors_and_name_the_url_on_permanent_ones(local_set, caplog):
    index = ShardIndex.load(local_set)
    first, second = index.shards[0].name, index.shards[1].name
    with RangeServer(local_set) as server:
        store = ShardStore(server.url, retries=3, backoff_s=0.05)
        server.fail[first] = 2  # two 503s, then the bytes
        taken = list(read_records(store, [Piece(first, 0, 2)], _raise))
        assert [record.key for record in taken] == [
            r.key for r in read_records(ShardStore(str(local_set)), [Piece(first, 0, 2)], _raise)
        ]
        assert [s.status for s in server.log if s.path == first and s.method == "GET"][:2] == [503, 503]
        assert "retrying" in caplog.text

        server.fail[second] = 100  # an outage longer than the retries
        with pytest.raises(ShardStorageError, match=rf"{server.url}/{second}.*gave up after 4 attempts"):
            list(read_records(store, [Piece(second, 0, 2)], _raise))

        server.fail[INDEX_NAME] = 1  # an outage on the index is retried, never read as "no index"
        assert ShardIndex.load(store) == index
        server.forbid.add(first)  # no permission: not retried
        with pytest.raises(ShardStorageError, match=rf"{server.url}/{first}.*403") as refused:
            list(read_records(store, [Piece(first, 0, 2)], _raise))
        assert refused.value.permanent
        server.forbid.clear()

        (local_set / "gone.tar").unlink(missing_ok=True)
        with pytest.raises(ShardStorageError, match=rf"{server.url}/gone.tar.*FileNotFoundError"):
            store.open("gone.tar")
        server.fail.clear()  # the outage ends
        assert verified_index(store, TINY_BACKBONE) == index
        with pytest.raises(FileNotFoundError, match=rf"no shard index at {server.url}/elsewhere/{INDEX_NAME}"):
            verified_index(ShardStore(f"{server.url}/elsewhere"), TINY_BACKBONE)


def test_webdataset_reads_our_shards_as_the_same_samples(local_set):
    index = ShardIndex.load(local_set)
    urls = [str(local_set / entry.name) for entry in index.shards]
    theirs = {}
    for sample in webdataset.WebDataset(urls, shardshuffle=False):
        fields = {name: value for name, value in sample.items() if not name.startswith("__")}
        theirs[sample["__key__"]] = {name: hashlib.sha256(value).hexdigest() for name, value in fields.items()}
    pieces = [Piece(entry.name, 0, entry.count) for entry in index.shards]
    ours = {
        record.key: {name: hashlib.sha256(value).hexdigest() for name, value in record.fields.items()}
        for record in read_records(ShardStore(str(local_set)), pieces, _raise)
    }
    assert len(ours) == index.total_samples
    assert theirs == ours
    member_names = {f"{key}.{field}" for key, fields in ours.items() for field in fields}
    assert all(split_member_name(name) is not None for name in member_names)


def _raise(kind: str, error) -> None:
    raise AssertionError(f"{kind}: {error}")
