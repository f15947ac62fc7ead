// Paints preview frames on a canvas: newest frame wins, stale ones are dropped, before/after on demand.
// Each paint leaves performance marks/measures ("fluidsrv:painted", "fluidsrv:input-to-paint").

const SMALL_IMAGE = 256; // below this many pixels on a side, scale up with crisp pixels

/** Draws the live preview and the "before" (unedited) frame on one canvas. */
export class PreviewPainter {
  constructor(canvas, caption) {
    this.canvas = canvas;
    this.caption = caption;
    this.context = canvas.getContext("2d");
    this.newestSeq = -1; // newest preview seq accepted for decoding
    this.paintedSeq = -1;
    this.after = null; // ImageBitmap of the newest edited frame
    this.before = null; // ImageBitmap of the unedited face
    this.showingBefore = false;
    this.decoding = 0;
    this.onPainted = () => {};
  }

  /** Decode and show a preview frame unless a newer one got here first; ``timing`` feeds the latency marks. */
  async accept(frame, { asAfter = true, asBefore = false, timing = null } = {}) {
    if (asAfter) {
      if (frame.seq <= this.newestSeq) return; // stale: a newer state is already on its way or shown
      this.newestSeq = frame.seq;
    }
    this.decoding += 1;
    let bitmap;
    try {
      bitmap = await createImageBitmap(frame.blob);
    } catch (error) {
      console.warn("could not decode a preview frame", error);
      return;
    } finally {
      this.decoding -= 1;
    }
    if (asBefore) {
      this.before?.close();
      this.before = asAfter ? await createImageBitmap(bitmap) : bitmap;
      if (this.showingBefore) this.schedulePaint(frame.seq, null);
    }
    if (!asAfter) return;
    if (frame.seq !== this.newestSeq) {
      bitmap.close(); // superseded while decoding
      return;
    }
    this.after?.close();
    this.after = bitmap;
    this.schedulePaint(frame.seq, timing);
  }

  /** Show the unedited face (true) or the edit (false). */
  setShowingBefore(showing) {
    this.showingBefore = showing;
    this.caption.textContent = showing ? "Before (unedited)" : "After";
    this.canvas.dataset.showing = showing ? "before" : "after";
    this.draw(this.showingBefore ? this.before : this.after);
  }

  /** Forget everything (a new face). */
  clear() {
    this.after?.close();
    this.before?.close();
    this.after = this.before = null;
    this.newestSeq = this.paintedSeq = -1;
    delete this.canvas.dataset.seq;
  }

  schedulePaint(seq, timing) {
    requestAnimationFrame(() => {
      if (!this.showingBefore && seq !== this.newestSeq) return;
      this.draw(this.showingBefore ? this.before : this.after);
      if (this.showingBefore || !this.after) return;
      this.paintedSeq = seq;
      this.canvas.dataset.seq = String(seq);
      const paintedAt = performance.now();
      performance.mark("fluidsrv:painted", { startTime: paintedAt, detail: { seq } });
      if (timing && timing.inputAt !== null) {
        performance.measure("fluidsrv:input-to-paint", { start: timing.inputAt, end: paintedAt, detail: { seq } });
        performance.measure("fluidsrv:first-input-to-paint", { start: timing.firstInputAt, end: paintedAt, detail: { seq } });
      }
      this.onPainted(seq);
    });
  }

  draw(bitmap) {
    if (!bitmap) return;
    if (this.canvas.width !== bitmap.width || this.canvas.height !== bitmap.height) {
      this.canvas.width = bitmap.width;
      this.canvas.height = bitmap.height;
      this.canvas.classList.toggle("pixelated", bitmap.width < SMALL_IMAGE);
    }
    this.context.drawImage(bitmap, 0, 0);
  }
}

/** Paint a progress frame (an intermediate image of a running job) on a canvas, newest only. */
export async function paintProgressFrame(canvas, frame, state) {
  const ticket = (state.ticket = (state.ticket ?? 0) + 1);
  let bitmap;
  try {
    bitmap = await createImageBitmap(frame.blob);
  } catch {
    return;
  }
  if (ticket !== state.ticket) {
    bitmap.close();
    return;
  }
  canvas.width = bitmap.width;
  canvas.height = bitmap.height;
  canvas.classList.toggle("pixelated", bitmap.width < SMALL_IMAGE);
  canvas.getContext("2d").drawImage(bitmap, 0, 0);
  bitmap.close();
}
