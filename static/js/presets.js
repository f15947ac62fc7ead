// One-click presets: the server's single-edit presets (GET /api/presets) as buttons that edit every face of the
// uploaded photo at once (POST /api/presets/{name}/apply), with no face to prepare.

/** Describe a preset for its button's tooltip: the slider it bakes in and how close it is to the generator. */
function describe(preset) {
  const sign = preset.strength > 0 ? "+" : "";
  const psnr = preset.fidelity?.real?.psnr ?? preset.fidelity?.generated?.psnr;
  const fidelity = psnr ? `, ${psnr.toFixed(1)} dB from the generator's own edit` : "";
  return `${preset.direction} ${sign}${preset.strength}${fidelity}`;
}

/**
 * Fill ``panel`` with one button per preset; hides it when the server has none.
 *
 * ``photo()`` resolves to the photo to edit (a Blob) and its file name; ``onResult(blob, preset)`` gets the edited
 * JPEG; ``report(text)`` shows progress and ``onError(error, retry)`` a failure. Returns whether any preset exists.
 */
export async function setUpPresets({ api, panel, photo, onResult, report, onError }) {
  let presets = [];
  try {
    presets = (await api.getJson("/api/presets")).presets ?? [];
  } catch {
    presets = []; // an older server without presets: no buttons
  }
  const list = panel.querySelector(".preset-buttons");
  list.replaceChildren();
  panel.hidden = presets.length === 0;
  const buttons = presets.map((preset) => {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "preset-button";
    button.dataset.preset = preset.name;
    button.textContent = preset.label;
    button.title = describe(preset);
    button.addEventListener("click", () => apply(preset));
    list.append(button);
    return button;
  });

  async function apply(preset) {
    buttons.forEach((button) => { button.disabled = true; });
    report(`Applying “${preset.label}” to every face…`);
    try {
      const { blob, name } = await photo();
      const form = new FormData();
      form.append("file", blob, name || "photo");
      const response = await api.request("POST", `/api/presets/${encodeURIComponent(preset.name)}/apply`, { body: form });
      report("");
      onResult(await response.blob(), preset);
    } catch (error) {
      report("");
      onError(error, () => apply(preset));
    } finally {
      buttons.forEach((button) => { button.disabled = false; });
    }
  }

  return presets.length > 0;
}
