"""``torchbayes train --method bayesian|deterministic|dropout|ensemble|ivon``: training, checkpoints, reports."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from torchbayes import Ensemble, posterior_mean
from torchbayes.cli import EXIT_OK, EXIT_USAGE, main
from torchbayes.cli.training import TrainConfig, build_classifier, load_checkpoint
from torchbayes.datasets import load_image_dataset
from torchbayes.nn import BayesLinear

COMMON = ["--dataset", "digits", "--model", "mlp", "--ood-classes", "8,9", "--quiet", "--num-samples", "8"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One checkpoint per method, trained briefly by the command."""
    folder = tmp_path_factory.mktemp("methods")
    paths = {}
    for method, extra in (("dropout", ["--dropout", "0.2"]), ("ensemble", ["--members", "3"]),
                          ("bayesian", ["--pretrain-epochs", "2", "--bayesian-layers", "1"]),
                          ("ivon", ["--ivon-epochs", "6", "--ivon-lr", "0.4"])):
        paths[method] = folder / f"{method}.pt"
        argv = ["train", *COMMON, "--method", method, *extra, "--epochs", "2", "--out", str(paths[method])]
        assert main(argv) == EXIT_OK
    return folder, paths


def _reload_accuracy(model: nn.Module, data) -> float:
    with torch.no_grad(), posterior_mean(model):
        logits = model(data.test_x)
    if isinstance(model, Ensemble):  # the members' mean probabilities
        logits = logits.softmax(-1).mean(0)
    return float((logits.argmax(-1) == data.test_y).double().mean())


def test_checkpoints_rebuild_each_method(checkpoints):
    _, paths = checkpoints
    data = load_image_dataset("digits", ood_classes=(8, 9))
    for method, path in paths.items():
        ckpt = load_checkpoint(path)
        assert ckpt.config.method == method
        # The reloaded model reproduces the last epoch's test accuracy of the trained one.
        assert _reload_accuracy(ckpt.model, data) == pytest.approx(ckpt.history[-1]["test_accuracy"], abs=1e-12)
    ensemble = load_checkpoint(paths["ensemble"]).model
    assert isinstance(ensemble, Ensemble) and ensemble.num_members == 3
    with torch.no_grad():  # the members were trained from different initialisations
        outputs = ensemble(data.test_x[:5])
    assert not torch.allclose(outputs[0], outputs[1])
    dropout = load_checkpoint(paths["dropout"]).model
    assert [m.p for m in dropout.modules() if isinstance(m, nn.Dropout)] == [0.2, 0.2]
    bayesian = load_checkpoint(paths["bayesian"])
    assert len(bayesian.history) == 4 and bayesian.config.moped  # 2 pre-training + 2 Bayesian epochs
    kinds = [type(m) for m in bayesian.model.modules() if isinstance(m, (nn.Linear, BayesLinear))]
    assert kinds == [nn.Linear, nn.Linear, BayesLinear]  # --bayesian-layers 1: the last layer only
    ivon = load_checkpoint(paths["ivon"])
    assert len(ivon.history) == 6 and ivon.config.ivon_lr == 0.4
    layers = [m for m in ivon.model.modules() if isinstance(m, (nn.Linear, BayesLinear))]
    assert [type(m) for m in layers] == [BayesLinear] * 3  # IVON's posterior covers every layer
    # sigma = 1 / sqrt(ess * (h + weight_decay)) with h > 0: below the prior's 1 / sqrt(ess * weight_decay)
    sigma = torch.nn.functional.softplus(layers[0].weight_rho.detach())
    assert bool((sigma > 0).all()) and float(sigma.max()) < (len(data.train_x) * 1e-4) ** -0.5


def test_evaluate_reports_baselines_like_bayesian_models(checkpoints, capsys):
    folder, paths = checkpoints
    for method, samples in (("dropout", 8), ("ensemble", 3), ("ivon", 8)):
        out = folder / f"report-{method}"
        assert main(["evaluate", str(paths[method]), "--out", str(out), "--num-samples", "8", "--quiet"]) == EXIT_OK
        (entry,) = json.loads((out / "results.json").read_text())["models"].values()
        assert entry["num_samples"] == samples  # an ensemble's samples are its members
        assert entry["metrics"]["accuracy"] > 0.7
        assert entry["metrics"]["ood_auroc_mutual_information"] is not None


@pytest.mark.parametrize("argv, expected", [
    (["--method", "laplace"], "invalid choice: 'laplace'"),
    (["--method", "ensemble", "--deterministic"], "not allowed with argument"),
    (["--method", "dropout", "--dropout", "1"], "--dropout: must be a probability in (0, 1)"),
    (["--method", "ensemble", "--members", "0"], "--members: must be a positive integer"),
    (["--kl-weight", "-1"], "--kl-weight: must be a finite number >= 0"),
    (["--pretrain-epochs", "-1"], "--pretrain-epochs: must be an integer >= 0"),
    (["--method", "ivon", "--hess-init", "0"], "--hess-init"),
    (["--method", "ivon", "--weight-decay", "-1"], "--weight-decay"),
])
def test_bad_method_arguments_exit_2(argv, expected, tmp_path, capsys):
    assert main(["train", *argv, "--out", str(tmp_path / "x.pt")]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    assert not (tmp_path / "x.pt").exists()


def test_moped_checkpoint_only_for_bayesian_methods(checkpoints, capsys):
    folder, paths = checkpoints
    code = main(["train", *COMMON, "--method", "ensemble", "--moped", str(paths["dropout"]),
                 "--out", str(folder / "y.pt")])
    assert code == EXIT_USAGE
    assert "--moped initialises a Bayesian model" in capsys.readouterr().err


def test_dropout_method_needs_dropout_layers() -> None:
    config = TrainConfig(method="dropout", model="resnet18")
    with pytest.raises(ValueError, match="method 'dropout' needs dropout layers"):
        build_classifier(config, (3, 32, 32), 10)


def test_old_configs_map_bayesian_flag_to_method() -> None:
    assert TrainConfig.from_dict({"bayesian": False}).method == "deterministic"
    assert TrainConfig.from_dict({"bayesian": True}).bayesian
    with pytest.raises(ValueError, match="bayesian must be true or false"):
        TrainConfig.from_dict({"bayesian": "yes"})
    assert not TrainConfig(method="ensemble").bayesian
    with pytest.raises(ValueError, match="method must be one of"):
        TrainConfig(method="laplace")
