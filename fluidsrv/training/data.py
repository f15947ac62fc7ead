"""The aligned-face training data: zip shards of WebP faces, their meta JSON, the held-out split and batches.

The data folder (see ``../shared/data/README.md``) holds ``faces128-NN.zip`` shards of ``NNNNNN.webp`` files
(128×128 RGB, FFHQ-aligned, stored uncompressed so members are read at random) and ``faces128-meta.json`` with
one row per face id. Ids ≥ :data:`HELDOUT_FIRST_ID` are the held-out evaluation set and are never trained on.

Only the shards present in the folder are used, so a run can carry a subset of them (e.g. one shard to a
remote GPU whose upload size is limited). Face ids come from the member names, so the meta JSON is optional
for training.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

HELDOUT_FIRST_ID = 44_000
"""Faces with an id at or above this are held out for evaluation (the last 1,665 of 45,665)."""

NATIVE_RESOLUTION = 128
SHARD_GLOB = "faces128-*.zip"
META_FILE = "faces128-meta.json"

Split = Literal["train", "heldout", "all"]


def in_split(face_id: int, split: Split) -> bool:
    """Return whether a face id belongs to a split (``train``: id < 44,000; ``heldout``: the rest)."""
    if split == "all":
        return True
    if split == "train":
        return face_id < HELDOUT_FIRST_ID
    if split == "heldout":
        return face_id >= HELDOUT_FIRST_ID
    raise ValueError(f"unknown split {split!r}; expected train, heldout or all")


def read_meta(data_dir: Path) -> list[dict[str, Any]]:
    """Return the meta JSON rows (row ``i`` describes face id ``i``: shard, file, source, padded, ...)."""
    rows = json.loads((Path(data_dir) / META_FILE).read_text())
    if not isinstance(rows, list):
        raise ValueError(f"{META_FILE} must hold a JSON list of rows")
    for index, row in enumerate(rows):
        if row.get("id") != index:
            raise ValueError(f"{META_FILE}: row {index} has id {row.get('id')!r}; rows must be in id order")
    return rows


def shard_paths(data_dir: Path) -> list[Path]:
    """Return the face shards present in ``data_dir``, sorted by name."""
    paths = sorted(Path(data_dir).glob(SHARD_GLOB))
    if not paths:
        raise FileNotFoundError(f"no {SHARD_GLOB} shards in {data_dir}")
    return paths


@dataclass(frozen=True)
class FaceEntry:
    """Where one face lives: its id, its shard and its member name inside the shard."""

    face_id: int
    shard: Path
    member: str


def list_faces(data_dir: Path, split: Split = "train") -> list[FaceEntry]:
    """Return the faces of a split found in the shards present, in id order."""
    entries = []
    for shard in shard_paths(data_dir):
        with zipfile.ZipFile(shard) as archive:
            for member in archive.namelist():
                stem, _, extension = member.rpartition(".")
                if extension != "webp" or not stem.isdigit():
                    continue
                face_id = int(stem)
                if in_split(face_id, split):
                    entries.append(FaceEntry(face_id, shard, member))
    entries.sort(key=lambda entry: entry.face_id)
    return entries


class FaceShardDataset(Dataset[torch.Tensor]):
    """Faces read lazily from the zip shards as uint8 ``[3, R, R]`` tensors, optionally with mirrored copies.

    With ``xflip`` the dataset has ``2 × faces`` items: item ``i + faces`` is item ``i`` mirrored left-right
    (the StyleGAN "mirror" convention, so every epoch sees both orientations).
    """

    def __init__(
        self,
        data_dir: Path,
        split: Split = "train",
        resolution: int = NATIVE_RESOLUTION,
        xflip: bool = False,
        limit: int | None = None,
    ) -> None:
        if resolution < 4 or resolution > NATIVE_RESOLUTION or resolution & (resolution - 1):
            raise ValueError(f"resolution must be a power of two in [4, {NATIVE_RESOLUTION}], got {resolution}")
        entries = list_faces(data_dir, split)
        if limit is not None:
            entries = entries[:limit]  # the data were shuffled before sharding: any prefix is representative
        if not entries:
            raise ValueError(f"no {split} faces in {data_dir}")
        self.data_dir = Path(data_dir)
        self.split = split
        self.resolution = resolution
        self.xflip = xflip
        self.entries = entries
        self._archives: dict[Path, zipfile.ZipFile] = {}
        self._archives_pid = os.getpid()

    @property
    def num_faces(self) -> int:
        """Number of distinct faces (items without the mirrored copies)."""
        return len(self.entries)

    def __len__(self) -> int:
        return self.num_faces * (2 if self.xflip else 1)

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        image = self.load_face(index % self.num_faces)  # [R, R, 3] uint8
        if index >= self.num_faces:
            image = image[:, ::-1]
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))  # [3, R, R] uint8

    def face_id(self, index: int) -> int:
        """Return the face id behind an item (mirrored items share their original's id)."""
        return self.entries[index % self.num_faces].face_id

    def load_face(self, face_index: int) -> np.ndarray:
        """Decode one face (by position among the faces, not id) as uint8 RGB ``[R, R, 3]``."""
        entry = self.entries[face_index]
        data = self._archive(entry.shard).read(entry.member)
        with Image.open(io.BytesIO(data)) as decoded:
            image = decoded.convert("RGB")
        if image.size != (self.resolution, self.resolution):
            image = image.resize((self.resolution, self.resolution), Image.Resampling.LANCZOS)
        array = np.asarray(image)
        assert array.shape == (self.resolution, self.resolution, 3), array.shape
        return array

    def _archive(self, shard: Path) -> zipfile.ZipFile:
        # Zip handles must not be shared across forked DataLoader workers: reopen them in each process.
        if self._archives_pid != os.getpid():
            self._archives = {}
            self._archives_pid = os.getpid()
        if shard not in self._archives:
            self._archives[shard] = zipfile.ZipFile(shard)
        return self._archives[shard]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_archives"] = {}
        return state


class InfiniteSampler(Sampler[int]):
    """Endless item indices: a fresh seeded random permutation of the dataset after each pass."""

    def __init__(self, size: int, seed: int = 0) -> None:
        assert size > 0
        self.size = size
        self.seed = seed

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed)
        while True:
            yield from torch.randperm(self.size, generator=generator).tolist()


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """Convert uint8 images ``[N, 3, H, W]`` to float32 in [-1, 1]."""
    assert images.dtype == torch.uint8 and images.ndim == 4, (images.dtype, images.shape)
    return images.float() / 127.5 - 1.0  # [N, 3, H, W]


def decode_all(dataset: FaceShardDataset, num_workers: int = 0) -> torch.Tensor:
    """Decode every face of a dataset (without mirrored copies) into one uint8 tensor ``[faces, 3, R, R]``."""
    faces = torch.empty(dataset.num_faces, 3, dataset.resolution, dataset.resolution, dtype=torch.uint8)
    plain = torch.utils.data.Subset(dataset, range(dataset.num_faces))
    loader = DataLoader(plain, batch_size=256, shuffle=False, num_workers=num_workers)
    start = 0
    for batch in loader:  # [B, 3, R, R] uint8
        faces[start : start + len(batch)] = batch
        start += len(batch)
    assert start == dataset.num_faces
    return faces


class BatchStream:
    """Endless random training batches as float ``[B, 3, R, R]`` tensors in [-1, 1] on a device.

    With ``preload`` every face is decoded once and kept on the device (about 2.2 GB for 44k faces at 128²),
    and batches are gathered and mirrored there: the fast path for a GPU. Without it batches are decoded as
    they are drawn (0.5 ms a face), by ``num_workers`` DataLoader processes: enough for CPU training, where a
    training step takes far longer than decoding its batch.
    """

    def __init__(
        self,
        dataset: FaceShardDataset,
        batch_size: int,
        device: torch.device | str = "cpu",
        seed: int = 0,
        preload: bool = False,
        num_workers: int = 0,
    ) -> None:
        assert batch_size > 0
        self.dataset = dataset
        self.batch_size = batch_size
        self.device = torch.device(device)
        self._generator = torch.Generator().manual_seed(seed)
        self._faces: torch.Tensor | None = None
        self._loader_iter: Iterator[torch.Tensor] | None = None
        if preload:
            self._faces = decode_all(dataset, num_workers).to(self.device)  # [F, 3, R, R] uint8
        else:
            loader = DataLoader(
                dataset,
                batch_size=batch_size,
                sampler=InfiniteSampler(len(dataset), seed),
                num_workers=num_workers,
                pin_memory=self.device.type == "cuda",
                drop_last=True,
                persistent_workers=num_workers > 0,
            )
            self._loader_iter = iter(loader)

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> torch.Tensor:
        if self._faces is not None:
            images = self._preloaded_batch()
        else:
            assert self._loader_iter is not None
            images = next(self._loader_iter).to(self.device, non_blocking=True)
        return to_model_range(images)  # [B, 3, R, R]

    def _preloaded_batch(self) -> torch.Tensor:
        assert self._faces is not None
        items = torch.randint(len(self.dataset), (self.batch_size,), generator=self._generator)  # [B]
        faces = (items % self.dataset.num_faces).to(self.device)
        mirrored = (items >= self.dataset.num_faces).to(self.device)[:, None, None, None]  # [B, 1, 1, 1]
        images = self._faces[faces]  # [B, 3, R, R] uint8
        return torch.where(mirrored, images.flip(3), images)
