// The lesion page: pick or drop an image, POST it to v1/explain, show the decision, bars and the Grad-CAM overlay.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { file: null, info: null, url: null };
let started = 0; // when the user chose the file or a setting (for the status line)
const ACCEPTED = ["image/jpeg", "image/png", "image/bmp", "image/tiff", "image/webp"];

function headers() {
  const key = $("apikey").value.trim();
  return key ? { "X-API-Key": key } : {};
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function setStatus(message) {
  $("status").textContent = message;
}

async function readError(response) {
  try {
    const body = await response.json();
    return body.detail || body.error || response.statusText;
  } catch (e) {
    return response.statusText;
  }
}

async function loadInfo() {
  const response = await fetch("v1/models", { headers: headers() });
  if (!response.ok) {
    showError(`Cannot list the models (${response.status}): ${await readError(response)}`);
    return;
  }
  state.info = await response.json();
  const models = $("model");
  models.innerHTML = "";
  for (const name of state.info.explain_targets) {
    models.add(new Option(name === "ensemble" ? "ensemble (all models)" : name, name));
  }
  const methods = $("method");
  methods.innerHTML = "";
  for (const name of state.info.methods) methods.add(new Option(name, name));
  showError("");
  setStatus(`Serving ${state.info.models.map((m) => m.name).join(", ")}.`);
}

function checkFile(file) {
  if (!file) return "No file was chosen.";
  if (file.size === 0) return `${file.name} is empty (0 bytes).`;
  if (file.type && !ACCEPTED.includes(file.type)) return `${file.name} is ${file.type}, not a JPEG, PNG, BMP, TIFF or WebP image.`;
  const limit = state.info && state.info.max_body_bytes;
  if (limit && file.size > limit) return `${file.name} is ${(file.size / 1e6).toFixed(1)} MB; the limit is ${(limit / 1e6).toFixed(1)} MB.`;
  return "";
}

function chooseFile(file) {
  const problem = checkFile(file);
  if (problem) {
    showError(problem);
    return;
  }
  state.file = file;
  if (state.url) URL.revokeObjectURL(state.url);
  state.url = URL.createObjectURL(file);
  analyse();
}

async function analyse() {
  if (!state.file) return;
  showError("");
  setStatus(`Analysing ${state.file.name} ...`);
  const form = new FormData();
  form.append("file", state.file);
  form.append("model", $("model").value || "ensemble");
  form.append("method", $("method").value || "gradcam");
  let response;
  try {
    response = await fetch("v1/explain", { method: "POST", body: form, headers: headers() });
  } catch (e) {
    setStatus("");
    showError(`The server could not be reached: ${e.message}`);
    return;
  }
  if (!response.ok) {
    setStatus("");
    showError(`${state.file.name}: ${await readError(response)} (HTTP ${response.status})`);
    return;
  }
  render(await response.json());
  setStatus(`${state.file.name}: done in ${Math.round(performance.now() - started)} ms.`);
}

function percent(p) {
  return `${(100 * p).toFixed(1)}%`;
}

function label(cls) {
  const names = (state.info && state.info.class_names) || {};
  return names[cls] ? `${cls} (${names[cls]})` : cls;
}

function render(result) {
  const decision = $("decision");
  decision.className = result.decision;
  const title = {
    malignant: "Suspicious for malignancy: refer",
    benign: "Likely benign",
    uncertain: "Uncertain: the models abstain",
  }[result.decision];
  decision.innerHTML = "";
  decision.append(`${title}. Malignant probability ${percent(result.malignant_probability)} ` +
    `(threshold ${percent(result.malignant_threshold)}); most likely ${label(result.predicted_class)}.`);
  const reason = document.createElement("span");
  reason.className = "reason";
  reason.textContent = result.decision_reason;
  decision.append(reason);

  $("original").src = state.url;
  $("overlay").src = `data:image/png;base64,${result.overlay_png}`;
  $("overlay-caption").textContent = `Grad-CAM: ${result.explained_model} explaining ${result.explained_class}, ${result.method} ` +
    `(on the preprocessed ${result.overlay_size[0]}x${result.overlay_size[1]} image the models see)`;

  const bars = $("bars");
  bars.innerHTML = "";
  const entries = Object.entries(result.probabilities).sort((a, b) => b[1] - a[1]);
  entries.forEach(([cls, p], i) => {
    const row = document.createElement("div");
    row.className = i === 0 ? "bar top" : "bar";
    row.innerHTML = '<span class="name"></span><span class="track"><span class="fill"></span></span><span class="value"></span>';
    row.querySelector(".name").textContent = label(cls);
    row.querySelector(".fill").style.display = "block";
    row.querySelector(".fill").style.width = percent(p);
    row.querySelector(".value").textContent = percent(p);
    bars.append(row);
  });

  const table = $("per-model");
  table.innerHTML = "";
  const classes = entries.map(([cls]) => cls);
  const head = table.insertRow();
  for (const text of ["model", ...classes]) {
    const th = document.createElement("th");
    th.textContent = text;
    head.append(th);
  }
  for (const [name, probs] of Object.entries(result.models)) {
    const row = table.insertRow();
    row.insertCell().textContent = name;
    for (const cls of classes) {
      const cell = row.insertCell();
      cell.className = "num";
      cell.textContent = percent(probs[cls]);
    }
  }
  $("versions").textContent = "Model versions: " + Object.entries(result.model_versions)
    .map(([name, v]) => `${name} sha256 ${v.checkpoint_sha256.slice(0, 12)}, run ${v.run_id}`).join("; ") +
    `. Server latency ${result.latency_ms.toFixed(0)} ms.`;
  $("result").hidden = false;
}

$("file").addEventListener("change", (e) => {
  started = performance.now();
  chooseFile(e.target.files[0]);
});
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  started = performance.now();
  chooseFile(e.dataTransfer.files[0]);
});
for (const id of ["model", "method"]) {
  $(id).addEventListener("change", () => { started = performance.now(); analyse(); });
}
$("apikey").addEventListener("change", loadInfo);
loadInfo();
