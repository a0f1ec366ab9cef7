// Pleura worklist page: log in with a token, hear of changes through server-sent events, show the
// prioritised list beside one study (deep link #/study/<ref>), view its image, record a verdict.
// Every value from the API goes into the page as text, never as HTML.
"use strict";

const PAGE_SIZE = 100;
const state = {
  me: null, selected: null, detail: null, offset: 0, total: 0, studies: [], imageIndex: 0,
  seenCritical: null, events: null, timer: null, toastTimer: null, viewer: null, drawing: false,
  rejectAnswer: null,
};
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
  const total = response.headers.get("X-Total-Count");
  const body = response.status === 204 ? null : await response.json();
  return total === null ? body : { items: body, total: Number(total) };
}

// -- formatting: times in the site's time zone, numbers that never round a doubt away ----------

function zone() { return (state.me && state.me.time_zone) || "UTC"; }
function fmtTime(iso, withZone = true) {
  if (!iso) return "–";
  return new Intl.DateTimeFormat("en-GB", {
    timeZone: zone(), year: "numeric", month: "2-digit", day: "2-digit", hour: "2-digit", minute: "2-digit",
    ...(withZone ? { timeZoneName: "short" } : {}),
  }).format(new Date(iso));
}
function fmtClock(iso) {
  return iso ? new Intl.DateTimeFormat("en-GB", { timeZone: zone(), hour: "2-digit", minute: "2-digit" }).format(new Date(iso)) : "–";
}
// Midnight of a yyyy-mm-dd day in the site's zone, as an ISO instant (for the date filter).
function zonedMidnight(day) {
  const [y, m, d] = day.split("-").map(Number);
  const guess = Date.UTC(y, m - 1, d);
  const parts = Object.fromEntries(new Intl.DateTimeFormat("en-US", {
    timeZone: zone(), hourCycle: "h23", year: "numeric", month: "2-digit", day: "2-digit", hour: "2-digit", minute: "2-digit", second: "2-digit",
  }).formatToParts(new Date(guess)).map((p) => [p.type, p.value]));
  const shown = Date.UTC(+parts.year, +parts.month - 1, +parts.day, +parts.hour, +parts.minute, +parts.second);
  return new Date(guess - (shown - guess)).toISOString();
}
function fmtProb(p) {
  if (p === null || p === undefined) return "–";
  let digits = 3;
  while (digits < 6 && p < 1 && Number(p.toFixed(digits)) >= 1) digits++;
  if (p < 1 && Number(p.toFixed(digits)) >= 1) return "> 0.999999";
  while (digits < 6 && p > 0 && Number(p.toFixed(digits)) <= 0) digits++;
  return p.toFixed(digits);
}
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
function patientLine(study) {
  const who = study.patient_name || study.patient_id || "unknown patient";
  const demo = [study.patient_age, study.patient_sex].filter(Boolean).join(" ");
  return demo ? `${who} (${demo})` : who;
}

// -- what the study's state says, in one line, the same in the row and the header --------------

const VERDICT_WORDS = {
  confirmed: "Confirmed", rejected: "Flag rejected", known: "Already known/treated",
  corrected: "Outline corrected", undone: "Verdict undone",
};
function inForce(study) { return study.feedback && study.feedback.verdict !== "undone" ? study.feedback : null; }
function reviewText(study, long = false) {
  const f = study.feedback;
  if (!f) return long ? "not reviewed yet" : "–";
  return `${VERDICT_WORDS[f.verdict]} by ${f.user}, ${long ? fmtTime(f.created_at) : fmtClock(f.created_at)}`;
}
// [text, class]: the class says what the colour means; rejected and negative are never red.
function findingOf(study) {
  const f = inForce(study);
  if (study.model_flagged === null || study.model_flagged === undefined) {
    return f && f.verdict === "corrected" ? ["Pneumothorax (outlined by radiologist)", "state-confirmed"] : ["Not analysed yet", "state-pending"];
  }
  if (!f && study.flagged) return ["⚠ PNEUMOTHORAX SUSPECTED — not reviewed", "state-suspected"];
  if (f && f.verdict === "confirmed") return ["Pneumothorax confirmed", "state-confirmed"];
  if (f && f.verdict === "known") return ["Pneumothorax already known/treated", "state-confirmed"];
  if (f && f.verdict === "corrected") return ["Pneumothorax, outline corrected", "state-confirmed"];
  if (f && f.verdict === "rejected") return ["AI flag rejected — no pneumothorax", "state-rejected"];
  return ["No pneumothorax suspected by the AI", "state-negative"];
}

// -- session, events, alerts -------------------------------------------------------------------

function showLogin() {
  clearInterval(state.timer);
  state.timer = null;
  if (state.events) { state.events.close(); state.events = null; }
  $("app").hidden = true;
  $("who").hidden = true;
  $("login").hidden = false;
}

async function start() {
  try { state.me = await api("/api/session"); } catch (e) { return; }
  $("login").hidden = true;
  $("app").hidden = false;
  $("who").hidden = false;
  $("user-name").textContent = state.me.name;
  $("user-role").textContent = state.me.may_give_feedback ? "feedback" : "read-only";
  $("sound-toggle").checked = localStorage.getItem("pleura.sound") === "on";
  $("alerts-enable").hidden = !("Notification" in window) || Notification.permission === "granted";
  await refresh();
  listen();
  routeFromHash();
}

// Server-sent events; while the stream is down the page checks every refresh_seconds instead.
function listen() {
  if (state.events) state.events.close();
  const live = $("live");
  const poll = () => { if (!state.timer) state.timer = setInterval(refresh, Math.max(1, state.me.refresh_seconds) * 1000); };
  if (!("EventSource" in window)) { live.textContent = "polling"; poll(); return; }
  const source = new EventSource("/api/events");
  state.events = source;
  source.addEventListener("open", () => {
    live.textContent = "● live"; live.className = "live on";
    clearInterval(state.timer); state.timer = null;
  });
  source.addEventListener("worklist", () => refresh());
  source.addEventListener("error", () => { live.textContent = "○ reconnecting"; live.className = "live"; poll(); });
}

function alertNewFlags(studies) {
  const critical = studies.filter((s) => s.urgency === "critical").map((s) => s.ref);
  if (state.seenCritical === null) { state.seenCritical = new Set(critical); return; }
  const fresh = studies.filter((s) => s.urgency === "critical" && !state.seenCritical.has(s.ref));
  critical.forEach((ref) => state.seenCritical.add(ref));
  if (!fresh.length) return;
  const study = fresh[0];
  // No patient name in the desktop notification (it shows on a locked screen); the accession.
  const text = `Suspected pneumothorax: accession ${study.accession_number || "–"}, p=${fmtProb(study.probability)}`
    + (fresh.length > 1 ? ` (+${fresh.length - 1} more)` : "");
  $("alert-text").textContent = text;
  $("alert").dataset.ref = study.ref;
  $("alert").hidden = false;
  if ("Notification" in window && Notification.permission === "granted") {
    const note = new Notification("Pleura: new flagged study", { body: text, tag: "pleura-" + study.ref, requireInteraction: true });
    note.onclick = () => { window.focus(); select(study.ref); note.close(); };
  }
  if ($("sound-toggle").checked) chime();
}

function chime() {
  try {
    const audio = new (window.AudioContext || window.webkitAudioContext)();
    [0, 0.25].forEach((at) => {
      const tone = audio.createOscillator(), gain = audio.createGain();
      tone.frequency.value = 880;
      gain.gain.setValueAtTime(0.2, audio.currentTime + at);
      gain.gain.exponentialRampToValueAtTime(0.001, audio.currentTime + at + 0.2);
      tone.connect(gain).connect(audio.destination);
      tone.start(audio.currentTime + at);
      tone.stop(audio.currentTime + at + 0.2);
    });
    state.lastChime = Date.now();
  } catch (e) { /* no audio device */ }
}

// -- the list ----------------------------------------------------------------------------------

function listParams() {
  const params = new URLSearchParams();
  if ($("filter-flagged").checked) params.set("flagged", "true");
  if ($("filter-status").value) params.set("status", $("filter-status").value);
  if ($("filter-review").value) params.set("reviewed", $("filter-review").value);
  if ($("search").value.trim()) params.set("q", $("search").value.trim());
  if ($("filter-from").value) params.set("since", zonedMidnight($("filter-from").value));
  if ($("filter-to").value) {
    const next = new Date($("filter-to").value + "T00:00:00Z");
    next.setUTCDate(next.getUTCDate() + 1);
    params.set("until", zonedMidnight(next.toISOString().slice(0, 10)));
  }
  params.set("offset", String(state.offset));
  params.set("limit", String(PAGE_SIZE));
  return params;
}

// Refreshes overlap (a live event, a saved verdict, a poll): an answer older than one already
// shown is dropped, so a list or a study read before a verdict never replaces one read after it.
let listAsked = 0, detailAsked = 0;

async function refresh() {
  let page;
  const asked = ++listAsked;
  try {
    page = await api("/api/studies?" + listParams().toString());
    $("load-error").textContent = "";
  } catch (e) { $("load-error").textContent = e.message; return; }
  if (asked !== listAsked) return;
  state.studies = page.items;
  state.total = page.total;
  renderWorklist(page.items);
  if (state.offset === 0 && !anyFilter()) alertNewFlags(page.items);
  $("updated").textContent = "updated " + fmtClock(new Date().toISOString());
  if (state.selected) await loadDetail(state.selected);
}

function anyFilter() {
  return $("filter-flagged").checked || $("filter-status").value || $("filter-review").value
    || $("search").value.trim() || $("filter-from").value || $("filter-to").value;
}

function renderWorklist(studies) {
  const rows = studies.map((study) => {
    const row = el("tr");
    row.dataset.ref = study.ref;
    row.dataset.urgency = study.urgency;
    const [finding, findingClass] = findingOf(study);
    row.classList.add(findingClass);
    if (study.flagged) row.classList.add("flagged");
    if (study.overdue) row.classList.add("overdue");
    if (study.ref === state.selected) row.classList.add("selected");
    const priority = el("td");
    priority.append(el("span", study.urgency, "badge " + study.urgency));
    if (study.overdue) priority.append(el("span", "overdue", "badge overdue"));
    row.append(priority);
    const patient = el("td", null, "patient");
    patient.append(el("div", patientLine(study)), el("div", study.patient_id || "", "muted small"));
    row.append(patient);
    const findingCell = el("td", null, "finding");
    findingCell.append(el("div", finding));
    if (study.probability !== null) findingCell.append(el("div", `p=${fmtProb(study.probability)} · ${fmtSize(study)}`, "muted small"));
    row.append(findingCell);
    row.append(el("td", reviewText(study), "review"));
    row.append(el("td", study.accession_number || "–", "extra"));
    row.append(el("td", [study.study_description, study.view].filter(Boolean).join(" · ") || "–", "extra"));
    row.append(el("td", study.status, "status extra"));
    row.append(el("td", fmtTime(study.received_at, false), "received"));
    row.append(el("td", fmtDuration(study.time_to_flag_seconds), "extra"));
    row.addEventListener("click", () => select(study.ref));
    return row;
  });
  $("worklist-body").replaceChildren(...rows);
  $("empty").hidden = studies.length > 0;
  $("demo-banner").hidden = !studies.some((s) => s.model.synthetic_demo);
  const first = state.total ? state.offset + 1 : 0;
  $("page-info").textContent = `${first}–${state.offset + studies.length} of ${state.total}`;
  $("page-prev").disabled = state.offset === 0;
  $("page-next").disabled = state.offset + studies.length >= state.total;
  const unreviewed = studies.filter((s) => s.urgency === "critical").length;
  document.title = unreviewed ? `(${unreviewed}) Pleura worklist` : "Pleura worklist";  // seen from another tab
}

// -- routing: #/study/<ref> --------------------------------------------------------------------

function select(ref) {
  const hash = ref ? `#/study/${encodeURIComponent(ref)}` : "#/";
  if (location.hash !== hash) location.hash = hash;  // a history entry: Back returns
  else routeFromHash();
}

function routeFromHash() {
  const match = location.hash.match(/^#\/study\/([^/?#]+)/);
  const ref = match ? decodeURIComponent(match[1]) : null;
  if (ref === state.selected) return;
  if (!ref) { closeDetail(); return; }
  openStudy(ref);
}

async function openStudy(ref) {
  state.selected = ref;
  state.detail = null;
  state.imageIndex = 0;
  document.querySelectorAll("#worklist-body tr").forEach((r) => r.classList.toggle("selected", r.dataset.ref === ref));
  $("feedback-status").textContent = "";
  $("feedback-comment").value = "";
  $("app").classList.add("with-detail");
  $("detail").hidden = false;
  $("splitter").hidden = false;
  await loadDetail(ref);
  const row = document.querySelector(`#worklist-body tr[data-ref="${CSS.escape(ref)}"]`);
  if (row) row.scrollIntoView({ block: "nearest" });
}

function closeDetail() {
  state.selected = null;
  state.detail = null;
  setDrawing(false);
  $("detail").hidden = true;
  $("splitter").hidden = true;
  $("app").classList.remove("with-detail");
  document.querySelectorAll("#worklist-body tr.selected").forEach((r) => r.classList.remove("selected"));
}

function step(delta) {
  const refs = state.studies.map((s) => s.ref);
  if (!refs.length) return;
  const at = refs.indexOf(state.selected);
  const next = at < 0 ? 0 : Math.min(refs.length - 1, Math.max(0, at + delta));
  select(refs[next]);
}

// -- one study ---------------------------------------------------------------------------------

async function loadDetail(ref) {
  let study;
  const asked = ++detailAsked;
  try { study = await api(`/api/studies/${encodeURIComponent(ref)}`); }
  catch (e) { $("feedback-status").textContent = e.message; return; }
  if (state.selected !== ref || asked !== detailAsked) return;
  const imagesChanged = !state.detail || state.detail.ref !== ref || state.detail.analysed_at !== study.analysed_at
    || JSON.stringify(state.detail.images.map((i) => i.correction_url)) !== JSON.stringify(study.images.map((i) => i.correction_url));
  state.detail = study;
  $("detail").dataset.ref = ref;
  $("detail-title").textContent = patientLine(study);
  $("detail-study").textContent = [
    study.study_datetime ? fmtTime(study.study_datetime) : null, study.study_description,
    [study.modality, study.view].filter(Boolean).join(" "), `Acc ${study.accession_number || "–"}`,
    `ID ${study.patient_id || "–"}`,
  ].filter(Boolean).join(" · ");
  const pacs = $("pacs-link");
  pacs.hidden = !study.pacs_url;
  if (study.pacs_url) pacs.href = study.pacs_url;
  const [finding, findingClass] = findingOf(study);
  const flag = $("detail-flag");
  flag.className = findingClass;
  flag.replaceChildren(el("span", finding, "finding-text"), el("span", reviewText(study, true), "review-text"));
  const image = study.images[state.imageIndex] || study.images[0];
  const share = study.hemithorax_fraction ?? (image ? image.hemithorax_fraction : null);
  const facts = [
    ["Probability", study.probability === null ? "–"
      : `${fmtProb(study.probability)} (threshold ${study.threshold === null ? "–" : fmtProb(study.threshold)})`],
    ["Side", study.side || "–"], ["Area", fmtSize(study)],
    ["Share of hemithorax", share === null || share === undefined ? "–" : `${(share * 100).toFixed(0)} %`],
    ...(study.volume_ml === null || study.volume_ml === undefined ? [] : [["Volume (CT)", `${study.volume_ml.toFixed(1)} mL`]]),
    ["Model", `${study.model.name || "–"} ${study.model.version || ""}${study.model.synthetic_demo ? " (SYNTHETIC DEMO)" : ""}`],
    ["Status", study.status], ["Received", fmtTime(study.received_at)], ["Analysed", fmtTime(study.analysed_at)],
    ["Time to flag", fmtDuration(study.time_to_flag_seconds)],
    ["Notifications", study.notifications.map((n) =>
      `${n.event} ${n.channel} ${n.status}${n.status === "rejected" && n.last_error ? ` (${n.last_error})` : ""}`).join("; ") || "–"],
  ];
  if (image && image.analysis_reason) facts.push(["Rule", image.analysis_reason]);
  if (study.reason) facts.push(["Note", study.reason]);
  $("detail-facts").replaceChildren(...facts.flatMap(([k, v]) => [el("dt", k), el("dd", v)]));
  const mayReview = state.me && state.me.may_give_feedback;
  $("feedback-buttons").hidden = !mayReview || !study.analysed_at;
  $("draw-start").hidden = !mayReview || state.drawing;
  $("feedback-history").replaceChildren(...study.feedback_history.slice().reverse().map((f) =>
    el("li", `${VERDICT_WORDS[f.verdict]} by ${f.user}, ${fmtTime(f.created_at)}${f.comment ? " — " + f.comment : ""}`)));
  const picker = $("image-select");
  picker.hidden = study.images.length < 2;
  picker.replaceChildren(...study.images.map((i) => {
    const option = el("option", `image ${i.index + 1}${i.flagged ? " (flagged)" : ""}`);
    option.value = i.index;
    return option;
  }));
  picker.value = String(state.imageIndex);
  $("show-heatmap").disabled = !study.images.some((i) => i.has_heatmap);
  if (imagesChanged && !state.drawing) await showImage(state.imageIndex);
}

async function showImage(index) {
  const image = state.detail && state.detail.images[index];
  if (!image) { state.viewer.image = null; state.viewer.render(); return; }
  state.imageIndex = index;
  try {
    await state.viewer.load(image);
    $("preset").value = "image";
    $("viewer").dataset.loaded = `${state.detail.ref}/${index}`;
  } catch (e) { $("viewer-status").textContent = e.message; }
}

// -- verdicts ----------------------------------------------------------------------------------

async function giveFeedback(verdict) {
  const ref = state.selected;
  if (!ref || !state.me || !state.me.may_give_feedback || !state.detail || !state.detail.analysed_at) return;
  if (verdict === "rejected") {
    const dialog = $("reject-dialog");
    // A dialog's "close" event comes a moment after it closes: Cancel then "r" at once would see
    // the first closing's event while the second dialog is open, and lose the second answer. Each
    // opening waits for its own closing (answerRejectDialog); an earlier one still waiting is
    // answered with what it was given.
    if (state.rejectAnswer) state.rejectAnswer(dialog.returnValue);
    dialog.returnValue = "";
    dialog.showModal();
    const answer = await new Promise((resolve) => {
      state.rejectAnswer = (value) => { state.rejectAnswer = null; resolve(value); };
    });
    if (answer !== "reject") return;
  }
  $("feedback-status").textContent = "saving…";
  try {
    const saved = await api(`/api/studies/${encodeURIComponent(ref)}/feedback`, {
      method: "POST", body: JSON.stringify({ verdict, comment: $("feedback-comment").value || null }),
    });
    $("feedback-comment").value = "";
    $("feedback-status").textContent = `Saved: ${VERDICT_WORDS[saved.verdict]} by ${saved.user}`;
    offerUndo(ref, saved);
    await refresh();
  } catch (e) { $("feedback-status").textContent = "Not saved: " + e.message; }
}

function offerUndo(ref, saved) {
  const until = Date.now() + (state.me.undo_seconds || 60) * 1000;
  const toast = $("toast");
  clearInterval(state.toastTimer);
  const tick = () => {
    const left = Math.ceil((until - Date.now()) / 1000);
    if (left <= 0) { toast.hidden = true; clearInterval(state.toastTimer); return; }
    $("toast-text").textContent = `${VERDICT_WORDS[saved.verdict]} — undo within ${left} s`;
  };
  toast.hidden = false;
  tick();
  state.toastTimer = setInterval(tick, 1000);
  $("toast-undo").onclick = async () => {
    clearInterval(state.toastTimer);
    toast.hidden = true;
    try {
      const undone = await api(`/api/studies/${encodeURIComponent(ref)}/feedback/${saved.id}/undo`, { method: "POST" });
      $("feedback-status").textContent = `Undone: ${VERDICT_WORDS[undone.verdict]} in force`;
      await refresh();
    } catch (e) { $("feedback-status").textContent = "Not undone: " + e.message; }
  };
}

// -- drawing a corrected outline ---------------------------------------------------------------

function setDrawing(on) {
  if (on && !state.viewer.startDrawing()) return;
  if (!on) state.viewer.stopDrawing();
  state.drawing = on;
  document.querySelectorAll("#viewer-toolbar .drawing").forEach((b) => { b.hidden = !on; });
  $("draw-start").hidden = on || !(state.me && state.me.may_give_feedback);
  $("viewer").classList.toggle("drawing-mode", on);
  state.viewer.render();
}

async function saveDrawing() {
  if (!state.viewer.hasDrawing()) { $("feedback-status").textContent = "Nothing drawn yet."; return; }
  $("feedback-status").textContent = "saving…";
  try {
    const saved = await api(`/api/studies/${encodeURIComponent(state.selected)}/feedback`, {
      method: "POST",
      body: JSON.stringify({ verdict: "corrected", image_index: state.imageIndex, mask_png: state.viewer.maskDataUrl(),
                             comment: $("feedback-comment").value || null }),
    });
    setDrawing(false);
    $("show-correction").checked = true;
    state.viewer.setShow("correction", true);
    $("feedback-status").textContent = `Saved: ${VERDICT_WORDS[saved.verdict]} by ${saved.user}`;
    await refresh();
  } catch (e) { $("feedback-status").textContent = "Not saved: " + e.message; }
}

// -- layout: the list beside the study, the splitter -------------------------------------------

function bindSplitter() {
  const splitter = $("splitter");
  const saved = Number(localStorage.getItem("pleura.listWidth"));
  if (saved) document.documentElement.style.setProperty("--list-width", `${saved}px`);
  let dragging = false;
  splitter.addEventListener("pointerdown", (event) => { dragging = true; splitter.setPointerCapture(event.pointerId); });
  splitter.addEventListener("pointermove", (event) => {
    if (!dragging) return;
    const width = Math.min(window.innerWidth - 420, Math.max(280, event.clientX - 8));
    document.documentElement.style.setProperty("--list-width", `${width}px`);
  });
  splitter.addEventListener("pointerup", () => {
    dragging = false;
    const width = parseInt(getComputedStyle(document.documentElement).getPropertyValue("--list-width"), 10);
    if (width) localStorage.setItem("pleura.listWidth", String(width));
  });
}

// -- keys --------------------------------------------------------------------------------------

function onKey(event) {
  // Keys typed into a field or an open dialog are theirs. A closed dialog's button can still hold the
  // focus for a moment after Cancel: the shortcuts work then too.
  if (event.target.closest("input, select, textarea, dialog[open]") || event.ctrlKey || event.metaKey || event.altKey) return;
  if ($("app").hidden) return;
  const viewer = state.viewer;
  const keys = {
    "j": () => step(1), "ArrowDown": () => step(1), "k": () => step(-1), "ArrowUp": () => step(-1),
    "Escape": () => { if (state.drawing) setDrawing(false); else if (state.selected) select(null); },
    "c": () => giveFeedback("confirmed"), "r": () => giveFeedback("rejected"),
    "+": () => viewer.zoom(1.25), "=": () => viewer.zoom(1.25), "-": () => viewer.zoom(0.8), "0": () => viewer.fit(),
    "f": () => viewer.fullscreen(), "w": () => viewer.setTool("window"), "p": () => viewer.setTool("pan"),
    "1": () => { $("preset").value = "lung"; viewer.preset("lung"); },
    "2": () => { $("preset").value = "soft"; viewer.preset("soft"); },
    "3": () => { $("preset").value = "image"; viewer.preset("image"); },
  };
  const action = keys[event.key];
  if (!action || (!state.selected && !["j", "k", "ArrowDown", "ArrowUp"].includes(event.key))) return;
  event.preventDefault();
  action();
}

function answerRejectDialog() {
  const dialog = $("reject-dialog");
  if (dialog.open || !state.rejectAnswer) return;  // an earlier closing's late event
  state.rejectAnswer(dialog.returnValue);
}

document.addEventListener("DOMContentLoaded", () => {
  $("reject-dialog").addEventListener("close", answerRejectDialog);
  state.viewer = new window.PleuraViewer($("viewer"), { onStatus: (text) => { $("viewer-status").textContent = text; } });
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
    closeDetail();
    showLogin();
  });
  const refilter = () => { state.offset = 0; refresh(); };
  ["filter-flagged", "filter-status", "filter-review", "filter-from", "filter-to"].forEach((id) => $(id).addEventListener("change", refilter));
  let typing = null;
  $("search").addEventListener("input", () => { clearTimeout(typing); typing = setTimeout(refilter, 300); });
  $("page-prev").addEventListener("click", () => { state.offset = Math.max(0, state.offset - PAGE_SIZE); refresh(); });
  $("page-next").addEventListener("click", () => { state.offset += PAGE_SIZE; refresh(); });
  $("detail-close").addEventListener("click", () => select(null));
  document.querySelectorAll(".verdict[data-verdict]").forEach((b) => b.addEventListener("click", () => giveFeedback(b.dataset.verdict)));
  $("alerts-enable").addEventListener("click", async () => {
    if ("Notification" in window) await Notification.requestPermission();
    $("alerts-enable").hidden = Notification.permission === "granted";
  });
  $("sound-toggle").addEventListener("change", () => localStorage.setItem("pleura.sound", $("sound-toggle").checked ? "on" : "off"));
  $("alert-open").addEventListener("click", () => { $("alert").hidden = true; select($("alert").dataset.ref); });
  $("alert-dismiss").addEventListener("click", () => { $("alert").hidden = true; });
  // The viewer's toolbar.
  const viewer = state.viewer;
  document.querySelectorAll("#viewer-toolbar .tool").forEach((b) => b.addEventListener("click", () => viewer.setTool(b.dataset.tool)));
  $("preset").addEventListener("change", () => viewer.preset($("preset").value));
  $("zoom-in").addEventListener("click", () => viewer.zoom(1.25));
  $("zoom-out").addEventListener("click", () => viewer.zoom(0.8));
  $("zoom-fit").addEventListener("click", () => viewer.fit());
  $("fullscreen").addEventListener("click", () => viewer.fullscreen());
  $("show-outline").addEventListener("change", () => viewer.setShow("outline", $("show-outline").checked));
  $("show-heatmap").addEventListener("change", () => viewer.setShow("heatmap", $("show-heatmap").checked));
  $("show-correction").addEventListener("change", () => viewer.setShow("correction", $("show-correction").checked));
  $("image-select").addEventListener("change", () => showImage(Number($("image-select").value)));
  $("draw-start").addEventListener("click", () => setDrawing(true));
  $("draw-undo").addEventListener("click", () => viewer.undoStroke());
  $("draw-cancel").addEventListener("click", () => setDrawing(false));
  $("draw-save").addEventListener("click", saveDrawing);
  bindSplitter();
  window.addEventListener("hashchange", routeFromHash);
  document.addEventListener("keydown", onKey);
  start();
});
