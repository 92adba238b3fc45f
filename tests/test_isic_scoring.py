"""evaluation/metrics.py against the ISIC challenges' scorer (PyPI `isic-challenge-scoring`) on the same predictions.

The scorer is fed through its file interface (`ClassificationScore.from_stream`: an `image` column plus one
probability column per category), as a challenge submission would be. Where both define a metric they agree to 1e-6:
AUC, sensitivity, specificity, PPV, NPV, accuracy and balanced accuracy of the shipped DenseNet-121's committed
predictions (results/classifier/densenet121/predictions.csv, reproducing its metrics.csv), and balanced accuracy,
per-class and macro one-vs-rest AUC in the seven-class ISIC 2018 Task 3 format.

Where they differ, and why (each pinned by a test below):
- Decision rule: the scorer calls a category positive when its probability is > 0.5, a fixed and strict cut; the
  project says malignant when P(malignant) >= a threshold chosen on `val`. They agree except at exact equality; to
  score the project's operating point, the scorer is given P mapped by a monotone piecewise-linear map that sends
  the threshold to 0.5 (AUC is unchanged by it).
- Undefined ratios: with no malignant (or no benign) image the scorer's sensitivity (specificity) is 1.0, "a
  freebie"; the project reports NaN, so that an empty class cannot pass for a perfect result. With one class only
  the scorer's whole score raises (its partial AUC above 80% sensitivity needs both classes); the project's AUC is
  NaN and its other metrics are still computed.
- Ties in the multi-class argmax: the scorer calls the image "undecided", wrong for every class; the project's
  argmax takes the first class.
- Per-category sensitivity in the multi-class scorer is one-vs-rest at P > 0.5; the project's per-class recall is
  that of the argmax decision. Only balanced accuracy is argmax-based in both, so only it is compared.
"""
from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from isic_challenge_scoring import metrics as isic_metrics
from isic_challenge_scoring.classification import ClassificationMetric, ClassificationScore
from isic_challenge_scoring.confusion import create_binary_confusion_matrix

from data.paths import MANIFESTS, RESULTS
from evaluation.metrics import auc, balanced_accuracy, decision_metrics, multiclass_bootstrap

RESULTS = RESULTS / "classifier" / "densenet121"
TASK3 = {"MEL": "mel", "NV": "nv", "BCC": "bcc", "AKIEC": "akiec", "BKL": "bkl", "DF": "df", "VASC": "vasc"}
BOTH_DEFINE = ("sensitivity", "specificity", "ppv", "npv", "accuracy")


def isic_score(images: list[str], truth: pd.DataFrame, prediction: pd.DataFrame) -> ClassificationScore:
    """Score through the scorer's CSV interface: one row per image, one probability column per category."""
    def csv(table: pd.DataFrame) -> io.StringIO:
        return io.StringIO(table.astype(float).assign(image=images)[["image", *table.columns]].to_csv(index=False))

    return ClassificationScore.from_stream(csv(truth), csv(prediction), ClassificationMetric.AUC)


def binary_score(y: np.ndarray, p: np.ndarray) -> ClassificationScore:
    images = [f"ISIC_{i:07d}" for i in range(len(y))]
    return isic_score(images, pd.DataFrame({"benign": 1 - y, "malignant": y}),
                      pd.DataFrame({"benign": 1 - p, "malignant": p}))


def to_half(p: np.ndarray, threshold: float) -> np.ndarray:
    """Strictly increasing map of [0, 1] onto [0, 1] that sends `threshold` to 0.5, the scorer's fixed cut."""
    return np.where(p < threshold, 0.5 * p / threshold, 0.5 + 0.5 * (p - threshold) / (1 - threshold))


@pytest.mark.parametrize("dataset", ["ham10000", "isic2017"])
def test_binary_metrics_agree_on_the_shipped_models_predictions(dataset: str):
    predictions = pd.read_csv(RESULTS / "predictions.csv")
    committed = pd.read_csv(RESULTS / "metrics.csv")
    row = committed[(committed["dataset"] == dataset) & (committed["model"] == "densenet121")].iloc[0]
    rows = predictions[predictions["dataset"] == dataset]
    y, p, t = rows["label"].eq("malignant").to_numpy(int), rows["prob_malignant"].to_numpy(float), row["threshold"]
    assert len(y) == row["n"] and not np.isin(p, [0.5, t]).any()  # no image sits exactly on either cut

    raw = binary_score(y, p).per_category.loc["malignant"]
    assert raw["auc"] == pytest.approx(auc(y, p), abs=1e-6) == pytest.approx(row["auc"], abs=1e-6)
    at_half = decision_metrics(y, p >= 0.5)
    for name in BOTH_DEFINE:
        assert raw[name] == pytest.approx(at_half[name], abs=1e-6), name

    shifted = binary_score(y, to_half(p, t))
    assert shifted.per_category.loc["malignant", "auc"] == pytest.approx(row["auc"], abs=1e-6)
    for name in BOTH_DEFINE:  # the committed operating point, threshold chosen on val
        assert shifted.per_category.loc["malignant", name] == pytest.approx(row[name], abs=1e-6), name
    assert shifted.aggregate["balanced_accuracy"] == pytest.approx(row["balanced_accuracy"], abs=1e-6)
    assert at_half["sensitivity"] != row["sensitivity"]  # the cut matters: 0.5 is not the project's threshold


def test_seven_class_metrics_agree_in_the_task3_format():
    """HAM10000 test diagnoses (the committed manifest) with seeded probabilities that lean towards the truth."""
    manifest = pd.read_csv(MANIFESTS / "original.csv")
    test = manifest[(manifest["dataset"] == "ham10000") & (manifest["split"] == "test")]
    classes = list(TASK3.values())
    y = test["dx"].map({dx: k for k, dx in enumerate(classes)}).to_numpy()
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(len(classes)), len(y)) + 0.6 * np.eye(len(classes))[y] * rng.random((len(y), 1))
    probs /= probs.sum(1, keepdims=True)
    score = isic_score(list(test["image_id"]), pd.DataFrame(np.eye(len(classes))[y], columns=list(TASK3)),
                       pd.DataFrame(probs, columns=list(TASK3)))
    ours = multiclass_bootstrap(y, probs, n_boot=1)
    assert score.aggregate["balanced_accuracy"] == pytest.approx(ours["balanced_accuracy"], abs=1e-6)
    assert score.aggregate["balanced_accuracy"] == pytest.approx(balanced_accuracy(y, probs.argmax(1)), abs=1e-6)
    assert score.macro_average["auc"] == pytest.approx(ours["macro_auc"], abs=1e-6)
    np.testing.assert_allclose(score.per_category.loc[list(TASK3), "auc"], ours["auc"], atol=1e-6)
    assert 0.3 < ours["balanced_accuracy"] < 0.95  # a non-trivial test: neither chance nor perfect


def test_where_the_two_differ():
    y = np.array([0, 0, 1, 1])
    on_cut = np.array([0.1, 0.2, 0.5, 0.9])  # one malignant image exactly at 0.5
    scorer = binary_score(y, on_cut).per_category.loc["malignant"]
    assert scorer["sensitivity"] == 0.5 and decision_metrics(y, on_cut >= 0.5)["sensitivity"] == 1.0

    benign_only, p = np.zeros(4, dtype=int), np.array([0.1, 0.6, 0.2, 0.3])
    cm = create_binary_confusion_matrix(benign_only, (p > 0.5).astype(int))
    assert isic_metrics.binary_sensitivity(cm) == 1.0  # the scorer's "freebie"
    assert np.isnan(decision_metrics(benign_only, p >= 0.5)["sensitivity"])
    assert np.isnan(auc(benign_only, p))
    with pytest.raises(ValueError):  # a whole score needs both classes (its partial AUC above 80% sensitivity)
        binary_score(benign_only, p)

    truth = np.eye(3)[[0, 1, 2]]
    tied = np.array([[0.4, 0.4, 0.2], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8]])  # image 0: classes 0 and 1 tie
    score = isic_score(["ISIC_0000000", "ISIC_0000001", "ISIC_0000002"], pd.DataFrame(truth, columns=list("abc")),
                       pd.DataFrame(tied, columns=list("abc")))
    assert score.aggregate["balanced_accuracy"] == pytest.approx(2 / 3)  # 'undecided' counts as wrong
    assert balanced_accuracy([0, 1, 2], tied.argmax(1)) == 1.0  # argmax picks class 0, which is right
