// The REST client: one method per server route, errors turned into ApiError with the server's code.

/** A refused or failed request: HTTP status (0 for a network failure), the server's code and message. */
export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
  }
}

/** Talks to the fluidsrv REST API; session routes carry the session's bearer token. */
export class Api {
  constructor(base = "") {
    this.base = base;
  }

  /** Send a request and return the Response, or throw ApiError for a network failure or an error status. */
  async request(method, path, { json, body, token, headers = {} } = {}) {
    const init = { method, headers: { ...headers } };
    if (json !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(json);
    } else if (body !== undefined) {
      init.body = body;
    }
    if (token) init.headers.Authorization = `Bearer ${token}`;
    let response;
    try {
      response = await fetch(this.base + path, init);
    } catch (error) {
      throw new ApiError(0, "network", `the server could not be reached (${error.message})`);
    }
    if (!response.ok) throw await errorFrom(response);
    return response;
  }

  /** GET a JSON document. */
  async getJson(path, token) {
    return (await this.request("GET", path, { token })).json();
  }

  /** POST a JSON body and return the JSON answer. */
  async postJson(path, json, token) {
    return (await this.request("POST", path, { json, token })).json();
  }

  /** Whether a route exists: anything but 404 (405 means it exists for other methods). */
  async exists(path) {
    try {
      const response = await fetch(this.base + path, { method: "GET" });
      return response.status !== 404;
    } catch {
      return false;
    }
  }

  config() { return this.getJson("/api/config"); }
  directions() { return this.getJson("/api/directions"); }

  /** Upload a photo (multipart field "file"); returns the new session with its token and faces. */
  async createSession(file) {
    const form = new FormData();
    form.append("file", file, file.name || "photo");
    return (await this.request("POST", "/api/sessions", { body: form })).json();
  }

  getSession(id, token, { thumbnails = false } = {}) {
    return this.getJson(`/api/sessions/${id}${thumbnails ? "?thumbnails=1" : ""}`, token);
  }

  chooseFace(id, token, index) { return this.postJson(`/api/sessions/${id}/face`, { index }, token); }
  finalize(id, token) { return this.postJson(`/api/sessions/${id}/finalize`, {}, token); }

  async resultBlob(id, token) { return (await this.request("GET", `/api/sessions/${id}/result`, { token })).blob(); }
  async originalBlob(id, token) { return (await this.request("GET", `/api/sessions/${id}/original`, { token })).blob(); }

  async deleteSession(id, token) { await this.request("DELETE", `/api/sessions/${id}`, { token }); }

  /** SeFa directions of a layer range, added as sliders of this session. */
  sefa(id, token, layers, k) { return this.postJson(`/api/sessions/${id}/directions/sefa`, { layers, k }, token); }

  /** A direction from a text prompt (CLIP), added as a slider of this session. */
  textDirection(id, token, prompt, layers) {
    return this.postJson(`/api/sessions/${id}/directions/text`, { prompt, layers }, token);
  }

  /** The latent tools. */
  tools() { return this.getJson("/api/tools"); }
  async toolBlob(name, json) { return (await this.request("POST", `/api/tools/${name}`, { json })).blob(); }
}

async function errorFrom(response) {
  let code = `http_${response.status}`;
  let message = response.statusText || "request failed";
  try {
    const data = await response.json();
    if (data && data.error) {
      code = data.error.code || code;
      message = data.error.message || message;
    }
  } catch {
    // not JSON (a proxy's error page): keep the status text
  }
  return new ApiError(response.status, code, message);
}
