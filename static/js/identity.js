// The identity meter: how far the edited face has drifted from the person in the photo (the distance of two face
// embeddings, measured by the server a few times a second while a slider moves), with a marker at the embedder's
// same-person threshold.

const SCALE = 2; // the bar spans 0 … SCALE × threshold, so the threshold marker sits half way

export class IdentityMeter {
  /** ``root`` holds a ``[role=meter]`` track with a ``.identity-fill`` and a ``.identity-marker``, and a value text. */
  constructor(root) {
    this.root = root;
    this.track = root.querySelector("[role=meter]");
    this.fill = root.querySelector(".identity-fill");
    this.marker = root.querySelector(".identity-marker");
    this.text = root.querySelector(".identity-value");
    this.threshold = null;
  }

  /** Show the meter from a session view's ``identity`` report (hidden when the server has none), and its newest
   * preview reading, if any. */
  setReport(report) {
    if (!report || !report.available) {
      this.root.hidden = true;
      this.root.dataset.available = "false";
      return;
    }
    this.root.hidden = false;
    this.root.dataset.available = "true";
    this.setThreshold(report.threshold);
    if (report.preview) this.show(report.preview);
    else if (this.root.dataset.distance === undefined) this.text.textContent = "measuring…";
  }

  /** Show one reading (a websocket ``identity`` message, or a report's ``preview`` / ``final``). */
  show(reading) {
    this.root.hidden = false;
    this.setThreshold(reading.threshold);
    const top = SCALE * reading.threshold;
    const distance = Number(reading.distance);
    this.fill.style.width = `${(100 * Math.min(distance, top)) / top}%`;
    this.track.setAttribute("aria-valuenow", distance.toFixed(2));
    const verdict = reading.same_person ? "same person" : "drifted past the same-person line";
    this.track.setAttribute("aria-valuetext", `${distance.toFixed(2)}: ${verdict}`);
    this.text.textContent = `${distance.toFixed(2)} · ${reading.same_person ? "same person" : "another person?"}`;
    this.root.dataset.distance = String(distance);
    this.root.dataset.samePerson = String(reading.same_person);
    this.root.dataset.source = reading.source;
    this.root.classList.toggle("drifted", !reading.same_person);
  }

  /** Forget the readings of another face (a new session or face). */
  clear() {
    delete this.root.dataset.distance;
    delete this.root.dataset.samePerson;
    this.fill.style.width = "0%";
    this.root.classList.remove("drifted");
    this.text.textContent = "—";
  }

  setThreshold(threshold) {
    if (threshold === this.threshold) return;
    this.threshold = threshold;
    this.track.setAttribute("aria-valuemax", (SCALE * threshold).toFixed(2));
    this.marker.style.left = `${100 / SCALE}%`;
    this.marker.title = `same-person threshold (${threshold})`;
    this.root.dataset.threshold = String(threshold);
  }
}
