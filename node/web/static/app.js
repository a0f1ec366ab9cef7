// Pleura worklist page: log in with a token, poll the worklist, show one study with its previews,
// and record a verdict. Every value from the API goes into the page as text, never as HTML.
"use strict";

const state = { me: null, selected: null, overlay: "outline", timer: null, detail: null };
const $ = (id) => document.getElementById(id);

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

async function api(path, options = {}) {
  const response = await fetch(path, {
    credentials: "same-origin",
    ...options,
    headers: { "Accept": "application/json", ...(options.body ? { "Content-Type": "application/json" } : {}) },
  });
  if (response.status === 401) { showLogin(); throw new Error("please log in"); }
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail || detail; } catch (e) { /* not JSON */ }
    throw new Error(typeof detail === "string" ? detail : JSON.stringify(detail));
  }
  return response.status === 204 ? null : response.json();
}

function fmtTime(iso) { return iso ? new Date(iso).toLocaleString() : "–"; }
function fmtDuration(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (seconds < 90) return `${Math.round(seconds)} s`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}
function fmtSize(study) {
  const parts = [];
  if (study.area_cm2 !== null && study.area_cm2 !== undefined) parts.push(`${study.area_cm2.toFixed(1)} cm²`);
  else if (study.area_px) parts.push(`${study.area_px} px`);
  if (study.largest_gap_mm !== null && study.largest_gap_mm !== undefined) parts.push(`gap ${study.largest_gap_mm.toFixed(0)} mm`);
  return parts.join(", ") || "–";
}
const VERDICT_WORDS = {
  confirmed: "confirmed", rejected: "rejected", known: "already known/treated", corrected: "corrected outline",
};

function showLogin() {
  clearInterval(state.timer);
  state.timer = null;
  $("app").hidden = true;
  $("who").hidden = true;
  $("login").hidden = false;
}

async function start() {
  try {
    state.me = await api("/api/session");
  } catch (e) { return; }
  $("login").hidden = true;
  $("app").hidden = false;
  $("who").hidden = false;
  $("user-name").textContent = state.me.name;
  $("user-role").textContent = state.me.may_give_feedback ? "feedback" : "read-only";
  await refresh();
  clearInterval(state.timer);
  state.timer = setInterval(refresh, Math.max(1, state.me.refresh_seconds) * 1000);
}

async function refresh() {
  const params = new URLSearchParams();
  if ($("filter-flagged").checked) params.set("flagged", "true");
  if ($("filter-status").value) params.set("status", $("filter-status").value);
  let studies;
  try {
    studies = await api("/api/studies?" + params.toString());
    $("load-error").textContent = "";
  } catch (e) { $("load-error").textContent = e.message; return; }
  renderWorklist(studies);
  $("updated").textContent = "updated " + new Date().toLocaleTimeString();
  if (state.selected) await loadDetail(state.selected, false);
}

function renderWorklist(studies) {
  const body = $("worklist-body");
  const rows = studies.map((study) => {
    const row = el("tr");
    row.dataset.ref = study.ref;
    row.dataset.urgency = study.urgency;
    if (study.flagged) row.classList.add("flagged");
    if (study.ref === state.selected) row.classList.add("selected");
    const urgency = el("td"); urgency.append(el("span", study.urgency, "badge " + study.urgency));
    row.append(urgency);
    const finding = study.flagged ? "⚠ PNEUMOTHORAX SUSPECTED"
      : study.model_flagged && study.feedback ? "flag rejected" : (study.finding || "–");
    row.append(el("td", finding, "finding"));
    row.append(el("td", study.accession_number || "–"));
    row.append(el("td", study.patient_id || "–"));
    row.append(el("td", study.status, "status"));
    row.append(el("td", study.probability === null ? "–" : study.probability.toFixed(2)));
    row.append(el("td", study.side || "–"));
    row.append(el("td", fmtSize(study)));
    row.append(el("td", fmtTime(study.received_at)));
    row.append(el("td", fmtDuration(study.time_to_flag_seconds)));
    row.append(el("td", study.feedback ? `${VERDICT_WORDS[study.feedback.verdict]} (${study.feedback.user})` : "–", "review"));
    row.addEventListener("click", () => select(study.ref));
    return row;
  });
  body.replaceChildren(...rows);
  $("empty").hidden = studies.length > 0;
  $("demo-banner").hidden = !studies.some((s) => s.model.synthetic_demo);
  const unreviewed = studies.filter((s) => s.urgency === "critical").length;
  document.title = unreviewed ? `(${unreviewed}) Pleura worklist` : "Pleura worklist";  // visible in a background tab
}

async function select(ref) {
  state.selected = ref;
  document.querySelectorAll("#worklist-body tr").forEach((r) => r.classList.toggle("selected", r.dataset.ref === ref));
  $("feedback-status").textContent = "";
  await loadDetail(ref, true);
}

async function loadDetail(ref, redrawImages) {
  let study;
  try { study = await api(`/api/studies/${encodeURIComponent(ref)}`); }
  catch (e) { $("feedback-status").textContent = e.message; return; }
  if (state.selected !== ref) return;
  const changed = !state.detail || state.detail.ref !== ref || state.detail.analysed_at !== study.analysed_at;
  state.detail = study;
  $("detail").hidden = false;
  $("detail").dataset.ref = ref;
  $("detail-title").textContent = `Accession ${study.accession_number || "–"} · Patient ${study.patient_id || "–"}`;
  const flag = $("detail-flag");
  flag.className = study.flagged ? "flagged" : "";
  flag.textContent = study.flagged ? "⚠ PNEUMOTHORAX SUSPECTED" : (study.finding || "not analysed yet");
  const facts = [
    ["Status", study.status], ["Urgency", study.urgency],
    ["Probability", study.probability === null ? "–" : study.probability.toFixed(3)],
    ["Side", study.side || "–"], ["Size", fmtSize(study)],
    ["Model", `${study.model.name || "–"} ${study.model.version || ""}${study.model.synthetic_demo ? " (SYNTHETIC DEMO)" : ""}`],
    ["Received", fmtTime(study.received_at)], ["Analysed", fmtTime(study.analysed_at)],
    ["Delivered", fmtTime(study.delivered_at)], ["Time to flag", fmtDuration(study.time_to_flag_seconds)],
    ["Notifications", study.notifications.map((n) =>
      `${n.event} ${n.channel} ${n.status}${n.status === "rejected" && n.last_error ? ` (${n.last_error})` : ""}`).join("; ") || "–"],
  ];
  if (study.reason) facts.push(["Note", study.reason]);
  $("detail-facts").replaceChildren(...facts.flatMap(([k, v]) => [el("dt", k), el("dd", v)]));
  $("feedback-buttons").hidden = !(state.me && state.me.may_give_feedback) || !study.analysed_at;
  $("feedback-history").replaceChildren(...study.feedback_history.slice().reverse().map((f) =>
    el("li", `${VERDICT_WORDS[f.verdict]} by ${f.user}, ${fmtTime(f.created_at)}${f.comment ? " — " + f.comment : ""}`)));
  const anyHeatmap = study.images.some((i) => i.has_heatmap);
  $("heatmap-toggle").disabled = !anyHeatmap;
  $("heatmap-note").textContent = anyHeatmap ? "" : "no heat map from this model";
  if (!anyHeatmap && state.overlay === "heatmap") setOverlay("outline", false);
  if (redrawImages || changed) renderImages();
}

function renderImages() {
  const study = state.detail;
  const mayCorrect = state.me && state.me.may_give_feedback && study.analysed_at;
  const figures = study.images.map((image) => {
    const figure = el("figure");
    const wrap = el("div", null, "canvas-wrap");
    const img = el("img");
    img.alt = `image ${image.index + 1} (${state.overlay})`;
    img.dataset.index = image.index;
    let src = image.preview_url + (state.overlay === "none" ? "?overlay=none" : "");
    if (state.overlay === "heatmap") src = image.heatmap_url || image.preview_url;
    img.src = src;
    wrap.append(img);
    figure.append(wrap);
    const caption = image.analysis_status === "analysed"
      ? `p=${image.probability.toFixed(3)}${image.flagged ? " · flagged" : ""}${image.side ? " · " + image.side : ""}`
        + `${image.has_outline ? "" : " · no outline"}`
        + `${image.analysis_reason ? " · " + image.analysis_reason : ""}`  // the decision's rule
      : `${image.analysis_status}${image.analysis_reason ? ": " + image.analysis_reason : ""}`;
    figure.append(el("figcaption", caption, "muted"));
    if (mayCorrect) {
      const draw = el("button", "Draw outline", "draw");
      draw.type = "button";
      draw.addEventListener("click", () => startDrawing(figure, wrap, img, image.index));
      figure.append(draw);
    }
    return figure;
  });
  $("images").replaceChildren(...figures);
}

// The radiologist paints the pneumothorax over the preview; the painted pixels are the mask.
function startDrawing(figure, wrap, img, index) {
  if (wrap.querySelector("canvas") || !img.naturalWidth) return;
  const canvas = el("canvas");
  canvas.width = img.naturalWidth;
  canvas.height = img.naturalHeight;
  canvas.dataset.index = index;
  wrap.append(canvas);
  const pen = canvas.getContext("2d");
  pen.strokeStyle = "rgba(0, 170, 255, 0.75)";
  pen.lineWidth = Math.max(6, canvas.width / 60);
  pen.lineCap = "round";
  pen.lineJoin = "round";
  let down = false;
  const point = (event) => {
    const box = canvas.getBoundingClientRect();
    return [(event.clientX - box.left) * canvas.width / box.width, (event.clientY - box.top) * canvas.height / box.height];
  };
  canvas.addEventListener("pointerdown", (event) => { down = true; pen.beginPath(); pen.moveTo(...point(event)); pen.lineTo(...point(event)); pen.stroke(); });
  canvas.addEventListener("pointermove", (event) => { if (down) { pen.lineTo(...point(event)); pen.stroke(); } });
  ["pointerup", "pointerleave"].forEach((name) => canvas.addEventListener(name, () => { down = false; }));
  const save = el("button", "Save outline", "save-outline");
  const cancel = el("button", "Cancel", "cancel-outline");
  save.type = cancel.type = "button";
  const finish = () => { canvas.remove(); save.remove(); cancel.remove(); };
  cancel.addEventListener("click", finish);
  save.addEventListener("click", async () => {
    $("feedback-status").textContent = "saving…";
    try {
      const saved = await api(`/api/studies/${encodeURIComponent(state.selected)}/images/${index}/correction`, {
        method: "POST", body: JSON.stringify({ mask_png: canvas.toDataURL("image/png"), comment: $("feedback-comment").value || null }),
      });
      finish();
      $("feedback-status").textContent = `Saved: ${VERDICT_WORDS[saved.verdict]} by ${saved.user}`;
      await refresh();
    } catch (e) { $("feedback-status").textContent = "Not saved: " + e.message; }
  });
  figure.append(save, cancel);
}

function setOverlay(overlay, redraw = true) {
  state.overlay = overlay;
  document.querySelectorAll(".overlay-toggle button").forEach((b) => b.classList.toggle("active", b.dataset.overlay === overlay));
  if (redraw && state.detail) renderImages();
}

async function giveFeedback(verdict) {
  const ref = state.selected;
  $("feedback-status").textContent = "saving…";
  try {
    const saved = await api(`/api/studies/${encodeURIComponent(ref)}/feedback`, {
      method: "POST", body: JSON.stringify({ verdict, comment: $("feedback-comment").value || null }),
    });
    $("feedback-comment").value = "";
    $("feedback-status").textContent = `Saved: ${VERDICT_WORDS[saved.verdict]} by ${saved.user}`;
    await refresh();
  } catch (e) { $("feedback-status").textContent = "Not saved: " + e.message; }
}

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    $("login-error").textContent = "";
    try {
      const response = await fetch("/api/session", {
        method: "POST", credentials: "same-origin",
        headers: { "Content-Type": "application/json" }, body: JSON.stringify({ token: $("token").value }),
      });
      if (!response.ok) { $("login-error").textContent = "Unknown token."; return; }
      $("token").value = "";
      await start();
    } catch (e) { $("login-error").textContent = e.message; }
  });
  $("logout").addEventListener("click", async () => {
    await fetch("/api/session", { method: "DELETE", credentials: "same-origin" });
    state.selected = null; state.detail = null; $("detail").hidden = true;
    showLogin();
  });
  $("filter-flagged").addEventListener("change", refresh);
  $("filter-status").addEventListener("change", refresh);
  $("detail-close").addEventListener("click", () => { state.selected = null; state.detail = null; $("detail").hidden = true; refresh(); });
  document.querySelectorAll(".verdict").forEach((b) => b.addEventListener("click", () => giveFeedback(b.dataset.verdict)));
  document.querySelectorAll(".overlay-toggle button").forEach((b) => b.addEventListener("click", () => setOverlay(b.dataset.overlay)));
  start();
});
