"""Data for the image-classification recipe: data-set specs, transforms, loading (Hub or local)."""

from .loading import load_image_dataset
from .specs import DATASETS, DatasetSpec, get_spec
from .transforms import build_transform, with_image_transforms

__all__ = ["DATASETS", "DatasetSpec", "get_spec", "build_transform", "with_image_transforms",
           "load_image_dataset"]
