"""The search page: one self-contained HTML document (inline CSS and script, no external resources)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cluster.serving.config import ServeConfig


PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; img-src 'self' blob:; style-src 'unsafe-inline'; "
    "script-src 'unsafe-inline'; connect-src 'self'; form-action 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def render_page(config: ServeConfig, examples: list[int], gallery: int) -> str:
    """The search page, with its settings inlined as JSON (numbers only, so nothing needs escaping)."""
    settings = {
        "examples": examples,
        "maxBytes": int(config.max_upload_mb * 2**20),
        "topK": config.top_k,
        "maxK": config.max_k,
        "maxText": config.max_text_chars,
    }
    return PAGE.replace("__SETTINGS__", json.dumps(settings)).replace("__GALLERY__", str(gallery))


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>ConText-CIR search</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:15px system-ui,sans-serif;margin:0;background:#f3f4f7;color:#1c2230}
header{background:#1c2230;color:#fff;padding:12px 24px;display:flex;gap:16px;align-items:baseline}
header h1{font-size:18px;margin:0}header span{color:#aab}
main{padding:16px 24px;max-width:1240px}
form{display:flex;flex-wrap:wrap;gap:14px;align-items:flex-end;background:#fff;padding:14px;border-radius:8px;
box-shadow:0 1px 3px #0002}
label{display:flex;flex-direction:column;gap:4px;font-size:13px;color:#556}
#text{width:380px;padding:7px;font-size:15px}#k{width:64px;padding:7px}
#reference{width:88px;height:88px;border:1px dashed #99a;border-radius:6px;display:grid;place-items:center;
color:#99a;font-size:12px;overflow:hidden}#reference img{width:100%;height:100%;object-fit:cover}
button{padding:9px 22px;background:#2f6fed;color:#fff;border:0;border-radius:6px;font-size:15px;cursor:pointer}
button:disabled{background:#9aa6c6;cursor:wait}
.examples{display:flex;gap:6px;align-items:center;margin:10px 0;font-size:13px;color:#556}
.examples img{width:52px;height:52px;object-fit:cover;border-radius:4px;cursor:pointer;border:3px solid transparent}
.examples img.chosen{border-color:#2f6fed}
#error{color:#a3001b;background:#fde8ec;padding:8px 12px;border-radius:6px}#status{color:#556;font-size:13px}
#results{display:grid;grid-template-columns:repeat(auto-fill,minmax(160px,1fr));gap:12px}
.tile{margin:0;background:#fff;border-radius:8px;padding:6px;box-shadow:0 1px 3px #0002}
.tile img{width:100%;aspect-ratio:1;object-fit:cover;border-radius:4px;background:#e6e8ee}
.tile figcaption{display:flex;justify-content:space-between;font-size:12px;padding-top:4px}
.tile .id{display:block;font-size:12px;color:#556;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
</style></head><body>
<header><h1>ConText-CIR composed image search</h1><span>gallery of __GALLERY__ images</span></header>
<main>
<form id="query">
<div id="reference">no image</div>
<label>Reference image<input type="file" id="image" accept="image/*"></label>
<label>Modification<input type="text" id="text" placeholder="e.g. make it red, with stripes"></label>
<label>Results<input type="number" id="k" min="1"></label>
<button id="search" type="submit">Search</button>
</form>
<div class="examples" id="examples">or start from a gallery image:</div>
<p id="error" role="alert" hidden></p><p id="status"></p>
<div id="results"></div>
</main>
<script>
const SETTINGS = __SETTINGS__;
const $ = (id) => document.getElementById(id);
const fileInput = $("image"), textInput = $("text"), kInput = $("k"), button = $("search");
let chosenRow = null;
kInput.value = SETTINGS.topK; kInput.max = SETTINGS.maxK; textInput.maxLength = SETTINGS.maxText;
function showError(message) { $("error").textContent = message; $("error").hidden = false; }
function showReference(src) {
  const img = document.createElement("img"); img.src = src; img.alt = "reference image";
  $("reference").replaceChildren(img);
}
for (const row of SETTINGS.examples) {
  const img = document.createElement("img");
  img.src = "/thumb/" + row; img.alt = "gallery image " + row; img.title = "use gallery image " + row;
  img.addEventListener("click", () => {
    chosenRow = row; fileInput.value = "";
    document.querySelectorAll(".examples img").forEach((other) => other.classList.toggle("chosen", other === img));
    showReference(img.src);
  });
  $("examples").append(img);
}
fileInput.addEventListener("change", () => {
  chosenRow = null; document.querySelectorAll(".examples img").forEach((img) => img.classList.remove("chosen"));
  if (fileInput.files[0]) showReference(URL.createObjectURL(fileInput.files[0]));
});
function tile(hit) {
  const figure = document.createElement("figure"); figure.className = "tile";
  const img = document.createElement("img"); img.src = hit.thumbnail; img.alt = hit.id; img.loading = "lazy";
  const caption = document.createElement("figcaption");
  const rank = document.createElement("b"); rank.textContent = "#" + hit.rank;
  const score = document.createElement("span"); score.textContent = hit.score.toFixed(3);
  const id = document.createElement("span"); id.className = "id"; id.textContent = hit.id; id.title = hit.id;
  caption.append(rank, score); figure.append(img, caption, id);
  return figure;
}
$("query").addEventListener("submit", async (event) => {
  event.preventDefault(); $("error").hidden = true;
  const body = new FormData(), file = fileInput.files[0];
  if (file && file.size > SETTINGS.maxBytes) return showError("the image is larger than the server accepts");
  if (file) body.append("image", file);
  else if (chosenRow !== null) body.append("gallery_row", chosenRow);
  else return showError("choose a reference image first");
  body.append("text", textInput.value); body.append("k", kInput.value);
  button.disabled = true; $("status").textContent = "searching\\u2026";
  try {
    const response = await fetch("/search", {method: "POST", body});
    const answer = await response.json().catch(() => ({error: "HTTP " + response.status}));
    if (!response.ok) {
      $("results").replaceChildren(); $("status").textContent = "";
      return showError(answer.error || "HTTP " + response.status);
    }
    $("results").replaceChildren(...answer.results.map(tile));
    $("status").textContent = answer.results.length + " results for \\u201c" + answer.query.text + "\\u201d in "
      + answer.took_ms + " ms";
  } catch (failure) {
    showError("the request failed: " + failure);
  } finally {
    button.disabled = false;
  }
});
</script></body></html>
"""
