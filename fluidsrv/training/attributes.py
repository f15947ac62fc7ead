"""Train the small age / gender classifier (:class:`fluidsrv.models.attributes.AttributeNet`) on UTKFace labels.

The aligned-face shards (``../shared/data``) carry ``age`` and ``gender`` for the UTKFace rows of their meta
JSON. Faces with an id below :data:`fluidsrv.training.data.HELDOUT_FIRST_ID` train the network; the held-out
UTKFace faces measure it (age MAE in years, gender accuracy). All faces are decoded once into memory at the
network's input size, so an epoch is pure compute: a few CPU minutes.

``fluidsrv train attributes --data ../shared/data --out weights/attributes-128.safetensors`` runs it.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from fluidsrv.models.attributes import (
    AGE_OFFSET,
    AGE_SCALE,
    AttributeNet,
    AttributeNetConfig,
    save_attribute_net,
)
from fluidsrv.training.data import FaceShardDataset, read_meta, to_model_range

log = logging.getLogger(__name__)

LABELLED_SOURCE = "UTKFace"
GENDER_MALE = 1.0
NO_GENDER = -1.0  # label of faces whose UTKFace file name gave no gender (only their age trains)


@dataclass(frozen=True)
class LabelledFaces:
    """Decoded faces with labels: images uint8 [N, 3, S, S], age float [N] (years), gender [N] (1 male, 0, -1)."""

    images: torch.Tensor
    age: torch.Tensor
    gender: torch.Tensor
    face_ids: torch.Tensor


@dataclass(frozen=True)
class AttributeMetrics:
    """Held-out quality: age mean absolute error in years, gender accuracy, and how many faces were scored."""

    age_mae: float
    gender_accuracy: float
    faces: int
    gendered_faces: int


def load_labelled_faces(data_dir: Path, split: str, size: int, limit: int | None = None) -> LabelledFaces:
    """Decode the UTKFace faces of ``split`` ("train" / "heldout") at ``size`` px with their age and gender."""
    rows = read_meta(data_dir)
    dataset = FaceShardDataset(data_dir, split=split, resolution=size)  # type: ignore[arg-type]
    chosen = [
        index
        for index, entry in enumerate(dataset.entries)
        if rows[entry.face_id].get("source") == LABELLED_SOURCE and "age" in rows[entry.face_id]
    ]
    if limit is not None:
        chosen = chosen[:limit]
    if not chosen:
        raise ValueError(f"no labelled {LABELLED_SOURCE} faces in the {split} split of {data_dir}")
    images = torch.empty(len(chosen), 3, size, size, dtype=torch.uint8)  # [N, 3, S, S]
    ages, genders, ids = [], [], []
    for slot, index in enumerate(chosen):
        images[slot] = torch.from_numpy(dataset.load_face(index).transpose(2, 0, 1).copy())
        row = rows[dataset.entries[index].face_id]
        ages.append(float(row["age"]))
        genders.append({"male": GENDER_MALE, "female": 0.0}.get(row.get("gender", ""), NO_GENDER))
        ids.append(dataset.entries[index].face_id)
    return LabelledFaces(images, torch.tensor(ages), torch.tensor(genders), torch.tensor(ids))


def augment(images: torch.Tensor, generator: torch.Generator, shift: int = 4) -> torch.Tensor:
    """Random left-right mirror and a random translation by up to ``shift`` px (reflect padding) of [N, 3, S, S]."""
    batch, _, size, _ = images.shape
    mirror = torch.rand(batch, generator=generator) < 0.5  # [N]
    images = torch.where(mirror[:, None, None, None], images.flip(3), images)
    padded = F.pad(images, (shift, shift, shift, shift), mode="reflect")  # [N, 3, S + 2s, S + 2s]
    dx, dy = torch.randint(0, 2 * shift + 1, (2,), generator=generator).tolist()  # one shift per batch: cheap
    return padded[:, :, dy : dy + size, dx : dx + size]  # [N, 3, S, S]


def attribute_loss(net: AttributeNet, images: torch.Tensor, age: torch.Tensor, gender: torch.Tensor) -> torch.Tensor:
    """Smooth-L1 on the scaled age plus binary cross-entropy on the gender where it is known."""
    predicted_age, gender_logit = net(images)  # [N], [N]
    age_loss = F.smooth_l1_loss((predicted_age - AGE_OFFSET) / AGE_SCALE, (age - AGE_OFFSET) / AGE_SCALE)
    known = gender >= 0  # [N]
    gender_loss = (
        F.binary_cross_entropy_with_logits(gender_logit[known], gender[known]) if known.any() else age_loss * 0.0
    )
    return age_loss + gender_loss


@torch.no_grad()
def evaluate(net: AttributeNet, faces: LabelledFaces, batch_size: int = 256) -> AttributeMetrics:
    """Age MAE (years) and gender accuracy of ``net`` on ``faces`` (mirror-averaged predictions)."""
    net.eval()
    ages, logits = [], []
    for start in range(0, len(faces.age), batch_size):
        images = to_model_range(faces.images[start : start + batch_size])  # [B, 3, S, S]
        age, logit = net(images)
        age_flip, logit_flip = net(images.flip(3))
        ages.append((age + age_flip) / 2)
        logits.append((logit + logit_flip) / 2)
    age_pred, logit_pred = torch.cat(ages), torch.cat(logits)  # [N], [N]
    known = faces.gender >= 0
    correct = ((logit_pred[known] > 0).float() == faces.gender[known]).float()
    return AttributeMetrics(
        age_mae=float((age_pred - faces.age).abs().mean()),
        gender_accuracy=float(correct.mean()) if known.any() else math.nan,
        faces=len(faces.age),
        gendered_faces=int(known.sum()),
    )


def train_attribute_net(
    train: LabelledFaces,
    *,
    epochs: int = 8,
    batch_size: int = 128,
    lr: float = 3e-3,
    weight_decay: float = 5e-4,
    seed: int = 0,
    minutes: float | None = None,
    config: AttributeNetConfig | None = None,
) -> AttributeNet:
    """Train a fresh :class:`AttributeNet` with AdamW and a one-cycle schedule; stop early after ``minutes``."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    net = AttributeNet(config or AttributeNetConfig(input_size=train.images.shape[-1]))
    assert net.config.input_size == train.images.shape[-1], "faces must be decoded at the network's input size"
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = max(1, len(train.age) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.15
    )
    started = time.monotonic()
    for epoch in range(epochs):
        net.train()
        order = torch.randperm(len(train.age), generator=generator)  # [N]
        running = 0.0
        for step in range(steps_per_epoch):
            batch = order[step * batch_size : (step + 1) * batch_size]
            images = augment(to_model_range(train.images[batch]), generator)  # [B, 3, S, S]
            loss = attribute_loss(net, images, train.age[batch], train.gender[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            running += loss.item()
        elapsed = (time.monotonic() - started) / 60
        log.info("epoch %d/%d: loss %.4f (%.1f min)", epoch + 1, epochs, running / steps_per_epoch, elapsed)
        if minutes is not None and elapsed > minutes:
            log.warning("stopping after %d epochs: the %.1f-minute budget is spent", epoch + 1, minutes)
            break
    return net.eval()


# ---------------------------------------------------------------------------------------------- CLI target


def register_target(targets: Any) -> None:
    """Add ``train attributes`` to the ``train`` subcommand's targets."""
    parser: argparse.ArgumentParser = targets.add_parser(
        "attributes",
        help="train the small age/gender classifier on the UTKFace labels",
        description="Train AttributeNet on the UTKFace rows of the aligned-face shards (ids < 44,000), report "
        "age MAE and gender accuracy on the held-out ids >= 44,000, and write fp16 safetensors.",
    )
    parser.add_argument("--data", type=Path, required=True, help="folder with faces128-*.zip and faces128-meta.json")
    parser.add_argument(
        "--out", type=Path, default=Path("weights/attributes-128.safetensors"), help="output safetensors file"
    )
    parser.add_argument("--epochs", type=int, default=8, help="passes over the training faces (default 8)")
    parser.add_argument("--batch", type=int, default=128, help="batch size (default 128)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default 3e-3)")
    parser.add_argument("--size", type=int, default=64, help="input side in pixels (default 64)")
    parser.add_argument("--minutes", type=float, help="stop after the epoch that passes this many minutes")
    parser.add_argument("--limit", type=int, help="train on only the first N labelled faces (smoke tests)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.set_defaults(handler=run_target)


def run_target(args: argparse.Namespace) -> int:
    """Decode the faces, train, evaluate on the held-out faces and save; print the metrics."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    started = time.monotonic()
    train = load_labelled_faces(args.data, "train", args.size, args.limit)
    heldout = load_labelled_faces(args.data, "heldout", args.size)
    print(
        f"decoded {len(train.age)} training and {len(heldout.age)} held-out faces in {time.monotonic() - started:.0f} s"
    )
    config = AttributeNetConfig(input_size=args.size)
    net = train_attribute_net(
        train, epochs=args.epochs, batch_size=args.batch, lr=args.lr, seed=args.seed, minutes=args.minutes,
        config=config,
    )  # fmt: skip
    metrics = evaluate(net, heldout)
    minutes = (time.monotonic() - started) / 60
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_attribute_net(
        args.out,
        net,
        {
            "heldout_age_mae": f"{metrics.age_mae:.3f}",
            "heldout_gender_accuracy": f"{metrics.gender_accuracy:.4f}",
            "heldout_faces": str(metrics.faces),
            "train_faces": str(len(train.age)),
            "epochs": str(args.epochs),
            "train_minutes": f"{minutes:.1f}",
        },
    )
    print(
        f"held-out ({metrics.faces} faces): age MAE {metrics.age_mae:.2f} years, gender accuracy "
        f"{metrics.gender_accuracy:.3f} ({metrics.gendered_faces} faces); {minutes:.1f} min; wrote {args.out}"
    )
    return 0
