"""recipes/run_records.py: how a command reads a run's record against its own settings."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
if str(RECIPES) not in sys.path:
    sys.path.insert(0, str(RECIPES))

from run_records import setting_differences, write_whole  # noqa: E402


def test_differences_name_each_setting_with_both_values() -> None:
    recorded = {"lr": 0.1, "seed": 43, "optim": "sgd", "result_only": 93.1}
    wanted = {"lr": 0.1 * (1 + 1e-12), "seed": 37, "optim": "sgd", "new": 0.9}
    # the float read back from JSON agrees; a setting the record lacks shows as (none); keys of
    # the record that the command does not set are not settings
    assert setting_differences(recorded, wanted) == ["seed 43 there, 37 here",
                                                     "new (none) there, 0.9 here"]
    # ... unless it was added later at the value every earlier run had
    assert setting_differences(recorded, wanted, implicit={"new": 0.9}) == ["seed 43 there, 37 here"]
    assert setting_differences(recorded, wanted, keys=["optim", "result_only"]) == [
        "result_only 93.1 there, (none) here"]
    assert setting_differences(recorded, {"lr": 0.1000001}) == ["lr 0.1 there, 0.1000001 here"]


def test_a_file_is_written_whole(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "results.json"
    write_whole(path, '{"a": 1}')
    real = Path.write_text

    def torn(self: Path, text: str, *a, **kw) -> int:
        real(self, text[:3], *a, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", torn)
    with pytest.raises(KeyboardInterrupt):
        write_whole(path, '{"a": 2}')
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"a": 1}


def test_an_image_run_recorded_before_the_optimizer_settings_is_still_reused(tmp_path: Path) -> None:
    """A results.json made before Adam's betas and the loader workers were recorded holds a run
    that had the Trainer's defaults: reused at them, refused at others."""
    import image_classification as ic

    settings = {"lr": 0.1, "seed": 43, "adam_beta1": 0.9, "adam_beta2": 0.999,
                "adam_epsilon": 1e-8, "dataloader_num_workers": 0}
    old = {k: v for k, v in settings.items() if k in ("lr", "seed")} | {"test_accuracy": 0.9}
    (tmp_path / "results.json").write_text(json.dumps(old))
    assert ic.finished_run(str(tmp_path), settings, rerun=False) == old
    with pytest.raises(ic.UsageError, match=r"adam_beta2 0.999 there, 0.95 here"):
        ic.finished_run(str(tmp_path), settings | {"adam_beta2": 0.95}, rerun=False)
    assert ic.finished_run(str(tmp_path), settings | {"adam_beta2": 0.95}, rerun=True) is None
