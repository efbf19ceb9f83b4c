"""TempBalance through the Hugging Face Trainer: applied LRs, schedulers, resume, logging.

Every LR check records, with an optimizer step pre-hook registered after TempBalance's, the LR each
param group really has when ``optimizer.step()`` runs, and compares it with
``scheduler_lr(t) · m_i(t)`` where ``m_i`` is recomputed here from the weights at the last update
(float64 SVD + the Hill formula + Eq. 2, written out below, independent of the library's code).
"""

from __future__ import annotations

import ast
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
    get_scheduler,
)

from hf_tempbalance import (  # noqa: E402
    TempBalance,
    TempBalanceCallback,
    TempBalanceConfig,
    TempBalanceTrainer,
    tempbalance_optimizer_cls_and_kwargs,
)
from hf_tempbalance.binding import unwrap_optimizer  # noqa: E402
from hf_tempbalance.groups import GROUP_KEY  # noqa: E402
from hf_tempbalance.history import HISTORY_FILE, read_history  # noqa: E402

S1, S2 = 0.5, 1.5


# ----------------------------------------------------------------------------- expectations
def expected_alpha(weight: torch.Tensor, transposed: bool = False) -> float:
    """PL_Alpha_Hill from float64 SVD of each slice, median xmin, authors' n = N - i."""
    w = weight.detach().double()
    if transposed:
        w = w.t()
    mats = [w] if w.ndim == 2 else list(w.permute(*range(2, w.ndim), 0, 1).reshape(-1, *w.shape[:2]))
    eigs = np.sort(np.concatenate([torch.linalg.svdvals(m).numpy() ** 2 for m in mats]))
    eigs = eigs[eigs > eigs[-1] * 2e-6]
    i = len(eigs) // 2
    n = len(eigs) - i
    return 1.0 + n / (np.log(eigs[i:]).sum() - n * math.log(eigs[i]))


def expected_multipliers(engine) -> dict[str, float]:
    alphas = {layer.name: expected_alpha(layer.module.weight, type(layer.module).__name__ == "Conv1D")
              for layer in engine.plan.layers}
    lo, hi = min(alphas.values()), max(alphas.values())
    return {k: S1 + (S2 - S1) * (a - lo) / (hi - lo) for k, a in alphas.items()}


class LRRecorder(TrainerCallback):
    """Records, at every optimizer step, each group's real LR and the expected one."""

    def __init__(self, interval: int | None = None, start: int = 0):
        self.interval, self.start = interval, start
        self.records: list[list[tuple[str | None, float, float]]] = []
        self.base_trace: list[list[float]] = []
        self.expected: dict[str, float] = {}
        self.trainer: Trainer | None = None  # set by the test once the Trainer exists

    @property
    def engine(self):
        return tb_callback(self.trainer).engine

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        self.scheduler = lr_scheduler
        self.inner = unwrap_optimizer(optimizer)
        self.parent = {id(p): i for i, g in enumerate(self.inner.param_groups) for p in g["params"]}
        self.step = state.global_step
        if getattr(self, "handle", None) is not None:  # a second train(): hook again, after TB's
            self.handle.remove()
        self.hooked, self.handle = False, None

    def on_step_begin(self, args, state, control, **kwargs):
        # Registered at the first step, i.e. after every on_train_begin: after TempBalance's hook
        # whatever the callback order (restoring callback states re-appends TempBalance's).
        if not self.hooked:
            self.handle = self.inner.register_step_pre_hook(self._hook)
            self.hooked = True

    def _hook(self, optimizer, args, kwargs):
        engine = self.engine
        if self.interval is not None and self.step >= self.start and (self.step - self.start) % self.interval == 0:
            self.expected = expected_multipliers(engine)
        base = self.scheduler.get_last_lr()
        self.base_trace.append(list(base))
        rows = []
        self.param_labels = {id(p): g.get(GROUP_KEY) for g in optimizer.param_groups for p in g["params"]}
        for group in optimizer.param_groups:
            label = group.get(GROUP_KEY)
            parent = self.parent[id(group["params"][0])]
            factor = self.expected.get(label, 1.0) if label is not None else 1.0
            rows.append((label, float(group["lr"]), base[parent] * factor))
        self.records.append(rows)
        self.step += 1

    def check(self, rtol: float = 1e-9, skip: int = 0) -> None:
        """Compare real and expected LRs (``skip``: leading steps whose update this run never saw)."""
        assert self.records, "no optimizer step was recorded"
        labelled = 0
        for rows in self.records[skip:]:
            for label, real, expected in rows:
                assert real == pytest.approx(expected, rel=rtol, abs=1e-15), (label, real, expected)
                labelled += label is not None
        assert labelled > 0, "no per-layer group was seen at step time"


def tb_callback(trainer: Trainer) -> TempBalanceCallback:
    """The trainer's TempBalance callback (resuming with the restore flag replaces the instance)."""
    return next(c for c in trainer.callback_handler.callbacks if isinstance(c, TempBalanceCallback))


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=97, n_positions=16,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg)


def lm_data(n: int, seed: int = 1) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 97, (n, 12), generator=gen)
    return [{"input_ids": row, "labels": row} for row in ids]


def make_args(tmp_path, **kw) -> TrainingArguments:
    base = dict(per_device_train_batch_size=4, learning_rate=1e-3, report_to=[], use_cpu=True,
                save_strategy="no", logging_steps=1000, disable_tqdm=True, seed=7,
                dataloader_num_workers=0)
    base.update(kw)
    return TrainingArguments(str(tmp_path), **base)


def run(tmp_path, model=None, data=None, *, trainer_cls=Trainer, recorder=None, callback=None,
        tb=None, resume=None, extra_callbacks=(), trainer_kwargs=None, **args_kw):
    model = model if model is not None else tiny_gpt2()
    callback = callback if callback is not None else TempBalanceCallback(
        TempBalanceConfig(dtype="float64", min_eigs=10, **(tb or {})))
    callbacks = [callback, *([recorder] if recorder else []), *extra_callbacks]
    trainer = trainer_cls(model=model, args=make_args(tmp_path, **args_kw),
                          train_dataset=data if data is not None else lm_data(32),
                          callbacks=callbacks, **(trainer_kwargs or {}))
    if recorder is not None:
        recorder.trainer = trainer
    trainer.train(resume_from_checkpoint=resume)
    return trainer


# ----------------------------------------------------------------------------- schedulers
SCHEDULERS = [
    ("linear", {}),
    ("cosine", {}),
    ("cosine_with_restarts", {"num_cycles": 2}),
    ("polynomial", {"power": 2.0, "lr_end": 1e-5}),
    ("constant", {}),
    ("constant_with_warmup", {}),
    ("inverse_sqrt", {}),
    ("reduce_lr_on_plateau", {"mode": "max", "patience": 0, "factor": 0.5}),
    ("cosine_with_min_lr", {"min_lr_rate": 0.1}),
    ("warmup_stable_decay", {"num_decay_steps": 4}),
]


@pytest.mark.parametrize("name,kwargs", SCHEDULERS, ids=[s[0] for s in SCHEDULERS])
def test_every_scheduler_gets_scheduler_lr_times_multiplier(tmp_path, name, kwargs):
    recorder = LRRecorder(interval=3)
    extra = {}
    if name == "reduce_lr_on_plateau":
        extra = dict(eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=8)
    trainer = run(tmp_path, recorder=recorder, tb={"interval": 3}, max_steps=12, warmup_steps=2,
                  lr_scheduler_type=name, lr_scheduler_kwargs=kwargs,
                  trainer_kwargs={"eval_dataset": lm_data(8, seed=3)} if extra else None, **extra)
    recorder.check()
    assert len(recorder.records) == 12
    engine = recorder.engine
    assert [r["step"] for r in engine.history if r["layer"] == engine.plan.names[0]] == [0, 3, 6, 9]
    # Multipliers span exactly [s1, s2] (Eq. 2) and the scheduler itself was never disturbed:
    # its LRs equal those of the same schedule run on a dummy optimizer.
    mults = list(engine.multipliers.values())
    assert min(mults) == pytest.approx(S1) and max(mults) == pytest.approx(S2)
    if name == "reduce_lr_on_plateau":
        assert recorder.base_trace[-1][0] < recorder.base_trace[0][0]  # it did reduce
        return
    dummy = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=trainer.args.learning_rate)
    sched = get_scheduler(name, dummy, num_warmup_steps=2, num_training_steps=12,
                          scheduler_specific_kwargs=kwargs)
    reference = []
    for _ in range(12):
        reference.append(sched.get_last_lr()[0])
        dummy.step()
        sched.step()
    assert [row[0] for row in recorder.base_trace] == pytest.approx(reference, rel=1e-12)


def test_users_own_optimizer_and_scheduler(tmp_path):
    model = tiny_gpt2()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    recorder = LRRecorder(interval=4)
    run(tmp_path, model=model, recorder=recorder, tb={"interval": 4}, max_steps=10,
        trainer_kwargs={"optimizers": (opt, sched)})
    recorder.check()
    assert [row[0] for row in recorder.base_trace] == pytest.approx(
        [0.05 * 0.5 ** (t // 3) for t in range(10)])
    assert len(opt.param_groups) == 1  # the user's layout is untouched between steps


@pytest.mark.parametrize("optim", ["adamw_torch", "sgd", "adafactor"])
def test_tempbalance_trainer_builds_labelled_groups(tmp_path, optim):
    recorder = LRRecorder(interval=2)
    trainer = run(tmp_path, trainer_cls=TempBalanceTrainer, recorder=recorder, tb={"interval": 2},
                  max_steps=4, optim=optim, weight_decay=0.1)
    recorder.check()
    groups = trainer.optimizer.param_groups
    cls, _ = Trainer.get_optimizer_cls_and_kwargs(trainer.args, trainer.model)
    assert isinstance(unwrap_optimizer(trainer.optimizer), cls)
    engine = recorder.engine
    assert {g[GROUP_KEY] for g in groups} - {None} == set(engine.plan.names)
    decay = set(trainer.get_decay_parameter_names(trainer.model))
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    seen = [names[id(p)] for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(n for n, p in trainer.model.named_parameters() if p.requires_grad)
    for g in groups:
        for p in g["params"]:
            assert g["weight_decay"] == (0.1 if names[id(p)] in decay else 0.0)


def test_tempbalance_trainer_keeps_an_optimizers_own_groups(tmp_path):
    # Groups passed through optimizer_cls_and_kwargs["params"] (the user's, or GaLore's) are the
    # user's layout: kept as given, split per layer at each step only.
    model = tiny_gpt2()
    blocks = [p for n, p in model.named_parameters() if ".h." in n]
    rest = [p for n, p in model.named_parameters() if ".h." not in n]
    own = [{"params": blocks, "lr": 2e-3}, {"params": rest, "lr": 5e-4}]
    recorder = LRRecorder(interval=2)
    trainer = run(tmp_path, model=model, trainer_cls=TempBalanceTrainer, recorder=recorder,
                  tb={"interval": 2}, max_steps=4,
                  trainer_kwargs={"optimizer_cls_and_kwargs": (torch.optim.SGD, {"params": own, "lr": 1e-3})})
    recorder.check()  # the LR of each split group = its scheduler LR x its layer's multiplier
    groups = unwrap_optimizer(trainer.optimizer).param_groups
    assert [len(g["params"]) for g in groups] == [len(blocks), len(rest)]
    assert [g["initial_lr"] for g in groups] == [2e-3, 5e-4]


def test_optimizer_cls_and_kwargs_helper(tmp_path):
    model = tiny_gpt2()
    args = make_args(tmp_path, max_steps=4, optim="sgd")
    cfg = TempBalanceConfig(dtype="float64", min_eigs=10, interval=2)
    recorder = LRRecorder(interval=2)
    trainer = Trainer(model=model, args=args, train_dataset=lm_data(16),
                      callbacks=[TempBalanceCallback(cfg), recorder],
                      optimizer_cls_and_kwargs=tempbalance_optimizer_cls_and_kwargs(model, args, cfg))
    recorder.trainer = trainer
    trainer.train()
    recorder.check()
    assert isinstance(unwrap_optimizer(trainer.optimizer), torch.optim.SGD)
    assert sum(g.get(GROUP_KEY) is not None for g in trainer.optimizer.param_groups) >= 7


# ----------------------------------------------------------------------------- clock
def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    recorder = LRRecorder(interval=3)
    run(tmp_path, recorder=recorder, tb={"interval": 3}, data=lm_data(64), num_train_epochs=1,
        gradient_accumulation_steps=2)
    recorder.check()
    assert len(recorder.records) == 8  # 16 batches / 2
    history = recorder.engine.history
    assert sorted({r["step"] for r in history}) == [0, 3, 6]


def test_interval_epoch_and_start_step(tmp_path):
    recorder = LRRecorder(interval=6, start=6)  # 24 samples / batch 4 = 6 steps per epoch
    trainer = run(tmp_path, recorder=recorder, tb={"interval": "epoch", "start_step": 6},
                  data=lm_data(24), num_train_epochs=3)
    recorder.check()
    steps = sorted({r["step"] for r in recorder.engine.history})
    assert steps == [6, 12]
    history = read_history(trainer.args.output_dir)
    assert sorted({r["epoch"] for r in history}) == [1.0, 2.0]


def test_too_few_updates_warns(tmp_path):
    with pytest.warns(UserWarning, match="only 1 time"):
        run(tmp_path, data=lm_data(16), num_train_epochs=1)


# ----------------------------------------------------------------------------- resume
class StopAt(TrainerCallback):
    def __init__(self, step):
        self.stop = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.stop:
            control.should_training_stop = True


@pytest.mark.parametrize("trainer_cls", [Trainer, TempBalanceTrainer], ids=["plain", "tb_trainer"])
@pytest.mark.parametrize("restore_flag", [False, True], ids=["auto", "flag"])
def test_resume_reproduces_uninterrupted_run(tmp_path, trainer_cls, restore_flag):
    common = dict(tb={"interval": "epoch"}, data=lm_data(24), max_steps=12, save_strategy="steps",
                  save_steps=4, lr_scheduler_type="cosine", warmup_steps=1,
                  restore_callback_states_from_checkpoint=restore_flag, trainer_cls=trainer_cls)
    straight_rec = LRRecorder(interval=6)
    straight = run(tmp_path / "a", recorder=straight_rec, **common)

    run(tmp_path / "b", recorder=LRRecorder(interval=6), extra_callbacks=[StopAt(4)], **common)
    resumed_rec = LRRecorder(interval=6)
    resumed = run(tmp_path / "b", model=tiny_gpt2(seed=123), recorder=resumed_rec,
                  resume=str(tmp_path / "b" / "checkpoint-4"), **common)

    resumed_rec.check(skip=2)  # steps 4, 5 use the update of step 0, checked through the straight run
    straight_rec.check()
    straight_lrs = [[lr for _, lr, _ in rows] for rows in straight_rec.records[4:]]
    resumed_lrs = [[lr for _, lr, _ in rows] for rows in resumed_rec.records]
    assert resumed_lrs == straight_lrs
    for (name, a), (_, b) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    hist_a = read_history(straight.args.output_dir)
    hist_b = read_history(resumed.args.output_dir)
    assert [(r["step"], r["layer"], r["multiplier"]) for r in hist_a] == \
           [(r["step"], r["layer"], r["multiplier"]) for r in hist_b]


# ----------------------------------------------------------------------------- logging
SUMMARY_TAGS = {f"tempbalance/{k}" for k in ("alpha_hill_mean", "alpha_hill_min", "alpha_hill_max",
                                               "multiplier_min", "multiplier_max")}


def _tensorboard_scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = [os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs if "tfevents" in f]
    assert len(files) == 1
    acc = EventAccumulator(os.path.dirname(files[0]))
    acc.Reload()
    return acc


def _printed_logs(out: str) -> list[dict]:
    """The dicts PrinterCallback printed (disable_tqdm=True), one a line."""
    return [ast.literal_eval(line) for line in out.splitlines() if line.startswith("{'loss'")]


def test_logged_keys_reach_tensorboard(tmp_path, capsys):
    pytest.importorskip("tensorboard")

    trainer = run(tmp_path, tb={"interval": 4}, max_steps=8, logging_steps=1,
                  report_to=["tensorboard"], trainer_cls=TempBalanceTrainer)
    engine = tb_callback(trainer).engine
    acc = _tensorboard_scalars(tmp_path)
    tags = set(acc.Tags()["scalars"])
    # the names docs/trainer.md prints: the Trainer's writer puts train/ before each key
    per_layer = {f"train/tempbalance/{kind}/{name}" for name in engine.plan.names
                 for kind in ("alpha_hill", "multiplier")}
    assert {f"train/{t}" for t in SUMMARY_TAGS} | per_layer <= tags
    assert not {t for t in tags if "tempbalance" in t} - per_layer - {f"train/{t}" for t in SUMMARY_TAGS}
    # the console line holds the summary only, next to the Trainer's own keys
    printed = _printed_logs(capsys.readouterr().out)
    assert len(printed) == 8
    assert all({k for k in line if "tempbalance" in k} == SUMMARY_TAGS for line in printed)
    layer = engine.plan.names[1]
    logged = {e.step: e.value for e in acc.Scalars(f"train/tempbalance/multiplier/{layer}")}
    by_update = {r["step"]: r["multiplier"] for r in engine.history if r["layer"] == layer}
    for step, value in logged.items():
        last_update = max(s for s in by_update if s <= step - 1)  # log after optimizer step step-1
        assert value == pytest.approx(by_update[last_update], rel=1e-6)
    assert len(logged) == 8
    # trainer.state.log_history (and so trainer_state.json) gets the summary, not every layer
    train_logs = [row for row in trainer.state.log_history if "loss" in row]
    assert len(train_logs) == 8
    for row in train_logs:
        last = max(s for s in by_update if s <= row["step"] - 1)
        values = [r["value"] for r in engine.history if r["step"] == last]
        assert row["tempbalance/alpha_hill_mean"] == pytest.approx(np.mean(values), rel=1e-9)
        assert not any(key.startswith("tempbalance/multiplier/") for key in row)


def test_log_layers_off_sends_the_summary_only(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    trainer = run(tmp_path, tb={"interval": 2, "log_layers": False}, max_steps=4, logging_steps=1,
                  report_to=["tensorboard"], trainer_cls=TempBalanceTrainer)
    tags = {t for t in _tensorboard_scalars(tmp_path).Tags()["scalars"] if "tempbalance" in t}
    assert tags == {f"train/{t}" for t in SUMMARY_TAGS}
    assert all({k for k in line if "tempbalance" in k} == SUMMARY_TAGS
               for line in _printed_logs(capsys.readouterr().out))
    # the history file keeps every layer whatever log_layers says
    engine = tb_callback(trainer).engine
    assert len(read_history(trainer.args.output_dir)) == engine.num_updates * len(engine.plan.names)


def test_plain_trainer_warns_that_reporters_miss_the_values(tmp_path):
    """A plain Trainer calls its reporters before user callbacks: the callback says so once
    (and names TempBalanceTrainer) instead of reordering the Trainer's callbacks."""
    pytest.importorskip("tensorboard")
    with pytest.warns(UserWarning, match="TempBalanceTrainer") as record:
        trainer = run(tmp_path, tb={"interval": 4}, max_steps=8, logging_steps=1,
                      report_to=["tensorboard"])
    assert sum("do not reach report_to" in str(w.message) for w in record) == 1
    # the console / log_history still get the summary
    assert any("tempbalance/alpha_hill_mean" in row for row in trainer.state.log_history)


def test_history_file_on_main_process(tmp_path):
    trainer = run(tmp_path, tb={"interval": 2}, max_steps=4)
    rows = read_history(trainer.args.output_dir)
    engine = tb_callback(trainer).engine
    assert len(rows) == len(engine.history) == 2 * len(engine.plan.names)
    assert {"step", "layer", "value", "multiplier", "base_lr", "epoch"} <= set(rows[0])


# ----------------------------------------------------------------------------- models
class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(16, 3)

    def forward(self, pixel_values, labels=None):
        logits = self.head(self.features(pixel_values))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return {"loss": loss, "logits": logits}


@pytest.mark.parametrize("where", ["after the step", "inside the step"])
def test_train_again_after_an_exception_does_not_compound(tmp_path, where):
    # A train() that raises (Ctrl-C, OOM under auto_find_batch_size) skips on_train_end, so the
    # first engine's hooks are still on the optimizer when train() runs again; raised inside
    # optimizer.step() (after TempBalance's pre-hook) it also leaves the groups split.
    class CrashOnce(TrainerCallback):
        crashed = False

        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            if state.global_step == 3 and not CrashOnce.crashed:
                CrashOnce.crashed = True
                if where == "after the step":
                    raise RuntimeError("interrupted")
                inner = unwrap_optimizer(optimizer)

                def fail(*_):
                    handle.remove()
                    raise RuntimeError("interrupted")

                handle = inner.register_step_pre_hook(fail)  # runs after TempBalance's

    recorder = LRRecorder(interval=2)
    callback = TempBalanceCallback(TempBalanceConfig(dtype="float64", min_eigs=10, interval=2))
    trainer = Trainer(model=tiny_gpt2(), args=make_args(tmp_path, max_steps=6), train_dataset=lm_data(32),
                      callbacks=[callback, recorder, CrashOnce()])
    recorder.trainer = trainer
    with pytest.raises(RuntimeError, match="interrupted"):
        trainer.train()
    first = callback.engine
    assert first.attached  # on_train_end never ran
    recorder.records.clear()
    trainer.train()
    recorder.check()  # the LRs used are scheduler LR x this engine's multipliers, not x m_old x m_new
    assert callback.engine is not first and not first.attached and len(recorder.records) == 6
    # the Trainer's own two groups (decay / no decay), as any checkpoint must hold them
    assert len(trainer.optimizer.state_dict()["param_groups"]) == 2


def test_small_cnn_through_trainer(tmp_path):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    data = [{"pixel_values": torch.randn(1, 8, 8, generator=gen), "labels": int(i % 3)} for i in range(16)]
    recorder = LRRecorder(interval=2)
    # (features.N names: the BN pairing of the authors' rule, bn -> conv, needs "previous" here)
    run(tmp_path, model=TinyCNN(), data=data, recorder=recorder,
        tb={"interval": 2, "norm_follow": "previous"}, max_steps=4, optim="sgd", learning_rate=0.1)
    recorder.check()
    engine = recorder.engine
    assert engine.plan.names == ["features.3", "features.6"]  # first conv and head excluded
    # BatchNorm follows its conv: its parameters are split into the conv's group at step time
    # (whose LR check() has compared with base x multiplier); the excluded first conv's stays out.
    model = recorder.trainer.model
    label = {name: recorder.param_labels[id(p)] for name, p in model.named_parameters()}
    assert {n: label[n] for n in label if n.startswith(("features.1.", "features.4.", "features.7."))} == {
        "features.1.weight": None, "features.1.bias": None,
        "features.4.weight": "features.3", "features.4.bias": "features.3",
        "features.7.weight": "features.6", "features.7.bias": "features.6"}


def test_bert_style_model_through_trainer(tmp_path):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=60, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=128, max_position_embeddings=16, num_labels=2,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertForSequenceClassification(cfg)
    gen = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, 60, (10,), generator=gen), "labels": i % 2} for i in range(16)]
    recorder = LRRecorder(interval=2)
    run(tmp_path, model=model, data=data, recorder=recorder, tb={"interval": 2}, max_steps=4)
    recorder.check()
    names = recorder.engine.plan.names
    assert any("attention.self.query" in n for n in names) and any("intermediate.dense" in n for n in names)


def test_bf16_mixed_precision_and_compiled_model_names(tmp_path):
    recorder = LRRecorder(interval=2)
    run(tmp_path, recorder=recorder, tb={"interval": 2}, max_steps=4, bf16=True)
    recorder.check(rtol=1e-9)
    # torch.compile wraps the module; the engine balances the same layers under the same names.

    model = tiny_gpt2()
    compiled = torch.compile(model)
    assert TempBalance(compiled, min_eigs=10).plan.names == TempBalance(model, min_eigs=10).plan.names


# ----------------------------------------------------------------------------- SNR
def test_snr_applied_with_weight_decay(tmp_path):
    def one_step(snr: float):
        model = tiny_gpt2()
        with torch.no_grad():  # a clear top singular value, so 50 power iterations converge
            gen = torch.Generator().manual_seed(5)
            for p in model.parameters():
                if p.ndim == 2:
                    p += torch.outer(torch.randn(p.shape[0], generator=gen), torch.randn(p.shape[1], generator=gen)) / 8
        cb = TempBalanceCallback(TempBalanceConfig(balance_lr=False, snr_strength=snr, snr_iterations=50,
                                                   min_eigs=10))
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        trainer = run(tmp_path / f"snr{snr}", model=model, callback=cb, max_steps=1, optim="sgd",
                      learning_rate=0.1, weight_decay=0.01, lr_scheduler_type="constant")
        return before, dict(trainer.model.named_parameters()), cb.engine

    before, plain, _ = one_step(0.0)
    _, regularised, engine = one_step(0.5)
    for layer in engine.plan.layers:
        name = layer.param_names[0]
        w = before[name].double()
        mat = w.reshape(w.shape[0], -1)
        u, s, vh = torch.linalg.svd(mat)
        expected = (-0.1 * 0.5 * s[0] * torch.outer(u[:, 0], vh[0])).reshape(w.shape)
        torch.testing.assert_close((regularised[name] - plain[name]).double(), expected, rtol=1e-3, atol=1e-6)
    assert all(m == 1.0 for m in engine.multipliers.values())  # SNR alone leaves LRs alone


def test_refuses_a_launch_that_trains_one_copy_per_process(tmp_path, monkeypatch):
    # What `accelerate launch --multi_gpu` leaves on a CPU machine without --use_cpu: WORLD_SIZE=2
    # in the environment while the Trainer's own world is one process (the launched version of
    # this is tests/test_distributed.py::test_trainer_callback_refuses_one_copy_per_process).
    args = make_args(tmp_path)
    assert args.world_size == 1
    model = tiny_gpt2()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    callback = TempBalanceCallback()
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match=r"2 processes were launched but the Trainer .* --use_cpu true"):
        callback.on_train_begin(args, TrainerState(), TrainerControl(), model=model, optimizer=optimizer)
    assert callback.engine is None and not optimizer._optimizer_step_pre_hooks
    monkeypatch.setenv("WORLD_SIZE", "1")
    callback.on_train_begin(args, TrainerState(), TrainerControl(), model=model, optimizer=optimizer)
    assert callback.engine is not None
    callback.on_train_end(args, TrainerState(), TrainerControl())


def test_checkpoint_leaves_history_to_the_file_and_resume_cuts_it_back(tmp_path):
    """The engine state in trainer_state.json carries no history (it would grow by a row per layer
    and update); resuming inside a finished run's directory cuts the file back to the checkpoint
    and regrows exactly the rows of the uninterrupted run."""
    common = dict(tb={"interval": 2}, data=lm_data(24), max_steps=8, save_strategy="steps",
                  save_steps=4, lr_scheduler_type="cosine")
    straight = run(tmp_path, **common)
    expected = read_history(straight.args.output_dir)
    assert {r["step"] for r in expected} == {0, 2, 4, 6}
    saved = json.loads((tmp_path / "checkpoint-4" / "trainer_state.json").read_text())
    engine_state = saved["stateful_callbacks"]["TempBalanceCallback"]["attributes"]["engine_state"]
    assert "history" not in engine_state and engine_state["num_updates"] == 2

    resumed = run(tmp_path, model=tiny_gpt2(seed=123), resume=str(tmp_path / "checkpoint-4"), **common)
    rows = read_history(resumed.args.output_dir)
    key = [(r["step"], r["update"], r["layer"], r["multiplier"]) for r in expected]
    assert [(r["step"], r["update"], r["layer"], r["multiplier"]) for r in rows] == key
    assert [(r["step"], r["layer"]) for r in tb_callback(resumed).engine.history] == \
           [(r["step"], r["layer"]) for r in expected]


def test_resume_into_another_directory_reads_the_checkpointed_runs_history(tmp_path):
    common = dict(tb={"interval": 2}, data=lm_data(24), max_steps=8, save_strategy="steps",
                  save_steps=4)
    straight = run(tmp_path / "a", **common)
    expected = [(r["step"], r["layer"], r["multiplier"]) for r in read_history(straight.args.output_dir)]
    resumed = run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-4"), **common)
    rows = read_history(resumed.args.output_dir)
    assert [(r["step"], r["layer"], r["multiplier"]) for r in rows] == expected

    # Neither file left: the run goes on, says so, and its file starts at the checkpoint.
    (tmp_path / "a" / HISTORY_FILE).unlink()
    (tmp_path / "b" / HISTORY_FILE).unlink()
    with pytest.warns(UserWarning, match="follows 2 TempBalance updates, but .*found 0 of them"):
        again = run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-4"), **common)
    rows = read_history(again.args.output_dir)
    assert [(r["step"], r["layer"], r["multiplier"]) for r in rows] == [e for e in expected if e[0] >= 4]


def test_resume_never_takes_another_runs_history_for_its_own(tmp_path):
    """A checkpoint resumed into a directory where a different run (same schedule, other data)
    has since written its history: same number of updates, other multipliers. Those rows are
    not this run's; with the checkpointed run's own file gone too, the history restarts."""
    common = dict(tb={"interval": 2}, max_steps=8, save_strategy="steps", save_steps=4)
    run(tmp_path / "a", data=lm_data(24), **common)
    own = [(r["step"], r["layer"], r["multiplier"]) for r in read_history(tmp_path / "a")]
    shutil.copytree(tmp_path / "a" / "checkpoint-4", tmp_path / "saved")
    shutil.rmtree(tmp_path / "a")
    run(tmp_path / "a", data=lm_data(24, seed=5), model=tiny_gpt2(seed=5), **common)
    other = [(r["step"], r["layer"], r["multiplier"]) for r in read_history(tmp_path / "a")]
    assert [k[:2] for k in other] == [k[:2] for k in own] and other != own
    with pytest.warns(UserWarning, match="or rows of another run"):
        resumed = run(tmp_path / "a", data=lm_data(24), resume=str(tmp_path / "saved"), **common)
    rows = read_history(resumed.args.output_dir)
    assert [(r["step"], r["layer"], r["multiplier"]) for r in rows] == [k for k in own if k[0] >= 4]


def test_without_a_history_file_the_checkpoint_carries_the_history(tmp_path):
    callback = lambda: TempBalanceCallback(TempBalanceConfig(dtype="float64", min_eigs=10, interval=2),  # noqa: E731
                                           history_file=None)
    common = dict(data=lm_data(24), max_steps=8, save_strategy="steps", save_steps=4)
    straight = run(tmp_path, callback=callback(), **common)
    resumed = run(tmp_path, callback=callback(), resume=str(tmp_path / "checkpoint-4"), **common)
    assert not (tmp_path / HISTORY_FILE).exists()
    key = [(r["step"], r["layer"], r["multiplier"]) for r in tb_callback(straight).engine.history]
    assert [(r["step"], r["layer"], r["multiplier"]) for r in tb_callback(resumed).engine.history] == key


class Stream(torch.utils.data.IterableDataset):
    """An iterable data set: the Trainer knows no epoch length, so "epoch" means epoch begins."""

    def __init__(self, rows):
        self.rows = rows

    def __iter__(self):
        return iter(self.rows)


@pytest.mark.parametrize("checkpoint", [4, 6])  # mid-epoch, and at the end of the first epoch
def test_iterable_dataset_epochs_survive_a_resume(tmp_path, checkpoint):
    # 24 rows / batch 4 = 6 steps an epoch. The resumed Trainer re-enters its epoch (another
    # on_epoch_begin mid-way), which must not add an update the uninterrupted run never made.
    data = Stream(lm_data(24))
    straight = run(tmp_path / "straight", data=data, max_steps=14)
    run(tmp_path / "run", data=data, max_steps=14, save_strategy="steps", save_steps=checkpoint)
    resumed = run(tmp_path / "run", data=data, max_steps=14,
                  resume=str(tmp_path / "run" / f"checkpoint-{checkpoint}"))
    steps, multipliers = {}, {}
    for name, trainer in (("straight", straight), ("resumed", resumed)):
        rows = read_history(trainer.args.output_dir)
        steps[name] = [r["step"] for r in rows]
        multipliers[name] = [r["multiplier"] for r in rows]
    assert sorted(set(steps["straight"])) == [0, 6, 12]
    assert steps["resumed"] == steps["straight"]
    assert multipliers["resumed"] == pytest.approx(multipliers["straight"], rel=1e-9)
