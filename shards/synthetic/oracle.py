"""The scene oracle: a stand-in for a vision-language model that answers the data generator's three questions for
images of the synthetic benchmark, from the scene each image was rendered from.

It is not a model and sees no pixels. It finds each image by the sha256 of its bytes (never by a path or name) in
`objects.json` (and the binding split's `binding.json`), and answers from the recorded objects: their shapes, sizes, colours and positions, and the
difference between two scenes by object id. It serves the OpenAI chat-completions protocol on 127.0.0.1, so the
generator, its retries, repairs and cache run unchanged against it (`launch/scene_oracle.py`).

It also answers CVSI's two questions (`cvsi_captions`, `cvsi_edit`; see `oracle_cvsi`): captions of an image from
its scene, and an edit of a reference's captions by a modification text, which is perfect on the benchmark's own
triplets (the oracle looks the target up), so offline it is an upper bound of the LLM stage.

Realistic faults, at `fault_rate` in all, a third each:
- a 429 with `Retry-After` (transient: the same request may pass next time);
- malformed JSON (transient as well; the generator sends a repair request);
- a missing object: one object left out of an object list (or of `cvsi_edit`'s added objects). Like a model's
  consistent mistake, it depends on the stage and the images (the quoted captions) only, so every rerun and every
  repair makes it again.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shards.synthetic.binding import BINDING_FILE, BINDING_SPLIT
from shards.synthetic.oracle_cvsi import CVSI_STAGES, CVSIAnswers, RequestUnreadable, caption_count, scene_captions

STAGE_NAMES = ("reference_objects", "target_objects", "modifications", *CVSI_STAGES)
_LISTS = {"reference_objects": ("objects", 2), "target_objects": ("objects", 2), "cvsi_edit": ("added", 1)}
"""Stage -> (the answer's list the missing-object fault shortens, the fewest items it leaves it from)."""


class OracleError(ValueError):
    """A request the oracle cannot answer (unknown image, unknown stage); served as HTTP 400."""


def _unit(*parts: object) -> float:
    """A number in [0, 1) fixed by `parts`."""
    digest = hashlib.sha256("\0".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _where(position: str) -> str:
    return "in the center" if position == "center" else f"at the {position}"


def scene_objects(scene: dict[str, Any]) -> list[dict[str, Any]]:
    """A scene's objects as the protocol lists them, in a fixed order."""
    listed = [
        {"name": obj["shape"], "descriptors": [obj["size"], obj["color"]], "position": obj["position"]}
        for obj in scene["objects"]
    ]
    return sorted(listed, key=lambda item: (item["position"], item["name"], item["descriptors"]))


def scene_modifications(reference: dict[str, Any], target: dict[str, Any]) -> list[dict[str, str]]:
    """The single changes from one scene to the other, matching objects by their id."""
    before = {obj["id"]: obj for obj in reference["objects"]}
    after = {obj["id"]: obj for obj in target["objects"]}
    changes = []
    for key in sorted(before.keys() - after.keys()):
        obj = before[key]
        changes.append({"type": "remove", "object": obj["shape"], "text": f"remove the {obj['color']} {obj['shape']}"})
    for key in sorted(before.keys() & after.keys()):
        old, new = before[key], after[key]
        named = f"the {old['color']} {old['shape']}"
        if new["color"] != old["color"]:
            changes.append({"type": "modify", "object": old["shape"], "text": f"make {named} {new['color']}"})
        if new["size"] != old["size"]:
            change = "larger" if new["size"] == "large" else "smaller"
            changes.append({"type": "modify", "object": old["shape"], "text": f"make {named} {change}"})
        if new["position"] != old["position"]:
            text = f"move {named} to the {new['position']}"
            changes.append({"type": "modify", "object": old["shape"], "text": text})
    for key in sorted(after.keys() - before.keys()):
        obj = after[key]
        text = f"add a {obj['size']} {obj['color']} {obj['shape']} {_where(obj['position'])}"
        changes.append({"type": "add", "object": obj["shape"], "text": text})
    return changes


@dataclass
class SceneOracle:
    """Answers chat-completions requests for images of one synthetic benchmark root."""

    scenes: dict[str, dict[str, Any]]
    """sha256 of an image file -> its scene from objects.json."""
    fault_rate: float = 0.0
    seed: int = 0
    cvsi: CVSIAnswers | None = None
    """The benchmark's images and triplets for `cvsi_edit` (None: that stage is refused)."""
    counts: Counter = field(default_factory=Counter)
    """Requests served, by outcome (`ok`, `fault_429`, `fault_malformed`, `fault_missing_object`, `refused`)."""
    _attempts: Counter = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def from_root(cls, root: str | Path, **options: Any) -> SceneOracle:
        """Index every image listed by the benchmark's CIRR image splits by its content hash (the binding split's
        from `binding.json`, never replacing the scene of an image of the other splits with the same bytes)."""
        root = Path(root)
        images = json.loads((root / "objects.json").read_text())["images"]
        if (root / BINDING_FILE).is_file():
            images = {**json.loads((root / BINDING_FILE).read_text())["images"], **images}
        binding_split = f"split.rc2.{BINDING_SPLIT}.json"
        split_files = sorted((root / "cirr" / "image_splits").glob("split.rc2.*.json"))
        split_files.sort(key=lambda path: path.name == binding_split)  # stable: the binding split last
        scenes: dict[str, dict[str, Any]] = {}
        for split_file in split_files:
            for name, relative in json.loads(split_file.read_text()).items():
                if name in images:
                    digest = hashlib.sha256((root / relative).read_bytes()).hexdigest()
                    if split_file.name == binding_split:
                        scenes.setdefault(digest, images[name])
                    else:
                        scenes[digest] = images[name]
        if not scenes:
            raise OracleError(f"{root}: no images of objects.json found through cirr/image_splits")
        return cls(scenes, cvsi=CVSIAnswers.from_root(root, images), **options)

    def answer(self, request: dict[str, Any]) -> tuple[int, dict[str, Any], dict[str, str]]:
        """(HTTP status, JSON body, extra headers) for one chat-completions request."""
        body_key = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()
        with self._lock:
            attempt = self._attempts[body_key]
            self._attempts[body_key] += 1
        try:
            stage = request["response_format"]["json_schema"]["name"]
            messages = request["messages"]
        except (KeyError, TypeError):
            return self._refuse("the oracle needs response_format.json_schema.name naming the stage")
        if stage not in STAGE_NAMES:
            return self._refuse(f"unknown stage {stage!r}")
        try:
            payload, hashes, subject = self._payload(stage, messages)
        except KeyError:
            return self._refuse("an image the oracle has no scene for")
        except OracleError as error:
            return self._refuse(str(error))
        except (ValueError, TypeError) as error:
            return self._refuse(f"unreadable image content ({error})")
        transient = _unit(self.seed, body_key, attempt)
        if transient < self.fault_rate / 3:
            self._count("fault_429")
            return 429, {"error": {"message": "rate limited (scene oracle fault)"}}, {"Retry-After": "0.05"}
        if stage in _LISTS:
            name, fewest = _LISTS[stage]
            if len(payload[name]) >= fewest and _unit(self.seed, "missing", stage, *subject) < self.fault_rate / 3:
                self._count("fault_missing_object")
                payload[name] = payload[name][:-1]
        text = json.dumps(payload)
        if transient < 2 * self.fault_rate / 3:
            self._count("fault_malformed")
            text = text[: max(1, len(text) // 2)]
        else:
            self._count("ok")
        prompt_words = sum(len(str(part.get("text", "")).split()) for m in messages for part in _parts(m))
        usage = {
            "prompt_tokens": prompt_words + 85 * len(hashes),
            "completion_tokens": max(1, len(text) // 4),
        }
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return 200, _completion(request.get("model", "scene-oracle"), text, usage), {}

    def _payload(self, stage: str, messages: list[dict[str, Any]]) -> tuple[dict[str, Any], list[str], list[str]]:
        """(the right answer, the request's image hashes, what its missing-object fault depends on)."""
        if stage == "cvsi_edit":
            if self.cvsi is None:
                raise OracleError("this oracle was built without a benchmark root: no cvsi_edit")
            texts = _user_texts(messages)
            try:
                payload = self.cvsi.edit(texts)
            except RequestUnreadable as error:
                raise OracleError(f"cvsi_edit: {error}") from None
            return payload, [], [hashlib.sha256(texts[0].encode()).hexdigest()]  # the question, not a repair turn
        hashes = self._image_hashes(messages)
        scenes = [self.scenes[digest] for digest in hashes]
        if stage == "cvsi_captions":
            try:
                count = caption_count(_user_texts(messages))
            except RequestUnreadable as error:
                raise OracleError(f"cvsi_captions: {error}") from None
            return {"captions": scene_captions(scenes[0], count)}, hashes, hashes
        if stage == "modifications":
            if len(scenes) < 2:
                raise OracleError("the modifications stage needs two images")
            return {"modifications": scene_modifications(scenes[0], scenes[-1])}, hashes, hashes
        scene = scenes[0] if stage == "reference_objects" else scenes[-1]
        return {"objects": scene_objects(scene)}, hashes, hashes

    def _image_hashes(self, messages: list[dict[str, Any]]) -> list[str]:
        """Content hashes of the images of the last user message that has any (a repair turn repeats none)."""
        for message in reversed(messages):
            urls = [part["image_url"]["url"] for part in _parts(message) if part.get("type") == "image_url"]
            if urls:
                return [hashlib.sha256(base64.b64decode(url.split(",", 1)[1])).hexdigest() for url in urls]
        raise ValueError("no image in the request")

    def _refuse(self, message: str) -> tuple[int, dict[str, Any], dict[str, str]]:
        self._count("refused")
        return 400, {"error": {"message": message}}, {}

    def _count(self, outcome: str) -> None:
        with self._lock:
            self.counts[outcome] += 1


def _user_texts(messages: list[dict[str, Any]]) -> list[str]:
    """The text parts of the user messages, first to last."""
    return [
        str(part.get("text", ""))
        for message in messages
        if message.get("role") == "user"
        for part in _parts(message)
        if part.get("type", "text") == "text"
    ]


def _parts(message: dict[str, Any]) -> list[dict[str, Any]]:
    content = message.get("content")
    return content if isinstance(content, list) else [{"type": "text", "text": content or ""}]


def _completion(model: str, text: str, usage: dict[str, int]) -> dict[str, Any]:
    return {
        "id": "oracle-" + hashlib.sha256(text.encode()).hexdigest()[:12],
        "object": "chat.completion",
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": usage,
    }


def make_server(oracle: SceneOracle, port: int = 0, api_key: str | None = None):
    """A threading HTTP server for `oracle` on 127.0.0.1 (`port` 0: a free one); the caller runs and stops it.

    With `api_key` set, a request without `Authorization: Bearer <api_key>` gets 401, as a hosted API would.
    """
    import hmac
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # one line per request would drown the console
            pass

        def _send(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def _authorised(self) -> bool:
            if api_key is None:
                return True
            given = self.headers.get("Authorization", "")
            if hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return True
            oracle._count("refused")
            self._send(401, {"error": {"message": "invalid API key"}})
            return False

        def do_GET(self) -> None:
            if not self._authorised():
                return
            if self.path.rstrip("/") in ("/v1/models", "/models"):
                self._send(200, {"object": "list", "data": [{"id": "scene-oracle", "object": "model"}]})
            else:
                self._send(404, {"error": {"message": "not found"}})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            if self.path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
                self._send(404, {"error": {"message": "not found"}})
                return
            if not self._authorised():
                return
            try:
                request = json.loads(raw)
            except ValueError:
                self._send(400, {"error": {"message": "the body is not JSON"}})
                return
            self._send(*oracle.answer(request))

    return ThreadingHTTPServer(("127.0.0.1", port), Handler)
