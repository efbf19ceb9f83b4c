"""`hf-tempbalance analyze` / `plot` and the analysis/plotting API behind them.

Expected numbers are computed here independently: eigenvalues by per-slice SVD
(``esd_reference``) and the metric formulas written out in NumPy.
"""

from __future__ import annotations

import csv
import io
import json
import math
import pathlib
import shutil
import sys

import numpy as np
import pytest
import torch
from expected import NOISE_FLOOR, numpy_ks_hill
from safetensors.torch import load_file, save_file
from torch import nn

import hf_tempbalance
from hf_tempbalance import TempBalance
from hf_tempbalance.analysis import analyze_model, read_analysis_csv
from hf_tempbalance.cli import build_parser, esd_plot_name, main, run_analyze, run_plot
from hf_tempbalance.history import HISTORY_FILE, append_history, read_history
from hf_tempbalance.plotting import plot_esd
from hf_tempbalance.spectral import esd_reference

timm = pytest.importorskip("timm")
pytest.importorskip("matplotlib")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------- references
def reference_metrics(weight: torch.Tensor) -> dict[str, float]:
    """Median-xmin Hill alpha over every eigenvalue (authors' n, xmin counted), λ_max,
    α·log10 λ_max, Σλ/λ_max."""
    eigs = esd_reference(weight.detach().double()).numpy()
    top = eigs[-1]
    kept = eigs
    i = len(kept) // 2
    tail = kept[i:]
    n = len(tail)
    alpha = 1.0 + n / (np.log(tail).sum() - n * math.log(kept[i]))
    return {"alpha": alpha, "xmin": kept[i], "n_tail": n, "spectral_norm": top,
            "alpha_weighted": alpha * math.log10(top), "stable_rank": eigs.sum() / top,
            "num_eigs": len(eigs)}


def read_csv(path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def assert_row_matches(row: dict[str, str], ref: dict[str, float], rtol: float) -> None:
    assert int(row["num_eigs"]) == ref["num_eigs"]
    assert int(row["n_tail"]) == ref["n_tail"]
    for key in ("alpha", "xmin", "spectral_norm", "alpha_weighted", "stable_rank"):
        assert float(row[key]) == pytest.approx(ref[key], rel=rtol), (row["name"], key)


def is_png(path: pathlib.Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> pathlib.Path:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(1)
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=120,
                                     n_positions=32, bos_token_id=0, eos_token_id=0)
    path = tmp_path_factory.mktemp("gpt2")
    transformers.GPT2LMHeadModel(config).save_pretrained(path)
    return path


def small_resnet(num_classes: int = 10) -> nn.Module:
    torch.manual_seed(2)
    return timm.create_model("test_resnet", num_classes=num_classes)


def conv_linear_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


# ---------------------------------------------------------------------------- analyze
def test_analyze_transformers_dir_matches_reference(gpt2_dir, tmp_path, capsys):
    out_csv = tmp_path / "layers.csv"
    code = main(["analyze", str(gpt2_dir), "--csv", str(out_csv), "--dtype", "float64",
                 "--device", "cpu", "--no-progress"])
    assert code == 0
    rows = read_csv(out_csv)

    weights = load_file(gpt2_dir / "model.safetensors")
    # GPT-2's Conv1D stores (in, out); lm_head is tied to the token embedding (out = vocab).
    expected = []
    for block in range(2):
        for part in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            name = f"transformer.h.{block}.{part}"
            expected.append((name, weights[f"{name}.weight"].t()))
    expected.append(("lm_head", weights["transformer.wte.weight"]))

    assert [r["name"] for r in rows] == [name for name, _ in expected]
    for row, (name, weight) in zip(rows, expected):
        assert row["shape"] == "x".join(map(str, weight.shape))
        assert_row_matches(row, reference_metrics(weight), rtol=1e-7)
        # TempBalance's defaults leave the first and the last layer alone.
        assert row["balanced"] == str(name not in (expected[0][0], expected[-1][0]))

    printed = capsys.readouterr().out
    alphas = np.array([float(r["alpha"]) for r in rows])
    assert f"alpha (median xmin): mean {alphas.mean():.3f}, median {np.median(alphas):.3f}" in printed
    largest = rows[int(np.argmax(alphas))]["name"]
    assert f"largest alpha: {largest} ({alphas.max():.2f})" in printed
    # The median alpha is a ranking: no verdict, and the summary says why.
    assert "under-trained" not in printed.replace("under-/over-trained verdict", "")
    assert "alpha in [2, 4]" not in printed and "RANDOM WEIGHTS" not in printed
    assert "ranks the layers against each other" in printed and "--xmin ks" in printed
    assert "conv_norm" not in printed  # GPT-2's Conv1D is a Linear: no conv scaling to label
    assert "verdict" not in rows[0]


def test_analyze_safetensors_with_timm_arch_and_esd_plots(tmp_path):
    model = small_resnet(num_classes=10)  # not timm's default 1000: the head size is inferred
    weights = tmp_path / "ckpt.safetensors"
    save_file(model.state_dict(), weights)
    out_csv, plots = tmp_path / "t.csv", tmp_path / "esd"
    assert main(["analyze", str(weights), "--arch", "timm:test_resnet", "--csv", str(out_csv),
                 "--device", "cpu", "--no-progress"]) == 0
    rows = read_csv(out_csv)

    layers = conv_linear_layers(model)
    assert [r["name"] for r in rows] == [n for n, _ in layers]
    assert rows[-1]["shape"] == "10x96"
    for row, (_, module) in zip(rows, layers):
        assert_row_matches(row, reference_metrics(module.weight), rtol=1e-4)  # fp32 Gram path

    # One Figure-1 plot per analysed layer (here the layers --include picks).
    args = build_parser().parse_args(["analyze", str(weights), "--arch", "timm:test_resnet",
                                      "--include", r"^layer4\.|^fc$", "--plots", str(plots),
                                      "--device", "cpu", "--no-progress"])
    report = run_analyze(args)
    picked = [n for n, _ in layers if n.startswith("layer4.") or n == "fc"]
    assert [layer.name for layer in report.layers] == picked
    assert sorted(p.name for p in plots.glob("*.png")) == sorted(esd_plot_name(n) for n in picked)
    assert all(is_png(p) for p in plots.glob("*.png"))
    # Each draws the layer's ESD, its xmin and the fitted power law.
    name, module = layers[12]
    ref = reference_metrics(module.weight)
    plot = plot_esd(report[name])
    ax = plot.figure.axes[0]
    stairs = ax.patches[0].get_data()
    density, edges = stairs.values, stairs.edges
    ref_eigs = esd_reference(module.weight.detach().double()).numpy()
    np.testing.assert_allclose(plot.data["eigs"], ref_eigs, rtol=1e-4)
    np.testing.assert_allclose(edges, np.geomspace(ref_eigs[0], ref_eigs[-1], len(edges)), rtol=1e-4)
    ref_density, _ = np.histogram(plot.data["eigs"], bins=edges, density=True)
    np.testing.assert_array_equal(density, ref_density)
    xmin_line = [ln for ln in ax.lines if ln.get_linestyle() == "--"][0]
    assert xmin_line.get_xdata()[0] == pytest.approx(ref["xmin"], rel=1e-4)
    fit_line = [ln for ln in ax.lines if ln.get_linestyle() == "-"][0]
    x, y = fit_line.get_xdata(), fit_line.get_ydata()
    a, n, total = ref["alpha"], ref["n_tail"], ref["num_eigs"]
    np.testing.assert_allclose(y, n / total * (a - 1) / ref["xmin"] * (x / ref["xmin"]) ** -a, rtol=1e-3)
    assert x[0] == pytest.approx(ref["xmin"], rel=1e-4) and x[-1] == pytest.approx(ref_eigs[-1], rel=1e-4)

    # The same folder for other layers: the earlier analyze's plots go (they would pass for this
    # model's), a PNG it did not write stays.
    (plots / "mine.png").write_bytes(b"not ours")
    assert main(["analyze", str(weights), "--arch", "timm:test_resnet", "--include", r"^layer1\.0\.",
                 "--plots", str(plots), "--device", "cpu", "--no-progress"]) == 0
    layer1 = [n for n, _ in layers if n.startswith("layer1.0.")]
    assert layer1 and sorted(p.name for p in plots.glob("*.png")) == sorted(
        [esd_plot_name(n) for n in layer1] + ["mine.png"])


def test_pt_checkpoint_and_bare_tensors(tmp_path):
    model = small_resnet()
    expected = analyze_model(model, layers="all").alphas  # the in-memory model: what loading must give
    reference = {n: reference_metrics(m.weight)["alpha"] for n, m in conv_linear_layers(model)}
    assert expected == pytest.approx(reference, rel=1e-4)
    # A DDP-style checkpoint: weights nested under "state_dict" with a "module." prefix.
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
                "epoch": 3}, ckpt)
    args = build_parser().parse_args(["analyze", str(ckpt), "--arch", "timm:test_resnet",
                                      "--device", "cpu", "--no-progress"])
    assert run_analyze(args).alphas == pytest.approx(expected, rel=1e-6)

    # No architecture at all: every >=2-D weight tensor, same spectra.
    args = build_parser().parse_args(["analyze", str(ckpt), "--arch", "tensors",
                                      "--device", "cpu", "--no-progress"])
    report = run_analyze(args)
    assert report.alphas == pytest.approx(expected, rel=1e-6)
    assert {layer.type for layer in report.layers} == {"tensor"}


def test_safetensors_tensors_in_numeric_order(tmp_path):
    # safetensors stores keys unordered (sorted as text: "10" before "2"); depth order is numeric.
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(12)])
    save_file(model.state_dict(), tmp_path / "seq.safetensors")
    args = build_parser().parse_args(["analyze", str(tmp_path / "seq.safetensors"), "--arch",
                                      "tensors", "--device", "cpu", "--no-progress"])
    assert [layer.name for layer in run_analyze(args).layers] == [str(i) for i in range(12)]


class _Marker:
    """Unpickling this would create a file: proof that no code ran."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def test_pickle_with_code_is_refused(tmp_path, capsys):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"fc.weight": torch.randn(64, 64), "payload": _Marker(marker)}, evil)
    assert main(["analyze", str(evil), "--arch", "tensors", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "refusing to load" in err and "weights_only" in err
    assert not marker.exists()


def tensors_file(parent: pathlib.Path, tensors: dict) -> str:
    save_file(tensors, parent / "t.safetensors")
    return str(parent / "t.safetensors")


def empty_history_run(parent: pathlib.Path) -> str:
    """A run folder whose history file exists but is empty (a run that never updated)."""
    run = parent / "empty"
    run.mkdir(exist_ok=True)
    (run / HISTORY_FILE).write_text("")
    return str(run)


@pytest.mark.parametrize("make_args, message", [
    (lambda p: ["analyze", str(p / "missing" / "model.safetensors")], "no such file or directory"),
    (lambda p: ["analyze", str(p / "no-dir")], "no such file or directory"),
    (lambda p: ["analyze", "surely-not-a-model-xyz"], "'surely-not-a-model-xyz' is not in the "
                                                        "local cache, and HF_HUB_OFFLINE=1"),
    (lambda p: ["analyze", "<bad id>"], "unknown model"),
    (lambda p: ["analyze", "timm:resnet_does_not_exist"], "unknown timm model"),
    (lambda p: ["analyze", str(p)], "found no model"),
    (lambda p: ["analyze", str(p), "--checkpoint", "3"], "has no checkpoint-3 with a model"),
    (lambda p: ["analyze", str(p / "w.safetensors"), "--checkpoint", "3"], "is not a directory"),
    (lambda p: ["analyze", str(p / "w.safetensors"), "--arch", "tensors", "--csv", "-", "--json",
                "-"], "both ask for stdout"),
    (lambda p: ["analyze", str(p / "w.safetensors")], "--arch"),
    (lambda p: ["analyze", str(p / "w.safetensors"), "--arch", "timm:test_vit"], "check --arch"),
    (lambda p: ["analyze", str(p / "w.safetensors"), "--arch", "timm:test_resnet",
                "--include", "("], "error: --include '(': '(' is not a valid regular expression"),
    (lambda p: ["analyze", str(p / "w.safetensors"), "--arch", "tensors", "--include", "nothing"],
     "--arch tensors reads the floating-point tensors of 2 or more dimensions whose key ends in "
     "'weight', and the filters (--include/--exclude/--layers) keep none of its "),
    (lambda p: ["analyze", tensors_file(p, {"w": torch.ones(60, 60), "v": torch.ones(60, 60)}),
                "--arch", "tensors"], "whose key ends in 'weight', and it has none (it holds "
                                      "v (60, 60), w (60, 60))"),
    (lambda p: ["plot", str(p / "no-run")], "no such run directory"),
    (lambda p: ["plot", str(p)], HISTORY_FILE),
    (lambda p: ["plot", empty_history_run(p), empty_history_run(p)],
     f"has an empty {HISTORY_FILE} and no saved model"),
])
def test_errors_exit_2_with_message(tmp_path, capsys, make_args, message):
    save_file(small_resnet().state_dict(), tmp_path / "w.safetensors")
    assert main(make_args(tmp_path)) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_plots_into_a_path_under_a_file_is_a_clear_error(tb_run, tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    assert main(["plot", str(tb_run[0]), "--out", str(tmp_path / "file" / "plots")]) == 2
    err = capsys.readouterr().err
    assert f"cannot write the plots into --out {tmp_path / 'file' / 'plots'}: " in err, err
    assert len(err.strip().splitlines()) == 1


def test_plot_into_a_folder_replaces_its_own_earlier_plots(tb_run, tmp_path, capsys):
    """Plots of other runs drawn earlier into --out are removed (their names carry the other run's
    label); files plot did not write are kept."""
    other = tmp_path / "other"
    shutil.copytree(tb_run[0], other)
    out = tmp_path / "figs"
    assert main(["plot", str(tb_run[0]), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["tb_heatmaps.png", "tb_layer_curves.png"]
    (out / "notes.png").write_bytes(b"mine")
    capsys.readouterr()
    assert main(["plot", str(other), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == [
        "notes.png", "other_heatmaps.png", "other_layer_curves.png"]
    said = capsys.readouterr().out
    assert f"removed {out / 'tb_heatmaps.png'} (an earlier plot of other runs)" in said


def test_missing_matplotlib_is_a_clear_error(tb_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import fail
    assert main(["plot", str(tb_run[0]), "--out", str(tmp_path)]) == 2
    assert "pip install 'hf_tempbalance[plot]'" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_usage_error_exits_2():
    with pytest.raises(SystemExit) as info:
        main(["analyze"])
    assert info.value.code == 2


# ---------------------------------------------------------------------------- plot
def run_tempbalance(run_dir: pathlib.Path, steps: int = 12) -> TempBalance:
    """A short real TempBalance run on test_resnet (noise gradients: only the history matters).

    The engine records each update's ``base_lr``; ``epoch`` is added as the Trainer callback does.
    """
    model = small_resnet()
    tb = TempBalance(model, interval=3)
    opt = torch.optim.SGD(tb.param_groups(lr=0.05), momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    tb.attach(opt)
    gen = torch.Generator().manual_seed(0)
    written = 0
    for step in range(steps):
        for param in model.parameters():
            param.grad = torch.randn(param.shape, generator=gen)
        opt.step()
        sched.step()
        rows = tb.history[written:]
        for row in rows:
            row["epoch"] = step / 4  # 4 steps per "epoch"
        append_history(rows, run_dir / HISTORY_FILE)
        written = len(tb.history)
    save_file(model.state_dict(), run_dir / "model.safetensors")
    return tb


@pytest.fixture(scope="module")
def tb_run(tmp_path_factory) -> tuple[pathlib.Path, list[str]]:
    """(run dir, balanced layer names) of one TempBalance run; copy it before changing it."""
    run = tmp_path_factory.mktemp("runs") / "tb"
    run.mkdir()
    return run, run_tempbalance(run).plan.names


def expected_grid(rows: list[dict], field: str) -> tuple[list[str], np.ndarray]:
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    updates = sorted({r["update"] for r in rows})
    grid = np.full((len(layers), len(updates)), np.nan)
    for r in rows:
        if field == "lr":
            value = r["base_lr"] * r["multiplier"]
        else:
            value = r[field]
        grid[layers.index(r["layer"]), updates.index(r["update"])] = value
    return layers, grid


def test_plot_draws_the_history(tb_run, tmp_path):
    run, names = tb_run
    out = tmp_path / "figs"
    rows = read_history(run)
    assert len({r["update"] for r in rows}) == 4 and len(rows) == 4 * len(names)

    chosen = [names[0], names[-1]]
    args = build_parser().parse_args(["plot", str(run), "--out", str(out), "--layers", *chosen])
    plots = run_plot(args)  # one run: no distribution figure
    assert sorted(plots) == ["tb_heatmaps.png", "tb_layer_curves.png"]
    assert all(is_png(out / name) for name in plots)

    layers, lr = expected_grid(rows, "lr")
    _, alpha = expected_grid(rows, "value")
    epochs = np.array(sorted({r["epoch"] for r in rows}))

    heat = plots["tb_heatmaps.png"]
    lr_mesh = heat.figure.axes[0].collections[0]
    alpha_mesh = heat.figure.axes[1].collections[0]  # axes: lr, alpha, then the two colorbars
    np.testing.assert_allclose(np.ma.filled(lr_mesh.get_array(), np.nan), lr)
    np.testing.assert_allclose(np.ma.filled(alpha_mesh.get_array(), np.nan), alpha)
    centres = lr_mesh.get_coordinates()[0, :, 0]
    np.testing.assert_allclose((centres[1:] + centres[:-1]) / 2, epochs)
    labels = [t.get_text() for t in heat.figure.axes[0].get_yticklabels()]
    assert labels == layers

    curves = plots["tb_layer_curves.png"].figure.axes
    for ax, grid in ((curves[0], lr), (curves[1], alpha)):
        assert [ln.get_label() for ln in ax.lines] == chosen
        for line, name in zip(ax.lines, chosen):
            np.testing.assert_allclose(line.get_xdata(), epochs)
            np.testing.assert_allclose(line.get_ydata(), grid[layers.index(name)])

    # Without base_lr the LR panels show the multipliers.
    plain = tmp_path / "plain"
    append_history([{k: v for k, v in r.items() if k != "base_lr"} for r in rows],
                   plain / HISTORY_FILE)
    heat = run_plot(build_parser().parse_args(["plot", str(plain), "--out", str(out)]))
    heat = heat["plain_heatmaps.png"]
    _, mult = expected_grid(rows, "multiplier")
    np.testing.assert_allclose(np.ma.filled(heat.figure.axes[0].collections[0].get_array(), np.nan), mult)
    assert heat.data["lr_label"] == "LR multiplier"


def test_plot_alpha_distributions_tb_vs_baseline(tb_run, tmp_path):
    names = tb_run[1]
    tb_dir = pathlib.Path(shutil.copytree(tb_run[0], tmp_path / "tb"))
    base_dir, out = tmp_path / "baseline", tmp_path / "figs"
    base_dir.mkdir()
    baseline = small_resnet()
    save_file(baseline.state_dict(), base_dir / "model.safetensors")
    trained = small_resnet()
    trained.load_state_dict(load_file(tb_dir / "model.safetensors"))
    modules = {"tb": dict(trained.named_modules()), "baseline": dict(baseline.named_modules())}
    expect = {label: np.array([reference_metrics(mods[n].weight)["alpha"] for n in names])
              for label, mods in modules.items()}

    # Both runs measured from their saved final models (bare state dicts: --arch), on the
    # layers TempBalance balanced. The baseline has the empty history file that a Trainer run
    # with balance_lr=False (SNR alone) leaves: still a baseline, not an error.
    (base_dir / HISTORY_FILE).touch()
    args = build_parser().parse_args(["plot", str(tb_dir), str(base_dir), "--out", str(out),
                                      "--arch", "timm:test_resnet", "--device", "cpu"])
    written = run_plot(args)
    assert "tb_heatmaps.png" in written and "baseline_heatmaps.png" not in written
    plot = written["alpha_distributions.png"]
    assert is_png(out / "alpha_distributions.png")
    edges = plot.data["edges"]
    for ax, label in zip(plot.figure.axes, ("tb", "baseline")):
        alphas = expect[label]
        np.testing.assert_allclose(plot.data[label]["alphas"], alphas, rtol=1e-4)
        stairs = ax.patches[0].get_data()
        np.testing.assert_array_equal(stairs.edges, edges)
        np.testing.assert_array_equal(stairs.values, np.histogram(plot.data[label]["alphas"], bins=edges)[0])
        marks = [ln.get_xdata()[0] for ln in ax.lines]  # mean, median; no verdict line
        np.testing.assert_allclose(marks, [alphas.mean(), np.median(alphas)], rtol=1e-4)

    # A run without a saved model falls back to its last update; a baseline CSV from `analyze`.
    (tb_dir / "model.safetensors").unlink()
    base_csv = tmp_path / "base.csv"
    analyze_model(baseline).to_csv(base_csv)
    args = build_parser().parse_args(["plot", str(tb_dir), "--baseline-alphas", str(base_csv),
                                      "--out", str(out), "--device", "cpu"])
    plot = run_plot(args)["alpha_distributions.png"]
    last = [r["value"] for r in read_history(tb_dir) if r["update"] == 3]
    np.testing.assert_allclose(plot.data["tb"]["alphas"], last)
    np.testing.assert_allclose(plot.data["base"]["alphas"], expect["baseline"], rtol=1e-4)
    # CSVs of one file name each keep their own distribution, labelled base, base-2, base-3
    copies = [tmp_path / d / "base.csv" for d in ("a", "b")]
    for copy in copies:
        copy.parent.mkdir()
        copy.write_text(base_csv.read_text())
    flags = [arg for csv in (base_csv, *copies) for arg in ("--baseline-alphas", str(csv))]
    args = build_parser().parse_args(["plot", str(tb_dir), *flags, "--out", str(out),
                                      "--device", "cpu"])
    plot = run_plot(args)["alpha_distributions.png"]
    assert [k for k in plot.data if k != "edges"] == ["tb", "base", "base-2", "base-3"]

@pytest.mark.slow
def test_trainer_runs_end_to_end(gpt2_dir, tmp_path):
    """A real Trainer + TempBalanceCallback run and a baseline run, then `hf-tempbalance plot`."""
    transformers = pytest.importorskip("transformers")
    from hf_tempbalance import TempBalanceCallback

    gen = torch.Generator().manual_seed(3)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 120, (16, 12), generator=gen)]

    def train(out: pathlib.Path, callbacks: list) -> None:
        model = transformers.GPT2LMHeadModel.from_pretrained(gpt2_dir)
        args = transformers.TrainingArguments(
            str(out), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3,
            lr_scheduler_type="cosine", report_to=[], use_cpu=True, save_strategy="no",
            logging_steps=1000, disable_tqdm=True, seed=7, dataloader_num_workers=0)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)
        trainer.train()
        trainer.save_model()

    tb_out, base_out, figs = tmp_path / "tb", tmp_path / "cal", tmp_path / "figs"
    train(tb_out, [TempBalanceCallback(interval=2)])
    train(base_out, [])
    plots = run_plot(build_parser().parse_args(
        ["plot", str(tb_out), str(base_out), "--out", str(figs), "--device", "cpu"]))
    assert sorted(p.name for p in figs.glob("*.png")) == [
        "alpha_distributions.png", "tb_heatmaps.png", "tb_layer_curves.png"]
    assert all(is_png(p) for p in figs.glob("*.png"))
    rows = read_history(tb_out)
    layers, lr = expected_grid(rows, "lr")
    _, alpha = expected_grid(rows, "value")
    heat = plots["tb_heatmaps.png"].figure.axes
    np.testing.assert_allclose(np.ma.filled(heat[0].collections[0].get_array(), np.nan), lr)
    np.testing.assert_allclose(np.ma.filled(heat[1].collections[0].get_array(), np.nan), alpha)
    np.testing.assert_allclose(plots["tb_heatmaps.png"].data["x"],
                               sorted({r["epoch"] for r in rows}))

    # Final alphas of both saved models, on the layers TempBalance balanced (Conv1D: (in, out)).
    dist = plots["alpha_distributions.png"].data
    for label, out in (("tb", tb_out), ("cal", base_out)):
        weights = load_file(out / "model.safetensors")
        expect = [reference_metrics(weights[f"{name}.weight"])["alpha"] for name in layers]
        np.testing.assert_allclose(dist[label]["alphas"], expect, rtol=1e-4)


# ---------------------------------------------------------------------------- honest analyze
def test_ks_xmin_gives_verdicts_on_the_absolute_scale(gpt2_dir, tmp_path, capsys):
    out_json, out_csv = tmp_path / "r.json", tmp_path / "r.csv"
    assert main(["analyze", str(gpt2_dir), "--xmin", "ks", "--dtype", "float64", "--json",
                 str(out_json), "--csv", str(out_csv), "--device", "cpu", "--no-progress",
                 "--top", "2"]) == 0
    printed = capsys.readouterr().out
    data = json.loads(out_json.read_text())
    # The CSV carries the same rows, verdicts included, and reads back (e.g. for plot --baseline-alphas).
    assert read_analysis_csv(out_csv) == data["layers"]
    assert data["calibrated"] is True and data["xmin"] == "ks" and data["random_weights"] is False
    weights = load_file(gpt2_dir / "model.safetensors")
    names = [row["name"] for row in data["layers"]]
    alphas = []
    for row in data["layers"]:
        key = "transformer.wte.weight" if row["name"] == "lm_head" else f"{row['name']}.weight"
        weight = weights[key] if row["name"] == "lm_head" else weights[key].t()
        eigs = esd_reference(weight.double()).numpy()
        alpha, xmin = numpy_ks_hill(eigs, floor=NOISE_FLOOR[np.dtype(np.float64)])
        assert row["alpha"] == pytest.approx(alpha, rel=1e-7), row["name"]
        assert row["xmin"] == pytest.approx(xmin, rel=1e-7), row["name"]
        # weightwatcher's warnings: alpha < 2 over-trained, > 6 under-trained, else none
        assert row["verdict"] == ("over-trained" if alpha < 2 else "under-trained" if alpha > 6 else "")
        alphas.append(alpha)
    alphas = np.array(alphas)
    summary = data["summary"]
    assert summary["num_under_trained"] == int((alphas > 6).sum())
    assert summary["num_over_trained"] == int((alphas < 2).sum())
    assert summary["num_in_range"] == int(((alphas >= 2) & (alphas <= 6)).sum())
    assert summary["alpha_mean"] == pytest.approx(alphas.mean(), rel=1e-7)
    under = sorted(((n, a) for n, a in zip(names, alphas) if a > 6), key=lambda t: -t[1])[:2]
    assert [u["name"] for u in summary["under_trained"]] == [n for n, _ in under]
    assert (f"HT-SR verdicts (weightwatcher's thresholds): {summary['num_under_trained']} "
            f"under-trained (alpha > 6), {summary['num_over_trained']} over-trained (alpha < 2), "
            f"{summary['num_in_range']} without a warning (2 <= alpha <= 6)") in printed
    assert "HT-SR" in printed.splitlines()[0]  # the table's verdict column


def test_random_weights_banner_json_and_stdout(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    expected_model = timm.create_model("test_resnet")
    reference = {n: reference_metrics(m.weight)["alpha"] for n, m in conv_linear_layers(expected_model)}

    # A timm name without --pretrained: timm's init with seed 0, and a banner that says so.
    torch.manual_seed(123)  # the global RNG does not matter, and is left as it was
    state = torch.get_rng_state()
    assert main(["analyze", "test_resnet", "--device", "cpu", "--no-progress"]) == 0
    assert torch.equal(torch.get_rng_state(), state)
    out = capsys.readouterr().out
    assert out.splitlines()[1].startswith("RANDOM WEIGHTS: timm:test_resnet is timm's random "
                                          "initialisation (seed 0; no --pretrained)")
    # spec_norm is of W as stored; training's conv metrics use √conv_norm·W: the table says so
    assert "conv layers use √conv_norm·W, λ_max × 0.5" in out

    # --json -: only JSON on stdout (strict: no NaN), the banner on stderr; the same numbers.
    assert main(["analyze", "test_resnet", "--json", "-", "--device", "cpu", "--no-progress"]) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out, parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert "RANDOM WEIGHTS" in captured.err
    assert data["random_weights"] is True and data["source"] == "timm:test_resnet"
    assert data["hf_tempbalance"] == hf_tempbalance.__version__
    assert data["calibrated"] is False and "relative" in data["alpha_reading"]
    assert {r["name"]: r["alpha"] for r in data["layers"]} == pytest.approx(reference, rel=1e-4)
    assert all("verdict" not in r for r in data["layers"])

    # --csv -: the table on stdout, and no file named "-".
    assert main(["analyze", "test_resnet", "--csv", "-", "--device", "cpu", "--no-progress"]) == 0
    captured = capsys.readouterr()
    rows = list(csv.DictReader(io.StringIO(captured.out)))
    assert {r["name"]: float(r["alpha"]) for r in rows} == pytest.approx(reference, rel=1e-4)
    assert not (tmp_path / "-").exists() and "RANDOM WEIGHTS" in captured.err

    # Trained (here: loaded) weights: no banner.
    save_file(expected_model.state_dict(), tmp_path / "w.safetensors")
    assert main(["analyze", "w.safetensors", "--arch", "timm:test_resnet", "--device", "cpu",
                 "--no-progress"]) == 0
    assert "RANDOM WEIGHTS" not in capsys.readouterr().out


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"hf-tempbalance {hf_tempbalance.__version__}"


def _save_gpt2(path: pathlib.Path, seed: int) -> dict[str, torch.Tensor]:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_embd=64, n_layer=1, n_head=2, vocab_size=120,
                                     n_positions=32, bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(config).save_pretrained(path)
    return load_file(path / "model.safetensors")


def _c_fc_alpha(weights: dict[str, torch.Tensor]) -> float:
    return reference_metrics(weights["transformer.h.0.mlp.c_fc.weight"].t())["alpha"]


def test_run_dir_reads_its_latest_checkpoint_or_the_one_asked(tmp_path, capsys):
    run = tmp_path / "run"
    early = _save_gpt2(run / "checkpoint-2", seed=1)
    late = _save_gpt2(run / "checkpoint-10", seed=2)  # 10 > 2 numerically, "10" < "2" as text
    (run / "checkpoint-7").mkdir()  # no model in it: not a checkpoint
    args = ["--include", r"c_fc$", "--json", str(tmp_path / "r.json"), "--device", "cpu",
            "--no-progress"]

    assert main(["analyze", str(run), *args]) == 0
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["source"] == str(run / "checkpoint-10")
    assert data["layers"][0]["alpha"] == pytest.approx(_c_fc_alpha(late), rel=1e-4)
    assert "read checkpoint-10, the latest of its 2 checkpoint(s)" in capsys.readouterr().out

    for pick in ("2", "checkpoint-2"):
        assert main(["analyze", str(run), "--checkpoint", pick, *args]) == 0
        data = json.loads((tmp_path / "r.json").read_text())
        assert data["layers"][0]["alpha"] == pytest.approx(_c_fc_alpha(early), rel=1e-4)
    capsys.readouterr()
    assert main(["analyze", str(run), "--checkpoint", "7", *args]) == 2
    assert "it has: checkpoint-2, checkpoint-10" in capsys.readouterr().err

    # The final model (trainer.save_model()) wins over the checkpoints, with a note.
    final = _save_gpt2(tmp_path / "final", seed=3)
    for f in (tmp_path / "final").iterdir():
        shutil.copy(f, run / f.name)
    assert main(["analyze", str(run), *args]) == 0
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["source"] == str(run)
    assert data["layers"][0]["alpha"] == pytest.approx(_c_fc_alpha(final), rel=1e-4)
    assert "--checkpoint N reads one" in capsys.readouterr().out


@pytest.mark.slow
def test_analyze_a_trainer_output_dir(gpt2_dir, tmp_path, capsys):
    """A real Trainer run saving checkpoints only (no save_model): analyze OUTPUT_DIR reads the
    latest checkpoint-N."""
    transformers = pytest.importorskip("transformers")
    gen = torch.Generator().manual_seed(3)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 120, (8, 12), generator=gen)]
    out = tmp_path / "out"
    args = transformers.TrainingArguments(
        str(out), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3, report_to=[],
        use_cpu=True, save_strategy="steps", save_steps=2, logging_steps=1000, disable_tqdm=True,
        seed=7, dataloader_num_workers=0)
    model = transformers.GPT2LMHeadModel.from_pretrained(gpt2_dir)
    transformers.Trainer(model=model, args=args, train_dataset=data).train()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]

    assert main(["analyze", str(out), "--csv", str(tmp_path / "t.csv"), "--device", "cpu",
                 "--no-progress"]) == 0
    assert "read checkpoint-4, the latest of its 2 checkpoint(s)" in capsys.readouterr().out
    weights = load_file(out / "checkpoint-4" / "model.safetensors")
    row = {r["name"]: r for r in read_csv(tmp_path / "t.csv")}["transformer.h.1.mlp.c_fc"]
    assert float(row["alpha"]) == pytest.approx(
        reference_metrics(weights["transformer.h.1.mlp.c_fc.weight"].t())["alpha"], rel=1e-4)


# ---------------------------------------------------------------------------- offline, fresh machine
def _cached(repo_id: str, filename: str = "config.json") -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, filename), str)


@pytest.mark.parametrize("spec", ["gpt2", "hf:gpt2", "hf-internal-testing/surely-not-cached-xyz"])
def test_offline_hub_id_not_cached_says_so(spec, capsys, monkeypatch):
    pytest.importorskip("transformers")
    repo = spec.removeprefix("hf:")
    if _cached(repo):
        pytest.skip(f"{repo} is in the local cache here")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    assert main(["analyze", spec, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert (f"Hugging Face Hub model '{repo}' is not in the local cache, and HF_HUB_OFFLINE=1 is "
            f"set. Download it once with network access: `HF_HUB_OFFLINE=0 hf-tempbalance analyze "
            f"hf:{repo}`") in err
    assert "unknown model" not in err


def test_offline_timm_pretrained_not_cached_says_so(capsys, monkeypatch):
    if _cached("timm/test_resnet.r160_in1k", "model.safetensors"):
        pytest.skip("test_resnet's weights are in the local cache here")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["analyze", "test_resnet", "--pretrained", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert ("the pretrained weights of timm model 'test_resnet' are not in the local cache, and "
            "HF_HUB_OFFLINE=1 is set. Download it once with network access: `HF_HUB_OFFLINE=0 "
            "hf-tempbalance analyze timm:test_resnet --pretrained`; or drop --pretrained") in err
    assert "go online" not in err


def test_without_timm_and_transformers_a_name_says_what_to_install(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # makes `import timm` fail
    monkeypatch.setitem(sys.modules, "transformers", None)
    assert main(["analyze", "resnet18"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "pip install 'hf_tempbalance[vision]'" in err and "pip install 'hf_tempbalance[transformers]'" in err
