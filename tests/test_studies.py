"""Issue 19's long studies (recipes/studies/): statistics, and a smoke run of each study command.

The smoke runs train tiny versions of the real commands (a few hundred fake Fashion-MNIST images /
a few LM steps) through the real grid: parallel workers, committed results, reuse, resume after a
killed worker, tables checked against statistics computed here independently (scipy's paired t-test).
"""

from __future__ import annotations

import gzip
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
STUDIES = ROOT / "recipes" / "studies"
sys.path[:0] = [str(STUDIES), str(STUDIES.parent)]

import seed_stats  # noqa: E402
import study_tools as st  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
       "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "WANDB_DISABLED": "true"}


# ------------------------------------------------------------------------------------ statistics
def test_paired_differences_match_scipy_paired_t_test() -> None:
    a = {43: 90.1, 37: 89.7, 13: 90.4, 51: 90.0}
    b = {43: 90.5, 37: 89.6, 13: 91.0, 51: 90.3, 71: 99.0}  # seed 71 has no partner: left out
    pair = st.paired_differences(a, b)
    seeds = [43, 37, 13, 51]
    diffs = [b[s] - a[s] for s in seeds]
    assert pair["seeds"] == seeds and pair["differences"] == pytest.approx(diffs)
    assert pair["mean"] == pytest.approx(np.mean(diffs))
    assert pair["std"] == pytest.approx(np.std(diffs, ddof=1))
    ci = stats.ttest_rel([b[s] for s in seeds], [a[s] for s in seeds]).confidence_interval(0.95)
    assert pair["ci"] == pytest.approx([ci.low, ci.high])
    # by hand: differences 1, 2, 3 -> 2 ± t(0.975, 2) · 1 / sqrt(3), t = 4.302653
    hand = st.paired_differences({1: 0.0, 2: 0.0, 3: 0.0}, {1: 1.0, 2: 2.0, 3: 3.0})
    assert hand["ci"] == pytest.approx([2 - 4.302653 / math.sqrt(3), 2 + 4.302653 / math.sqrt(3)])
    one = st.paired_differences({1: 1.0}, {1: 3.0})
    assert (one["n"], one["mean"], one["ci"]) == (1, 2.0, None)


def test_mean_std_is_numpys_sample_std_and_one_seed_prints_no_spread() -> None:
    values = [93.38, 93.51, 93.25]
    mean, std = seed_stats.mean_std(values)
    assert mean == pytest.approx(np.mean(values)) and std == pytest.approx(np.std(values, ddof=1))
    assert seed_stats.format_mean_std(mean, std) == f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}"
    assert seed_stats.mean_std([93.4]) == (93.4, None)  # no spread to estimate, as in a pair of one
    assert seed_stats.format_mean_std(*seed_stats.mean_std([93.4])) == "93.40 (1 seed)"
    with pytest.raises(ValueError, match="at least one value"):
        seed_stats.mean_std([])


def test_verdict_is_no_stronger_than_the_interval() -> None:
    def pair(low: float, high: float) -> dict:
        return {"n": 3, "mean": (low + high) / 2, "ci": [low, high]}

    text = st.verdict(pair(0.1, 0.5), what="x", unit="pp", higher_is_better=True, finished=18,
                      planned=18)
    assert "TempBalance is better" in text and "PARTIAL" not in text.upper()
    text = st.verdict(pair(0.1, 0.5), what="x", unit="PPL", higher_is_better=False, finished=2,
                      planned=6)
    assert "TempBalance is worse" in text and "partial: 2 of 6 runs" in text
    text = st.verdict(pair(-0.2, 0.5), what="x", unit="pp", higher_is_better=True, finished=18,
                      planned=18)
    assert "no difference detected" in text and "better" not in text and "worse" not in text
    text = st.verdict(pair(0.1, 0.5), what="x", unit="PPL", higher_is_better=False, finished=6,
                      planned=6, against="cal @ 0.00019")  # a control: named, not "baseline"
    assert text.startswith("x: TempBalance - cal @ 0.00019 = +0.30 PPL")
    assert "TempBalance is worse than cal @ 0.00019;" in text and "this setting" not in text
    assert "not yet measured" in st.verdict({"n": 0}, what="x", unit="pp", higher_is_better=True,
                                            finished=0, planned=18)


def test_mean_multiplier_holds_each_update_until_the_next() -> None:
    rows = [{"step": 1, "layer": "a", "multiplier": 0.5}, {"step": 1, "layer": "b", "multiplier": 1.5},
            {"step": 3, "layer": "a", "multiplier": 0.6}, {"step": 3, "layer": "b", "multiplier": 0.8}]
    # steps 0..4: 1 (before any update), 1.0, 1.0, 0.7, 0.7
    weights = [5.0, 4.0, 3.0, 2.0, 1.0]
    out = st.mean_multiplier(rows, 5, base_lr=lambda t: weights[t])
    assert out["mean"] == pytest.approx((1 + 1 + 1 + 0.7 + 0.7) / 5)
    assert out["lr_weighted"] == pytest.approx((5 + 4 + 3 + 0.7 * 2 + 0.7 * 1) / 15)
    assert out["updates"] == 2
    assert st.mean_multiplier([], 5) is None
    cos = st.cosine_lr(4)
    assert [cos(t) for t in range(5)] == pytest.approx([1, (1 + math.sqrt(0.5)) / 2, 0.5,
                                                        (1 - math.sqrt(0.5)) / 2, 0])


def test_last_checkpoint_skips_incomplete_folders(tmp_path: Path) -> None:
    assert st.last_checkpoint(tmp_path / "missing") == (None, 0)
    for step, files in ((5, ["trainer_state.json"]), (10, ["random_states_0.pkl"]), (15, [])):
        (tmp_path / f"checkpoint-{step}").mkdir()
        for name in files:
            (tmp_path / f"checkpoint-{step}" / name).write_text("{}")
    (tmp_path / "checkpoint-20").write_text("not a folder")
    assert st.last_checkpoint(tmp_path) == (tmp_path / "checkpoint-10", 10)


def test_a_checkpoint_that_vanishes_while_read_is_left_out_of_the_snapshot(tmp_path: Path) -> None:
    """Reports are written while workers train: a run whose checkpoint is rotated away between
    finding and reading it is left out; finished runs and runs without a checkpoint too."""
    runs = [st.Run(key=k, settings={"k": k}, command=["x"], total_steps=30) for k in "abcd"]
    for run, step in ((runs[0], 10), (runs[1], 20), (runs[2], 10)):
        checkpoint = run.checkpoint_dir(tmp_path) / f"checkpoint-{step}"
        checkpoint.mkdir(parents=True)
        (checkpoint / "trainer_state.json").write_text(json.dumps({"run": run.key}))

    def read(checkpoint: Path) -> dict:
        if checkpoint.parent.name.startswith("b-"):  # its run rotates it away just now
            (checkpoint / "trainer_state.json").unlink()
            checkpoint.rmdir()
        return json.loads((checkpoint / "trainer_state.json").read_text())

    got = [(run.key, step, state) for run, step, state in
           st.checkpoint_snapshots(runs, tmp_path, {"c"}, read)]
    assert got == [("a", 10, {"run": "a"})]


def test_remaining_time_counts_only_up_to_each_runs_last_checkpoint(tmp_path: Path) -> None:
    """Two workers 250 steps in at their checkpoints (900 s and 950 s after they started), a third
    run queued, 1500 s into the sitting: the rate is 500 steps over 1850 worker-seconds, not over
    2 x 1500 (progress between checkpoints is unseen, not absent)."""
    t0 = 1_000_000.0
    runs = [st.Run(key=k, settings={"k": k}, command=["x"], total_steps=3000) for k in "abc"]
    for run, at in ((runs[0], t0 + 900), (runs[1], t0 + 950)):
        checkpoint = run.checkpoint_dir(tmp_path) / "checkpoint-250"
        checkpoint.mkdir(parents=True)
        (checkpoint / "random_states_0.pkl").write_bytes(b"")
        os.utime(checkpoint, (at, at))
    active = {r.key: (r, None, None) for r in runs[:2]}
    total = {r.key: 3000 for r in runs}
    line = st._progress(runs, {}, [runs[2]], active, total, dict.fromkeys(total, 0),
                        dict.fromkeys("ab", t0), {}, tmp_path, workers=2, now=t0 + 1500)
    rate = 500 / 1850  # steps per second of one worker
    a_left, b_left = 2750 - rate * 600, 2750 - rate * 550
    # c starts on a's worker (a ends first), then runs alone while b's worker is idle
    assert a_left < b_left < a_left + 3000
    assert f"about {st.format_duration((a_left + 3000) / rate)} left" in line
    assert f"({rate * 3600:.0f} steps/h per worker)" in line and "a 250/3000" in line
    before = st._progress(runs, {}, [runs[2]], active, total, dict.fromkeys(total, 0),
                          dict.fromkeys("ab", t0), {}, tmp_path / "none", workers=2, now=t0 + 60)
    assert "remaining time known after the first checkpoint" in before
    # run b resumed from its checkpoint-250 of an earlier sitting (written long before t0): it has
    # made no measured progress, and the steps it made since its start this sitting count from t0
    os.utime(runs[1].checkpoint_dir(tmp_path) / "checkpoint-250", (t0 - 3600, t0 - 3600))
    resumed = st._progress(runs, {}, [runs[2]], active, total, {"a": 0, "b": 250, "c": 0},
                           dict.fromkeys("ab", t0), {}, tmp_path, workers=2, now=t0 + 1500)
    rate = 250 / 900
    a_left, b_left = 2750 - rate * 600, 2750 - rate * 1500
    assert b_left < a_left < b_left + 3000  # c starts on b's worker
    assert f"about {st.format_duration((b_left + 3000) / rate)} left" in resumed
    # queued runs take the first worker to come free, in order: 10+30, then 40+30, then 50+5
    assert st._grid_steps_left([10, 50], [30, 30, 5], workers=2) == 70
    assert st._grid_steps_left([], [30, 20], workers=3) == 30  # a pool larger than the grid


# ------------------------------------------------------------------------------------ reuse
def test_a_setting_at_its_implicit_value_is_left_out_and_any_other_value_recorded() -> None:
    settings = {"lr": 0.1, "device": "cpu", "loader_workers": 0}
    implicit = {"device": "cpu", "loader_workers": 0}
    assert st.recorded_settings(settings, implicit) == {"lr": 0.1}
    gpu = st.recorded_settings({**settings, "device": "cuda", "loader_workers": 6}, implicit)
    assert gpu == {"lr": 0.1, "device": "cuda", "loader_workers": 6}
    assert st.settings_hash(gpu) != st.settings_hash({"lr": 0.1})


@pytest.mark.parametrize("study", ["fashion_mnist_long", "ptb_lm_long", "lora_finetune"])
def test_the_default_command_reuses_every_committed_run(study: str) -> None:
    """A setting added to a study must not orphan the runs committed before it: the default
    command finds every one of them (and so their checkpoint folders, by the same settings)."""
    import importlib

    module = importlib.import_module(study)
    args = module.StudyArguments()
    results = STUDIES / "results" / study
    committed = {path.stem for path in (results / "runs").glob("*.json")}
    reused = {run.key for run in module.build_runs(args) if st.load_finished(run, results)}
    assert committed and reused == committed


def test_a_results_folder_of_other_settings_is_refused(tmp_path: Path) -> None:
    run = st.Run(key="tb_seed43", settings={"method": "tb", "seed": 43, "steps": (3000, "cosine")},
                 command=["x"], total_steps=3000)
    st.check_results_dir([run], tmp_path)  # nothing there yet
    path = run.result_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"study_settings": {"method": "tb", "seed": 43,
                                                   "steps": [3000, "cosine"]}}))
    st.check_results_dir([run], tmp_path)  # the same settings, as JSON holds them: reused
    assert st.load_finished(run, tmp_path) is not None
    other = st.Run(key="tb_seed43", settings={"method": "tb", "seed": 43, "steps": [100, "cosine"]},
                   command=["x"], total_steps=100)
    with pytest.raises(ValueError, match=r"tb_seed43 made with other settings \(steps \[3000, "
                                         r"'cosine'\] there, \[100, 'cosine'\] here\).*--results_dir"):
        st.check_results_dir([other], tmp_path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match=r"unreadable JSON\); remove it"):
        st.check_results_dir([run], tmp_path)
    path.unlink()
    # the folder's summary records the study's arguments: the grid's pace may differ, and an
    # argument the summary predates is not compared
    (tmp_path / "summary.json").write_text(json.dumps(
        {"study": {"workers": 2, "nice": 10, "seeds": [43, 37], "epochs": 30}}))
    st.check_results_dir([], tmp_path, {"workers": 1, "nice": 0, "seeds": [43, 37], "epochs": 30,
                                        "device": "cuda"})
    with pytest.raises(ValueError, match=r"other arguments \(seeds \[43, 37\] there, \[43\] here; "
                                         r"a study may add seeds, LRs or methods, not drop them\)"):
        st.check_results_dir([], tmp_path, {"workers": 2, "seeds": [43], "epochs": 30})
    st.check_results_dir([], tmp_path, {"seeds": [43, 37, 13], "epochs": 30})  # one more seed
    with pytest.raises(ValueError, match=r"epochs 30 there, 40 here"):
        st.check_results_dir([], tmp_path, {"seeds": [43, 37, 13], "epochs": 40})


def test_a_study_prepares_only_when_a_run_is_left_to_train(tmp_path: Path) -> None:
    """run_study: the results folder is checked before ``prepare`` makes anything; ``prepare``
    runs once when a run is left to train (never for --report_only or a finished grid), and the
    runs are built again after it (what it made may shape them)."""
    made: list[str] = []
    reports: list[tuple[list[str], list[int]]] = []
    write = ("import json, pathlib, sys; out = pathlib.Path(sys.argv[sys.argv.index('--output_dir') "
             "+ 1]); (out / 'results.json').write_text(json.dumps({'score': len(out.name)}))")

    def build(args: st.GridArguments) -> list[st.Run]:
        steps = 7 if made else 3  # e.g. step counts from a corpus prepare made
        return [st.Run(key=f"r{i}", settings={"i": i}, command=[sys.executable, "-c", write],
                       total_steps=steps) for i in (1, 2)]

    def report(results: list[dict], runs: list[st.Run]) -> dict:
        reports.append(([r["key"] for r in results], [run.total_steps for run in runs]))
        return st.save_report(args, ["# study"], {"study": args.study_record()})

    def study(**kw) -> None:
        st.run_study(args, build_runs=build, report=report, prepare=lambda committed: made.append("corpus"),
                     collect=lambda run, folder: json.loads((folder / "results.json").read_text()),
                     **kw)

    args = st.GridArguments(results_dir=str(tmp_path / "results"), nice=0, eta_every=1.0,
                            checkpoint_dir=str(tmp_path / "ckpt"))
    study()
    assert made == ["corpus"]
    assert reports[0] == ([], [7, 7]) and reports[-1] == (["r1", "r2"], [7, 7])
    saved = json.loads((tmp_path / "results" / "runs" / "r1.json").read_text())
    assert saved["score"] == len(f"r1-{st.settings_hash({'i': 1})}")
    study()  # every run finished: nothing to prepare
    assert made == ["corpus"] and reports[-1] == (["r1", "r2"], [7, 7])
    (tmp_path / "results" / "runs" / "r2.json").unlink()
    args.report_only = True  # a run is missing, but nothing trains
    study()
    assert made == ["corpus"] and reports[-1] == (["r1"], [7, 7])
    args.report_only, args.threads = False, 2  # a results folder of another study: refused first
    with pytest.raises(ValueError, match="threads 1 there, 2 here"):
        study()
    assert made == ["corpus"] and not (tmp_path / "results" / "runs" / "r2.json").exists()


def test_a_report_killed_while_written_leaves_the_previous_one(tmp_path: Path, monkeypatch) -> None:
    """A torn summary.json would switch off the guard against a study of other arguments."""
    args = st.GridArguments(results_dir=str(tmp_path))
    st.save_report(args, ["# before"], {"study": {"seeds": [43, 37, 13]}})
    before = {name: (tmp_path / name).read_text() for name in ("report.md", "summary.json")}
    real = Path.write_text

    for name in ("report.md", "summary.json"):  # killed while writing one, then the other
        def torn(self: Path, text: str, *a, name=name, **kw) -> int:
            if not self.name.startswith(name):
                return real(self, text, *a, **kw)
            real(self, text[: len(text) // 2], *a, **kw)
            raise KeyboardInterrupt("killed while writing")

        monkeypatch.setattr(Path, "write_text", torn)
        with pytest.raises(KeyboardInterrupt):
            st.save_report(args, ["# after"], {"study": {"seeds": [43]}})
        monkeypatch.undo()
        assert (tmp_path / name).read_text() == before[name]
    assert json.loads((tmp_path / "summary.json").read_text())["study"]["seeds"] == [43, 37, 13]


def test_a_run_starts_fresh_with_its_fresh_flags_and_resumes_without_them(tmp_path: Path) -> None:
    """run_grid: a run with a checkpoint resumes from it; one without gets ``fresh_flags`` (what a
    run killed before its first checkpoint left in its own folder is to be replaced)."""
    write = ("import json, pathlib, sys; out = pathlib.Path(sys.argv[sys.argv.index('--output_dir') "
             "+ 1]); (out / 'results.json').write_text(json.dumps({'argv': sys.argv[1:]}))")
    runs = [st.Run(key=f"r{i}", settings={"i": i}, command=[sys.executable, "-c", write],
                   total_steps=10, fresh_flags=("--rerun", "true")) for i in (1, 2)]
    checkpoint = runs[0].checkpoint_dir(tmp_path / "ckpt") / "checkpoint-5"
    checkpoint.mkdir(parents=True)
    (checkpoint / "random_states_0.pkl").write_text("")
    results = st.run_grid(runs, results_dir=tmp_path / "results", checkpoint_root=tmp_path / "ckpt",
                          collect=lambda run, folder: json.loads((folder / "results.json").read_text()),
                          on_update=lambda done: None, workers=1, threads=1, nice=0, eta_every=60.0)
    argv = {r["key"]: r["argv"] for r in results}
    assert argv["r1"] == ["--output_dir", str(runs[0].checkpoint_dir(tmp_path / "ckpt")),
                          "--resume_from_checkpoint", str(checkpoint)]
    assert argv["r2"] == ["--output_dir", str(runs[1].checkpoint_dir(tmp_path / "ckpt")),
                          "--rerun", "true"]


@pytest.mark.parametrize("study, flags", [
    ("fashion_mnist_long", ["--epochs", "5"]),
    ("fashion_mnist_long", ["--epochs", "5", "--report_only", "true"]),
    ("ptb_lm_long", ["--max_steps", "100", "--report_only", "true"]),
    ("ptb_lm_long", ["--seeds", "43", "--report_only", "true"]),
    ("lora_finetune", ["--epochs", "1"]),
])
def test_a_study_with_other_settings_leaves_the_committed_results_alone(
        study: str, flags: list[str], tmp_path: Path) -> None:
    """The committed results (a copy here) with a flag that changes the runs: training would
    replace them and a report would drop them, so the command exits 2 with one line instead."""
    import shutil

    results = tmp_path / study
    shutil.copytree(STUDIES / "results" / study, results)
    before = {p: p.read_bytes() for p in results.rglob("*") if p.is_file()}
    done = subprocess.run([sys.executable, str(STUDIES / f"{study}.py"), *flags, "--results_dir",
                           str(results), "--checkpoint_dir", str(tmp_path / "ckpt")],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert len(done.stderr.strip().splitlines()) == 1
    assert done.stderr.startswith(f"{study}.py: error: ") and "--results_dir" in done.stderr
    assert {p: p.read_bytes() for p in results.rglob("*") if p.is_file()} == before
    assert not (tmp_path / "ckpt").exists()


def test_a_control_lr_equal_to_the_studys_own_is_refused() -> None:
    """Its runs would carry the main baseline's keys and settings: two runs of one key."""
    done = subprocess.run([sys.executable, str(STUDIES / "ptb_lm_long.py"), "--control_lrs",
                           "1.25e-4", "--report_only", "true"],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert "includes the study's own LR 0.000125" in done.stderr


def test_a_flat_control_multiplier_must_be_positive() -> None:
    done = subprocess.run([sys.executable, str(STUDIES / "ptb_lm_long.py"), "--control_flat",
                           "0", "--report_only", "true"],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert "--control_flat [0.0]" in done.stderr and "must be a positive number" in done.stderr


def test_a_study_that_adds_a_seed_keeps_every_committed_run(tmp_path: Path) -> None:
    import shutil

    results = tmp_path / "fashion_mnist_long"
    shutil.copytree(STUDIES / "results" / "fashion_mnist_long", results)
    done = subprocess.run([sys.executable, str(STUDIES / "fashion_mnist_long.py"), "--seeds", "43",
                           "37", "13", "11", "--report_only", "true", "--results_dir", str(results),
                           "--checkpoint_dir", str(tmp_path / "ckpt")],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((results / "summary.json").read_text())
    assert summary["finished"] == 18 and summary["planned"] == 24
    assert "Status: PARTIAL: 18 of 24 runs finished." in (results / "report.md").read_text()


def test_the_studies_readme_quotes_its_committed_reports() -> None:
    """Every "mean ± std" and interval the studies' README quotes is in the report the study wrote
    from its committed runs: a README number left behind when the results moved fails here."""
    readme = (STUDIES / "README.md").read_text(encoding="utf-8")
    numbers = re.compile(r"[-+]?\d+\.\d+ ± \d+\.\d+|\[[-+]?\d+\.\d+, [-+]?\d+\.\d+\]")
    reports = {study: path.read_text(encoding="utf-8") for study in
               ("fashion_mnist_long", "ptb_lm_long", "lora_finetune")
               if (path := STUDIES / "results" / study / "report.md").is_file()}
    preamble, *sections = re.split(r"^## ", readme, flags=re.MULTILINE)
    quoted = [(None, q) for q in numbers.findall(preamble)]  # the status table: any study's report
    for section in sections:
        title = section.splitlines()[0]
        study = next((s for prefix, s in (("Image classification", "fashion_mnist_long"),
                                          ("Language model", "ptb_lm_long"),
                                          ("LoRA fine-tuning", "lora_finetune"))
                      if title.startswith(prefix)), "")
        quoted += [(study, q) for q in numbers.findall(section)]
    missing = [(study, q) for study, q in quoted
               if not any(q in text for s, text in reports.items() if study in (None, s))]
    assert not missing, f"quoted in recipes/studies/README.md, not in the report: {missing}"
    assert len(quoted) >= 10


@pytest.mark.parametrize("study", ["fashion_mnist_long", "ptb_lm_long", "lora_finetune"])
def test_a_summary_records_the_study_not_the_sitting(study: str) -> None:
    import importlib

    args = importlib.import_module(study).StudyArguments
    record = args().study_record()
    local = args(report_only=True, eta_every=5.0, results_dir="/elsewhere", checkpoint_dir="/ckpt",
                 data_dir="/data").study_record()
    assert local == record and "report_only" not in record and "results_dir" not in record
    assert args(seeds=[1]).study_record()["seeds"] == [1] and record["workers"] == 2


def test_a_gpu_run_of_the_image_study_is_a_different_run() -> None:
    import fashion_mnist_long as study

    cpu = study.build_runs(study.StudyArguments(lrs=[0.1], seeds=[43]))
    gpu = study.build_runs(study.StudyArguments(lrs=[0.1], seeds=[43], device="cuda", loader_workers=6))
    for a, b in zip(cpu, gpu):
        assert a.key == b.key and a.settings != b.settings
        assert a.checkpoint_dir("c") != b.checkpoint_dir("c")
        flags = dict(zip(b.command, b.command[1:]))
        assert flags["--use_cpu"] == "false" and flags["--dataloader_num_workers"] == "6"
        assert dict(zip(a.command, a.command[1:]))["--use_cpu"] == "true"


def test_partial_lm_report_shows_no_spread_for_one_seed(tmp_path: Path) -> None:
    import ptb_lm_long as study

    def run(method: str, seed: int, valid: float, test: float, lr: float = 1.25e-4) -> dict:
        tb = {"mean_multiplier": {"mean": 1.4, "lr_weighted": 1.3}} if method == "tb" else None
        key = f"{method}_seed{seed}" if lr == 1.25e-4 else f"{method}_lr{lr:g}_seed{seed}"
        return {"key": key, "study_settings": {"method": method, "seed": seed, "learning_rate": lr},
                "method": method, "seed": seed, "valid_ppl": valid, "test_ppl": test,
                "best_step": 10, "steps": 20,
                "evals": [{"step": 10, "valid_ppl": valid}], "tempbalance": tb}

    results = [run("cal", 43, 120.0, 118.0), run("cal", 37, 124.0, 121.0), run("tb", 43, 117.0, 116.0)]
    args = study.StudyArguments(results_dir=str(tmp_path), control_lrs=[], control_flat=[])
    summary = study.write_report(results, args, planned=6)
    report = (tmp_path / "report.md").read_text()
    cal_std = np.std([120.0, 124.0], ddof=1)
    assert f"| cal | 122.00 ± {cal_std:.2f} | 119.50 ± {np.std([118.0, 121.0], ddof=1):.2f} |" in report
    assert "| tb | 117.00 (1 seed) | 116.00 (1 seed) |" in report and "± 0.00" not in report
    assert "| cal_seed37 | 10 of 20 | 124.00 | 121.00 |" in report
    assert summary["cells"]["tb"]["valid_ppl"]["std"] is None
    assert summary["paired"]["valid_ppl"]["differences"] == [-3.0]
    assert "one paired seed so far" in report and "PARTIAL: 3 of 6" in report
    assert "The baseline at 0.000163 would be the control; it is not part of this study" in report
    # with the control arm: its own row, and tb against it per seed
    results += [run("cal", 43, 118.5, 117.5, lr=1.6e-4), run("tb", 37, 121.0, 119.0)]
    args = study.StudyArguments(results_dir=str(tmp_path), control_lrs=[1.6e-4], control_flat=[1.3])
    summary = study.write_report(results, args, planned=10)
    report = (tmp_path / "report.md").read_text()
    assert "| cal @ 0.00016 | 118.50 (1 seed) | 117.50 (1 seed) | 1 (none) | 1 |" in report
    assert "| cal_lr0.00016_seed43 | 10 of 20 | 118.50 | 117.50 |" in report
    assert summary["paired"]["test_ppl vs cal @ 0.00016"]["differences"] == [116.0 - 117.5]
    assert summary["paired"]["test_ppl"]["differences"] == [116.0 - 118.0, 119.0 - 121.0]
    assert "The controls, above: tb against cal @ 0.00016 (every layer at that LR" in report
    assert "Not measured yet: tb flat 1.3." in report
    # the flat control: TempBalance with s1 = s2, its own arm, key and pairing
    flat = run("tb", 43, 116.5, 115.0)
    flat["key"], flat["study_settings"]["tempbalance"] = "tb_flat1.3_seed43", {"s1": 1.3, "s2": 1.3}
    summary = study.write_report(results + [flat], args, planned=10)
    report = (tmp_path / "report.md").read_text()
    assert "| tb flat 1.3 | 116.50 (1 seed) | 115.00 (1 seed) | 1.4000 / 1.3000 | 1 |" in report
    assert "| tb | 119.00 ± " in report  # the main tb arm keeps its two seeds
    assert summary["paired"]["test_ppl vs tb flat 1.3"]["differences"] == [116.0 - 115.0]
    assert "tb against tb flat 1.3 (the layers tb balances at a constant 1.3x" in report
    assert "Not measured yet" not in report
    # the gap over training, per seed both arms ran, at the evaluations both made
    assert summary["valid_ppl_differences"] == {"tb - cal": {43: [[10, 117.0 - 120.0]],
                                                             37: [[10, 121.0 - 124.0]]},
                                                "tb - cal @ 0.00016": {43: [[10, 117.0 - 118.5]]},
                                                "tb - tb flat 1.3": {43: [[10, 117.0 - 116.5]]}}
    base = [{"seed": 1, "evals": [{"step": 10, "valid_ppl": 5.0}, {"step": 20, "valid_ppl": 4.0}]}]
    other = [{"seed": 1, "evals": [{"step": 10, "valid_ppl": 4.5}, {"step": 30, "valid_ppl": 3.0}]},
             {"seed": 2, "evals": [{"step": 10, "valid_ppl": 4.0}]}]
    assert study.curve_differences(base, other) == {1: [[10, -0.5]]}


def test_lora_study_selects_among_the_lrs_with_the_most_seeds() -> None:
    import lora_finetune as study

    args = study.StudyArguments(lrs=[0.001, 0.003], methods=["lora", "tb"])
    results = [{"method": "lora", "lr": 0.001, "seed": s, "valid_ppl": v} for s, v in ((43, 30.0), (37, 31.0))]
    results.append({"method": "lora", "lr": 0.003, "seed": 43, "valid_ppl": 20.0})  # better, one seed
    assert study.select_lrs(results, args) == {"lora": 0.001}
    results.append({"method": "lora", "lr": 0.003, "seed": 37, "valid_ppl": 29.0})
    assert study.select_lrs(results, args) == {"lora": 0.003}


# ------------------------------------------------------------------------------------ image study
def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def _fake_fashion_mnist(data_dir: Path, n_train: int, n_test: int) -> None:
    folder = data_dir / "fashion_mnist" / "usr/share/datasets/fashion-mnist"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    names = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
             "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
    for split, n in (("train", n_train), ("test", n_test)):
        labels = np.arange(n) % 10
        pics = rng.integers(0, 40, (n, 28, 28))
        for i, c in enumerate(labels):
            pics[i, 2 * c:2 * c + 8, 2 * c:2 * c + 8] = 250
        _write_idx(folder / names[split][0], pics)
        _write_idx(folder / names[split][1], labels)


def _image_argv(tmp: Path, *extra: str) -> list[str]:
    # 640 images = 5 steps an epoch, 3 epochs: long enough to kill a worker after its first epoch
    return [sys.executable, str(STUDIES / "fashion_mnist_long.py"), "--lrs", "0.1", "--epochs", "3",
            "--max_train_samples", "640", "--max_eval_samples", "128", "--data_dir",
            str(tmp / "data"), "--eta_every", "1", *extra]


@pytest.fixture(scope="module")
def image_study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fmnist_study")
    _fake_fashion_mnist(tmp / "data", 640, 128)
    argv = _image_argv(tmp, "--seeds", "43", "37", "--results_dir", str(tmp / "results"),
                       "--checkpoint_dir", str(tmp / "ckpt"))
    done = subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return tmp, argv, done.stdout


@pytest.mark.slow
def test_image_study_report_matches_independent_statistics(image_study) -> None:
    tmp, _, stdout = image_study
    results = tmp / "results"
    assert "0 of 4 runs finished before" in stdout and "4 of 4 finished" in stdout
    runs = {p.stem: json.loads(p.read_text()) for p in (results / "runs").glob("*.json")}
    assert sorted(runs) == ["cal_lr0.1_seed37", "cal_lr0.1_seed43", "tb_lr0.1_seed37",
                            "tb_lr0.1_seed43"]
    for key, run in runs.items():
        assert run["study_settings"]["method"] == key.split("_")[0]
        assert [row["epoch"] for row in run["history"]] == [1, 2, 3]
        assert run["steps"] == 15 and run["run_settings"]["train_samples"] == 640
    # paired differences tb - cal (pp) against scipy's paired t-test on the committed accuracies
    acc = {k: 100 * r["test_accuracy"] for k, r in runs.items()}
    tb = [acc["tb_lr0.1_seed43"], acc["tb_lr0.1_seed37"]]
    cal = [acc["cal_lr0.1_seed43"], acc["cal_lr0.1_seed37"]]
    summary = json.loads((results / "summary.json").read_text())
    pair = summary["paired"]["lr=0.1"]
    assert pair["differences"] == pytest.approx([t - c for t, c in zip(tb, cal)])
    if tb[0] - cal[0] != tb[1] - cal[1]:  # a zero spread has no t-interval in scipy
        ci = stats.ttest_rel(tb, cal).confidence_interval(0.95)
        assert pair["ci"] == pytest.approx([ci.low, ci.high])
    cell = {(c["method"], c["lr"]): c for c in summary["cells"]}[("tb", 0.1)]
    assert cell["mean"] == pytest.approx(np.mean(tb)) and cell["std"] == pytest.approx(np.std(tb, ddof=1))
    # the mean multiplier: each epoch's update held for its 5 steps, recomputed from the per-layer history
    for seed in (43, 37):
        ckpt = next((tmp / "ckpt").glob(f"tb_lr0.1_seed{seed}-*"))
        rows = [json.loads(line) for line in (ckpt / "tempbalance_history.jsonl").read_text().splitlines()]
        per_update = {}
        for row in rows:
            per_update.setdefault(row["step"], []).append(row["multiplier"])
        assert sorted(per_update) == [0, 5, 10]
        expected = np.mean([np.mean(m) for m in per_update.values()])  # equal 5-step spans
        got = runs[f"tb_lr0.1_seed{seed}"]["tempbalance"]["mean_multiplier"]["mean"]
        assert got == pytest.approx(expected)
        assert 0.5 <= got <= 1.5
    report = (results / "report.md").read_text()
    assert "Status: complete." in report and "| tb | **" in report
    assert f"{np.mean(tb):.2f} ± {np.std(tb, ddof=1):.2f}" in report
    assert (results / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_image_study_reuses_finished_runs_and_resumes_a_killed_one(image_study) -> None:
    tmp, argv, _ = image_study
    # 1. rerun: everything reused, nothing trained
    again = subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "4 of 4 runs finished before (reused), 0 to train" in again.stdout
    assert "start " not in again.stdout
    # 2. a fresh grid of one run whose worker is killed after its first epoch's checkpoint
    argv = _image_argv(tmp, "--methods", "tb", "--seeds", "43", "--workers", "1",
                       "--results_dir", str(tmp / "results2"), "--checkpoint_dir", str(tmp / "ckpt2"))
    log = open(tmp / "grid.log", "w")  # noqa: SIM115
    grid = subprocess.Popen(argv, env=ENV, stdout=log, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not list((tmp / "ckpt2").glob("*/checkpoint-5/trainer_state.json")):
        assert time.time() < deadline and grid.poll() is None, (tmp / "grid.log").read_text()[-3000:]
        time.sleep(0.02)
    pid = int(re.search(r"start tb_lr0.1_seed43 \(pid (\d+)\)", (tmp / "grid.log").read_text()).group(1))
    os.kill(pid, signal.SIGKILL)
    grid.wait(timeout=120)
    log.close()
    folder = next((tmp / "ckpt2").glob("tb_lr0.1_seed43-*"))
    assert "FAILED tb_lr0.1_seed43" in (tmp / "grid.log").read_text()
    assert not (folder / "results.json").exists()  # killed before the end
    # the grid's last report shows the killed run's accuracy so far, read from its last
    # checkpoint, and so does --report_only
    checkpoint, step = st.last_checkpoint(folder)
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    so_far = [100 * e["eval_accuracy"] for e in state["log_history"] if "eval_accuracy" in e]
    assert len(so_far) == step // 5
    row = f"| tb_lr0.1_seed43 | {len(so_far)} | " + ", ".join(f"{a:.2f}" for a in so_far)
    assert row in (tmp / "results2" / "report.md").read_text()
    (tmp / "results2" / "report.md").unlink()
    snapshot = subprocess.run(argv + ["--report_only"], env=ENV, capture_output=True, text=True,
                              timeout=120)
    assert snapshot.returncode == 0, snapshot.stderr[-3000:]
    assert row in (tmp / "results2" / "report.md").read_text()
    resumed = subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert re.search(r"start tb_lr0.1_seed43 \(pid \d+\), resuming at step (5|10) of 15", resumed.stdout)
    assert "--resume_from_checkpoint" in (folder / "worker.log").read_text()
    # same result as the uninterrupted run of the same settings (first grid)
    a = json.loads((tmp / "results" / "runs" / "tb_lr0.1_seed43.json").read_text())
    b = json.loads((tmp / "results2" / "runs" / "tb_lr0.1_seed43.json").read_text())
    assert a["study_settings"] == b["study_settings"]
    assert [r["test_accuracy"] for r in b["history"]] == [r["test_accuracy"] for r in a["history"]]
    assert [r["train_loss"] for r in b["history"]] == pytest.approx([r["train_loss"] for r in a["history"]])
    for key in ("step", "mean", "min", "max"):
        assert [u[key] for u in b["tempbalance"]["by_update"]] == pytest.approx(
            [u[key] for u in a["tempbalance"]["by_update"]])


# ------------------------------------------------------------------------------------ LM study
def _corpus(root: Path) -> None:
    import random

    rng = random.Random(0)
    words = {"s": ["the king", "a lord", "my lady", "the fool", "<unk>"],
             "v": ["loves", "fears", "serves", "mocks"], "o": ["the crown", "his sword", "her ring"]}
    root.mkdir(parents=True)
    for split, n in (("train", 300), ("valid", 40), ("test", 40)):
        lines = [" ".join(rng.choice(words[k]) for k in "svo") for _ in range(n)]
        (root / f"ptb.{split}.txt").write_text("".join(f" {line} \n" for line in lines))


def test_lm_study_refuses_a_corpus_other_than_its_committed_runs(tmp_path: Path) -> None:
    """A run trained now is paired with the committed ones: on other text it would compare
    nothing. The corpus's counts are checked against each committed run's record."""
    import ptb_lm_long as study

    _corpus(tmp_path / "corpus")
    train = (tmp_path / "corpus" / "ptb.train.txt").read_text().split("\n")
    tokens = sum(len(line.split()) + 1 for line in train if line.split())  # words + <eos>
    vocab = len({w for line in train for w in line.split()}) + 1
    args = study.StudyArguments(seeds=[43], control_lrs=[], control_flat=[],
                                data_dir=str(tmp_path / "corpus"),
                                results_dir=str(tmp_path / "results"))
    run = study.build_runs(args)[0]

    def commit(train_tokens: int, vocab_size: int, **more) -> list[dict]:
        return [st._store(run, {"train_tokens": train_tokens, "vocab_size": vocab_size, **more},
                          tmp_path / "results")]

    study.prepare_corpus(args, [])  # nothing committed: nothing to compare
    study.prepare_corpus(args, commit(tokens, vocab))
    with pytest.raises(st.UsageError, match=rf"not the one {run.key} was trained on "
                                            rf"\(train_tokens {tokens + 1} there, {tokens} here\)"):
        study.prepare_corpus(args, commit(tokens + 1, vocab))
    with pytest.raises(st.UsageError, match=rf"vocab_size {vocab - 1} there, {vocab} here"):
        study.prepare_corpus(args, commit(tokens, vocab - 1))
    # a run that recorded the digest of its token streams is held to it too (same counts)
    with pytest.raises(st.UsageError, match=r"sha256 '0000.*' there, '[0-9a-f]{64}' here"):
        study.prepare_corpus(args, commit(tokens, vocab, corpus_sha256="0" * 64))


@pytest.mark.slow
def test_lm_study_smoke(tmp_path: Path) -> None:
    _corpus(tmp_path / "corpus")
    # d_model 64, 3·d_head 60: every scheduled Linear has >= 50 eigenvalues
    argv = [sys.executable, str(STUDIES / "ptb_lm_long.py"), "--seeds", "43", "37", "--max_steps",
            "20", "--eval_steps", "10", "--save_steps", "10", "--batch_size", "4", "--d_model", "64",
            "--d_head", "20", "--d_inner", "96", "--num_layers", "1", "--max_eval_windows", "3",
            "--data_dir", str(tmp_path / "corpus"), "--results_dir", str(tmp_path / "results"),
            "--checkpoint_dir", str(tmp_path / "ckpt"), "--eta_every", "1",
            "--control_lrs", "2.5e-4", "--control_flat", "1.5"]
    done = subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    runs = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "results" / "runs").glob("*.json")}
    assert sorted(runs) == ["cal_lr0.00025_seed37", "cal_lr0.00025_seed43", "cal_seed37",
                            "cal_seed43", "tb_flat1.5_seed37", "tb_flat1.5_seed43", "tb_seed37",
                            "tb_seed43"]
    # the control: the baseline, trained at its own LR (the LR the recipe recorded it ran with)
    for seed in (43, 37):
        control = runs[f"cal_lr0.00025_seed{seed}"]
        assert control["config"]["training"]["learning_rate"] == 2.5e-4
        assert runs[f"cal_seed{seed}"]["config"]["training"]["learning_rate"] == 1.25e-4
        assert control.get("tempbalance") is None
    summary = json.loads((tmp_path / "results" / "summary.json").read_text())
    for key in ("valid_ppl", "test_ppl"):
        cal = [runs[f"cal_seed{s}"][key] for s in (43, 37)]
        tb = [runs[f"tb_seed{s}"][key] for s in (43, 37)]
        ci = stats.ttest_rel(tb, cal).confidence_interval(0.95)
        assert summary["paired"][key]["ci"] == pytest.approx([ci.low, ci.high])
    for seed in (43, 37):
        tb = runs[f"tb_seed{seed}"]
        assert tb["steps"] == 20 and [e["step"] for e in tb["evals"]] == [10, 20]
        # multipliers every 10 steps (tb_interval 10): updates at 0 and 10, each held 10 steps
        ckpt = next((tmp_path / "ckpt").glob(f"tb_seed{seed}-*"))
        rows = [json.loads(line) for line in (ckpt / "tempbalance_history.jsonl").read_text().splitlines()]
        by = {}
        for row in rows:
            by.setdefault(row["step"], []).append(row["multiplier"])
        assert sorted(by) == [0, 10]
        got = tb["tempbalance"]["mean_multiplier"]["mean"]
        assert got == pytest.approx(np.mean([np.mean(m) for m in by.values()]))
        assert 1.0 <= got <= 2.0
        assert runs[f"cal_seed{seed}"].get("tempbalance") is None
    report = (tmp_path / "results" / "report.md").read_text()
    assert "Status: complete." in report and "| valid_ppl |" in report
    for key in ("valid_ppl", "test_ppl"):
        control = [runs[f"cal_lr0.00025_seed{s}"][key] for s in (43, 37)]
        tb = [runs[f"tb_seed{s}"][key] for s in (43, 37)]
        pair = summary["paired"][f"{key} vs cal @ 0.00025"]
        assert pair["differences"] == pytest.approx([t - c for t, c in zip(tb, control)])
    assert "tb against cal @ 0.00025 (every layer at that LR" in report
    assert "tb against tb flat 1.5 (the layers tb balances at a constant 1.5x" in report
    for seed in (43, 37):  # the flat control: TempBalance's layers, every one at 1.5x throughout
        flat = runs[f"tb_flat1.5_seed{seed}"]
        assert flat["study_settings"]["tempbalance"] == {"s1": 1.5, "s2": 1.5, "interval": 10}
        assert flat["config"]["tempbalance"]["s1"] == flat["config"]["tempbalance"]["s2"] == 1.5
        assert flat["tempbalance"]["layers"] == runs[f"tb_seed{seed}"]["tempbalance"]["layers"]
        assert set(flat["tempbalance"]["final_multipliers"].values()) == {1.5}
        assert flat["tempbalance"]["mean_multiplier"]["lr_weighted"] == pytest.approx(1.5)
        for key in ("valid_ppl", "test_ppl"):
            pair = summary["paired"][f"{key} vs tb flat 1.5"]
            assert pair["differences"] == pytest.approx(
                [runs[f"tb_seed{s}"][key] - runs[f"tb_flat1.5_seed{s}"][key] for s in (43, 37)])
    for seed in (43, 37):  # the gap over training: valid PPL tb - cal at steps 10 and 20
        tb, cal = (runs[f"{m}_seed{seed}"]["evals"] for m in ("tb", "cal"))
        got = summary["valid_ppl_differences"]["tb - cal"][str(seed)]
        assert [step for step, _ in got] == [t["step"] for t in tb] == [c["step"] for c in cal]
        assert [d for _, d in got] == pytest.approx([t["valid_ppl"] - c["valid_ppl"]
                                                     for t, c in zip(tb, cal)])
    # the caveat on the LR: tb's multipliers in [1, 2] raise its average LR above the baseline's
    weighted = np.mean([runs[f"tb_seed{s}"]["tempbalance"]["mean_multiplier"]["lr_weighted"]
                        for s in (43, 37)])
    assert f"trained at {weighted:.2f}x the nominal LR 0.000125 on average" in report
    assert "higher effective LR" in report
    assert (tmp_path / "results" / "curves.png").is_file()
    # the snapshot of unfinished runs reads the loop state of their last checkpoint (step 10 here):
    # taken as unfinished, each run shows its first evaluation, as its finished record has it
    import ptb_lm_long as study

    (args,) = study.HfArgumentParser(study.StudyArguments).parse_args_into_dataclasses(args=argv[2:])
    running = {r["key"]: r for r in study.in_progress(study.build_runs(args), args, set())}
    assert sorted(running) == sorted(runs)
    for key, r in running.items():
        assert r["done"] == 10 and r["curve"] == [[10, pytest.approx(runs[key]["evals"][0]["valid_ppl"])]]
    kw = dict(other="tb", intro="", progress="steps done", value="ppl", unit="PPL",
              point=lambda x: f"step {x}")
    lines = "\n".join(st.running_section(list(running.values()), bases=["cal"], **kw))
    diff = running["tb_seed43"]["curve"][0][1] - running["cal_seed43"]["curve"][0][1]
    assert f"seed 43: step 10 {diff:+.2f}" in lines
    # a control still running is compared with the finished tb of its seed (at the steps the
    # control reached); pairs with no run left running are results, not the snapshot's business
    control = running["cal_lr0.00025_seed43"]
    finished = [study._snapshot(k, r["seed"], r["evals"], study.arm_of(r["study_settings"], args))
                for k, r in runs.items() if k != control["key"]]
    lines = "\n".join(st.running_section([control], bases=["cal", "cal @ 0.00025"],
                                          finished=finished, **kw))
    diff = runs["tb_seed43"]["evals"][0]["valid_ppl"] - control["curve"][0][1]
    assert f"Same-seed differences tb - cal @ 0.00025 (PPL) at the evaluations both reached: " \
           f"seed 43: step 10 {diff:+.2f}." in lines
    assert "tb - cal (PPL)" not in lines and "seed 37" not in lines


# ------------------------------------------------------------------------------------ LoRA study
def test_lora_study_keeps_its_results_when_the_base_made_again_differs(tmp_path: Path) -> None:
    """A base pre-trained again (the cache gone) that scores other perplexities is not the one the
    committed runs started from: refused before pretrain.json is rewritten."""
    import lora_finetune as study

    _corpus(tmp_path / "corpus")  # present: ensure_base does not make one
    args = study.StudyArguments(seeds=[43], lrs=[0.01], checkpoint_dir=str(tmp_path / "ckpt"),
                                results_dir=str(tmp_path / "results"), data_dir=str(tmp_path / "corpus"))
    base = study.base_dir(args)
    base.mkdir(parents=True)
    (base / "model.safetensors").write_bytes(b"")  # present: ensure_base does not pre-train

    def made(valid: float, test: float) -> None:
        (base / "results.json").write_text(json.dumps(
            {"tokens": {"train": 56606}, "finetune_valid_ppl": valid, "finetune_test_ppl": test}))

    made(107.5, 105.5)
    study.ensure_base(args, [])  # nothing committed yet: the base is recorded
    pretrain = tmp_path / "results" / "pretrain.json"
    assert json.loads(pretrain.read_text())["finetune_valid_ppl"] == 107.5
    run = study.build_runs(args)[0]
    committed = [st._store(run, {"base": {"valid_ppl": 107.5, "test_ppl": 105.5}},
                           tmp_path / "results")]
    study.ensure_base(args, committed)  # the same base: accepted
    saved = pretrain.read_text()
    made(107.5, 106.0)
    with pytest.raises(st.UsageError, match=rf"not the one {run.key} was trained on "
                                            r"\(test_ppl 105.5 there, 106.0 here\)"):
        study.ensure_base(args, committed)
    assert pretrain.read_text() == saved


def test_a_lora_base_is_fine_tuned_only_on_the_corpus_it_was_pre_trained_on(tmp_path: Path) -> None:
    """The fine-tuning split is cut from the base's corpus: a base pre-trained on other text (the
    data folder made again or pointed elsewhere) is refused before any fine-tuning."""
    import lora_shakespeare as ls

    _corpus(tmp_path / "corpus")
    vocab, ids, sha256 = ls.corpus(str(tmp_path / "corpus"), 50, 10)
    counts = ls.token_counts(ids)
    lines = (tmp_path / "corpus" / "ptb.train.txt").read_text().splitlines()
    # every word of the training plays and one end-of-sentence token per line
    assert counts["pretrain"] == sum(len(line.split()) + 1 for line in lines) and set(ids) == {"pretrain", "train", "valid", "test"}
    base = tmp_path / "base"
    base.mkdir()
    (base / ls.VOCAB_FILE).write_text(json.dumps(vocab))
    (base / "results.json").write_text(json.dumps({"tokens": counts, "corpus_sha256": sha256}))
    ls.check_base_corpus(base, vocab, counts, sha256)  # its own corpus: accepted

    other = tmp_path / "other"  # one training word changed: same counts, same vocabulary
    other.mkdir()
    for split in ("train", "valid", "test"):
        text = (tmp_path / "corpus" / f"ptb.{split}.txt").read_text()
        (other / f"ptb.{split}.txt").write_text(text.replace("loves", "fears", 1) if split == "train"
                                                else text)
    vocab2, ids2, sha2 = ls.corpus(str(other), 50, 10)
    assert vocab2 == vocab and ls.token_counts(ids2) == counts and sha2 != sha256
    with pytest.raises(SystemExit, match="was pre-trained on another corpus"):
        ls.check_base_corpus(base, vocab2, ls.token_counts(ids2), sha2)
    with pytest.raises(SystemExit, match="another vocabulary"):
        ls.check_base_corpus(base, {**vocab, "extra": len(vocab)}, counts, sha256)
    # a base saved before the digest was recorded is held to its token counts
    (base / "results.json").write_text(json.dumps({"tokens": counts}))
    ls.check_base_corpus(base, vocab, counts, sha2)
    with pytest.raises(SystemExit, match="another corpus"):
        ls.check_base_corpus(base, vocab, {**counts, "train": counts["train"] - 10}, sha256)


@pytest.mark.slow
def test_lora_study_smoke(tmp_path: Path) -> None:
    pytest.importorskip("peft")
    _corpus(tmp_path / "corpus")
    # width 64: every adapted module has >= 50 eigenvalues (min_eigs); blocks of 10 tokens give
    # the held-out text a train, valid and test part
    argv = [sys.executable, str(STUDIES / "lora_finetune.py"), "--seeds", "43", "37", "--lrs",
            "0.003", "--epochs", "2", "--pretrain_epochs", "1", "--width", "64", "--layers", "1",
            "--heads", "2", "--seq_len", "8", "--batch_size", "4", "--block", "10",
            "--data_dir", str(tmp_path / "corpus"), "--results_dir", str(tmp_path / "results"),
            "--checkpoint_dir", str(tmp_path / "ckpt"), "--eta_every", "1", "--nice", "0"]
    done = subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = tmp_path / "results"
    runs = {p.stem: json.loads(p.read_text()) for p in (results / "runs").glob("*.json")}
    assert sorted(runs) == ["lora_lr0.003_seed37", "lora_lr0.003_seed43", "tb_lr0.003_seed37",
                            "tb_lr0.003_seed43"]
    base = json.loads((results / "pretrain.json").read_text())
    summary = json.loads((results / "summary.json").read_text())
    lora = [runs[f"lora_lr0.003_seed{s}"]["test_ppl"] for s in (43, 37)]
    tb = [runs[f"tb_lr0.003_seed{s}"]["test_ppl"] for s in (43, 37)]
    pair = summary["paired"]["lr=0.003"]
    assert pair["differences"] == pytest.approx([t - c for t, c in zip(tb, lora)])
    if tb[0] - lora[0] != tb[1] - lora[1]:
        ci = stats.ttest_rel(tb, lora).confidence_interval(0.95)
        assert pair["ci"] == pytest.approx([ci.low, ci.high])
    assert summary["selected_lr"] == {"lora": 0.003, "tb": 0.003}
    for seed in (43, 37):
        run = runs[f"tb_lr0.003_seed{seed}"]
        # every run starts from the same base: the same perplexities before fine-tuning
        assert run["base"]["test_ppl"] == pytest.approx(base["finetune_test_ppl"])
        assert [e["epoch"] for e in run["evals"]] == [1, 2] and run["steps"] % 2 == 0
        # one update per epoch (at steps 0 and steps/2), each held for its epoch, from the history
        ckpt = next((tmp_path / "ckpt").glob(f"tb_lr0.003_seed{seed}-*"))
        rows = [json.loads(line) for line in (ckpt / "tempbalance_history.jsonl").read_text().splitlines()]
        by = {}
        for row in rows:
            by.setdefault(row["step"], []).append(row["multiplier"])
        assert sorted(by) == [0, run["steps"] // 2]
        got = run["tempbalance"]["mean_multiplier"]["mean"]
        assert got == pytest.approx(np.mean([np.mean(m) for m in by.values()]))
        # the first block's q_proj is the first layer (excluded); its other 5 modules are balanced
        assert len(run["tempbalance"]["layers"]) == 5 and 0.5 <= got <= 1.5
        assert runs[f"lora_lr0.003_seed{seed}"].get("tempbalance") is None
    report = (results / "report.md").read_text()
    assert "Status: complete." in report and (results / "curves.png").is_file()
    again = subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "4 of 4 runs finished before (reused), 0 to train" in again.stdout
    assert "pre-training" not in again.stdout
