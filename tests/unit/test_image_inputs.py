"""Images cross to the GPU as uint8 pixels and are normalised there: the same numbers as open_clip's eval transform,
a quarter of the bytes in shared memory and in the host-to-device copy."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from cc_oracle import make_batch
from PIL import Image
from shard_fixtures import sample_members

from cluster.bench.gpu_preflight import image_batch_bytes
from shards.format import split_member_name
from shards.model_inputs import eval_transform, image_size, normalisation, normalise_images, uint8_transform
from shards.stream.decode import Record, collate, decode_sample
from training.model.config import ModelConfig
from training.model.context_cir import build_model

TINY = ModelConfig(backbone="ContextTiny", fusion_layers=2, fusion_heads=4)


def _noise(width: int, height: int, seed: int) -> Image.Image:
    """A non-square photo stand-in: every pixel differs, so the resize filter and the crop both show."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def _encoded(image: Image.Image, format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **({"quality": 85} if format == "JPEG" else {}))
    return buffer.getvalue()


def _record(key: str, number: int, reference: bytes, target: bytes) -> Record:
    fields = {split_member_name(name)[1]: data for name, data in sample_members(key, number).items()}
    return Record(key, fields | {"ref.jpg": reference, "tgt.jpg": target})


@pytest.mark.parametrize("backbone", ["ContextTiny", "ViT-B-16"])
@pytest.mark.parametrize("size", [(97, 61), (40, 300), (224, 224), (13, 9)])
def test_uint8_pixels_normalised_equal_the_eval_transform_exactly(backbone, size):
    image = _noise(*size, seed=size[0])
    pixels = uint8_transform(backbone)(image)
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, image_size(backbone), image_size(backbone))
    assert torch.equal(normalise_images(pixels, *normalisation(backbone)), eval_transform(backbone)(image))


def test_decoded_samples_are_uint8_and_normalise_to_the_float_path():
    reference, target = _noise(97, 61, seed=1), _noise(50, 80, seed=2)
    record = _record("k0", 0, _encoded(reference, "JPEG"), _encoded(target, "PNG"))
    sample = decode_sample(record, "ContextTiny", max_nps=3, np_length=16)
    float_path = eval_transform("ContextTiny")
    stats = normalisation("ContextTiny")
    for name, data in (("reference_image", record.fields["ref.jpg"]), ("target_image", record.fields["tgt.jpg"])):
        assert sample[name].dtype == torch.uint8 and sample[name].shape == (3, 64, 64)
        decoded = Image.open(io.BytesIO(data)).convert("RGB")
        assert torch.equal(normalise_images(sample[name], *stats), float_path(decoded))


def test_a_collated_batch_holds_a_quarter_of_the_float32_bytes():
    records = [
        _record(f"k{i}", i, _encoded(_noise(70, 50, i), "JPEG"), _encoded(_noise(50, 70, i), "JPEG")) for i in range(4)
    ]
    batch = collate([decode_sample(record, "ContextTiny", max_nps=3, np_length=16) for record in records])
    images = batch["reference_image"], batch["target_image"]
    assert all(image.dtype == torch.uint8 and image.shape == (4, 3, 64, 64) for image in images)
    as_float32 = sum(normalise_images(image, *normalisation("ContextTiny")).nbytes for image in images)
    assert sum(image.nbytes for image in images) * 4 == as_float32 == 4 * 2 * 3 * 64 * 64 * 4
    # The GPU bench's /dev/shm preflight counts exactly these bytes per batch.
    assert sum(image.nbytes for image in images) == image_batch_bytes(4, 2, 64)


def _pixels_and_floats(batch: dict, backbone: str = "ContextTiny") -> tuple[dict, dict]:
    """The batch with uint8 pixels (as the reader hands it over), and with them normalised on the host."""
    generator = torch.Generator().manual_seed(0)
    pixels, floats = dict(batch), dict(batch)
    for name in ("reference_image", "target_image"):
        pixels[name] = torch.randint(0, 256, batch[name].shape, generator=generator, dtype=torch.uint8)
        floats[name] = normalise_images(pixels[name], *normalisation(backbone))
    return pixels, floats


@pytest.mark.parametrize("bf16", [False, True])
def test_the_model_gives_the_same_outputs_for_pixels_as_for_images_normalised_on_the_host(bf16):
    torch.manual_seed(0)
    model = build_model(TINY).eval()
    pixels, floats = _pixels_and_floats(make_batch([12, 40], [2, 3]))
    names = ("reference_image", "caption_ids", "target_image", "np_spans", "np_mask", "np_ids")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        from_pixels = model(*(pixels[name] for name in names))
        from_floats = model(*(floats[name] for name in names))
        gallery = model.encode_gallery(pixels["target_image"]), model.encode_gallery(floats["target_image"])
        views = [
            model.encode_query_views(
                batch["reference_image"], batch["caption_ids"], batch["np_spans"], batch["np_mask"]
            )
            for batch in (pixels, floats)
        ]
    assert from_pixels.keys() == from_floats.keys()
    for name in from_pixels:
        assert torch.equal(from_pixels[name], from_floats[name]), name
    assert torch.equal(*gallery)
    for name in views[0]:
        assert torch.equal(views[0][name], views[1][name]), name
    # Not equal by accident: raw pixels read as if normalised give another query.
    with torch.no_grad():
        raw = model(pixels["reference_image"].float(), pixels["caption_ids"], pixels["target_image"].float())
    assert not torch.allclose(raw["fused/query"], from_pixels["fused/query"].float(), atol=1e-2)


def test_reference_and_target_images_of_different_kinds_are_refused():
    model = build_model(TINY)
    pixels, floats = _pixels_and_floats(make_batch([12, 40], [0, 0]))
    with pytest.raises(TypeError, match="both be uint8 pixels or both normalised floats"):
        model(pixels["reference_image"], pixels["caption_ids"], floats["target_image"])


def test_the_backbone_normalises_with_the_loaders_statistics_on_the_images_device():
    model = build_model(ModelConfig(backbone="ContextTiny"))
    mean, std = normalisation("ContextTiny")
    assert model.backbone.pixel_mean.flatten().tolist() == pytest.approx(mean)
    assert model.backbone.pixel_std.flatten().tolist() == pytest.approx(std)
    # Buffers that follow the module, but no part of its checkpoints.
    assert not any("pixel_" in name for name in model.state_dict())
    pixels = torch.full((1, 3, 64, 64), 255, dtype=torch.uint8)
    inputs = model.backbone.image_inputs(pixels)
    assert inputs.dtype == model.backbone.clip.visual.conv1.weight.dtype
    expected = (1 - torch.tensor(mean)) / torch.tensor(std)
    torch.testing.assert_close(inputs[0, :, 0, 0], expected)


def test_normalise_images_refuses_floats():
    with pytest.raises(TypeError, match="uint8"):
        normalise_images(torch.zeros(1, 3, 4, 4), *normalisation("ContextTiny"))
