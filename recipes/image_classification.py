#!/usr/bin/env python
"""Image classification with timm CNNs and TempBalance, on the Hugging Face ``Trainer``.

The paper's main experiments (Zhou et al., NeurIPS 2023, Section 4 and Appendix D) as one script:
CIFAR-10/100, SVHN, TinyImageNet (Hub) and Fashion-MNIST (offline, Debian package); ResNet18/34,
VGG16/19 (small-image versions), WRN-16-8/28-6 or any timm model; the methods of
``image_methods.py`` (``cal``, ``tb``, ``snr``, ``tb+snr``, ``sgdr``, ``lars``, ``lamb``, ``sgdp``,
``lookahead``, ``adam``, ``adamw``, ``tb+sgdp``) with the paper's defaults (batch 128, 200
epochs, weight decay 5e-4, cosine LR, the tuned initial LR of each method). TempBalance is one
line: ``Trainer(..., callbacks=[TempBalanceCallback(config)])``.

Every ``TrainingArguments`` flag works too (``--bf16``, ``--dataloader_num_workers``...);
``--lr`` and ``--epochs`` are short for ``--learning_rate`` and ``--num_train_epochs``.

Examples::

    # CIFAR-100 ResNet18, CAL vs TempBalance, the paper's five seeds (a GPU job)
    python recipes/image_classification.py --dataset cifar100 --model resnet18 \\
        --method cal tb --seeds 43 37 13 51 71 --output-dir runs/c100_r18

    # a quick offline run (Fashion-MNIST is fetched into data/ through apt-get download)
    python recipes/image_classification.py --dataset fashion_mnist --model resnet18 --width 0.25 \\
        --method tb --epochs 2 --max-train-samples 2000 --output-dir runs/quick

A run saved with ``--save_strategy epoch`` continues after a kill with ``--resume_from_checkpoint
OUTPUT_DIR/checkpoint-N`` (TempBalance's multipliers and history included).

Each run writes ``results.json`` (config, final and per-epoch test accuracy, TempBalance layers
and history) and ``tempbalance_history.jsonl`` to its output dir. Several methods, ``--lrs`` or
``--seeds`` make a grid: runs go to ``OUTPUT_DIR/METHOD/lrLR/seedSEED/`` and the paper-style
table (mean ± std per method and LR, best LR in bold) and bar plot to ``OUTPUT_DIR``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from image_data import get_spec, load_image_dataset, with_image_transforms
from image_data.loading import DataUnavailableError
from image_methods import (
    PAPER_SEEDS,
    build_optimizer,
    get_method,
    paper_lr,
    paper_norm_follow,
    paper_snr_strength,
    paper_tb_range,
)
from image_sweep import aggregate, format_table, write_sweep_outputs
from metrics import load_metric
from models.cifar_timm import PAPER_MODELS
from run_records import read_record, setting_differences, write_whole
from torch import nn
from tqdm.auto import tqdm
from transformers import HfArgumentParser, Trainer, TrainingArguments, set_seed
from transformers.modeling_outputs import ImageClassifierOutput
from usage import UsageError, run_main

from hf_tempbalance import TempBalanceCallback, TempBalanceConfig
from hf_tempbalance.arguments import TempBalanceSettings
from hf_tempbalance.history import HISTORY_FILE, read_history

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.json"


@dataclass
class ModelArguments:
    model: str = field(default="resnet18", metadata={
        "help": "resnet18, resnet34, vgg16, vgg19 (small-image versions, registered in timm as "
                "cifar_*), wrn16_8, wrn28_6, or any timm model name (e.g. resnet18.a1_in1k for "
                "timm's ImageNet ResNet18)"})
    width: float = field(default=1.0, metadata={
        "help": "channel multiplier of the paper's models (paper: 0.5, 1, 1.5)"})
    drop_rate: float = field(default=0.0, metadata={"help": "dropout before the classifier"})
    channels_last: bool = field(default=False, metadata={
        "help": "feed images in channels-last memory format (measured ~1.4x faster steps of the "
                "small ResNet18 on one CPU thread; results equal up to float rounding)"})


@dataclass
class DataArguments:
    dataset: str = field(default="cifar100", metadata={
        "help": "cifar100, cifar10, svhn, tiny_imagenet (Hub) or fashion_mnist (offline)"})
    data_dir: str = field(default="data", metadata={
        "help": "cache folder for locally obtained data (Fashion-MNIST)"})
    max_train_samples: int | None = field(default=None, metadata={
        "help": "use only the first N training images (quick runs)"})
    max_eval_samples: int | None = field(default=None, metadata={
        "help": "use only the first N test images"})


@dataclass
class MethodArguments(TempBalanceSettings):
    """The method grid and its knobs; TempBalance's are the library's ``--tb_*`` flags (as in
    ptb_lm.py and yolo_voc.py), with the paper's value for the method, dataset and model wherever
    a flag is left unset. ``--method`` decides whether TempBalance runs (``tb``, ``tb+snr``,
    ``tb+sgdp``) and whether it balances LRs or only regularises (``snr``)."""

    method: list[str] = field(default_factory=lambda: ["tb"], metadata={
        "help": "one or more of cal, tb, snr, tb+snr, sgdr, lars, lamb, sgdp, lookahead, adam, "
                "adamw, tb+sgdp"})
    lrs: list[float] = field(default_factory=list, metadata={
        "help": "grid of initial LRs (default: --lr, else the paper's LR of each method)"})
    seeds: list[int] = field(default_factory=list, metadata={
        "help": f"grid of seeds (default: --seed; the paper's: {' '.join(map(str, PAPER_SEEDS))})"})
    tb_s1: float | None = field(default=None, metadata={
        "help": "smallest TempBalance LR multiplier (default: the paper's, 0.5 or 0.6)"})
    tb_s2: float | None = field(default=None, metadata={
        "help": "largest TempBalance LR multiplier (default: the paper's, 1.5 or 1.4)"})
    tb_snr_strength: float | None = field(default=None, metadata={
        "help": "λ_sr of snr / tb+snr (default: the paper's value for the dataset and model; "
                "methods without SNR use 0)"})
    tb_norm_follow: str | None = field(default=None, metadata={
        "help": "which layer a norm follows (default: 'previous' for timm's VGGs, whose BNs are "
                "named features.N, else 'authors')"})
    tb_balance_lr: bool | None = field(default=None, metadata={
        "help": "default: the method's (False for snr: SNR alone); False with tb is the identity "
                "baseline on TempBalance's code path"})
    tb_log_layers: bool = field(default=False, metadata={
        "help": "also send per-layer values to report_to (default off: the history file has them)"})
    sgdr_t0: int = field(default=10, metadata={"help": "SGDR: epochs of the first cycle"})
    sgdr_t_mult: int = field(default=2, metadata={"help": "SGDR: cycle length multiplier"})
    lookahead_k: int = field(default=5, metadata={"help": "Lookahead: fast steps per sync"})
    lookahead_alpha: float = field(default=0.5, metadata={"help": "Lookahead: slow step size"})
    rerun: bool = field(default=False, metadata={
        "help": "train again runs whose results.json already exists, replacing it (default: a grid "
                "reuses those made with the same settings, and a folder holding a run of other "
                "settings is refused)"})


#: The paper's training setting (Appendix D) as parser defaults; any flag overrides them.
#: learning_rate=None means "the paper's LR for this method, dataset and model".
TRAINING_DEFAULTS = {
    "output_dir": "runs/image", "learning_rate": None, "num_train_epochs": 200,
    "per_device_train_batch_size": 128, "per_device_eval_batch_size": 256,
    "weight_decay": 5e-4, "optim": "sgd", "optim_args": "momentum=0.9",
    "lr_scheduler_type": "cosine", "max_grad_norm": 0.0, "eval_strategy": "epoch",
    "logging_strategy": "epoch", "save_strategy": "no", "report_to": "none",
    "remove_unused_columns": False, "seed": PAPER_SEEDS[0],
}
_ALIASES = {"--lr": "--learning_rate", "--epochs": "--num_train_epochs"}


def _expand_aliases(argv: list[str]) -> list[str]:
    out = []
    for arg in argv:
        flag, sep, value = arg.partition("=")
        out.append(_ALIASES.get(flag, flag) + sep + value if flag in _ALIASES else arg)
    return out


def parse_args(argv: list[str] | None = None):
    """``(ModelArguments, DataArguments, MethodArguments, TrainingArguments)`` from the CLI."""
    parser = HfArgumentParser((ModelArguments, DataArguments, MethodArguments, TrainingArguments))
    parser.set_defaults(**TRAINING_DEFAULTS)
    argv = _expand_aliases(sys.argv[1:] if argv is None else list(argv))
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
        return parser.parse_yaml_file(argv[0]) if argv[0].endswith(("yaml", "yml")) \
            else parser.parse_json_file(argv[0])
    return parser.parse_args_into_dataclasses(args=argv)


class ImageClassifier(nn.Module):
    """A timm model as the Trainer expects it: ``forward(pixel_values, labels)`` -> loss, logits."""

    def __init__(self, net: nn.Module, channels_last: bool = False) -> None:
        super().__init__()
        self.net = net
        # Channels-last input makes the convolutions compute (and pass on) channels-last
        # activations; the weights stay contiguous, so checkpoints (safetensors) are unchanged.
        self.channels_last = channels_last

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None):
        if self.channels_last:
            # .to(), not .contiguous(): a 1-channel NCHW tensor already counts as channels-last,
            # and .contiguous() would keep its strides (and the slow kernels).
            pixel_values = pixel_values.to(memory_format=torch.channels_last)
        logits = self.net(pixel_values)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)


def create_model(name: str, num_classes: int, in_chans: int, width: float = 1.0,
                 drop_rate: float = 0.0) -> nn.Module:
    """A timm model: the paper's names map to their small-image versions (``PAPER_MODELS``)."""
    timm_name = PAPER_MODELS.get(name.lower(), name)
    kwargs: dict[str, Any] = {"num_classes": num_classes, "in_chans": in_chans,
                              "drop_rate": drop_rate}
    if timm_name in PAPER_MODELS.values():
        kwargs["width"] = width
    elif width != 1.0:
        raise UsageError(f"--width applies to the paper's models {sorted(PAPER_MODELS)}, not to "
                         f"the timm model {name!r}")
    if not timm.is_model(timm_name.split(".")[0]):
        raise UsageError(f"unknown model {name!r}: use one of {sorted(PAPER_MODELS)} or a timm "
                         "model name (timm.list_models())")
    return timm.create_model(timm_name, pretrained=False, **kwargs)


def accuracy_metrics(metric: Any):
    """``compute_metrics`` for the Trainer from an ``evaluate`` accuracy metric."""
    def compute(eval_pred) -> dict[str, float]:
        return metric.compute(predictions=eval_pred.predictions, references=eval_pred.label_ids)
    return compute


def _predicted_labels(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # Keep argmax, not (N, classes) logits, across the evaluation loop.
    return logits.argmax(dim=-1)


def epoch_history(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-epoch rows from ``trainer.state.log_history``: train loss, LR, test loss and accuracy."""
    rows: dict[float, dict[str, Any]] = {}
    keys = {"loss": "train_loss", "learning_rate": "learning_rate", "eval_loss": "test_loss",
            "eval_accuracy": "test_accuracy"}
    for entry in log_history:
        if "epoch" not in entry:
            continue
        # The Trainer logs the epoch as a float: 2.5 at the end of `--epochs 2.5` is its own row.
        epoch = round(float(entry["epoch"]), 4)
        epoch = int(epoch) if epoch.is_integer() else epoch
        for key, name in keys.items():
            if key in entry:
                rows.setdefault(epoch, {"epoch": epoch})[name] = entry[key]
    return [rows[e] for e in sorted(rows)]


def prepare_data(data_args: DataArguments):
    """``(spec, train, test)``: transformed datasets, cut to ``max_*_samples``."""
    spec = get_spec(data_args.dataset)
    try:
        raw = load_image_dataset(spec, data_args.data_dir)
    except DataUnavailableError as err:  # its message says how to get the data
        raise UsageError(str(err)) from None
    train, test = raw[spec.train_split], raw[spec.test_split]
    if data_args.max_train_samples is not None:
        train = train.select(range(min(data_args.max_train_samples, len(train))))
    if data_args.max_eval_samples is not None:
        test = test.select(range(min(data_args.max_eval_samples, len(test))))
    return spec, with_image_transforms(train, spec, True), with_image_transforms(test, spec, False)


def method_tempbalance_config(method: str, dataset: str, model_args: ModelArguments,
                              method_args: MethodArguments) -> TempBalanceConfig | None:
    """The TempBalance settings of ``method`` (None without TempBalance): the ``--tb_*`` flags,
    with the paper's range, SNR strength and norm rule for each one left unset."""
    spec = get_method(method)
    if not (spec.tempbalance or spec.snr):
        return None
    s1, s2 = paper_tb_range(method, dataset, model_args.model)

    def given(value, paper):
        return paper if value is None else value

    # one end given, the other the paper's: an inverted range is the flag given, not the default
    if method_args.tb_s2 is None and given(method_args.tb_s1, s1) > s2:
        raise ValueError(f"--tb_s1={method_args.tb_s1!r} is above s2={s2}, the paper's largest "
                         f"multiplier for {method} here: give --tb_s2 as well (s2 >= s1)")
    if method_args.tb_s1 is None and given(method_args.tb_s2, s2) < s1:
        raise ValueError(f"--tb_s2={method_args.tb_s2!r} is below s1={s1}, the paper's smallest "
                         f"multiplier for {method} here: give --tb_s1 as well (s1 <= s2)")
    filled = dataclasses.replace(
        method_args, tb_s1=given(method_args.tb_s1, s1), tb_s2=given(method_args.tb_s2, s2),
        tb_norm_follow=given(method_args.tb_norm_follow, paper_norm_follow(model_args.model)),
        tb_balance_lr=given(method_args.tb_balance_lr, spec.tempbalance),
        # SNR is part of the method: a method without it regularises nothing
        tb_snr_strength=(given(method_args.tb_snr_strength,
                               paper_snr_strength(method, dataset, model_args.model))
                         if spec.snr else 0.0))
    return filled.config()


def run_settings(method: str, model_args: ModelArguments, method_args: MethodArguments,
                 args: TrainingArguments, train_samples: int, test_samples: int, dataset: str,
                 tb_config: TempBalanceConfig | None) -> dict[str, Any]:
    """What decides a run's result besides chance, as recorded at the top of its results.json: a
    finished run is reused only if they all match. ``tb_config``: the run's
    :func:`method_tempbalance_config`."""
    return json.loads(json.dumps({
        "dataset": dataset, "model": model_args.model, "width": model_args.width,
        "drop_rate": model_args.drop_rate, "method": method, "seed": args.seed,
        "lr": args.learning_rate, "epochs": args.num_train_epochs, "max_steps": args.max_steps,
        "batch_size": args.per_device_train_batch_size, "weight_decay": args.weight_decay,
        "optim": str(getattr(args.optim, "value", args.optim)), "optim_args": args.optim_args,
        "adam_beta1": args.adam_beta1, "adam_beta2": args.adam_beta2,
        "adam_epsilon": args.adam_epsilon,
        # each loader worker draws its own augmentation: another count, other draws
        "dataloader_num_workers": args.dataloader_num_workers,
        "lr_scheduler_type": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
        "lr_scheduler_kwargs": args.lr_scheduler_kwargs, "warmup_steps": args.warmup_steps,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "max_grad_norm": args.max_grad_norm, "label_smoothing_factor": args.label_smoothing_factor,
        "processes": args.world_size, "bf16": args.bf16, "fp16": args.fp16,
        "train_samples": train_samples, "test_samples": test_samples,
        # the optimizers' own knobs; TempBalance's (s1, s2, interval, snr) are in "tempbalance_config"
        "method_args": {k: v for k, v in dataclasses.asdict(method_args).items()
                        if k.startswith(("sgdr_", "lookahead_"))},
        "tempbalance_config": tb_config.to_dict() if tb_config is not None else None,
    }, default=str))


def train_one(method: str, model_args: ModelArguments, data_args: DataArguments,
              method_args: MethodArguments, args: TrainingArguments, data=None) -> dict[str, Any]:
    """Train and evaluate one (method, lr, seed); write and return its ``results.json`` content.

    ``args.learning_rate`` must be set (``None`` is resolved to the paper's LR by :func:`run`).
    """
    spec, train, test = data if data is not None else prepare_data(data_args)
    set_seed(args.seed)  # before the model is built: same init for every method at a seed
    net = create_model(model_args.model, spec.num_classes, spec.channels, model_args.width,
                       model_args.drop_rate)
    model = ImageClassifier(net, channels_last=model_args.channels_last)

    optimizer, scheduler = build_optimizer(
        method, model, args, num_examples=len(train), sgdr_t0=method_args.sgdr_t0,
        sgdr_t_mult=method_args.sgdr_t_mult, lookahead_k=method_args.lookahead_k,
        lookahead_alpha=method_args.lookahead_alpha)
    tb_config = method_tempbalance_config(method, spec.name, model_args, method_args)
    callbacks = [TempBalanceCallback(tb_config)] if tb_config else []

    trainer = Trainer(
        model=model, args=args, train_dataset=train, eval_dataset=test,
        compute_metrics=accuracy_metrics(load_metric("accuracy")),
        preprocess_logits_for_metrics=_predicted_labels,
        optimizers=(optimizer, scheduler), callbacks=callbacks,
    )
    # --resume_from_checkpoint DIR/checkpoint-N continues a killed run (save with --save_strategy
    # epoch); TempBalance's state and history come back with it (TempBalanceCallback's resume).
    train_result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint or None)
    history = epoch_history(trainer.state.log_history)
    if not history or "test_accuracy" not in history[-1]:  # no evaluation at the last epoch
        trainer.evaluate()  # logged with the current epoch, so it joins that epoch's row
        history = epoch_history(trainer.state.log_history)

    accuracies = [row["test_accuracy"] for row in history if "test_accuracy" in row]
    results: dict[str, Any] = {
        # dataset, model, method, seed, lr, epochs, batch size, ... (what a rerun must match)
        **run_settings(method, model_args, method_args, args, len(train), len(test), spec.name,
                       tb_config),
        "timm_model": net.pretrained_cfg.get("architecture", model_args.model),
        "steps": trainer.state.global_step,
        "test_accuracy": accuracies[-1], "best_test_accuracy": max(accuracies),
        "train_runtime_s": train_result.metrics.get("train_runtime"),
        "output_dir": args.output_dir, "history": history,
    }
    if tb_config is not None:
        engine = callbacks[0].engine
        history_path = os.path.join(args.output_dir, HISTORY_FILE)
        results["tempbalance"] = {
            "config": tb_config.to_dict(), "layers": engine.plan.names,
            "skipped": engine.plan.skipped, "updates": engine.num_updates,
            # the file once this run wrote it (its first update replaces an earlier run's file)
            "history": (read_history(history_path) if engine.num_updates and os.path.exists(history_path)
                        else engine.history),
        }
    if trainer.is_world_process_zero():
        os.makedirs(args.output_dir, exist_ok=True)
        write_whole(os.path.join(args.output_dir, RESULTS_FILE),
                    json.dumps(results, indent=1, default=_json_default))
    return results


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def grid(method_args: MethodArguments, args: TrainingArguments, dataset: str,
         model: str) -> list[tuple[str, float, int]]:
    """The (method, lr, seed) runs: ``--lrs`` x ``--seeds``; LR default: ``--lr``, else paper's.

    Ordered LR by LR, then seed by seed, with every method at each (LR, seed) next to each other,
    so a grid stopped early still holds comparable runs of all methods.
    """
    seeds = method_args.seeds or [args.seed]
    lrs = {}
    for method in method_args.method:
        try:
            get_method(method)  # fail before any training on a typo
        except ValueError as err:
            raise UsageError(str(err)) from None
        lrs[method.lower()] = method_args.lrs or [
            args.learning_rate if args.learning_rate is not None else paper_lr(method, dataset, model)]
    return [(method, float(values[i]), int(seed))
            for i in range(max(len(v) for v in lrs.values())) for seed in seeds
            for method, values in lrs.items() if i < len(values)]


def finished_run(out: str, settings: dict[str, Any], *, rerun: bool) -> dict[str, Any] | None:
    """The finished run in ``out`` when its recorded settings are ``settings`` (a grid reuses it),
    else None (train). A run of other settings is not replaced unless ``rerun``: its results.json
    may be the only copy of a long run."""
    done = os.path.join(out, RESULTS_FILE)
    if rerun or not os.path.exists(done):
        return None
    fix = "pass --rerun to train it again (replacing it), remove that file, or another --output-dir"
    previous = read_record(done, fix=fix)
    differ = setting_differences(previous, settings, implicit=ADDED_SETTINGS)
    if differ:
        raise UsageError(f"{done} holds a run made with other settings ({'; '.join(differ)}); {fix}")
    return previous


#: Settings that a results.json of an earlier version of this recipe lacks: its run had the
#: Trainer's defaults (no flag of the recipe changed them then), and is held to them.
ADDED_SETTINGS = {f.name: f.default for f in dataclasses.fields(TrainingArguments)
                  if f.name in ("adam_beta1", "adam_beta2", "adam_epsilon", "dataloader_num_workers")}


def run(model_args: ModelArguments, data_args: DataArguments, method_args: MethodArguments,
        args: TrainingArguments) -> list[dict[str, Any]]:
    """Run the grid (one run: straight into ``args.output_dir``); return every run's results."""
    spec = get_spec(data_args.dataset)
    runs = grid(method_args, args, spec.name, model_args.model)
    for _, lr, _ in runs:  # every run's settings are checked before the data loads
        if not lr > 0:
            raise UsageError(f"learning rate {lr:g} (--lr / --lrs): must be > 0")
    tb_configs = {}  # one per method: the same for each of its LRs and seeds
    for method in dict.fromkeys(method for method, _, _ in runs):
        try:
            tb_configs[method] = method_tempbalance_config(method, spec.name, model_args, method_args)
        except ValueError as err:
            raise UsageError(f"--method {method}: {err}") from None
    with args.main_process_first(desc="loading the data set"):  # one process downloads
        data = prepare_data(data_args)
    single = len(runs) == 1
    if args.resume_from_checkpoint and not single:
        raise UsageError("--resume_from_checkpoint continues one run; a grid reuses its finished runs "
                         "instead (recipes/studies/ resume every run of a grid)")
    plans = []  # (method, run args, reuse) per run, every folder checked before any training
    for method, lr, seed in runs:
        out = args.output_dir if single else os.path.join(args.output_dir, method, f"lr{lr:g}",
                                                          f"seed{seed}")
        run_args = dataclasses.replace(args, learning_rate=lr, seed=seed, output_dir=out)
        settings = run_settings(method, model_args, method_args, run_args, len(data[1]),
                                len(data[2]), spec.name, tb_configs[method])
        previous = finished_run(out, settings, rerun=method_args.rerun or bool(args.resume_from_checkpoint))
        plans.append((method, run_args, previous if not single else None))
    results = []
    for method, run_args, previous in tqdm(plans, desc="runs", disable=single or not args.should_log):
        if previous is not None:
            results.append(previous)
            logger.info("reusing %s (--rerun to train it again)",
                        os.path.join(run_args.output_dir, RESULTS_FILE))
            continue
        results.append(train_one(method, model_args, data_args, method_args, run_args, data))
    if args.should_save and not single:
        title = (f"{spec.name} / {model_args.model} (width {model_args.width:g}), "
                 f"{args.num_train_epochs:g} epochs, test accuracy (%) mean ± std over seeds")
        paths = write_sweep_outputs(results, args.output_dir, title)
        logger.info("wrote %s", ", ".join(paths.values()))
    return results


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    try:
        model_args, data_args, method_args, args = parse_args(argv)
        get_spec(data_args.dataset)
    except ValueError as err:  # an unknown flag or data set
        raise UsageError(str(err)) from None
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=logging.INFO if args.should_log else logging.WARNING)
    results = run(model_args, data_args, method_args, args)
    if args.should_log:
        print("\ntest accuracy (%), mean ± std over seeds (best LR per method in bold)")
        print(format_table(aggregate(results)))
    return results


if __name__ == "__main__":
    run_main(main)
