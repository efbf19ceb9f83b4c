"""Real aerial tree-crown boxes in the Pascal VOC layout, from the PyPI wheel of DeepForest.

``deepforest`` 2.1.0 ships four RGB airborne images with VOC XML boxes in ``deepforest/data/``
(NEON sites; 2019_YELL_2_528000_4978000_image_crop2: 2299x2472 px, 574 trees;
2019_YELL_2_541000_4977000_image_crop: 1249x1035 px, 279 trees; OSBS_029: 400x400, 61 trees;
SOAP_061: 400x400, 37 trees labelled Alive/Dead). The wheel is read as a zip, so none of the
package's heavy dependencies are installed.

:func:`build_voc` cuts the images into ``tile`` x ``tile`` tiles (the last row/column is shifted
back inside the image) and writes a standard VOC folder (``Annotations/``, ``JPEGImages/``,
``ImageSets/Main/{trainval,test}.txt``) that the recipe converts like VOC2007 itself:

* one class, ``tree`` (Alive/Dead/Tree merged);
* the two YELL sites are different places: YELL ..._crop2 (and SOAP_061) give ``trainval``, YELL
  ..._crop and OSBS_029 give ``test``, so no tree is seen in both;
* a box cut by a tile border keeps its visible part; it is marked ``truncated``, and
  ``difficult`` when less than ``min_visible`` of it is inside the tile (a sliver of a crown is
  hard to recognise: the VOC protocol then ignores it in evaluation and training skips it).
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

from voc_to_yolo import parse_annotation, remove_others

__all__ = ["DEEPFOREST_VERSION", "SOURCES", "find_wheel", "tile_origins", "build_voc"]

DEEPFOREST_VERSION = "2.1.0"
_DATA = "deepforest/data/"
#: annotation stem in the wheel -> VOC image set
SOURCES = {
    "2019_YELL_2_528000_4978000_image_crop2": "trainval",
    "SOAP_061": "trainval",
    "2019_YELL_2_541000_4977000_image_crop": "test",
    "OSBS_029": "test",
}


def find_wheel(cache_dir: str | os.PathLike, wheel: str | os.PathLike | None = None,
               download: bool = True) -> Path:
    """The deepforest wheel: ``wheel`` if given, else one in ``cache_dir``, else ``pip download``.

    ``pip download --no-deps`` fetches only the wheel (about 20 MB) from the package index.
    """
    if wheel is not None:
        if not Path(wheel).is_file():
            raise FileNotFoundError(f"deepforest wheel {wheel} does not exist")
        return Path(wheel)
    cache_dir = Path(cache_dir)
    found = sorted(cache_dir.glob(f"deepforest-{DEEPFOREST_VERSION}-*.whl"))
    if found:
        return found[-1]
    hint = (f"`{sys.executable} -m pip download --no-deps deepforest=={DEEPFOREST_VERSION} -d "
            f"{cache_dir}` and pass --deepforest_wheel, or use --voc_root with VOC2007")
    if not download:
        raise FileNotFoundError(f"no deepforest-{DEEPFOREST_VERSION} wheel in {cache_dir}; run {hint}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
           f"deepforest=={DEEPFOREST_VERSION}", "-d", str(cache_dir)]
    print(f"fetching the tree data set: {' '.join(cmd)}")
    if subprocess.run(cmd).returncode != 0:
        raise RuntimeError(f"pip could not download deepforest=={DEEPFOREST_VERSION}; run {hint}")
    return find_wheel(cache_dir, download=False)


def tile_origins(size: int, tile: int) -> list[int]:
    """Tile starts along one axis: every ``tile`` pixels, the last one flush with the edge."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile + 1, tile))
    if starts[-1] + tile < size:
        starts.append(size - tile)
    return starts


def _annotation_xml(filename: str, width: int, height: int, objects: list[dict]) -> bytes:
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "JPEGImages"
    ET.SubElement(root, "filename").text = filename
    size = ET.SubElement(root, "size")
    for tag, value in (("width", width), ("height", height), ("depth", 3)):
        ET.SubElement(size, tag).text = str(value)
    for obj in objects:
        node = ET.SubElement(root, "object")
        ET.SubElement(node, "name").text = "tree"
        ET.SubElement(node, "truncated").text = str(int(obj["truncated"]))
        ET.SubElement(node, "difficult").text = str(int(obj["difficult"]))
        bnd = ET.SubElement(node, "bndbox")
        for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), obj["box"]):
            ET.SubElement(bnd, tag).text = str(int(value))
    ET.indent(root)
    return ET.tostring(root)


def _tile_objects(boxes: list[tuple[int, int, int, int]], ox: int, oy: int, tw: int, th: int,
                  min_visible: float) -> list[dict]:
    """Boxes (VOC 1-based inclusive) seen from the tile at ``(ox, oy)``, in tile coordinates."""
    out = []
    for xmin, ymin, xmax, ymax in boxes:
        x0, y0, x1, y1 = xmin - 1, ymin - 1, xmax, ymax  # continuous pixel extent
        cx0, cy0 = max(x0, ox), max(y0, oy)
        cx1, cy1 = min(x1, ox + tw), min(y1, oy + th)
        if cx1 <= cx0 or cy1 <= cy0:
            continue
        visible = (cx1 - cx0) * (cy1 - cy0) / max((x1 - x0) * (y1 - y0), 1)
        out.append({"box": (cx0 - ox + 1, cy0 - oy + 1, cx1 - ox, cy1 - oy),
                    "truncated": visible < 1.0, "difficult": visible < min_visible})
    return out


def build_voc(wheel: str | os.PathLike, out_dir: str | os.PathLike, tile: int = 400,
              min_visible: float = 0.5) -> Path:
    """Write the VOC folder (see the module docstring); returns ``out_dir``."""
    from PIL import Image

    out_dir = Path(out_dir)
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    sets: dict[str, list[str]] = {"trainval": [], "test": []}
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        for stem, image_set in SOURCES.items():
            xml_name = f"{_DATA}{stem}.xml"
            if xml_name not in names:
                raise FileNotFoundError(f"{wheel} has no {xml_name}; use deepforest=={DEEPFOREST_VERSION}")
            with zf.open(xml_name) as fh:
                ann = parse_annotation(fh)
            image_name = next((n for n in (f"{_DATA}{stem}.png", f"{_DATA}{ann.filename}")
                               if n in names), None)
            if image_name is None:
                raise FileNotFoundError(f"{wheel} has no image for {stem}")
            Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, ann.width * ann.height)
            image = Image.open(io.BytesIO(zf.read(image_name))).convert("RGB")
            boxes = [tuple(int(round(v)) for v in obj.box) for obj in ann.objects]
            for oy in tile_origins(image.height, tile):
                for ox in tile_origins(image.width, tile):
                    tw, th = min(tile, image.width), min(tile, image.height)
                    tile_id = f"{stem}_{oy:04d}_{ox:04d}"
                    image.crop((ox, oy, ox + tw, oy + th)).save(
                        out_dir / "JPEGImages" / f"{tile_id}.jpg", quality=95)
                    objects = _tile_objects(boxes, ox, oy, tw, th, min_visible)
                    (out_dir / "Annotations" / f"{tile_id}.xml").write_bytes(
                        _annotation_xml(f"{tile_id}.jpg", tw, th, objects))
                    sets[image_set].append(tile_id)
    for image_set, ids in sets.items():
        (out_dir / "ImageSets" / "Main" / f"{image_set}.txt").write_text("\n".join(ids) + "\n")
    tiles = {tile_id for ids in sets.values() for tile_id in ids}
    for sub in ("Annotations", "JPEGImages"):  # tiles of an earlier --tile: not this data set
        remove_others(out_dir / sub, tiles)
    return out_dir
