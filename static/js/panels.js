// The optional direction panels: SeFa (layer range + how many vectors → new sliders) and a CLIP text prompt.
// Both add sliders to the current session; /api/config "features" says whether the server offers them.

import { ApiError } from "./api.js";

const FULL_PRESET_MIN_LAYERS = 10; // from 64 px up the presets follow StyleGAN's resolutions (as latents.py)

/** Return the [start, stop) layers of a preset for a generator with ``numWs`` style layers. */
export function presetLayers(preset, numWs) {
  if (preset === "all") return [0, numWs];
  const bounds = numWs >= FULL_PRESET_MIN_LAYERS
    ? [0, 4, 8, numWs]
    : [0, Math.floor(numWs / 3), Math.floor((2 * numWs) / 3), numWs];
  const index = ["coarse", "middle", "fine"].indexOf(preset);
  return index < 0 ? null : [bounds[index], bounds[index + 1]];
}

function layerText([start, stop]) {
  return stop - start === 1 ? `layer ${start}` : `layers ${start}–${stop - 1}`;
}

/** Whether the server can make text (CLIP) directions: /api/config "features", else its plugin list. */
export function hasTextDirections(config) {
  if (config.features) return Boolean(config.features.text);
  return (config.plugins ?? []).some(
    (plugin) => plugin.stage === "directions" && plugin.available && /clip|text/i.test(plugin.name),
  );
}

/**
 * Wire the SeFa panel: probe the route, keep the layer inputs consistent with the preset, and add the
 * returned directions as sliders. ``addSliders(directions, group)`` returns the first new input.
 */
export async function setUpSefaPanel({ api, panel, numWs, addSliders, report, features, currentSession }) {
  if (!features?.sefa) return; // this server cannot make SeFa sliders on demand
  const form = panel.querySelector("form");
  const preset = form.querySelector("#sefa-preset");
  const start = form.querySelector("#sefa-start");
  const stop = form.querySelector("#sefa-stop");
  const count = form.querySelector("#sefa-k");
  const hint = form.querySelector("#sefa-layers-hint");
  start.max = String(numWs - 1);
  stop.max = String(numWs);
  const applyPreset = () => {
    const layers = presetLayers(preset.value, numWs);
    if (layers) [start.value, stop.value] = layers.map(String);
    hint.textContent = `The generator has ${numWs} style layers (0–${numWs - 1}).`;
  };
  preset.addEventListener("change", applyPreset);
  for (const input of [start, stop]) input.addEventListener("input", () => { preset.value = "custom"; });
  applyPreset();
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const layers = [Number(start.value), Number(stop.value)];
    if (!(layers[0] >= 0 && layers[0] < layers[1] && layers[1] <= numWs)) {
      report(`Choose a layer range with 0 ≤ from < to ≤ ${numWs}.`);
      start.focus();
      return;
    }
    const button = form.querySelector("button[type=submit]");
    button.disabled = true;
    report(`Finding directions of ${layerText(layers)}…`);
    try {
      const { id, token } = currentSession();
      const answer = await api.sefa(id, token, layers, Number(count.value));
      const first = addSliders(answer.directions, `SeFa, ${layerText(layers)}`);
      report(`Added ${answer.directions.length} sliders for ${layerText(layers)}.`);
      first?.focus();
    } catch (error) {
      if (error instanceof ApiError && error.status === 404) panel.hidden = true;
      report(`No new sliders: ${error.message}`);
    } finally {
      button.disabled = false;
    }
  });
  panel.hidden = false;
}

/** Wire the text-prompt box (only called when a CLIP plugin is available). */
export function setUpPromptPanel({ api, form, addSliders, report, currentSession }) {
  const text = form.querySelector("#prompt-text");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const prompt = text.value.trim();
    if (!prompt) return;
    const button = form.querySelector("button[type=submit]");
    button.disabled = true;
    report(`Finding a direction for “${prompt}”…`);
    try {
      const { id, token } = currentSession();
      const answer = await api.textDirection(id, token, prompt, null);
      const first = addSliders(answer.directions, "Text");
      report(`Added a slider for “${prompt}”.`);
      first?.focus();
    } catch (error) {
      if (error instanceof ApiError && error.status === 404) form.hidden = true;
      report(`No slider for “${prompt}”: ${error.message}`);
    } finally {
      button.disabled = false;
    }
  });
  form.hidden = false;
}
