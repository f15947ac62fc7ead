// Live editing over the websocket: slider states out (flow-controlled, newest wins), previews and history in.

// States sent but not yet answered; further input waits as one pending (newest) state. One is best where the
// render dominates the round trip (loopback, LAN): a second state in flight only queues behind the first
// (benchmarks/ui_latency.py, 128² on CPU: drag p50 66 ms at 22 fps with one, 100-150 ms at 12-17 fps with two).
const MAX_IN_FLIGHT = 1;
const STALL_MS = 4_000; // a state unanswered this long is given up on (e.g. its error had no seq)
const BEFORE_TIMEOUT_MS = 10_000;

function sameValues(a, b) {
  const keys = new Set([...Object.keys(a), ...Object.keys(b)]);
  for (const key of keys) if ((a[key] ?? 0) !== (b[key] ?? 0)) return false;
  return true;
}

function nonZero(values) {
  return Object.fromEntries(Object.entries(values).filter(([, value]) => value !== 0));
}

/**
 * Sends slider states and undo/redo over a SessionSocket and paints the answers with a PreviewPainter.
 * Events: "values" (detail: slider values decided by the server, after undo/redo), "history"
 * (detail: { canUndo, canRedo }), "settled" (detail: boolean, whether the newest state is painted).
 */
export class LiveEditor extends EventTarget {
  constructor(socket, painter) {
    super();
    this.socket = socket;
    this.painter = painter;
    this.seq = 0;
    this.current = {}; // the newest slider state (non-zero values only)
    this.committed = {}; // the newest state recorded in the server's undo history
    this.pending = null; // { inputAt, firstInputAt } when the newest state is not sent yet
    this.firstUnpaintedInputAt = null;
    this.inFlight = new Map(); // seq -> { role, sentAt, inputAt, firstInputAt }
    this.canUndo = false;
    this.canRedo = false;
    this.active = false;
    this.beforeWaiter = null;
    painter.onPainted = () => this.updateSettled();
    this.onFrame = (event) => this.handleFrame(event.detail);
    this.onMessage = (event) => this.handleMessage(event.detail);
    this.onUp = () => this.resync();
    socket.addEventListener("frame", this.onFrame);
    socket.addEventListener("message", this.onMessage);
    socket.addEventListener("up", this.onUp);
    this.watchdog = setInterval(() => this.dropStalled(), 1_000);
  }

  /** Begin editing from the server's slider state: fetch the unedited frame, then show the current state. */
  async start(serverState) {
    this.active = true;
    this.current = this.committed = nonZero(serverState.sliders ?? {});
    this.setHistory(Boolean(serverState.can_undo), Boolean(serverState.can_redo));
    await this.requestBefore();
    if (Object.keys(this.current).length > 0) this.sendState(this.current, { commit: false });
  }

  /** Stop listening (the editor closed). */
  stop() {
    this.active = false;
    clearInterval(this.watchdog);
    this.socket.removeEventListener("frame", this.onFrame);
    this.socket.removeEventListener("message", this.onMessage);
    this.socket.removeEventListener("up", this.onUp);
  }

  /** A slider moved: remember the newest state and send it as soon as the flow control allows. */
  input(values) {
    const now = performance.now();
    this.current = nonZero(values);
    this.firstUnpaintedInputAt ??= now;
    this.pending = { inputAt: now, firstInputAt: this.firstUnpaintedInputAt };
    this.pump();
  }

  /** A slider was released (or typed in, reset): send the state and record it in the undo history. */
  commit(values) {
    const now = performance.now();
    this.current = nonZero(values);
    this.firstUnpaintedInputAt ??= now;
    const timing = { inputAt: now, firstInputAt: this.firstUnpaintedInputAt };
    this.pending = null;
    if (sameValues(this.current, this.committed)) {
      this.sendState(this.current, { commit: false, timing });
      return;
    }
    // The server records the state it holds *before* a commit as the undo step. While dragging it holds the
    // dragged (uncommitted) state, so first put back the last committed one, without showing its frame.
    this.sendState(this.committed, { commit: false, role: "silent" });
    this.sendState(this.current, { commit: true, timing });
    this.committed = this.current;
    this.setHistory(true, false);
  }

  /** Undo (or redo) one committed state; the server answers with the values and a frame. */
  history(action) {
    if (!this.active) return;
    const seq = this.nextSeq();
    if (this.socket.send({ type: action, seq })) {
      const now = performance.now();
      this.inFlight.set(seq, { role: "after", sentAt: now, inputAt: now, firstInputAt: now });
      this.pending = null;
      this.updateSettled();
    }
  }

  /** Send the pending state now, ignoring the flow control (e.g. before finalizing). */
  flush() {
    if (!this.pending) return;
    const timing = this.pending;
    this.pending = null;
    this.sendState(this.current, { commit: false, timing });
  }

  /** Resolve true once the newest state is painted (the server then holds it), false after ``timeoutMs``. */
  whenSettled(timeoutMs) {
    if (this.settled) return Promise.resolve(true);
    return new Promise((resolve) => {
      const listener = (event) => {
        if (!event.detail) return;
        clearTimeout(timer);
        this.removeEventListener("settled", listener);
        resolve(true);
      };
      const timer = setTimeout(() => {
        this.removeEventListener("settled", listener);
        resolve(false);
      }, timeoutMs);
      this.addEventListener("settled", listener);
    });
  }

  /** Whether the newest state has been painted and nothing is on its way. */
  get settled() {
    const visible = [...this.inFlight.values()].some((entry) => entry.role !== "silent" && entry.role !== "before");
    return !this.pending && !visible && this.painter.decoding === 0 && this.painter.paintedSeq === this.painter.newestSeq;
  }

  nextSeq() {
    this.seq = (this.seq + 1) % 2 ** 31;
    return this.seq;
  }

  requestBefore() {
    const role = Object.keys(this.current).length === 0 ? "both" : "before";
    const seq = this.sendState({}, { commit: false, role });
    if (seq === null) return Promise.resolve();
    return new Promise((resolve) => {
      const timer = setTimeout(resolve, BEFORE_TIMEOUT_MS);
      this.beforeWaiter = { seq, resolve: () => { clearTimeout(timer); resolve(); } };
    });
  }

  sendState(values, { commit, role = "after", timing = null }) {
    const seq = this.nextSeq();
    if (!this.socket.send({ type: "sliders", seq, values, commit })) return null; // resent on reconnect
    const now = performance.now();
    const time = timing ?? { inputAt: now, firstInputAt: now };
    this.inFlight.set(seq, { role, sentAt: now, ...time });
    if (role === "after" || role === "both") this.firstUnpaintedInputAt = null;
    this.updateSettled();
    return seq;
  }

  pump() {
    if (!this.pending || !this.active) return;
    const visible = [...this.inFlight.values()].filter((entry) => entry.role !== "silent").length;
    if (visible >= MAX_IN_FLIGHT) return;
    const timing = this.pending;
    this.pending = null;
    this.sendState(this.current, { commit: false, timing });
  }

  handleFrame(frame) {
    if (frame.kind !== "preview") return;
    const entry = this.inFlight.get(frame.seq);
    for (const seq of [...this.inFlight.keys()]) if (seq <= frame.seq) this.inFlight.delete(seq); // answered or superseded
    const role = entry ? entry.role : "after";
    if (role !== "silent") {
      const timing = entry ? { inputAt: entry.inputAt, firstInputAt: entry.firstInputAt } : null;
      this.painter
        .accept(frame, { asAfter: role !== "before", asBefore: role === "before" || role === "both", timing })
        .then(() => this.updateSettled());
    }
    if (this.beforeWaiter && frame.seq >= this.beforeWaiter.seq) {
      this.beforeWaiter.resolve();
      this.beforeWaiter = null;
    }
    this.pump();
    this.updateSettled();
  }

  handleMessage(message) {
    if (message.type === "sliders") {
      this.current = this.committed = nonZero(message.values ?? {});
      this.setHistory(Boolean(message.can_undo), Boolean(message.can_redo));
      this.dispatchEvent(new CustomEvent("values", { detail: { ...this.current } }));
    } else if (message.type === "error" && message.seq !== null && message.seq !== undefined) {
      this.inFlight.delete(message.seq);
      if (this.beforeWaiter && message.seq === this.beforeWaiter.seq) {
        this.beforeWaiter.resolve();
        this.beforeWaiter = null;
      }
      this.pump();
      this.updateSettled();
    }
  }

  /** After a reconnect: answers of the old connection will not come; resend the newest state. */
  resync() {
    this.inFlight.clear();
    if (!this.active) return;
    if (!this.painter.before) {
      this.requestBefore().then(() => {
        if (Object.keys(this.current).length > 0) this.sendState(this.current, { commit: false });
      });
      return;
    }
    this.sendState(this.current, { commit: false });
  }

  dropStalled() {
    const limit = performance.now() - STALL_MS;
    let dropped = false;
    for (const [seq, entry] of this.inFlight) {
      if (entry.sentAt < limit) {
        this.inFlight.delete(seq);
        dropped = true;
      }
    }
    if (dropped) {
      this.pump();
      this.updateSettled();
    }
  }

  setHistory(canUndo, canRedo) {
    this.canUndo = canUndo;
    this.canRedo = canRedo;
    this.dispatchEvent(new CustomEvent("history", { detail: { canUndo, canRedo } }));
  }

  updateSettled() {
    const settled = this.settled;
    if (this.painter.canvas.dataset.settled !== String(settled)) {
      this.painter.canvas.dataset.settled = String(settled);
      this.dispatchEvent(new CustomEvent("settled", { detail: settled }));
    }
  }
}
