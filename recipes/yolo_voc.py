#!/usr/bin/env python
"""YOLOv8n on Pascal VOC2007 with and without TempBalance (paper, Appendix G).

    python recipes/yolo_voc.py --method tb --seed 43 --voc-root /data/VOCdevkit
    python recipes/yolo_voc.py --method cal --seed 43 --voc-root /data/VOCdevkit

Paper settings are the defaults: yolov8n with COCO-pretrained weights, 200 epochs, batch 64,
Adam (betas 0.9/0.999, eps 1e-8), lr 1e-5 with cosine annealing, weight decay 5e-4,
TempBalance (s1, s2) = (0.6, 1.4) updated once per epoch. Table 7: CAL+Adam 59.59 mAP50-95,
TB+Adam 60.03 (mean of 5 seeds).

Data: VOC2007 trainval for training, VOC2007 test for evaluation, from ``--voc-root`` (standard
VOC layout) converted by ``voc_to_yolo.py`` (difficult objects handled as the VOC protocol
does), or downloaded when online. With ``YOLO_OFFLINE=1`` nothing touches the network (no font,
weights, AMP-check or package downloads); without ``--voc-root`` the recipe then uses the real
aerial tree boxes of the DeepForest wheel (``deepforest_voc.py``) through the same converter.

Writes to ``<output_dir>/<method>_seed<seed>/``: Ultralytics' run (results.csv with the
per-layer alpha and multiplier of TB runs, weights/), ``results.json`` (mAP50-95 and mAP50 of
the final model on the test set) and, for TB, ``tempbalance_history.jsonl``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from copy import copy
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

OFFLINE = os.environ.get("YOLO_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
if OFFLINE:  # before Ultralytics is imported: it reads these once
    os.environ.setdefault("YOLO_AUTOINSTALL", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import HfArgumentParser  # noqa: E402
from ultralytics import YOLO  # noqa: E402
from ultralytics.models.yolo.detect import DetectionTrainer, DetectionValidator  # noqa: E402
from ultralytics.utils import ASSETS_URL, USER_CONFIG_DIR, WEIGHTS_DIR, ops  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from deepforest_voc import build_voc, find_wheel  # noqa: E402
from run_records import read_record, setting_differences, write_whole  # noqa: E402
from usage import UsageError, run_main  # noqa: E402
from voc_to_yolo import (  # noqa: E402
    VOC_CLASSES,
    convert_voc,
    difficult_path,
    find_voc_dir,
    read_yolo_boxes,
    voc_ignore_mask,
)

from hf_tempbalance.arguments import TempBalanceSettings  # noqa: E402
from hf_tempbalance.history import HISTORY_FILE  # noqa: E402
from hf_tempbalance.integrations.ultralytics import TempBalanceTrainerMixin  # noqa: E402

VOC2007_ZIPS = ("VOCtrainval_06-Nov-2007.zip", "VOCtest_06-Nov-2007.zip")  # 446 MB + 438 MB


# ---------------------------------------------------------------------- arguments
@dataclass
class ModelArguments:
    model: str = field(default="yolov8n.pt", metadata={
        "help": "Weights (.pt, COCO-pretrained as in the paper) or a model YAML. Offline and not on "
                "disk, .pt falls back to the same architecture's YAML, trained from scratch."})


@dataclass
class DataArguments:
    dataset: Literal["auto", "voc2007", "trees"] = field(default="auto", metadata={
        "help": "auto: --voc-root if given, else VOC2007 downloaded when online, else (YOLO_OFFLINE=1) "
                "the DeepForest tree boxes."})
    voc_root: str | None = field(default=None, metadata={
        "help": "VOCdevkit, VOCdevkit/VOC2007 or any folder with Annotations/, JPEGImages/, ImageSets/Main/."})
    data_dir: str = field(default="data/yolo_voc", metadata={
        "help": "Where downloads and converted YOLO labels go."})
    deepforest_wheel: str | None = field(default=None, metadata={
        "help": "deepforest-2.1.0 wheel (else looked for in <data_dir>/downloads, else `pip download`)."})
    tile: int = field(default=400, metadata={"help": "Tile size (px) for the large tree images."})


@dataclass
class TrainArguments:
    method: Literal["cal", "tb"] = field(default="tb", metadata={
        "help": "cal: Ultralytics' cosine schedule alone; tb: the same with TempBalance."})
    seed: int = field(default=43, metadata={"help": "Paper seeds: 43, 37, 13, 51, 71."})
    epochs: int = 200
    batch: int = 64
    imgsz: int = 640
    optimizer: str = field(default="Adam", metadata={"help": "Adam or AdamW (paper), or any Ultralytics optimizer."})
    lr0: float = 1e-5
    momentum: float = field(default=0.9, metadata={"help": "Adam beta1 / SGD momentum (paper: 0.9)."})
    weight_decay: float = 5e-4
    cos_lr: bool = field(default=True, metadata={"help": "Cosine annealing from lr0 to lr0*lrf."})
    lrf: float = 0.01
    warmup_epochs: float = 3.0
    patience: int = field(default=0, metadata={"help": "Early-stopping patience; 0 trains all epochs."})
    device: str | None = field(default=None, metadata={"help": "Ultralytics device string: cpu, 0, 0,1 ..."})
    workers: int = 8
    amp: bool | None = field(default=None, metadata={
        "help": "Mixed precision; default: on CUDA unless offline without the AMP-check weights."})
    val: bool = field(default=True, metadata={"help": "Validate every epoch (curves in results.csv)."})
    plots: bool = True
    fraction: float = field(default=1.0, metadata={"help": "Fraction of the training images used."})
    output_dir: str = "runs/yolo_voc"
    rerun: bool = field(default=False, metadata={
        "help": "train over OUTPUT_DIR/METHOD_seedSEED when it holds a run made with other "
                "settings (default: refused; a run of the same settings is trained again)"})
    ultralytics_args: list[str] = field(default_factory=list, metadata={
        "help": "Further Ultralytics train arguments as key=value, e.g. mosaic=0.5 close_mosaic=5."})


@dataclass
class VOCTempBalanceArguments(TempBalanceSettings):
    """The library's ``--tb_*`` flags with the paper's VOC range as defaults (App. G)."""

    tb_s1: float = field(default=0.6, metadata={"help": "Smallest LR multiplier (paper, VOC: 0.6)."})
    tb_s2: float = field(default=1.4, metadata={"help": "Largest LR multiplier (paper, VOC: 1.4)."})


# ---------------------------------------------------------------------- VOC evaluation
class VOCDetectionValidator(DetectionValidator):
    """Ultralytics' validator plus the VOC rule for difficult objects.

    Difficult objects are not in the labels (so they are not positives); a detection whose
    best-overlapping box of its class is difficult (IoU > 0.5) is dropped before matching, so it
    is neither a true nor a false positive (:func:`voc_to_yolo.voc_ignore_mask`).
    """

    def update_metrics(self, preds: list[dict], batch: dict) -> None:
        kept = []
        for si, pred in enumerate(preds):
            h0, w0 = (int(v) for v in batch["ori_shape"][si])
            hard = read_yolo_boxes(difficult_path(batch["im_file"][si]), w0, h0)
            if len(hard) and len(pred["cls"]):
                ignore = voc_ignore_mask(*self._original_frame(si, pred, batch), hard[:, 1:], hard[:, 0])
                pred = {k: v[torch.as_tensor(~ignore, device=v.device)] for k, v in pred.items()}
            kept.append(pred)
        super().update_metrics(kept, batch)

    def _original_frame(self, si: int, pred: dict, batch: dict) -> tuple[np.ndarray, ...]:
        """Detections and ground truth of image ``si`` in original-image pixels (xyxy)."""
        pbatch = self._prepare_batch(si, batch)

        def scale(boxes: torch.Tensor) -> np.ndarray:
            return ops.scale_boxes(pbatch["imgsz"], boxes.clone(), pbatch["ori_shape"],
                                   ratio_pad=pbatch["ratio_pad"]).cpu().numpy()

        return (scale(pred["bboxes"]), pred["cls"].cpu().numpy(), scale(pbatch["bboxes"]).reshape(-1, 4),
                pbatch["cls"].cpu().numpy())


class VOCDetectionTrainer(DetectionTrainer):
    """The CAL baseline: Ultralytics' detection trainer, VOC evaluation."""

    def get_validator(self) -> VOCDetectionValidator:
        return VOCDetectionValidator(self.test_loader, save_dir=self.save_dir, args=copy(self.args),
                                     _callbacks=self.callbacks)


class VOCTempBalanceTrainer(TempBalanceTrainerMixin, VOCDetectionTrainer):
    """The same with TempBalance."""


# ---------------------------------------------------------------------- setup
def ensure_offline_font() -> None:
    """Ultralytics downloads Arial.ttf for its plots; offline, copy matplotlib's DejaVu Sans instead."""
    target = Path(USER_CONFIG_DIR) / "Arial.ttf"
    if not target.exists():
        import matplotlib

        src = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, target)


def prepare_data(args: DataArguments) -> tuple[Path, str]:
    """Convert the chosen data set to YOLO labels; returns (data.yaml, description)."""
    data_dir = Path(args.data_dir)
    dataset = args.dataset
    if dataset == "auto":
        dataset = "voc2007" if args.voc_root or not OFFLINE else "trees"
    if dataset == "trees":
        try:
            wheel = find_wheel(data_dir / "downloads", args.deepforest_wheel)
        except (FileNotFoundError, RuntimeError) as err:  # the message names the command to run
            raise UsageError(str(err)) from None
        voc = build_voc(wheel, data_dir / "trees_voc", tile=args.tile)
        yaml_path, stats = convert_voc(voc, data_dir / "trees_yolo", classes=("tree",))
        name = f"DeepForest 2.1.0 aerial trees as VOC ({args.tile}px tiles)"
    else:
        root = args.voc_root
        if root is None:
            if OFFLINE:
                raise UsageError("VOC2007 is not available offline: pass --voc-root (standard VOC "
                                 "layout) or --dataset trees.")
            from ultralytics.utils.downloads import download

            root = data_dir / "VOC2007_raw"
            download([f"{ASSETS_URL}/{z}" for z in VOC2007_ZIPS], dir=root, exist_ok=True)
        try:
            find_voc_dir(root)
        except FileNotFoundError as err:
            raise UsageError(f"{err}; or train offline on the DeepForest tree boxes with "
                             "YOLO_OFFLINE=1 and --dataset trees") from None
        yaml_path, stats = convert_voc(root, data_dir / "voc2007_yolo", classes=VOC_CLASSES)
        name = "VOC2007"
    summary = ", ".join(f"{s.image_set}: {s.images} images, {s.objects} objects + {s.difficult} difficult"
                        for s in stats)
    print(f"data: {name} ({summary}) -> {yaml_path}")
    return yaml_path, f"{name} ({summary})"


def resolve_model(model: str) -> tuple[str, str]:
    """Weights if they can be had, else the architecture's YAML (from scratch) with a note."""
    path = Path(model)
    if path.suffix != ".pt" or path.exists() or (Path(WEIGHTS_DIR) / path.name).exists() or not OFFLINE:
        return model, model
    yaml_name = path.with_suffix(".yaml").name
    note = (f"{model} (COCO-pretrained) is not on disk and YOLO_OFFLINE=1 forbids downloading it: training "
            f"{yaml_name} FROM SCRATCH, which is not the paper's setting (expect far lower mAP).")
    print(f"NOTE: {note}")
    return yaml_name, f"{yaml_name} (from scratch)"


def parse_kv(items: list[str]) -> dict:
    from ultralytics.cfg import smart_value

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--ultralytics_args expects key=value pairs, got {item!r}")
        out[key] = smart_value(value)
    return out


#: Arguments that do not change what a run trains: they may differ from the run in the folder
#: (where the data is cached, per-epoch validation and plots; the run is scored on last.pt).
NOT_SETTINGS = ("output_dir", "rerun", "plots", "val", "data_dir", "deepforest_wheel")


def check_run_dir(run_dir: Path, args: dict) -> None:
    """Refuse to train over a finished run of other settings in ``run_dir`` (Ultralytics replaces
    its weights and results.csv): ``--rerun`` or another ``--output_dir``."""
    done = run_dir / "results.json"
    if not done.is_file():
        return
    fix = "pass --rerun true to train over it, remove that file, or pass another --output_dir"
    recorded = read_record(done, fix=fix).get("args") or {}
    wanted = json.loads(json.dumps(args))  # as JSON has them, as the record (tuples: lists)
    differ = setting_differences(recorded, wanted, keys=[k for k in wanted if k not in NOT_SETTINGS])
    if differ:
        raise UsageError(f"{done} holds a run made with other settings ({'; '.join(differ)}); {fix}")


def train_and_evaluate(margs: ModelArguments, dargs: DataArguments, targs: TrainArguments,
                       tbargs: VOCTempBalanceArguments) -> dict:
    """One run; returns what results.json holds."""
    try:  # before the data and weights are fetched
        tb_config = tbargs.config() if targs.method == "tb" else None
    except ValueError as err:
        raise UsageError(str(err)) from None
    run_name = f"{targs.method}_seed{targs.seed}"
    project = Path(targs.output_dir).resolve()
    args = {**asdict(margs), **asdict(dargs), **asdict(targs), **asdict(tbargs)}
    if not targs.rerun:
        check_run_dir(project / run_name, args)
    if OFFLINE:
        ensure_offline_font()
    data_yaml, data_note = prepare_data(dargs)
    model_source, model_note = resolve_model(margs.model)
    cuda = torch.cuda.is_available() and targs.device != "cpu"
    amp = targs.amp if targs.amp is not None else (
        cuda and (not OFFLINE or (Path(WEIGHTS_DIR) / "yolo26n.pt").exists()))
    trainer = VOCTempBalanceTrainer.with_config(tb_config) if tb_config else VOCDetectionTrainer

    overrides = dict(
        data=str(data_yaml), epochs=targs.epochs, batch=targs.batch, imgsz=targs.imgsz,
        optimizer=targs.optimizer, lr0=targs.lr0, momentum=targs.momentum,
        weight_decay=targs.weight_decay,
        cos_lr=targs.cos_lr, lrf=targs.lrf, warmup_epochs=targs.warmup_epochs,
        patience=targs.patience, seed=targs.seed, deterministic=True, workers=targs.workers,
        amp=amp, val=targs.val, plots=targs.plots, fraction=targs.fraction,
        project=str(project), name=run_name, exist_ok=True,
        **({"device": targs.device} if targs.device is not None else {}),
        **parse_kv(targs.ultralytics_args),
    )
    start = time.time()
    model = YOLO(model_source)
    model.train(trainer=trainer, **overrides)
    train_seconds = time.time() - start
    run_dir = Path(model.trainer.save_dir)

    # The final model (EMA weights of the last epoch) on the test set: no selection on test data.
    metrics = YOLO(model.trainer.last).val(
        validator=VOCDetectionValidator, data=str(data_yaml), split="test", imgsz=targs.imgsz,
        batch=targs.batch, plots=False, project=str(run_dir), name="test", exist_ok=True,
        **({"device": targs.device} if targs.device is not None else {}))
    results = {
        "method": targs.method, "seed": targs.seed, "epochs": targs.epochs,
        "mAP50-95": float(metrics.box.map), "mAP50": float(metrics.box.map50),
        "precision": float(metrics.box.mp), "recall": float(metrics.box.mr),
        "evaluated": "weights/last.pt (EMA, final epoch) on the test set, difficult objects ignored",
        # What trained: optimizer="auto" makes Ultralytics choose both (and record them in args).
        "dataset": data_note, "model": model_note, "optimizer": str(model.trainer.args.optimizer),
        "lr0": float(model.trainer.args.lr0), "requested_optimizer": targs.optimizer,
        "weight_decay": targs.weight_decay, "batch": targs.batch, "imgsz": targs.imgsz,
        "amp": bool(amp), "tempbalance": tb_config.to_dict() if tb_config else None,
        "history": str(run_dir / HISTORY_FILE) if tb_config else None,
        "train_seconds": round(train_seconds, 1), "run_dir": str(run_dir),
        "args": args,
    }
    write_whole(run_dir / "results.json", json.dumps(results, indent=2))
    print(f"\n| method | seed | epochs | mAP50-95 | mAP50 |\n|---|---|---|---|---|\n"
          f"| {targs.method} | {targs.seed} | {targs.epochs} | {100 * results['mAP50-95']:.2f} | "
          f"{100 * results['mAP50']:.2f} |\nresults: {run_dir / 'results.json'}")
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainArguments, VOCTempBalanceArguments))
    return train_and_evaluate(*parser.parse_args_into_dataclasses(args=argv))


if __name__ == "__main__":
    run_main(main)
