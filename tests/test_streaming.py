"""Streaming `analyze` of sharded safetensors checkpoints (hf_tempbalance.streaming).

Each check compares the streamed rows with an independent computation: the in-memory path on
the model Transformers loads (``from_pretrained`` + ``analyze_model``), and for the fused expert
stacks the per-expert checkpoint tensors assembled and decomposed here by SVD.
"""

from __future__ import annotations

import json
import math
import threading
import weakref

import numpy as np
import pytest
import torch
from safetensors import safe_open

from hf_tempbalance import TempBalanceConfig
from hf_tempbalance.analysis import analyze_model
from hf_tempbalance.checkpoint_files import open_checkpoint
from hf_tempbalance.cli import main
from hf_tempbalance.spectral import esd_reference
from hf_tempbalance.streaming import INDEX_FILE, analyze_checkpoint

transformers = pytest.importorskip("transformers")

FIELDS = ("name", "type", "shape", "num_eigs", "n_tail", "balanced")
VALUES = ("alpha", "xmin", "spectral_norm", "alpha_weighted", "stable_rank")


def _llama(dtype=torch.float32, tied=False):
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=160, num_attention_heads=4,
                                      num_key_value_heads=2, num_hidden_layers=3, vocab_size=96,
                                      tie_word_embeddings=tied)
    return transformers.LlamaForCausalLM(config).to(dtype)


def _mixtral():
    config = transformers.MixtralConfig(hidden_size=48, intermediate_size=80, num_attention_heads=4,
                                        num_key_value_heads=2, num_hidden_layers=2, vocab_size=96,
                                        num_local_experts=4, num_experts_per_tok=2)
    return transformers.MixtralForCausalLM(config)


def _gpt2():
    config = transformers.GPT2Config(n_embd=48, n_layer=2, n_head=4, vocab_size=96, n_positions=32,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


BUILDERS = {
    "llama-bf16-tied": lambda: _llama(torch.bfloat16, tied=True),
    "llama-fp32": _llama,
    "mixtral-experts": _mixtral,  # per-expert w1/w3/w2 in the file, fused stacks in the model
    "gpt2-packed-qkv": _gpt2,     # c_attn: q/k/v packed in one transposed Conv1D
}


def _save(name: str, path) -> None:
    torch.manual_seed(0)
    _save_model(BUILDERS[name](), path)


def _save_model(model, path) -> None:
    model.save_pretrained(path, max_shard_size="40KB")
    assert (path / INDEX_FILE).is_file()
    assert len(list(path.glob("*.safetensors"))) > 2  # really sharded


def _in_memory(path, config=None, **kw):
    cfg = transformers.AutoConfig.from_pretrained(path)
    cls = getattr(transformers, cfg.architectures[0])
    return analyze_model(cls.from_pretrained(path).eval(), config, progress=False, **kw)


# Streaming sums each Gram block by block and the in-memory engine in one product (after
# dividing bf16 weights by their largest |w|): in float32 the eigenvalues differ by rounding,
# which moves a median-xmin alpha by up to a few 1e-6 relative (the engine's own alphas differ
# from float64 by up to 1.2e-6, docs/performance.md). In float64 the two agree to 1e-10.
RTOL = {"float32": 1e-5, "float64": 1e-10}


def _assert_same(streamed, loaded, rel=RTOL["float32"]):
    assert [r.name for r in streamed.layers] == [r.name for r in loaded.layers]
    for s, m in zip(streamed.layers, loaded.layers):
        for f in FIELDS:
            assert getattr(s, f) == getattr(m, f), (s.name, f)
        for f in VALUES:
            a, b = getattr(s, f), getattr(m, f)
            assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=rel), (s.name, f)


@pytest.mark.parametrize("name", sorted(BUILDERS))
@pytest.mark.parametrize("layer_types", [("linear",), ("linear", "embedding")])
def test_streamed_rows_equal_the_loaded_model(name, layer_types, tmp_path):
    _save(name, tmp_path)
    config = TempBalanceConfig(layer_types=layer_types)
    streamed = analyze_checkpoint(tmp_path, config, progress=False)
    loaded = _in_memory(tmp_path, config)
    assert len(streamed.layers) >= 7
    _assert_same(streamed, loaded)
    if name == "llama-bf16-tied":
        names = [r.name for r in streamed.layers]
        # tied embedding / lm_head: one weight, counted once (as discovery's dedup does)
        assert ("model.embed_tokens" in names) + ("lm_head" in names) == 1
    # the balanced-only view too
    _assert_same(analyze_checkpoint(tmp_path, config, layers="balanced", progress=False),
                 _in_memory(tmp_path, config, layers="balanced"))


@pytest.mark.parametrize("name", ["llama-bf16-tied", "mixtral-experts"])
def test_float64_streaming_equals_the_loaded_model_to_1e_10(name, tmp_path):
    _save(name, tmp_path)
    config = TempBalanceConfig(layer_types=("linear", "embedding"), dtype="float64")
    _assert_same(analyze_checkpoint(tmp_path, config, progress=False, block_elements=1024),
                 _in_memory(tmp_path, config), rel=RTOL["float64"])


def test_expert_stack_is_the_pooled_spectrum_of_the_stored_experts(tmp_path):
    """Independent check of the fused stack: w1/w3 of each expert read from the files,
    concatenated as the model fuses them, eigenvalues by per-matrix SVD, pooled."""
    _save("mixtral-experts", tmp_path)
    index = json.loads((tmp_path / INDEX_FILE).read_text())["weight_map"]

    def stored(key):
        with safe_open(str(tmp_path / index[key]), "pt") as fh:
            return fh.get_tensor(key)

    prefix = "model.layers.1.block_sparse_moe.experts"
    eigs = np.sort(np.concatenate([
        esd_reference(torch.cat([stored(f"{prefix}.{e}.w1.weight"),
                                 stored(f"{prefix}.{e}.w3.weight")]).double()).numpy()
        for e in range(4)]))
    row = analyze_checkpoint(tmp_path, progress=False)["model.layers.1.mlp.experts.gate_up_proj"]
    assert row.type == "ExpertStack" and row.shape == (4, 160, 48)
    assert row.num_eigs == len(eigs) == 4 * 48
    assert row.spectral_norm == pytest.approx(eigs[-1], rel=1e-5)
    assert row.stable_rank == pytest.approx(eigs.sum() / eigs[-1], rel=1e-5)


def test_reads_bounded_blocks_never_a_whole_weight(tmp_path, monkeypatch):
    """With small blocks the reader never holds a whole weight: every analysed tensor is read
    in several blocks, each block at most the budget, at most one block per worker thread
    alive at once; every needed tensor is read and nothing else; the model is never loaded."""
    _save("llama-fp32", tmp_path)
    loaded = _in_memory(tmp_path)
    lock = threading.Lock()
    live: dict[int, int] = {}
    peak = [0]
    reads: dict[str, list[int]] = {}

    def forget(ident):
        with lock:
            live.pop(ident, None)

    def on_read(key, tensor):
        with lock:
            reads.setdefault(key, []).append(tensor.numel())
            live[id(tensor)] = tensor.numel() * tensor.element_size()
            peak[0] = max(peak[0], sum(live.values()))
        weakref.finalize(tensor, forget, id(tensor))

    def refuse(*args, **kwargs):
        raise AssertionError("streaming must not load the model")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(refuse))
    block = 64 * 64  # elements: 64 rows (or columns) of a 64-wide Gram
    streamed = analyze_checkpoint(tmp_path, progress=False, on_read=on_read, block_elements=block)
    _assert_same(streamed, loaded)
    checkpoint = open_checkpoint(tmp_path)
    wanted = {f"{r.name}.weight" for r in streamed.layers}
    assert set(reads) == wanted  # no norm, no embedding (not analysed)
    split = 0
    for key, sizes in reads.items():
        shape = checkpoint.tensors[key].shape
        limit = max(block, 64 * min(shape))  # (a block is at least 64 rows or columns)
        assert sum(sizes) == math.prod(shape)  # each element read once
        assert max(sizes) <= limit
        if math.prod(shape) > limit:
            assert len(sizes) > 1
            split += 1
    assert split >= 9  # every mlp projection of the 3 blocks
    largest = max(checkpoint.tensors[k].nbytes for k in wanted)
    biggest_block = max(max(block, 64 * min(checkpoint.tensors[k].shape)) for k in wanted) * 4
    assert peak[0] <= torch.get_num_threads() * biggest_block
    assert peak[0] < largest


def test_layers_regex_selects_a_subset(tmp_path, capsys):
    _save("llama-fp32", tmp_path)
    full = analyze_checkpoint(tmp_path, progress=False)
    out = tmp_path / "sub.json"
    assert main(["analyze", str(tmp_path), "--layers", r"layers\.1\..*proj", "--json", str(out),
                 "--no-progress"]) == 0
    rows = json.loads(out.read_text())["layers"]
    assert [r["name"] for r in rows] == [r.name for r in full.layers
                                         if r.name.startswith("model.layers.1.")]
    for row in rows:
        assert row["alpha"] == pytest.approx(full[row["name"]].alpha, rel=1e-12)
        assert row["balanced"] == full[row["name"]].balanced  # --layers changes no TB flag
    # the in-memory path takes the same flag, with the same rows
    assert main(["analyze", str(tmp_path), "--no-stream", "--layers", r"layers\.1\..*proj",
                 "--json", str(out), "--no-progress"]) == 0
    assert [r["name"] for r in json.loads(out.read_text())["layers"]] == [r["name"] for r in rows]
    capsys.readouterr()
    assert main(["analyze", str(tmp_path), "--layers", "(", "--no-progress"]) == 2
    assert "--layers" in capsys.readouterr().err


def _first_shard(path):
    return sorted(path.glob("model-*.safetensors"))[0]


def _drop(path):
    shard = _first_shard(path)
    shard.unlink()
    return shard


def _truncate(path):
    shard = max(path.glob("model-*.safetensors"), key=lambda p: p.stat().st_size)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    return shard


def _bad_index(path):
    index_file = path / INDEX_FILE
    index = json.loads(index_file.read_text())
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = _first_shard(path).name
    index_file.write_text(json.dumps(index))
    return index_file


@pytest.mark.parametrize("damage", [_drop, _truncate, _bad_index])
def test_damaged_checkpoint_exits_2_naming_the_file(damage, tmp_path, capsys):
    _save("llama-fp32", tmp_path)
    named = damage(tmp_path)
    capsys.readouterr()  # (the save's own progress output)
    assert main(["analyze", str(tmp_path), "--no-progress"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and str(named) in err, err
    assert captured.out == ""


def test_bin_checkpoint_is_not_streamed_and_read_with_weights_only(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = _llama()
    model.config.architectures = ["LlamaForCausalLM"]
    model.config.save_pretrained(tmp_path / "arch")
    weights = tmp_path / "model.bin"
    torch.save(model.state_dict(), weights)
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    monkeypatch.setattr("hf_tempbalance.cli.analyze_checkpoint",
                        lambda *a, **k: pytest.fail("a .bin must not be streamed"))
    out = tmp_path / "bin.json"
    assert main(["analyze", str(weights), "--arch", str(tmp_path / "arch"), "--json", str(out),
                 "--no-progress"]) == 0
    assert calls == [True]
    rows = json.loads(out.read_text())["layers"]
    expected = analyze_model(model.eval(), progress=False)
    assert [r["name"] for r in rows] == [r.name for r in expected.layers]


# ---------------------------------------------------------------------------- other layouts
def _to_bin(path):
    """Rewrite a sharded safetensors save as the sharded pickles older Transformers wrote:
    ``pytorch_model-0000i-of-0000n.bin`` + ``pytorch_model.bin.index.json``."""
    from safetensors.torch import load_file

    index = json.loads((path / INDEX_FILE).read_text())
    names = {}
    shards = sorted(set(index["weight_map"].values()))
    for i, shard in enumerate(shards):
        names[shard] = f"pytorch_model-{i + 1:05d}-of-{len(shards):05d}.bin"
        torch.save(load_file(path / shard), path / names[shard])
        (path / shard).unlink()
    index["weight_map"] = {k: names[v] for k, v in index["weight_map"].items()}
    (path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    (path / INDEX_FILE).unlink()


def _save_layout(name, layout, path):
    torch.manual_seed(0)
    model = BUILDERS[name]()
    if layout == "safetensors-single":
        model.save_pretrained(path)  # small: one model.safetensors, no index
        assert (path / "model.safetensors").is_file() and not (path / INDEX_FILE).exists()
    elif layout == "bin-single":
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(path)
        torch.save(model.state_dict(), path / "pytorch_model.bin")
    else:
        _save_model(model, path)
        _to_bin(path)
        assert len(list(path.glob("pytorch_model-*.bin"))) > 2


LAYOUT_CASES = [("safetensors-single", "llama-bf16-tied"), ("safetensors-single", "mixtral-experts"),
                ("bin-sharded", "llama-bf16-tied"), ("bin-sharded", "mixtral-experts"),
                ("bin-sharded", "gpt2-packed-qkv"), ("bin-single", "llama-fp32")]


@pytest.mark.parametrize(("layout", "name"), LAYOUT_CASES)
def test_single_file_and_bin_checkpoints_stream_the_same_rows(layout, name, tmp_path, monkeypatch):
    _save_layout(name, layout, tmp_path)
    config = TempBalanceConfig(layer_types=("linear", "embedding"))
    loaded = _in_memory(tmp_path, config)
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append((kwargs.get("weights_only"), kwargs.get("mmap")))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    streamed = analyze_checkpoint(tmp_path, config, progress=False, block_elements=1024)
    _assert_same(streamed, loaded)
    if layout.startswith("bin"):
        assert calls and set(calls) == {(True, True)}  # every pickle: weights_only, mapped
    else:
        assert calls == []


def _bin_first_shard(path):
    return sorted(path.glob("pytorch_model-*.bin"))[0]


def _bin_drop(path):
    shard = _bin_first_shard(path)
    shard.unlink()
    return shard


def _bin_truncate(path):
    shard = max(path.glob("pytorch_model-*.bin"), key=lambda p: p.stat().st_size)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    return shard


def _bin_bad_index(path):
    index_file = path / "pytorch_model.bin.index.json"
    index = json.loads(index_file.read_text())
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = _bin_first_shard(path).name
    index_file.write_text(json.dumps(index))
    return index_file


def _single_truncate(path):
    file = path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 100])
    return file


@pytest.mark.parametrize(("layout", "damage"), [("bin-sharded", _bin_drop),
                                                ("bin-sharded", _bin_truncate),
                                                ("bin-sharded", _bin_bad_index),
                                                ("safetensors-single", _single_truncate)])
def test_damaged_single_file_or_bin_checkpoint_exits_2_naming_the_file(layout, damage, tmp_path,
                                                                      capsys):
    _save_layout("llama-fp32", layout, tmp_path)
    named = damage(tmp_path)
    capsys.readouterr()
    assert main(["analyze", str(tmp_path), "--no-progress"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and str(named) in err, err
    assert captured.out == ""


def test_a_pickle_with_code_is_refused(tmp_path, capsys):
    """A shard holding more than tensors is never unpickled (weights_only=True refuses it)."""
    _save_layout("llama-fp32", "bin-single", tmp_path)
    state = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    state["extra"] = _Unsafe()
    torch.save(state, tmp_path / "pytorch_model.bin")
    capsys.readouterr()
    assert main(["analyze", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "refusing to load" in err and str(tmp_path / "pytorch_model.bin") in err


class _Unsafe:
    pass


def test_whole_tensor_fallback_gives_the_same_rows(tmp_path, monkeypatch):
    """A layout the block path does not read is built whole and run through the engine (the
    reference path); both give the same rows."""
    from hf_tempbalance import streaming

    _save("mixtral-experts", tmp_path)
    config = TempBalanceConfig(layer_types=("linear", "embedding"))
    blocks = analyze_checkpoint(tmp_path, config, progress=False, block_elements=1024)
    monkeypatch.setattr(streaming, "_layout", lambda source, checkpoint: None)
    whole = analyze_checkpoint(tmp_path, config, progress=False)
    _assert_same(blocks, whole)
    _assert_same(whole, _in_memory(tmp_path, config))


def test_a_read_error_on_a_worker_thread_stops_the_run_and_exits_2(tmp_path, capsys, monkeypatch):
    """A shard that goes bad after the checks (here: cut short between the check and the read)
    fails its block read on a worker thread, and the command exits 2 with one line naming the
    file."""
    from hf_tempbalance import checkpoint_files

    _save("llama-fp32", tmp_path)
    shard = max(tmp_path.glob("model-*.safetensors"), key=lambda p: p.stat().st_size)
    real = checkpoint_files._read_header

    def header_then_cut(path):
        out = real(path)
        if path == shard:
            shard.write_bytes(shard.read_bytes()[:200])  # after its header was read and checked
        return out

    monkeypatch.setattr(checkpoint_files, "_read_header", header_then_cut)
    capsys.readouterr()
    assert main(["analyze", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(shard) in err and "truncated" in err, err
