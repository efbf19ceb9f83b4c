"""The README says what the code does: its configuration table matches TempBalanceConfig, and
its quick-start loop runs as printed (with a small model and loader in place of the ``...``)."""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import pytest
import torch
from expected import numpy_hill
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hf_tempbalance import TempBalanceConfig

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def section(name: str) -> str:
    start = README.index(f"<!-- section:{name} -->")
    end = README.find("<!-- section:", start + 1)
    return README[start:end if end != -1 else None]


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def config_table() -> dict[str, object]:
    """{field: default} from the README's configuration table (first column may hold two fields)."""
    rows = {}
    for line in section("config").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`"):
            continue
        default = re.match(r"`([^`]*)`", cells[1])
        assert default, f"README config row without a `default`: {line}"
        for field in re.findall(r"`(\w+)`", cells[0]):
            rows[field] = ast.literal_eval(default.group(1))
    return rows


def test_config_table_lists_every_field_with_its_default():
    documented = config_table()
    fields = {f.name: f.default for f in dataclasses.fields(TempBalanceConfig)}
    assert sorted(documented) == sorted(fields)
    for name, default in fields.items():
        assert documented[name] == default, f"README says {name}={documented[name]!r}, code {default!r}"


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(16, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                                  nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(torch.relu(self.stem(x))).mean(dim=(2, 3)))


def test_quickstart_loop_runs_as_printed(capsys):
    code = python_blocks(section("quickstart"))[0]
    for placeholder in ("model = ...", "loader = ...", "epochs = 200"):
        assert placeholder in code, f"quick start no longer has {placeholder!r}"
    code = (code.replace("model = ...", "model = SmallCNN()")
                .replace("loader = ...", "loader = DataLoader(data, batch_size=8)")
                .replace("epochs = 200", "epochs = 2"))
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(32, 3, 8, 8), torch.randint(0, 10, (32,)))
    scope = {"SmallCNN": SmallCNN, "DataLoader": DataLoader, "data": data}
    exec(compile(code, "README.md#quick-start", "exec"), scope)  # noqa: S102

    tb, loader = scope["tb"], scope["loader"]
    # Once per epoch from step 0: epochs updates, the two middle convs balanced (stem and head are
    # the first and last candidates), each BatchNorm following the conv before it.
    assert tb.num_updates == 2 and tb.num_steps == 2 * len(loader)
    assert tb.plan.names == ["body.0", "body.3"]
    assert set(tb.multipliers) == {"body.0", "body.3"}
    assert sorted(tb.multipliers.values()) == pytest.approx([0.5, 1.5])  # two layers span [s1, s2]
    printed = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in printed] == ["0", "1"]
    state = scope["checkpoint"]["tempbalance"]
    assert state["num_updates"] == 2


def test_diagnostics_snippet_runs_as_printed(tmp_path, monkeypatch, capsys):
    timm = pytest.importorskip("timm")
    pytest.importorskip("pandas")
    pytest.importorskip("matplotlib")
    code = python_blocks(section("diagnostics"))[0]
    monkeypatch.chdir(tmp_path)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    scope = {"model": model}
    exec(compile(code, "README.md#diagnostics", "exec"), scope)  # noqa: S102

    report, df = scope["report"], scope["df"]
    assert "layer3.1.conv2" in list(df["name"])
    assert (tmp_path / "layers.csv").is_file() and (tmp_path / "esd.png").stat().st_size > 0
    assert capsys.readouterr().out.strip()
    # The fit the README promises: TempBalanceConfig()'s, i.e. the median-xmin Hill alpha.
    weight = model.layer3[1].conv2.weight.detach().double()  # (out, in, 3, 3): 9 out x in slices
    eigs = torch.cat([torch.linalg.svdvals(weight[:, :, i, j]) ** 2 for i in range(3) for j in range(3)])
    expected = numpy_hill(eigs.numpy())
    assert report["layer3.1.conv2"].alpha == pytest.approx(expected, rel=1e-4)


def github_anchor(heading: str) -> str:
    """GitHub's id for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_internal_links_point_at_headings():
    text = re.sub(r"```.*?```", "", README, flags=re.S)  # '# comments' in code are not headings
    anchors = {github_anchor(h) for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}
    links = re.findall(r"\]\(#([^)]+)\)", README)
    assert len(links) >= 11
    assert sorted(set(links) - anchors) == []


def test_documented_extras_exist():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    extras = set(pyproject["project"]["optional-dependencies"])
    line = re.search(r"\(extras: (.*?)\)", README, flags=re.S).group(1)
    assert set(re.findall(r"`(\w+)`", line)) == extras
