"""Tables (issue 21): the CSV/NumPy data layer, its hostile inputs, and train -> evaluate ->
predict on a table through the ``torchbayes`` command (regression and classification)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")

from sklearn.datasets import load_diabetes, load_wine

from torchbayes.cli import EXIT_OK, EXIT_USAGE, main
from torchbayes.cli.training import load_checkpoint
from torchbayes.datasets import Standardization, TableSchema, read_features, read_table, split_table

# The 90% central interval of a Gaussian is mean +/- z * std with z = Phi^-1(0.95).
Z90 = 1.6448536269514722


def _write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def diabetes_csv(tmp_path_factory) -> Path:
    """scikit-learn's diabetes data (442 patients, 10 inputs, disease progression) as CSV."""
    data = load_diabetes()
    rows = [[*map(repr, x.tolist()), repr(float(y))] for x, y in zip(data.data, data.target)]
    return _write_csv(tmp_path_factory.mktemp("tables") / "diabetes.csv", [*data.feature_names, "progression"], rows)


def _tiny(tmp_path: Path, text: str, name: str = "t.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ------------------------------------------------------------------ the data layer
def test_read_table_reads_every_cell_and_resolves_the_target(diabetes_csv):
    reference = load_diabetes()
    table = read_table(diabetes_csv, target="progression")
    assert table.feature_names == tuple(reference.feature_names)
    np.testing.assert_array_equal(table.x, reference.data)  # repr() round-trips float64 exactly
    np.testing.assert_array_equal(table.y, reference.target)
    for spec in (10, -1, "10"):  # by index, from the end, an index given as text
        assert read_table(diabetes_csv, target=spec).target_name == "progression"
    ignored = read_table(diabetes_csv, target="progression", ignore=["sex", 0])
    assert ignored.feature_names == tuple(n for n in reference.feature_names if n not in ("sex", "age"))


def test_split_is_seeded_disjoint_and_standardised_on_the_training_rows_only(diabetes_csv):
    table = read_table(diabetes_csv, target="progression")
    data = split_table(table, test_fraction=0.2, val_fraction=0.1, seed=3)
    again = split_table(table, test_fraction=0.2, val_fraction=0.1, seed=3)
    torch.testing.assert_close(data.test_x, again.test_x, rtol=0, atol=0)
    assert (len(data.train_x), len(data.val_x), len(data.test_x)) == (310, 44, 88)
    # Rebuild the split from the test rows: the training rows' own mean and std define the scaling.
    test_rows = set(data.test_index.tolist())
    assert len(test_rows) == 88
    train_mean, train_std = np.asarray(data.feature_scaling.mean), np.asarray(data.feature_scaling.std)
    original = data.train_x.double().numpy() * train_std + train_mean
    rows = [int(np.flatnonzero((np.abs(table.x - r) < 1e-6).all(1))[0]) for r in original]
    assert not set(rows) & test_rows
    np.testing.assert_allclose(train_mean, table.x[rows].mean(0), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(train_std, table.x[rows].std(0, ddof=1), rtol=1e-12)
    # float32 standardised columns: mean 0 and std 1 up to float32 rounding.
    assert data.train_x.mean(0).abs().max() < 1e-5
    torch.testing.assert_close(data.train_x.double().std(0), torch.ones(10, dtype=torch.float64), atol=1e-5, rtol=0)
    assert data.target_scaling is not None
    assert data.target_scaling.mean[0] == pytest.approx(float(table.y[rows].mean()), rel=1e-12)


def test_classification_labels_and_stratified_split(tmp_path):
    rows = [[i, i % 3 * 2.5 + i * 0.1, ["cat", "dog", "emu"][i % 3]] for i in range(30)]
    path = _write_csv(tmp_path / "c.csv", ["a", "b", "kind"], rows)
    table = read_table(path, target="kind", task="classification")
    assert table.classes == ("cat", "dog", "emu")
    data = split_table(table, seed=0)
    assert set(data.train_y.tolist()) == {0, 1, 2} and set(data.test_y.tolist()) == {0, 1, 2}
    numbers = _write_csv(tmp_path / "n.csv", ["a", "b", "y"], [[i, i * i, [10, 2, "2.0"][i % 3]] for i in range(9)])
    assert read_table(numbers, target="y", task="classification").classes == ("2", "10")  # as numbers


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a,b,y\n1,2,3\n4,nan,6\n", "line 3, column 'b': 'nan' is not a finite number"),
        ("a,b,y\n1,2,3\n4,inf,6\n", "line 3, column 'b': 'inf' is not a finite number"),
        ("a,b,y\n1,2,3\n4,,6\n", "line 3, column 'b': missing value"),
        ("a,b,y\n1,2,3\n4,oops,6\n", "line 3, column 'b': 'oops' is not a number"),
        ("a,b,y\n1,red,3\n4,blue,6\n", "categorical columns are not encoded"),
        ("a,b,y\n1,2,3\n4,5,x\n", "line 3, column 'y': 'x' is not a number"),
        ("a,b,y\n1,2,3\n4,5\n", "line 3 has 2 fields; the header has 3"),
        ("a,b,z\n1,2,3\n", "--target 'y' is not a column"),
        ("a,b,y\n1,7,3\n4,7,6\n2,7,1\n", "column 'b' is constant (7 on every row)"),
        ("a,b,y\n1,2,3\n4,5,3\n", "the target 'y' is constant"),
        ("a,a,y\n1,2,3\n", "columns 0 and 1 are both named 'a'"),
        ("a,,y\n1,2,3\n", "line 1, column 1: the header has no name"),
        ("1,2,3\n4,5,6\n", "line 1 holds numbers"),
        ("", "is empty"),
        ("\n\n", "is empty"),
        ("a,b,y\n", "has a header but no rows"),
        ("y\n1\n2\n", "no input columns besides the target 'y'"),
        ('a,b,y\n1,"2\n', "not a readable CSV row"),
    ],
)
def test_hostile_csv_gets_one_line_naming_line_and_column(tmp_path, text, expected):
    path = _tiny(tmp_path, text)
    with pytest.raises(ValueError) as caught:
        read_table(path, target="y")
    message = str(caught.value)
    assert expected in message and "\n" not in message and repr(str(path)) in message


def test_bad_bytes_too_many_values_and_too_few_rows(tmp_path):
    binary = tmp_path / "b.csv"
    binary.write_bytes(b"a,b,y\n1,2,\xff\xfe3\n")
    with pytest.raises(ValueError, match="not UTF-8"):
        read_table(binary, target="y")
    big = _write_csv(tmp_path / "big.csv", ["a", "b", "y"], [[i, i * 2 % 7, i] for i in range(100)])
    with pytest.raises(ValueError, match="more than 50 values"):
        read_table(big, target="y", max_values=50)  # bounded memory: stops reading, names the bound
    small = read_table(_tiny(tmp_path, "a,y\n1,2\n2,3\n3,5\n"), target="y")
    with pytest.raises(ValueError, match="has 3 rows of data; a train/validation/test split needs at least 4"):
        split_table(small)
    split_table(small, val_fraction=0.0)  # 3 rows: 2 to train on, 1 to test


def test_numpy_files(tmp_path):
    matrix = np.random.default_rng(0).normal(size=(20, 3))
    np.save(tmp_path / "m.npy", matrix)
    table = read_table(tmp_path / "m.npy", target=2)
    assert table.feature_names == ("0", "1") and table.target_name == "2"
    np.testing.assert_array_equal(table.x, matrix[:, :2])
    np.savez(tmp_path / "c.npz", age=matrix[:, 0], height=matrix[:, 1], price=matrix[:, 2])
    assert read_table(tmp_path / "c.npz", target="price").feature_names == ("age", "height")
    matrix[4, 1] = np.nan
    np.save(tmp_path / "nan.npy", matrix)
    with pytest.raises(ValueError, match="row index 4, column '1': nan is not finite"):
        read_table(tmp_path / "nan.npy", target=2)
    np.save(tmp_path / "obj.npy", np.array([[1, "a"], [2, "b"]], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="not a readable NumPy file"):  # never unpickled
        read_table(tmp_path / "obj.npy", target=0)
    np.save(tmp_path / "cube.npy", np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match="expected a 2-D array"):
        read_table(tmp_path / "cube.npy", target=0)
    with pytest.raises(ValueError, match="expected a table file"):
        read_table(_tiny(tmp_path, "x", "t.json"), target=0)


def test_read_features_matches_columns_by_name(tmp_path):
    path = _write_csv(tmp_path / "p.csv", ["id", "b", "a"], [[7, 2.0, 1.0], [8, 4.0, 3.0]])
    x, where = read_features(path, ("a", "b"))
    np.testing.assert_array_equal(x, [[1.0, 2.0], [3.0, 4.0]])
    assert where == ["line 2", "line 3"]
    with pytest.raises(ValueError, match="has no column 'c', an input of the model"):
        read_features(path, ("a", "c"))


def test_schema_round_trip_and_crafted_values():
    schema = TableSchema(
        "regression", ("a", "b"), "y", (), Standardization((1.0, 2.0), (0.5, 3.0)), Standardization((4.0,), (2.0,))
    )
    assert TableSchema.from_dict(json.loads(json.dumps(schema.to_dict()))) == schema
    for key, value in [
        ("feature_std", [0.5, -1.0]),
        ("feature_std", [0.5, float("nan")]),
        ("feature_mean", [1.0]),
        ("feature_names", ["a", "a"]),
        ("task", "clustering"),
        ("target_std", None),
        ("classes", ["x", "y"]),
    ]:
        crafted = {**schema.to_dict(), key: value}
        with pytest.raises(ValueError):
            TableSchema.from_dict(crafted)
    with pytest.raises(ValueError, match="keys"):
        TableSchema.from_dict({**schema.to_dict(), "script": "<x>"})


# ------------------------------------------------------------------ the command
@pytest.fixture(scope="module")
def trained(tmp_path_factory, diabetes_csv):
    """A deterministic homoscedastic regressor on the diabetes CSV (3 epochs)."""
    folder = tmp_path_factory.mktemp("run")
    ckpt = folder / "model.pt"
    args = ["train", "--data", str(diabetes_csv), "--target", "progression", "--method", "deterministic"]
    assert main([*args, "--epochs", "3", "--out", str(ckpt), "--quiet"]) == EXIT_OK
    return ckpt


def test_checkpoint_stores_the_standardisation_and_loads_with_weights_only(trained, diabetes_csv):
    payload = torch.load(trained, weights_only=True)
    stored = payload["extra"]["torchbayes_cli"]["table"]
    table = read_table(diabetes_csv, target="progression")
    data = split_table(table, test_fraction=0.2, val_fraction=0.1, seed=0)
    assert stored["feature_mean"] == list(data.feature_scaling.mean)
    assert stored["target_std"] == data.target_scaling.std[0]
    ckpt = load_checkpoint(trained)
    assert ckpt.table is not None and ckpt.table.feature_names == table.feature_names
    assert ckpt.config.task == "regression" and ckpt.config.noise == "homoscedastic"


def test_predict_writes_mean_std_and_interval_in_the_targets_units(trained, diabetes_csv, tmp_path):
    out = tmp_path / "pred.csv"
    assert main(["predict", str(trained), "--data", str(diabetes_csv), "--out", str(out), "--quiet"]) == EXIT_OK
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 442 and rows[0]["progression"] == "151.0"  # the input's columns come first
    # Exact for a deterministic homoscedastic network: mean = f(standardised x) * s + m,
    # std = the learned noise std * s, interval = mean +/- z90 std.
    ckpt = load_checkpoint(trained)
    schema = ckpt.table
    x = schema.feature_scaling.transform(read_table(diabetes_csv, target="progression").x)
    with torch.no_grad():
        output = ckpt.model(x).double()
    scale, shift = schema.target_scaling.std[0], schema.target_scaling.mean[0]
    mean = output[:, 0] * scale + shift
    std = (0.5 * output[:, 1]).exp() * scale
    got = {k: torch.tensor([float(r[f"progression_{k}"]) for r in rows], dtype=torch.float64) for k in ("mean", "std")}
    torch.testing.assert_close(got["mean"], mean, rtol=1e-6, atol=1e-6)  # float32 network
    torch.testing.assert_close(got["std"], std, rtol=1e-6, atol=1e-6)
    lower = torch.tensor([float(r["progression_lower_90"]) for r in rows], dtype=torch.float64)
    torch.testing.assert_close(lower, mean - Z90 * std, rtol=1e-6, atol=1e-4)  # bisection to float64
    assert all(float(r["progression_epistemic_std"]) == 0.0 for r in rows)


def test_predict_refuses_to_overwrite_its_input_and_writes_nothing_on_bad_rows(trained, diabetes_csv, tmp_path, capsys):
    before = diabetes_csv.read_bytes()
    code = main(["predict", str(trained), "--data", str(diabetes_csv), "--out", str(diabetes_csv)])
    assert code == EXIT_USAGE and diabetes_csv.read_bytes() == before
    bad = tmp_path / "bad.csv"
    lines = diabetes_csv.read_text().splitlines()
    cells = lines[5].split(",")  # line 6 of the file: the header is line 1
    lines[5] = ",".join([*cells[:2], "abc", *cells[3:]])  # column 2 is 'bmi'
    bad.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.csv"
    capsys.readouterr()
    assert main(["predict", str(trained), "--data", str(bad), "--out", str(out)]) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert "line 6, column 'bmi': 'abc' is not a number" in err and "\n" not in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.csv")]


def test_bad_table_is_exit_2_and_writes_no_checkpoint(tmp_path, capsys):
    path = _tiny(tmp_path, "a,b,y\n1,2,3\n4,nan,6\n5,6,7\n8,9,1\n")
    out = tmp_path / "m.pt"
    code = main(["train", "--data", str(path), "--target", "y", "--epochs", "1", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_USAGE and not out.exists()
    assert err.startswith("torchbayes train: error: --data: ") and "line 3, column 'b'" in err and "\n" not in err
    for extra, message in [
        ([], "--data needs --target"),
        (["--target", "y", "--dataset", "digits"], "--dataset applies to images"),
        (["--target", "y", "--task", "classification", "--noise", "homoscedastic"], "--noise chooses"),
        (["--target", "y", "--hidden", "0"], "--hidden"),
    ]:
        assert main(["train", "--data", str(path), *extra, "--out", str(out)]) == EXIT_USAGE
        assert message in capsys.readouterr().err
    good = _tiny(tmp_path, "a,b,y\n1,2,3\n4,5,6\n5,6,7\n8,9,1\n", "good.csv")
    assert main(["train", "--data", str(good), "--target", "y", "--hidden", "65536,65536", "--out", str(out)]) == 2
    assert "weights, more than the 100,000,000 allowed" in capsys.readouterr().err
    assert not out.exists()


def test_evaluate_needs_the_file_and_reports_every_method(trained, diabetes_csv, tmp_path, capsys):
    assert main(["evaluate", str(trained), "--out", str(tmp_path / "r")]) == EXIT_USAGE
    assert "paths stored in a checkpoint are never read" in capsys.readouterr().err
    report = tmp_path / "report"
    args = ["evaluate", str(trained), "--data", str(diabetes_csv), "--out", str(report), "--quiet"]
    assert main(args) == EXIT_OK
    results = json.loads((report / "results.json").read_text())
    names = list(results["models"])
    assert names[0] == "deterministic mlp (homoscedastic)" and len(names) == 3  # + MC dropout and ensemble baselines
    for model in results["models"].values():
        metrics = model["metrics"]
        assert set(metrics) >= {"rmse", "log_likelihood", "coverage", "width", "calibration_error", "crps"}
        assert 0 <= metrics["coverage"] <= 1 and metrics["rmse"] > 0 and metrics["crps"] > 0
        assert len(model["coverage_curve"]["observed"]) == 19
    html = (report / "report.html").read_text()
    assert html.count("<img ") == 1 + 2 * 3  # calibration curve, then per model: predicted vs true, error vs std
    images = sorted(p.name for p in (report / "images").iterdir())
    assert "calibration.png" in images and "predicted-vs-true-deterministic-mlp-homoscedastic.png" in images
    # The report's RMSE is the test rows' RMSE of the same predictions predict writes.
    assert results["models"]["deterministic mlp (homoscedastic)"]["metrics"]["rmse"] > 30  # progression spans 25-346


def test_train_report_bayesian_round_trip_and_crafted_schema(tmp_path, diabetes_csv, capsys):
    ckpt, report = tmp_path / "b.pt", tmp_path / "rep"
    args = ["train", "--data", str(diabetes_csv), "--target", "progression", "--method", "bayesian"]
    args += ["--epochs", "1", "--pretrain-epochs", "1", "--num-samples", "8", "--no-baselines"]
    assert main([*args, "--out", str(ckpt), "--report", str(report), "--quiet"]) == EXIT_OK
    first = json.loads((report / "results.json").read_text())["models"]["Bayesian mlp (heteroscedastic)"]["metrics"]
    again = tmp_path / "again"
    evaluate = ["evaluate", str(ckpt), "--data", str(diabetes_csv), "--no-baselines", "--quiet"]
    assert main([*evaluate, "--out", str(again)]) == EXIT_OK
    second = json.loads((again / "results.json").read_text())["models"]["Bayesian mlp (heteroscedastic)"]["metrics"]
    assert first["log_likelihood"] == second["log_likelihood"]  # same test rows, same seeds
    payload = torch.load(ckpt, weights_only=True)
    payload["extra"]["torchbayes_cli"]["table"]["feature_std"][0] = -1.0  # not covered by the digest
    crafted = tmp_path / "crafted.pt"
    torch.save(payload, crafted)
    capsys.readouterr()
    assert main(["predict", str(crafted), "--data", str(diabetes_csv), "--out", str(tmp_path / "p.csv")]) == EXIT_USAGE
    assert "malformed settings" in capsys.readouterr().err
    assert not (tmp_path / "p.csv").exists()


def test_classification_table_round_trip(tmp_path):
    wine = load_wine()
    names = [n.replace("/", "_") for n in wine.feature_names]
    labels = ["barolo", "grignolino", "barbera"]
    rows = [[*map(repr, x.tolist()), labels[y]] for x, y in zip(wine.data, wine.target)]
    path = _write_csv(tmp_path / "wine.csv", [*names, "cultivar"], rows)
    ckpt, report = tmp_path / "w.pt", tmp_path / "rep"
    args = ["train", "--data", str(path), "--target", "cultivar", "--task", "classification", "--method", "ensemble"]
    assert main([*args, "--members", "2", "--epochs", "20", "--out", str(ckpt), "--report", str(report), "-q"]) == 0
    results = json.loads((report / "results.json").read_text())
    accuracy = next(iter(results["models"].values()))["metrics"]["accuracy"]
    assert accuracy > 0.8  # wine is nearly separable; 20 epochs of 2 MLPs on 124 rows
    out = tmp_path / "p.csv"
    assert main(["predict", str(ckpt), "--data", str(path), "--out", str(out), "-q"]) == EXIT_OK
    with open(out, newline="") as f:
        predicted = list(csv.DictReader(f))
    assert {r["cultivar_predicted"] for r in predicted} <= set(labels)
    sums = [sum(float(r[f"cultivar_prob_{c}"]) for c in sorted(labels)) for r in predicted]
    assert max(abs(s - 1) for s in sums) < 1e-6
    agree = np.mean([r["cultivar_predicted"] == r["cultivar"] for r in predicted])
    assert agree > 0.8


def test_predict_refuses_an_image_checkpoint(tmp_path, diabetes_csv, capsys):
    ckpt = tmp_path / "img.pt"
    assert main(["train", "--dataset", "digits", "--deterministic", "--epochs", "1", "--out", str(ckpt), "-q"]) == 0
    capsys.readouterr()
    assert main(["predict", str(ckpt), "--data", str(diabetes_csv), "--out", str(tmp_path / "p.csv")]) == EXIT_USAGE
    assert "holds an image model" in capsys.readouterr().err
