// The slider panel: one labelled range + number entry + reset per direction, grouped by the direction's group.

function stepFor(min, max) {
  const span = max - min;
  if (span <= 2) return 0.005;
  if (span <= 20) return 0.01;
  return 0.1;
}

function clamp(value, min, max) {
  return Math.min(max, Math.max(min, value));
}

function formatValue(value) {
  return String(Math.round(value * 1000) / 1000);
}

/**
 * Builds and owns the slider inputs. ``onInput(values)`` fires while a slider moves, ``onCommit(values)``
 * when a change is final (slider released, number entered, reset). ``values`` holds every non-zero slider.
 */
export class SliderPanel {
  constructor(container, { onInput, onCommit }) {
    this.container = container;
    this.onInput = onInput;
    this.onCommit = onCommit;
    this.rows = new Map(); // direction name -> { range, number, direction }
    this.groups = new Map(); // group name -> fieldset
    this.counter = 0;
  }

  /** Replace every slider with ``directions`` (the server's list). */
  setDirections(directions) {
    this.container.replaceChildren();
    this.rows.clear();
    this.groups.clear();
    this.counter = 0; // ids restart: the first shared slider is always #slider-1
    this.addDirections(directions);
  }

  /** Add sliders for ``directions`` (skipping names already present); returns the first new range input. */
  addDirections(directions, groupOverride = null) {
    let first = null;
    for (const direction of directions) {
      if (this.rows.has(direction.name)) continue;
      const row = this.buildRow(direction);
      this.fieldsetFor(groupOverride ?? (direction.group || "Sliders")).append(row);
      first ??= row.querySelector("input[type=range]");
    }
    return first;
  }

  /** The current state: non-zero slider values by direction name. */
  values() {
    const values = {};
    for (const [name, row] of this.rows) {
      const value = Number(row.range.value);
      if (value !== 0) values[name] = value;
    }
    return values;
  }

  /** Show ``values`` (sliders not named go to 0) without firing callbacks. */
  setValues(values) {
    for (const [name, row] of this.rows) this.show(row, values[name] ?? 0);
  }

  /** Set every slider to 0 and commit. */
  resetAll() {
    this.setValues({});
    this.onCommit(this.values());
  }

  /** The range input of the first slider (for focus). */
  firstInput() {
    return this.container.querySelector("input[type=range]");
  }

  fieldsetFor(group) {
    let fieldset = this.groups.get(group);
    if (!fieldset) {
      fieldset = document.createElement("fieldset");
      const legend = document.createElement("legend");
      legend.textContent = group;
      fieldset.append(legend);
      this.container.append(fieldset);
      this.groups.set(group, fieldset);
    }
    return fieldset;
  }

  buildRow(direction) {
    const id = `slider-${++this.counter}`;
    const min = Number(direction.min);
    const max = Number(direction.max);
    const step = stepFor(min, max);
    const row = document.createElement("div");
    row.className = "slider-row";
    row.dataset.direction = direction.name;

    const label = document.createElement("label");
    label.htmlFor = id;
    label.textContent = direction.label || direction.name;
    if (direction.provenance) label.title = direction.provenance;

    const range = Object.assign(document.createElement("input"), { type: "range", id, min, max, step, value: 0 });
    range.dataset.direction = direction.name;
    const number = Object.assign(document.createElement("input"), { type: "number", min, max, step, value: 0 });
    number.inputMode = "decimal";
    number.setAttribute("aria-label", `${label.textContent} value`);
    const reset = Object.assign(document.createElement("button"), { type: "button", textContent: "↺" });
    reset.setAttribute("aria-label", `Reset ${label.textContent}`);
    reset.title = "Reset to 0";

    const entry = { range, number, direction };
    range.addEventListener("input", () => {
      number.value = formatValue(Number(range.value));
      this.onInput(this.values());
    });
    range.addEventListener("change", () => this.onCommit(this.values()));
    number.addEventListener("change", () => {
      const typed = Number(number.value);
      this.show(entry, Number.isFinite(typed) ? clamp(typed, min, max) : 0);
      this.onCommit(this.values());
    });
    reset.addEventListener("click", () => {
      this.show(entry, 0);
      this.onCommit(this.values());
    });

    row.append(label, range, number, reset);
    this.rows.set(direction.name, entry);
    return row;
  }

  show(entry, value) {
    entry.range.value = String(value);
    entry.number.value = formatValue(Number(entry.range.value));
  }
}
