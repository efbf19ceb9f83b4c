"""Fault injection: nothing a user saved or configured can silently corrupt LRs or lose history.

Each cause of issue 14 in turn: a config changed after validation, a damaged engine state, a
resume that loses history, a torn history line (down to ``kill -9`` in the middle of an append),
malformed input to the CLI, side effects of an idle callback, and the ``s1 == s2`` settings. LRs
are checked from outside: the LR a parameter really used in a plain-SGD step is
``(p_before - p_after) / grad``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from integrity_run import INTERVAL, STEPS, make_trainer  # noqa: E402

from hf_tempbalance import TempBalance, TempBalanceCallback, TempBalanceConfig  # noqa: E402
from hf_tempbalance.cli import main  # noqa: E402
from hf_tempbalance.history import (  # noqa: E402
    HISTORY_FILE,
    HistoryFormatError,
    append_history,
    history_backups,
    read_history,
)

ROOT = Path(__file__).resolve().parents[1]
LR = 0.1
LAYERS = 5  # balanced layers of integrity_run's TinyClassifier


def make_net(seed: int = 0) -> nn.Module:
    """Five float64 Linears; the middle three ('1', '2', '3') are balanced with min_eigs=10."""
    torch.manual_seed(seed)
    widths = [16, 48, 64, 40, 56, 8]
    return nn.Sequential(*[nn.Linear(a, b) for a, b in zip(widths, widths[1:])]).double()


def used_lrs(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """One plain-SGD step on a fixed random gradient: the LR each parameter really used."""
    gen = torch.Generator().manual_seed(1)
    before = {}
    for name, param in model.named_parameters():
        param.grad = torch.randn(param.shape, generator=gen, dtype=param.dtype)
        before[name] = param.detach().clone()
    optimizer.step()
    return {name: float(((before[name] - p.detach()) / p.grad).median())
            for name, p in model.named_parameters()}


def history_key(path) -> list[tuple]:
    return [(r["step"], r["update"], r["layer"], r["multiplier"]) for r in read_history(path)]


def messages(record) -> list[str]:
    return [str(w.message) for w in record]


# ----------------------------------------------------------------------- 1. config after validation
@pytest.mark.parametrize("field,value", [("s1", math.nan), ("interval", 0), ("s2", 0.1),
                                         ("layer_types", ("attention",))])
def test_a_config_cannot_change_after_validation(field, value):
    cfg = TempBalanceConfig()
    with pytest.raises(dataclasses.FrozenInstanceError, match=rf"cfg\.replace\({field}=\.\.\.\)"):
        setattr(cfg, field, value)
    with pytest.raises(dataclasses.FrozenInstanceError):
        delattr(cfg, field)
    assert cfg == TempBalanceConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(TempBalanceCallback(s1=0.6, s2=1.4).config, field, value)
    # the way to change a value validates it
    with pytest.raises(ValueError, match=rf"TempBalanceConfig\.{field}="):
        cfg.replace(**{field: value})


def test_a_forced_config_never_reaches_the_optimizer():
    cfg = TempBalanceConfig(min_eigs=10, interval=1)
    object.__setattr__(cfg, "s1", math.nan)  # around the frozen dataclass
    with pytest.raises(ValueError, match=r"TempBalanceConfig\.s1=nan"):
        TempBalance(make_net(), cfg)

    # Forced after the engine was built: the update refuses the NaN multipliers before the
    # optimizer runs, and the weights, multipliers and LRs stay as they were.
    model = make_net()
    tb = TempBalance(model, TempBalanceConfig(min_eigs=10, interval=1))
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    tb.attach(optimizer)
    object.__setattr__(tb.config, "s1", math.nan)
    before = [p.detach().clone() for p in model.parameters()]
    for param in model.parameters():
        param.grad = torch.ones_like(param)
    with pytest.raises(ValueError, match="changed after it was validated"):
        optimizer.step()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert list(tb.multipliers.values()) == [1.0, 1.0, 1.0]
    assert [g["lr"] for g in optimizer.param_groups] == [LR]


def test_a_multiplier_written_by_hand_never_reaches_the_optimizer():
    model = make_net()
    tb = TempBalance(model, TempBalanceConfig(min_eigs=10, interval=1, start_step=10**6))
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    tb.attach(optimizer)
    tb.multipliers["2"] = math.nan
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"multipliers\['2'\] = nan"):
        used_lrs(model, optimizer)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    tb.multipliers["2"] = 1.25
    assert used_lrs(model, optimizer)["2.weight"] == pytest.approx(LR * 1.25, rel=1e-9)


# ----------------------------------------------------------------------- s1 == s2
@pytest.mark.parametrize("assign", ["linear", "step", "sqrt", "log2"])
@pytest.mark.parametrize("s", [0.7, 1.3])
def test_equal_s1_and_s2_is_a_constant_multiplier(assign, s):
    model = make_net()
    tb = TempBalance(model, TempBalanceConfig(s1=s, s2=s, assign=assign, min_eigs=10, interval=1))
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    tb.attach(optimizer)
    used = used_lrs(model, optimizer)
    assert tb.num_updates == 1 and tb.plan.names == ["1", "2", "3"]
    assert all(row["valid"] for row in tb.history)
    for name, lr in used.items():
        expected = LR * s if name.split(".")[0] in tb.plan.names else LR
        assert lr == pytest.approx(expected, rel=1e-9), name


def test_s1_equal_s2_equal_one_leaves_the_optimizer_alone():
    """Momentum, weight decay, a schedule, an update every 2 steps: the same weights bit for bit,
    and the optimizer's groups exactly its own at every step (nothing split, nothing scaled)."""
    def train(with_tempbalance: bool):
        model = make_net()
        optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=5e-4)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 0.8 ** k)
        tb = None
        if with_tempbalance:
            tb = TempBalance(model, TempBalanceConfig(s1=1.0, s2=1.0, min_eigs=10, interval=2))
            tb.attach(optimizer)
        seen = []
        optimizer.register_step_pre_hook(lambda opt, args, kwargs: seen.append(
            [(len(g["params"]), g["lr"]) for g in opt.param_groups]))
        x = torch.randn(32, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        for _ in range(6):
            model(x).pow(2).mean().backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        return model, seen, tb

    plain, plain_seen, _ = train(False)
    balanced, balanced_seen, tb = train(True)
    assert tb.num_updates == 3 and {r["multiplier"] for r in tb.history} == {1.0}
    assert balanced_seen == plain_seen
    for (name, a), (_, b) in zip(plain.named_parameters(), balanced.named_parameters()):
        assert torch.equal(a, b), name


def test_trainer_with_the_identity_callback_equals_the_trainer_without_it(tmp_path):
    """A real Trainer run (AdamW, weight decay, warm-up and cosine schedule) with
    TempBalanceCallback(s1=1, s2=1) and one without it: bitwise-equal losses and weights."""
    def train(out: Path, **kw):
        trainer = make_trainer(out, optim="adamw_torch", save_strategy="no", **kw)
        losses, compute = [], trainer.compute_loss

        def recording(*args, **kwargs):
            out = compute(*args, **kwargs)
            losses.append((out[0] if isinstance(out, tuple) else out).detach().clone())
            return out

        trainer.compute_loss = recording
        trainer.train()
        return trainer, losses

    plain, plain_losses = train(tmp_path / "plain", no_callback=True)
    identity, identity_losses = train(tmp_path / "identity", tb={"s1": 1.0, "s2": 1.0})
    assert len(plain_losses) == STEPS
    assert all(torch.equal(a, b) for a, b in zip(plain_losses, identity_losses))
    grad_norms = [[e["grad_norm"] for e in t.state.log_history if "grad_norm" in e]
                  for t in (plain, identity)]
    assert grad_norms[0] == grad_norms[1] and len(grad_norms[0]) == STEPS
    for (name, a), (_, b) in zip(plain.model.named_parameters(), identity.model.named_parameters()):
        assert torch.equal(a, b), name
    engine = next(c for c in identity.callback_handler.callbacks
                  if isinstance(c, TempBalanceCallback)).engine
    assert engine.num_updates == STEPS // INTERVAL and len(engine.plan.names) == LAYERS
    assert {r["multiplier"] for r in read_history(tmp_path / "identity")} == {1.0}


# ----------------------------------------------------------------------- 2. load_state_dict
def saved_state() -> dict:
    """A state as a checkpoint holds it: after one update (linear map, s = 0.5..1.5), via JSON."""
    tb = TempBalance(make_net(), TempBalanceConfig(min_eigs=10, interval=1))
    tb.update()
    assert sorted(tb.multipliers.values())[0] == 0.5
    return json.loads(json.dumps(tb.state_dict()))


def _set(key, value):
    return lambda state: state.__setitem__(key, value)


def _set_in(key, name, value):
    return lambda state: state[key].__setitem__(name, value)


def _rename(key):
    return lambda state: state[key].__setitem__("renamed", state[key].pop("2"))


CORRUPT = [
    ("missing multipliers", "multipliers", lambda s: s.pop("multipliers")),
    ("missing num_steps", "num_steps", lambda s: s.pop("num_steps")),
    ("missing layers", "layers", lambda s: s.pop("layers")),
    ("NaN multiplier", "multipliers", _set_in("multipliers", "2", math.nan)),
    ("inf multiplier", "multipliers", _set_in("multipliers", "2", math.inf)),
    ("negative multiplier", "multipliers", _set_in("multipliers", "2", -1.0)),
    ("zero multiplier", "multipliers", _set_in("multipliers", "2", 0.0)),
    ("multiplier beyond s2", "multipliers", _set_in("multipliers", "2", 5.0)),
    ("multiplier below s1", "multipliers", _set_in("multipliers", "2", 0.2)),
    ("string multiplier", "multipliers", _set_in("multipliers", "2", "1.2")),
    ("bool multiplier", "multipliers", _set_in("multipliers", "2", True)),
    ("renamed multiplier key", "multipliers", _rename("multipliers")),
    ("missing multiplier key", "multipliers", lambda s: s["multipliers"].pop("2")),
    ("multipliers as a list", "multipliers", _set("multipliers", [1.0, 1.0, 1.0])),
    ("renamed metric key", "metrics", _rename("metrics")),
    ("string metric", "metrics", _set_in("metrics", "2", "high")),
    ("other layers", "layers", _set("layers", ["1", "2", "x"])),
    ("layers as a string", "layers", _set("layers", "123")),
    ("newer version", "version", _set("version", 2)),
    ("no version", "version", lambda s: s.pop("version")),
    ("string step", "num_steps", _set("num_steps", "3")),
    ("negative step", "num_steps", _set("num_steps", -1)),
    ("fractional updates", "num_updates", _set("num_updates", 1.5)),
    ("string flag", "update_requested", _set("update_requested", "no")),
    ("negative scheduled step", "last_scheduled_step", _set("last_scheduled_step", -3)),
    ("zero epoch length", "steps_per_epoch", _set("steps_per_epoch", 0)),
    ("history as a dict", "history", _set("history", {"rows": []})),
    ("history row not an object", "history", lambda s: s["history"].append([1, 2])),
    ("history row without step", "history", lambda s: s["history"][0].pop("step")),
    ("invalid saved config", "config", lambda s: s["config"].update(s1=2.0)),
    ("config as a string", "config", _set("config", "linear")),
]


@pytest.mark.parametrize("field,corrupt", [c[1:] for c in CORRUPT], ids=[c[0] for c in CORRUPT])
def test_a_bad_state_is_refused_whole_and_changes_nothing(field, corrupt):
    good = saved_state()
    model = make_net(seed=5)
    # start_step far ahead: no update during the LR probe, the loaded multipliers apply as they are
    tb = TempBalance(model, TempBalanceConfig(min_eigs=10, interval=1, start_step=10**6))
    with pytest.warns(UserWarning, match="other settings \\(start_step 0 there, 1000000 here\\)"):
        tb.load_state_dict(good)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    tb.attach(optimizer)
    before = tb.state_dict()

    bad = json.loads(json.dumps(good))
    corrupt(bad)
    with pytest.raises(ValueError, match=re.escape(repr(field))) as info:
        tb.load_state_dict(bad)
    assert "resume" in str(info.value)  # and says what to do
    assert tb.state_dict() == before
    for name, lr in used_lrs(model, optimizer).items():
        layer = name.split(".")[0]
        assert lr == pytest.approx(LR * good["multipliers"].get(layer, 1.0), rel=1e-9), name


def test_saved_multipliers_are_checked_against_the_map_that_made_them():
    state = saved_state()  # linear, [0.5, 1.5]
    # resumed with other (s1, s2): the checkpoint's multipliers came from its own map
    tb = TempBalance(make_net(), TempBalanceConfig(s1=0.6, s2=1.4, min_eigs=10, interval=1))
    with pytest.warns(UserWarning, match=r"saved with other settings \(s1 0.5 there, 0.6 here; s2 "
                                         r"1.5 there, 1.4 here\); its multipliers hold until the "
                                         r"next update"):
        tb.load_state_dict(state)
    assert tb.multipliers == state["multipliers"]
    with warnings.catch_warnings():  # the same settings (tuples as JSON lists): no warning
        warnings.simplefilter("error")
        TempBalance(make_net(), TempBalanceConfig(min_eigs=10, interval=1)).load_state_dict(state)
    # 1.0, the neutral multiplier of an all-equal update, may lie outside [s1, s2]
    neutral_cfg = TempBalanceConfig(s1=1.2, s2=1.5, min_eigs=10)
    neutral = TempBalance(make_net(), neutral_cfg).state_dict()
    assert set(neutral["multipliers"].values()) == {1.0}
    TempBalance(make_net(), neutral_cfg).load_state_dict(neutral)
    # sqrt and log2 have no fixed range: finite and positive is all they promise
    wide = json.loads(json.dumps(state))
    wide["multipliers"]["2"] = 3.0
    wide["config"]["assign"] = "sqrt"
    TempBalance(make_net(), TempBalanceConfig(assign="sqrt", min_eigs=10)).load_state_dict(wide)
    wide["config"]["assign"] = "linear"
    with pytest.raises(ValueError, match=r"outside \[s1, s2\] = \[0.5, 1.5\]"):
        TempBalance(make_net(), TempBalanceConfig(min_eigs=10)).load_state_dict(wide)


# ----------------------------------------------------------------------- 3. resume keeps history
def finished_run(out: Path) -> bytes:
    """A whole run (updates at steps 0, 2, 4, 6; checkpoints 4 and 8); its history file's bytes."""
    make_trainer(out).train()
    rows = read_history(out)
    assert [r["step"] for r in rows[::LAYERS]] == [0, 2, 4, 6] and len(rows) == 4 * LAYERS
    return (out / HISTORY_FILE).read_bytes()


def edit_checkpoint(checkpoint: Path, edit) -> None:
    path = checkpoint / "trainer_state.json"
    state = json.loads(path.read_text())
    edit(state["stateful_callbacks"])
    path.write_text(json.dumps(state))


def test_resume_cuts_the_file_back_with_a_warning_and_a_backup(tmp_path):
    out = tmp_path / "run"
    original = finished_run(out)
    expected = history_key(out)
    with pytest.warns(UserWarning, match=rf"{2 * LAYERS} line\(s\) of the history file are not kept "
                                         r"\(the run resumes from the checkpoint at step 4"):
        make_trainer(out).train(resume_from_checkpoint=str(out / "checkpoint-4"))
    assert history_key(out) == expected
    backups = history_backups(out / HISTORY_FILE)
    assert [Path(b).read_bytes() for b in backups] == [original]


@pytest.mark.parametrize("damage", ["engine_state_null", "entry_deleted"])
def test_resume_without_engine_state_keeps_the_history(tmp_path, damage):
    out = tmp_path / "run"
    original = finished_run(out)

    def edit(callbacks):
        if damage == "entry_deleted":
            del callbacks["TempBalanceCallback"]
        else:
            callbacks["TempBalanceCallback"]["attributes"]["engine_state"] = None

    edit_checkpoint(out / "checkpoint-4", edit)
    with pytest.warns(UserWarning) as record:
        make_trainer(out).train(resume_from_checkpoint=str(out / "checkpoint-4"))
    said = messages(record)
    assert any("without TempBalance state" in m and "restart at 1.0" in m for m in said)
    backups = history_backups(out / HISTORY_FILE)
    assert [Path(b).read_bytes() for b in backups] == [original]
    assert any(f"kept as {backups[0]}" in m for m in said)
    # the new history: this run's updates (steps 4 and 6), numbered from 0
    assert [(r["step"], r["update"]) for r in read_history(out)[::LAYERS]] == [(4, 0), (6, 1)]
    # the Trainer saved again at step 8 (it raised KeyError there without the callback's entry)
    saved = json.loads((out / "checkpoint-8" / "trainer_state.json").read_text())
    assert saved["stateful_callbacks"]["TempBalanceCallback"]["attributes"]["engine_state"][
        "num_updates"] == 2


def test_resume_from_a_checkpoint_of_other_multipliers_keeps_a_backup(tmp_path):
    out = tmp_path / "run"
    original = finished_run(out)

    def swap(callbacks):
        multipliers = callbacks["TempBalanceCallback"]["attributes"]["engine_state"]["multipliers"]
        first, *_, last = multipliers
        multipliers[first], multipliers[last] = multipliers[last], multipliers[first]

    edit_checkpoint(out / "checkpoint-4", swap)
    with pytest.warns(UserWarning) as record:
        make_trainer(out).train(resume_from_checkpoint=str(out / "checkpoint-4"))
    assert any("or rows of another run" in m for m in messages(record))
    assert [Path(b).read_bytes() for b in history_backups(out / HISTORY_FILE)] == [original]
    assert [r["step"] for r in read_history(out)[::LAYERS]] == [4, 6]


def test_a_damaged_callback_entry_is_refused_naming_the_fix(tmp_path):
    out = tmp_path / "run"
    original = finished_run(out)
    edit_checkpoint(out / "checkpoint-4", lambda callbacks: callbacks["TempBalanceCallback"][
        "attributes"]["engine_state"]["multipliers"].update({"net.4": float("nan")}))
    with pytest.raises(ValueError, match=r"'multipliers' holds nan .*deleting that entry"):
        make_trainer(out).train(resume_from_checkpoint=str(out / "checkpoint-4"))
    assert (out / HISTORY_FILE).read_bytes() == original and not history_backups(out / HISTORY_FILE)


# ----------------------------------------------------------------------- 4. torn lines
ROWS = [{"step": 0, "update": 0, "layer": f"l{i}", "metric": "alpha_hill", "value": 2.0 + i,
         "multiplier": 0.5 + i / 2, "valid": True} for i in range(3)]


def test_read_history_skips_torn_and_foreign_lines_naming_them(tmp_path):
    path = tmp_path / HISTORY_FILE
    lines = [json.dumps(r) for r in ROWS]
    path.write_text("\n".join([lines[0], "[1, 2]", lines[1], '"a note"', lines[2],
                               '{"step": 2, "upd']))
    with pytest.warns(UserWarning) as record:
        assert read_history(path) == ROWS
    (said,) = messages(record)
    assert said.startswith(f"{path}: skipped 3 line(s)")
    assert "line 2: a JSON array" in said and "line 4: a JSON string" in said
    assert "line 6: not valid JSON" in said
    with pytest.raises(HistoryFormatError, match=rf"{re.escape(str(path))} line 2: a JSON array"):
        read_history(path, strict=True)
    # rows appended after a torn last line start on a line of their own
    append_history(ROWS[:1], path)
    with pytest.warns(UserWarning, match="skipped 3 line"):
        assert read_history(path) == ROWS + ROWS[:1]


def test_resume_prefers_an_intact_history_to_a_damaged_one(tmp_path):
    """Resumed into b from a's checkpoint, where b holds a copy of a's history with a torn row of
    update 1: that file lost a row the checkpoint follows, so a's intact file is used."""
    a, b = tmp_path / "a", tmp_path / "b"
    finished_run(a)
    expected = history_key(a)
    lines = (a / HISTORY_FILE).read_text().splitlines(keepends=True)
    assert json.loads(lines[7])["update"] == 1
    lines[7] = lines[7][:25] + "\n"
    b.mkdir()
    (b / HISTORY_FILE).write_text("".join(lines))
    damaged = (b / HISTORY_FILE).read_bytes()
    with pytest.warns(UserWarning) as record:
        make_trainer(b).train(resume_from_checkpoint=str(a / "checkpoint-4"))
    assert any(m.startswith(f"{b / HISTORY_FILE}: skipped 1 line(s)") and "line 8: not valid JSON" in m
               for m in messages(record))
    assert history_key(b) == expected
    assert [Path(p).read_bytes() for p in history_backups(b / HISTORY_FILE)] == [damaged]


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_kill_9_in_the_middle_of_an_append_then_resume(tmp_path):
    """The training process dies by SIGKILL half-way through writing update 3's rows (after
    checkpoint-4). The resume skips the torn line with a warning, keeps the damaged file as a
    backup, and ends with the uninterrupted run's history and weights, bit for bit."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), str(ROOT / "tests" / "scripts"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "scripts" / "integrity_run.py"), str(out),
         str(torch.get_num_threads()), "--tear-at-update", "3"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    torn = (out / HISTORY_FILE).read_bytes()
    assert not torn.endswith(b"\n") and torn.count(b"\n") > 3 * LAYERS
    assert (out / "checkpoint-4").is_dir() and not (out / "checkpoint-8").exists()

    straight = make_trainer(tmp_path / "straight")
    straight.train()
    resumed = make_trainer(out)
    with pytest.warns(UserWarning) as record:
        resumed.train(resume_from_checkpoint=str(out / "checkpoint-4"))
    torn_line = torn.count(b"\n") + 1
    assert any(m.startswith(f"{out / HISTORY_FILE}: skipped 1 line(s)")
               and f"line {torn_line}: not valid JSON" in m for m in messages(record))
    assert history_key(out) == history_key(tmp_path / "straight")
    assert [Path(p).read_bytes() for p in history_backups(out / HISTORY_FILE)] == [torn]
    for (name, a), (_, b) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), name


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names fsynced files through /proc")
def test_history_reaches_the_disk_before_each_checkpoint(tmp_path, monkeypatch):
    """Durability: the rows a checkpoint follows are fsynced when it is saved (and only then)."""
    out = tmp_path / "run"
    history = out / HISTORY_FILE
    synced, fsync = [], os.fsync

    def spy(fd):
        if os.readlink(f"/proc/self/fd/{fd}") == str(history):
            synced.append(len(read_history(history)))
        return fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    make_trainer(out).train()
    # checkpoint-4 follows the updates at steps 0 and 2, checkpoint-8 those at 0, 2, 4, 6
    assert synced == [2 * LAYERS, 4 * LAYERS]


# ----------------------------------------------------------------------- 5. the CLI
BAD_LINES = [
    ("array", b"[1, 2]", r"line 4: a JSON array, not an object"),
    ("string", b'"a note"', r"line 4: a JSON string, not an object"),
    ("null", b"null", r"line 4: a JSON null, not an object"),
    ("torn", b'{"step": 3, "upd', r"line 4: not valid JSON"),
    ("missing keys", b'{"step": 0, "update": 1}', r"line 4: no 'layer', 'multiplier' key"),
    ("text step", b'{"step": "x", "update": 1, "layer": "l0", "multiplier": 1.0}',
     r"line 4: 'step' is 'x'"),
    ("text multiplier", b'{"step": 0, "update": 1, "layer": "l0", "multiplier": "abc"}',
     r"line 4: 'multiplier' is 'abc'"),
    ("list layer", b'{"step": 0, "update": 1, "layer": [1], "multiplier": 1.0}',
     r"line 4: 'layer' is \[1\]"),
    ("text epoch", b'{"step": 0, "update": 1, "layer": "l0", "multiplier": 1.0, "epoch": "e"}',
     r"line 4: 'epoch' is 'e'"),
    ("list metric", b'{"step": 0, "update": 1, "layer": "l0", "multiplier": 1.0, "metric": [1]}',
     r"line 4: 'metric' is \[1\]"),
    ("binary", b"\xff\xfe\x00", r"line 4: not UTF-8 text"),
]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("line,message", [c[1:] for c in BAD_LINES], ids=[c[0] for c in BAD_LINES])
def test_plot_of_a_malformed_history_exits_2_naming_file_and_line(tmp_path, capsys, line, message):
    run = tmp_path / "run"
    run.mkdir()
    (run / HISTORY_FILE).write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in ROWS)
                                     + line + b"\n")
    assert main(["plot", str(run), "--out", str(tmp_path / "out")]) == 2
    err = one_error_line(capsys)
    assert f"{run / HISTORY_FILE} " in err and re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_plot_of_a_history_that_is_a_directory_exits_2(tmp_path, capsys):
    (tmp_path / "run" / HISTORY_FILE).mkdir(parents=True)
    assert main(["plot", str(tmp_path / "run")]) == 2
    assert str(tmp_path / "run" / HISTORY_FILE) in one_error_line(capsys)


BAD_CSVS = [
    ("short line", "name,alpha,num_eigs\nl0,2.0,5\nl1,3.0\n", r"line 3: 3 columns expected"),
    ("long line", "name,alpha\nl0,2.0,9\n", r"line 2: 2 columns expected"),
    ("text number", "name,alpha\nl0,abc\n", r"line 2: column 'alpha' is 'abc', not a number"),
    ("binary", b"\xff\xfe\x00\x01", r"line 1: not a CSV table"),
    ("other table", "a,b\n1,2\n", r"missing columns \['alpha', 'name'\]"),
]


@pytest.mark.parametrize("text,message", [c[1:] for c in BAD_CSVS], ids=[c[0] for c in BAD_CSVS])
def test_plot_with_a_malformed_baseline_csv_exits_2_naming_file_and_line(tmp_path, capsys, text,
                                                                        message):
    run = tmp_path / "run"
    run.mkdir()
    append_history(ROWS, run / HISTORY_FILE)
    csv = tmp_path / "baseline.csv"
    csv.write_bytes(text if isinstance(text, bytes) else text.encode())
    assert main(["plot", str(run), "--baseline-alphas", str(csv), "--out", str(tmp_path / "out")]) == 2
    err = one_error_line(capsys)
    assert str(csv) in err and re.search(message, err), err


def _model_dir(config: str):
    def make(path: Path) -> Path:
        (path / "model").mkdir()
        (path / "model" / "config.json").write_text(config)
        return path / "model"
    return make


def _weights(name: str, content):
    def make(path: Path) -> Path:
        if isinstance(content, bytes):
            (path / name).write_bytes(content)
        else:
            torch.save(content, path / name)
        return path / name
    return make


BAD_MODELS = [
    ("config.json a list", _model_dir("[1]"), r"config.json holds a JSON list"),
    ("config.json a number", _model_dir("5"), r"config.json holds a JSON int"),
    ("torn config.json", _model_dir('{"model_type": "gp'), r"could not read .*config.json"),
    ("truncated safetensors", _weights("w.safetensors", b"\x10\x00\x00"), r"could not read safetensors"),
    ("empty .pt", _weights("w.pt", b""), r"could not read .*w.pt"),
    ("list .pt", _weights("w.pt", [1, 2]), r"w.pt holds no state dict"),
    ("meta tensors", _weights("w.pt", {"fc.weight": torch.empty(64, 64, device="meta")}),
     r"tensor 'fc.weight' holds no data"),
]


@pytest.mark.parametrize("make,message", [c[1:] for c in BAD_MODELS], ids=[c[0] for c in BAD_MODELS])
def test_analyze_of_a_malformed_model_exits_2_naming_the_file(tmp_path, capsys, make, message):
    path = make(tmp_path)
    assert main(["analyze", str(path), "--arch", "tensors", "--device", "cpu", "--no-progress"]) == 2
    err = one_error_line(capsys)
    assert str(path) in err and re.search(message, err), err


def test_analyze_into_an_unwritable_csv_exits_2(tmp_path, capsys):
    weights = _weights("w.pt", {"fc.weight": torch.randn(64, 64)})(tmp_path)
    assert main(["analyze", str(weights), "--arch", "tensors", "--device", "cpu", "--no-progress",
                 "--csv", str(tmp_path)]) == 2
    assert str(tmp_path) in capsys.readouterr().err.splitlines()[-1]


# ----------------------------------------------------------------------- idle: no side effects
def listing(path: Path) -> list[str]:
    return sorted(os.listdir(path)) if path.exists() else []


@pytest.mark.parametrize("tb", [{"include": ("no_such_layer",)}, {"start_step": 100},
                                {"balance_lr": False}],
                         ids=["nothing balanced", "no update yet", "balance_lr off"])
def test_an_idle_callback_leaves_no_file_and_no_log_key(tmp_path, tb):
    make_trainer(tmp_path / "plain", no_callback=True, save_strategy="no").train()
    trainer = make_trainer(tmp_path / "tb", tb=tb, save_strategy="no")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no layer to balance", "updates only 0 times"
        trainer.train()
    assert listing(tmp_path / "tb") == listing(tmp_path / "plain")
    assert HISTORY_FILE not in listing(tmp_path / "tb")
    logged = {k for entry in trainer.state.log_history for k in entry}
    assert "loss" in logged and not any(k.startswith("tempbalance/") for k in logged)


def test_idle_accelerate_wrapper_writes_and_logs_nothing(tmp_path, fresh_accelerate):
    pytest.importorskip("accelerate")
    from accelerate import Accelerator

    from hf_tempbalance.integrations.accelerate import AcceleratedTempBalance

    accelerator = Accelerator(cpu=True)
    model = make_net()
    with pytest.warns(UserWarning, match="no layer to balance"):
        tb = TempBalance(model, TempBalanceConfig(include=("no_such_layer",), interval=1))
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    model, optimizer = accelerator.prepare(model, optimizer)
    wrapper = AcceleratedTempBalance(tb, accelerator, output_dir=str(tmp_path / "run"))
    wrapper.attach(optimizer)
    for _ in range(3):
        model(torch.randn(4, 16, dtype=torch.float64)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        assert wrapper.log() == {}
    assert tb.num_updates == 3 and not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides", [{"include": ("no_such_layer",)},
                                       {"balance_lr": False, "snr_strength": 0.01, "min_eigs": 10}],
                         ids=["nothing balanced", "balance_lr off"])
def test_idle_ultralytics_hook_writes_and_logs_nothing(tmp_path, overrides):
    pytest.importorskip("ultralytics")
    from hf_tempbalance.integrations.ultralytics import TempBalanceHook

    trainer = SimpleNamespace(model=make_net(), save_dir=tmp_path / "run", epoch=0,
                              args=SimpleNamespace(resume=False), lr={"lr/pg0": LR})
    optimizer = torch.optim.SGD(trainer.model.parameters(), lr=LR)
    hook = TempBalanceHook(**overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no layer to balance"
        hook.attach(trainer, optimizer, "SGD")
    for epoch in range(2):
        trainer.epoch = epoch
        hook.on_train_epoch_start(trainer)
        trainer.model(torch.randn(4, 16, dtype=torch.float64)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        hook.on_train_epoch_end(trainer)
    assert trainer.lr == {"lr/pg0": LR} and not (tmp_path / "run").exists()


def test_history_backups_are_bounded(tmp_path):
    """A file rewritten again and again (a run resumed many times) keeps the newest KEEP_BACKUPS
    backups, each holding the file as it was before its rewrite."""
    from hf_tempbalance.history import KEEP_BACKUPS, rewrite_history

    path = tmp_path / HISTORY_FILE
    contents = []
    for k in range(KEEP_BACKUPS + 3):
        rows = [{"step": k, "update": k, "layer": "a", "metric": "alpha_hill", "value": 2.0 + k,
                 "multiplier": 1.0, "valid": True}]
        before = path.read_bytes() if path.exists() else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rewrite_history(rows, path, reason="test")
        if before is not None:
            contents.append(before)
    backups = history_backups(path)
    assert len(backups) == KEEP_BACKUPS == 5
    assert [Path(b).name for b in backups] == [f"{HISTORY_FILE}.{k}.bak" for k in range(7, 2, -1)]
    assert [Path(b).read_bytes() for b in backups] == contents[::-1][:KEEP_BACKUPS]

