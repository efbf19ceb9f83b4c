"""The Ultralytics hook and the YOLOv8/VOC recipe: converter, VOC difficult rule, per-layer
groups, the LR each group really gets at every optimizer step, resume, and a run end to end.

Everything runs offline on a VOC folder drawn in the test (tiny images, a few epochs).
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

# Ultralytics reads these once, at import: keep its settings and fonts in the temp dir, offline.
os.environ.setdefault("YOLO_CONFIG_DIR", str(Path(tempfile.gettempdir()) / "hf_tempbalance_yolo_cfg"))
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "0")

pytest.importorskip("ultralytics")
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
sys.path.insert(0, str(RECIPES))

import deepforest_voc  # noqa: E402
import voc_to_yolo  # noqa: E402
import yolo_voc  # noqa: E402
from ultralytics import YOLO  # noqa: E402
from ultralytics.models.yolo.detect import DetectionValidator  # noqa: E402

from hf_tempbalance import TempBalanceConfig  # noqa: E402
from hf_tempbalance.groups import GROUP_KEY  # noqa: E402
from hf_tempbalance.history import HISTORY_FILE, append_history, read_history  # noqa: E402
from hf_tempbalance.integrations.ultralytics import (  # noqa: E402
    CHECKPOINT_KEY,
    TempBalanceDetectionTrainer,
    add_tempbalance,
)

CLASSES = ("cat", "dog")


# ---------------------------------------------------------------------- fixtures
def _xml(filename: str, width: int, height: int, objects: list[dict]) -> str:
    objs = "".join(
        f"<object><name>{o['name']}</name>"
        + ("" if o.get("difficult") is None else f"<difficult>{int(o['difficult'])}</difficult>")
        + "<bndbox>" + "".join(f"<{k}>{v}</{k}>" for k, v in zip(("xmin", "ymin", "xmax", "ymax"), o["box"]))
        + "</bndbox></object>" for o in objects)
    return (f"<annotation><filename>{filename}</filename><size><width>{width}</width>"
            f"<height>{height}</height><depth>3</depth></size>{objs}</annotation>")


def write_voc(root: Path, images: dict[str, tuple[int, int, list[dict]]], sets: dict[str, list[str]]) -> Path:
    """A VOC year folder: Annotations/, JPEGImages/ (drawn boxes), ImageSets/Main/."""
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for image_id, (w, h, objects) in images.items():
        image = Image.fromarray(rng.integers(0, 60, (h, w, 3), dtype=np.uint8))
        draw = ImageDraw.Draw(image)
        for o in objects:
            color = (230, 60, 40) if o["name"] == "cat" else (40, 200, 230)
            x0, y0, x1, y1 = o["box"]
            draw.rectangle((x0 - 1, y0 - 1, min(x1, w) - 1, min(y1, h) - 1), fill=color)
        image.save(root / "JPEGImages" / f"{image_id}.jpg", quality=95)
        (root / "Annotations" / f"{image_id}.xml").write_text(_xml(f"{image_id}.jpg", w, h, objects))
    for name, ids in sets.items():
        (root / "ImageSets" / "Main" / f"{name}.txt").write_text("\n".join(ids) + "\n")
    return root


def random_voc(root: Path, n_trainval: int, n_test: int, size: int = 64, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    images = {}
    for i in range(n_trainval + n_test):
        objects = []
        for j in range(int(rng.integers(1, 4))):
            bw, bh = (int(v) for v in rng.integers(size // 5, size // 2, 2))
            x0, y0 = (int(v) for v in rng.integers(1, size - max(bw, bh), 2))
            objects.append({"name": CLASSES[(i + j) % 2], "box": (x0, y0, x0 + bw, y0 + bh),
                            "difficult": j == 2})
        images[f"{i:06d}"] = (size, size, objects)
    ids = sorted(images)
    return write_voc(root, images, {"trainval": ids[:n_trainval], "test": ids[n_trainval:]})


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """6 trainval + 2 test images of 64x64 px, converted to YOLO labels."""
    root = tmp_path_factory.mktemp("voc")
    voc = random_voc(root / "VOCdevkit" / "VOC2007", 6, 2)
    data_yaml, _ = voc_to_yolo.convert_voc(voc.parent.parent, root / "yolo", classes=CLASSES)
    return data_yaml


def train_args(data_yaml: Path, project: Path, **kw) -> dict:
    """Tiny CPU training: one optimizer step per batch (nbs = batch), 3 batches per epoch."""
    args = dict(model="yolov8n.yaml", data=str(data_yaml), epochs=2, batch=2, nbs=2, imgsz=64,
                device="cpu", workers=0, amp=False, plots=False, optimizer="Adam", lr0=0.01,
                momentum=0.9, weight_decay=5e-4, cos_lr=True, lrf=0.1, warmup_epochs=1.0,
                warmup_bias_lr=0.1, seed=0, project=str(project), name="run", exist_ok=True,
                verbose=False)
    args.update(kw)
    return args


# ---------------------------------------------------------------------- converter
def test_converter_matches_hand_computed_labels(tmp_path):
    images = {
        "a": (100, 50, [
            {"name": "cat", "box": (1, 1, 50, 25), "difficult": 0},        # exact top-left quarter
            {"name": "dog", "box": (51, 26, 100, 50), "difficult": 1},     # difficult: held apart
            {"name": "dog", "box": (91, 11, 120, 30)},                     # no <difficult>; clipped at W
        ]),
        "b": (40, 40, [{"name": "dog", "box": (11, 21, 20, 40), "difficult": 1}]),  # only difficult
    }
    write_voc(tmp_path / "VOC2007", images, {"trainval": ["a"], "test": ["b"]})
    data_yaml, stats = voc_to_yolo.convert_voc(tmp_path, tmp_path / "out", classes=CLASSES)

    out = tmp_path / "out"
    # VOC pixels are 1-based inclusive: box (1, 1, 50, 25) covers [0, 50] x [0, 25] of 100 x 50.
    np.testing.assert_allclose(np.loadtxt(out / "labels/trainval/a.txt", ndmin=2),
                               [[0, 0.25, 0.25, 0.5, 0.5], [1, 0.95, 0.4, 0.1, 0.4]], atol=1e-6)
    np.testing.assert_allclose(np.loadtxt(out / "difficult/trainval/a.txt", ndmin=2),
                               [[1, 0.75, 0.75, 0.5, 0.5]], atol=1e-6)
    assert (out / "labels/test/b.txt").read_text() == ""  # no positives, only an ignored object
    np.testing.assert_allclose(np.loadtxt(out / "difficult/test/b.txt", ndmin=2),
                               [[1, 0.375, 0.75, 0.25, 0.5]], atol=1e-6)
    assert (out / "images/trainval/a.jpg").resolve() == (tmp_path / "VOC2007/JPEGImages/a.jpg").resolve()
    assert [(s.image_set, s.images, s.objects, s.difficult) for s in stats] == [
        ("trainval", 1, 2, 1), ("test", 1, 0, 1)]

    import yaml
    data = yaml.safe_load(data_yaml.read_text())
    assert data["train"] == "images/trainval" and data["val"] == data["test"] == "images/test"
    assert data["names"] == {0: "cat", 1: "dog"} and Path(data["path"]) == out.resolve()
    # the pixel box the evaluator reads back is the continuous extent again
    np.testing.assert_allclose(voc_to_yolo.read_yolo_boxes(out / "difficult/trainval/a.txt", 100, 50),
                               [[1, 50, 25, 100, 50]], atol=1e-4)
    assert voc_to_yolo.difficult_path(out / "images/test/b.jpg") == out / "difficult/test/b.txt"


def test_a_second_conversion_leaves_none_of_the_firsts_images(tmp_path):
    """Ultralytics trains and scores every image in the split folders: a conversion of another
    image set (other tiles, another --voc-root) into the same folder must not keep the old ones."""
    box = [{"name": "cat", "box": (1, 1, 10, 10), "difficult": 0}]
    images = {name: (20, 20, box) for name in ("a", "b", "c", "d")}
    write_voc(tmp_path / "VOC2007", images, {"trainval": ["a", "b"], "test": ["c"]})
    voc_to_yolo.convert_voc(tmp_path, tmp_path / "out", classes=CLASSES)
    write_voc(tmp_path / "VOC2007", {}, {"trainval": ["b", "d"], "test": ["c"]})
    voc_to_yolo.convert_voc(tmp_path, tmp_path / "out", classes=CLASSES)
    out = tmp_path / "out"
    for kind, suffix in (("images", ".jpg"), ("labels", ".txt"), ("difficult", ".txt")):
        assert sorted(p.name for p in (out / kind / "trainval").iterdir()) == [f"b{suffix}", f"d{suffix}"]
        assert sorted(p.name for p in (out / kind / "test").iterdir()) == [f"c{suffix}"]
    assert (tmp_path / "VOC2007" / "JPEGImages" / "a.jpg").is_file()  # the source is not touched


def test_converter_errors_name_the_problem(tmp_path):
    write_voc(tmp_path / "VOC2007", {"a": (10, 10, [{"name": "horse", "box": (1, 1, 5, 5)}])},
              {"trainval": ["a"]})
    with pytest.raises(ValueError, match="'horse'"):
        voc_to_yolo.convert_voc(tmp_path, tmp_path / "out", splits={"train": "trainval"}, classes=CLASSES)
    with pytest.raises(FileNotFoundError, match="available: \\['trainval'\\]"):
        voc_to_yolo.read_image_set(tmp_path / "VOC2007", "test")
    with pytest.raises(FileNotFoundError, match="Annotations"):
        voc_to_yolo.find_voc_dir(tmp_path / "nothing")


def test_voc_ignore_rule():
    hard, hard_cls = np.array([[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10]]), np.array([0, 0, 1])
    gt, gt_cls = np.array([[19, 0, 29, 10]]), np.array([0])
    preds = np.array([
        [0, 0, 10, 9],       # IoU 0.9 with a difficult box of its class, nothing else: ignored
        [40, 0, 50, 10],     # on a difficult box of the other class: kept (a false positive)
        [19, 0, 29, 10],     # IoU 1 with a positive, 0.82 with a difficult one: best is the positive
        [0, 0, 10, 5],       # IoU exactly 0.5: the devkit needs > 0.5, kept
        [60, 60, 70, 70],    # nothing around: kept
    ], dtype=float)
    pred_cls = np.array([0, 0, 0, 0, 0])
    mask = voc_to_yolo.voc_ignore_mask(preds, pred_cls, gt, gt_cls, hard, hard_cls)
    assert mask.tolist() == [True, False, False, False, False]
    assert not voc_to_yolo.voc_ignore_mask(preds, pred_cls, gt, gt_cls, np.zeros((0, 4)), []).any()


def test_validator_drops_detections_on_difficult_objects(tmp_path, monkeypatch):
    """The recipe's validator maps letterboxed detections back to the image before the rule."""
    image = tmp_path / "images/test/x.jpg"
    (tmp_path / "difficult/test").mkdir(parents=True)
    # a 200 x 100 image, difficult cat at pixels [100, 20, 180, 80]
    (tmp_path / "difficult/test/x.txt").write_text("0 0.7 0.5 0.4 0.6\n")
    gain, pad = 0.32, (0.0, 16.0)  # letterbox into 64 x 64: 200 x 100 -> 64 x 32, 16 px bands

    def letterbox(box):
        return [box[0] * gain + pad[0], box[1] * gain + pad[1], box[2] * gain + pad[0], box[3] * gain + pad[1]]

    gt_px = [10, 10, 60, 90]  # a positive dog
    gt_lb = letterbox(gt_px)
    batch = {
        "img": torch.zeros(1, 3, 64, 64), "batch_idx": torch.zeros(1), "cls": torch.tensor([[1.0]]),
        "bboxes": torch.tensor([[(gt_lb[0] + gt_lb[2]) / 128, (gt_lb[1] + gt_lb[3]) / 128,
                                 (gt_lb[2] - gt_lb[0]) / 64, (gt_lb[3] - gt_lb[1]) / 64]]),
        "ori_shape": [(100, 200)], "ratio_pad": [((gain, gain), pad)], "im_file": [str(image)],
    }
    pred = {"bboxes": torch.tensor([letterbox([100, 20, 180, 80]), letterbox([101, 21, 179, 79]), gt_lb,
                                    letterbox([100, 20, 180, 80])]),
            "conf": torch.tensor([0.9, 0.8, 0.7, 0.6]), "cls": torch.tensor([0.0, 0.0, 1.0, 1.0]),
            "extra": torch.zeros(4, 0)}
    seen = []
    monkeypatch.setattr(DetectionValidator, "update_metrics", lambda self, p, b: seen.append(p))
    validator = yolo_voc.VOCDetectionValidator(save_dir=tmp_path / "val", args={"task": "detect"})
    validator.device = torch.device("cpu")
    validator.update_metrics([pred], batch)
    # cat detections on the difficult cat are ignored; the dog ones are kept (the one on the
    # difficult cat is a false positive of another class)
    assert seen[0][0]["conf"].tolist() == pytest.approx([0.7, 0.6])


def test_tree_data_builder_tiles_and_marks_cut_boxes(tmp_path):
    """The DeepForest reader on a wheel-shaped zip: tiles, clipped boxes, difficult slivers."""
    wheel = tmp_path / "deepforest-2.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for stem in deepforest_voc.SOURCES:
            buf = tmp_path / f"{stem}.png"
            Image.new("RGB", (30, 20), (0, 90, 0)).save(buf)
            zf.write(buf, f"deepforest/data/{stem}.png")
            # whole in tile (0,0); 60% in tile (0,0), 40% in (0,10): 6x5 box from x=9..14
            zf.writestr(f"deepforest/data/{stem}.xml", _xml(f"{stem}.tif", 30, 20, [
                {"name": "Tree", "box": (2, 2, 5, 5), "difficult": 0},
                {"name": "Alive", "box": (10, 2, 15, 6), "difficult": 0}]))
    assert deepforest_voc.tile_origins(30, 10) == [0, 10, 20]
    assert deepforest_voc.tile_origins(25, 10) == [0, 10, 15]
    assert deepforest_voc.find_wheel(tmp_path / "cache", wheel) == wheel
    with pytest.raises(FileNotFoundError, match="pip download --no-deps deepforest==2.1.0"):
        deepforest_voc.find_wheel(tmp_path / "empty", download=False)

    voc = deepforest_voc.build_voc(wheel, tmp_path / "voc", tile=12)
    stem = "OSBS_029"
    ids = (voc / "ImageSets/Main/test.txt").read_text().split()
    # x tiles at 0, 12, 18 and y tiles at 0, 8 (the last ones flush with the edge)
    assert [i for i in ids if i.startswith(stem)] == [
        f"{stem}_{y:04d}_{x:04d}" for y in (0, 8) for x in (0, 12, 18)]
    ann = voc_to_yolo.parse_annotation(voc / f"Annotations/{stem}_0000_0000.xml")
    assert (ann.width, ann.height) == (12, 12)
    # box (10, 2, 15, 6) covers x in [9, 15]: 3 of 6 columns inside tile 0..12 -> 50%, kept
    assert [(o.name, o.box, o.difficult, o.truncated) for o in ann.objects] == [
        ("tree", (2, 2, 5, 5), False, False), ("tree", (10, 2, 12, 6), False, True)]
    right = voc_to_yolo.parse_annotation(voc / f"Annotations/{stem}_0000_0012.xml")
    assert [(o.box, o.difficult) for o in right.objects] == [((1, 2, 3, 6), False)]
    assert Image.open(voc / f"JPEGImages/{stem}_0000_0000.jpg").size == (12, 12)
    trainval = (voc / "ImageSets/Main/trainval.txt").read_text().split()
    assert not set(trainval) & set(ids) and len(trainval) == len(ids) == 12
    # built again with other tiles: only those tiles are in the folder
    deepforest_voc.build_voc(wheel, tmp_path / "voc", tile=20)
    listed = {i for name in ("trainval", "test")
              for i in (voc / f"ImageSets/Main/{name}.txt").read_text().split()}
    assert len(listed) == 2 * len(deepforest_voc.SOURCES)  # x at 0, 10; y at 0
    for sub, suffix in (("JPEGImages", ".jpg"), ("Annotations", ".xml")):
        assert sorted(p.name for p in (voc / sub).iterdir()) == sorted(f"{i}{suffix}" for i in listed)


# ---------------------------------------------------------------------- the hook in training
def ultralytics_lr(args, nb: int, epoch: int, ni: int, label: str) -> float:
    """Ultralytics 8.4's LR for a group, from its documented rules (reference notes §4).

    LambdaLR: lr0 · lf(epoch), lf the cosine from 1 to lrf. Warm-up: the first
    round(min(warmup_epochs, epochs - 1) · nb) batches interpolate linearly from 0 (weights,
    BN) or warmup_bias_lr (biases) to that value.
    """
    lf = ((1 - math.cos(epoch * math.pi / args["epochs"])) / 2) * (args["lrf"] - 1) + 1
    target = args["lr0"] * lf
    nw = round(min(args["warmup_epochs"], args["epochs"] - 1) * nb)
    if nw and ni <= nw:
        start = args["warmup_bias_lr"] if label == "bias" else 0.0
        return float(np.interp(ni, [0, nw], [start, target]))
    return target


def linear_map(rows: list[dict], s1: float, s2: float) -> dict[str, float]:
    """Eq. 2 recomputed from an update's alphas."""
    alphas = {r["layer"]: r["value"] for r in rows if r["valid"]}
    lo, hi = min(alphas.values()), max(alphas.values())
    return {k: s1 + (s2 - s1) * (a - lo) / (hi - lo) for k, a in alphas.items()}


def recording(base: type) -> type:
    """``base`` plus an optimizer step pre-hook registered after the engine's (it sees the
    groups and LRs the optimizer really steps with) and a batch counter."""

    class Recording(base):
        def build_optimizer(self, *args, **kwargs):
            optimizer = super().build_optimizer(*args, **kwargs)
            self.steps = []
            optimizer.register_step_pre_hook(self._record)
            return optimizer

        def _record(self, optimizer, args, kwargs):
            tb = self.tempbalance.tb
            self.steps.append({
                "epoch": self.epoch, "ni": self.batch_i + len(self.train_loader) * self.epoch,
                "engine_step": tb.num_steps, "multipliers": dict(tb.multipliers),
                "groups": [{"layer": g.get(GROUP_KEY), "label": g.get("param_group"), "lr": g["lr"],
                            "wd": g["weight_decay"], "params": [id(p) for p in g["params"]]}
                           for g in optimizer.param_groups]})

        def run_callbacks(self, event):
            if event == "on_train_epoch_start":
                self.batch_i = -1
            elif event == "on_train_batch_start":
                self.batch_i += 1
            super().run_callbacks(event)

    return Recording


def check_steps(trainer, args: dict, s1: float, s2: float) -> None:
    """Every recorded step: each parameter once, Ultralytics' decay and labels, lr = LR x m."""
    model = trainer.model
    names = {id(p): n for n, p in model.named_parameters()}
    norm_params = {id(p) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters()}
    tb = trainer.tempbalance.tb
    owner = {p: layer.name for layer in tb.plan.layers for p in layer.param_names}
    nb = len(trainer.train_loader)
    decay = args["weight_decay"]  # batch == nbs: Ultralytics' decay scaling is 1
    history = tb.history
    for step in trainer.steps:
        ids = [p for g in step["groups"] for p in g["params"]]
        assert len(ids) == len(set(ids)) and set(ids) == set(names), "each parameter exactly once"
        done = [r for r in history if r["step"] <= step["engine_step"]]
        assert done, f"no TempBalance update before engine step {step['engine_step']}"
        last = [r for r in done if r["update"] == done[-1]["update"]]
        expected_m = linear_map(last, s1, s2)
        for g in step["groups"]:
            pnames = [names[p] for p in g["params"]]
            if g["label"] == "bias":
                assert g["wd"] == 0 and all(n.endswith("bias") for n in pnames)
            elif g["label"] == "bn":
                assert g["wd"] == 0 and all(p in norm_params and names[p].endswith("weight") for p in g["params"])
            else:
                assert g["label"] == "weight" and g["wd"] == pytest.approx(decay)
                assert all(p not in norm_params and not names[p].endswith("bias") for p in g["params"])
            assert {owner.get(n) for n in pnames} == {g["layer"]}, "a group holds one layer's params"
            m = expected_m[g["layer"]] if g["layer"] is not None else 1.0
            base = ultralytics_lr(args, nb, step["epoch"], step["ni"], g["label"])
            assert g["lr"] == pytest.approx(base * m, rel=1e-9, abs=1e-15), (step["ni"], g["layer"])


@pytest.mark.slow
def test_lr_per_group_through_warmup_and_epochs(tiny_data, tmp_path):
    s1, s2 = 0.6, 1.4
    args = train_args(tiny_data, tmp_path)
    model = YOLO(args.pop("model"))
    logged = []  # what Ultralytics' loggers (TensorBoard, W&B, ...) read at on_train_epoch_end
    model.add_callback("on_train_epoch_end", lambda t: logged.append(dict(t.lr)))
    model.train(trainer=recording(TempBalanceDetectionTrainer.with_config(s1=s1, s2=s2)), **args)
    trainer = model.trainer
    tb = trainer.tempbalance.tb
    nb = len(trainer.train_loader)
    assert nb == 3 and len(trainer.steps) == 6
    # steps 0-3 are warm-up (nw = 3), 4-5 follow the cosine LambdaLR of epoch 1
    assert [s["ni"] for s in trainer.steps] == list(range(6))
    check_steps(trainer, args, s1, s2)
    # one update at the first step of each epoch, on every balanced layer, spread over [s1, s2]
    assert sorted({r["step"] for r in tb.history}) == [0, 3]
    mults = [s["multipliers"] for s in trainer.steps]
    assert min(mults[0].values()) == pytest.approx(s1) and max(mults[0].values()) == pytest.approx(s2)
    assert mults[0] == mults[2] and mults[3] != mults[0]
    # between steps the optimizer holds Ultralytics' three groups at Ultralytics' LR
    groups = trainer.optimizer.param_groups
    assert [g["param_group"] for g in groups] == ["weight", "bn", "bias"]
    assert all(GROUP_KEY not in g for g in groups)
    assert groups[0]["lr"] == pytest.approx(ultralytics_lr(args, nb, 1, 5, "weight"))

    # logs: results.csv has Ultralytics' three LR columns and each layer's alpha and multiplier
    import csv
    rows = list(csv.DictReader(open(Path(trainer.save_dir) / "results.csv")))
    assert len(rows) == 2 and [k for k in rows[0] if k.startswith("lr/")] == ["lr/pg0", "lr/pg1", "lr/pg2"]
    for row, update in zip(rows, (0, 1)):
        for r in (r for r in tb.history if r["update"] == update):
            assert float(row[f"tempbalance/alpha_hill/{r['layer']}"]) == pytest.approx(r["value"], rel=1e-5)
            assert float(row[f"tempbalance/multiplier/{r['layer']}"]) == pytest.approx(r["multiplier"], rel=1e-5)
    # ... and the loggers see the same keys and values
    assert len(logged) == 2 and all(set(seen) == {k for k in row if k.startswith(("lr/", "tempbalance/"))}
                                    for seen, row in zip(logged, rows))
    for seen, row in zip(logged, rows):
        assert [float(row[k]) for k in seen] == pytest.approx(list(seen.values()), rel=1e-5)
    # history file: the engine's rows plus the (1-based) epoch, written once
    saved = read_history(Path(trainer.save_dir) / HISTORY_FILE)
    assert len(saved) == len(tb.history) == 2 * len(tb.plan.layers)
    assert [(r["update"], r["epoch"]) for r in saved] == [(r["update"], r["update"] + 1) for r in tb.history]
    assert all(r["multiplier"] == pytest.approx(h["multiplier"]) for r, h in zip(saved, tb.history))


class Interrupt(Exception):
    pass


@pytest.mark.slow
def test_resume_restores_engine_state_and_lrs(tiny_data, tmp_path):
    """Stop after epoch 1 of 3 (checkpoint written), resume: the engine's multipliers, clock and
    history come back from the checkpoint, and LRs stay Ultralytics' LR x multiplier."""
    s1, s2 = 0.6, 1.4
    args = train_args(tiny_data, tmp_path, epochs=3)
    trainer_cls = recording(TempBalanceDetectionTrainer.with_config(s1=s1, s2=s2, interval=2))

    def stop(trainer):
        raise Interrupt

    model = YOLO(args.pop("model"))
    model.add_callback("on_model_save", stop)
    with pytest.raises(Interrupt):
        model.train(trainer=trainer_cls, **args)
    first = model.trainer
    assert len(first.steps) == 3
    last = Path(first.save_dir) / "weights/last.pt"
    saved = torch.load(last, map_location="cpu", weights_only=False)["optimizer"][CHECKPOINT_KEY]
    assert saved["num_steps"] == 3 and saved["num_updates"] == 2  # updates at steps 0 and 2

    # As if the run had gone on past the checkpoint and died: rows the resumed run must drop.
    history_file = Path(first.save_dir) / HISTORY_FILE
    ahead = [{**row, "step": 4, "update": 2, "epoch": 2} for row in read_history(history_file)[-3:]]
    append_history(ahead, history_file)

    resumed = YOLO(last)
    resumed.train(trainer=trainer_cls, resume=True)
    trainer = resumed.trainer
    # epochs 2 and 3 (ni 3..8); ni 3 is the last warm-up batch
    assert [s["ni"] for s in trainer.steps] == list(range(3, 9))
    assert trainer.steps[0]["engine_step"] == 3
    assert trainer.steps[0]["multipliers"] == pytest.approx(saved["multipliers"])  # no update at step 3
    check_steps(trainer, args, s1, s2)
    tb = trainer.tempbalance.tb
    assert [u for u in dict.fromkeys(r["update"] for r in tb.history)] == list(range(5))
    assert sorted({r["step"] for r in tb.history}) == [0, 2, 4, 6, 8]
    rows = read_history(Path(trainer.save_dir) / HISTORY_FILE)
    assert [(r["update"], r["epoch"]) for r in rows[:: len(tb.plan.layers)]] == [
        (0, 1), (1, 1), (2, 2), (3, 3), (4, 3)]


@pytest.mark.slow
def test_callback_entry_point_scales_lrs(tiny_data, tmp_path):
    args = train_args(tiny_data, tmp_path, epochs=1)
    model = YOLO(args.pop("model"))
    hook = add_tempbalance(model, TempBalanceConfig(s1=0.5, s2=1.5))
    applied = []
    model.add_callback("on_train_start", lambda t: t.optimizer.register_step_pre_hook(
        lambda opt, a, k: applied.append({g.get(GROUP_KEY): g["lr"] for g in opt.param_groups
                                          if g.get("param_group") == "weight"})))
    model.train(**args)
    tb = hook.tb
    assert tb is not None and tb.num_updates == 1 and len(applied) == 3
    base = applied[-1][None]  # no warm-up with one epoch: lr0 · lf(0) = lr0
    assert base == pytest.approx(args["lr0"])
    for layer, m in tb.multipliers.items():
        assert applied[-1][layer] == pytest.approx(args["lr0"] * m)
    history = Path(model.trainer.save_dir) / HISTORY_FILE
    assert len(read_history(history)) == len(tb.plan.layers)

    # A new run into the same save_dir (exist_ok=True) starts a new history, as results.csv does.
    again = YOLO("yolov8n.yaml")
    add_tempbalance(again, TempBalanceConfig(s1=0.5, s2=1.5))
    again.train(**args)
    assert Path(again.trainer.save_dir) == history.parent
    assert [r["update"] for r in read_history(history)] == [0] * len(tb.plan.layers)


def test_engine_state_travels_in_the_optimizer_state_dict(monkeypatch):
    """Checkpoint path without training: the state rides in ``ckpt["optimizer"]``; 'auto' warns."""
    from types import SimpleNamespace

    from hf_tempbalance.integrations import ultralytics as hook_module

    def make():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3), torch.nn.BatchNorm2d(64),
                                    torch.nn.Conv2d(64, 64, 3), torch.nn.BatchNorm2d(64),
                                    torch.nn.Conv2d(64, 96, 3), torch.nn.Conv2d(96, 8, 1))
        groups = [{"params": [m.weight for m in model if isinstance(m, torch.nn.Conv2d)], "param_group": "weight"},
                  {"params": [m.weight for m in model if isinstance(m, torch.nn.BatchNorm2d)], "param_group": "bn"},
                  {"params": [m.bias for m in model], "param_group": "bias"}]
        return SimpleNamespace(model=model), torch.optim.Adam(groups, lr=1e-3)

    warnings = []
    monkeypatch.setattr(hook_module.LOGGER, "warning", warnings.append)
    trainer, optimizer = make()
    hook = hook_module.TempBalanceHook(s1=0.6, s2=1.4)
    hook.attach(trainer, optimizer, "auto")
    assert len(warnings) == 1 and "lr0" in warnings[0]
    hook.tb.update()
    assert sorted(hook.tb.multipliers.values()) == pytest.approx([0.6, 1.4])
    state = optimizer.state_dict()
    assert len(state["param_groups"]) == 3 and state[CHECKPOINT_KEY]["multipliers"] == hook.tb.multipliers

    trainer2, optimizer2 = make()
    hook2 = hook_module.TempBalanceHook(s1=0.6, s2=1.4)
    hook2.attach(trainer2, optimizer2, "Adam")
    optimizer2.load_state_dict(state)
    assert hook2.tb.multipliers == hook.tb.multipliers and hook2.tb.num_updates == 1
    assert CHECKPOINT_KEY in state  # the caller's dict is left as it was
    assert len(warnings) == 1
    optimizer2.load_state_dict({k: v for k, v in state.items() if k != CHECKPOINT_KEY})
    assert "no TempBalance state" in warnings[-1]


def test_trainer_class_carries_its_config_to_ddp_workers():
    """Ultralytics 8.4 pickles the trainer class with cloudpickle for its DDP workers."""
    cloudpickle = pytest.importorskip("cloudpickle")
    cls = TempBalanceDetectionTrainer.with_config(s1=0.6, s2=1.4, interval=7)
    back = cloudpickle.loads(cloudpickle.dumps(cls))
    assert back.tempbalance_config == TempBalanceConfig(s1=0.6, s2=1.4, interval=7)
    assert issubclass(back, TempBalanceDetectionTrainer) and "Trainer" in back.__name__
    assert TempBalanceDetectionTrainer.tempbalance_config == TempBalanceConfig()


# ---------------------------------------------------------------------- the recipe
@pytest.mark.slow
def test_recipe_end_to_end(tmp_path):
    voc = random_voc(tmp_path / "VOC2007", 4, 2, seed=1)  # cat and dog are VOC classes
    font = Path(yolo_voc.USER_CONFIG_DIR) / "Arial.ttf"
    font.unlink(missing_ok=True)  # the config dir outlives test runs: make this run install it
    results = yolo_voc.main([
        "--method", "tb", "--seed", "5", "--voc-root", str(voc), "--data_dir", str(tmp_path / "data"),
        "--output_dir", str(tmp_path / "runs"), "--model", "yolov8n.pt", "--epochs", "1", "--batch", "2",
        "--imgsz", "64", "--device", "cpu", "--workers", "0", "--plots", "false", "--lr0", "0.001",
        "--ultralytics_args", "nbs=2", "verbose=False"])
    run = tmp_path / "runs" / "tb_seed5"
    saved = json.loads((run / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert {k: saved[k] for k in ("method", "seed", "epochs")} == {"method": "tb", "seed": 5, "epochs": 1}
    assert 0.0 <= saved["mAP50"] <= 1.0 and 0.0 <= saved["mAP50-95"] <= saved["mAP50"]
    assert saved["model"] == "yolov8n.yaml (from scratch)"  # offline, no weights on disk
    assert saved["tempbalance"]["s1"] == 0.6 and saved["tempbalance"]["s2"] == 1.4
    # the optimizer and LR that trained, as Ultralytics recorded them in the checkpoint's train_args
    import torch
    train_args = torch.load(run / "weights" / "last.pt", weights_only=False)["train_args"]
    assert (saved["optimizer"], saved["lr0"]) == (train_args["optimizer"], train_args["lr0"]) == ("Adam", 0.001)
    assert saved["dataset"].startswith("VOC2007 (trainval: 4 images")
    rows = read_history(run / HISTORY_FILE)
    assert rows and {r["epoch"] for r in rows} == {1} and {r["update"] for r in rows} == {0}
    assert font.exists()  # offline font in place


def test_method_is_the_only_switch_and_the_flags_are_the_librarys():
    # The same --tb_* names as the other recipes, the paper's VOC range as defaults; --method
    # decides whether TempBalance runs, so there is no --use_tempbalance to contradict it.
    from transformers import HfArgumentParser

    parser = HfArgumentParser((yolo_voc.ModelArguments, yolo_voc.DataArguments,
                               yolo_voc.TrainArguments, yolo_voc.VOCTempBalanceArguments))
    *_, train, tb = parser.parse_args_into_dataclasses(args=["--tb_interval", "5"])
    assert train.method == "tb"
    assert tb.config() == TempBalanceConfig(s1=0.6, s2=1.4, interval=5)
    with pytest.raises(ValueError, match="use_tempbalance"):
        parser.parse_args_into_dataclasses(args=["--use_tempbalance"])


def test_bad_tempbalance_flags_are_refused_before_the_data(tmp_path, monkeypatch):
    monkeypatch.setattr(yolo_voc, "prepare_data", lambda dargs: pytest.fail("data prepared first"))
    with pytest.raises(yolo_voc.UsageError) as err:
        yolo_voc.main(["--method", "tb", "--tb_s1", "2", "--voc-root", str(tmp_path / "none"),
                       "--output_dir", str(tmp_path / "runs")])
    assert str(err.value).startswith("--tb_s2=1.4: must be a finite number >= s1=2.0")
    assert not (tmp_path / "runs").exists()


def test_a_run_folder_of_other_settings_is_refused_before_the_data(tmp_path, monkeypatch):
    """Ultralytics trains over METHOD_seedSEED (its weights, results.csv): a finished run of other
    settings there is refused, naming them, unless --rerun; the same settings train again."""
    from dataclasses import asdict

    from transformers import HfArgumentParser

    parser = HfArgumentParser((yolo_voc.ModelArguments, yolo_voc.DataArguments,
                               yolo_voc.TrainArguments, yolo_voc.VOCTempBalanceArguments))
    argv = ["--method", "tb", "--seed", "5", "--epochs", "2", "--voc-root", str(tmp_path / "none"),
            "--output_dir", str(tmp_path / "runs")]
    recorded = {k: v for part in parser.parse_args_into_dataclasses(args=argv)
                for k, v in asdict(part).items()}
    run = tmp_path / "runs" / "tb_seed5"
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps({"mAP50": 0.5, "args": recorded}))

    class DataPrepared(Exception):
        pass

    def prepared(dargs):
        raise DataPrepared

    monkeypatch.setattr(yolo_voc, "prepare_data", prepared)
    with pytest.raises(yolo_voc.UsageError) as err:
        yolo_voc.main([*argv, "--epochs", "3", "--plots", "false"])  # plots: not a setting
    assert str(err.value) == (f"{run / 'results.json'} holds a run made with other settings "
                              "(epochs 2 there, 3 here); pass --rerun true to train over it, "
                              "remove that file, or pass another --output_dir")
    with pytest.raises(DataPrepared):
        yolo_voc.main([*argv, "--epochs", "3", "--rerun", "true"])
    with pytest.raises(DataPrepared):
        yolo_voc.main(argv)  # the same settings
    assert json.loads((run / "results.json").read_text())["mAP50"] == 0.5

