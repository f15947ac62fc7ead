// Plain-language explanations of the server's error codes: what happened and what to do next.

/** The action a notice offers: start over with a new photo, pick a face again, or retry. */
export const Action = Object.freeze({ UPLOAD: "upload", FACES: "faces", RETRY: "retry", NONE: null });

const EXPLANATIONS = {
  no_face: ["No face was found in this photo.", "Try a photo where a face is clearly visible, facing the camera and not too small.", Action.UPLOAD],
  upload_too_large: ["This file is too large.", "Choose a smaller file, or export the photo at a lower quality.", Action.UPLOAD],
  image_too_large: ["This image has too many pixels.", "Resize it (for example to 4000 pixels on the long side) and upload it again.", Action.UPLOAD],
  unsupported_type: ["This file is not a photo the server can read.", "Use a JPEG, PNG or WebP image.", Action.UPLOAD],
  empty_upload: ["The file is empty.", "Choose another photo.", Action.UPLOAD],
  corrupt_image: ["The photo could not be decoded.", "The file may be damaged; try another copy or another photo.", Action.UPLOAD],
  bad_upload: ["The upload did not arrive intact.", "Try uploading the photo again.", Action.UPLOAD],
  missing_file: ["No photo arrived with the upload.", "Choose a photo and try again.", Action.UPLOAD],
  unknown_session: ["This editing session has expired or was deleted.", "Upload the photo again to start a new one.", Action.UPLOAD],
  bad_token: ["This editing session belongs to another tab or has expired.", "Upload the photo again to start a new one.", Action.UPLOAD],
  session_deleted: ["This editing session was deleted.", "Upload a photo to start again.", Action.UPLOAD],
  too_many_sessions: ["The server is busy: too many people are editing right now.", "Wait a minute, then try again.", Action.RETRY],
  busy: ["The server is still working on this face.", "Wait for the current step to finish, then try again.", Action.RETRY],
  not_ready: ["The face is not ready yet.", "Wait until preparing has finished.", Action.NONE],
  out_of_memory: ["The server ran out of memory.", "Wait a moment and try again; other people may be using it.", Action.RETRY],
  prepare_failed: ["Preparing this face failed.", "Pick the face again, or try another face or photo.", Action.FACES],
  interrupted: ["Preparing this face was interrupted (the server restarted).", "Pick the face again.", Action.FACES],
  cancelled: ["Preparing this face was cancelled.", "Pick the face again.", Action.FACES],
  finalize_failed: ["Finalizing failed.", "Try again; if it keeps failing, reset a slider or two and retry.", Action.RETRY],
  preview_failed: ["A preview could not be drawn.", "Move the slider again; if it keeps failing, reload the page.", Action.NONE],
  rate_limited: ["Too many slider updates at once.", "The preview catches up by itself; nothing to do.", Action.NONE],
  too_many_sockets: ["This session is open in too many tabs.", "Close the other tabs of this photo, then reload this one.", Action.RETRY],
  decode_budget: ["Too many large photos from this address in the last minute.", "Wait a little, then upload again.", Action.RETRY],
  network: ["The server could not be reached.", "Check that fluidsrv is still running and your connection works, then try again.", Action.RETRY],
  internal_error: ["The server failed on this request.", "Try again; the server's log says more.", Action.RETRY],
};

/** Return { title, advice, action } for an ApiError (or any error with a code and message). */
export function explain(error) {
  const known = EXPLANATIONS[error.code];
  if (known) {
    const [title, advice, action] = known;
    return { title, advice: withDetail(advice, error), action };
  }
  if (error.status === 429) return { title: "The server is busy.", advice: "Wait a minute, then try again.", action: Action.RETRY };
  if (error.status === 413) return { title: "This photo is too large.", advice: "Choose a smaller one.", action: Action.UPLOAD };
  return { title: "Something went wrong.", advice: error.message || String(error), action: Action.RETRY };
}

/** Codes whose server message adds facts (a limit, a size, a reason) worth showing after the advice. */
const DETAILED = new Set([
  "upload_too_large", "image_too_large", "unsupported_type", "corrupt_image", "bad_upload",
  "prepare_failed", "finalize_failed", "preview_failed", "out_of_memory", "network", "internal_error", "decode_budget",
]);

function withDetail(advice, error) {
  return error.message && DETAILED.has(error.code) ? `${advice} (${error.message})` : advice;
}
