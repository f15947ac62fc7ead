// The session token lives in sessionStorage: a reload of this tab resumes the session, other tabs cannot see it.

const CURRENT_KEY = "fluidsrv.session";
const FACES_KEY = "fluidsrv.faces";
const MAX_REMEMBERED_FACES = 12;

function read(key, fallback) {
  try {
    const raw = sessionStorage.getItem(key);
    return raw ? JSON.parse(raw) : fallback;
  } catch {
    return fallback; // storage disabled or garbage: behave as if empty
  }
}

function write(key, value) {
  try {
    sessionStorage.setItem(key, JSON.stringify(value));
  } catch {
    // private mode with no storage: the session simply will not survive a reload
  }
}

/** The current session { sessionId, token, filename } or null. */
export function loadCurrent() {
  const value = read(CURRENT_KEY, null);
  return value && typeof value.sessionId === "string" && typeof value.token === "string" ? value : null;
}

/** Remember the current session. */
export function saveCurrent(sessionId, token, filename = null) {
  write(CURRENT_KEY, { sessionId, token, filename });
}

/** Forget the current session (it expired, was deleted or the user started over). */
export function clearCurrent() {
  try {
    sessionStorage.removeItem(CURRENT_KEY);
  } catch {
    // nothing stored
  }
}

/** Prepared faces of this tab, newest first: [{ sessionId, token, label }] (the latent tools use them). */
export function rememberedFaces() {
  const faces = read(FACES_KEY, []);
  return Array.isArray(faces) ? faces : [];
}

/** Add a prepared face to the tab's list (deduplicated by session). */
export function rememberFace(sessionId, token, label) {
  const others = rememberedFaces().filter((face) => face.sessionId !== sessionId);
  write(FACES_KEY, [{ sessionId, token, label }, ...others].slice(0, MAX_REMEMBERED_FACES));
}

/** Drop a face whose session is gone. */
export function forgetFace(sessionId) {
  write(FACES_KEY, rememberedFaces().filter((face) => face.sessionId !== sessionId));
}
