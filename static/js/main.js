// The app's controller: views (upload → faces → progress → editor → result, and tools), wiring, errors.

import { Api, ApiError } from "./api.js";
import { Action, explain } from "./errors.js";
import { renderFaces } from "./faces.js";
import { IdentityMeter } from "./identity.js";
import { LiveEditor } from "./live.js";
import { hasTextDirections, setUpPromptPanel, setUpSefaPanel } from "./panels.js";
import { setUpPresets } from "./presets.js";
import { PreviewPainter, paintProgressFrame } from "./preview.js";
import { ProgressView } from "./progress.js";
import { SliderPanel } from "./sliders.js";
import { SessionSocket } from "./socket.js";
import * as storage from "./storage.js";
import { setUpTools } from "./tools.js";

const $ = (id) => document.getElementById(id);
const VIEWS = ["upload", "faces", "progress", "editor", "result", "tools"];
const FLUSH_BEFORE_FINALIZE_MS = 5_000;
const SOCKET_OPEN_WAIT_MS = 3_000;

const api = new Api();
const app = {
  config: null,
  directions: [],
  session: null, // the server's session dict (GET /api/sessions/{id})
  token: null,
  filename: null,
  photoUrl: null,
  resultUrl: null,
  resultBack: "editor", // where the result view's back button goes: the editor, or the faces after a preset
  socket: null,
  live: null,
  view: "upload",
  flowView: "upload", // the last non-tools view, where the Editor tab returns to
  finalizing: false,
  refreshTools: null,
  progressPaint: {},
};

const painter = new PreviewPainter($("preview"), $("preview-caption"));
const progressView = new ProgressView($("progress-steps"), $("progress-message"));
const identity = new IdentityMeter($("identity"));
const sliders = new SliderPanel($("slider-panel"), {
  onInput: (values) => app.live?.input(values),
  onCommit: (values) => app.live?.commit(values),
});

// ---- views and notices ------------------------------------------------------------------------------

function showView(name, { focus = true } = {}) {
  for (const view of VIEWS) $(`view-${view}`).hidden = view !== name;
  app.view = name;
  if (name !== "tools") app.flowView = name;
  for (const [tab, active] of [[$("nav-editor"), name !== "tools"], [$("nav-tools"), name === "tools"]]) {
    if (active) tab.setAttribute("aria-current", "page");
    else tab.removeAttribute("aria-current");
  }
  $("new-photo").hidden = name === "upload" || !app.session;
  document.body.dataset.view = name;
  if (focus) focusView(name);
}

function focusView(name) {
  const target = {
    upload: () => $("file-input"),
    faces: () => $("face-list").querySelector("button"),
    progress: () => $("progress-title"),
    editor: () => sliders.firstInput() ?? $("finalize"),
    result: () => $("download"),
    tools: () => $("tools-title"),
  }[name]();
  if (target && !target.hasAttribute("tabindex") && !/^(INPUT|BUTTON|A|SELECT)$/.test(target.tagName)) {
    target.tabIndex = -1;
  }
  target?.focus({ preventScroll: false });
}

let noticeAction = null;

/** Show an error plainly: what happened, what to do, and a button that does it. */
function showNotice(error, { retry = null } = {}) {
  const { title, advice, action } = explain(error);
  $("notice-title").textContent = title;
  $("notice-advice").textContent = advice;
  const button = $("notice-action");
  noticeAction = null;
  if (action === Action.UPLOAD) {
    button.textContent = "Choose another photo";
    noticeAction = () => startOver();
  } else if (action === Action.FACES && app.session) {
    button.textContent = "Pick a face";
    noticeAction = () => showFaces();
  } else if (action === Action.RETRY && retry) {
    button.textContent = "Try again";
    noticeAction = retry;
  }
  button.hidden = noticeAction === null;
  $("notice").dataset.code = error.code ?? "";
  $("notice").hidden = false;
}

function hideNotice() {
  $("notice").hidden = true;
  noticeAction = null;
}

function isSessionGone(error) {
  return error instanceof ApiError && (error.status === 401 || error.status === 404) && app.session !== null;
}

/** Handle a failed request: a vanished session starts over, anything else becomes a notice. */
function handleError(error, retry = null) {
  if (isSessionGone(error)) {
    sessionGone(error);
    return;
  }
  if (!(error instanceof ApiError)) console.error(error);
  showNotice(error, { retry });
}

function setEditorStatus(text) {
  $("editor-status").textContent = text;
}

// ---- upload ------------------------------------------------------------------------------------------

function describeLimits() {
  const limits = app.config?.limits;
  if (!limits) return;
  const megabytes = Math.floor(limits.max_upload_bytes / 2 ** 20);
  const megapixels = Math.floor(limits.max_pixels / 1e6);
  $("upload-limits").textContent = `JPEG, PNG or WebP, up to ${megabytes} MiB and ${megapixels} megapixels.`;
}

async function handleFile(file) {
  if (!file) return;
  hideNotice();
  const limits = app.config?.limits;
  if (limits && file.size > limits.max_upload_bytes) {
    showNotice({ code: "upload_too_large", message: `this file is ${(file.size / 2 ** 20).toFixed(1)} MiB` });
    return;
  }
  if (file.type && !file.type.startsWith("image/")) {
    showNotice({ code: "unsupported_type", message: `${file.name} is ${file.type}` });
    return;
  }
  showView("upload", { focus: false });
  $("upload-status").textContent = "Uploading and looking for faces…";
  $("file-input").disabled = true;
  try {
    const created = await api.createSession(file);
    closeSession();
    app.session = created;
    app.token = created.token;
    app.filename = file.name || "photo";
    storage.saveCurrent(created.session_id, created.token, app.filename);
    setPhoto(URL.createObjectURL(file));
    $("upload-status").textContent = "";
    showFaces();
  } catch (error) {
    $("upload-status").textContent = "";
    handleError(error, () => handleFile(file));
  } finally {
    $("file-input").disabled = false;
    $("file-input").value = "";
  }
}

function setPhoto(url) {
  if (app.photoUrl) URL.revokeObjectURL(app.photoUrl);
  app.photoUrl = url;
  $("photo").src = url;
}

function wireUpload() {
  $("file-input").addEventListener("change", (event) => handleFile(event.target.files[0]));
  const zone = $("dropzone");
  const accepts = () => app.view === "upload" || app.view === "faces";
  window.addEventListener("dragover", (event) => {
    event.preventDefault(); // never let the browser navigate to a dropped file
    if (accepts()) zone.classList.add("dragging");
  });
  window.addEventListener("dragleave", (event) => {
    if (event.target === zone || !zone.contains(event.relatedTarget)) zone.classList.remove("dragging");
  });
  window.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    if (accepts()) handleFile(event.dataTransfer?.files?.[0]);
  });
}

// ---- faces and preparing ---------------------------------------------------------------------------

function showFaces() {
  const session = app.session;
  renderFaces({ boxes: $("face-boxes"), list: $("face-list") }, session, pickFace);
  const count = session.faces.length;
  $("faces-hint").textContent = count === 1
    ? "One face found. Select it to start editing."
    : `${count} faces found. Select the one you want to edit.`;
  showView("faces");
}

async function pickFace(index) {
  hideNotice();
  openSocket(); // before the job starts, so that its first progress events and frames arrive
  await app.socket.whenOpen(SOCKET_OPEN_WAIT_MS);
  try {
    app.session = await api.chooseFace(app.session.session_id, app.token, index);
  } catch (error) {
    handleError(error, () => pickFace(index));
    return;
  }
  showProgress();
}

function showProgress() {
  progressView.reset();
  const canvas = $("progress-frame");
  canvas.width = canvas.height = 1;
  showView("progress");
  openSocket();
}

function openSocket() {
  if (app.socket) return;
  const socket = new SessionSocket(app.session.session_id, app.token);
  socket.addEventListener("message", (event) => onSocketMessage(event.detail));
  socket.addEventListener("frame", (event) => {
    if (event.detail.kind === "progress" && app.view === "progress") {
      paintProgressFrame($("progress-frame"), event.detail, app.progressPaint);
    }
  });
  socket.addEventListener("up", () => { $("connection").hidden = true; });
  socket.addEventListener("down", (event) => {
    $("connection").textContent = `The connection to the server was lost. Reconnecting in ${event.detail} s…`;
    $("connection").hidden = false;
  });
  socket.addEventListener("gone", (event) => sessionGone(event.detail));
  app.socket = socket;
  socket.connect();
}

function onSocketMessage(message) {
  switch (message.type) {
    case "state":
    case "ready":
      onSessionState(message);
      break;
    case "progress":
      if (app.view === "progress") progressView.update(message);
      else if (app.finalizing) setEditorStatus(`Finalizing: ${message.message || message.stage} (${message.step}/${message.total})`);
      break;
    case "error":
      onSocketError(message);
      break;
    case "identity":
      identity.show(message);
      break;
    default:
      break;
  }
}

function onSessionState(message) {
  const { type, ...session } = message;
  app.session = { ...app.session, ...session };
  if (session.identity) identity.setReport(session.identity);
  const status = app.session.status;
  if (status === "ready" && app.view === "progress") enterEditor();
  else if (["failed", "interrupted", "cancelled"].includes(status) && app.view === "progress") {
    showFaces();
    showNotice({ code: status === "failed" ? "prepare_failed" : status, message: app.session.error ?? "" });
  } else if (type === "state" && status === "preparing" && app.session.progress) {
    progressView.update(app.session.progress);
  }
}

function onSocketError(message) {
  if (message.code === "prepare_failed") {
    showFaces();
    showNotice(message);
  } else if (message.code === "preview_failed") {
    setEditorStatus(`A preview failed: ${message.message}`);
  } else if (!["not_ready", "rate_limited", "superseded", "unknown_session", "bad_token", "session_deleted"].includes(message.code)) {
    console.warn("server error event", message);
  }
}

// ---- editor --------------------------------------------------------------------------------------------

function enterEditor() {
  progressView.finish();
  const session = app.session;
  storage.rememberFace(session.session_id, app.token, `${app.filename ?? "photo"} · face ${(session.face_index ?? 0) + 1}`);
  sliders.setDirections(app.directions); // the shared sliders, then the ones this session added
  sliders.addDirections(session.custom_directions ?? []);
  sliders.setValues(session.sliders ?? {});
  if (!app.live) {
    painter.clear();
    identity.clear();
    app.live = new LiveEditor(app.socket, painter);
    app.live.addEventListener("values", (event) => sliders.setValues(event.detail));
    app.live.addEventListener("history", (event) => {
      $("undo").disabled = !event.detail.canUndo;
      $("redo").disabled = !event.detail.canRedo;
    });
    app.live.start(session);
  }
  setEditorStatus("");
  showView("editor");
}

function setComparing(showing) {
  if (!app.live) return;
  painter.setShowingBefore(showing);
  $("compare").setAttribute("aria-pressed", String(showing));
}

async function finalize() {
  if (!app.live || app.finalizing) return;
  hideNotice();
  app.finalizing = true;
  const buttons = [$("finalize"), $("undo"), $("redo"), $("reset-all")];
  const wasDisabled = buttons.map((button) => button.disabled);
  buttons.forEach((button) => { button.disabled = true; });
  setEditorStatus("Finalizing: rendering the face at full quality and pasting it into the photo…");
  try {
    app.live.flush();
    await app.live.whenSettled(FLUSH_BEFORE_FINALIZE_MS); // the server holds the newest slider state
    const finalized = await api.finalize(app.session.session_id, app.token);
    showResult(await api.resultBlob(app.session.session_id, app.token));
    showFinalIdentity(finalized.identity?.final);
    setEditorStatus("");
  } catch (error) {
    setEditorStatus("");
    handleError(error, () => finalize());
  } finally {
    app.finalizing = false;
    buttons.forEach((button, index) => { button.disabled = wasDisabled[index]; });
  }
}

function showFinalIdentity(reading) {
  $("result-identity").hidden = !reading;
  if (reading) {
    const verdict = reading.same_person ? "still the same person" : "past the same-person threshold";
    $("result-identity").textContent = `Identity drift ${reading.distance.toFixed(2)} (threshold ${reading.threshold}): ${verdict}.`;
  }
}

/** Show a preset's result; "Back" returns to the photo's faces (nothing was prepared). */
function showPresetResult(blob, preset) {
  showResult(blob, { suffix: preset.name, back: "faces" });
  $("result-identity").hidden = true;
}

function showResult(blob, { suffix = "edited", back = "editor" } = {}) {
  app.resultBack = back;
  $("back-to-editor").textContent = back === "editor" ? "Keep editing" : "Back to the photo";
  if (app.resultUrl) URL.revokeObjectURL(app.resultUrl);
  app.resultUrl = URL.createObjectURL(blob);
  const image = $("result");
  image.onload = () => {
    $("result-size").textContent =
      `${image.naturalWidth} × ${image.naturalHeight} pixels, ${(blob.size / 1024).toFixed(0)} KiB (JPEG, full resolution)`;
  };
  image.src = app.resultUrl;
  const link = $("download");
  link.href = app.resultUrl;
  link.download = `${(app.filename ?? "photo").replace(/\.[^.]*$/, "") || "photo"}-${suffix}.jpg`;
  showView("result");
}

function wireEditor() {
  $("undo").addEventListener("click", () => app.live?.history("undo"));
  $("redo").addEventListener("click", () => app.live?.history("redo"));
  $("reset-all").addEventListener("click", () => sliders.resetAll());
  $("finalize").addEventListener("click", () => finalize());
  $("compare").addEventListener("click", () => setComparing($("compare").getAttribute("aria-pressed") !== "true"));
  $("back-to-editor").addEventListener("click", () => showView(app.resultBack ?? "editor"));
  $("progress-other-face").addEventListener("click", () => {
    closeSession(); // the server cancels the job when its last client leaves
    showFaces();
  });

  const typing = (target) => target instanceof HTMLElement &&
    (target.isContentEditable || (target.tagName === "INPUT" && target.type !== "range") || target.tagName === "TEXTAREA");
  window.addEventListener("keydown", (event) => {
    if (app.view !== "editor" || typing(event.target)) return;
    const key = event.key.toLowerCase();
    const modifier = event.ctrlKey || event.metaKey;
    if (modifier && key === "z") {
      event.preventDefault();
      app.live?.history(event.shiftKey ? "redo" : "undo");
    } else if (modifier && key === "y") {
      event.preventDefault();
      app.live?.history("redo");
    } else if (key === "b" && !modifier && !event.altKey && !event.repeat) {
      setComparing(true);
    }
  });
  window.addEventListener("keyup", (event) => {
    if (event.key.toLowerCase() === "b" && app.view === "editor") setComparing(false);
  });
  window.addEventListener("blur", () => { if (app.view === "editor") setComparing(false); });
}

// ---- session lifetime ------------------------------------------------------------------------------

/** Stop the socket and the live editor of the current session (the session itself stays on the server). */
function closeSession() {
  app.live?.stop();
  app.live = null;
  app.socket?.close();
  app.socket = null;
  $("connection").hidden = true;
  setComparing(false);
}

function startOver() {
  closeSession();
  storage.clearCurrent();
  app.session = null;
  app.token = null;
  hideNotice();
  showView("upload");
}

/** The session expired, was deleted or its token is refused: say so and start over. */
function sessionGone(error) {
  const id = app.session?.session_id;
  if (id) storage.forgetFace(id);
  startOver();
  showNotice({ code: error.code === "bad_token" ? "bad_token" : "unknown_session", message: error.message ?? "" });
}

async function resume() {
  const stored = storage.loadCurrent();
  if (!stored) {
    showView("upload");
    return;
  }
  app.token = stored.token;
  app.filename = stored.filename;
  try {
    app.session = await api.getSession(stored.sessionId, stored.token, { thumbnails: true });
    setPhoto(URL.createObjectURL(await api.originalBlob(stored.sessionId, stored.token)));
  } catch (error) {
    if (error instanceof ApiError && (error.status === 401 || error.status === 404)) {
      app.session = { session_id: stored.sessionId };
      sessionGone(error);
    } else {
      showView("upload");
      handleError(error, () => resume());
    }
    return;
  }
  const status = app.session.status;
  if (status === "ready") {
    openSocket();
    enterEditor();
  } else if (status === "preparing") {
    showProgress();
  } else {
    showFaces();
    if (["failed", "interrupted", "cancelled"].includes(status)) {
      showNotice({ code: status === "failed" ? "prepare_failed" : status, message: app.session.error ?? "" });
    }
  }
}

// ---- boot --------------------------------------------------------------------------------------------

async function boot() {
  wireUpload();
  wireEditor();
  $("notice-dismiss").addEventListener("click", hideNotice);
  $("notice-action").addEventListener("click", () => {
    const action = noticeAction;
    hideNotice();
    action?.();
  });
  $("new-photo").addEventListener("click", startOver);
  $("nav-editor").addEventListener("click", () => showView(app.flowView));
  $("nav-tools").addEventListener("click", () => {
    app.refreshTools?.();
    showView("tools");
  });
  await loadServerInfo();
}

/** Say which asked-for slider sources give nothing on this server, and what to run (e.g. named sliders). */
function describeMissingSliders(unavailable) {
  const hint = $("sliders-missing");
  const reasons = Object.entries(unavailable).map(([source, reason]) => `${source}: ${reason}`);
  hint.textContent = reasons.length ? `Some sliders are not available. ${reasons.join(" ")}` : "";
  hint.hidden = reasons.length === 0;
}

async function loadServerInfo() {
  try {
    [app.config, app.directions] = await Promise.all([api.config(), api.directions().then((body) => body.directions)]);
  } catch (error) {
    showView("upload");
    showNotice(error, { retry: () => loadServerInfo() });
    return;
  }
  describeLimits();
  describeMissingSliders(app.config.directions_unavailable ?? {});
  sliders.setDirections(app.directions);
  const report = (text) => setEditorStatus(text);
  const addSliders = (directions, group) => sliders.addDirections(directions, group);
  const currentSession = () => ({ id: app.session?.session_id, token: app.token });
  setUpSefaPanel({
    api, panel: $("sefa-panel"), numWs: app.config.generator.num_ws, addSliders, report,
    features: app.config.features, currentSession,
  });
  if (hasTextDirections(app.config)) {
    setUpPromptPanel({ api, form: $("prompt-panel"), addSliders, report, currentSession });
  }
  setUpPresets({
    api, panel: $("preset-panel"), onResult: showPresetResult, onError: handleError,
    report: (text) => { $("preset-status").textContent = text; },
    photo: async () => ({ blob: await api.originalBlob(app.session.session_id, app.token), name: app.filename }),
  });
  setUpTools({ api, report: (text) => { $("tools-status").textContent = text; } }).then((refresh) => {
    app.refreshTools = refresh;
    $("nav-tools").hidden = refresh === null;
  });
  await resume();
  document.body.dataset.booted = "true";
}

boot();
