"""The TempBalance engine: multipliers, the LR each group really steps with, schedule, degenerate
layers, resume. Expected multipliers come from float64 SVD spectra and the NumPy Hill formula."""

from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch
from expected import numpy_hill
from torch import nn

from hf_tempbalance import TempBalance, TempBalanceConfig
from hf_tempbalance.spectral import esd_reference

BALANCED = ["2", "5", "7", "9"]
BASE_LR = 0.1


def make_model() -> nn.Sequential:
    """Four balanced Linears (2, 5, 7, 9) with clearly different spectra; 0 and 11 excluded."""
    model = nn.Sequential(
        nn.Linear(16, 64), nn.ReLU(),
        nn.Linear(64, 64), nn.LayerNorm(64), nn.ReLU(),
        nn.Linear(64, 96), nn.ReLU(),
        nn.Linear(96, 64), nn.ReLU(),
        nn.Linear(64, 64), nn.ReLU(),
        nn.Linear(64, 4),
    )
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, dof in zip(BALANCED, (None, 5.0, 2.5, 1.5)):
            w = getattr(model, name).weight
            if dof is None:
                w.copy_(torch.randn(w.shape, generator=gen) * 0.1)
            else:
                t = torch.distributions.StudentT(torch.tensor(dof)).sample(w.shape)
                w.copy_(t.clamp(-50, 50) * 0.05)
    return model


def paper_map(alphas: list[float], assign: str, s1: float, s2: float) -> list[float]:
    """The paper's maps (Eq. 2 and App. C) written out here, one layer at a time."""
    n, lo, hi = len(alphas), min(alphas), max(alphas)
    if assign == "linear":
        return [s1 + (s2 - s1) * (a - lo) / (hi - lo) for a in alphas]
    if assign in ("sqrt", "log2"):
        f = [math.sqrt(a) if assign == "sqrt" else math.log(a) for a in alphas]
        return [v * n / sum(f) for v in f]
    assert assign == "step" and len(set(alphas)) == n  # distinct: the rank is unambiguous
    return [s1 + sorted(alphas).index(a) * (s2 - s1) / n for a in alphas]


def independent_multipliers(model: nn.Module, names, s1=0.5, s2=1.5, assign="linear"):
    """Alphas from float64 per-slice SVD + the NumPy formula, mapped with the paper's maps."""
    alphas = {n: numpy_hill(esd_reference(model.get_submodule(n)).numpy()) for n in names}
    valid = [n for n in names if math.isfinite(alphas[n])]
    mults = paper_map([alphas[n] for n in valid], assign, s1, s2)
    return alphas, dict(zip(valid, mults))


def batch(seed: int):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(32, 16, generator=gen), torch.randint(0, 4, (32,), generator=gen)


def train_step(model, optimizer, seed: int) -> None:
    x, y = batch(seed)
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()


# ----------------------------------------------------------------------------- update()
def test_update_matches_independent_alphas_and_maps_to_range():
    model = make_model()
    tb = TempBalance(model, dtype="float64")
    assert tb.plan.names == BALANCED
    assert tb.multipliers == {n: 1.0 for n in BALANCED}  # before the first update
    rows = tb.update()
    alphas, expected = independent_multipliers(model, BALANCED)
    assert [r["layer"] for r in rows] == BALANCED
    for row in rows:
        assert row["valid"] and row["metric"] == "alpha_hill" and row["update"] == 0
        assert row["value"] == pytest.approx(alphas[row["layer"]], rel=1e-9)
        assert row["multiplier"] == pytest.approx(expected[row["layer"]], rel=1e-9)
    assert tb.multipliers == pytest.approx(expected, rel=1e-9)
    assert min(tb.multipliers.values()) == pytest.approx(0.5)
    assert max(tb.multipliers.values()) == pytest.approx(1.5)
    assert tb.history == rows
    summary = tb.summary()
    assert summary["multiplier_min"] == pytest.approx(0.5)
    assert summary["alpha_hill_max"] == pytest.approx(max(alphas.values()))

    # The default float32 path gives the same multipliers to float32 accuracy.
    tb32 = TempBalance(model)
    tb32.update()
    assert tb32.multipliers == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("assign", ["sqrt", "log2", "step"])
def test_update_with_other_assign_functions(assign):
    model = make_model()
    tb = TempBalance(model, dtype="float64", assign=assign, s1=0.6, s2=1.4)
    tb.update()
    _, expected = independent_multipliers(model, BALANCED, 0.6, 1.4, assign)
    assert tb.multipliers == pytest.approx(expected, rel=1e-9)


def test_scaling_every_weight_changes_nothing():
    model = make_model()
    tb = TempBalance(model)
    tb.update()
    scaled = copy.deepcopy(model)
    with torch.no_grad():
        for p in scaled.parameters():
            p.mul_(123.0)
    tb_scaled = TempBalance(scaled)
    tb_scaled.update()
    assert tb_scaled.multipliers == pytest.approx(tb.multipliers, rel=1e-5)


# ----------------------------------------------------------------------------- attach + step
class Spy:
    """Step pre-hook registered AFTER attach: sees the LRs the optimizer is about to use."""

    def __init__(self, model: nn.Module, optimizer, tb: TempBalance):
        self.model, self.tb = model, tb
        self.name_of = {id(p): n for n, p in model.named_parameters()}
        self.lrs: list[dict[str, float]] = []  # per step: param name -> lr used
        self.mults: list[dict[str, float]] = []
        self.before: dict[str, torch.Tensor] = {}
        optimizer.register_step_pre_hook(self)

    def __call__(self, optimizer, args, kwargs):
        self.lrs.append({self.name_of[id(p)]: g["lr"] for g in optimizer.param_groups
                         for p in g["params"]})
        self.mults.append(dict(self.tb.multipliers))
        self.before = {n: (p.detach().clone(), p.grad.detach().clone())
                       for n, p in self.model.named_parameters()}


@pytest.mark.parametrize("groups", ["labelled", "owner"])
def test_step_uses_scheduler_lr_times_multiplier(groups):
    """LambdaLR; groups from tb.param_groups, or the owner's own two groups with two schedules."""
    model = make_model()
    tb = TempBalance(model, interval=3)
    owner = tb.plan.owner_of()
    if groups == "labelled":
        optimizer = torch.optim.SGD(tb.param_groups(lr=BASE_LR))
        lambdas = [lambda t: 0.9**t] * len(optimizer.param_groups)
        base_of = dict.fromkeys(dict(model.named_parameters()), BASE_LR)
        lambda_of = dict.fromkeys(base_of, 0)
    else:  # matrices in one group, vectors (bias/norm) in another, each with its own schedule
        mats = [p for p in model.parameters() if p.ndim > 1]
        vecs = [p for p in model.parameters() if p.ndim == 1]
        optimizer = torch.optim.SGD([{"params": mats}, {"params": vecs, "lr": 0.03}], lr=BASE_LR)
        lambdas = [lambda t: 0.9**t, lambda t: 1.0 / (1 + t)]
        base_of = {n: BASE_LR if p.ndim > 1 else 0.03 for n, p in model.named_parameters()}
        lambda_of = {n: 0 if p.ndim > 1 else 1 for n, p in model.named_parameters()}
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
    n_groups = len(optimizer.param_groups)
    tb.attach(optimizer)
    spy = Spy(model, optimizer, tb)

    for t in range(8):
        x, y = batch(t)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if t % 3 == 0:  # an update is due: it sees the weights as they are now
            _, expected_mults = independent_multipliers(model, BALANCED)
        optimizer.step()
        assert tb.multipliers == pytest.approx(expected_mults, abs=1e-4)
        assert spy.mults[t] == tb.multipliers
        for name, lr in spy.lrs[t].items():
            sched_lr = base_of[name] * lambdas[lambda_of[name]](t)
            expected = sched_lr * tb.multipliers.get(owner.get(name), 1.0)
            assert lr == pytest.approx(expected, rel=1e-12), (t, name)
            # ... and that LR is really the one SGD used: w_new = w - lr * grad
            before, grad = spy.before[name]
            torch.testing.assert_close(dict(model.named_parameters())[name].detach(),
                                       before - lr * grad, rtol=1e-6, atol=1e-7)
        # After the step the owner's groups are back, at the scheduler's LR: nothing compounds.
        assert len(optimizer.param_groups) == n_groups
        for i, group in enumerate(optimizer.param_groups):
            first = next(n for n, p in model.named_parameters() if p is group["params"][0])
            assert group["lr"] == pytest.approx(base_of[first] * lambdas[i if groups == "owner" else 0](t),
                                                rel=1e-12)
        scheduler.step()

    assert sorted({r["step"] for r in tb.history}) == [0, 3, 6]
    assert len(optimizer.state_dict()["param_groups"]) == n_groups
    multiplied = [m for m in tb.multipliers.values() if m != 1.0]
    assert len(multiplied) >= 3  # the check above was not vacuous


@pytest.mark.parametrize("groups", ["labelled", "owner"])
def test_a_step_that_raises_does_not_leave_lrs_scaled_for_the_next(groups):
    # The post-hook does not run when step() raises (here: its closure), so the next step must
    # start from the owner's groups, not from the scaled / split ones.
    model = make_model()
    tb = TempBalance(model, interval=100)
    params = tb.param_groups(lr=BASE_LR) if groups == "labelled" else model.parameters()
    optimizer = torch.optim.SGD(params, lr=BASE_LR)
    n_groups = len(optimizer.param_groups)
    tb.attach(optimizer)
    spy = Spy(model, optimizer, tb)
    train_step(model, optimizer, 0)

    def failing_closure():
        raise RuntimeError("loss went away")

    with pytest.raises(RuntimeError, match="loss went away"):
        optimizer.step(failing_closure)
    train_step(model, optimizer, 1)
    owner = tb.plan.owner_of()
    expected = {n: BASE_LR * tb.multipliers.get(owner.get(n), 1.0) for n in spy.lrs[0]}
    assert spy.lrs[-1] == pytest.approx(expected, rel=1e-12)  # lr x m, not lr x m x m
    assert len(optimizer.param_groups) == n_groups
    assert {g["lr"] for g in optimizer.param_groups} == {BASE_LR}
    assert max(tb.multipliers.values()) == 1.5  # the check above was not vacuous


def test_a_second_optimizer_is_refused_until_detach():
    model = make_model()
    tb = TempBalance(model, interval=1)
    first = torch.optim.SGD(model[:6].parameters(), lr=BASE_LR)
    second = torch.optim.SGD(model[6:].parameters(), lr=BASE_LR)
    tb.attach(first)
    tb.attach(first)  # again on the same one: fine, one set of hooks
    with pytest.raises(ValueError, match="already attached to a SGD.*detach"):
        tb.attach(second)
    spy = Spy(model, first, tb)
    train_step(model, first, 0)
    assert spy.lrs[0]["2.weight"] == pytest.approx(BASE_LR * tb.multipliers["2"])
    assert tb.num_steps == 1  # hooks registered once, not twice
    tb.detach()
    tb.attach(second)
    train_step(model, second, 1)
    assert tb.num_steps == 2


def test_a_second_engine_on_the_same_optimizer_replaces_the_first():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=BASE_LR)
    first = TempBalance(model, interval=1).attach(optimizer)
    second = TempBalance(model, interval=1)
    with pytest.warns(UserWarning, match="another TempBalance was attached to this optimizer"):
        second.attach(optimizer)
    spy = Spy(model, optimizer, second)
    train_step(model, optimizer, 0)
    assert first.num_steps == 0 and second.num_steps == 1
    assert spy.lrs[0]["2.weight"] == pytest.approx(BASE_LR * second.multipliers["2"])  # not x m twice


class FailingSGD(torch.optim.SGD):
    """Raises inside step() (after the pre-hooks, like an OOM while allocating its state)."""

    fail = False

    def step(self, closure=None):
        if self.fail:
            raise RuntimeError("out of memory")
        return super().step(closure)


@pytest.mark.parametrize("groups", ["labelled", "owner"])
def test_detach_after_a_step_that_raised_inside_restores_the_groups(groups):
    model = make_model()
    tb = TempBalance(model, interval=100)
    optimizer = FailingSGD(tb.param_groups(lr=BASE_LR) if groups == "labelled" else model.parameters(),
                           lr=BASE_LR)
    n_groups = len(optimizer.param_groups)
    tb.attach(optimizer)
    train_step(model, optimizer, 0)
    optimizer.fail = True
    with pytest.raises(RuntimeError, match="out of memory"):
        train_step(model, optimizer, 1)
    # restored at once, before anything (a checkpoint, a new scheduler) reads the groups
    assert len(optimizer.param_groups) == n_groups
    assert {g["lr"] for g in optimizer.param_groups} == {BASE_LR}
    tb.detach()  # e.g. the Trainer callback replacing its engine on the next train()
    assert len(optimizer.state_dict()["param_groups"]) == n_groups
    optimizer.fail = False
    train_step(model, optimizer, 2)  # the guard stays as a pass-through
    assert {g["lr"] for g in optimizer.param_groups} == {BASE_LR}


@pytest.mark.parametrize("order", ["scheduler first", "attach first"])
def test_schedulers_made_before_or_after_attach_work_without_warnings(order):
    model = make_model()
    tb = TempBalance(model, interval=2)
    optimizer = torch.optim.SGD(tb.param_groups(lr=BASE_LR))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "optimizer.step() has been overridden"
        if order == "attach first":
            tb.attach(optimizer)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 0.5**t)
        if order == "scheduler first":
            tb.attach(optimizer)
        spy = Spy(model, optimizer, tb)
        for t in range(3):
            train_step(model, optimizer, t)
            scheduler.step()
    owner = tb.plan.owner_of()
    for t, lrs in enumerate(spy.lrs):
        m = spy.mults[t]
        assert lrs == pytest.approx({n: BASE_LR * 0.5**t * m.get(owner.get(n), 1.0) for n in lrs})


def test_a_scheduler_step_after_a_failed_step_is_kept():
    model = make_model()
    tb = TempBalance(model, interval=100)
    optimizer = FailingSGD(tb.param_groups(lr=BASE_LR), lr=BASE_LR)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 0.5**t)
    tb.attach(optimizer)
    spy = Spy(model, optimizer, tb)
    train_step(model, optimizer, 0)
    scheduler.step()
    optimizer.fail = True
    with pytest.raises(RuntimeError):
        train_step(model, optimizer, 1)
    scheduler.step()  # the loop goes on: LR 0.25 from here
    optimizer.fail = False
    train_step(model, optimizer, 2)
    owner = tb.plan.owner_of()
    expected = {n: BASE_LR * 0.25 * tb.multipliers.get(owner.get(n), 1.0) for n in spy.lrs[0]}
    assert spy.lrs[-1] == pytest.approx(expected, rel=1e-12)


def test_update_due_for_a_later_step_is_the_plain_schedule():
    tb = TempBalance(make_model(), interval=2, start_step=1)
    assert [tb.update_due(s) for s in range(7)] == [False, True, False, True, False, True, False]


class CountingSGD(torch.optim.SGD):
    """Keeps a per-group step count as timm's Lamb does (a tensor, updated in place), and one as
    a plain int (rebound each step)."""

    def step(self, closure=None):
        for group in self.param_groups:
            group.setdefault("tensor_steps", torch.zeros(()))
            group["tensor_steps"].add_(1)
            group["int_steps"] = group.get("int_steps", 0) + 1
        return super().step(closure)


def test_group_level_state_advances_once_per_step_when_groups_are_split():
    model = make_model()
    tb = TempBalance(model, interval=1)
    optimizer = CountingSGD(model.parameters(), lr=BASE_LR)  # one group, split into 5 per step
    optimizer.step()  # creates the counters before the engine sees the group
    tb.attach(optimizer)
    for t in range(4):
        train_step(model, optimizer, t)
    (group,) = optimizer.param_groups
    assert group["int_steps"] == 5 and float(group["tensor_steps"]) == 5.0


def test_reloading_the_optimizer_state_keeps_each_groups_own_params():
    # load_state_dict() makes new group dicts, which may reuse the ids of the freed ones: the
    # split of a group must come from its own params, whatever its id.
    model = make_model()
    tb = TempBalance(model, interval=100)
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    assert len(weights) == len(biases)  # same length: only identity tells the groups apart
    optimizer = torch.optim.SGD([{"params": weights}, {"params": biases, "lr": 0.0}], lr=BASE_LR)
    tb.attach(optimizer)
    train_step(model, optimizer, 0)
    state = optimizer.state_dict()
    for t in range(12):
        optimizer.load_state_dict(state)
        before = [b.detach().clone() for b in biases]
        train_step(model, optimizer, t)
        assert all(torch.equal(b, old) for b, old in zip(biases, before)), t  # lr 0: never move
    # Deterministically: the same group dicts, their params lists swapped.
    first, second = optimizer.param_groups
    first["params"], second["params"] = second["params"], first["params"]  # now biases at BASE_LR
    before = [w.detach().clone() for w in weights]
    train_step(model, optimizer, 20)
    assert all(torch.equal(w, old) for w, old in zip(weights, before))


def test_reduce_lr_on_plateau_is_not_compounded():
    model = make_model()
    tb = TempBalance(model, interval=1)
    optimizer = torch.optim.SGD(tb.param_groups(lr=BASE_LR), momentum=0.9)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=0)
    tb.attach(optimizer)
    spy = Spy(model, optimizer, tb)
    owner = tb.plan.owner_of()
    reductions = 0
    for t in range(10):
        train_step(model, optimizer, t)
        sched_lr = BASE_LR * 0.5**reductions
        for name, lr in spy.lrs[t].items():
            assert lr == pytest.approx(sched_lr * spy.mults[t].get(owner.get(name), 1.0), rel=1e-12)
        for group in optimizer.param_groups:
            assert group["lr"] == pytest.approx(sched_lr, rel=1e-12)
        scheduler.step(1.0 + t)  # always worse: one reduction per step after the first
        reductions += t > 0
    assert optimizer.param_groups[0]["lr"] == pytest.approx(BASE_LR * 0.5**9, rel=1e-12)


# ----------------------------------------------------------------------------- schedule
def run_steps(tb: TempBalance, model: nn.Module, optimizer, steps: int, request_at=()) -> None:
    for t in range(steps):
        if t in request_at:
            tb.request_update()
        train_step(model, optimizer, t)


def update_steps(tb: TempBalance) -> list[int]:
    return sorted({row["step"] for row in tb.history})


def test_interval_and_start_step():
    model = make_model()
    tb = TempBalance(model, interval=4, start_step=2)
    optimizer = torch.optim.SGD(tb.param_groups(lr=BASE_LR))
    tb.attach(optimizer)
    spy = Spy(model, optimizer, tb)
    run_steps(tb, model, optimizer, 13)
    assert update_steps(tb) == [2, 6, 10]
    assert tb.num_steps == 13 and tb.num_updates == 3
    for t in (0, 1):  # before start_step: base LR everywhere
        assert set(spy.lrs[t].values()) == {BASE_LR}
    assert len(set(spy.lrs[2].values())) > 1
    assert not tb.update_due(13) and tb.update_due(14)  # the window of step 14 has no update yet


def test_an_update_whose_step_was_skipped_happens_at_the_next_step():
    # Under the Trainer the clock is global_step, which also advances when the fp16 GradScaler
    # skips optimizer.step(): the update of that window must not be lost until the next one.
    model = make_model()
    clock = {"global_step": 0}
    tb = TempBalance(model, interval=4, start_step=2, clock=lambda: clock["global_step"])
    optimizer = torch.optim.SGD(tb.param_groups(lr=BASE_LR))
    tb.attach(optimizer)
    for global_step in range(13):
        clock["global_step"] = global_step  # what the Trainer's loop does to state.global_step
        if global_step in (2, 6):  # these two never reach the optimizer
            continue
        train_step(model, optimizer, global_step)
    assert update_steps(tb) == [3, 7, 10]


@pytest.mark.parametrize("saved_key", [True, False])
def test_resumed_schedule_continues_the_windows(saved_key):
    model = make_model()
    tb = TempBalance(model, interval=4)
    optimizer = torch.optim.SGD(tb.param_groups(lr=BASE_LR))
    tb.attach(optimizer)
    run_steps(tb, model, optimizer, 6)  # updates at 0 and 4
    state = json.loads(json.dumps(tb.state_dict()))
    if not saved_key:  # a state saved before the key existed
        del state["last_scheduled_step"]
    resumed = TempBalance(model, interval=4)
    resumed.load_state_dict(state)
    assert [resumed.update_due(s) for s in (6, 7, 8)] == [False, False, True]


def test_resume_keeps_the_epoch_length_of_this_run():
    saved = TempBalance(make_model(), steps_per_epoch=10).state_dict()
    resumed = TempBalance(make_model(), steps_per_epoch=5)  # e.g. twice the batch size now
    resumed.load_state_dict(saved)
    assert resumed.steps_per_epoch == 5
    unknown = TempBalance(make_model())  # nothing known here: the saved length
    unknown.load_state_dict(saved)
    assert unknown.steps_per_epoch == 10


def test_epoch_interval_and_request_update():
    model = make_model()
    tb = TempBalance(model)  # interval="epoch", no steps_per_epoch: only on request
    optimizer = torch.optim.SGD(tb.param_groups(lr=BASE_LR))
    tb.attach(optimizer)
    with pytest.warns(UserWarning, match="without steps_per_epoch"):  # nothing due at step 0
        run_steps(tb, model, optimizer, 9, request_at=(5,))
    assert update_steps(tb) == [5]

    tb_epochs = TempBalance(make_model(), steps_per_epoch=4)
    optimizer = torch.optim.SGD(tb_epochs.param_groups(lr=BASE_LR))
    tb_epochs.attach(optimizer)
    run_steps(tb_epochs, tb_epochs.model, optimizer, 10)
    assert update_steps(tb_epochs) == [0, 4, 8]

    # A request adds one update without shifting the regular ones.
    tb_int = TempBalance(make_model(), interval=5)
    optimizer = torch.optim.SGD(tb_int.param_groups(lr=BASE_LR))
    tb_int.attach(optimizer)
    run_steps(tb_int, tb_int.model, optimizer, 11, request_at=(3,))
    assert update_steps(tb_int) == [0, 3, 5, 10]


# ----------------------------------------------------------------------------- degenerate layers
def layer_warnings(record, name: str) -> int:
    return sum(f"layer {name!r}" in str(w.message) for w in record)


def test_nan_layer_keeps_its_multiplier_and_does_not_poison_others():
    model = make_model()
    tb = TempBalance(model, dtype="float64")
    tb.update()
    before = dict(tb.multipliers)
    with torch.no_grad():
        model.get_submodule("7").weight[0, 0] = float("nan")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        rows = tb.update()
        tb.update()  # warned once per layer, not once per update
    assert layer_warnings(record, "7") == 1
    assert sum("TempBalance" in str(w.message) for w in record) == 1
    assert tb.multipliers["7"] == before["7"]
    bad = next(r for r in rows if r["layer"] == "7")
    assert not bad["valid"] and math.isnan(bad["value"])

    # The others are mapped exactly as if the broken layer were not there.
    without = TempBalance(model, dtype="float64", exclude=(r"^7$",))
    without.update()
    for name in ("2", "5", "9"):
        assert tb.multipliers[name] == pytest.approx(without.multipliers[name], rel=1e-12)
    others = sorted(tb.multipliers[n] for n in ("2", "5", "9"))
    assert (others[0], others[-1]) == pytest.approx((0.5, 1.5))


@pytest.mark.parametrize("kind", ["zero", "rank1", "inf"])
def test_dead_or_rank1_layer_stays_at_one(kind):
    model = make_model()
    with torch.no_grad():
        w = model.get_submodule("5").weight
        if kind == "zero":
            w.zero_()
        elif kind == "rank1":
            w.copy_(torch.outer(torch.randn(w.shape[0]), torch.randn(w.shape[1])))
        else:
            w[3, 3] = float("inf")
    tb = TempBalance(model, dtype="float64")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        tb.update()
    assert layer_warnings(record, "5") == 1
    assert tb.multipliers["5"] == 1.0
    _, expected = independent_multipliers(model, ["2", "7", "9"])
    for name in ("2", "7", "9"):
        assert tb.multipliers[name] == pytest.approx(expected[name], rel=1e-9)

    if kind != "inf":  # training with a dead layer runs (inf weights would make the loss nan)
        optimizer = torch.optim.SGD(tb.param_groups(lr=BASE_LR))
        tb.attach(optimizer)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run_steps(tb, model, optimizer, 2)
        assert tb.num_steps == 2


def test_layers_that_turn_invalid_together_share_one_warning():
    # Like a LoRA model's lora_B matrices, all zero at the first update.
    model = make_model()
    tb = TempBalance(model, dtype="float64")
    with torch.no_grad():
        for name in ("2", "7"):
            model.get_submodule(name).weight.zero_()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        tb.update()
        tb.update()
    messages = [str(w.message) for w in record if "TempBalance" in str(w.message)]
    assert len(messages) == 1
    assert "2 layer(s)" in messages[0] and layer_warnings(record, "2") == layer_warnings(record, "7") == 1

    before = tb.multipliers["9"]
    assert before in (0.5, 1.5)  # mapped against "5", the other valid layer
    with torch.no_grad():  # a layer that fails later is reported then, on its own
        model.get_submodule("9").weight.zero_()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        tb.update()
    assert [layer_warnings(record, n) for n in ("2", "7", "9")] == [0, 0, 1]
    # "9" keeps its last multiplier; "5", now alone, is neutral.
    assert tb.multipliers == {"2": 1.0, "5": 1.0, "7": 1.0, "9": before}


def test_nothing_to_balance_warns_with_the_commonest_reasons():
    model = nn.Sequential(nn.Linear(8, 16), *(nn.Linear(16, 16) for _ in range(4)), nn.Linear(16, 2))
    model[3].requires_grad_(False)
    with pytest.warns(UserWarning, match="found no layer to balance") as record:
        tb = TempBalance(model)
    message = str(record[0].message)
    assert tb.plan.names == []
    # three layers too small, first and last excluded, one frozen: counted per reason, most first
    assert ("16 eigenvalues < min_eigs=50 (3 layer(s), e.g. '1'); first/last layer "
            "(exclude_first_last=True) (2 layer(s), e.g. '0'); frozen weight (1 layer(s), e.g. '3')"
            in message)
    with pytest.warns(UserWarning, match=r"no layer of layer_types=\('linear', 'conv'\)"):
        TempBalance(nn.Sequential(nn.ReLU()))


@pytest.mark.parametrize("setup", ["nothing", "steps_per_epoch", "request", "interval"])
def test_epoch_interval_with_no_way_to_know_epochs_warns_at_the_first_step(setup):
    model = make_model()
    kwargs = {"steps_per_epoch": 3} if setup == "steps_per_epoch" else {}
    tb = TempBalance(model, interval=2 if setup == "interval" else "epoch", **kwargs)
    optimizer = torch.optim.SGD(tb.param_groups(lr=BASE_LR))
    tb.attach(optimizer)
    if setup == "request":
        tb.request_update()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        run_steps(tb, model, optimizer, 2)
    warned = [w for w in record if "without steps_per_epoch" in str(w.message)]
    assert len(warned) == (setup == "nothing")
    assert tb.num_updates == (0 if setup == "nothing" else 1)


def test_optimizer_without_a_learning_rate_is_refused_at_attach():
    from transformers.optimization import Adafactor

    model = make_model()
    tb = TempBalance(model, interval=1)
    # Adafactor's own schedule (relative_step=True) leaves group["lr"] at None: nothing to scale.
    optimizer = Adafactor(tb.param_groups(), lr=None, relative_step=True, warmup_init=True)
    with pytest.raises(ValueError, match=r"param group 0 of Adafactor has lr=None.*relative_step=False"):
        tb.attach(optimizer)
    with pytest.raises(ValueError, match="LBFGS .* per-layer learning rates are impossible"):
        tb.attach(torch.optim.LBFGS(model.parameters()))
    # With an explicit LR it trains, and the step size is scaled like any other optimizer's.
    optimizer = Adafactor(tb.param_groups(), lr=1e-3, relative_step=False, scale_parameter=False)
    tb.attach(optimizer)
    run_steps(tb, model, optimizer, 2)
    assert tb.num_updates == 2 and min(tb.multipliers.values()) == pytest.approx(0.5)


def test_orthogonal_init_gives_one_everywhere():
    model = make_model()
    for name in BALANCED:
        nn.init.orthogonal_(model.get_submodule(name).weight)
    tb = TempBalance(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = tb.update()
    assert all(not math.isfinite(r["value"]) for r in rows)
    assert tb.multipliers == {n: 1.0 for n in BALANCED}


def test_single_balanced_layer_gets_one():
    model = nn.Sequential(nn.Linear(8, 64), nn.Linear(64, 64), nn.Linear(64, 3))
    tb = TempBalance(model)
    assert tb.plan.names == ["1"]
    rows = tb.update()
    assert rows[0]["valid"] and math.isfinite(rows[0]["value"])
    assert tb.multipliers == {"1": 1.0}


# ----------------------------------------------------------------------------- resume
def test_state_dict_json_round_trip_resumes_identically():
    model = make_model()
    cfg = TempBalanceConfig(interval=2, s1=0.6, s2=1.4)
    tb = TempBalance(model, cfg)
    optimizer = torch.optim.SGD(tb.param_groups(lr=BASE_LR, weight_decay=5e-4), momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 0.95**t)
    tb.attach(optimizer)
    for t in range(5):
        train_step(model, optimizer, t)
        scheduler.step()

    state = json.loads(json.dumps(tb.state_dict()))
    model_b = copy.deepcopy(model)
    tb_b = TempBalance(model_b, cfg)
    tb_b.load_state_dict(state)
    assert tb_b.multipliers == tb.multipliers
    assert tb_b.num_steps == tb.num_steps == 5 and tb_b.num_updates == tb.num_updates == 3
    assert tb_b.history == json.loads(json.dumps(tb.history))
    optimizer_b = torch.optim.SGD(tb_b.param_groups(lr=BASE_LR, weight_decay=5e-4), momentum=0.9)
    scheduler_b = torch.optim.lr_scheduler.LambdaLR(optimizer_b, lambda t: 0.95**t)
    # deepcopy as a checkpoint file would: load_state_dict keeps references to the buffers
    optimizer_b.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    scheduler_b.load_state_dict(copy.deepcopy(scheduler.state_dict()))
    tb_b.attach(optimizer_b)

    spy, spy_b = Spy(model, optimizer, tb), Spy(model_b, optimizer_b, tb_b)
    for t in range(5, 11):
        for m, opt, sch in ((model, optimizer, scheduler), (model_b, optimizer_b, scheduler_b)):
            train_step(m, opt, t)
            sch.step()
    assert spy.lrs == spy_b.lrs and spy.mults == spy_b.mults
    assert update_steps(tb_b) == update_steps(tb) == [0, 2, 4, 6, 8, 10]
    for p, q in zip(model.parameters(), model_b.parameters()):
        assert torch.equal(p, q)


def test_state_dict_without_history_restores_everything_else():
    model = make_model()
    tb = TempBalance(model, TempBalanceConfig(interval=1))
    optimizer = torch.optim.SGD(tb.param_groups(lr=BASE_LR), momentum=0.9)
    tb.attach(optimizer)
    for t in range(3):
        train_step(model, optimizer, t)
    full, slim = tb.state_dict(), tb.state_dict(include_history=False)
    assert len(full["history"]) == 3 * len(tb.plan.names) and "history" not in slim
    assert {k: v for k, v in full.items() if k != "history"} == slim

    tb_b = TempBalance(copy.deepcopy(model), TempBalanceConfig(interval=1))
    tb_b.history = [{"step": -1}]  # kept as it is: the caller restores the history itself
    tb_b.load_state_dict(json.loads(json.dumps(slim)))
    assert tb_b.multipliers == tb.multipliers and tb_b.num_updates == 3 and tb_b.num_steps == 3
    assert tb_b.history == [{"step": -1}]


def test_load_state_dict_for_other_layers_is_refused():
    state = TempBalance(make_model()).state_dict()
    other = TempBalance(make_model(), exclude=(r"^9$",))
    with pytest.raises(ValueError, match="different layers"):
        other.load_state_dict(state)
