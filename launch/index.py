"""Embed an image gallery with a bundle's gallery encoder (Ray Data) and build a faiss index over it.

    python launch/index.py --bundle bundles/demo --images photos/ --out indexes/photos
    python launch/index.py --bundle bundles/demo --images list.txt --out indexes/list index.kind=hnsw
    python launch/index.py --bundle bundles/demo --benchmark synthetic --split val --out indexes/synthetic_val
    ray job submit --working-dir . -- python launch/index.py --bundle /shared/bundles/vith \
        --images /shared/gallery.txt --out /shared/indexes/gallery index.workers=16

`--images` is a folder (every image below it; ids are relative paths), a `.txt` list (`path` or `id<TAB>path` per
line) or a `.jsonl` list (`{"id", "path"}`). Encoder actors take one GPU each when the cluster has GPUs.
Rerunning the same command resumes: finished shards are kept. Unreadable images are skipped and listed in
`<out>/skipped.jsonl`. `index.workers=0` encodes in this process, without Ray.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.cli import CONFIG_ERROR_EXIT, ConfigError, parse_config_args  # noqa: E402


def add_arguments(parser) -> None:
    parser.add_argument("--bundle", required=True, help="an inference bundle (launch/export.py)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="a folder of images, or a .txt / .jsonl list of them")
    source.add_argument("--benchmark", help="index a registered benchmark's gallery (eval.datasets.<name>.root)")
    parser.add_argument("--split", default="val", help="with --benchmark: the split (default val)")
    parser.add_argument("--out", required=True, help="the index directory")
    parser.add_argument("--overwrite", action="store_true", help="discard a different build found in --out")


def main(argv: list[str] | None = None) -> int:
    try:
        args, config = parse_config_args(argv, "Index an image gallery for search.", add_arguments, "tiny")
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return CONFIG_ERROR_EXIT
    logging.basicConfig(level=logging.ERROR)
    from training.retrieval.bundle import BundleError, load_bundle, verify_bundle
    from training.retrieval.gallery_build import build_index
    from training.retrieval.gallery_index import GalleryIndexError, list_images
    from training.retrieval.queries import benchmark_gallery, read_benchmark_split

    try:
        info = verify_bundle(args.bundle)  # the actors then load it unchecked
        if args.benchmark:
            items = benchmark_gallery(read_benchmark_split(config.eval, args.benchmark, args.split))
        else:
            items = list_images(args.images)
        workers = config.index.workers
        if workers == 0:
            from training.retrieval.gallery_index import local_encoder

            retriever = load_bundle(args.bundle)
            encoder = local_encoder(retriever)
            where = "this process"
        else:
            from cluster.runtime.ray_setup import connect, relative_path_problem

            paths = {"--bundle": args.bundle, "--images": args.images or "", "--out": args.out}
            problem = relative_path_problem(config.cluster, paths)
            if problem is not None:
                raise ValueError(problem)
            print(connect(config.cluster), flush=True)  # before anything imports ray
            from cluster.jobs.indexing import ray_encoder
            from cluster.runtime.ray_setup import cluster_has_gpus

            use_gpu = cluster_has_gpus()
            encoder = ray_encoder(args.bundle, workers, info.embed_dim, use_gpu)
            where = f"{workers} Ray Data actor(s) on {'GPU' if use_gpu else 'CPU'}"
        print(f"indexing {len(items)} images with {where} into {args.out}", flush=True)
        report = build_index(
            args.out, items, info.weights_sha256, info.embed_dim, config.index, encoder, args.overwrite, args.bundle
        )
    except (BundleError, GalleryIndexError, ValueError) as error:
        print(f"index error: {error}", file=sys.stderr)
        return CONFIG_ERROR_EXIT
    print(
        f"index: {args.out}  {report.count} images ({report.skipped} unreadable, listed in {args.out}/skipped.jsonl), "
        f"{report.shards_total} shard(s), {report.shards_reused} reused, {config.index.kind} index, {report.seconds:.1f} s"
    )
    print(f'search: python launch/search.py --index {args.out} --image <query image> --text "<modification>"')
    return 0


if __name__ == "__main__":
    sys.exit(main())
