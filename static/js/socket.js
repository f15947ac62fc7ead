// The per-session websocket: JSON events and binary frames in, JSON messages out, reconnecting when dropped.

const FRAME_HEADER_BYTES = 8; // "FS", kind, format, big-endian uint32 seq
const FRAME_KINDS = { 1: "preview", 2: "progress" };
const FRAME_TYPES = { 1: "image/webp", 2: "image/jpeg" };
const PING_INTERVAL_MS = 25_000;
const RECONNECT_DELAYS_MS = [300, 1_000, 2_000, 4_000, 8_000];
/** Close codes after which reconnecting cannot help: 4000 + HTTP status of the session error, 4410 deleted. */
const FINAL_CLOSE_CODES = new Set([4400, 4401, 4404, 4410, 4429]);

/** Decode a binary frame into { kind, seq, blob }; throws on anything that is not a fluidsrv frame. */
export function decodeFrame(buffer) {
  const view = new DataView(buffer);
  if (buffer.byteLength < FRAME_HEADER_BYTES || view.getUint8(0) !== 0x46 || view.getUint8(1) !== 0x53) {
    throw new Error("not a fluidsrv frame");
  }
  const kind = FRAME_KINDS[view.getUint8(2)];
  const type = FRAME_TYPES[view.getUint8(3)];
  if (!kind || !type) throw new Error("unknown frame kind or format");
  return { kind, seq: view.getUint32(4, false), blob: new Blob([buffer.slice(FRAME_HEADER_BYTES)], { type }) };
}

/**
 * A reconnecting websocket of one session. Events (on this EventTarget):
 * "message" (detail: a JSON event from the server), "frame" (detail: a decoded frame),
 * "up" (connected), "down" (dropped, will retry; detail: seconds until the next try),
 * "gone" (detail: { code, reason }: the server refused the session; no retry).
 */
export class SessionSocket extends EventTarget {
  constructor(sessionId, token) {
    super();
    this.sessionId = sessionId;
    this.token = token;
    this.socket = null;
    this.attempt = 0;
    this.closedByUs = false;
    this.lastError = null;
    this.pingTimer = null;
    this.retryTimer = null;
  }

  /** Open the connection (again). */
  connect() {
    this.closedByUs = false;
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const url = `${scheme}//${location.host}/api/sessions/${encodeURIComponent(this.sessionId)}/ws?token=${encodeURIComponent(this.token)}`;
    const socket = new WebSocket(url);
    socket.binaryType = "arraybuffer";
    socket.addEventListener("open", () => {
      this.attempt = 0;
      this.pingTimer = setInterval(() => this.send({ type: "ping" }), PING_INTERVAL_MS);
      this.dispatchEvent(new CustomEvent("up"));
    });
    socket.addEventListener("message", (event) => this.onMessage(event.data));
    socket.addEventListener("close", (event) => this.onClose(event));
    this.socket = socket;
  }

  /** Whether messages can be sent now. */
  get isOpen() {
    return this.socket !== null && this.socket.readyState === WebSocket.OPEN;
  }

  /** Resolve true once the socket is open, false after ``timeoutMs``. */
  whenOpen(timeoutMs) {
    if (this.isOpen) return Promise.resolve(true);
    return new Promise((resolve) => {
      const done = (value) => {
        clearTimeout(timer);
        this.removeEventListener("up", onUp);
        resolve(value);
      };
      const onUp = () => done(true);
      const timer = setTimeout(() => done(false), timeoutMs);
      this.addEventListener("up", onUp);
    });
  }

  /** Send a JSON message; returns false when the socket is not open (the caller resends on "up"). */
  send(message) {
    if (!this.isOpen) return false;
    this.socket.send(JSON.stringify(message));
    return true;
  }

  /** Close for good (no reconnect). */
  close() {
    this.closedByUs = true;
    clearTimeout(this.retryTimer);
    clearInterval(this.pingTimer);
    if (this.socket) this.socket.close(1000, "client left");
    this.socket = null;
  }

  onMessage(data) {
    if (typeof data === "string") {
      let parsed;
      try {
        parsed = JSON.parse(data);
      } catch {
        return;
      }
      if (parsed.type === "error" && FINAL_ERROR_CODES.has(parsed.code)) this.lastError = parsed;
      this.dispatchEvent(new CustomEvent("message", { detail: parsed }));
      return;
    }
    try {
      this.dispatchEvent(new CustomEvent("frame", { detail: decodeFrame(data) }));
    } catch (error) {
      console.warn("dropped a binary message:", error);
    }
  }

  onClose(event) {
    clearInterval(this.pingTimer);
    this.socket = null;
    if (this.closedByUs) return;
    if (FINAL_CLOSE_CODES.has(event.code)) {
      const code = this.lastError ? this.lastError.code : "unknown_session";
      this.dispatchEvent(new CustomEvent("gone", { detail: { code, message: this.lastError?.message ?? event.reason } }));
      return;
    }
    const delay = RECONNECT_DELAYS_MS[Math.min(this.attempt, RECONNECT_DELAYS_MS.length - 1)];
    this.attempt += 1;
    this.dispatchEvent(new CustomEvent("down", { detail: delay / 1000 }));
    this.retryTimer = setTimeout(() => this.connect(), delay);
  }
}

const FINAL_ERROR_CODES = new Set(["unknown_session", "bad_token", "session_deleted", "session_error", "too_many_sessions", "too_many_sockets"]);
