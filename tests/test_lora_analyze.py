"""`hf-tempbalance analyze` on a PEFT LoRA adapter folder: both views per adapted module.

A tiny Llama is saved as the base, LoRA-trained for a few AdamW steps (so every B is away from
zero) and its adapter saved. The expectations come from the in-memory model, in float64 and
without the library: the effective view from the weights of ``merge_and_unload()`` (PEFT's own
merge), the ΔW view from the dense ``eigvalsh`` of ΔWᵀΔW with ΔW = s·B·A."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from expected import numpy_hill

from hf_tempbalance.analysis import analyze_lora_deltas
from hf_tempbalance.cli import main
from hf_tempbalance.spectral.lowrank import low_rank_esd

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
       "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def llama(hidden: int = 64, layers: int = 2, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=97, hidden_size=hidden, intermediate_size=96, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``(tmp, trained PEFT model)``: tmp/base (the base), tmp/adapter (its LoRA adapter)."""
    tmp = tmp_path_factory.mktemp("lora_analyze")
    llama().save_pretrained(tmp / "base")
    # Loaded from its folder, so that adapter_config.json names it as base_model_name_or_path.
    model = get_peft_model(LlamaForCausalLM.from_pretrained(tmp / "base"), LoraConfig(
        r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    ids = torch.randint(0, 97, (8, 16), generator=torch.Generator().manual_seed(1))
    for _ in range(4):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(p.abs().max() > 1e-3 for n, p in model.named_parameters() if "lora_B" in n)
    model.save_pretrained(tmp / "adapter")
    return tmp, model


def dense_delta(module) -> torch.Tensor:
    b = module.lora_B["default"].weight.detach().double()
    a = module.lora_A["default"].weight.detach().double()
    return module.scaling["default"] * b @ a


def reference(eigs: np.ndarray) -> dict[str, float]:
    return {"alpha": numpy_hill(eigs), "spectral_norm": float(eigs.max()),
            "stable_rank": float(eigs.sum() / eigs.max())}


def expected_views(model) -> tuple[dict[str, dict], dict[str, dict], dict[str, dict]]:
    """{module name: metrics} of W0 + s·B·A in float64, of PEFT's merged weights (float32), and
    of ΔW alone (its r largest eigenvalues of the dense ΔWᵀΔW, the rest being zero)."""
    merged = copy.deepcopy(model).merge_and_unload()
    effective, by_merge, delta = {}, {}, {}
    for name, module in model.named_modules():
        if not hasattr(module, "lora_A") or not isinstance(module.lora_A, torch.nn.ModuleDict):
            continue
        w = module.base_layer.weight.detach().double() + dense_delta(module)
        effective[name] = reference(torch.linalg.svdvals(w).pow(2).numpy())
        inner = name.removeprefix("base_model.model.")
        w = merged.get_submodule(inner).weight.detach().double()
        by_merge[name] = reference(torch.linalg.svdvals(w).pow(2).numpy())
        d = dense_delta(module)
        full = torch.linalg.eigvalsh(d.T @ d).numpy()
        assert (np.sort(full)[:-8] < 1e-12 * full.max()).all()  # rank 8: the rest is zero
        delta[name] = reference(np.sort(full)[-8:])
    return effective, by_merge, delta


# ------------------------------------------------------------------------------------ the math
@pytest.mark.parametrize("out, inp, k", [(64, 48, 8), (30, 200, 8), (40, 40, 16), (6, 50, 8),
                                         (50, 5, 8)])
def test_low_rank_esd_equals_the_dense_eigvalsh(out, inp, k):
    gen = torch.Generator().manual_seed(out + inp + k)
    left = torch.randn(out, k, generator=gen, dtype=torch.float64)
    right = torch.randn(k, inp, generator=gen, dtype=torch.float64) * 0.1
    dense = torch.linalg.eigvalsh((left @ right).T @ (left @ right))
    rank = min(out, inp, k)
    got = low_rank_esd(left, right, dtype=torch.float64)
    assert got.shape == (rank,)
    torch.testing.assert_close(got, dense[-rank:], rtol=1e-10, atol=1e-10 * float(dense[-1]))
    # float32 keeps the top of the spectrum to float32 accuracy
    got32 = low_rank_esd(left.float(), right.float())
    torch.testing.assert_close(got32.double(), dense[-rank:], rtol=1e-4, atol=1e-5 * float(dense[-1]))


def test_low_rank_esd_of_a_rank_deficient_update_has_its_zeros():
    left = torch.zeros(20, 4, dtype=torch.float64)
    left[:, 0] = torch.arange(20.0)
    right = torch.randn(4, 30, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = low_rank_esd(left, right, dtype=torch.float64)
    d = left @ right
    assert got[-1] == pytest.approx(float(torch.linalg.matrix_norm(d, 2) ** 2), rel=1e-12)
    assert (got[:-1] <= 1e-9 * got[-1]).all()


def test_dora_delta_view_is_the_full_rank_difference_of_the_effective_weights():
    model = get_peft_model(llama(), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj"],
                                               use_dora=True, lora_dropout=0.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(2))
    report = analyze_lora_deltas(model, dtype="float64", keep_esds=True)
    merged = copy.deepcopy(model).merge_and_unload()  # PEFT's merge, in float32
    for row in report.layers:
        module = model.get_submodule(row.name)
        w0 = module.base_layer.weight.detach().double()
        # DoRA's forward in float64: rows of W0 + s·B·A rescaled to the magnitude m.
        adapted = w0 + dense_delta(module)
        m = module.lora_magnitude_vector["default"].weight.detach().double()
        d = (m / adapted.norm(dim=1))[:, None] * adapted - w0
        dense = np.sort(torch.linalg.svdvals(d).pow(2).numpy())
        assert row.num_eigs == 64 and row.view == "delta"
        np.testing.assert_allclose(row.eigs, dense, rtol=1e-8, atol=1e-12 * dense.max())
        inner = row.name.removeprefix("base_model.model.")
        by_peft = merged.get_submodule(inner).weight.detach().double() - w0
        top = np.sort(torch.linalg.svdvals(by_peft).pow(2).numpy())[32:]
        np.testing.assert_allclose(row.eigs[32:], top, rtol=1e-4)


# ------------------------------------------------------------------------------------ the CLI
def test_analyze_an_adapter_reports_both_views_equal_to_the_in_memory_model(saved, tmp_path, capsys):
    tmp, model = saved
    out = tmp_path / "report.json"
    # No --base: adapter_config.json names tmp/base, which is local.
    assert main(["analyze", str(tmp / "adapter"), "--dtype", "float64", "--json", str(out),
                 "--csv", str(tmp_path / "rows.csv"), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "EFFECTIVE WEIGHT W0 + ΔW" in text and "ΔW = s·B·A ALONE" in text
    assert text.index("EFFECTIVE WEIGHT") < text.index("ALONE")
    data = json.loads(out.read_text())
    effective, by_merge, delta = expected_views(model)
    assert data["adapter"]["base"] == str(tmp / "base") and data["adapter"]["r"] == 8
    assert "TempBalance balances" in data["view"] and "weightwatcher" in data["delta"]["view"]
    rows = {r["name"]: r for r in data["layers"]}
    drows = {r["name"]: r for r in data["delta"]["layers"]}
    assert list(rows) == list(effective) == list(drows) and len(rows) == 2 * len(TARGETS)
    for name, ref in effective.items():
        row = rows[name]
        assert row["view"] == "effective" and row["num_eigs"] == 64
        for key, value in ref.items():
            assert row[key] == pytest.approx(value, rel=1e-9), (name, key)
            # PEFT's own merge agrees up to its float32 rounding
            assert row[key] == pytest.approx(by_merge[name][key], rel=1e-6), (name, key)
    for name, ref in delta.items():
        row = drows[name]
        assert row["view"] == "delta" and row["num_eigs"] == 8 and row["type"] == "LoraDelta"
        for key, value in ref.items():
            assert row[key] == pytest.approx(value, rel=1e-8), (name, key)
    # The two views rank the modules differently: they are different spectra, not a relabelling.
    assert [rows[n]["alpha"] for n in rows] != pytest.approx([drows[n]["alpha"] for n in rows])
    # Every module is balanced but the first one (exclude_first_last), in both views.
    assert [r["balanced"] for r in rows.values()] == [False] + [True] * 11
    assert [r["balanced"] for r in drows.values()] == [False] + [True] * 11
    # The CSV holds both views, told apart by its `view` column.
    from hf_tempbalance.analysis import read_analysis_csv

    csv_rows = read_analysis_csv(tmp_path / "rows.csv")
    assert [r["view"] for r in csv_rows] == ["effective"] * 12 + ["delta"] * 12
    assert [r["alpha"] for r in csv_rows[12:]] == pytest.approx([d["alpha"] for d in drows.values()])


def test_analyze_an_adapter_json_on_stdout_in_a_subprocess(saved):
    tmp, model = saved
    done = subprocess.run([sys.executable, "-m", "hf_tempbalance.cli", "analyze", str(tmp / "adapter"),
                           "--base", str(tmp / "base"), "--json", "-", "--layers", "layers\\.1\\."],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    data = json.loads(done.stdout)  # only JSON on stdout
    assert data["model"] == str(tmp / "adapter") and data["adapter"]["lora_alpha"] == 16
    effective, _, delta = expected_views(model)
    names = [n for n in effective if "layers.1." in n]
    assert [r["name"] for r in data["layers"]] == names == [r["name"] for r in data["delta"]["layers"]]
    for row in data["delta"]["layers"]:  # float32 eigensolver by default
        assert row["alpha"] == pytest.approx(delta[row["name"]]["alpha"], rel=1e-4)
    for row in data["layers"]:
        assert row["alpha"] == pytest.approx(effective[row["name"]]["alpha"], rel=1e-4)
    assert data["summary"]["num_layers"] == data["delta"]["summary"]["num_layers"] == 6
    assert data["delta"]["summary"]["view"] == "delta"


def _exit_2_one_line(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("hf-tempbalance")]
    assert len(lines) == 1 and lines[0].startswith("hf-tempbalance analyze: error: ")
    assert "Traceback" not in err
    return lines[0]


def test_an_adapter_folder_without_its_weights_exits_2(saved, tmp_path, capsys):
    tmp, _ = saved
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text((tmp / "adapter" / "adapter_config.json").read_text())
    line = _exit_2_one_line(["analyze", str(folder)], capsys)
    assert "adapter_model.safetensors" in line and str(folder) in line


def test_a_base_the_adapter_does_not_fit_exits_2_naming_base(saved, tmp_path, capsys):
    tmp, _ = saved
    llama(hidden=32).save_pretrained(tmp_path / "narrow")   # other shapes: PEFT raises
    llama(layers=1).save_pretrained(tmp_path / "shallow")   # a missing block: PEFT only warns
    for base in ("narrow", "shallow"):
        line = _exit_2_one_line(["analyze", str(tmp / "adapter"), "--base", str(tmp_path / base)],
                                capsys)
        assert "does not fit the base model" in line and "--base" in line, line
    assert "have no place" in line  # the shallow base: tensors PEFT could not place


def test_an_adapter_whose_named_base_is_not_here_exits_2_asking_for_base(saved, tmp_path, capsys,
                                                                          monkeypatch):
    tmp, _ = saved
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "adapter"
    folder.mkdir()
    config = json.loads((tmp / "adapter" / "adapter_config.json").read_text())
    for name in ("adapter_model.safetensors",):
        (folder / name).write_bytes((tmp / "adapter" / name).read_bytes())
    for named in ("no-such-org/no-such-model-17", None):
        (folder / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": named}))
        line = _exit_2_one_line(["analyze", str(folder)], capsys)
        assert "--base NAME_OR_PATH" in line, line
    assert main(["analyze", str(folder), "--base", str(tmp / "base"), "--no-progress"]) == 0


def test_base_is_refused_for_anything_but_an_adapter_folder(saved, capsys):
    tmp, _ = saved
    line = _exit_2_one_line(["analyze", str(tmp / "base"), "--base", str(tmp / "base")], capsys)
    assert "--base is for a PEFT adapter folder" in line


def test_adapter_plots_hold_both_views_of_each_module(saved, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    tmp, _ = saved
    out = tmp_path / "esd"
    assert main(["analyze", str(tmp / "adapter"), "--layers", r"layers\.1\.mlp\.up_proj",
                 "--plots", str(out), "--no-progress"]) == 0
    name = "base_model.model.model.layers.1.mlp.up_proj"
    assert sorted(p.name for p in out.glob("*.png")) == [f"{name}.delta.png", f"{name}.png"]
    assert "2 ESD plot(s) written" in capsys.readouterr().out
