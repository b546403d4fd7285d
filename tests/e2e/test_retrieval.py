"""Using a trained model: export a bundle, load it without the training stack, index a gallery, search it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from eval_fixtures import write_checkpoint, write_image, write_synthetic
from figures import FIGURES

from cluster.root_config import load_config
from training.retrieval.bundle import BundleError, export_bundle, load_bundle
from training.retrieval.config import IndexConfig
from training.retrieval.gallery_build import build_index
from training.retrieval.gallery_index import (
    MANIFEST,
    SHARDS,
    BundleMismatch,
    GalleryIndex,
    GalleryIndexError,
    list_images,
    local_encoder,
)

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny.yaml")


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        "PYTHONPATH": str(REPO),
    }


def _launch(script: str, *args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run a launch/ script as users do, in its own interpreter (index builds start a local Ray)."""
    return subprocess.run(
        [sys.executable, str(REPO / "launch" / script), *args],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A synthetic benchmark of 4 image sets, one checkpoint of the tiny model and its bundle."""
    root = tmp_path_factory.mktemp("retrieval")
    write_synthetic(root / "synthetic", sets=4)
    config = load_config(
        TINY, [f"cluster.storage_path={root / 'runs'}", f"eval.datasets.synthetic.root={root / 'synthetic'}"]
    )
    checkpoint = write_checkpoint(config.run_dir, 40, config, seed=3)
    export_bundle(checkpoint, root / "bundle")
    return {"root": root, "synthetic": root / "synthetic", "checkpoint": checkpoint, "bundle": root / "bundle"}


def _images(world) -> list[str]:
    return sorted(str(path) for path in (world["synthetic"] / "dev").glob("*.png"))


# --- the bundle ---------------------------------------------------------------------------------------------------


def test_bundle_embeddings_equal_the_eval_jobs(world) -> None:
    """Gallery and query embeddings of a loaded bundle are the eval job's for the same checkpoint (CPU): the eval
    job's uint8 pixels, normalised in the model, give the bundle's embeddings of images normalised on the host."""
    from shards.model_inputs import tokenizer, uint8_transform
    from training.evaluation.benchmarks.synthetic import read_synthetic
    from training.evaluation.encode import encode_gallery, encode_queries
    from training.evaluation.methods import METHODS
    from training.evaluation.runner import load_checkpoint_model
    from training.evaluation.spans import phrase_span_finder

    device = torch.device("cpu")
    model, saved = load_checkpoint_model(world["checkpoint"], device)
    methods = {"model": METHODS.get("context")}
    split = read_synthetic(world["synthetic"], "val")
    paths = [split.image_paths[name] for name in split.gallery]
    transform, tokenize = uint8_transform(saved.backbone), tokenizer(saved.backbone)  # as the eval job decodes
    gallery = next(iter(encode_gallery(model, methods, paths, transform, device, batch_size=5, workers=0).values()))
    find_spans = phrase_span_finder(saved.backbone)
    queries = encode_queries(model, methods, split, transform, tokenize, device, 3, 0, find_spans).embeddings

    retriever = load_bundle(world["bundle"], device="cpu")
    bundle_gallery = retriever.encode_gallery([str(path) for path in paths], batch_size=7)
    references = [str(split.image_paths[query.reference]) for query in split.queries]
    bundle_queries = retriever.encode_queries(references, [query.text for query in split.queries], batch_size=4)
    gallery_diff = np.abs(bundle_gallery - gallery.numpy()).max()
    query_diff = np.abs(bundle_queries - queries["model"].numpy()).max()
    FIGURES.append(f"bundle vs eval job embeddings, max abs diff: gallery {gallery_diff:.2e}, queries {query_diff:.2e}")
    assert bundle_gallery.shape == tuple(gallery.shape) and gallery_diff <= 1e-5
    assert bundle_queries.shape == tuple(queries["model"].shape) and query_diff <= 1e-5
    one = retriever.encode_query(references[0], split.queries[0].text)
    assert np.abs(one - bundle_queries[0]).max() <= 1e-5


def test_bundle_loads_without_deepspeed_or_ray(world) -> None:
    """A fresh interpreter loads the bundle and encodes with neither `deepspeed` nor `ray` imported."""
    probe = (
        "import sys\n"
        "from training.retrieval.bundle import load_bundle\n"
        f"retriever = load_bundle({str(world['bundle'])!r}, device='cpu')\n"
        f"vector = retriever.encode_query({_images(world)[0]!r}, 'make it bigger')\n"
        "heavy = sorted(name for name in sys.modules if name.split('.')[0] in ('deepspeed', 'ray'))\n"
        "print('DIM', vector.shape[0], 'HEAVY', heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "DIM 64 HEAVY []" in result.stdout, result.stdout


PLAIN_OPEN_CLIP = """
import json, sys
import open_clip, torch
from PIL import Image

bundle, image = sys.argv[1], sys.argv[2]
name = json.load(open(f"{bundle}/bundle.json"))["open_clip"]["model_name"]
open_clip.add_model_config(f"{bundle}/{name}.json")
model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=f"{bundle}/open_clip_model.safetensors")
model.eval()
with torch.no_grad():
    embedding = torch.nn.functional.normalize(model.encode_image(preprocess(Image.open(image)).unsqueeze(0)), dim=-1)
ours = sorted({module.split(".")[0] for module in sys.modules} & {"shards", "training", "cluster", "launch"})
print(json.dumps({"embedding": embedding[0].tolist(), "project_modules": ours}))
"""
"""What a user of the bundle runs: open_clip alone, the model's name and two files of the bundle."""


def test_open_clip_loads_the_exported_towers(world, tmp_path) -> None:
    """In a fresh interpreter that imports only open_clip (nothing of this project registers `ContextTiny` there),
    `add_model_config(<bundle>/<model_name>.json)` then `create_model_and_transforms(<model_name>, pretrained=...)`
    gives the bundle's own image embeddings."""
    info = json.loads((world["bundle"] / "bundle.json").read_text())
    name = info["open_clip"]["model_name"]
    assert info["open_clip"]["config"] == f"{name}.json" == "ContextTiny.json"
    towers_config = json.loads((world["bundle"] / f"{name}.json").read_text())
    assert set(towers_config) <= {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "custom_text"}, towers_config
    image = _images(world)[0]
    # -I: no PYTHONPATH, no user site, not even the working directory on sys.path
    plain_env = {key: value for key, value in _env().items() if key != "PYTHONPATH"}
    command = [sys.executable, "-I", "-c", PLAIN_OPEN_CLIP, str(world["bundle"]), image]
    result = subprocess.run(command, cwd=tmp_path, env=plain_env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["project_modules"] == []
    ours = load_bundle(world["bundle"], device="cpu").encode_gallery([image])  # target_encoding=clip: CLIP's space
    assert np.abs(np.asarray(loaded["embedding"]) - ours[0]).max() <= 1e-5


def test_a_damaged_bundle_is_refused(world, tmp_path) -> None:
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(world["bundle"], damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(BundleError, match="does not match the sha256"):
        load_bundle(damaged)
    with pytest.raises(BundleError, match="bundle.json is missing"):
        load_bundle(tmp_path)
    result = _launch("export.py", "--checkpoint", str(world["checkpoint"]), "--out", str(world["bundle"]))
    assert result.returncode == 2 and "already exists" in result.stderr


# --- indexing -----------------------------------------------------------------------------------------------------


def test_unreadable_images_are_skipped_and_listed(world, tmp_path) -> None:
    gallery = tmp_path / "gallery"
    for index in range(5):
        write_image(gallery / "sub" / f"img{index}.png", index)
    (gallery / "broken.png").write_text("not a png")
    retriever = load_bundle(world["bundle"], device="cpu")
    items = list_images(gallery)
    assert [item.id for item in items] == ["broken.png"] + [f"sub/img{index}.png" for index in range(5)]
    config = IndexConfig(shard_size=4, batch_size=2)
    report = build_index(tmp_path / "index", items, retriever.bundle_hash, 64, config, local_encoder(retriever))
    assert (report.count, report.skipped, report.shards_total) == (5, 1, 2)
    skipped = [json.loads(line) for line in (tmp_path / "index" / "skipped.jsonl").read_text().splitlines()]
    assert [entry["id"] for entry in skipped] == ["broken.png"] and "cannot read image" in skipped[0]["error"]
    index = GalleryIndex.open(tmp_path / "index")
    assert index.ids == [f"sub/img{index}.png" for index in range(5)]
    hits = index.search(retriever.encode_query(items[1].path, "same")[None], 3)[0]
    assert [hit.rank for hit in hits] == [1, 2, 3] and {hit.id for hit in hits} <= set(index.ids)
    assert hits[0].score >= hits[1].score >= hits[2].score


def test_an_interrupted_build_resumes_and_equals_an_uninterrupted_one(world, tmp_path) -> None:
    retriever = load_bundle(world["bundle"], device="cpu")
    items = list_images(world["synthetic"] / "dev")
    config = IndexConfig(shard_size=6, batch_size=3)
    encode = local_encoder(retriever)
    calls = []

    def dies_in_the_third_shard(chunks):
        calls.append(len(chunks))
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        yield from encode(chunks)

    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        build_index(out, items, retriever.bundle_hash, 64, config, dies_in_the_third_shard)
    assert sorted(path.name for path in (out / SHARDS).glob("*.json")) == ["part_00000.json", "part_00001.json"]
    assert not (out / MANIFEST).exists()
    with pytest.raises(GalleryIndexError, match="did not finish"):
        GalleryIndex.open(out)
    report = build_index(out, items, retriever.bundle_hash, 64, config, encode)
    assert (report.shards_reused, report.shards_total) == (2, 4)
    build_index(tmp_path / "whole", items, retriever.bundle_hash, 64, config, encode)
    for shard in sorted((tmp_path / "whole" / SHARDS).iterdir()):
        assert (out / SHARDS / shard.name).read_bytes() == shard.read_bytes(), shard.name
    with pytest.raises(GalleryIndexError, match="holds another build"):
        build_index(out, items[:-1], retriever.bundle_hash, 64, config, encode)


@pytest.mark.slow  # two local Ray builds in their own interpreters (~40 s)
def test_ray_data_build_equals_a_single_process_build(world, tmp_path) -> None:
    """Two Ray Data actors on CPU and an in-process build give the same ids and embeddings, bit for bit."""
    common = ["--bundle", str(world["bundle"]), "--images", str(world["synthetic"] / "dev")]
    tuning = ["index.shard_size=8", "index.batch_size=4"]
    ray_run = _launch("index.py", *common, "--out", str(tmp_path / "ray"), "index.workers=2", *tuning)
    assert ray_run.returncode == 0, ray_run.stderr[-3000:]
    assert "2 Ray Data actor(s) on CPU" in ray_run.stdout
    local_run = _launch("index.py", *common, "--out", str(tmp_path / "local"), "index.workers=0", *tuning)
    assert local_run.returncode == 0, local_run.stderr[-3000:]
    shards = sorted(path.name for path in (tmp_path / "local" / SHARDS).iterdir())
    assert len(shards) == 6 and shards == sorted(path.name for path in (tmp_path / "ray" / SHARDS).iterdir())
    for name in shards:
        assert (tmp_path / "ray" / SHARDS / name).read_bytes() == (tmp_path / "local" / SHARDS / name).read_bytes()
    rerun = _launch("index.py", *common, "--out", str(tmp_path / "ray"), "index.workers=2", *tuning)
    assert rerun.returncode == 0 and "3 reused" in rerun.stdout, rerun.stdout


# --- searching ----------------------------------------------------------------------------------------------------


@pytest.mark.slow  # the eval job, an index build and a batch search, each a command (~20 s)
def test_batch_search_gives_the_eval_jobs_recall(world, tmp_path) -> None:
    """Every val query through `launch/search.py --benchmark` on an exact index: R@1/5/10 equal the eval job's."""
    overrides = [f"cluster.storage_path={world['root'] / 'runs'}", f"eval.datasets.synthetic.root={world['synthetic']}"]
    overrides += ["eval.device=cpu", "eval.loader_workers=0"]
    evaluation = _launch("eval.py", "--config", TINY, "--checkpoint", str(world["checkpoint"]), *overrides)
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    metrics = json.loads((world["root"] / "runs" / "demo" / "eval" / "step_00000040.json").read_text())
    expected = metrics["benchmarks"]["synthetic"]["metrics"]
    index_dir = tmp_path / "index"
    built = _launch(
        "index.py",
        "--config",
        TINY,
        "--bundle",
        str(world["bundle"]),
        "--benchmark",
        "synthetic",
        "--out",
        str(index_dir),
        "index.workers=0",
        *overrides[1:2],
    )
    assert built.returncode == 0, built.stderr[-3000:]
    results = tmp_path / "results.jsonl"
    searched = _launch(
        "search.py",
        "--config",
        TINY,
        "--index",
        str(index_dir),
        "--benchmark",
        "synthetic",
        "--out",
        str(results),
        "-k",
        "10",
        *overrides[1:2],
    )
    assert searched.returncode == 0, searched.stderr[-3000:]
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert len(records) == 8
    for cutoff in (1, 5, 10):
        found = sum(1 for record in records if record["target_rank"] and record["target_rank"] <= cutoff) / len(records)
        assert found == pytest.approx(expected[f"recall@{cutoff}"], abs=1e-9), cutoff
        assert f"recall@{cutoff} {100 * expected[f'recall@{cutoff}']:.2f}" in searched.stdout
    assert all(record["image"] not in [hit["path"] for hit in record["results"]] for record in records)
    first = records[0]
    sheet = tmp_path / "search.png"
    one = _launch(
        "search.py", "--config", TINY, "--index", str(index_dir), "--benchmark", "synthetic", "--query", first["id"],
        "-k", "10", "--sheet", str(sheet), *overrides[1:2],
    )  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    printed = [line.split()[2] for line in one.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert printed == [hit["id"] for hit in first["results"]] and sheet.is_file()
    assert ("<- target" in one.stdout) == (first["target_rank"] is not None)


def test_single_query_prints_the_top_k_and_draws_a_sheet(world, tmp_path) -> None:
    retriever = load_bundle(world["bundle"], device="cpu")
    items = list_images(world["synthetic"] / "dev")
    build_index(
        tmp_path / "index",
        items,
        retriever.bundle_hash,
        64,
        IndexConfig(),
        local_encoder(retriever),
        bundle_dir=world["bundle"],
    )
    sheet = tmp_path / "sheet.png"
    args = ["--index", str(tmp_path / "index"), "--image", items[0].path, "--text", "make it red", "-k", "5"]
    result = _launch("search.py", *args, "--target", items[1].id, "--sheet", str(sheet))
    assert result.returncode == 0, result.stderr[-2000:]
    ranked = [line.split() for line in result.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [int(row[0]) for row in ranked] == [1, 2, 3, 4, 5]
    assert sheet.is_file() and sheet.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _launch("search.py", "--index", str(tmp_path / "index"), "--image", items[0].path).returncode == 2


def test_an_index_refuses_queries_from_another_bundle(world, tmp_path) -> None:
    config = load_config(TINY, [f"cluster.storage_path={tmp_path / 'runs'}"])
    other = export_bundle(write_checkpoint(config.run_dir, 7, config, seed=11), tmp_path / "other")
    retriever = load_bundle(world["bundle"], device="cpu")
    build_index(
        tmp_path / "index",
        list_images(world["synthetic"] / "dev"),
        retriever.bundle_hash,
        64,
        IndexConfig(),
        local_encoder(retriever),
        bundle_dir=world["bundle"],
    )
    with pytest.raises(BundleMismatch, match="not comparable"):
        GalleryIndex.open(tmp_path / "index").check_bundle(other.weights_sha256)
    args = ["--index", str(tmp_path / "index"), "--bundle", str(tmp_path / "other")]
    result = _launch("search.py", *args, "--image", _images(world)[0], "--text", "red")
    assert result.returncode == 2 and "embeddings of different models are not comparable" in result.stderr


def test_a_malformed_query_file_names_the_line(world, tmp_path) -> None:
    from training.retrieval.queries import QueryFileError, read_queries

    queries = tmp_path / "queries.jsonl"
    queries.write_text('{"image": "a.png", "text": "red"}\n{"image": "b.png"}\n')
    with pytest.raises(QueryFileError, match=r"queries.jsonl:2: each line needs"):
        read_queries(queries)
    queries.write_text('{"image": "a.png", "text": "red", "target": "x"}\n')
    (parsed,) = read_queries(queries)
    assert parsed.image == str(tmp_path / "a.png") and parsed.target == "x" and parsed.id == "1"


# --- approximate indexes ------------------------------------------------------------------------------------------


@pytest.mark.slow  # builds flat, IVF and HNSW indexes over 100k vectors (~40 s on 2 cores)
def test_approximate_indexes_keep_95_percent_of_the_exact_top_10() -> None:
    """On 100k random unit vectors (no cluster structure: the hard case) HNSW with its defaults, and IVF visiting
    half its lists, hold >= 95 % of the exact top-10."""
    from training.perf.index_search import index_benchmark

    result = index_benchmark(IndexConfig(), vectors=100_000, dim=64, queries=500, k=10)
    ivf_half = next(
        entry
        for name, entry in result["ivf"]["nprobe_sweep"].items()
        if name.endswith(f"={result['ivf']['params']['nlist'] // 2}")
    )
    FIGURES.append(
        f"100k random vectors, top-10 recall: hnsw {result['hnsw']['recall']:.3f} (build {result['hnsw']['build_s']} s,"
        f" 500 queries {result['hnsw']['query_s']} s), ivf nprobe=nlist/2 {ivf_half['recall']:.3f} (build "
        f"{result['ivf']['build_s']} s), flat query {result['flat']['query_s']} s"
    )
    assert result["hnsw"]["recall"] >= 0.95
    assert ivf_half["recall"] >= 0.95


def test_overwrite_never_deletes_a_folder_that_is_not_a_build(world, tmp_path) -> None:
    """`--overwrite` replaces an index or a bundle; a folder of the user's own files is refused and left intact."""
    photos = tmp_path / "photos"
    for index in range(3):
        write_image(photos / f"p{index}.png", index)
    retriever = load_bundle(world["bundle"], device="cpu")
    with pytest.raises(GalleryIndexError, match="is not an index build"):
        build_index(photos, list_images(photos), retriever.bundle_hash, 64, IndexConfig(), local_encoder(retriever),
                    overwrite=True)  # fmt: skip
    with pytest.raises(FileExistsError, match="is not an inference bundle"):
        export_bundle(world["checkpoint"], photos, overwrite=True)
    assert sorted(path.name for path in photos.iterdir()) == ["p0.png", "p1.png", "p2.png"]
    assert all(Path(item.path).is_absolute() for item in list_images(photos))


def test_a_gallery_of_only_unreadable_images_lists_them(world, tmp_path) -> None:
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.png").write_text("no image")
    retriever = load_bundle(world["bundle"], device="cpu")
    with pytest.raises(GalleryIndexError, match="none of the 1 images"):
        build_index(tmp_path / "index", list_images(tmp_path / "bad"), retriever.bundle_hash, 64, IndexConfig(),
                    local_encoder(retriever))  # fmt: skip
    assert "a.png" in (tmp_path / "index" / "skipped.jsonl").read_text()
