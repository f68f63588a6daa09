// The page: forms, the loss curve, and a test mode (?test=...) that reports to the server that
// served it. All the work is in the wasm module; this file only drives and draws.
import init, * as sf from "./pkg/shaderformer_web.js";

const $ = (id) => document.getElementById(id);
const num = (id) => Number($(id).value);

function showError(message) {
  $("error").textContent = String(message && message.message ? message.message : message);
}

// The errors a visitor can meet, in words.
function explain(e) {
  const s = String(e && e.message ? e.message : e);
  if (/device was lost/i.test(s)) return "The GPU device was lost (" + s + "). Reload the page to start again.";
  if (/max_storage_buffer_binding_size|max_buffer_size/.test(s)) return "The model is too large for this adapter's limits: " + s;
  return s;
}

let trainer = null;
// Whether the trainer fine-tunes the opened checkpoint with LoRA.
let fineTuning = false;
// The text the trainer trains on (null: the addition problems).
let trainerText = null;
let running = false;
let curve = { train: [], val: [] };
// The run's results as they arrive ({step, loss, grad_norm}), the wall time of each step, and
// the steps between evaluations (null: a tenth of the run).
let losses = [], stepMs = [], evalEvery = null;

function drawCurve() {
  const c = $("curve"), g = c.getContext("2d");
  g.clearRect(0, 0, c.width, c.height);
  const pts = curve.train.concat(curve.val);
  if (pts.length === 0) return;
  const maxStep = Math.max(...pts.map((p) => p[0]), 1);
  const ys = pts.map((p) => p[1]).filter(Number.isFinite);
  const lo = Math.min(...ys), hi = Math.max(...ys);
  const pad = 30, w = c.width - 2 * pad, h = c.height - 2 * pad;
  const X = (s) => pad + (w * s) / maxStep;
  const Y = (l) => pad + h - (h * (l - lo)) / Math.max(hi - lo, 1e-6);
  g.strokeStyle = "#999"; g.strokeRect(pad, pad, w, h);
  g.fillStyle = "#444"; g.font = "11px sans-serif";
  g.fillText(hi.toFixed(3), 2, pad + 4); g.fillText(lo.toFixed(3), 2, pad + h);
  g.fillText("step " + maxStep, c.width - pad - 50, c.height - 8);
  g.strokeStyle = "#1f77b4"; g.beginPath();
  curve.train.forEach(([s, l], i) => (i ? g.lineTo(X(s), Y(l)) : g.moveTo(X(s), Y(l))));
  g.stroke();
  g.fillStyle = "#d62728";
  for (const [s, l] of curve.val) { g.beginPath(); g.arc(X(s), Y(l), 3, 0, 7); g.fill(); }
  g.fillText("train", pad + 6, pad + 12);
  g.fillStyle = "#1f77b4"; g.fillText("train", pad + 6, pad + 12);
  g.fillStyle = "#d62728"; g.fillText("val", pad + 40, pad + 12);
}

function settings() {
  const s = {
    seed: num("seed"), steps: num("steps"), lr: num("lr"),
    n_layer: num("n_layer"), n_head: num("n_head"), n_embd: num("n_embd"),
    batch_size: num("batch_size"), block_size: num("block_size"),
    activation_dtype: $("activation_dtype").value, recompute: $("recompute").value,
  };
  if ($("arch").value === "llama") {
    s.arch = "llama";
    if ($("n_kv_head").value.trim() !== "") s.n_kv_head = num("n_kv_head");
  }
  return s;
}

// The data: the addition problems, or the text pasted or opened (its name for messages).
let textName = "pasted text";
const onText = () => $("data-text").checked;

// Fills the form with the chosen data's starting settings (those of `shaderformer train`).
function fillDefaults() {
  const d = JSON.parse(sf.defaults(onText()));
  for (const [k, v] of Object.entries(d)) $(k).value = v;
}

async function openText(files) {
  if (!files.length) return;
  textName = files[0].name;
  $("text").value = await files[0].text();
  $("data-text").checked = true;
  fillDefaults();
  $("data-info").textContent = `${textName}: ${$("text").value.length} characters`;
}

// Kernel problems measured on this adapter since the page opened. A graph is built with the
// fixed rules, its new problems measured (tuning), then built again with the winners.
let tuned = 0;
function showTuned(n) {
  tuned += n;
  $("tuned").textContent = tuned + " tuned";
}

// Tunes the new trainer's kernels (before its first step); returns how many were measured.
async function tuneTrainer() {
  $("tuned").textContent = "tuning kernels…";
  const n = await trainer.tune();
  showTuned(n);
  return n;
}

// Measures the problems sampling met (the next sample uses the winners).
async function tuneSampler() {
  const n = await sf.tune_kernels();
  if (n) showTuned(n);
}

function record(results) {
  for (const r of JSON.parse(results)) {
    losses.push(r);
    curve.train.push([r.step, r.loss]);
    $("step").textContent = r.step;
    $("loss").textContent = r.loss.toFixed(4);
  }
}

async function evaluate() {
  const e = JSON.parse(await trainer.evaluate());
  curve.val.push([trainer.steps(), e.val]);
  $("val").textContent = e.val.toFixed(4);
  if (trainerText !== null) {
    // A text: up to 200 characters (the context allowing) sampled at temperature 1, from the
    // text's first character.
    const g = JSON.parse(await trainer.sample(Array.from(trainerText)[0],
      JSON.stringify({ max_new_tokens: 200, seed: trainer.steps() })));
    $("samples-title").textContent = "Sample (temperature 1, up to 200 characters):";
    $("samples").textContent = "step " + trainer.steps() + ":\n" + g.prompt + g.text;
  } else {
    // Three held-out problems, completed greedily by the model as it is now.
    const lines = [];
    for (const p of ["74+58=", "21+43=", "99+11="]) {
      const g = JSON.parse(await trainer.sample(p, JSON.stringify({ greedy: true, max_new_tokens: 4 })));
      lines.push(p + g.text.split("\n")[0]);
    }
    $("samples-title").textContent = "Samples (greedy, held-out problems; digits least significant first):";
    $("samples").textContent = "step " + trainer.steps() + ": " + lines.join("   ");
  }
  await tuneSampler();
  drawCurve();
}

// Runs steps until the run ends or Stop is pressed; step time is the wall time between steps.
async function run() {
  running = true;
  $("stop").disabled = false; $("continue").disabled = true; $("save").disabled = true; $("train").disabled = true;
  const total = JSON.parse(trainer.describe()).max_iters;
  const every = evalEvery ?? Math.max(1, Math.round(total / 10));
  let last = performance.now();
  try {
    while (running && trainer.steps() < total) {
      record(await trainer.step());
      const now = performance.now(), ms = now - last;
      last = now;
      stepMs.push(ms);
      $("ms").textContent = ms.toFixed(1) + " ms";
      $("tps").textContent = Math.round(trainer.tokens_per_step() / (ms / 1000));
      if (trainer.steps() % every === 0 || trainer.steps() === total) {
        record(await trainer.flush());
        await evaluate();
        last = performance.now();
      }
      if (trainer.steps() % 5 === 0) drawCurve();
    }
    record(await trainer.flush());
    drawCurve();
  } catch (e) {
    showError(explain(e));
  }
  running = false;
  $("stop").disabled = true; $("train").disabled = false; $("save").disabled = false;
  $("save-adapter").disabled = !fineTuning; $("finetune").disabled = !model;
  $("continue").disabled = trainer.steps() >= total;
}

// Starts a run: the trainer `make` returns (after freeing the last), tuned, then trained.
async function startRun(make) {
  showError("");
  curve = { train: [], val: [] };
  losses = []; stepMs = [];
  fineTuning = false;
  try {
    if (trainer) trainer.free();
    trainer = null;
    trainer = await make();
    await tuneTrainer();
  } catch (e) {
    trainer = null;
    showError(explain(e));
    return;
  }
  await run();
}

function startTraining() {
  return startRun(async () => {
    trainerText = onText() ? $("text").value : null;
    if (trainerText === "") throw new Error("There is no text to train on: paste one or open a file.");
    const t = await sf.trainer(JSON.stringify(settings()), trainerText ?? undefined, textName);
    $("data-info").textContent = JSON.parse(t.describe()).data;
    return t;
  });
}

function download(name, bytes) {
  const a = document.createElement("a");
  a.href = URL.createObjectURL(new Blob([bytes]));
  a.download = name;
  a.click();
  setTimeout(() => URL.revokeObjectURL(a.href), 1000);
}

async function save() {
  try {
    for (const [name, bytes] of await trainer.save()) download(name, bytes);
  } catch (e) { showError(explain(e)); }
}

// The settings of a LoRA run: the Train form's, and the adapter's.
function loraSettings() {
  const s = settings();
  delete s.n_layer; delete s.n_head; delete s.n_embd; delete s.arch; delete s.n_kv_head;
  s.lora_r = num("lora_r"); s.lora_alpha = num("lora_alpha");
  if ($("lora_targets").value.trim() !== "") s.lora_targets = $("lora_targets").value;
  return s;
}

// Fine-tunes the opened checkpoint with LoRA on the Train section's text.
function startFineTuning(settingsJson = JSON.stringify(loraSettings())) {
  return startRun(async () => {
    trainerText = $("text").value;
    if (trainerText === "") throw new Error("There is no text to fine-tune on: paste one or open a file in the Train section.");
    const t = await sf.lora_trainer(modelFiles.names, modelFiles.contents, settingsJson, trainerText,
      textName, modelFiles.base);
    fineTuning = true;
    const d = JSON.parse(t.describe());
    $("data-info").textContent = d.data;
    $("lora-info").textContent = `${d.lora.layers} layers adapted (r ${d.lora.r}, alpha ${d.lora.alpha}): ` +
      `${d.lora.trainable} trainable parameters, ${(d.params / 1e6).toFixed(2)}M frozen`;
    return t;
  });
}

let model = null;
// The files of the opened checkpoint ({names, contents, base}), for fine-tuning it.
let modelFiles = null;

async function openModel(files) {
  showError("");
  const names = [], contents = [];
  for (const f of files) {
    names.push(f.name);
    contents.push(new Uint8Array(await f.arrayBuffer()));
  }
  // The base's name in an adapter's config: the folder the files came from, where known.
  const path = files.length ? (files[0].webkitRelativePath || "") : "";
  modelFiles = { names, contents, base: path.includes("/") ? path.split("/")[0] : "base" };
  try {
    if (model) model.free();
    model = null;
    model = await sf.open_model(names, contents);
    const d = JSON.parse(model.describe());
    const heads = d.n_kv_head === d.n_head ? `${d.n_head} heads` : `${d.n_head} heads (${d.n_kv_head} key/value)`;
    $("model-info").textContent = `${d.model_type}: ${d.n_layer} layers, ${d.n_embd} wide, ${heads}, ` +
      `context ${d.block_size}, vocabulary ${d.vocab_size} (${d.vocab}), ` +
      `${(d.params / 1e6).toFixed(2)}M parameters` + (d.chat ? ", chat template" : "");
    $("chat").disabled = !d.chat;
    $("chat").checked = d.chat;
    $("system").disabled = !d.chat;
    $("generate").disabled = false;
    $("finetune").disabled = false;
  } catch (e) {
    $("generate").disabled = true;
    $("finetune").disabled = true;
    showError("Not a checkpoint this page can open: " + explain(e));
  }
}

function sampleOptions() {
  const o = {
    max_new_tokens: num("max_new"), temperature: num("temperature"),
    top_p: num("top_p"), greedy: $("greedy").checked,
  };
  if ($("chat").checked) {
    o.chat = true;
    if ($("system").value !== "") o.system = $("system").value;
  }
  if ($("top_k").value !== "") o.top_k = num("top_k");
  return o;
}

async function generate() {
  showError("");
  $("output").textContent = $("prompt").value;
  $("generate").disabled = true;
  try {
    await model.generate($("prompt").value, JSON.stringify(sampleOptions()),
      (piece) => { $("output").textContent += piece; });
  } catch (e) { showError(explain(e)); }
  $("generate").disabled = false;
}

// The browser hides the adapter's name from wgpu; its info names vendor and architecture.
async function adapterName(a) {
  try {
    const info = (await navigator.gpu.requestAdapter()).info;
    const parts = [info.vendor, info.architecture, info.device, info.description].filter((x) => x);
    if (parts.length) return parts.join(" ") + " (WebGPU)";
  } catch (e) { /* fall back to wgpu's name */ }
  return a.name;
}

// Test mode: the test server passes the task in the query and receives the report.
async function report(obj) {
  await fetch("/report", { method: "POST", body: JSON.stringify(obj) });
}

// The named files of a checkpoint directory the test server serves, as bytes.
async function fetchFiles(dir, names) {
  const contents = [];
  for (const n of names) {
    const r = await fetch(dir + "/" + n);
    if (!r.ok) throw new Error("cannot fetch " + dir + "/" + n);
    contents.push(new Uint8Array(await r.arrayBuffer()));
  }
  return contents;
}

// Saved files ([name, bytes] pairs) to the test server, which keeps them for the test.
async function upload(files) {
  for (const [name, bytes] of files) {
    await fetch("/upload/" + name, { method: "POST", body: bytes });
  }
}

async function testMode(q) {
  try {
    const adapter = JSON.parse(await sf.adapter());
    adapter.name = await adapterName(adapter);
    if (q.get("test") === "train") {
      // The page's own training loop, evaluations and samples included, as a visitor runs it.
      trainerText = q.get("text");
      if (q.has("eval_every")) evalEvery = Number(q.get("eval_every"));
      trainer = await sf.trainer(q.get("settings"), trainerText ?? undefined, "the test's text");
      const tunedNow = await tuneTrainer();
      await run();
      if ($("error").textContent) throw new Error($("error").textContent);
      await upload(await trainer.save());
      const sample = JSON.parse(await trainer.sample(q.get("prompt") || "74+58=",
        JSON.stringify({ greedy: true, max_new_tokens: 4 })));
      await report({
        adapter, losses, step_ms: stepMs, val: curve.val, samples: $("samples").textContent,
        tokens_per_step: trainer.tokens_per_step(), sample,
        tuned: tunedNow, tuned_shown: $("tuned").textContent, kernels: JSON.parse(await sf.kernels()),
      });
    } else if (q.get("test") === "lora") {
      // Fine-tunes the checkpoint with LoRA on the text, as a visitor does, saves the adapter,
      // then opens the checkpoint with the saved adapter and completes a prompt greedily.
      const dir = q.get("checkpoint"), names = q.get("files").split(",");
      const contents = await fetchFiles(dir, names);
      modelFiles = { names, contents, base: dir };
      $("text").value = q.get("text");
      textName = "the test's text";
      if (q.has("eval_every")) evalEvery = Number(q.get("eval_every"));
      await startFineTuning(q.get("settings"));
      if ($("error").textContent) throw new Error($("error").textContent);
      const saved = await trainer.save();
      await upload(saved);
      model = await sf.open_model(names.concat(saved.map((p) => p[0])),
        contents.concat(saved.map((p) => p[1])));
      const g = JSON.parse(await model.generate(q.get("prompt"),
        JSON.stringify({ greedy: true, max_new_tokens: 8 }), null));
      await report({
        adapter, losses, step_ms: stepMs, val: curve.val, describe: JSON.parse(trainer.describe()), generation: g,
        kernels: JSON.parse(await sf.kernels()),
      });
    } else if (q.get("test") === "lose") {
      // A few steps, then the device goes as a lost GPU's would: the message the page shows.
      trainer = await sf.trainer(q.get("settings"), undefined, "");
      await trainer.step();
      await trainer.flush();
      trainer.lose_device();
      let lost = null;
      try {
        for (let i = 0; i < 4; i++) await trainer.step();
        await trainer.flush();
      } catch (e) {
        lost = explain(e);
      }
      await report({ adapter, lost });
    } else if (q.get("test") === "sample") {
      const dir = q.get("checkpoint"), names = q.get("files").split(",");
      const contents = await fetchFiles(dir, names);
      model = await sf.open_model(names, contents);
      const opts = JSON.parse(q.get("options"));
      const g = JSON.parse(await model.generate(q.get("prompt"), JSON.stringify(opts), null));
      // Timed again, its pipelines now created: the generation's own speed.
      const t0 = performance.now();
      await model.generate(q.get("prompt"), JSON.stringify(opts), null);
      const ms = performance.now() - t0;
      await report({ adapter, generation: g, ms });
    } else {
      throw new Error("unknown test " + q.get("test"));
    }
  } catch (e) {
    await report({ error: explain(e) });
  }
}

async function main() {
  const q = new URLSearchParams(location.search);
  // ?demo=train: an image the server answers once training is done holds the page's load event
  // until then, so that `chromium --screenshot` (which waits for it) shows the trained page.
  if (q.get("demo") === "train") {
    const hold = new Image();
    hold.src = "/demo/hold";
    hold.style.display = "none";
    document.body.appendChild(hold);
  }
  if (!navigator.gpu) {
    const msg = "This browser offers no WebGPU (navigator.gpu is missing): use a recent Chrome, Edge or " +
      "Firefox, or enable WebGPU in its settings.";
    showError(msg);
    if (q.has("test")) await report({ error: msg });
    return;
  }
  await init();
  if (q.has("test")) return testMode(q);
  try {
    const a = JSON.parse(await sf.adapter());
    $("adapter").textContent = `${await adapterName(a)}; storage bindings up to ${(a.max_storage_binding / 2 ** 20).toFixed(0)} MiB` +
      `, workgroup storage ${a.workgroup_storage / 1024} KiB`;
  } catch (e) {
    $("adapter").textContent = "none";
    showError("No WebGPU adapter could be opened: " + explain(e));
    return;
  }
  $("train").onclick = startTraining;
  $("stop").onclick = () => { running = false; };
  $("continue").onclick = run;
  $("save").onclick = save;
  $("files").onchange = (e) => openModel(e.target.files);
  $("generate").onclick = generate;
  $("finetune").onclick = () => startFineTuning();
  $("save-adapter").onclick = save;
  $("data-addition").onchange = fillDefaults;
  $("data-text").onchange = fillDefaults;
  $("arch").onchange = () => { $("n_kv_head").disabled = $("arch").value !== "llama"; };
  $("text").oninput = () => { textName = "pasted text"; };
  $("textfile").onchange = (e) => openText(e.target.files);
  fillDefaults();
  // ?demo=train&steps=N...: fills the form from the query and trains (scripts/web_screenshot.py).
  if (q.get("demo") === "train") {
    for (const [k, v] of q) if (k !== "demo" && $(k)) $(k).value = v;
    await startTraining();
    await fetch("/demo/done", { method: "POST" });
  }
}

main();
