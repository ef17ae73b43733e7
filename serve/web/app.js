// Kestrel's upload page: GET /v1/models fills the choices, POST /v1/classify (multipart) classifies.
// No framework, no CDN: plain DOM. Server text is only ever set with textContent.
// How many predictions per model is the server's default (no top_k is sent); the page shows all it returns.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { file: null, previewUrl: null, catalog: null, busy: false };

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) if (child) node.append(child);
  return node;
}

// A server started with --auth-tokens answers 401/403 until the page sends a token with the infer role; the
// page asks for it once, keeps it for this tab only (sessionStorage) and sends it as a bearer token.
const TOKEN_KEY = "kestrel-token";
const authHeaders = () => {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return token ? { Authorization: "Bearer " + token } : {};
};

function askForToken(status, message) {
  $("token-box").hidden = false;
  $("token-reason").textContent = (status === 401 ? "This server needs a token with the infer role. "
    : "This token lacks the infer role. ") + (message || "");
  $("token-input").focus();
}

const ms = (value) => (value < 10 ? value.toFixed(2) : value < 100 ? value.toFixed(1) : value.toFixed(0)) + " ms";
const pct = (p) => (p * 100).toFixed(1) + "%";

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = false;
}

function clearOutput() {
  $("error").hidden = true;
  $("error").textContent = "";
  $("ensemble-results").replaceChildren();
  $("model-results").replaceChildren();
  $("timings").textContent = "";
}

// ---- choices ---------------------------------------------------------------------------------
async function loadCatalog() {
  let catalog;
  try {
    const response = await fetch("/v1/models", { headers: authHeaders() });
    catalog = await response.json();
    if (response.status === 401 || response.status === 403) {
      askForToken(response.status, catalog.error);
      return;
    }
    if (!response.ok) throw new Error(catalog.error || response.statusText);
    $("token-box").hidden = true;
  } catch (err) {
    showError("Could not list the server's models: " + err.message);
    return;
  }
  state.catalog = catalog;

  const select = $("ensemble-select");
  select.replaceChildren();
  for (const ens of catalog.ensembles) {
    const ready = ens.state === "READY";
    const option = el("option", { value: ens.name, disabled: !ready,
      text: `${ens.name} (${ens.members.join(", ")})` + (ready ? "" : " — unavailable") });
    if (!ready) option.title = ens.reason;
    select.append(option);
  }
  const firstReady = catalog.ensembles.find((e) => e.state === "READY");
  if (firstReady) select.value = firstReady.name;

  const list = $("model-list");
  list.replaceChildren();
  for (const model of catalog.models) {
    const ready = model.state === "READY";
    const box = el("input", { type: "checkbox", value: model.name, checked: ready, disabled: !ready,
      name: "model" });
    const label = el("label", { class: ready ? "" : "unavailable", title: ready
      ? `${model.platform}, ${model.num_classes} classes, input ${model.input_size.join("×")}`
      : model.reason }, box, " " + model.name);
    list.append(label);
  }

  const fusion = $("fusion-select");
  for (const name of catalog.fusions) fusion.append(el("option", { value: name, text: name }));
  list.addEventListener("change", updateFusion);

  if (!firstReady) {
    $("mode-ensemble").disabled = true;
    $("mode-ensemble").parentElement.title = catalog.ensembles.length
      ? "no ensemble is ready" : "no ensemble is configured (python -m serve --ensemble NAME=a,b,c)";
    $("mode-models").checked = true;
  }
  updateMode();
}

function updateMode() {
  const ensembleMode = $("mode-ensemble").checked;
  $("ensemble-choice").hidden = !ensembleMode;
  $("model-choice").hidden = ensembleMode;
  const name = $("ensemble-select").value;
  const ens = state.catalog && state.catalog.ensembles.find((e) => e.name === name);
  $("ensemble-members").textContent = ens ? `members: ${ens.members.join(", ")} · fusion: ${ens.fusion}` : "";
  updateFusion();
}

// A fusion combines several answers: with one chosen model there is nothing to fuse, so the control is off
// (the server would refuse it: "a fusion applies to an ensemble or to several models").
function updateFusion() {
  const fusion = $("fusion-select");
  const single = $("mode-models").checked &&
    document.querySelectorAll("#model-list input:checked").length < 2;
  fusion.disabled = single;
  fusion.title = single ? "a fusion combines several models: choose two or more, or an ensemble" : "";
}

function selectedTargets() {
  if ($("mode-ensemble").checked) return { ensemble: $("ensemble-select").value };
  const models = [...document.querySelectorAll("#model-list input:checked")].map((box) => box.value);
  return { models: models.join(",") };
}

// ---- the image -------------------------------------------------------------------------------
function setFile(file) {
  if (!file) return;
  state.file = file;
  if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
  state.previewUrl = URL.createObjectURL(file);
  const preview = $("preview");
  preview.hidden = false;
  preview.onerror = () => { preview.hidden = true; $("drop-text").hidden = false; };
  preview.onload = () => { $("drop-text").hidden = true; };
  preview.src = state.previewUrl;
  $("file-name").textContent = `${file.name} · ${(file.size / 1024).toFixed(1)} KiB`;
  $("classify-button").disabled = false;
  classify();
}

function wireDropzone() {
  const zone = $("dropzone");
  const input = $("file-input");
  zone.addEventListener("click", () => input.click());
  zone.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") { event.preventDefault(); input.click(); }
  });
  input.addEventListener("change", () => setFile(input.files[0]));
  for (const kind of ["dragenter", "dragover"]) {
    zone.addEventListener(kind, (event) => { event.preventDefault(); zone.classList.add("dragover"); });
  }
  for (const kind of ["dragleave", "drop"]) {
    zone.addEventListener(kind, (event) => { event.preventDefault(); zone.classList.remove("dragover"); });
  }
  zone.addEventListener("drop", (event) => {
    const file = event.dataTransfer && event.dataTransfer.files[0];
    if (file) setFile(file);
  });
}

// ---- classify --------------------------------------------------------------------------------
async function classify() {
  if (!state.file || state.busy) return;
  const targets = selectedTargets();
  if (targets.models === "") {
    clearOutput();
    showError("Choose at least one model (or an ensemble).");
    return;
  }
  state.busy = true;
  $("classify-button").disabled = true;
  $("status").textContent = "classifying…";
  const form = new FormData();
  form.append("image", state.file, state.file.name);
  for (const [key, value] of Object.entries(targets)) form.append(key, value);
  if ($("fusion-select").value && !$("fusion-select").disabled) form.append("fusion", $("fusion-select").value);
  const started = performance.now();
  try {
    const response = await fetch("/v1/classify", { method: "POST", body: form, headers: authHeaders() });
    const text = await response.text();
    let body;
    try { body = JSON.parse(text); } catch (_) { body = { error: text || response.statusText }; }
    clearOutput();
    if (response.status === 401 || response.status === 403) askForToken(response.status, body.error);
    if (!response.ok) {
      showError(`Could not classify ${state.file.name}: the server answered HTTP ${response.status}.\n${body.error}`);
      $("placeholder").hidden = true;
      return;
    }
    render(body, performance.now() - started);
  } catch (err) {
    clearOutput();
    showError("The request failed: " + err.message);
  } finally {
    state.busy = false;
    $("classify-button").disabled = !state.file;
    $("status").textContent = "";
  }
}

function predictionRows(predictions) {
  return predictions.map((p, i) => el("div", { class: "prediction" + (i === 0 ? " top" : ""),
    "data-index": String(p.index) },
  el("span", { class: "label", text: p.label, title: `${p.label} (class ${p.index})` }),
  el("div", { class: "bar" }, el("div", { class: "bar-fill", style: `width: ${(p.probability * 100).toFixed(2)}%` })),
  el("span", { class: "prob", text: pct(p.probability) })));
}

function render(result, roundTripMs) {
  $("placeholder").hidden = true;
  for (const ens of result.ensembles) {
    const best = ens.predictions[0];
    const card = el("div", { class: "card ensemble", "data-ensemble": ens.name },
      el("h3", {}, el("span", { text: `Ensemble · ${ens.name}` }),
        el("span", { class: "latency", text: ens.fusion })),
      el("p", { class: "meta", text: `members: ${ens.members.join(", ")}` }),
      best ? el("p", { class: "answer" }, el("span", { class: "answer-label", text: best.label }), " ",
        el("span", { class: "prob", text: pct(best.probability) })) : null,
      ...predictionRows(ens.predictions));
    $("ensemble-results").append(card);
  }
  for (const model of result.models) {
    const card = el("div", { class: "card model", "data-model": model.model },
      el("h3", {}, el("span", { class: "model-name", text: model.model }),
        el("span", { class: "latency", text: ms(model.latency_ms),
          title: "time in the server's batcher: queue + compute" })),
      el("p", { class: "meta", text: `v${model.version} · queue ${ms(model.queue_ms)} · compute ` +
        `${ms(model.compute_ms)} · batch ${model.batch_size} · input ${model.input_size.join("×")}` }),
      ...predictionRows(model.predictions));
    $("model-results").append(card);
  }
  $("timings").textContent = `decoded at ${result.image.width}×${result.image.height} · decode ${ms(result.decode_ms)}` +
    ` · server ${ms(result.total_ms)} · round trip ${ms(roundTripMs)}`;
}

document.addEventListener("DOMContentLoaded", () => {
  wireDropzone();
  $("mode-ensemble").addEventListener("change", updateMode);
  $("mode-models").addEventListener("change", updateMode);
  $("ensemble-select").addEventListener("change", () => { updateMode(); classify(); });
  $("classify-form").addEventListener("submit", (event) => { event.preventDefault(); classify(); });
  $("token-save").addEventListener("click", () => {
    sessionStorage.setItem(TOKEN_KEY, $("token-input").value.trim());
    $("token-input").value = "";
    clearOutput();
    loadCatalog();
  });
  loadCatalog();
});
