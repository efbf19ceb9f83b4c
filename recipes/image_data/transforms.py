"""Image transforms (torchvision v2) and their hook into a ``datasets.Dataset``."""

from __future__ import annotations

from typing import Any

import torch
from torchvision.transforms import v2

from .specs import DatasetSpec

__all__ = ["build_transform", "with_image_transforms"]


def build_transform(spec: DatasetSpec, train: bool) -> v2.Compose:
    """PIL/ndarray/tensor image -> normalised float tensor ``(channels, size, size)``.

    Training adds the paper's augmentation: ``RandomCrop(size, padding=spec.crop_padding)`` (zero
    padding) and, if ``spec.hflip``, ``RandomHorizontalFlip(0.5)``. Colour mode is forced to the
    spec's channel count (TinyImageNet has a few grayscale images).
    """
    ops: list[Any] = [v2.ToImage(), v2.RGB() if spec.channels == 3 else v2.Grayscale(1)]
    if train:
        ops.append(v2.RandomCrop(spec.image_size, padding=spec.crop_padding))
        if spec.hflip:
            ops.append(v2.RandomHorizontalFlip())
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(spec.mean, spec.std)]
    return v2.Compose(ops)


def with_image_transforms(dataset: Any, spec: DatasetSpec, train: bool) -> Any:
    """The dataset with an on-the-fly transform to ``{"pixel_values", "labels"}`` rows.

    Random augmentation is drawn per image each time it is read (``datasets.with_transform``), from
    torch's global RNG, so a seeded run is reproducible with ``dataloader_num_workers=0``.
    """
    transform = build_transform(spec, train)

    def apply(batch: dict[str, list]) -> dict[str, Any]:
        return {"pixel_values": [transform(image) for image in batch[spec.image_column]],
                "labels": list(batch[spec.label_column])}

    return dataset.with_transform(apply)
