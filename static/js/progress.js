// The preparation progress: align → encode → fine-tune → distill, from the server's progress events.

const STEP_OF_STAGE = [
  [/align/i, "align"],
  [/encod|invert|project|e4e/i, "encode"],
  [/fine|tun|pti/i, "finetune"],
  [/distil|student|preview|fit/i, "distill"],
];
const ORDER = ["align", "encode", "finetune", "distill"];

/** Map a server stage name onto one of the four steps shown (null when it is none of them). */
export function stepOf(stage) {
  for (const [pattern, step] of STEP_OF_STAGE) if (pattern.test(stage)) return step;
  return null;
}

/** Shows the four steps with a bar each; later steps mark earlier ones done. */
export class ProgressView {
  constructor(list, message) {
    this.list = list;
    this.message = message;
  }

  /** Back to the start. */
  reset() {
    for (const item of this.list.children) {
      item.classList.remove("active", "done");
      const bar = item.querySelector("progress");
      bar.max = 1;
      bar.value = 0;
    }
    this.message.textContent = "Starting…";
  }

  /** Show a progress event { stage, step, total, message, queued }. */
  update({ stage, step, total, message, queued }) {
    if (queued) {
      this.message.textContent = message || `Waiting in line (place ${queued})…`;
      return;
    }
    const current = stepOf(stage ?? "");
    this.message.textContent = `${stage}: ${message || `step ${step} of ${total}`}`;
    if (!current) return;
    const position = ORDER.indexOf(current);
    for (const item of this.list.children) {
      const itemPosition = ORDER.indexOf(item.dataset.step);
      const bar = item.querySelector("progress");
      item.classList.toggle("active", itemPosition === position);
      item.classList.toggle("done", itemPosition < position || (itemPosition === position && step >= total));
      if (itemPosition < position) bar.value = bar.max;
      if (itemPosition === position) {
        bar.max = Math.max(1, total);
        bar.value = Math.min(step, bar.max);
      }
    }
  }

  /** Mark every step done. */
  finish() {
    for (const item of this.list.children) {
      item.classList.remove("active");
      item.classList.add("done");
      const bar = item.querySelector("progress");
      bar.value = bar.max;
    }
  }
}
