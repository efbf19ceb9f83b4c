"""What the recipe needs to know about each data set: where it lives, its columns, its statistics.

Mean and std are per-channel statistics of the training images in [0, 1]; augmentation follows
the paper (random crop with 4 pixels of zero padding and horizontal flip, Section 4.1), except
for SVHN, whose digits are not mirror-symmetric (no flip).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DatasetSpec", "DATASETS", "get_spec"]


@dataclass(frozen=True)
class DatasetSpec:
    """One image-classification data set.

    Attributes:
        name: the recipe's name (``--dataset``).
        hub_id, hub_config: ``datasets.load_dataset(hub_id, hub_config)``; ``None`` if local only.
        image_column, label_column: column names in that data set.
        train_split, test_split: split names (TinyImageNet's test labels are private: ``valid``).
        num_classes, image_size, channels: what the model is built for.
        mean, std: per-channel normalisation.
        hflip: random horizontal flip during training.
        crop_padding: zero padding of the random crop (paper: 4).
    """

    name: str
    hub_id: str | None
    image_column: str
    label_column: str
    num_classes: int
    image_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hub_config: str | None = None
    train_split: str = "train"
    test_split: str = "test"
    hflip: bool = True
    crop_padding: int = 4


DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in (
    DatasetSpec("cifar10", "uoft-cs/cifar10", "img", "label", 10, 32, 3,
                (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    DatasetSpec("cifar100", "uoft-cs/cifar100", "img", "fine_label", 100, 32, 3,
                (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    DatasetSpec("svhn", "ufldl-stanford/svhn", "image", "label", 10, 32, 3,
                (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), hub_config="cropped_digits",
                hflip=False),
    DatasetSpec("tiny_imagenet", "zh-plus/tiny-imagenet", "image", "label", 200, 64, 3,
                (0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262), test_split="valid"),
    # Offline: the Debian package dataset-fashion-mnist (see fashion_mnist.py); Hub otherwise.
    DatasetSpec("fashion_mnist", "zalando-datasets/fashion_mnist", "image", "label", 10, 28, 1,
                (0.2860,), (0.3530,)),
)}


def get_spec(name: str) -> DatasetSpec:
    """The spec of ``name`` (case and ``-`` tolerant), or a ``ValueError`` listing the choices."""
    key = name.lower().replace("-", "_")
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {sorted(DATASETS)}")
    return DATASETS[key]
