"""The image-classification recipe: models, data, methods, runs, results and the sweep table.

Expectations are computed here from first principles (architecture formulas, hand-made IDX
files, NumPy statistics), not read back from the recipe's own helpers.
"""

from __future__ import annotations

import copy
import gzip
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("timm")
pytest.importorskip("datasets")
pytest.importorskip("transformers")

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
if str(RECIPES) not in sys.path:
    sys.path.insert(0, str(RECIPES))

import datasets  # noqa: E402
import image_classification as ic  # noqa: E402
import image_methods as im  # noqa: E402
import image_sweep as sweep  # noqa: E402
import timm  # noqa: E402
from image_data import get_spec, with_image_transforms  # noqa: E402
from image_data import loading as data_loading  # noqa: E402
from image_data.fashion_mnist import FILES, load_fashion_mnist, read_idx  # noqa: E402
from image_data.transforms import build_transform  # noqa: E402
from metrics import load_metric  # noqa: E402
from models.cifar_timm import wrn_blocks_per_stage, wrn_widths  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: one torch thread is fastest, and with OpenMP's default spin-wait two
    threads on a busy 2-core machine were measured ~200x slower per op (2.4 s vs 0.01 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _count(model: nn.Module, kind: type, kernel: int | None = None) -> int:
    return sum(1 for m in model.modules() if isinstance(m, kind)
               and (kernel is None or m.kernel_size[0] == kernel))


# ------------------------------------------------------------------------------------ models
@pytest.mark.parametrize("name, blocks", [("cifar_resnet18", (2, 2, 2, 2)),
                                          ("cifar_resnet34", (3, 4, 6, 3))])
def test_cifar_resnet_stem_depth_and_shapes(name: str, blocks: tuple[int, ...]) -> None:
    model = timm.create_model(name, num_classes=7, width=0.25).eval()
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    # 1 stem conv + 2 convs per BasicBlock + a 1x1 projection at each of the 3 downsampling stages
    assert _count(model, nn.Conv2d, 3) == 1 + 2 * sum(blocks)
    assert _count(model, nn.Conv2d, 1) == 3
    assert _count(model, nn.Linear) == 1
    x = torch.randn(2, 3, 32, 32)
    # three stride-2 stages: 32 -> 4; width 0.25: 512 / 4 = 128 channels
    assert model.forward_features(x).shape == (2, 128, 4, 4)
    assert model(x).shape == (2, 7)
    assert model(torch.randn(1, 3, 28, 28)).shape == (1, 7)


def test_width_multiplier_matches_paper_widths() -> None:
    # Paper (App. D Table 4): widths 256, 512, 768 of the last stage = multipliers 0.5, 1, 1.5.
    for width, last in ((0.5, 256), (1.0, 512), (1.5, 768)):
        assert timm.create_model("cifar_resnet18", num_classes=10, width=width).num_features == last
    assert timm.create_model("cifar_vgg16", num_classes=10, width=0.5).get_classifier().in_features == 256
    full = timm.create_model("cifar_resnet18", num_classes=10)
    # The standard CIFAR ResNet-18 has 11,173,962 parameters with 10 classes.
    assert sum(p.numel() for p in full.parameters()) == 11_173_962


@pytest.mark.parametrize("name, convs", [("cifar_vgg16", 13), ("cifar_vgg19", 16)])
def test_cifar_vgg_batchnorm_single_linear(name: str, convs: int) -> None:
    model = timm.create_model(name, num_classes=10, in_chans=1, width=0.125).eval()
    assert _count(model, nn.Conv2d) == convs
    assert _count(model, nn.BatchNorm2d) == convs
    assert _count(model, nn.Linear) == 1
    assert model.get_classifier().in_features == 64  # 512 * 0.125
    # 28-pixel images (Fashion-MNIST) survive the five max-pools
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("name, depth, k", [("wrn16_8", 16, 8), ("wrn28_6", 28, 6)])
def test_wide_resnet_depth_and_width_formulas(name: str, depth: int, k: int) -> None:
    n = (depth - 4) // 6
    assert wrn_blocks_per_stage(depth) == n
    assert wrn_widths(k) == (16, 16 * k, 32 * k, 64 * k)
    model = timm.create_model(name, num_classes=10, width=0.25).eval()
    # 3x3: stem + 2 per block over 3 stages; 1x1: one projection per stage (16 -> 16k changes too)
    assert _count(model, nn.Conv2d, 3) == 1 + 6 * n
    assert _count(model, nn.Conv2d, 1) == 3
    assert _count(model, nn.Linear) == 1
    assert model.num_features == 64 * k // 4
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    model.reset_classifier(3)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    with pytest.raises(ValueError, match="6n\\+4"):
        wrn_blocks_per_stage(depth + 1)


def test_wrn16_8_parameter_count_matches_the_wrn_paper() -> None:
    # Zagoruyko & Komodakis (2016), Table: WRN-16-8 on CIFAR-10 has 11.0M parameters.
    model = timm.create_model("wrn16_8", num_classes=10)
    assert abs(sum(p.numel() for p in model.parameters()) / 1e6 - 11.0) < 0.05


def test_recipe_model_names() -> None:
    assert type(ic.create_model("resnet18", 10, 3)).__name__ == "CifarResNet"
    assert type(ic.create_model("wrn16_8", 10, 3, width=0.25)).__name__ == "WideResNet"
    plain = ic.create_model("resnet10t", 10, 3)  # any timm name works as-is
    assert plain.pretrained_cfg["architecture"] == "resnet10t"
    with pytest.raises(ValueError, match="--width"):
        ic.create_model("resnet10t", 10, 3, width=0.5)
    with pytest.raises(ValueError, match="unknown model"):
        ic.create_model("no_such_net", 10, 3)


# ------------------------------------------------------------------------------------ data
def test_eval_transform_normalises_exactly() -> None:
    spec = get_spec("fashion_mnist")
    image = Image.fromarray(np.full((28, 28), 51, dtype=np.uint8))
    out = build_transform(spec, train=False)(image)
    assert out.shape == (1, 28, 28) and out.dtype == torch.float32
    expected = (51 / 255 - spec.mean[0]) / spec.std[0]
    assert torch.allclose(out, torch.full_like(out, expected), atol=1e-6)


def test_train_transform_is_a_padded_crop_and_maybe_a_flip() -> None:
    spec = get_spec("cifar10")
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    plain = build_transform(spec, train=False)(Image.fromarray(pixels))
    train = build_transform(spec, train=True)
    zero = torch.tensor([(0 - m) / s for m, s in zip(spec.mean, spec.std)]).view(3, 1, 1)
    padded = zero.expand(3, 40, 40).clone()
    padded[:, 4:36, 4:36] = plain
    candidates = [padded[:, dy:dy + 32, dx:dx + 32] for dy in range(9) for dx in range(9)]
    candidates += [c.flip(-1) for c in candidates]
    flipped_seen = shifted_seen = False
    for seed in range(20):
        torch.manual_seed(seed)
        out = train(Image.fromarray(pixels))
        match = [i for i, c in enumerate(candidates) if torch.allclose(out, c, atol=1e-6)]
        assert match, "train output is not a 4-pixel-padded crop (optionally flipped) of the image"
        flipped_seen |= match[0] >= 81
        shifted_seen |= match[0] % 81 != 40  # 40 = centred crop
    assert flipped_seen and shifted_seen
    assert not get_spec("svhn").hflip  # digits are not mirror-symmetric


def test_dataset_transform_rows() -> None:
    spec = get_spec("cifar100")
    raw = datasets.Dataset.from_dict(
        {"img": [np.zeros((32, 32, 3), np.uint8), np.full((32, 32, 3), 255, np.uint8)],
         "fine_label": [3, 97]},
        features=datasets.Features({"img": datasets.Image(), "fine_label": datasets.Value("int64")}))
    rows = with_image_transforms(raw, spec, train=False)
    assert rows[1]["labels"] == 97
    assert rows[1]["pixel_values"].shape == (3, 32, 32)
    expected = torch.tensor([(1 - m) / s for m, s in zip(spec.mean, spec.std)])
    assert torch.allclose(rows[1]["pixel_values"][:, 0, 0], expected, atol=1e-6)


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def _fake_fashion_mnist(data_dir: Path, n_train: int = 24, n_test: int = 12) -> Path:
    """Tiny IDX files in the layout the Debian package unpacks to."""
    folder = data_dir / "fashion_mnist" / "usr/share/datasets/fashion-mnist"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for split, n in (("train", n_train), ("test", n_test)):
        images, labels = FILES[split]
        labels_arr = np.arange(n) % 10
        # class c is a bright square at a class-dependent place: learnable in a few steps
        pics = rng.integers(0, 40, (n, 28, 28))
        for i, c in enumerate(labels_arr):
            pics[i, 2 * c:2 * c + 8, 2 * c:2 * c + 8] = 250
        _write_idx(folder / images, pics)
        _write_idx(folder / labels, labels_arr)
    return folder


def test_idx_reader_and_local_fashion_mnist(tmp_path: Path) -> None:
    folder = _fake_fashion_mnist(tmp_path)
    labels = read_idx(folder / FILES["train"][1])
    assert labels.tolist() == [i % 10 for i in range(24)]
    dataset = load_fashion_mnist(tmp_path, download=False)
    assert len(dataset["train"]) == 24 and len(dataset["test"]) == 12
    first = np.asarray(dataset["train"][0]["image"])
    assert first.shape == (28, 28) and first[0:8, 0:8].min() == 250
    assert dataset["train"].features["label"].names[9] == "Ankle boot"
    assert (tmp_path / "fashion_mnist" / "arrow" / "dataset_dict.json").exists()  # cached
    # made whole and renamed into place: no staging folder left, and a second conversion that
    # finds the cache already there (a concurrent run) keeps it and cleans up after itself
    assert sorted(p.name for p in (tmp_path / "fashion_mnist").iterdir()) == ["arrow", "usr"]
    (tmp_path / "fashion_mnist" / "arrow" / "dataset_dict.json").rename(tmp_path / "moved.json")
    again = load_fashion_mnist(tmp_path, download=False)  # converts again: the cache looks unfinished
    assert len(again["train"]) == 24
    assert sorted(p.name for p in (tmp_path / "fashion_mnist").iterdir()) == ["arrow", "usr"]
    bad = tmp_path / "bad.gz"
    with gzip.open(bad, "wb") as fh:
        fh.write(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(bad)


def test_missing_data_fails_at_once_with_how_to(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(FileNotFoundError, match="apt-get download dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path / "empty", download=False)

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(data_loading.DataUnavailableError, match="load_dataset\\('uoft-cs/cifar100'"):
        data_loading.load_image_dataset(get_spec("cifar100"), tmp_path)


@pytest.mark.parametrize("flags, said", [
    (["--tb_s1", "2", "--tb_s2", "1"], "--method tb: --tb_s2=1.0: must be a finite number >= s1=2.0"),
    # one end given: the message names the flag given, not the paper's other end
    (["--tb_s1", "2"], "--method tb: --tb_s1=2.0 is above s2=1.5, the paper's largest multiplier"),
    (["--tb_s2", "0.4"], "--method tb: --tb_s2=0.4 is below s1=0.5, the paper's smallest"),
    (["--tb_interval", "weekly"], "--method tb: --tb_interval='weekly': give a number of optimizer"),
    (["--tb_interval", "0"], "--method tb: --tb_interval=0: must be a positive number"),
    (["--lr", "-1"], "learning rate -1 (--lr / --lrs): must be > 0"),
    (["--method", "cal", "tb", "--lrs", "0.1", "0"], "learning rate 0 (--lr / --lrs): must be > 0")])
def test_bad_settings_are_refused_before_the_data_loads(tmp_path: Path, monkeypatch, flags, said):
    def no_data(*args, **kwargs):
        raise AssertionError("the data was loaded before the settings were checked")

    monkeypatch.setattr(ic, "prepare_data", no_data)
    with pytest.raises(ic.UsageError) as err:
        ic.main(["--dataset", "fashion_mnist", "--data_dir", str(tmp_path / "none"),
                 "--output_dir", str(tmp_path / "out"), "--use_cpu", "true", *flags])
    assert str(err.value).startswith(said), str(err.value)
    assert not (tmp_path / "none").exists() and not (tmp_path / "out").exists()


def test_offline_accuracy_metric() -> None:
    metric = load_metric("accuracy", offline=True)
    preds, refs = np.array([0, 1, 2, 2, 1]), np.array([0, 2, 2, 2, 0])
    assert metric.compute(predictions=preds, references=refs)["accuracy"] == pytest.approx(0.6)
    weights = np.array([1.0, 2.0, 3.0, 1.0, 1.0])
    weighted = metric.compute(predictions=preds, references=refs, sample_weight=weights)
    assert weighted["accuracy"] == pytest.approx((1 + 3 + 1) / weights.sum())


# ------------------------------------------------------------------------------------ methods
def _training_args(tmp_path: Path, **kwargs) -> TrainingArguments:
    defaults = dict(ic.TRAINING_DEFAULTS, output_dir=str(tmp_path / "out"), learning_rate=0.05,
                    use_cpu=True)
    defaults.update(kwargs)
    return TrainingArguments(**defaults)


EXPECTED_OPTIMIZER = {
    "sgdr": "SGD", "lars": "Lars", "lamb": "Lamb", "sgdp": "SGDP", "lookahead": "Lookahead",
    "adam": "Adam", "adamw": "AdamW", "tb+sgdp": "SGDP",
}


@pytest.mark.parametrize("method", list(im.METHODS))
def test_each_method_builds_its_optimizer_and_groups(method: str, tmp_path: Path) -> None:
    model = ic.ImageClassifier(timm.create_model("cifar_resnet18", num_classes=10, width=0.125))
    args = _training_args(tmp_path, eval_strategy="no")
    optimizer, scheduler = im.build_optimizer(method, model, args, num_examples=1000, sgdr_t0=3,
                                              sgdr_t_mult=2, lookahead_k=4, lookahead_alpha=0.3)
    if optimizer is None:  # the Trainer's own: SGD, momentum 0.9 from args.optim_args
        optimizer = Trainer(model=model, args=args).create_optimizer()
        assert type(optimizer).__name__ == "SGD" and not optimizer.defaults["nesterov"]
    else:
        assert type(optimizer).__name__ == EXPECTED_OPTIMIZER[method]
    groups = optimizer.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    # Trainer's rule on a BatchNorm CNN: everything but biases decays (BN weights included).
    assert decayed == {n for n, _ in model.named_parameters() if "bias" not in n}
    assert {g["weight_decay"] for g in groups} == {5e-4, 0.0}
    assert all(g["lr"] == 0.05 for g in groups)
    if "momentum" in groups[0]:
        assert groups[0]["momentum"] == 0.9
    if method == "lars":
        assert all(g["always_adapt"] for g in groups)
    if method == "lamb":
        assert groups[0]["eps"] == 1e-6
    if method == "lookahead":
        assert groups[0]["lookahead_k"] == 4 and groups[0]["lookahead_alpha"] == 0.3
    if method == "sgdr":
        # T_0 = 3 epochs of ceil(1000 / 128) = 8 steps
        assert isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingWarmRestarts)
        assert scheduler.T_0 == 3 * math.ceil(1000 / 128) and scheduler.T_mult == 2
    else:
        assert scheduler is None

    *_, method_args, _ = ic.parse_args(["--method", method, "--tb_s1", "0.6", "--tb_s2", "1.4",
                                        "--tb_snr_strength", "0.01", "--tb_interval", "5"])
    config = ic.method_tempbalance_config(method, "cifar100", ic.ModelArguments(), method_args)
    spec = im.METHODS[method]
    if not (spec.tempbalance or spec.snr):
        assert config is None
    else:
        assert config.balance_lr == spec.tempbalance
        assert config.snr_strength == (0.01 if spec.snr else 0.0)
        assert (config.s1, config.s2, config.interval) == (0.6, 1.4, 5)


def test_tempbalance_reaches_the_optimizer_inside_timm_lookahead(tmp_path: Path) -> None:
    # timm's Lookahead skips Optimizer.__init__, so hooks on it never run: the engine must hook
    # the base optimizer it wraps.
    from hf_tempbalance import TempBalance

    model = ic.ImageClassifier(timm.create_model("cifar_resnet18", num_classes=10, width=0.125))
    optimizer, _ = im.build_optimizer("lookahead", model, _training_args(tmp_path, eval_strategy="no"),
                                      num_examples=64)
    engine = TempBalance(model, interval=1).attach(optimizer)
    seen = {}
    base = optimizer._base_optimizer
    base.register_step_pre_hook(lambda opt, *a: seen.update(
        {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}))
    model(torch.randn(4, 3, 28, 28), torch.arange(4)).loss.backward()
    optimizer.step()
    assert engine.num_updates == 1 and engine.num_steps == 1
    named = dict(model.named_parameters())
    for layer in engine.plan.layers:
        weight = named[layer.param_names[0]]
        assert seen[id(weight)] == pytest.approx(0.05 * engine.multipliers[layer.name])
    assert min(engine.multipliers.values()) == pytest.approx(0.5)


def test_paper_defaults() -> None:
    # Appendix D Table 1 / Table 2
    assert im.paper_lr("cal", "cifar100", "resnet34") == 0.05
    assert im.paper_lr("tb", "cifar100", "resnet34") == 0.1
    assert im.paper_lr("tb", "cifar100", "vgg16") == 0.05
    assert im.paper_lr("lars", "cifar100", "resnet18") == 28.0
    assert im.paper_lr("lamb", "cifar100", "resnet18") == 0.01
    assert im.paper_tb_range("tb", "cifar100", "resnet18") == (0.5, 1.5)
    assert im.paper_tb_range("tb", "tiny_imagenet", "resnet18") == (0.6, 1.4)
    assert im.paper_tb_range("tb", "tiny_imagenet", "wrn16_8") == (0.6, 1.4)
    assert im.paper_snr_strength("snr", "cifar100", "resnet18") == 0.01
    assert im.paper_snr_strength("tb+snr", "cifar100", "resnet18") == 0.001
    assert im.PAPER_SEEDS == (43, 37, 13, 51, 71)


def test_cli_defaults_and_aliases() -> None:
    model_args, data_args, method_args, args = ic.parse_args(
        ["--dataset", "fashion_mnist", "--method", "cal", "tb", "--lr", "0.2", "--epochs=3",
         "--seeds", "1", "2", "--output-dir", "somewhere", "--max-train-samples", "100"])
    assert (args.learning_rate, args.num_train_epochs, args.output_dir) == (0.2, 3, "somewhere")
    assert method_args.method == ["cal", "tb"] and method_args.seeds == [1, 2]
    assert data_args.max_train_samples == 100
    assert (args.per_device_train_batch_size, args.weight_decay, args.max_grad_norm) == (128, 5e-4, 0)
    assert args.lr_scheduler_type.value == "cosine"
    *_, default = ic.parse_args(["--method", "lars"])
    assert default.learning_rate is None and default.num_train_epochs == 200 and default.seed == 43
    runs = ic.grid(ic.MethodArguments(method=["cal", "lars"]), default, "cifar100", "resnet18")
    assert runs == [("cal", 0.1, 43), ("lars", 28.0, 43)]
    two = ic.grid(ic.MethodArguments(method=["cal", "tb"], lrs=[0.1, 0.2], seeds=[1, 2]), default,
                  "cifar100", "resnet18")
    assert two == [("cal", 0.1, 1), ("tb", 0.1, 1), ("cal", 0.1, 2), ("tb", 0.1, 2),
                   ("cal", 0.2, 1), ("tb", 0.2, 1), ("cal", 0.2, 2), ("tb", 0.2, 2)]
    with pytest.raises(ValueError, match="unknown method"):
        ic.grid(ic.MethodArguments(method=["sgd"]), default, "cifar100", "resnet18")


def _config_for(argv: list[str], method: str, dataset: str = "cifar100"):
    model_args, _, method_args, _ = ic.parse_args(argv)
    return ic.method_tempbalance_config(method, dataset, model_args, method_args)


def test_tb_flags_fall_back_to_the_papers_values_per_method_and_model() -> None:
    # Appendix D, Table 1: (0.5, 1.5) for ResNet18 on CIFAR-100; TB+SNR (0.6, 1.4) and λ_sr 1e-3;
    # SNR alone 1e-2 without balancing; timm's VGG pairs each BN with the conv before it.
    from hf_tempbalance import TempBalanceConfig

    assert _config_for(["--method", "tb"], "tb") == TempBalanceConfig(log_layers=False)
    assert _config_for(["--method", "tb+snr"], "tb+snr") == TempBalanceConfig(
        s1=0.6, s2=1.4, snr_strength=1e-3, log_layers=False)
    assert _config_for(["--method", "snr"], "snr") == TempBalanceConfig(
        balance_lr=False, snr_strength=1e-2, log_layers=False)
    assert _config_for(["--method", "tb", "--model", "vgg16"], "tb").norm_follow == "previous"
    assert _config_for(["--method", "tb"], "tb", "tiny_imagenet").s2 == 1.4
    # a given flag wins over the paper's value; a method without SNR regularises nothing
    given = _config_for(["--method", "tb", "--tb_s1", "0.7", "--tb_snr_strength", "0.5",
                         "--tb_norm_follow", "next", "--tb_xmin", "ks"], "tb")
    assert (given.s1, given.s2, given.snr_strength, given.norm_follow, given.xmin) == (
        0.7, 1.5, 0.0, "next", "ks")
    assert _config_for(["--method", "cal", "--tb_s1", "0.7"], "cal") is None


@pytest.mark.parametrize("flag", ["--use_tempbalance", "--s1=0.6", "--snr_strength=0.1"])
def test_one_switch_and_the_library_flag_names(flag: str) -> None:
    # --method decides whether TempBalance runs; the knobs are the library's --tb_* flags only
    with pytest.raises(ValueError, match="not used by the HfArgumentParser"):
        ic.parse_args(["--method", "tb", flag])


def test_the_long_study_command_keeps_its_settings() -> None:
    """The command recipes/studies/fashion_mnist_long.py launches (and resumes) must describe the
    run it described when its checkpoints were made: the same TempBalance config and the same
    recorded settings (the values here are those the earlier --s1/--s2 recipe recorded)."""
    if str(RECIPES / "studies") not in sys.path:
        sys.path.insert(0, str(RECIPES / "studies"))
    import fashion_mnist_long

    from hf_tempbalance import TempBalanceConfig

    args = fashion_mnist_long.StudyArguments()
    runs = {run.key.split("_")[0]: run for run in fashion_mnist_long.build_runs(args)}
    assert set(runs) == {"cal", "tb"}
    for method, run in runs.items():
        script = run.command.index(str(RECIPES / "image_classification.py"))
        argv = run.command[script + 1:] + ["--output_dir", "out"]
        model_args, data_args, method_args, targs = ic.parse_args(argv)
        tb_config = ic.method_tempbalance_config(method, data_args.dataset, model_args, method_args)
        settings = ic.run_settings(method, model_args, method_args, targs, 60000, 10000,
                                   data_args.dataset, tb_config)
        assert settings["method_args"] == {"sgdr_t0": 10, "sgdr_t_mult": 2, "lookahead_k": 5,
                                           "lookahead_alpha": 0.5}
        expected = (TempBalanceConfig(s1=0.5, s2=1.5, interval="epoch", log_layers=False).to_dict()
                    if method == "tb" else None)
        assert settings["tempbalance_config"] == expected
        assert (settings["lr"], settings["seed"], settings["epochs"], settings["batch_size"]) == (
            run.settings["lr"], run.settings["seed"], args.epochs, args.batch_size)


# ------------------------------------------------------------------------------------ runs
def _tiny_data():
    spec = get_spec("fashion_mnist")
    rng = np.random.default_rng(0)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})

    def make(n):
        return datasets.Dataset.from_dict(
            {"image": list(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)),
             "label": (np.arange(n) % 10).tolist()}, features=features)

    return spec, with_image_transforms(make(8), spec, True), with_image_transforms(make(6), spec, False)


@pytest.mark.parametrize("method", list(im.METHODS))
def test_two_step_run_of_each_method(method: str, tmp_path: Path) -> None:
    args = _training_args(tmp_path, max_steps=2, per_device_train_batch_size=4,
                          learning_rate=im.paper_lr(method, "fashion_mnist", "resnet18") / 10,
                          disable_tqdm=True)
    method_args = ic.MethodArguments(method=[method], tb_interval="1", sgdr_t0=1)
    results = ic.train_one(method, ic.ModelArguments(model="resnet18", width=0.125),
                           ic.DataArguments(dataset="fashion_mnist"), method_args, args,
                           _tiny_data())
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    for key in ("dataset", "model", "method", "seed", "lr", "epochs", "test_accuracy", "history"):
        assert saved[key] == results[key]
    assert (saved["dataset"], saved["method"], saved["steps"]) == ("fashion_mnist", method, 2)
    assert saved["lr"] == args.learning_rate and saved["seed"] == 43
    # 6 test images: accuracy is a multiple of 1/6, and the last history row holds it
    assert round(saved["test_accuracy"] * 6, 6) == round(saved["test_accuracy"] * 6)
    assert saved["history"][-1]["test_accuracy"] == saved["test_accuracy"]
    assert math.isfinite(saved["history"][-1]["test_loss"])
    spec = im.METHODS[method]
    if spec.tempbalance or spec.snr:
        tb = saved["tempbalance"]
        assert tb["config"]["balance_lr"] == spec.tempbalance
        assert (tb["config"]["snr_strength"] > 0) == spec.snr
        if spec.tempbalance:
            # interval 1: multipliers recomputed before both optimizer steps
            assert tb["updates"] == 2
            assert {row["step"] for row in tb["history"]} == {0, 1}
            assert {row["layer"] for row in tb["history"]} == set(tb["layers"])
            mults = [row["multiplier"] for row in tb["history"]]
            s1, s2 = tb["config"]["s1"], tb["config"]["s2"]
            assert min(mults) == pytest.approx(s1) and max(mults) == pytest.approx(s2)
        else:
            assert tb["updates"] == 0 and tb["history"] == []
    else:
        assert "tempbalance" not in saved


# ------------------------------------------------------------------------------------ sweep
def test_sweep_aggregation_mean_std_and_best(tmp_path: Path) -> None:
    acc = {("cal", 0.05): [0.80, 0.82, 0.81], ("cal", 0.1): [0.83, 0.85, 0.80],
           ("tb", 0.05): [0.84, 0.84, 0.86], ("tb", 0.1): [0.79, 0.81, 0.80]}
    runs = [{"method": m, "lr": lr, "seed": s, "test_accuracy": a}
            for (m, lr), values in acc.items() for s, a in zip((43, 37, 13), values)]
    cells = {(c.method, c.lr): c for c in sweep.aggregate(runs)}
    for key, values in acc.items():
        pct = 100 * np.asarray(values)
        assert cells[key].mean == pytest.approx(pct.mean())
        assert cells[key].std == pytest.approx(pct.std(ddof=1))
        assert cells[key].seeds == (43, 37, 13)
    best = sweep.best_lrs(list(cells.values()))
    assert best["cal"].lr == 0.1 and best["tb"].lr == 0.05  # 82.67 > 81.00; 84.67 > 80.00
    table = sweep.format_table(list(cells.values()))
    assert f"**{100 * np.mean(acc[('tb', 0.05)]):.2f} ± " in table
    assert f"| {100 * np.mean(acc[('cal', 0.05)]):.2f} ± " in table  # not bold
    paths = sweep.write_sweep_outputs(runs, tmp_path)
    summary = json.loads(Path(paths["summary"]).read_text())
    assert sum(c["best"] for c in summary["cells"]) == 2
    assert Path(paths["plot"]).stat().st_size > 1000
    single = sweep.aggregate(runs[:1])[0]
    assert single.std is None and single.mean == pytest.approx(80.0)
    assert single.format() == "80.00 (1 seed)"  # no "± 0.00": one seed has no spread
    one_seed = sweep.write_sweep_outputs([r for r in runs if r["seed"] == 43], tmp_path / "one")
    cells_one = json.loads(Path(one_seed["summary"]).read_text())["cells"]
    assert cells_one and all(c["std"] is None for c in cells_one)  # null, not a measured 0.0
    assert Path(one_seed["plot"]).stat().st_size > 1000
    # a partial grid: cal at a third LR has one seed, higher than any complete cell; not the best
    partial = sweep.aggregate(runs + [{"method": "cal", "lr": 0.2, "seed": 43, "test_accuracy": 0.99}])
    assert sweep.best_lrs(partial)["cal"].lr == 0.1


@pytest.mark.slow
def test_sweep_end_to_end_and_demo(tmp_path: Path, monkeypatch) -> None:
    """A 2-method x 2-seed grid through main(), then the demo, on hand-made IDX files."""
    _fake_fashion_mnist(tmp_path / "data", n_train=16, n_test=10)
    out = tmp_path / "grid"
    argv = ["--dataset", "fashion_mnist", "--data-dir", str(tmp_path / "data"),
            "--model", "resnet18", "--width", "0.125", "--method", "cal", "tb",
            "--seeds", "1", "2", "--lr", "0.05", "--max_steps", "2",
            "--per_device_train_batch_size", "8", "--tb-interval", "1",
            "--output-dir", str(out), "--disable_tqdm", "true", "--use_cpu", "true"]
    results = ic.main(argv)
    assert [(r["method"], r["seed"]) for r in results] == [("cal", 1), ("tb", 1), ("cal", 2), ("tb", 2)]
    for r in results:
        assert (out / r["method"] / "lr0.05" / f"seed{r['seed']}" / "results.json").exists()
    table = (out / "sweep_table.md").read_text()
    mean_cal = 100 * np.mean([r["test_accuracy"] for r in results if r["method"] == "cal"])
    assert f"{mean_cal:.2f} ± " in table
    assert (out / "sweep_bars.png").exists()

    # A second call over the same grid reuses every results.json instead of training again ...
    trained = []

    def record_training(method, model_args, data_args, method_args, args, data=None):
        trained.append((method, args.seed, args.per_device_train_batch_size, args.max_steps))
        return {**results[0], "method": method, "seed": args.seed}  # what the table needs

    monkeypatch.setattr(ic, "train_one", record_training)
    again = ic.main(argv)
    assert trained == [] and again == json.loads(json.dumps(results))
    # ... and a folder holding a run of other settings is refused before anything trains, naming
    # the folder and the setting (results.json may be the only copy of a long run) ...
    with pytest.raises(ic.UsageError, match=r"cal/lr0.05/seed1/results.json holds a run made with "
                                            r"other settings \(max_steps 2 there, 3 here\)"):
        ic.main([*argv, "--max_steps", "3"])
    interval = [*argv[:argv.index("--tb-interval")], "--tb-interval", "2",
                *argv[argv.index("--tb-interval") + 2:]]
    with pytest.raises(ic.UsageError, match=r"tb/lr0.05/seed1/results.json holds a run made with "
                                            r"other settings \(tempbalance_config "):
        ic.main(interval)  # CAL has no TempBalance settings: its folders are not in the way
    for flag, value, recorded in (("--adam_beta2", "0.95", "adam_beta2 0.999 there, 0.95 here"),
                                  ("--dataloader_num_workers", "1",
                                   "dataloader_num_workers 0 there, 1 here")):
        with pytest.raises(ic.UsageError, match=recorded):  # the optimizer's; the augmentation draws
            ic.main([*argv, flag, value])
    assert trained == []
    # ... unless --rerun, which trains every run again
    ic.main([*argv, "--max_steps", "3", "--rerun", "true"])
    assert trained == [(m, seed, 8, 3) for seed in (1, 2) for m in ("cal", "tb")]
    # a single run into a grid's run folder is held to the same rule
    single = ["--dataset", "fashion_mnist", "--data-dir", str(tmp_path / "data"), "--model",
              "resnet18", "--width", "0.125", "--method", "cal", "--seeds", "1", "--lr", "0.05",
              "--max_steps", "3", "--per_device_train_batch_size", "8",
              "--output-dir", str(out / "cal" / "lr0.05" / "seed1"), "--disable_tqdm", "true",
              "--use_cpu", "true"]
    with pytest.raises(ic.UsageError, match=r"max_steps 2 there, 3 here"):
        ic.main(single)
    monkeypatch.undo()

    import demo

    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    try:  # the demo sets the process's torch threads
        demo_results = demo.main(["--data-dir", str(tmp_path / "data"), "--train-samples", "16",
                                  "--eval-samples", "10", "--epochs", "2", "--width", "0.125",
                                  "--tb-interval", "1", "--output-dir", str(tmp_path / "demo")])
    finally:
        torch.set_num_threads(threads)
    assert {r["method"] for r in demo_results} == {"cal", "tb"}
    for png in ("test_accuracy.png", "tb_layer_heatmaps.png", "tb_layer_curves.png"):
        assert (tmp_path / "demo" / png).stat().st_size > 1000
    text = demo.report(demo_results)
    diff = 100 * (demo_results[1]["test_accuracy"] - demo_results[0]["test_accuracy"])
    assert f"TB - CAL = {diff:+.2f} points" in text


def test_a_run_without_updates_does_not_take_an_earlier_runs_history(tmp_path: Path) -> None:
    """The history file in the folder is this run's only once it wrote a row: a replacing run that
    records none (--tb_balance_lr false) must not report the earlier run's updates as its own."""
    _fake_fashion_mnist(tmp_path / "data", n_train=16, n_test=10)
    argv = ["--dataset", "fashion_mnist", "--data-dir", str(tmp_path / "data"), "--model",
            "resnet18", "--width", "0.125", "--method", "tb", "--lr", "0.05", "--max_steps", "2",
            "--per_device_train_batch_size", "8", "--tb-interval", "1", "--output-dir",
            str(tmp_path / "run"), "--disable_tqdm", "true", "--use_cpu", "true"]
    (first,) = ic.main(argv)
    assert first["tempbalance"]["updates"] == 2 and len(first["tempbalance"]["history"]) > 0
    (second,) = ic.main([*argv, "--tb_balance_lr", "false", "--rerun", "true"])
    assert second["tempbalance"]["updates"] == 0 and second["tempbalance"]["history"] == []
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["tempbalance"]["history"] == []


def test_epoch_history_keeps_a_fractional_last_epoch():
    # The Trainer's log_history of `--epochs 2.5` with eval_strategy="epoch": evaluations at
    # epochs 1 and 2, and the final one at 2.5, which must not overwrite epoch 2's.
    logs = [{"loss": 2.0, "learning_rate": 0.1, "epoch": 1.0}, {"eval_loss": 1.9, "eval_accuracy": 0.3, "epoch": 1.0},
            {"loss": 1.5, "learning_rate": 0.05, "epoch": 2.0}, {"eval_loss": 1.4, "eval_accuracy": 0.5, "epoch": 2.0},
            {"eval_loss": 1.3, "eval_accuracy": 0.55, "epoch": 2.5}, {"train_runtime": 3.0, "epoch": 2.5}]
    assert ic.epoch_history(logs) == [
        {"epoch": 1, "train_loss": 2.0, "learning_rate": 0.1, "test_loss": 1.9, "test_accuracy": 0.3},
        {"epoch": 2, "train_loss": 1.5, "learning_rate": 0.05, "test_loss": 1.4, "test_accuracy": 0.5},
        {"epoch": 2.5, "test_loss": 1.3, "test_accuracy": 0.55}]


def test_channels_last_input_gives_the_same_model_outputs_and_gradients() -> None:
    """--channels_last only changes the memory layout: same loss and gradients up to rounding, and
    the weights stay contiguous (checkpoints are saved as safetensors)."""
    torch.manual_seed(0)
    net = ic.create_model("resnet18", 10, 1, width=0.125)
    plain = ic.ImageClassifier(net)
    fast = ic.ImageClassifier(copy.deepcopy(net), channels_last=True)
    x, y = torch.randn(8, 1, 28, 28), torch.arange(8)
    seen = []
    fast.net.layer1.register_forward_hook(lambda m, i, o: seen.append(
        o.is_contiguous(memory_format=torch.channels_last) and not o.is_contiguous()))
    out_plain, out_fast = plain(x, y), fast(x, y)
    assert seen == [True]  # the activations really are channels-last
    out_plain.loss.backward()
    out_fast.loss.backward()
    assert torch.allclose(out_fast.logits, out_plain.logits, atol=1e-5)
    for (name, a), (_, b) in zip(plain.named_parameters(), fast.named_parameters()):
        assert b.is_contiguous() and b.grad is not None, name
        assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-4), name
