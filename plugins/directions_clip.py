"""Text-driven directions with CLIP (``open-clip-torch``), in the spirit of StyleCLIP's global directions.

Once per generator we measure how each of ``k`` principal directions of W moves the CLIP image embedding
(averaged over a few sampled faces): a table ΔI [k, E]. A prompt then costs one text encoding: its direction
Δt = T(prompt) − T(neutral) (normalised) gives each principal direction the relevance ΔI·Δt; the components
whose relevance is below ``threshold`` × the largest are dropped (disentanglement), and the rest, weighted by
their relevance, sum to the edit direction. That is the steepest-ascent direction of the linearised CLIP
similarity within the kept components: seconds, not minutes.

Weights are user-provided and never downloaded: the ``open-clip-vit-b32`` safetensors in the weights cache
(``fluidsrv weights list``), or the options ``model`` (a safetensors / state-dict file) and ``arch`` (open_clip
model name, default ``ViT-B-32``). Other options: ``prompts`` (``|``-separated slider prompts, default
"a smiling face|a face with glasses|an old face"), ``neutral`` ("a face"), ``k`` (32), ``samples`` (4),
``threshold`` (0.1), ``seed`` (0). Needs the ``clip`` extra: ``pip install -e .[clip]``.
"""

from __future__ import annotations

import importlib.util
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.nn import functional as F

from fluidsrv import hookimpl
from fluidsrv.directions import pca, sample_w
from fluidsrv.fingerprint import generator_sha256
from fluidsrv.plugin_options import option_int
from fluidsrv.stages import Direction, DirectionSource, PluginContext, PluginFactory

if TYPE_CHECKING:
    from fluidsrv.models.stylegan2 import Generator

WEIGHTS_NAME = "open-clip-vit-b32"
DEFAULT_ARCH = "ViT-B-32"
DEFAULT_PROMPTS = "a smiling face|a face with glasses|an old face"
SLIDER_RANGE = (-3.0, 3.0)  # in standard deviations of w along the direction (see fluidsrv.latents)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's image normalisation
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class GlobalDirectionTable:
    """The principal directions of W (unit rows [k, w_dim], std [k]) and their CLIP image-embedding effects [k, E]."""

    basis: torch.Tensor
    std: torch.Tensor
    effects: torch.Tensor


class ClipTextDirections:
    """Finds W directions that raise the CLIP similarity of generated faces to a text prompt."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        prompts: tuple[str, ...] = tuple(DEFAULT_PROMPTS.split("|")),
        neutral: str = "a face",
        k: int = 32,
        samples: int = 4,
        threshold: float = 0.1,
        seed: int = 0,
        step: float = 1.0,
        pca_samples: int = 5_000,
        device: torch.device | str = "cpu",
    ) -> None:
        assert k >= 1 and samples >= 1 and 0.0 <= threshold < 1.0, "bad k / samples / threshold"
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.prompts = prompts
        self.neutral = neutral
        self.k = k
        self.samples = samples
        self.threshold = threshold
        self.seed = seed
        self.step = step  # finite-difference step in standard deviations of w
        self.pca_samples = pca_samples
        self._tables: dict[str, GlobalDirectionTable] = {}
        self._lock = threading.Lock()

    # -- CLIP encoders --

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Unit CLIP embeddings [N, E] of generated images [N, 3, H, W] in [-1, 1]."""
        size = self.model.visual.image_size
        size = size if isinstance(size, (tuple, list)) else (size, size)
        pixels = (images.float().clamp(-1, 1) + 1) / 2  # [N, 3, H, W] in [0, 1]
        pixels = F.interpolate(pixels, size=tuple(size), mode="bicubic", align_corners=False)
        mean = torch.tensor(CLIP_MEAN, device=pixels.device).reshape(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=pixels.device).reshape(1, 3, 1, 1)
        embedding = self.model.encode_image(((pixels - mean) / std).to(self.device))  # [N, E]
        return F.normalize(embedding.float(), dim=-1)

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Unit CLIP embeddings [N, E] of texts."""
        tokens = self.tokenizer(texts).to(self.device)  # [N, context]
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)

    # -- the global-direction table --

    @torch.no_grad()
    def table(self, generator: Generator) -> GlobalDirectionTable:
        """ΔI per principal direction of ``generator``'s W (computed once per generator, then remembered)."""
        key = generator_sha256(generator)
        with self._lock:
            if key in self._tables:
                return self._tables[key]
        w = sample_w(generator, self.pca_samples, self.seed)  # [P, w_dim]
        _, components = pca(w, min(self.k, generator.w_dim))
        basis, std = components.directions, components.values  # [k, w_dim], [k]
        gen_device = next(generator.parameters()).device
        start = w[: self.samples].to(gen_device)  # [S, w_dim] faces to measure around
        effects = []
        for index in range(basis.shape[0]):
            offset = (self.step * std[index] * basis[index]).to(gen_device)  # [w_dim]
            codes = torch.cat([start + offset, start - offset])  # [2S, w_dim]
            ws = codes[:, None, :].expand(-1, generator.num_ws, -1)  # [2S, num_ws, w_dim]
            embedded = self.encode_images(generator.synthesis(ws))  # [2S, E]
            plus, minus = embedded.chunk(2)
            effects.append((plus - minus).mean(dim=0) / (2 * self.step))  # [E] per standard deviation
        found = GlobalDirectionTable(basis.cpu(), std.cpu(), torch.stack(effects).cpu())
        with self._lock:
            self._tables[key] = found
        return found

    def direction_for(self, generator: Generator, prompt: str, neutral: str | None = None) -> Direction:
        """The edit direction that makes faces more like ``prompt`` (relative to ``neutral``) as a slider."""
        found = self.table(generator)
        target, reference = self.encode_text([prompt, neutral or self.neutral]).cpu()
        text_change = F.normalize(target - reference, dim=0)  # [E]
        relevance = found.effects @ text_change  # [k] similarity gain per std along each component
        keep = relevance.abs() >= self.threshold * relevance.abs().max()
        weights = torch.where(keep, relevance, torch.zeros_like(relevance))  # [k]
        vector = (weights * found.std) @ found.basis  # [w_dim]: Σ relevance · std · component
        vector = vector / vector.norm().clamp(min=1e-30)
        return Direction(
            name=f"clip:{prompt}",
            label=prompt,
            vector=vector.reshape(1, -1),  # [1, w_dim]
            layers=None,
            slider_range=SLIDER_RANGE,
            group="Text (CLIP)",
            provenance=f"CLIP global direction for {prompt!r} vs {neutral or self.neutral!r}: "
            f"{int(keep.sum())} of {len(keep)} principal components of W (threshold {self.threshold})",
        )

    def directions(self, generator: Generator) -> list[Direction]:
        """One direction per configured prompt."""
        return [self.direction_for(generator, prompt) for prompt in self.prompts]


# ---------------------------------------------------------------------------------------------- plugin


def _weights_path(context: PluginContext) -> Path | None:
    explicit = context.options.get("model")
    if explicit:
        return Path(explicit).expanduser()
    try:
        from fluidsrv.manifest import WeightsError
        from fluidsrv.weights_manager import WeightsManager

        return WeightsManager.from_context(context).path_for(WEIGHTS_NAME)
    except (WeightsError, OSError):
        return context.cache_dir / "open_clip_vit_b32_openai.safetensors"


def load_clip(path: Path, arch: str = DEFAULT_ARCH) -> tuple[Any, Any]:
    """Build open_clip's ``arch`` without pretrained weights, load ``path`` strictly; return (model, tokenizer)."""
    import open_clip

    model = open_clip.create_model(arch, pretrained=None)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: Any = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    model.load_state_dict(state, strict=True)
    return model.eval(), open_clip.get_tokenizer(arch)


def _unavailable(context: PluginContext) -> str | None:
    if importlib.util.find_spec("open_clip") is None:
        return "open-clip-torch is not installed (pip install -e .[clip])"
    path = _weights_path(context)
    if path is None or not path.is_file():
        return (
            f"CLIP weights {path} are missing: they are user-provided (see `fluidsrv weights list`, entry "
            f"{WEIGHTS_NAME!r}) or set the plugin option 'model'"
        )
    return None


def _create(context: PluginContext) -> ClipTextDirections:
    options = context.options
    path = _weights_path(context)
    assert path is not None
    model, tokenizer = load_clip(path, str(options.get("arch", DEFAULT_ARCH)))
    prompts = tuple(p.strip() for p in str(options.get("prompts", DEFAULT_PROMPTS)).split("|") if p.strip())
    return ClipTextDirections(
        model,
        tokenizer,
        prompts=prompts,
        neutral=str(options.get("neutral", "a face")),
        k=option_int(options, "k", 32),
        samples=option_int(options, "samples", 4),
        threshold=float(options.get("threshold", 0.1)),
        seed=option_int(options, "seed", 0, minimum=0),
        device=context.device,
    )


@hookimpl
def fluidsrv_directions() -> list[PluginFactory[DirectionSource]]:
    """Register the CLIP text direction source."""
    return [
        PluginFactory(
            "clip",
            "Text prompts to directions with CLIP global directions (user-provided open_clip weights)",
            create=_create,
            unavailable=_unavailable,
        )
    ]
