"""Pascal VOC (XML boxes, standard folder layout) to Ultralytics YOLO labels.

Input: a VOC year folder with ``Annotations/<id>.xml``, ``JPEGImages/<id>.jpg`` and
``ImageSets/Main/<set>.txt`` (``VOCdevkit/VOC2007`` or the folder above it).

Output (``out_dir``)::

    images/<set>/<id>.jpg      links to the VOC images (copies where links are impossible)
    labels/<set>/<id>.txt      one "class xc yc w h" line per non-difficult object (0..1)
    difficult/<set>/<id>.txt   the difficult objects, same format (read by the VOC evaluator)
    data.yaml                  Ultralytics dataset file (train: trainval, val and test: test)

Boxes. VOC stores 1-based, inclusive pixel indices: ``xmin = 1`` is the first pixel column and
``xmax = W`` the last, so the box covers the continuous extent ``[xmin - 1, xmax]`` in pixel
units. YOLO wants the centre and size of that extent divided by the image size::

    xc = (xmin - 1 + xmax) / 2 / W    w = (xmax - xmin + 1) / W     (same for y with H)

clipped to the image. (Ultralytics' own VOC script uses ``(xmin + xmax) / 2 - 1`` and
``xmax - xmin``, i.e. half a pixel left and one pixel narrower.)

Difficult objects, as the VOC protocol does (devkit ``VOCevaldet``): they are not ground truth
positives, so they are left out of the YOLO labels (no recall is owed for them), and a detection
whose best-overlapping box of its class (IoU > 0.5) is a difficult one is ignored, neither a
true nor a false positive. The second rule is applied by :func:`voc_ignore_mask` in the recipe's
validator, from the ``difficult/`` files. Training uses the same labels, i.e. no difficult boxes,
as Ultralytics' VOC pipeline does.
"""

from __future__ import annotations

import os
import shutil
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["VOC_CLASSES", "VOCObject", "VOCAnnotation", "parse_annotation", "to_yolo_box",
           "find_voc_dir", "read_image_set", "convert_split", "convert_voc", "difficult_path",
           "read_yolo_boxes", "voc_ignore_mask", "SplitStats"]

#: The 20 VOC classes in the devkit's order (class id = index).
VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class VOCObject:
    """One ``<object>``: class name, box as written (1-based inclusive pixels), flags."""

    name: str
    box: tuple[float, float, float, float]  # xmin, ymin, xmax, ymax
    difficult: bool = False
    truncated: bool = False


@dataclass
class VOCAnnotation:
    """One annotation file: image size in pixels, file name, objects."""

    width: int
    height: int
    filename: str
    objects: list[VOCObject] = field(default_factory=list)


def _flag(node: ET.Element, tag: str) -> bool:
    text = node.findtext(tag)
    return text is not None and text.strip() not in ("", "0")


def parse_annotation(path: str | os.PathLike) -> VOCAnnotation:
    """Read a VOC XML file (a missing ``<difficult>`` counts as 0, as in the devkit)."""
    root = ET.parse(path).getroot()
    size = root.find("size")
    if size is None or size.findtext("width") is None or size.findtext("height") is None:
        raise ValueError(f"{path}: no <size><width>/<height>; a VOC annotation needs the image size")
    width, height = int(float(size.findtext("width"))), int(float(size.findtext("height")))
    if width <= 0 or height <= 0:
        raise ValueError(f"{path}: image size {width}x{height} is not positive")
    objects = []
    for obj in root.iter("object"):
        bnd = obj.find("bndbox")
        if bnd is None:
            raise ValueError(f"{path}: an <object> has no <bndbox>")
        box = tuple(float(bnd.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        objects.append(VOCObject(obj.findtext("name", "").strip(), box,
                                 _flag(obj, "difficult"), _flag(obj, "truncated")))
    return VOCAnnotation(width, height, root.findtext("filename", "").strip(), objects)


def to_yolo_box(box: Sequence[float], width: int, height: int) -> tuple[float, float, float, float]:
    """VOC ``(xmin, ymin, xmax, ymax)`` (1-based inclusive) -> YOLO ``(xc, yc, w, h)`` in 0..1."""
    x0, y0 = min(max(box[0] - 1, 0.0), width), min(max(box[1] - 1, 0.0), height)
    x1, y1 = min(max(box[2], 0.0), width), min(max(box[3], 0.0), height)
    return ((x0 + x1) / 2 / width, (y0 + y1) / 2 / height, (x1 - x0) / width, (y1 - y0) / height)


def find_voc_dir(root: str | os.PathLike, year: str = "2007") -> Path:
    """The folder holding ``Annotations/``: ``root`` itself, ``root/VOC<year>`` or
    ``root/VOCdevkit/VOC<year>``."""
    root = Path(root)
    for cand in (root, root / f"VOC{year}", root / "VOCdevkit" / f"VOC{year}"):
        if (cand / "Annotations").is_dir():
            return cand
    raise FileNotFoundError(
        f"no VOC data under {root}: expected Annotations/, JPEGImages/ and ImageSets/Main/ in it, in "
        f"{root}/VOC{year} or in {root}/VOCdevkit/VOC{year} (the layout of the official VOC tar files)")


def read_image_set(voc_dir: str | os.PathLike, name: str) -> list[str]:
    """Image ids of ``ImageSets/Main/<name>.txt`` (e.g. ``trainval``, ``test``)."""
    path = Path(voc_dir) / "ImageSets" / "Main" / f"{name}.txt"
    if not path.exists():
        have = sorted(p.stem for p in path.parent.glob("*.txt") if "_" not in p.stem)
        raise FileNotFoundError(f"no image set {path}; available: {have or 'none'}")
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def _image_of(voc_dir: Path, image_id: str, filename: str) -> Path:
    candidates = [voc_dir / "JPEGImages" / f"{image_id}.jpg"]
    if filename:
        candidates.append(voc_dir / "JPEGImages" / filename)
    candidates += [voc_dir / "JPEGImages" / f"{image_id}{s}" for s in IMAGE_SUFFIXES]
    for cand in candidates:
        if cand.is_file():
            return cand
    raise FileNotFoundError(f"no image for {image_id} in {voc_dir / 'JPEGImages'}")


def _link(src: Path, dst: Path) -> None:
    if dst.is_symlink() or dst.exists():
        if dst.resolve() == src.resolve():
            return
        dst.unlink()
    try:
        dst.symlink_to(src.resolve())
    except OSError:  # file systems without symlinks
        shutil.copy2(src, dst)


def _lines(rows: list[tuple[int, tuple[float, float, float, float]]]) -> str:
    return "".join(f"{c} {x:.6f} {y:.6f} {w:.6f} {h:.6f}\n" for c, (x, y, w, h) in rows)


@dataclass
class SplitStats:
    """What one converted split holds."""

    image_set: str
    images: int = 0
    objects: int = 0
    difficult: int = 0


def remove_others(folder: Path, stems: set[str]) -> None:
    """Delete the files (and links) in ``folder`` whose stem is not in ``stems``: what an earlier
    conversion into the same place left."""
    for path in folder.iterdir():
        if path.stem not in stems and (path.is_file() or path.is_symlink()):
            path.unlink()


def convert_split(voc_dir: str | os.PathLike, image_set: str, out_dir: str | os.PathLike,
                  classes: Sequence[str] = VOC_CLASSES) -> SplitStats:
    """Convert one image set to ``out_dir/{images,labels,difficult}/<image_set>/``."""
    voc_dir, out_dir = Path(voc_dir), Path(out_dir)
    index = {name: i for i, name in enumerate(classes)}
    dirs = {kind: out_dir / kind / image_set for kind in ("images", "labels", "difficult")}
    image_ids = read_image_set(voc_dir, image_set)
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
        # an earlier conversion's images (other tiles, another --voc-root) would be trained and
        # scored with these: Ultralytics reads every image in the folder
        remove_others(d, set(image_ids))
    (out_dir / "labels" / f"{image_set}.cache").unlink(missing_ok=True)  # Ultralytics' label cache
    stats = SplitStats(image_set)
    for image_id in image_ids:
        xml = voc_dir / "Annotations" / f"{image_id}.xml"
        ann = parse_annotation(xml)
        rows: dict[bool, list] = {False: [], True: []}
        for obj in ann.objects:
            if obj.name not in index:
                raise ValueError(f"{xml}: class {obj.name!r} is not one of the {len(classes)} classes "
                                 f"{list(classes)[:5]}...; pass the data set's class list")
            rows[obj.difficult].append((index[obj.name], to_yolo_box(obj.box, ann.width, ann.height)))
        image = _image_of(voc_dir, image_id, ann.filename)
        _link(image, dirs["images"] / f"{image_id}{image.suffix.lower()}")
        (dirs["labels"] / f"{image_id}.txt").write_text(_lines(rows[False]))
        (dirs["difficult"] / f"{image_id}.txt").write_text(_lines(rows[True]))
        stats.images += 1
        stats.objects += len(rows[False])
        stats.difficult += len(rows[True])
    if not stats.images:
        raise ValueError(f"image set {image_set!r} of {voc_dir} is empty")
    return stats


def convert_voc(voc_root: str | os.PathLike, out_dir: str | os.PathLike, *,
                splits: dict[str, str] | None = None, classes: Sequence[str] = VOC_CLASSES,
                year: str = "2007") -> tuple[Path, list[SplitStats]]:
    """Convert a VOC folder; returns the ``data.yaml`` path and per-image-set stats.

    ``splits`` maps Ultralytics split -> VOC image set; the default trains on VOC2007 trainval and
    validates and tests on VOC2007 test (not Ultralytics' VOC.yaml, which mixes 2007 and 2012).
    """
    import yaml

    splits = splits or {"train": "trainval", "val": "test", "test": "test"}
    voc_dir, out_dir = find_voc_dir(voc_root, year), Path(out_dir).resolve()
    stats = [convert_split(voc_dir, image_set, out_dir, classes)
             for image_set in dict.fromkeys(splits.values())]
    data = {"path": str(out_dir), **{split: f"images/{image_set}" for split, image_set in splits.items()},
            "names": dict(enumerate(classes))}
    path = out_dir / "data.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path, stats


# ---------------------------------------------------------------------- evaluation helpers
def difficult_path(image_file: str | os.PathLike) -> Path:
    """``.../images/<set>/<id>.jpg`` -> ``.../difficult/<set>/<id>.txt``."""
    parts = list(Path(image_file).parts)
    i = len(parts) - 1 - parts[::-1].index("images")
    return Path(*parts[:i], "difficult", *parts[i + 1:]).with_suffix(".txt")


def read_yolo_boxes(path: str | os.PathLike, width: float, height: float) -> np.ndarray:
    """Rows ``class x0 y0 x1 y1`` in pixels from a YOLO label file (empty if missing)."""
    path = Path(path)
    if not path.exists() or not path.read_text().strip():
        return np.zeros((0, 5))
    rows = np.loadtxt(path, ndmin=2)
    xc, yc, w, h = rows[:, 1] * width, rows[:, 2] * height, rows[:, 3] * width, rows[:, 4] * height
    return np.stack([rows[:, 0], xc - w / 2, yc - h / 2, xc + w / 2, yc + h / 2], axis=1)


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix of ``(n, 4)`` and ``(m, 4)`` xyxy boxes."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None, :] - inter, 1e-12)


def voc_ignore_mask(pred_boxes: np.ndarray, pred_cls: np.ndarray, gt_boxes: np.ndarray,
                    gt_cls: np.ndarray, hard_boxes: np.ndarray, hard_cls: np.ndarray,
                    iou: float = 0.5) -> np.ndarray:
    """Detections the VOC protocol ignores: best overlap of the class is difficult, IoU > ``iou``.

    All boxes xyxy in one coordinate frame. Returns a boolean mask over the detections.
    """
    pred_boxes, hard_boxes = np.asarray(pred_boxes, float).reshape(-1, 4), np.asarray(hard_boxes, float).reshape(-1, 4)
    gt_boxes = np.asarray(gt_boxes, float).reshape(-1, 4)
    ignore = np.zeros(len(pred_boxes), dtype=bool)
    if not len(pred_boxes) or not len(hard_boxes):
        return ignore
    boxes = np.concatenate([gt_boxes, hard_boxes])
    classes = np.concatenate([np.asarray(gt_cls).reshape(-1), np.asarray(hard_cls).reshape(-1)])
    is_hard = np.r_[np.zeros(len(gt_boxes), bool), np.ones(len(hard_boxes), bool)]
    overlap = _iou(pred_boxes, boxes)
    overlap[np.asarray(pred_cls).reshape(-1, 1) != classes[None, :]] = -1.0
    best = overlap.argmax(1)
    return (overlap[np.arange(len(pred_boxes)), best] > iou) & is_hard[best]
