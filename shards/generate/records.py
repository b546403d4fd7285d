"""The generator's inputs and outputs: image pairs in, then the released CIRR_R layout, a JSONL manifest, the
stage answers, the failures and a summary out. Every output record carries the prompt version and the model."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

from shards.builder.sources import SourceError, read_source
from shards.builder.writer import write_json_atomically as write_json
from shards.config import SourceConfig
from shards.generate.pairs import Pair, PairResult

_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def read_pair_list(path: str | Path) -> list[Pair]:
    """Pairs of a JSONL file of `{"id", "reference", "target"}`, image paths relative to the file.

    Raises:
        SourceError: the file is missing, or a line is not such an object (file and line named), or ids repeat.
    """
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"generate.pairs={path}: no such file")
    pairs, seen = [], set()
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            entry = json.loads(line)
        except ValueError as error:
            raise SourceError(f"{where}: not JSON ({error})") from None
        if not isinstance(entry, dict) or not all(isinstance(entry.get(key), str) for key in ("reference", "target")):
            raise SourceError(f'{where}: expected {{"id", "reference", "target"}} with string paths, got {line[:120]}')
        pair_id = str(entry.get("id", number))
        if pair_id in seen:
            raise SourceError(f"{where}: id {pair_id!r} repeats an earlier line")
        seen.add(pair_id)
        pairs.append(
            Pair(
                pair_id,
                str((path.parent / entry["reference"]).resolve()),
                str((path.parent / entry["target"]).resolve()),
            )
        )
    return pairs


def source_pairs(source: SourceConfig) -> list[Pair]:
    """The distinct (reference, target) image pairs of a configured source; its captions are not used."""
    pairs: dict[tuple[str, str], Pair] = {}
    for triplet in read_source(source):
        if triplet.reference_path is None or triplet.target_path is None:
            continue
        key = (triplet.reference_path, triplet.target_path)
        if key not in pairs:
            pair_id = _SAFE.sub("_", f"{triplet.reference_name}__{triplet.target_name}")
            pairs[key] = Pair(
                pair_id, str(Path(triplet.reference_path).resolve()), str(Path(triplet.target_path).resolve())
            )
    return list(pairs.values())


def _relative(path: str, root: Path) -> str:
    return Path(os.path.relpath(path, root)).as_posix()


def write_json_atomically(path: Path, payload: Any, lines: bool = False) -> None:
    """JSON (or JSON lines, one item each) written under a temporary name, then renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not lines:
        write_json(path, payload)
        return
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text("".join(json.dumps(item, sort_keys=True) + "\n" for item in payload))
    temporary.replace(path)


def write_outputs(
    results: list[PairResult], out: Path, split: str, image_root: Path, trees: dict[str, str] | None = None
) -> dict[str, Path]:
    """Write every output of a run, in pair-id order so that any worker count gives the same bytes.

    - `rewritten_captions/rewritten_{split}.json`: CIRR_R entries, image paths relative to `image_root` (read them
      with a `cirr_r` source whose `image_root` is that directory);
    - `manifest_{split}.jsonl`: one `{"id", "reference", "target", "caption"}` per caption, paths relative to `out`
      (a `jsonl` source);
    - `objects/objects_{split}.jsonl`: each pair's stage answers; `failures_{split}.jsonl`: each failed pair's
      reason; `trees_{split}.jsonl` when `trees` is given (a `trees` sidecar for either source).
    """
    ordered = sorted(results, key=lambda result: result.id)
    done = [result for result in ordered if not result.failure]
    cirr_r = [
        {
            "query_image_url": _relative(result.reference, image_root),
            "retrieved_image_url": _relative(result.target, image_root),
            "difference_captions": result.captions,
            "pair_id": result.id,
            "prompt_version": result.prompt_version,
            "model": result.model,
        }
        for result in done
    ]
    manifest = [
        {
            "id": f"{result.id}-{number}",
            "reference": _relative(result.reference, out),
            "target": _relative(result.target, out),
            "caption": caption,
            "prompt_version": result.prompt_version,
            "model": result.model,
        }
        for result in done
        for number, caption in enumerate(result.captions)
    ]
    stages = [
        {"id": r.id, "prompt_version": r.prompt_version, "model": r.model, "answers": r.answers, "dropped": r.dropped}
        for r in ordered
        if r.answers
    ]
    failures = [
        {
            "id": r.id,
            "reference": r.reference,
            "target": r.target,
            "reason": r.failure,
            "detail": r.failure_detail,
            "prompt_version": r.prompt_version,
            "model": r.model,
        }
        for r in ordered
        if r.failure
    ]
    paths = {
        "cirr_r": out / "rewritten_captions" / f"rewritten_{split}.json",
        "manifest": out / f"manifest_{split}.jsonl",
        "objects": out / "objects" / f"objects_{split}.jsonl",
        "failures": out / f"failures_{split}.jsonl",
    }
    write_json_atomically(paths["cirr_r"], cirr_r)
    write_json_atomically(paths["manifest"], manifest, lines=True)
    write_json_atomically(paths["objects"], stages, lines=True)
    write_json_atomically(paths["failures"], failures, lines=True)
    if trees is not None:
        paths["trees"] = out / f"trees_{split}.jsonl"
        captions = sorted({caption for result in done for caption in result.captions})
        write_json_atomically(
            paths["trees"], [{"caption": c, "tree": trees[c]} for c in captions if c in trees], lines=True
        )
    return paths


def summarize(results: list[PairResult], prices: tuple[float, float]) -> dict[str, Any]:
    """Counts of the run: pairs, triplets, failures and drops by reason, requests, tokens and cost."""
    prompt = sum(result.prompt_tokens for result in results)
    completion = sum(result.completion_tokens for result in results)
    dropped: Counter = Counter()
    for result in results:
        dropped.update(result.dropped)
    return {
        "pairs": len(results),
        "pairs_with_triplets": sum(1 for result in results if not result.failure),
        "triplets": sum(len(result.captions) for result in results if not result.failure),
        "failures": dict(sorted(Counter(result.failure for result in results if result.failure).items())),
        "dropped_captions": dict(sorted(dropped.items())),
        "repairs": sum(result.repairs for result in results),
        "endpoint_calls": sum(result.calls for result in results),
        "cached_answers": sum(result.cache_hits for result in results),
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "cost": round(prompt * prices[0] / 1e6 + completion * prices[1] / 1e6, 6),
    }
