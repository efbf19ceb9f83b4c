"""Make ``authors_fixture.json``: what the TempBalance authors' own code computes on seeded weights.

Run it against a checkout of the authors' public repository (github.com/YefanZhou/TempBalance);
their code is imported from there at generation time and is not part of this project::

    git clone https://github.com/YefanZhou/TempBalance /tmp/TempBalance
    python tests/parity/make_fixture.py --authors-dir /tmp/TempBalance

For each of their CIFAR-100 models (ResNet18, VGG16, VGG19, WRN-16-8) and their tensorized
transformer (the PTB run of ``language_modeling/``), and for each weight state of
:mod:`skeleton` (``init``, ``heavy_tailed``), it records

* the module tree (:func:`skeleton.describe`), so the tests rebuild the model without their code;
* with the settings of their shipped run configs (``bash_scripts/config/tb.txt``: median xmin,
  ``filter_zeros=False``, first/last layer removed, ``batchnorm_type='name'``; WRN's
  (0.6, 1.4); the LM's ``scripts/txt/ptb_tb.txt``: (1.0, 2.0), LayerNorm following the Linear
  before it): every balanced layer's metric and every parameter's LR for a base LR of 1
  (= its multiplier), for their default ``alpha`` + ``tb_linear_map`` and, on the CNNs, for the
  ``spectral_norm`` and ``alphahat`` metrics and the ``tb_sqrt``, ``tb_log2``, ``tb_step`` maps.

Their code runs on float64 copies of the weights, so the fixture holds the exact values of their
formulas for those weights; `.cuda()` calls in it are made no-ops so that it runs on a CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from skeleton import STATES, describe, seeded_weights  # noqa: E402

SEED = 43  # the first of the authors' seeds
OUT = Path(__file__).resolve().parent / "authors_fixture.json"

# (their net type, depth, width) -> our name, (s1, s2) of their run config
CNNS = {
    "resnet18": (("resnet", 18, 1), (0.5, 1.5)),
    "vgg16": (("vgg_cifar", 16, 1), (0.5, 1.5)),
    "vgg19": (("vgg_cifar", 19, 1), (0.5, 1.5)),
    "wrn16_8": (("wide_resnet", 16, 8), (0.6, 1.4)),
}
VARIANTS = [("alpha", "tb_linear_map"), ("spectral_norm", "tb_linear_map"),
            ("alphahat", "tb_linear_map"), ("alpha", "tb_sqrt"), ("alpha", "tb_log2"),
            ("alpha", "tb_step")]


def _import_authors(root: Path) -> types.SimpleNamespace:
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # their code calls .cuda() in fits
    lm_dir = root / "language_modeling" / "BTD-Transformer"
    sys.path[:0] = [str(root), str(lm_dir), str(lm_dir / "utils")]
    import esd_utils
    import networks
    from models import TensorizedTransformerLM
    from tempbalance import Tempbalance

    return types.SimpleNamespace(Tempbalance=Tempbalance, networks=networks, esd_utils=esd_utils,
                                 TensorizedTransformerLM=TensorizedTransformerLM)


def _cnn(authors, net_type: str, depth: int, width: int) -> torch.nn.Module:
    nets = authors.networks
    if net_type == "resnet":
        return nets.ResNet(depth, 100, width)
    if net_type == "vgg_cifar":
        return nets.VGG_cifar(depth, 100, width)
    return nets.Wide_ResNet(depth=depth, widen_factor=width, num_classes=100)


def _lm(authors) -> torch.nn.Module:
    # language_modeling/BTD-Transformer/scripts/tensorized/run_ptb_tb.sh and train_tb.py defaults
    return authors.TensorizedTransformerLM(
        10000, 3, 1, 256, 40, 2100, 0.3, 0.0, tie_weight=True, d_embed=256, div_val=1,
        tie_projs=[False], pre_lnorm=False, tgt_len=32, ext_len=0, mem_len=0, cutoffs=[],
        same_length=False, attn_type=0, clamp_len=-1, sample_softmax=-1)


def _names(model: torch.nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in model.named_parameters()}


def _cnn_record(authors, model: torch.nn.Module, s1: float, s2: float) -> dict:
    names = _names(model)
    out = {}
    for metric, assign in VARIANTS:
        tb = authors.Tempbalance(net=model, pl_fitting="median", xmin_pos=2, filter_zeros=False,
                                 remove_first_layer=True, remove_last_layer=True,
                                 esd_metric_for_tb=metric, assign_func=assign,
                                 lr_min_ratio=s1, lr_max_ratio=s2, batchnorm=True,
                                 batchnorm_type="name")
        groups, _ = tb.build_optimizer_param_group(untuned_lr=1.0, initialize=True)
        lrs = {names[id(p)]: float(g["lr"]) for g in groups for p in g["params"]}
        stats = tb.net_esd_estimator()
        # the layers their layer_stats keeps: first and last removed, then those under 50 eigs
        last = len(stats["longname"]) - 1
        metrics = {name: float(value) for i, (name, value, count) in enumerate(
            zip(stats["longname"], stats[metric], stats["eigs_num"])) if 0 < i < last and count >= 50}
        out[f"{metric}/{assign}"] = {"metric": metrics, "lr": lrs}
    return out


def _lm_record(authors, model: torch.nn.Module) -> dict:
    """Their train_tb.py's LR assignment (its script-level glue, around their ESD functions)."""
    import numpy as np

    names = _names(model)
    linears, kinds, ln_to_linear = [], [], {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            linears.append(name)
            kinds.append("linear")
        if isinstance(module, torch.nn.LayerNorm):
            if kinds[-1] == "linear":
                ln_to_linear[name] = linears[-1]
            linears.append(name)
            kinds.append("ln")
    stats = authors.esd_utils.net_esd_estimator(model, EVALS_THRESH=1e-5, bins=100,
                                                pl_fitting="median", xmin_pos=2, filter_zeros=False)
    keep = list(range(len(stats["longname"])))[:-1]  # remove_last_layer
    keep = [i for i in keep if len(stats["eigs"][i]) >= 50]  # remove_few_eigs_layer, eigs_thresh
    tuned = [stats["longname"][i] for i in keep]
    alphas = np.array([stats["alpha"][i] for i in keep])
    args = types.SimpleNamespace(lr_min_ratio=1.0, lr_slope=1.0)
    layer_lr = dict(zip(tuned, map(float, authors.esd_utils.get_layer_temps(
        args, "tb_linear_map", alphas, 1.0))))
    lrs = {name: 1.0 for name in names.values()}
    for name, module in model.named_modules():
        source = name if name in layer_lr else ln_to_linear.get(name)
        if source in layer_lr and (name in layer_lr or isinstance(module, torch.nn.LayerNorm)):
            for p in module.parameters():
                lrs[names[id(p)]] = layer_lr[source]
    metrics = {stats["longname"][i]: float(stats["alpha"][i]) for i in keep}
    return {"alpha/tb_linear_map": {"metric": metrics, "lr": lrs}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--authors-dir", type=Path, required=True,
                        help="checkout of github.com/YefanZhou/TempBalance")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    authors = _import_authors(args.authors_dir.resolve())
    torch.manual_seed(SEED)
    fixture = {"seed": SEED, "source": "github.com/YefanZhou/TempBalance", "models": {}}
    builders = {name: (lambda spec=spec: _cnn(authors, *spec)) for name, (spec, _) in CNNS.items()}
    builders["tensorized_lm"] = lambda: _lm(authors)
    for name, build in builders.items():
        model = build()
        entry = {"tree": describe(model), "states": {}}
        entry["s1_s2"] = list(CNNS[name][1]) if name in CNNS else [1.0, 2.0]
        for state in STATES:
            seeded_weights(model, SEED, state)
            reference = build().double()
            reference.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
            entry["states"][state] = (_cnn_record(authors, reference, *CNNS[name][1])
                                      if name in CNNS else _lm_record(authors, reference))
            print(f"{name} {state}: {len(entry['states'][state]['alpha/tb_linear_map']['metric'])}"
                  " layers", flush=True)
        fixture["models"][name] = entry
    args.out.write_text(json.dumps(fixture, indent=None, separators=(",", ":")) + "\n")
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
