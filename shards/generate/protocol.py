"""The three questions asked of a vision-language model per image pair, as chat-completions requests, and the JSON
schemas their answers are checked against.

1. `reference_objects`: the objects of the reference image, each with descriptors and a position;
2. `target_objects`: the same for the target image, reusing the reference's descriptors where an object is
   unchanged;
3. `modifications`: the single additions, removals and modifications that lead from one to the other.

The prompt texts are the project's own template files under `prompts/<version>/`. A prompt set's version is its
directory name plus a hash of its files, so an edited template can never be mistaken for the one a cached answer
or an output record came from.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema

STAGES = ("reference_objects", "target_objects", "modifications")
PROMPTS_ROOT = Path(__file__).resolve().parent / "prompts"
_TEMPLATES = ("system", *STAGES, "repair")

_OBJECT = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 60},
        "descriptors": {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": 40}, "maxItems": 8},
        "position": {"type": "string", "maxLength": 40},
    },
    "required": ["name", "descriptors", "position"],
    "additionalProperties": False,
}
_OBJECTS = {
    "type": "object",
    "properties": {"objects": {"type": "array", "items": _OBJECT, "minItems": 1, "maxItems": 40}},
    "required": ["objects"],
    "additionalProperties": False,
}
SCHEMAS: dict[str, dict[str, Any]] = {
    "reference_objects": _OBJECTS,
    "target_objects": _OBJECTS,
    "modifications": {
        "type": "object",
        "properties": {
            "modifications": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "type": {"enum": ["add", "remove", "modify"]},
                        "object": {"type": "string", "minLength": 1, "maxLength": 60},
                        "text": {"type": "string", "minLength": 3, "maxLength": 200},
                    },
                    "required": ["type", "object", "text"],
                    "additionalProperties": False,
                },
                "maxItems": 20,
            }
        },
        "required": ["modifications"],
        "additionalProperties": False,
    },
}
"""The answer schema of each stage; sent as the request's `response_format` and checked on every answer."""


class ResponseError(ValueError):
    """An answer that is not JSON or does not follow its stage's schema; the message is the reason."""


@dataclass(frozen=True)
class Prompts:
    """One version of the prompt templates."""

    version: str
    texts: dict[str, str]

    def stage_text(self, stage: str, **context: str) -> str:
        return self.texts[stage].format(**context).strip()


@cache
def load_prompts(name: str = "v1") -> Prompts:
    """The templates of `prompts/<name>/`; the version is `<name>-<hash of the files>`."""
    directory = PROMPTS_ROOT / name
    if not directory.is_dir():
        known = sorted(path.name for path in PROMPTS_ROOT.iterdir() if path.is_dir())
        raise ValueError(f"generate.prompts={name!r}: no such prompt set (have {known})")
    digest = hashlib.sha256()
    texts = {}
    for template in _TEMPLATES:
        text = (directory / f"{template}.txt").read_text()
        texts[template] = text
        digest.update(template.encode() + b"\0" + text.encode() + b"\0")
    return Prompts(f"{name}-{digest.hexdigest()[:8]}", texts)


def image_part(data: bytes) -> dict[str, Any]:
    """An image as chat-completions content: a base64 data URL (PNG or JPEG, told by its magic bytes)."""
    kind = "png" if data.startswith(b"\x89PNG") else "jpeg"
    return {"type": "image_url", "image_url": {"url": f"data:image/{kind};base64,{base64.b64encode(data).decode()}"}}


def objects_text(objects: list[dict[str, Any]]) -> str:
    """An object list as the prompts quote it: compact JSON."""
    return json.dumps(objects, separators=(",", ":"), sort_keys=True)


def stage_messages(
    prompts: Prompts, stage: str, reference: bytes, target: bytes, answers: dict[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    """The chat messages of `stage` for one pair, given the earlier stages' parsed answers."""
    context = {}
    if stage != "reference_objects":
        context["reference_objects"] = objects_text(answers["reference_objects"]["objects"])
    if stage == "modifications":
        context["target_objects"] = objects_text(answers["target_objects"]["objects"])
    images = [image_part(reference)] if stage == "reference_objects" else [image_part(reference), image_part(target)]
    return [
        {"role": "system", "content": prompts.texts["system"].strip()},
        {"role": "user", "content": [{"type": "text", "text": prompts.stage_text(stage, **context)}, *images]},
    ]


def repair_messages(
    prompts: Prompts, messages: list[dict[str, Any]], answer: str, problem: str
) -> list[dict[str, Any]]:
    """The stage's messages followed by the unusable answer and a request to answer again."""
    return [
        *messages,
        {"role": "assistant", "content": answer[:4000]},
        {"role": "user", "content": prompts.stage_text("repair", problem=problem)},
    ]


def response_format(stage: str) -> dict[str, Any]:
    """The OpenAI-compatible structured-output request for `stage` (vLLM and SGLang honour it too)."""
    return {"type": "json_schema", "json_schema": {"name": stage, "schema": SCHEMAS[stage], "strict": True}}


def parse_answer(stage: str, text: str) -> dict[str, Any]:
    """The answer as a dict valid under the stage's schema; raises ResponseError with the reason otherwise."""
    return parse_json_answer(text, SCHEMAS[stage])


def parse_json_answer(text: str, schema: dict[str, Any]) -> dict[str, Any]:
    """An answer as a dict valid under `schema` (a code fence around it is tolerated); raises ResponseError with the
    reason otherwise."""
    body = text.strip()
    if body.startswith("```"):  # some servers wrap JSON in a code fence despite the instructions
        body = body.strip("`").removeprefix("json").strip()
    try:
        payload = json.loads(body)
    except ValueError as error:
        raise ResponseError(f"not JSON ({error})") from None
    try:
        jsonschema.validate(payload, schema)
    except jsonschema.ValidationError as error:
        where = "/".join(str(part) for part in error.absolute_path) or "the answer"
        raise ResponseError(f"{where}: {error.message}") from None
    return payload


def ask_repairing(
    complete: Callable[[list[dict[str, Any]]], str],
    parse: Callable[[str], dict[str, Any]],
    prompts: Prompts,
    messages: list[dict[str, Any]],
    repair_attempts: int,
    on_repair: Callable[[], None] = lambda: None,
) -> dict[str, Any]:
    """The parsed answer to `messages`, asking again with a repair turn (the answer and what is wrong with it) up to
    `repair_attempts` times while `parse` raises ResponseError; the last ResponseError is raised."""
    for attempt in range(repair_attempts + 1):
        text = complete(messages)
        try:
            return parse(text)
        except ResponseError as problem:
            if attempt == repair_attempts:
                raise
            on_repair()
            messages = repair_messages(prompts, messages, text, str(problem))
    raise AssertionError("unreachable")
