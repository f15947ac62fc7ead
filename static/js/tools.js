// The latent tools view (mix two faces by layer range, morph, loop video). The server routes are proposed,
// not built yet: the view appears only when GET /api/tools answers, and shows only the tools it lists.

import { rememberedFaces } from "./storage.js";

const FACES_NEEDED = { mix: 2, morph: 2, loop: 1 };

function faceRef(face) {
  return { session_id: face.sessionId, token: face.token };
}

function fillFaceSelects(form, faces) {
  for (const select of form.querySelectorAll(".face-select")) {
    select.replaceChildren(
      ...faces.map((face, index) => new Option(face.label || `Face ${index + 1}`, face.sessionId)),
    );
  }
  const box = form.querySelector(".face-checks");
  if (box) {
    box.replaceChildren(
      ...faces.map((face, index) => {
        const label = document.createElement("label");
        const check = Object.assign(document.createElement("input"), { type: "checkbox", value: face.sessionId, checked: true });
        label.append(check, ` ${face.label || `Face ${index + 1}`}`);
        return label;
      }),
    );
  }
}

function offerDownload(form, blob, name) {
  const link = form.querySelector(".tool-download");
  if (link.href.startsWith("blob:")) URL.revokeObjectURL(link.href);
  link.href = URL.createObjectURL(blob);
  link.download = name;
  link.hidden = false;
  link.focus();
}

/**
 * Probe the tools routes and wire the forms. Returns a function that refreshes the face lists (call it when
 * the view is shown), or null when the server has no tools.
 */
export async function setUpTools({ api, report }) {
  let offered;
  try {
    offered = await api.tools();
  } catch {
    return null; // 404: no tools on this server
  }
  const forms = {
    mix: document.getElementById("tool-mix"),
    morph: document.getElementById("tool-morph"),
    loop: document.getElementById("tool-loop"),
  };
  document.getElementById("tools-unavailable").hidden = true;
  for (const [name, form] of Object.entries(forms)) form.hidden = !offered[name];

  const byId = () => new Map(rememberedFaces().map((face) => [face.sessionId, face]));
  const run = async (form, work) => {
    const button = form.querySelector("button[type=submit]");
    button.disabled = true;
    try {
      await work(byId());
    } catch (error) {
      report(`The tool failed: ${error.message}`);
    } finally {
      button.disabled = false;
    }
  };

  forms.mix.addEventListener("submit", (event) => {
    event.preventDefault();
    run(forms.mix, async (faces) => {
      const data = new FormData(forms.mix);
      report("Mixing…");
      const blob = await api.toolBlob("mix", {
        faces: [faceRef(faces.get(data.get("a"))), faceRef(faces.get(data.get("b")))],
        layers: data.get("layers"),
      });
      const output = forms.mix.querySelector(".tool-output");
      if (output.src.startsWith("blob:")) URL.revokeObjectURL(output.src);
      output.src = URL.createObjectURL(blob);
      output.hidden = false;
      report("Mixed.");
    });
  });

  forms.morph.addEventListener("submit", (event) => {
    event.preventDefault();
    run(forms.morph, async (faces) => {
      const data = new FormData(forms.morph);
      const chosen = [...forms.morph.querySelectorAll(".face-checks input:checked")].map((box) => faces.get(box.value));
      if (chosen.length < 2) {
        report("Choose at least two faces to morph through.");
        return;
      }
      report("Rendering the morph…");
      const format = data.get("format");
      const blob = await api.toolBlob("morph", {
        faces: chosen.map(faceRef),
        frames_per_transition: Number(data.get("frames")),
        loop: data.get("loop") === "on",
        format,
      });
      offerDownload(forms.morph, blob, `morph.${format}`);
      report("The morph is ready to download.");
    });
  });

  forms.loop.addEventListener("submit", (event) => {
    event.preventDefault();
    run(forms.loop, async (faces) => {
      const data = new FormData(forms.loop);
      report("Rendering the loop…");
      const format = data.get("format");
      const blob = await api.toolBlob("loop", {
        face: faceRef(faces.get(data.get("face"))),
        layers: data.get("layers"),
        frames: Number(data.get("frames")),
        amplitude: Number(data.get("amplitude")),
        format,
      });
      offerDownload(forms.loop, blob, `loop.${format}`);
      report("The loop is ready to download.");
    });
  });

  return () => {
    const faces = rememberedFaces();
    document.getElementById("tools-faces-hint").textContent = faces.length
      ? `${faces.length} prepared face${faces.length === 1 ? "" : "s"} from this tab.`
      : "Prepare a face in the editor first; the tools work on faces you prepared in this tab.";
    for (const [name, form] of Object.entries(forms)) {
      fillFaceSelects(form, faces);
      form.querySelector("button[type=submit]").disabled = faces.length < FACES_NEEDED[name];
    }
  };
}
