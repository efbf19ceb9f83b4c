"""Distributed TempBalance: cost-balanced sharding of the ESD work, identical LRs on every rank.

Unit tests (in process, no process group): the partition, the cost model, the sharding checks,
the collective's device, and that a single process never calls into ``torch.distributed``.

Launched tests (2 CPU processes over gloo; tests/scripts/): a custom Accelerate loop, a Trainer run
with TempBalanceCallback, and a torch FSDP2 loop. Each rank records the LR every param group
really has at every optimizer step (a step pre-hook registered after ``tb.attach``), the layers it
computed and, at each update, the whole weights it saw. Expected values are recomputed here in a
single process from those weights: both ranks' LRs must be bit-identical to each other and equal
to ``scheduler_lr(t) · m_i(t)`` with ``m_i`` from the single-process update.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch import nn

from hf_tempbalance import TempBalance, TempBalanceConfig
from hf_tempbalance import distributed as tbdist
from hf_tempbalance.binding import unwrap_optimizer
from hf_tempbalance.distributed import (
    check_unsharded,
    collective_device,
    layer_cost,
    partition_by_cost,
    sharded_metrics,
)
from hf_tempbalance.history import read_history

SCRIPTS = Path(__file__).parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
from launching import free_port, run_launcher  # noqa: E402
from tb_record import BASE_LR, INTERVAL, TinyClassifier  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


# ---------------------------------------------------------------------------------- partition
def makespan(costs, bins) -> float:
    return max(sum(costs[i] for i in b) for b in bins)


def optimal_makespan(costs, parts) -> float:
    """Brute force over every assignment of items to bins."""
    best = math.inf
    for assign in itertools.product(range(parts), repeat=len(costs)):
        loads = [0.0] * parts
        for i, b in enumerate(assign):
            loads[b] += costs[i]
        best = min(best, max(loads))
    return best


def test_partition_balances_cost_not_count():
    # One layer costs as much as the ten others together: it gets a rank to itself.
    costs = [10.0] + [1.0] * 10
    bins = partition_by_cost(costs, 2)
    assert sorted(map(len, bins)) == [1, 10]
    assert [0] in bins
    assert makespan(costs, bins) == 10.0


@pytest.mark.parametrize("parts", [2, 3])
def test_partition_is_complete_and_within_graham_bound(parts):
    rng = random.Random(7)
    for _ in range(20):
        costs = [rng.choice([1, 2, 3, 5, 8, 13, 40]) * rng.random() for _ in range(8)]
        bins = partition_by_cost(costs, parts)
        assert len(bins) == parts
        assert sorted(i for b in bins for i in b) == list(range(len(costs)))
        assert makespan(costs, bins) <= (4 / 3 - 1 / (3 * parts)) * optimal_makespan(costs, parts) + 1e-9


def test_partition_is_deterministic_with_ties():
    costs = [1.0] * 6
    # Most expensive first, ties by index; the least-loaded bin wins, ties by bin number.
    assert partition_by_cost(costs, 2) == [[0, 2, 4], [1, 3, 5]]
    assert partition_by_cost(costs, 2) == partition_by_cost(list(costs), 2)
    assert partition_by_cost([3.0, 1.0], 4) == [[0], [1], [], []]
    assert partition_by_cost([], 2) == [[], []]
    with pytest.raises(ValueError, match="parts must be >= 1"):
        partition_by_cost([1.0], 0)


def test_layer_cost_counts_gram_and_eigensolver_flops_from_the_declared_shape():
    lin = nn.Linear(96, 80)  # weight 80 x 96: d = 80, r = 96
    assert layer_cost(lin) == 2 * 96 * 80**2 + 4 / 3 * 80**3
    conv = nn.Conv2d(16, 32, 3)  # 9 slices of 32 x 16
    assert layer_cost(conv) == 9 * (2 * 32 * 16**2 + 4 / 3 * 16**3)
    # A local shard of the weight does not change the cost (every rank must agree on it).
    whole = layer_cost(lin)
    lin.weight.data = lin.weight.data.flatten()[:1000]
    assert layer_cost(lin) == whole


# ---------------------------------------------------------------------------------- sharding checks
def test_check_unsharded_accepts_whole_weights():
    model = TinyClassifier()
    check_unsharded({n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}, model)


def test_check_unsharded_refuses_shards_naming_what_is_supported():
    lin = nn.Linear(96, 80)
    lin.weight.data = lin.weight.data.flatten()[:3840]  # an FSDP1 use_orig_params-style 1-D shard
    with pytest.raises(RuntimeError, match=r"layer\.x.*local shape \(3840,\).*\(80, 96\).*FSDP2"):
        check_unsharded({"layer.x": lin})

    zero3 = nn.Linear(96, 80)
    zero3.weight.data = torch.empty(0)
    zero3.weight.ds_id = 3  # what deepspeed.zero.Init leaves behind
    with pytest.raises(RuntimeError, match="ZeRO-3.*Supported.*ZeRO-1/2"):
        check_unsharded({"head": zero3})

    flagged = nn.Linear(96, 80)
    flagged.weight._fsdp_flattened = True
    with pytest.raises(RuntimeError, match="FSDP1"):
        check_unsharded([flagged])


def test_attach_refuses_a_model_partitioned_before_discovery():
    # Built after ZeRO-3 partitioning, every layer looks empty and discovery balances nothing;
    # attach must refuse instead of silently training at the base LR.
    model = TinyClassifier()
    for param in model.parameters():
        param.data = torch.empty(0)
        param.ds_id = 1
    with pytest.warns(UserWarning, match="no layer"):
        tb = TempBalance(model)
    with pytest.raises(RuntimeError, match="ZeRO-3"):
        tb.attach(torch.optim.SGD(model.parameters(), lr=0.1))


def test_collective_device_follows_the_backend(monkeypatch):
    cuda = torch.device("cuda", 0)
    for backend, hint, expected in [("gloo", cuda, "cpu"), ("gloo", torch.device("cpu"), "cpu"),
                                    ("nccl", cuda, "cuda:0"), ("cpu:gloo,cuda:nccl", cuda, "cuda:0"),
                                    ("cpu:gloo,cuda:nccl", torch.device("cpu"), "cpu")]:
        monkeypatch.setattr(dist, "get_backend", lambda group=None, b=backend: b)
        assert collective_device(hint) == torch.device(expected), backend


def test_unwrap_optimizer_reaches_the_torch_optimizer_behind_deepspeed_style_wrappers():
    inner = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1)
    zero = SimpleNamespace(optimizer=inner)  # DeepSpeed's ZeRO optimizer is no torch Optimizer

    class Wrapper(torch.optim.Optimizer):  # like accelerate's DeepSpeedOptimizerWrapper
        def __init__(self, optimizer):
            self.optimizer = optimizer

    assert unwrap_optimizer(Wrapper(zero)) is inner
    assert unwrap_optimizer(Wrapper(inner)) is inner
    assert unwrap_optimizer(inner) is inner


# ---------------------------------------------------------------------------------- single process
def test_single_process_never_calls_torch_distributed(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a single process called into torch.distributed")

    for name in ("get_rank", "get_world_size", "all_reduce", "get_backend", "init_process_group",
                 "all_gather", "broadcast", "barrier"):
        monkeypatch.setattr(dist, name, forbidden)
    model = TinyClassifier()
    tb = TempBalance(model, TempBalanceConfig(interval=1))
    optimizer = torch.optim.SGD(tb.param_groups(lr=BASE_LR), lr=BASE_LR)
    tb.attach(optimizer)
    x, y = torch.randn(8, 24), torch.randint(0, 5, (8,))
    for _ in range(2):
        model(x, y)["loss"].backward()
        optimizer.step()
    assert tb.num_updates == 2
    assert tb.last_computed == tb.plan.names  # all layers, here
    assert not dist.is_initialized()


def test_sharded_metrics_single_process_returns_compute_rows_unchanged():
    mods = [nn.Linear(8, 8), nn.Linear(8, 4)]
    rows, mine = sharded_metrics(mods, lambda subset, _: [[float(m.out_features), 0.5] for m in subset], 2)
    assert rows == [[8.0, 0.5], [4.0, 0.5]] and mine == [0, 1]


def test_a_rank_without_layers_still_joins_the_all_reduce(monkeypatch):
    # Rank 5 of 8 with 3 layers owns nothing; skipping the collective would hang the others.
    calls = []
    monkeypatch.setattr(tbdist, "world", lambda: (5, 8))
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, *a, **k: calls.append(tensor.clone()))

    def compute(subset, indices):
        raise AssertionError("a rank without layers computed something")

    rows, mine = sharded_metrics([nn.Linear(64, 64) for _ in range(3)], compute, 2)
    assert mine == [] and rows == [[0.0, 0.0]] * 3
    assert len(calls) == 1
    assert calls[0].dtype == torch.float64 and calls[0].shape == (3, 2) and calls[0].device.type == "cpu"


def test_sharded_metrics_writes_only_its_own_rows(monkeypatch):
    costs = [layer_cost(nn.Linear(n, n)) for n in (96, 64, 80)]
    mine_expected = partition_by_cost(costs, 2)[1]
    monkeypatch.setattr(tbdist, "world", lambda: (1, 2))
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    sent = []
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, *a, **k: sent.append(tensor.clone()))
    mods = [nn.Linear(n, n) for n in (96, 64, 80)]
    rows, mine = sharded_metrics(mods, lambda subset, _: [[float(m.in_features)] for m in subset], 1)
    assert mine == mine_expected and mine
    expected = [[float(mods[i].in_features)] if i in mine else [0.0] for i in range(3)]
    assert sent[0].tolist() == expected


def test_check_accelerator_refuses_silent_failures(monkeypatch):
    from hf_tempbalance.integrations.accelerate import check_accelerator

    def fake(num_processes=1, fsdp=None, deepspeed=None):
        return SimpleNamespace(num_processes=num_processes, distributed_type="NO",
                               state=SimpleNamespace(fsdp_plugin=fsdp, deepspeed_plugin=deepspeed))

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    check_accelerator(fake())
    check_accelerator(fake(2, fsdp=SimpleNamespace(fsdp_version=2)))
    check_accelerator(fake(2, deepspeed=SimpleNamespace(zero_stage=2)))
    with pytest.raises(RuntimeError, match="FSDP1"):
        check_accelerator(fake(2, fsdp=SimpleNamespace(fsdp_version=1)))
    with pytest.raises(RuntimeError, match="ZeRO-3"):
        check_accelerator(fake(2, deepspeed=SimpleNamespace(zero_stage=3)))
    # `accelerate launch --multi_gpu` without GPUs and without ACCELERATE_USE_CPU: two rank-0 copies.
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="ACCELERATE_USE_CPU=true"):
        check_accelerator(fake(1))


# ---------------------------------------------------------------------------------- launched runs
def launch(cmd: list[str], tmp_path: Path, timeout: int = 300, *, use_cpu: bool = True,
           expect_ok: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                        "ACCELERATE_USE_CPU")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HOME=str(tmp_path / "hf_home"),  # no user accelerate config leaks in
               PYTHONWARNINGS="ignore::DeprecationWarning", WANDB_DISABLED="true")
    if use_cpu:
        env["ACCELERATE_USE_CPU"] = "true"
    proc = run_launcher(cmd, env=env, cwd=REPO, timeout=timeout)
    if expect_ok:
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def accelerate_launch(script: str, out: Path, tmp_path: Path, *script_args: str,
                      **launch_kw) -> subprocess.CompletedProcess:
    return launch([str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", str(free_port()), "--monitor_interval", "0.1",
                   str(SCRIPTS / script), str(out), *script_args], tmp_path, **launch_kw)


def reference_multipliers(out: Path, updates: int) -> list[dict[str, float]]:
    """Single-process multipliers of every update, from the weights the run saved."""
    model = TinyClassifier()
    tb = TempBalance(model, TempBalanceConfig(interval=INTERVAL))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the launched ranks (OMP_NUM_THREADS=1)
    try:
        result = []
        for u in range(updates):
            weights = torch.load(out / f"weights_u{u}.pt")
            with torch.no_grad():
                for name, w in weights.items():
                    model.get_submodule(name).weight.copy_(w)
            tb.update()
            result.append(dict(tb.multipliers))
        return result
    finally:
        torch.set_num_threads(threads)


def expected_split(names: list[str]) -> tuple[list[float], float]:
    """(cost of each layer, brute-force optimal 2-rank makespan) for the TinyClassifier's layers."""
    model = TinyClassifier()
    costs = []
    for name in names:
        out_f, in_f = model.get_submodule(name).weight.shape
        d, r = min(out_f, in_f), max(out_f, in_f)
        costs.append(2 * r * d * d + 4 / 3 * d**3)
    return costs, optimal_makespan(costs, 2)


def check_run(out: Path, *, ranks: int, steps: int, schedule, history: bool = True) -> list[dict]:
    runs = [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]
    names = runs[0]["layers"]
    assert len(names) == 5
    for r, run in enumerate(runs):
        assert run["rank"] == r and run["world"] == ranks
        assert run["dist_initialized"] == (ranks > 1)
        assert [s["t"] for s in run["steps"]] == list(range(steps))
        assert [u["t"] for u in run["updates"]] == list(range(0, steps, INTERVAL))

    # Identical LRs on every rank: bit for bit (JSON floats round-trip exactly).
    for run in runs[1:]:
        assert run["steps"] == runs[0]["steps"]
        assert [u["multipliers"] for u in run["updates"]] == [u["multipliers"] for u in runs[0]["updates"]]

    # Equal to a single-process computation on the same weights.
    reference = reference_multipliers(out, len(runs[0]["updates"]))
    assert [u["multipliers"] for u in runs[0]["updates"]] == reference
    assert len({round(m, 6) for m in reference[0].values()}) == 5  # multipliers really differ
    for step in runs[0]["steps"]:
        t = step["t"]
        mult = reference[t // INTERVAL]
        labels = {label for label, _ in step["groups"]}
        assert set(names) <= labels and None in labels
        for label, lr in step["groups"]:
            expected = schedule(t) * (mult[label] if label is not None else 1.0)
            assert math.isclose(lr, expected, rel_tol=1e-12, abs_tol=0.0), (t, label, lr, expected)

    # The ESD work is shared: each layer computed by exactly one rank, balanced by cost.
    costs, best = expected_split(names)
    for u in range(len(runs[0]["updates"])):
        computed = [run["updates"][u]["computed"] for run in runs]
        assert sorted(n for c in computed for n in c) == sorted(names)
        if ranks > 1:
            assert all(computed), "every rank computes a share"
            loads = [sum(costs[names.index(n)] for n in c) for c in computed]
            assert max(loads) == pytest.approx(best)
            # The rank with the most expensive layer computes fewer layers (cost, not count).
            heavy = names[max(range(len(names)), key=lambda i: costs[i])]
            sizes = {heavy in c: len(c) for c in computed}
            assert sizes[True] < sizes[False]

    if history:  # written once, by the main process
        rows = read_history(out)
        assert len(rows) == len(runs[0]["updates"]) * len(names)
        assert sorted({row["step"] for row in rows}) == list(range(0, steps, INTERVAL))
    return runs


@pytest.mark.slow
@pytest.mark.multiprocess
def test_accelerate_custom_loop_two_processes(tmp_path):
    pytest.importorskip("accelerate")
    import accelerate_loop as loop

    out = tmp_path / "run"
    out.mkdir()
    accelerate_launch("accelerate_loop.py", out, tmp_path)
    # AcceleratedScheduler steps the LambdaLR num_processes = 2 times per optimizer step.
    runs = check_run(out, ranks=2, steps=loop.STEPS, schedule=lambda t: BASE_LR * loop.GAMMA ** (2 * t))
    assert {run["num_processes"] for run in runs} == {2}
    assert {run["distributed_type"] for run in runs} == {"DistributedType.MULTI_CPU"}


@pytest.mark.slow
@pytest.mark.multiprocess
def test_accelerate_custom_loop_single_process(tmp_path):
    pytest.importorskip("accelerate")
    import accelerate_loop as loop

    out = tmp_path / "run"
    out.mkdir()
    launch([sys.executable, str(SCRIPTS / "accelerate_loop.py"), str(out)], tmp_path)
    # One process: no process group, every layer computed here, the scheduler stepped once.
    runs = check_run(out, ranks=1, steps=loop.STEPS, schedule=lambda t: BASE_LR * loop.GAMMA ** t)
    assert runs[0]["num_processes"] == 1


@pytest.mark.slow
@pytest.mark.multiprocess
def test_trainer_callback_two_processes(tmp_path):
    pytest.importorskip("transformers")
    import trainer_run

    out = tmp_path / "run"
    out.mkdir()
    accelerate_launch("trainer_run.py", out, tmp_path)
    total = trainer_run.STEPS  # linear decay to 0 over max_steps, no warm-up
    runs = check_run(out, ranks=2, steps=total,
                     schedule=lambda t: BASE_LR * (float(total - t) / float(total)))
    assert {run["world_size"] for run in runs} == {2}


@pytest.mark.slow
@pytest.mark.multiprocess
def test_trainer_callback_refuses_one_copy_per_process(tmp_path):
    """`accelerate launch --multi_gpu` on CPU without ACCELERATE_USE_CPU or --use_cpu: the Trainer
    runs undistributed in each process (yet a gloo group exists), so the callback must stop."""
    pytest.importorskip("transformers")
    if torch.cuda.is_available():
        pytest.skip("with GPUs this launch is a correct DDP run")
    out = tmp_path / "run"
    out.mkdir()
    proc = accelerate_launch("trainer_run.py", out, tmp_path, "--gpu-args", use_cpu=False,
                             expect_ok=False)
    assert proc.returncode != 0
    assert "2 processes were launched but the Trainer (parallel_mode=not_parallel)" in proc.stderr
    assert "--use_cpu true" in proc.stderr
    assert not list(out.glob("rank*.json"))  # no rank trained


@pytest.mark.slow
@pytest.mark.multiprocess
def test_fsdp2_two_processes_gathers_whole_layers_and_refuses_fsdp1(tmp_path):
    import fsdp2_loop

    out = tmp_path / "run"
    out.mkdir()
    launch([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
            "--monitor_interval", "0.1", str(SCRIPTS / "fsdp2_loop.py"), str(out)], tmp_path)
    runs = check_run(out, ranks=2, steps=fsdp2_loop.STEPS, history=False,
                     schedule=lambda t: BASE_LR * fsdp2_loop.GAMMA ** t)
    assert {run["weight_type"] for run in runs} == {"DTensor"}
    for run in runs:
        assert run["late_layers"] == run["layers"] and run["late_same_metrics"]
        assert "snr_strength" in run["snr_refusal"] and "DTensor" in run["snr_refusal"]
        assert len(run["fsdp1_refusals"]) == 2
        for message in run["fsdp1_refusals"]:
            assert "FSDP1" in message and "fsdp_version: 2" in message


def test_world_is_single_without_a_process_group():
    assert tbdist.world() == (0, 1) and tbdist.is_main_process()


def test_launcher_retries_once_on_a_port_taken_in_between(tmp_path):
    # A stand-in launcher: fails like torchrun's bind the first time, then reports its port.
    script = ("import sys, pathlib; mark = pathlib.Path(sys.argv[1])\n"
              "if not mark.exists(): mark.touch(); print('EADDRINUSE: Address already in use'); sys.exit(1)\n"
              "print(sys.argv[3])")
    cmd = [sys.executable, "-c", script, str(tmp_path / "tried"), "--master_port", "1"]
    proc = run_launcher(cmd, env=dict(os.environ), cwd=tmp_path, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() not in ("", "1")  # a fresh port
    failing = [sys.executable, "-c", "import sys; sys.exit(3)", "--master_port", "1"]
    assert run_launcher(failing, env=dict(os.environ), cwd=tmp_path, timeout=60).returncode == 3


def test_zero_redundancy_optimizer_needs_labelled_groups(monkeypatch):
    from torch.distributed.optim import ZeroRedundancyOptimizer

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = TinyClassifier()
        tb = TempBalance(model, TempBalanceConfig(interval=1))
        plain = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.SGD, lr=BASE_LR)
        with pytest.raises(ValueError, match=r"ZeroRedundancyOptimizer .* tb.param_groups"):
            tb.attach(plain)
        optimizer = ZeroRedundancyOptimizer(tb.param_groups(lr=BASE_LR), optimizer_class=torch.optim.SGD,
                                            lr=BASE_LR)
        tb.attach(optimizer)
        model(torch.randn(8, 24))["logits"].square().mean().backward()
        before = {n: (p.detach().clone(), p.grad.clone()) for n, p in model.named_parameters()}
        optimizer.step()
        owner = tb.plan.owner_of()
        for name, param in model.named_parameters():  # plain SGD: w - lr·m·g
            w, g = before[name]
            lr = BASE_LR * tb.multipliers.get(owner.get(name), 1.0)
            torch.testing.assert_close(param.detach(), w - lr * g, msg=name)
        assert len(set(tb.multipliers.values())) > 1
    finally:
        dist.destroy_process_group()
