"""The single HTML page served at ``/``: self-contained (inline CSS and JS, no network besides this server).

It reads the model, limits and default settings from ``GET /health``, previews the chosen images, and
sends them to ``POST /caption`` as multipart ``files`` with the settings as form fields (several requests
of at most ``max_images`` each, in parallel, so the server batches them). Captions and errors are set with
``textContent`` only: file names and captions are never parsed as HTML.

Hooks the end-to-end test relies on: ``#files`` (the file input), ``.card[data-state]`` with ``pending``,
``done`` or ``error``, ``.card .caption``, ``#status``, ``#model``.
"""

PAGE_HTML = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>beit3cap: image captioning</title>
<link rel="icon" href="data:,">
<style>
  :root { --fg:#1d2330; --muted:#5c6578; --line:#d6dae3; --accent:#2a5bd7; --bad:#b3261e; --bg:#f6f7fa; }
  * { box-sizing: border-box; }
  body { margin:0; font:15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color:var(--fg);
         background:var(--bg); }
  header { display:flex; align-items:baseline; gap:1rem; padding:.8rem 1.4rem; background:#fff;
           border-bottom:1px solid var(--line); }
  header h1 { font-size:1.15rem; margin:0; }
  #model { color:var(--muted); font-size:.9rem; }
  #model.ready::before { content:"\25CF  "; color:#1e8e3e; }
  main { display:grid; grid-template-columns: 17rem 1fr; gap:1.2rem; padding:1.2rem 1.4rem; }
  @media (max-width: 760px) { main { grid-template-columns: 1fr; } }
  fieldset { border:1px solid var(--line); border-radius:8px; background:#fff; padding:.8rem 1rem; margin:0; }
  legend { font-weight:600; padding:0 .3rem; }
  .row { display:flex; justify-content:space-between; align-items:center; gap:.6rem; margin:.45rem 0; }
  .row input[type=number] { width:5.5rem; padding:.25rem .35rem; border:1px solid var(--line); border-radius:5px; }
  .row input:disabled { opacity:.45; }
  .hint { color:var(--muted); font-size:.8rem; margin:.2rem 0 .6rem; }
  button { font:inherit; padding:.45rem .9rem; border-radius:6px; border:1px solid var(--accent);
           background:var(--accent); color:#fff; cursor:pointer; }
  button.plain { background:#fff; color:var(--accent); }
  button:disabled { opacity:.5; cursor:default; }
  .actions { display:flex; gap:.5rem; margin-top:.8rem; }
  #drop { display:block; border:2px dashed var(--line); border-radius:10px; background:#fff; padding:1.6rem;
          text-align:center; color:var(--muted); cursor:pointer; }
  #drop.over { border-color:var(--accent); background:#eef3ff; }
  #drop strong { color:var(--accent); }
  #files { position:absolute; width:1px; height:1px; opacity:0; }
  #status { min-height:1.4em; margin:.7rem 0; color:var(--muted); }
  #status.bad { color:var(--bad); font-weight:600; }
  #cards { display:grid; grid-template-columns:repeat(auto-fill, minmax(13rem, 1fr)); gap:1rem; }
  .card { background:#fff; border:1px solid var(--line); border-radius:8px; overflow:hidden; }
  .card img { display:block; width:100%; height:11rem; object-fit:contain; background:#eceef3; }
  .card .nopreview { height:11rem; display:flex; align-items:center; justify-content:center; background:#eceef3;
                     color:var(--muted); font-size:.85rem; }
  .card .name { font-size:.78rem; color:var(--muted); padding:.45rem .7rem 0; overflow-wrap:anywhere; }
  .card .caption { padding:.2rem .7rem .7rem; min-height:2.2em; }
  .card[data-state=pending] .caption { color:var(--muted); font-style:italic; }
  .card[data-state=error] .caption { color:var(--bad); }
</style>
</head>
<body>
<header><h1>beit3cap</h1><span id="model">connecting&hellip;</span></header>
<main>
  <form id="settings" autocomplete="off">
    <fieldset>
      <legend>Decoding</legend>
      <div class="row"><label for="num_beams">Beams</label>
        <input id="num_beams" name="num_beams" type="number" min="1" max="16" step="1" value="3"></div>
      <div class="row"><label for="max_len">Max length</label>
        <input id="max_len" name="max_len" type="number" min="3" step="1" value="32"></div>
      <div class="row"><label for="length_penalty">Length penalty</label>
        <input id="length_penalty" name="length_penalty" type="number" min="0" max="5" step="0.1" value="0.6"></div>
      <p class="hint">Beam search, as in the official evaluation. A caption has at most max length &minus; 3 words.</p>
      <div class="row"><label for="sample">Sampling</label>
        <input id="sample" name="sample" type="checkbox"></div>
      <div class="row"><label for="top_p">Top-p</label>
        <input id="top_p" name="top_p" type="number" min="0.01" max="1" step="0.05" value="0.9" disabled></div>
      <div class="row"><label for="temperature">Temperature</label>
        <input id="temperature" name="temperature" type="number" min="0.05" max="10" step="0.1" value="1" disabled></div>
      <p class="hint">Sampling draws words at random from the top-p nucleus; each run differs.</p>
      <div class="actions">
        <button id="run" type="submit" disabled>Caption</button>
        <button id="clear" type="button" class="plain" disabled>Clear</button>
      </div>
    </fieldset>
  </form>
  <section>
    <label id="drop" for="files">
      <strong>Choose images</strong> or drop them here (you can also paste one)
      <input id="files" type="file" accept="image/*" multiple>
    </label>
    <div id="status" role="status" aria-live="polite"></div>
    <div id="cards"></div>
  </section>
</main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const form = $("settings"), cardsBox = $("cards"), statusLine = $("status");
const limits = { max_images: 16, max_upload_mb: 10 };
let items = [];  // {file, card}

function setStatus(text, bad) {
  statusLine.textContent = text;
  statusLine.classList.toggle("bad", !!bad);
}

function syncSampling() {
  const on = $("sample").checked;
  $("top_p").disabled = $("temperature").disabled = !on;
  $("num_beams").disabled = $("length_penalty").disabled = on;
}

async function loadHealth() {
  try {
    const r = await fetch("/health");
    const h = await r.json();
    limits.max_images = h.max_images; limits.max_upload_mb = h.max_upload_mb;
    for (const [k, v] of Object.entries(h.defaults)) {
      const el = form.elements[k];
      if (!el) continue;
      if (el.type === "checkbox") el.checked = !!v; else el.value = v;
    }
    $("max_len").max = h.max_len_limit;
    $("model").textContent = `${h.model} on ${h.device}, ${h.image_size} px` + (h.ready ? "" : " (starting)");
    $("model").classList.toggle("ready", h.ready);
    syncSampling();
  } catch (e) {
    $("model").textContent = "server not reachable";
  }
}

function settingsFields() {
  const out = {};
  for (const el of form.elements) {
    if (!el.name || el.disabled) continue;
    out[el.name] = el.type === "checkbox" ? String(el.checked) : el.value;
  }
  return out;
}

function setCard(card, state, text) {
  card.dataset.state = state;
  card.querySelector(".caption").textContent = text;
}

function addFiles(files) {
  const fresh = [];
  for (const file of files) {
    const card = document.createElement("figure");
    card.className = "card";
    card.style.margin = "0";
    let img;
    if (file.type.startsWith("image/")) {
      img = document.createElement("img");
      img.alt = file.name;
      img.src = URL.createObjectURL(file);
    } else {
      img = document.createElement("div");
      img.className = "nopreview";
      img.textContent = "no preview";
    }
    const name = document.createElement("div");
    name.className = "name"; name.textContent = file.name;
    const cap = document.createElement("figcaption");
    cap.className = "caption";
    card.append(img, name, cap);
    cardsBox.append(card);
    const item = { file, card };
    items.push(item); fresh.push(item);
  }
  $("run").disabled = $("clear").disabled = items.length === 0;
  if (fresh.length) caption(fresh);
}

async function sendChunk(chunk, fields) {
  const body = new FormData();
  for (const it of chunk) body.append("files", it.file, it.file.name);
  for (const [k, v] of Object.entries(fields)) body.append(k, v);
  let reply, data;
  try {
    reply = await fetch("/caption", { method: "POST", body });
    data = await reply.json();
  } catch (e) {
    for (const it of chunk) setCard(it.card, "error", "no answer from the server");
    return { captioned: 0, problem: "no answer from the server" };
  }
  if (!reply.ok) {
    const why = data.error || `HTTP ${reply.status}`;
    for (const it of chunk) setCard(it.card, "error", why);
    return { captioned: 0, problem: why };
  }
  let captioned = 0;
  data.results.forEach((res, i) => {
    if (res.error) setCard(chunk[i].card, "error", res.error);
    else { setCard(chunk[i].card, "done", res.caption === "" ? "(empty caption)" : res.caption); captioned++; }
  });
  return { captioned, problem: null };
}

async function caption(batch) {
  const fields = settingsFields();
  const tooBig = limits.max_upload_mb * 1048576;
  const send = [];
  for (const it of batch) {
    if (it.file.size > tooBig) setCard(it.card, "error", `larger than ${limits.max_upload_mb} MB`);
    else { setCard(it.card, "pending", "captioning\u2026"); send.push(it); }
  }
  if (!send.length) return;
  setStatus(`Captioning ${plural(send.length, "image")}\u2026`);
  $("run").disabled = true;
  const t0 = performance.now();
  const chunks = [];
  for (let i = 0; i < send.length; i += limits.max_images) chunks.push(send.slice(i, i + limits.max_images));
  const replies = await Promise.all(chunks.map((c) => sendChunk(c, fields)));
  const secs = ((performance.now() - t0) / 1000).toFixed(2);
  const captioned = replies.reduce((n, r) => n + r.captioned, 0);
  const problem = replies.map((r) => r.problem).find(Boolean);
  $("run").disabled = items.length === 0;
  const done = captioned === send.length ? `Captioned ${plural(captioned, "image")}`
                                         : `Captioned ${captioned} of ${plural(send.length, "image")}`;
  setStatus(problem && !captioned ? problem : `${done} in ${secs} s.`, !!problem && !captioned);
}

function plural(n, word) {
  return `${n} ${word}${n === 1 ? "" : "s"}`;
}

form.addEventListener("submit", (e) => { e.preventDefault(); if (items.length) caption(items); });
form.addEventListener("change", (e) => { if (e.target.id === "sample") syncSampling(); });
$("clear").addEventListener("click", () => {
  for (const it of items) { const img = it.card.querySelector("img"); if (img) URL.revokeObjectURL(img.src); }
  items = []; cardsBox.replaceChildren(); setStatus("");
  $("run").disabled = $("clear").disabled = true;
});
$("files").addEventListener("change", (e) => { addFiles([...e.target.files]); e.target.value = ""; });
const drop = $("drop");
for (const ev of ["dragenter", "dragover"])
  drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("over"); });
for (const ev of ["dragleave", "drop"])
  drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.remove("over"); });
drop.addEventListener("drop", (e) => addFiles([...e.dataTransfer.files]));
document.addEventListener("paste", (e) => {
  const files = [...e.clipboardData.files].filter((f) => f.type.startsWith("image/"));
  if (files.length) addFiles(files);
});
loadHealth();
</script>
</body>
</html>
"""
