"""Distill: tune a student on one session's fine-tuned generator, and the renderer that previews with it.

The shared :class:`fluidsrv.student.Student` is never written to. A session's student is the shared one plus a
few session tensors, substituted for each call with ``torch.func.functional_call``:

* ``code``: the autoencoder code of the fine-tuned generator's render of the pivot, refined by the distill step;
* the per-session adapter of the modulator's condition head (``modulator.head_down`` / ``head_up``);
* the decoder's last blocks and ToRGB (``tail_blocks`` of them).

The renderer is *anchored*: a preview is ``anchor + student(Δw) − student(0)``, where ``anchor`` is the fine-tuned
generator's exact render of the pivot (made once, in the distill step). The student therefore draws only the
change an edit makes; with every slider at zero the preview is exactly the generator's image. The distill step
trains the session tensors on the change of edits sampled from the server's shared sliders (``edits``: the Δws of
each direction at the far end of its range, at strengths in [−1, 1]; sliders a session adds later, such as its own
SeFa ranges or text prompts, are drawn by the student as it generalises), for at most ``seconds`` of its own time
(or ``max_steps``).

``torch.func.functional_call`` swaps the session tensors into the shared student for the duration of one call;
that is safe because every call runs on the executor's one device worker (never call a renderer from two threads).
"""

from __future__ import annotations

import hashlib
import time
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fluidsrv.models.stylegan2 import Generator
from fluidsrv.precision import inference_autocast
from fluidsrv.stages import Progress, StepJob
from fluidsrv.student import Student

ANCHOR, PIVOT, CODE, FACE_W, BASE_FRAME = "anchor", "pivot", "code", "face_w", "base_frame"
STUDENT_ID = "student_id"  # the identity of the shared student a state was tuned against (uint8 digest bytes)
_SESSION_PREFIX = "student."  # keys of tuned student tensors in a renderer's state
_identities: weakref.WeakKeyDictionary[Student, torch.Tensor] = weakref.WeakKeyDictionary()
EVAL_TARGETS = 8  # targets the distill's before / after change error is measured on
TARGET_CHUNK = 8  # edited renders made per step of the distill's first phase


@dataclass(frozen=True)
class DistillConfig:
    """How long and on what one session's distill step trains."""

    seconds: float = 8.0  # the job's own time budget (other jobs run between its steps do not count)
    max_steps: int = 300
    min_steps: int = 5
    targets: int = 48  # edited renders of the fine-tuned generator made up front
    batch: int = 6
    lr: float = 3e-3
    tail_blocks: int = 2  # decoder blocks (plus ToRGB) tuned per session
    raw_weight: float = 0.1  # weight of the un-anchored image loss next to the change loss
    max_sliders: int = 2  # an edit moves 1..max_sliders random sliders
    seed: int = 0


def session_tensor_names(student: Student, config: DistillConfig) -> list[str]:
    """The state-dict names of the student tensors a session tunes (adapter and decoder tail)."""
    tail = student.autoencoder.decoder.tail_names(config.tail_blocks)
    prefixes = [f"autoencoder.decoder.{prefix}" for prefix in tail]
    names = ["modulator.head_down", "modulator.head_up"]
    names += [name for name, _ in student.named_parameters() if name.startswith(tuple(prefixes))]
    return names


def sample_edits(edits: torch.Tensor, count: int, max_sliders: int, rng: torch.Generator) -> torch.Tensor:
    """``count`` random slider changes [count, num_ws, w_dim]: 1..max_sliders of ``edits`` at uniform strengths."""
    amount, num_ws, w_dim = edits.shape
    deltas = torch.zeros(count, num_ws, w_dim, device=edits.device, dtype=edits.dtype)
    for index in range(count):
        picks = torch.randperm(amount, generator=rng)[: int(torch.randint(1, max_sliders + 1, (), generator=rng))]
        strengths = (torch.rand(len(picks), generator=rng) * 2.0 - 1.0).to(edits.device, edits.dtype)
        deltas[index] = (edits[picks.to(edits.device)] * strengths[:, None, None]).sum(dim=0)
    return deltas


class StudentRenderer:
    """Previews of one session: the anchored student edit of the pivot by ``ws − pivot``."""

    def __init__(self, student: Student, state: dict[str, torch.Tensor], precision: str = "auto") -> None:
        self.student = student
        self.state = state
        self.precision = precision  # FLUIDSRV_INFERENCE_PRECISION: autocast on CUDA unless "fp32"
        self.change_errors: tuple[float, float] | None = None  # change MSE on some of its targets before / after
        self.tuned = {name[len(_SESSION_PREFIX):]: value for name, value in state.items()
                      if name.startswith(_SESSION_PREFIX)}

    def raw(self, ws: torch.Tensor) -> torch.Tensor:
        """The un-anchored student image of ``ws`` [1, num_ws, w_dim]: [1, 3, S, S]."""
        state = self.state
        delta = ws - state[PIVOT]
        arguments = (state[CODE].expand(len(ws), -1, -1, -1), delta, state[FACE_W].expand(len(ws), -1))
        return torch.func.functional_call(self.student, self.tuned, arguments)

    @torch.inference_mode()
    def render(self, ws: torch.Tensor) -> torch.Tensor:
        """Render ``ws`` [1, num_ws, w_dim] to [1, 3, S, S] in [-1, 1] (float32)."""
        with inference_autocast(ws.device, self.precision):
            raw = self.raw(ws).float()
        image = self.state[ANCHOR] + raw - self.state[BASE_FRAME]
        return image.clamp(-1.0, 1.0)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The session tensors: anchor, pivot, code, face w, base frame and the tuned student tensors."""
        return dict(self.state)


def student_identity(student: Student) -> torch.Tensor:
    """A digest of the shared student's weights as uint8 [32] (remembered per object), stored in session states."""
    known = _identities.get(student)
    if known is None:
        digest = hashlib.sha256()
        for name, tensor in sorted(student.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().to("cpu", torch.float16).reshape(-1).view(torch.uint8).numpy().tobytes())
        known = _identities[student] = torch.frombuffer(bytearray(digest.digest()), dtype=torch.uint8).clone()
    return known


def is_student_state(state: dict[str, torch.Tensor], student: Student | None = None) -> bool:
    """Whether ``state`` is a student renderer's (of ``student``, when given): another previewer's state lacks its
    tensors, and one tuned against other student weights (a replaced file) does not fit them."""
    if not all(key in state for key in (ANCHOR, PIVOT, CODE, FACE_W, BASE_FRAME, STUDENT_ID)):
        return False
    return student is None or torch.equal(state[STUDENT_ID].cpu(), student_identity(student))


def restore_renderer(student: Student, state: dict[str, torch.Tensor], device: torch.device,
                     precision: str = "auto") -> StudentRenderer:
    """Rebuild a session's renderer from :meth:`StudentRenderer.state_dict` output."""
    missing = [key for key in (ANCHOR, PIVOT, CODE, FACE_W, BASE_FRAME, STUDENT_ID) if key not in state]
    if missing:
        raise ValueError(f"a student session state lacks {', '.join(missing)}")
    return StudentRenderer(student, {name: value.to(device) for name, value in state.items()}, precision)


def _render_targets(generator: Generator, student: Student, ws: torch.Tensor, deltas: torch.Tensor,
                    chunk: int = TARGET_CHUNK) -> torch.Tensor:
    """The fine-tuned generator's renders of ``ws + deltas`` at the student's side: [K, 3, S, S]."""
    images = []
    with torch.no_grad():
        for start in range(0, len(deltas), chunk):
            batch = ws + deltas[start:start + chunk]
            images.append(student.to_student_side(generator.synthesis(batch, noise_mode="const").float()))
    return torch.cat(images)


def _change_error(student: Student, tuned: dict[str, torch.Tensor], face_w: torch.Tensor, deltas: torch.Tensor,
                  changes: torch.Tensor) -> float:
    """Mean squared error of the student's predicted change against ``changes`` [K, 3, S, S] of ``deltas``."""
    with torch.no_grad():
        batch = torch.cat([torch.zeros_like(deltas[:1]), deltas])
        overrides = {name: value for name, value in tuned.items() if name != CODE}
        images = torch.func.functional_call(
            student, overrides, (tuned[CODE].expand(len(batch), -1, -1, -1), batch, face_w.expand(len(batch), -1)))
        return float(F.mse_loss(images[1:] - images[:1], changes))


def distill(student: Student, generator: Generator, ws: torch.Tensor, edits: torch.Tensor,
            config: DistillConfig | None = None, precision: str = "auto") -> StepJob[StudentRenderer]:
    """Step-wise distill of ``student`` on ``generator`` (fine-tuned) around ``ws`` [1, num_ws, w_dim].

    ``edits`` [K, num_ws, w_dim] are the session's slider changes at full strength (K may be 0: then the session
    tensors stay as trained and only the code and anchor are made). Returns the session's renderer.
    """
    config = config or DistillConfig()
    started = time.perf_counter()
    ws = ws.detach()
    with torch.no_grad():
        anchor = student.to_student_side(generator.synthesis(ws, noise_mode="const").float())  # [1, 3, S, S]
        code = student.autoencoder.encode(anchor)  # [1, C, 4, 4]
        face_w = student.face_w(ws)
    names = session_tensor_names(student, config)
    parameters = dict(student.named_parameters())
    rng = torch.Generator().manual_seed(config.seed)
    tuned: dict[str, torch.Tensor] = {name: parameters[name].detach().clone() for name in names}
    if student.config.modulator.adapter_rank > 0:  # LoRA start: random down, zero up (a zero change)
        down = tuned["modulator.head_down"]
        tuned["modulator.head_down"] = torch.randn(down.shape, generator=rng).to(down) / down.shape[1] ** 0.5
    tuned[CODE] = code.clone()
    for value in tuned.values():
        value.requires_grad_(True)
    own = time.perf_counter() - started  # the job's own time: what other jobs run between its steps is not counted
    yield Progress("distill", 0, config.max_steps, "student: the face is encoded")
    resumed = time.perf_counter()

    deltas = sample_edits(edits, config.targets, config.max_sliders, rng) if len(edits) else edits[:0]
    rendered = []  # the targets are rendered in chunks until half the budget is spent (a 1024² CPU render is slow)
    for start in range(0, len(deltas), TARGET_CHUNK):
        rendered.append(_render_targets(generator, student, ws, deltas[start:start + TARGET_CHUNK]))
        own += time.perf_counter() - resumed
        yield Progress("distill", 0, config.max_steps, f"student: {start + len(rendered[-1])} edits rendered")
        resumed = time.perf_counter()
        if own >= config.seconds / 2 and start + TARGET_CHUNK >= min(config.batch, len(deltas)):
            break
    targets = torch.cat(rendered) if rendered else anchor[:0]
    deltas = deltas[: len(targets)]
    changes = targets - anchor  # [K, 3, S, S]
    optimizer = torch.optim.Adam(list(tuned.values()), lr=config.lr)
    zero = torch.zeros_like(ws)
    step = 0
    measured = slice(0, min(EVAL_TARGETS, len(deltas)))  # training targets the before / after error is taken on
    before = _change_error(student, tuned, face_w, deltas[measured], changes[measured]) if len(deltas) else None
    while len(deltas) and step < config.max_steps:
        if step > 0:
            resumed = time.perf_counter()
        step += 1
        picks = torch.randint(0, len(deltas), (config.batch,), generator=rng)
        batch_delta = torch.cat([zero, deltas[picks]])  # [1 + B, num_ws, w_dim]: the base frame comes first
        overrides = {name: value for name, value in tuned.items() if name != CODE}
        images = torch.func.functional_call(
            student, overrides,
            (tuned[CODE].expand(len(batch_delta), -1, -1, -1), batch_delta, face_w.expand(len(batch_delta), -1)))
        predicted_change = images[1:] - images[:1]
        change_error = F.mse_loss(predicted_change, changes[picks])
        loss = change_error + 0.5 * F.l1_loss(predicted_change, changes[picks])
        raw = torch.cat([anchor, targets[picks]])
        loss = loss + config.raw_weight * F.l1_loss(images, raw)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        own += time.perf_counter() - resumed
        done = step >= config.max_steps or (step >= config.min_steps and own >= config.seconds)
        # the total the budget allows at the pace so far (the progress bar's length)
        total = step if done else min(config.max_steps, max(step + 1, config.min_steps,
                                                             round(config.seconds * step / max(own, 1e-6))))
        yield Progress("distill", step, total, f"student: step {step}, change error {float(change_error.detach()):.5f}")
        if done:
            break

    state = {ANCHOR: anchor, PIVOT: ws.clone(), CODE: tuned[CODE].detach(), FACE_W: face_w,
             STUDENT_ID: student_identity(student)}
    state.update({_SESSION_PREFIX + name: value.detach() for name, value in tuned.items() if name != CODE})
    with torch.no_grad(), inference_autocast(ws.device, precision):  # the dtype path render() takes: exact at zero
        state[BASE_FRAME] = StudentRenderer(student, state).raw(ws).detach().float()
    renderer = StudentRenderer(student, state, precision)
    if before is not None:
        renderer.change_errors = (before, _change_error(student, tuned, face_w, deltas[measured], changes[measured]))
    return renderer
