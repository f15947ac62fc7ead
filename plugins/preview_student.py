"""The ``student`` previewer: previews drawn by a distilled student (autoencoder + AdaLIN modulator) in milliseconds.

Prepare's distill step tunes the student on the session's fine-tuned generator for a bounded time (option
``seconds``, default 8; ``max_steps`` 300), then each preview costs one modulator + decoder pass at the student's
side (the generator's resolution up to 256²; the pipeline scales frames to the preview side). Finalize still
renders with the fine-tuned generator. See :mod:`fluidsrv.distill` for what a session tunes and why previews are
anchored on the generator's exact render of the face.

Which weights: the ``student`` option when set (a file written by ``fluidsrv train student``), else every file that
exists among the embedded ``weights/student-128.safetensors`` and the weights cache's
``student-ffhq-1024.safetensors`` (one you train: it has no manifest entry). The first whose modulator edits the
generator's ``[num_ws, w_dim]`` codes is used. :meth:`StudentPreviewer.suits` also requires the file's recorded
generator fingerprint to match (``previewer=auto`` picks the student only then).
``untrained=true`` builds a random student for any generator (for timing and tests: its previews are noise).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import torch

from fluidsrv import hookimpl
from fluidsrv.distill import DistillConfig, StudentRenderer, distill, is_student_state, restore_renderer
from fluidsrv.encoder_arch import FINGERPRINT_KEY, generator_fingerprint
from fluidsrv.models.stylegan2 import Generator
from fluidsrv.stages import PluginContext, PluginFactory, Previewer, PreviewRenderer, StepJob
from fluidsrv.student import Student, StudentError, load_student, read_student_metadata, student_config_for
from fluidsrv.weights_manager import WeightsManager

log = logging.getLogger(__name__)

EMBEDDED_STUDENT = "student-128"  # manifest names
FFHQ_STUDENT_FILE = "student-ffhq-1024.safetensors"  # in the weights cache
_TRUE = {"1", "true", "yes", "on"}


def candidate_files(context: PluginContext) -> list[Path]:
    """The student files to consider: the ``student`` option, else the embedded and cached ones that exist."""
    explicit = context.options.get("student")
    if explicit:
        return [Path(str(explicit)).expanduser()]
    found = WeightsManager.from_context(context).existing_files((EMBEDDED_STUDENT,))
    trained = Path(context.cache_dir) / FFHQ_STUDENT_FILE  # one you train: no manifest entry, no download
    return [*found, trained] if trained.is_file() else found


def distill_config(context: PluginContext) -> DistillConfig:
    """The distill settings of the plugin options (``seconds``, ``max_steps``)."""
    defaults = DistillConfig()
    return DistillConfig(seconds=float(context.options.get("seconds", defaults.seconds)),
                         max_steps=int(context.options.get("max_steps", defaults.max_steps)))


class StudentPreviewer:
    """Distils the student per session and rebuilds session renderers after a restore."""

    def __init__(self, context: PluginContext) -> None:
        self.context = context
        self.untrained = str(context.options.get("untrained", "")).strip().lower() in _TRUE
        self.files = [] if self.untrained else candidate_files(context)
        self.config = distill_config(context)
        self._students: dict[object, Student] = {}
        self._chosen: Path | None = None  # the file suits() found made for the base generator
        self._lock = threading.Lock()

    def suits(self, generator: Generator) -> str | None:
        """Why no student file is made for ``generator`` (shape or fingerprint), or None when one is."""
        if self.untrained:
            return None
        if not self.files:
            return "no student weights (train one with `fluidsrv train student`)"
        actual = generator_fingerprint(generator)
        reasons = []
        for path in self.files:
            try:
                metadata = read_student_metadata(path)
            except StudentError as error:
                reasons.append(str(error))
                continue
            if metadata.get(FINGERPRINT_KEY) == actual:
                with self._lock:
                    self._chosen = path  # student_for serves this file first (tuned generators differ in fingerprint)
                return None
            reasons.append(f"{path.name} was trained for another generator")
        return "; ".join(reasons)

    def student_for(self, generator: Generator) -> Student:
        """The student (loaded once) whose modulator edits ``generator``'s codes; ValueError when none does."""
        device = generator.w_avg.device
        with self._lock:
            if self.untrained:
                key: object = ("untrained", generator.num_ws, generator.w_dim, generator.resolution, device)
                if key not in self._students:
                    with torch.random.fork_rng(devices=[]):  # reproducible, and the caller's RNG is left alone
                        torch.manual_seed(0)
                        student = Student(student_config_for(generator))
                    student.w_avg.copy_(generator.w_avg.detach().cpu())
                    self._students[key] = student.to(device).eval().requires_grad_(False)
                return self._students[key]
            ordered = sorted(self.files, key=lambda path: path != self._chosen)
            for path in ordered:
                key = (path, device)
                if key not in self._students:
                    try:
                        self._students[key] = load_student(path, device)[0]
                    except StudentError as error:
                        log.warning("skipping student %s: %s", path, error)
                        continue
                student = self._students[key]
                if student.config.suits(generator) is None:
                    return student
        have = ", ".join(str(path) for path in self.files) or "no student files"
        raise ValueError(f"no student edits this generator's [{generator.num_ws}, {generator.w_dim}] codes; "
                         f"have: {have}. Train one with `fluidsrv train student` or use the 'generator' previewer")

    def fit(self, generator: Generator, ws: torch.Tensor, edits: torch.Tensor) -> StepJob[PreviewRenderer]:
        """Distil the student on ``generator`` (the session's fine-tuned one) around ``ws`` over ``edits``."""
        student = self.student_for(generator)
        renderer: StudentRenderer = yield from distill(student, generator, ws, edits.to(ws), self.config,
                                                       self.context.inference_precision)
        return renderer

    def restore(self, generator: Generator, state: dict[str, torch.Tensor]) -> PreviewRenderer:
        """Rebuild a session's renderer from its stored tensors (a session prepared by another previewer, or against
        other student weights, previews with its generator until it is prepared again)."""
        student = self.student_for(generator)
        if not is_student_state(state, student):
            log.info("a session's preview state is not of this student: it previews with its generator")
            return GeneratorFallback(generator)
        return restore_renderer(student, state, generator.w_avg.device, self.context.inference_precision)


class GeneratorFallback:
    """Previews of a session that was prepared before the student was switched on: its generator's renders."""

    def __init__(self, generator: Generator) -> None:
        self.generator = generator

    @torch.inference_mode()
    def render(self, ws: torch.Tensor) -> torch.Tensor:
        """Render ``ws`` [1, num_ws, w_dim] with the session's generator: [1, 3, R, R]."""
        return self.generator.synthesis(ws, noise_mode="const").float()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Nothing of the student's to store."""
        return {}


def _unavailable(context: PluginContext) -> str | None:
    if str(context.options.get("untrained", "")).strip().lower() in _TRUE:
        return None
    explicit = context.options.get("student")
    if explicit:
        path = Path(str(explicit)).expanduser()
        return None if path.is_file() else f"the student file {path} (option 'student') does not exist"
    if candidate_files(context):
        return None
    return "no student weights: train one with `fluidsrv train student` (see weights/MODEL_CARD.md)"


def _create(context: PluginContext) -> Previewer:
    return StudentPreviewer(context)


@hookimpl
def fluidsrv_previewers() -> list[PluginFactory[Previewer]]:
    """Register the ``student`` previewer."""
    return [PluginFactory("student", "previews from a distilled student (autoencoder + AdaLIN modulator), fast",
                          _create, _unavailable)]
