// The face picker: outlines over the photo (boxes in photo pixels, placed in percent so they scale with it)
// and a list of thumbnails for small screens and screen readers.

function percent(value, total) {
  return `${(100 * value) / total}%`;
}

/** Draw one button per face over the photo and in the list; ``onPick(index)`` runs when one is chosen. */
export function renderFaces({ boxes, list }, session, onPick) {
  const { width, height, faces } = session;
  boxes.replaceChildren();
  list.replaceChildren();
  faces.forEach((face, position) => {
    const index = face.index ?? position;
    const [x0, y0, x1, y1] = face.box;
    const name = `Face ${position + 1}`;

    const outline = document.createElement("button");
    outline.type = "button";
    outline.className = "face-box";
    outline.dataset.face = String(index);
    outline.setAttribute("aria-label", `Edit ${name.toLowerCase()}`);
    outline.tabIndex = -1; // the list below is the keyboard path; outlines are for pointers
    Object.assign(outline.style, {
      left: percent(Math.max(0, x0), width),
      top: percent(Math.max(0, y0), height),
      width: percent(Math.min(width, x1) - Math.max(0, x0), width),
      height: percent(Math.min(height, y1) - Math.max(0, y0), height),
    });
    const tag = document.createElement("span");
    tag.textContent = String(position + 1);
    outline.append(tag);
    outline.addEventListener("click", () => onPick(index));
    boxes.append(outline);

    const item = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.face = String(index);
    if (face.thumbnail) {
      const thumbnail = document.createElement("img");
      thumbnail.src = face.thumbnail;
      thumbnail.alt = "";
      button.append(thumbnail);
    }
    button.append(`Edit ${name.toLowerCase()}`);
    button.addEventListener("click", () => onPick(index));
    item.append(button);
    list.append(item);
  });
}
