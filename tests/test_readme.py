"""The documentation says what the code does.

README.md, docs/*.md and recipes/README.md: every Python block runs as printed (with small models
and data in place of ``model = ...`` and the like) and does what the text around it says; the
configuration table matches TempBalanceConfig; every relative link and anchor resolves; the
documented extras and public names exist. Shell blocks are not run here: every command they (and
inline code) show is run, or mapped to its smoke form or covering test, in
test_documented_commands.py.
"""

from __future__ import annotations

import ast
import dataclasses
import math
import os
import re
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from expected import numpy_hill
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hf_tempbalance import TempBalanceConfig
from hf_tempbalance.history import HISTORY_FILE, read_history

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "recipes" / "README.md"]
TEXT = {path: path.read_text(encoding="utf-8") for path in DOCS}
README = TEXT[ROOT / "README.md"]
CODE_BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", flags=re.S | re.M)
MARKED_BLOCK = re.compile(r"<!-- block:([\w-]+) -->\n```python\n(.*?)^```", flags=re.S | re.M)


def doc(name: str) -> str:
    return TEXT[ROOT / name]


def block(name: str) -> str:
    """The Python block marked ``<!-- block:name -->`` (exactly one in all the docs)."""
    found = [code for text in TEXT.values() for tag, code in MARKED_BLOCK.findall(text) if tag == name]
    assert len(found) == 1, f"{len(found)} blocks named {name!r}"
    return found[0]


def run_block(name: str, scope: dict, replace: dict[str, str] | None = None) -> dict:
    """Execute block ``name`` in ``scope`` after replacing each placeholder, which must be there."""
    code = block(name)
    for old, new in (replace or {}).items():
        assert old in code, f"block {name!r} no longer has {old!r}"
        code = code.replace(old, new)
    exec(compile(code, f"docs#{name}", "exec"), scope)  # noqa: S102
    return scope


def section(text: str, name: str) -> str:
    start = text.index(f"<!-- section:{name} -->")
    end = text.find("<!-- section:", start + 1)
    return text[start:end if end != -1 else None]


# ----------------------------------------------------------------------------- small models
class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(16, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                                  nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(torch.relu(self.stem(x))).mean(dim=(2, 3)))


class TrainerCNN(SmallCNN):
    """SmallCNN with the Trainer's calling convention (batch dict in, loss out)."""

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        logits = super().forward(pixel_values)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return {"loss": loss, "logits": logits}


def image_data(n: int) -> list[dict]:
    gen = torch.Generator().manual_seed(1)
    return [{"pixel_values": torch.randn(3, 8, 8, generator=gen), "labels": i % 10} for i in range(n)]


def trainer_callback(trainer):
    from hf_tempbalance import TempBalanceCallback

    return next(c for c in trainer.callback_handler.callbacks if isinstance(c, TempBalanceCallback))


# ----------------------------------------------------------------------------- README
def test_quickstart_loop_runs_as_printed(capsys):
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(32, 3, 8, 8), torch.randint(0, 10, (32,)))
    scope = run_block("quickstart", {"SmallCNN": SmallCNN, "DataLoader": DataLoader, "data": data},
                      {"model = ...": "model = SmallCNN()",
                       "loader = ...": "loader = DataLoader(data, batch_size=8)",
                       "epochs = 200": "epochs = 2"})

    tb, loader = scope["tb"], scope["loader"]
    # Once per epoch from step 0: epochs updates, the two middle convs balanced (stem and head are
    # the first and last candidates; the BatchNorms, named body.N, have no bn -> conv partner).
    assert tb.num_updates == 2 and tb.num_steps == 2 * len(loader)
    assert tb.plan.names == ["body.0", "body.3"]
    assert set(tb.multipliers) == {"body.0", "body.3"}
    assert sorted(tb.multipliers.values()) == pytest.approx([0.5, 1.5])  # two layers span [s1, s2]
    printed = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in printed] == ["0", "1"]
    state = scope["checkpoint"]["tempbalance"]
    assert state["num_updates"] == 2


def test_trainer_one_liner_balances_once_per_epoch(tmp_path):
    transformers = pytest.importorskip("transformers")
    args = transformers.TrainingArguments(
        str(tmp_path), num_train_epochs=2, per_device_train_batch_size=8, learning_rate=0.1,
        report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    scope = run_block("trainer-one-line", {"Trainer": transformers.Trainer, "model": TrainerCNN(),
                                           "args": args, "train_ds": image_data(32)})
    trainer = scope["trainer"]
    trainer.train()
    engine = trainer_callback(trainer).engine
    assert engine.plan.names == ["body.0", "body.3"]
    assert engine.num_updates == 2  # interval="epoch": the Trainer supplies the epoch length
    assert len(read_history(tmp_path / HISTORY_FILE)) == 2 * 2


def test_readme_lists_the_two_commands_and_stays_short():
    commands = [code for lang, code in CODE_BLOCK.findall(README) if lang == "bash"][0]
    assert "make demo" in commands and "make test" in commands
    assert len(README.splitlines()) <= 250


def test_documented_extras_exist():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras = set(pyproject["project"]["optional-dependencies"])
    line = re.search(r"\(extras: (.*?)\)", README, flags=re.S).group(1)
    assert set(re.findall(r"`(\w+)`", line)) == extras


# ----------------------------------------------------------------------------- docs/configuration.md
def config_table() -> dict[str, object]:
    """{field: default} from the configuration table (first column may hold two fields)."""
    rows = {}
    for line in section(doc("docs/configuration.md"), "config").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`"):
            continue
        default = re.match(r"`([^`]*)`", cells[1])
        assert default, f"config row without a `default`: {line}"
        for field in re.findall(r"`(\w+)`", cells[0]):
            rows[field] = ast.literal_eval(default.group(1))
    return rows


def test_config_table_lists_every_field_with_its_default():
    documented = config_table()
    fields = {f.name: f.default for f in dataclasses.fields(TempBalanceConfig)}
    assert sorted(documented) == sorted(fields)
    for name, default in fields.items():
        assert documented[name] == default, f"docs say {name}={documented[name]!r}, code {default!r}"


def test_config_snippet_makes_validated_copies_of_a_frozen_config():
    scope = run_block("config", {})
    cfg, lm, identity = scope["cfg"], scope["lm"], scope["identity"]
    assert (cfg.interval, cfg.s1, cfg.s2) == (100, 0.5, 1.5)
    assert (lm.interval, lm.s1, lm.s2) == (100, 1.0, 2.0)
    assert identity.s1 == identity.s2 == 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.s1 = 0.7  # the page says assignment raises
    with pytest.raises(ValueError, match="s1"):
        cfg.replace(s1=float("nan"))  # and copies are validated


def test_arguments_snippet_parses_the_flags_into_a_callback():
    pytest.importorskip("transformers")
    from hf_tempbalance import TempBalanceCallback, TempBalanceConfig

    scope = run_block("arguments", {})
    (callback,) = scope["callbacks"]
    assert isinstance(callback, TempBalanceCallback)
    assert callback.config == TempBalanceConfig(interval=100, s1=0.6, s2=1.4)
    assert scope["training_args"].output_dir == "out"


# ----------------------------------------------------------------------------- docs/concepts.md
def test_spectral_tools_snippet_gives_the_median_hill_alpha():
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    alpha = run_block("spectral-tools", {"model": model})["alpha"]
    weight = model.layer1[0].conv1.weight.detach().double()  # (64, 64, 3, 3): 9 slices pooled
    eigs = torch.cat([torch.linalg.svdvals(weight[:, :, i, j]) ** 2 for i in range(3) for j in range(3)])
    assert alpha == pytest.approx(numpy_hill(eigs.numpy()), rel=1e-4)


# ----------------------------------------------------------------------------- docs/trainer.md
def test_trainer_example_runs_with_sgd_momentum(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    scope = run_block("trainer", {"model": TrainerCNN(), "train": image_data(32)},
                      {"num_train_epochs=200": "num_train_epochs=2, report_to=[], disable_tqdm=True"})
    trainer = scope["trainer"]
    assert isinstance(trainer.args, transformers.TrainingArguments)
    optimizer = trainer.optimizer.optimizer  # inside Accelerate's wrapper: the one args.optim chose
    assert type(optimizer) is torch.optim.SGD
    assert {g["momentum"] for g in optimizer.param_groups} == {0.9}  # optim_args reached it
    assert {g["weight_decay"] for g in optimizer.param_groups} == {5e-4, 0.0}  # the Trainer's split
    engine = trainer_callback(trainer).engine
    assert engine.num_updates == 2
    assert len(read_history(tmp_path / "out" / HISTORY_FILE)) == 2 * len(engine.plan.names)


# ----------------------------------------------------------------------------- docs/accelerate.md
class Regressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                                 nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(loss=nn.functional.mse_loss(self.net(x).squeeze(-1), y))


def test_accelerate_loop_runs_as_printed(tmp_path, monkeypatch, fresh_accelerate):
    pytest.importorskip("accelerate")
    monkeypatch.chdir(tmp_path)
    gen = torch.Generator().manual_seed(2)
    data = [{"x": torch.randn(8, generator=gen), "y": torch.randn((), generator=gen)} for _ in range(32)]
    scope = run_block("accelerate", {"model": Regressor(), "schedule": lambda step: 1.0 / (1 + step),
                                     "loader": DataLoader(data, batch_size=4)},
                      {"interval=100": "interval=2"})
    tb = scope["tb"]
    assert tb.plan.names == ["net.2", "net.4"]
    assert tb.num_steps == 8 and tb.num_updates == 4  # 8 batches, an update every 2 steps
    rows = read_history(tmp_path / "run" / HISTORY_FILE)  # the wrapper's output_dir="run"
    assert [(r["step"], r["layer"]) for r in rows] == [
        (step, layer) for step in (0, 2, 4, 6) for layer in ("net.2", "net.4")]
    assert all(r["base_lr"] == pytest.approx(0.1 / (1 + r["step"])) for r in rows)
    # between steps the prepared optimizer holds the scheduler's own LR
    lrs = [g["lr"] for g in scope["optimizer"].param_groups]
    assert lrs == pytest.approx([0.1 / 9] * len(lrs))


# ----------------------------------------------------------------------------- docs/ultralytics.md
def yolo_dataset(root: Path) -> Path:
    """4 train and 2 val images of 64 px with one drawn box each, in YOLO's own layout."""
    from PIL import Image, ImageDraw

    for split, n in (("train", 4), ("val", 2)):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(n):
            image = Image.new("RGB", (64, 64), (20, 20, 20))
            x0, y0 = 8 + 6 * i, 10 + 4 * i
            ImageDraw.Draw(image).rectangle((x0, y0, x0 + 24, y0 + 20), fill=(230, 60, 40))
            image.save(root / "images" / split / f"{i}.jpg")
            cx, cy = (x0 + 12.5) / 64, (y0 + 10.5) / 64
            (root / "labels" / split / f"{i}.txt").write_text(f"0 {cx:.4f} {cy:.4f} {25 / 64:.4f} {21 / 64:.4f}\n")
    data = root / "data.yaml"
    data.write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n  0: box\n")
    return data


@pytest.mark.slow
def test_ultralytics_snippet_trains_with_both_hooks(tmp_path, monkeypatch):
    # Ultralytics reads these once, at import (the same values as tests/test_yolo_voc.py).
    monkeypatch.setenv("YOLO_CONFIG_DIR", os.environ.get(
        "YOLO_CONFIG_DIR", str(Path(tempfile.gettempdir()) / "hf_tempbalance_yolo_cfg")))
    pytest.importorskip("ultralytics")
    data = yolo_dataset(tmp_path / "data")
    small = (f"imgsz=64, device='cpu', workers=0, amp=False, plots=False, nbs=2, seed=0, "
             f"project='{tmp_path}', exist_ok=True, verbose=False")
    scope = run_block("ultralytics", {}, {
        '"yolov8n.pt"': '"yolov8n.yaml"',  # no weights offline: the same network from scratch
        'data="data.yaml", epochs=200, batch=64': f'data="{data}", epochs=1, batch=2',
        "cos_lr=True)": f"cos_lr=True, name='with_config', {small})",
        "model.train(...)": (f"model.train(data='{data}', epochs=1, batch=2, optimizer='Adam', "
                             f"lr0=1e-5, name='hook', {small})")})

    # The trainer class: one update (epoch 1) over the balanced layers, logged to the run's history.
    rows = read_history(tmp_path / "with_config" / HISTORY_FILE)
    assert rows and {r["epoch"] for r in rows} == {1}
    assert min(r["multiplier"] for r in rows) == pytest.approx(0.6)
    assert max(r["multiplier"] for r in rows) == pytest.approx(1.4)
    # The callbacks on the model: the hook's engine did the same.
    tb = scope["hook"].tb
    assert tb.num_updates == 1 and len(read_history(tmp_path / "hook" / HISTORY_FILE)) == len(tb.plan.names)
    assert (min(tb.multipliers.values()), max(tb.multipliers.values())) == pytest.approx((0.6, 1.4))


# ----------------------------------------------------------------------------- docs/diagnostics.md
def test_diagnostics_snippet_runs_as_printed(tmp_path, monkeypatch, capsys):
    timm = pytest.importorskip("timm")
    pytest.importorskip("pandas")
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    scope = run_block("diagnostics", {"model": model})

    report, df = scope["report"], scope["df"]
    assert "layer3.1.conv2" in list(df["name"])
    assert (tmp_path / "layers.csv").is_file() and (tmp_path / "esd.png").stat().st_size > 0
    assert capsys.readouterr().out.strip()
    # The fit the page promises: TempBalanceConfig()'s, i.e. the median-xmin Hill alpha.
    weight = model.layer3[1].conv2.weight.detach().double()  # (out, in, 3, 3): 9 out x in slices
    eigs = torch.cat([torch.linalg.svdvals(weight[:, :, i, j]) ** 2 for i in range(3) for j in range(3)])
    expected = numpy_hill(eigs.numpy())
    assert report["layer3.1.conv2"].alpha == pytest.approx(expected, rel=1e-4)
    # ... and its spec_norm is the plain weight's λ_max (training's conv metric scales by conv_norm).
    assert report["layer3.1.conv2"].spectral_norm == pytest.approx(eigs.max().item(), rel=1e-4)


# ----------------------------------------------------------------------------- recipes/README.md
def test_ptb_snippet_balances_the_four_linears_of_each_block():
    pytest.importorskip("transformers")
    if str(ROOT / "recipes") not in sys.path:
        sys.path.insert(0, str(ROOT / "recipes"))
    from models.tensorized_transformer import (
        TensorizedTransformerConfig,
        TensorizedTransformerForCausalLM,
    )

    torch.manual_seed(0)
    model = TensorizedTransformerForCausalLM(TensorizedTransformerConfig())  # the paper's model
    scope = run_block("ptb", {"model": model})
    tb, optimizer = scope["tb"], scope["optimizer"]
    blocks = [f"model.layers.{i}" for i in range(3)]
    assert tb.plan.names == [f"{b}.{m}" for b in blocks for m in ("attn.qkv", "attn.o_proj", "ffn.fc1", "ffn.fc2")]
    # each LayerNorm follows the Linear before it; the position projection stays at the base LR
    label = {id(p): g.get("tempbalance_layer") for g in optimizer.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    for b in blocks:
        assert label[id(params[f"{b}.attn.norm.weight"])] == f"{b}.attn.o_proj"
        assert label[id(params[f"{b}.ffn.norm.weight"])] == f"{b}.ffn.fc2"
        assert label[id(params[f"{b}.attn.r_net.weight"])] is None
    ids = torch.randint(0, model.config.vocab_size, (2, 32))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    assert tb.num_updates == 1 and all(1.0 <= m <= 2.0 for m in tb.multipliers.values())


# ----------------------------------------------------------------------------- every doc
def test_every_python_block_is_run_by_a_test():
    for path, text in TEXT.items():
        python_blocks = [code for lang, code in CODE_BLOCK.findall(text) if lang == "python"]
        marked = MARKED_BLOCK.findall(text)
        assert len(marked) == len(python_blocks), f"{path.name}: a python block without <!-- block:NAME -->"
    names = [tag for text in TEXT.values() for tag, _ in MARKED_BLOCK.findall(text)]
    assert sorted(names) == sorted(BLOCK_TESTS)


def github_anchor(heading: str) -> str:
    """GitHub's id for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    text = CODE_BLOCK.sub("", text)  # '# comments' in code are not headings
    return {github_anchor(h) for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


def relative_links(text: str) -> list[str]:
    prose = re.sub(r"`[^`\n]*`", "", CODE_BLOCK.sub("", text))
    return [t for t in re.findall(r"\]\(([^)\s]+)\)", prose) if not re.match(r"[a-z]+:", t)]


def test_relative_links_and_anchors_resolve():
    checked = 0
    for path, text in TEXT.items():
        for target in relative_links(text):
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            assert dest.exists(), f"{path.relative_to(ROOT)}: link to missing {target}"
            if anchor:
                assert dest.suffix == ".md", f"{path.relative_to(ROOT)}: anchor into {target}"
                assert anchor in anchors(dest.read_text(encoding="utf-8")), \
                    f"{path.relative_to(ROOT)}: no heading for {target}"
            checked += 1
    assert checked > 50


def test_readme_links_every_page():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in relative_links(README)}
    pages = {p.resolve() for p in DOCS if p.name != "README.md" or p.parent.name == "recipes"}
    assert pages | {(ROOT / "CHANGELOG.md").resolve()} <= linked


def test_api_page_lists_every_public_name():
    import importlib

    page = doc("docs/api.md")
    rows = {}
    for line in page.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        module = re.fullmatch(r"`(hf_tempbalance[\w.]*)`.*", cells[0])
        if module:
            rows[module.group(1)] = cells[1]
    assert len(rows) == 13
    for name, listed in rows.items():
        # the top level also re-exports the integrations' names, listed in their own rows
        listed = page if name == "hf_tempbalance" else listed
        public = importlib.import_module(name).__all__
        missing = [n for n in public if not re.search(rf"`{n}[`(]", listed)]
        assert not missing, f"{name}: {missing} not on docs/api.md"


def test_timm_layer_decay_and_tempbalance_stack():
    """Each parameter's real LR, measured from a plain-SGD update (p_before - p_after) / grad, is
    the cosine schedule x timm's lr_scale of its group x the multiplier of its layer."""
    pytest.importorskip("timm")
    scope = run_block("timm-layer-decay", {}, {
        "interval=100": "interval=1, min_eigs=10, dtype='float64'",
        "momentum=0.9, weight_decay=5e-4": "momentum=0.0, weight_decay=0.0",
        "t_initial=10_000": "t_initial=10"})
    model, tb, optimizer, scheduler = (scope[k] for k in ("model", "tb", "optimizer", "scheduler"))
    model.double()
    names = {id(p): n for n, p in model.named_parameters()}
    scale = {names[id(p)]: g["lr_scale"] for g in optimizer.param_groups for p in g["params"]}
    assert len(set(scale.values())) > 3  # several depths of layer decay
    owner = tb.plan.owner_of()
    gen = torch.Generator().manual_seed(0)
    factors_seen = set()
    for t in range(3):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        optimizer.step()  # interval=1: the multipliers are recomputed first, at every step
        schedule = 0.5 * 0.1 * (1 + math.cos(math.pi * t / 10))  # timm's cosine, lr_min 0
        for name, p in model.named_parameters():
            used = ((before[name] - p.detach()) / p.grad).flatten()
            factor = tb.multipliers[owner[name]] if name in owner else 1.0
            factors_seen.add(round(factor, 6))
            expected = schedule * scale[name] * factor
            torch.testing.assert_close(used, torch.full_like(used, expected), rtol=1e-9, atol=0,
                                       msg=f"step {t}, {name}")
        scheduler.step_update(t + 1)
    assert tb.num_updates == 3 and min(factors_seen) == pytest.approx(0.5)


BLOCK_TESTS = {
    "quickstart": test_quickstart_loop_runs_as_printed,
    "trainer-one-line": test_trainer_one_liner_balances_once_per_epoch,
    "config": test_config_snippet_makes_validated_copies_of_a_frozen_config,
    "arguments": test_arguments_snippet_parses_the_flags_into_a_callback,
    "spectral-tools": test_spectral_tools_snippet_gives_the_median_hill_alpha,
    "trainer": test_trainer_example_runs_with_sgd_momentum,
    "accelerate": test_accelerate_loop_runs_as_printed,
    "ultralytics": test_ultralytics_snippet_trains_with_both_hooks,
    "diagnostics": test_diagnostics_snippet_runs_as_printed,
    "ptb": test_ptb_snippet_balances_the_four_linears_of_each_block,
    "timm-layer-decay": test_timm_layer_decay_and_tempbalance_stack,
}
