"""`launch/eval.py --checkpoint` on every benchmark layout at once: what a user sees in the JSON, TensorBoard,
`best.json`, the submission files and the printed table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from eval_fixtures import eval_main, write_checkpoint, write_circo, write_cirr_layout, write_fashioniq, write_synthetic
from PIL import Image

from cluster.root_config import load_config
from shards.model_inputs import eval_transform, tokenizer
from training.evaluation.benchmarks.synthetic import read_synthetic
from training.evaluation.grounding import MAP_KINDS, MEASURES, PHRASE_SPLITS, metric_name, score_map, split_of
from training.evaluation.methods import METHODS, QueryBatch
from training.evaluation.phrase_maps import TOWER_MAP_TEMPERATURE
from training.evaluation.spans import phrase_span_finder
from training.evaluation.submissions import validate_circo_submission, validate_cirr_submission
from training.model.context_cir import build_model

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny.yaml")
CIRR_KEYS = {"recall@1", "recall@5", "recall@10", "recall@50", "recall_subset@1", "recall_subset@2", "recall_subset@3"}
CIRR_KEYS |= {"avg"}
GROUNDING_KEYS = {
    metric_name(kind, split, measure) for kind in MAP_KINDS for split in PHRASE_SPLITS for measure in MEASURES
}
COUNTS = {key for key in GROUNDING_KEYS if key.endswith(("/n", "/auc_skipped"))}
EXPECTED_KEYS = {
    "cirr": CIRR_KEYS,
    "circo": {"recall@1", "recall@5", "recall@10", "recall@25", "recall@50", "map@5", "map@10", "map@25", "map@50"},
    "fashioniq": {"recall@10", "recall@50", "avg"}
    | {f"{category}/recall@{k}" for category in ("dress", "shirt", "toptee") for k in (10, 50)},
    "patterncir": {"recall@1", "recall@5", "recall@10", "recall@20", "recall@50"}
    | {"recall_subset@1", "recall_subset@2", "recall_subset@3"},
    "synthetic": CIRR_KEYS | {"grounding"} | GROUNDING_KEYS,
}


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("benchmarks")
    write_cirr_layout(base / "cirr", "val", "dev", sets=2)
    write_cirr_layout(base / "cirr", "test1", "test1", sets=9, labelled=False)  # 54 images: 50 left after the reference
    write_circo(base / "circo", gallery=52, labelled_queries=3, test_queries=3)
    write_fashioniq(base / "fashioniq")
    write_cirr_layout(base / "patterncir", "test1", "test1", sets=2, seed=7)
    write_synthetic(base / "synthetic", sets=2)
    return {name: base / name for name in EXPECTED_KEYS}


def _overrides(tmp_path: Path, roots: dict[str, Path]) -> list[str]:
    return [
        f"cluster.storage_path={tmp_path / 'runs'}",
        *(f"eval.datasets.{name}.root={root}" for name, root in roots.items()),
        "eval.splits=[val,test]",
        "eval.loader_workers=1",
        "eval.batch_size=16",
        "eval.device=cpu",
    ]


@pytest.mark.slow  # ~20-30 s on a shared 2-core machine: five benchmarks, two submissions, a loader worker
def test_one_checkpoint_on_every_benchmark(tmp_path, roots, capsys) -> None:
    overrides = _overrides(tmp_path, roots)
    config = load_config(TINY, overrides)
    write_checkpoint(config.run_dir, 100, config)
    latest = config.run_dir / "checkpoints" / "latest"
    benchmarks = ",".join(EXPECTED_KEYS)
    assert eval_main()(["--config", TINY, "--checkpoint", str(latest), "--benchmarks", benchmarks, *overrides]) == 0

    result = json.loads((config.run_dir / "eval" / "step_00000100.json").read_text())
    assert result["step"] == 100 and result["config"]["eval"]["datasets"]["synthetic"]["root"] == str(
        roots["synthetic"]
    )
    assert result["checkpoint_config"]["model"]["backbone"] == "ContextTiny"
    for name, keys in EXPECTED_KEYS.items():
        entry = result["benchmarks"][name]
        assert set(entry["metrics"]) == keys, name
        assert set(entry["baselines"]) == {"image_only", "text_only", "image_text_sum"}
        # Baselines have no attention maps, so grounding is the model's alone.
        assert all(set(metrics) == keys - {"grounding"} - GROUNDING_KEYS for metrics in entry["baselines"].values())
        for metrics in (entry["metrics"], *entry["baselines"].values()):
            fractions = {metric: value for metric, value in metrics.items() if metric not in COUNTS}
            assert all(0.0 <= value <= 1.0 for value in fractions.values()), (name, metrics)
        assert entry["version"], name

    # Predictions agree with the metrics, and CIRR's protocol never predicts the query's own reference.
    cirr_captions = json.loads((roots["cirr"] / "cirr" / "captions" / "cap.rc2.val.json").read_text())
    predictions = result["benchmarks"]["cirr"]["predictions"]
    assert len(predictions) == len(cirr_captions)
    for entry in cirr_captions:
        ranked = predictions[str(entry["pairid"])]
        assert len(ranked) == 11 and entry["reference"] not in ranked and len(set(ranked)) == 11
    hits = [predictions[str(entry["pairid"])][0] == entry["target_hard"] for entry in cirr_captions]
    assert result["benchmarks"]["cirr"]["metrics"]["recall@1"] == pytest.approx(sum(hits) / len(hits))
    # CIRCO keeps the reference: the image-only baseline finds the reference itself first, never the target.
    assert result["benchmarks"]["circo"]["baselines"]["image_only"]["recall@1"] == 0.0
    assert len(result["benchmarks"]["circo"]["predictions"]["0"]) == 50
    # Grounding: 4 queries with one present, two added/position and one rest phrase each, every map kind scored.
    synthetic = result["benchmarks"]["synthetic"]["metrics"]
    assert result["benchmarks"]["synthetic"]["details"]["grounding_phrases"] == 16
    assert [synthetic[metric_name("tower", split, "n")] for split in PHRASE_SPLITS] == [4, 8, 4]
    assert synthetic["grounding"] == synthetic[metric_name("context", "present", "box_share")]  # kept as it was
    assert synthetic[metric_name("isolated", "present", "box_share_chance")] == pytest.approx(0.25)  # 16 of 64

    # Submission files exist and pass the servers' rules when read back.
    test1 = json.loads((roots["cirr"] / "cirr" / "captions" / "cap.rc2.test1.json").read_text())
    gallery = json.loads((roots["cirr"] / "cirr" / "image_splits" / "split.rc2.test1.json").read_text())
    pairs = {str(entry["pairid"]): (entry["reference"], entry["img_set"]["members"]) for entry in test1}
    cirr_files = [Path(path) for path in result["submissions"]["cirr"]]
    for path, metric in zip(cirr_files, ("recall", "recall_subset")):
        validate_cirr_submission(json.loads(path.read_text()), metric, pairs, gallery)
    circo_file = Path(result["submissions"]["circo"][0])
    validate_circo_submission(json.loads(circo_file.read_text()), ["0", "1", "2"], [str(100 + i) for i in range(52)])

    best = json.loads((config.run_dir / "eval" / "best.json").read_text())
    assert best["metric"] == "synthetic/recall@1" and best["step"] == 100
    assert best["value"] == result["benchmarks"]["synthetic"]["metrics"]["recall@1"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(config.run_dir / "tensorboard"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert "eval/synthetic/recall@1" in scalars and "eval/fashioniq/dress/recall@10" in scalars
    assert {f"eval/synthetic/{key}" for key in GROUNDING_KEYS} <= set(scalars)
    assert "eval/synthetic/grounding" in scalars and not any("grounding" in tag for tag in scalars if "cirr" in tag)
    assert [event.step for event in events.Scalars("eval/circo/map@5")] == [100]

    printed = capsys.readouterr().out
    assert "synthetic [val] 4 queries, gallery 12" in printed and "image_text_sum" in printed
    assert "recall_subset@1" in printed and "fashioniq [val] 6 queries, gallery 15 over 3 parts" in printed
    assert "pointing (chance)" in printed and "tower/added_or_position" in printed and "isolated/present" in printed
    assert "grounding/context" not in printed  # the measures sit in their own table, not as rows of percentages

    # --watch on the same run: the final checkpoint (train.steps=100) already has its result, so it exits at once.
    before = (config.run_dir / "eval" / "step_00000100.json").stat().st_mtime_ns
    assert eval_main()(["--config", TINY, "--watch", "--benchmarks", "synthetic", *overrides, "train.steps=100"]) == 0
    assert (config.run_dir / "eval" / "step_00000100.json").stat().st_mtime_ns == before
    assert json.loads((config.run_dir / "eval" / "watch_state.json").read_text())["done"]["100"]["adopted"]


def test_bad_invocations_exit_before_work(tmp_path, roots, capsys) -> None:
    main = eval_main()
    overrides = _overrides(tmp_path, roots)
    assert main(["--config", TINY, "--checkpoint", "x", "--benchmarks", "cirr,nope", *overrides]) == 2
    assert main(["--config", TINY, "--checkpoint", "x", "--benchmarks", "circo"]) == 2
    assert main(["--config", TINY, "--checkpoint", "x", "eval.nope=1"]) == 2
    config = load_config(TINY, overrides)
    partial = write_checkpoint(config.run_dir, 5, config, complete=False)
    assert main(["--config", TINY, "--checkpoint", str(partial), "--benchmarks", "synthetic", *overrides]) == 2
    assert "no COMPLETE marker" in capsys.readouterr().err
    assert not (config.run_dir / "eval" / "step_00000005.json").exists()


def test_unusable_checkpoints_end_in_one_eval_error_line(tmp_path, roots, capsys) -> None:
    """A truncated weights file and a config with a python tag: exit 2 and one `eval error:` line naming the file."""
    main = eval_main()
    overrides = _overrides(tmp_path, roots)
    config = load_config(TINY, overrides)
    truncated = write_checkpoint(config.run_dir, 5, config) / "model.safetensors"
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    tagged = write_checkpoint(config.run_dir, 6, config) / "config.yaml"
    tagged.write_text("x: !!python/object/apply:os.system [echo]\n" + tagged.read_text())
    for broken in (truncated, tagged):
        capsys.readouterr()
        assert (
            main(["--config", TINY, "--checkpoint", str(broken.parent), "--benchmarks", "synthetic", *overrides]) == 2
        )
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("eval error:") and str(broken) in err[0], err


def test_grounding_maps_are_the_models_and_the_towers_own(tmp_path) -> None:
    """Each phrase's three maps, scored in the query loop, equal the maps computed the long way: in-context and
    isolated from `ConTextCIR.forward` with the shard builder's `np_ids`, tower from open_clip's own image forward and
    the phrase's CLIP text embedding. The fusion head is untrained (random init): the tower maps do not need it."""
    from shards.builder.noun_phrases import NounPhrase
    from shards.builder.tokens import CaptionTokenizer
    from training.evaluation.encode import encode_queries

    write_synthetic(tmp_path, sets=1)
    split = read_synthetic(tmp_path)
    torch.manual_seed(0)
    model = build_model(load_config(TINY).model).eval()
    transform, tokenize = eval_transform("ContextTiny"), tokenizer("ContextTiny")
    methods = {"model": METHODS.get("context")}
    find_spans = phrase_span_finder("ContextTiny")
    found = encode_queries(model, methods, split, transform, tokenize, torch.device("cpu"), 4, 0, find_spans).grounding
    builder = CaptionTokenizer("ContextTiny", np_length=16)  # the shard builder's tokenization, as training has it
    visual = model.backbone.clip.visual
    expected = []
    with torch.no_grad():
        for query in split.queries:
            pixels = transform(Image.open(split.image_paths[query.reference]).convert("RGB"))[None]
            phrases = [
                NounPhrase(p.text, query.text.index(p.text), query.text.index(p.text) + len(p.text))
                for p in query.phrases
            ]
            tokens = builder.tokenize(query.text, phrases)
            assert tokens.noun_phrases == [phrase.text for phrase in query.phrases]
            spans, ids = torch.tensor(tokens.np_spans[None]).long(), torch.tensor(tokens.np_ids[None]).long()
            mask = torch.ones(1, len(phrases), dtype=torch.bool)
            outputs = model(pixels, tokenize([query.text]), pixels, spans, mask, ids)
            visual.output_tokens = True
            patch_tokens = visual(pixels)[1][0]  # open_clip's own forward: patches after ln_post
            visual.output_tokens = False
            dense = torch.nn.functional.normalize(patch_tokens @ visual.proj, dim=-1)
            text = model.encode_text_clip(tokenize([phrase.text for phrase in query.phrases]))
            maps = {
                "context": outputs["fused/np_maps"][0],
                "isolated": outputs["fused/np_maps_isolated"][0],
                "tower": torch.softmax(text @ dense.T / TOWER_MAP_TEMPERATURE, dim=-1),
            }
            for index, phrase in enumerate(query.phrases):  # fixture images are square: boxes need no crop mapping
                scores = {
                    kind: score_map(kind_maps[index].reshape(8, 8), phrase.box) for kind, kind_maps in maps.items()
                }
                expected.append((phrase.kind, scores))
    assert len(found) == len(expected) == 8
    for phrase, (kind, scores) in zip(found, expected):
        assert phrase.kind == kind and set(phrase.maps) == set(MAP_KINDS)
        for map_kind in MAP_KINDS:
            assert phrase.maps[map_kind].pointing == scores[map_kind].pointing, map_kind
            assert phrase.maps[map_kind].auc == pytest.approx(scores[map_kind].auc, abs=1e-6), map_kind
            assert phrase.maps[map_kind].box_share == pytest.approx(scores[map_kind].box_share, abs=1e-6), map_kind
    # The maps differ from one another: the isolated and tower maps are not the in-context one relabelled.
    present = [phrase.maps for phrase in found if split_of(phrase.kind) == "present"]
    assert len({round(maps[kind].box_share, 6) for maps in present for kind in MAP_KINDS}) > 1


def test_reference_patches_without_the_query_pass_states_run_the_tower_again(caplog) -> None:
    """Should the query pass not expose its states, grounding gets the same patch tokens from a second tower pass."""
    from training.evaluation import phrase_maps
    from training.evaluation.phrase_maps import QueryPassStates, query_pass_states, reference_patches

    phrase_maps._warn_second_image_pass.cache_clear()  # it warns once per process
    torch.manual_seed(0)
    model = build_model(load_config(TINY).model).eval()
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        batch = QueryBatch(model, pixels, tokenizer("ContextTiny")(["a red circle", "the top left"]))
        with query_pass_states(model) as states:
            batch.views  # noqa: B018 (the query pass, recorded)
        shared = reference_patches(model, states, pixels)
        again = reference_patches(model, QueryPassStates(), pixels)
    assert "runs the image tower again" in caplog.text
    for first, second in zip(shared, again):
        assert first.shape == (2, 64, 64) and torch.allclose(first, second, atol=1e-6)


def test_a_checkpoint_saved_with_older_eval_keys_still_loads(tmp_path) -> None:
    """Eval reads only the `model` section of a checkpoint's config, so configs from before a section changed load."""
    from training.checkpoint import layout
    from training.evaluation.runner import load_checkpoint_model

    config = load_config(TINY, [f"cluster.storage_path={tmp_path}"])
    path = write_checkpoint(config.run_dir, 3, config)
    saved = (path / layout.CONFIG).read_text().replace("eval:\n", "eval:\n  synthetic_root: data/synthetic\n", 1)
    (path / layout.CONFIG).write_text(saved)
    model, model_config = load_checkpoint_model(path, torch.device("cpu"))
    assert model_config == config.model and not model.training


def test_grounded_queries_run_each_tower_once_per_batch(tmp_path) -> None:
    """Grounding reads the maps' image tokens from the pass that encodes the queries: no second image pass."""
    from training.evaluation.encode import encode_queries

    write_synthetic(tmp_path, sets=2)
    split = read_synthetic(tmp_path)
    torch.manual_seed(0)
    model = build_model(load_config(TINY).model).eval()
    calls = {"image": 0, "text": 0}
    model.backbone.clip.visual.conv1.register_forward_hook(lambda *_: calls.__setitem__("image", calls["image"] + 1))
    model.backbone.clip.token_embedding.register_forward_hook(lambda *_: calls.__setitem__("text", calls["text"] + 1))
    methods = {name: METHODS.get(name) for name in ("context", "image_only", "text_only", "image_text_sum")}
    result = encode_queries(
        model,
        methods,
        split,
        eval_transform("ContextTiny"),
        tokenizer("ContextTiny"),
        torch.device("cpu"),
        batch_size=3,
        workers=0,
        find_spans=phrase_span_finder("ContextTiny"),
    )
    batches = -(-len(split.queries) // 3)
    # The text tower runs on the captions, then on the phrases alone for the isolated and the tower maps.
    assert calls == {"image": batches, "text": 3 * batches}
    assert len(result.grounding) == sum(len(query.phrases) for query in split.queries) > 0
    assert all(set(phrase.maps) == {"context", "isolated", "tower"} for phrase in result.grounding)


def test_eval_benchmark_times_grounding_beside_plain_encoding(tmp_path) -> None:
    from training.perf.eval_queries import eval_query_benchmark

    write_synthetic(tmp_path, sets=2)
    config = load_config(TINY, [f"eval.datasets.synthetic.root={tmp_path}", "eval.device=cpu", "eval.batch_size=4"])
    result = eval_query_benchmark(config, config.model, repeats=1, limit=3)
    assert result["queries"] == 3 and result["grounded_phrases"] > 0 and result["loader_workers"] == 0
    assert result["grounding_ratio"] == pytest.approx(result["with_grounding_s"] / result["without_grounding_s"])


def test_eval_rebuilds_the_towers_with_the_activation_the_checkpoint_records(tmp_path) -> None:
    """A QuickGELU checkpoint (e.g. fine-tuned from OpenAI weights) is scored with QuickGELU, not the name's GELU."""
    from open_clip.transformer import QuickGELU

    from training.evaluation.runner import load_checkpoint_model

    config = load_config(TINY, [f"cluster.storage_path={tmp_path}", "model.quick_gelu=true"])
    path = write_checkpoint(config.run_dir, 5, config)
    model, model_config = load_checkpoint_model(path, torch.device("cpu"))
    assert model_config.quick_gelu is True
    assert isinstance(model.backbone.clip.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    assert isinstance(model.backbone.clip.transformer.resblocks[0].mlp.gelu, QuickGELU)


class _Weights:
    """`model.safetensors` of a network, as the trainer's consolidated-weights piece writes it (rank 0)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def save(self, directory: Path, rank: int) -> None:
        from training.model.weights import save_model_weights

        save_model_weights(self.model, directory / "model.safetensors")

    def load(self, directory: Path) -> None:
        """Nothing: eval reads the file itself."""


def test_a_checkpoint_copied_out_of_its_run_evaluates(tmp_path, capsys) -> None:
    """How checkpoints are shared: `step_00001000` copied to `shared-models/intact` has no step in its name, so eval
    reads the step from `trainer_state.json` as the trainer's `Checkpointer` writes it (`train.step`)."""
    import shutil

    from training.checkpoint.checkpointer import Checkpointer
    from training.checkpoint.pieces import ResolvedConfig
    from training.config_loader import to_yaml
    from training.trainer.state import TrainState

    write_synthetic(tmp_path / "synthetic", sets=2)
    overrides = [
        f"cluster.storage_path={tmp_path / 'runs'}",
        f"eval.datasets.synthetic.root={tmp_path / 'synthetic'}",
        "eval.loader_workers=0",
        "eval.device=cpu",
    ]
    config = load_config(TINY, overrides)
    torch.manual_seed(0)
    pieces = {"weights": _Weights(build_model(config.model)), "config": ResolvedConfig(to_yaml(config))}
    writer = Checkpointer(config.run_dir, 3, files=pieces, per_rank={}, per_run={"train": TrainState(step=1000)})
    shared = tmp_path / "shared-models" / "intact"
    shutil.copytree(writer.save(1000), shared)

    code = eval_main()(["--config", TINY, "--checkpoint", str(shared), "--benchmarks", "synthetic", *overrides])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"checkpoint step 1000 ({shared})" in captured.out
    assert "synthetic [val] 4 queries, gallery 12" in captured.out and "recall@1" in captured.out
    assert json.loads((config.run_dir / "eval" / "step_00001000.json").read_text())["checkpoint"] == str(shared)
