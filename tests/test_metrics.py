"""Metrics against scikit-learn on random and degenerate inputs."""
import numpy as np
import pytest
import torch

from rvit.metrics import (ConfusionMeter, MultiLabelMeter, average_precision,
                          confusion_matrix, counts_from_confusion, f1_from_counts,
                          jaccard_from_counts, multilabel_counts)


def f1_score(preds, targets, average):
    """Ours, in scikit-learn's call shape: F1 from the multi-label counts."""
    return f1_from_counts(multilabel_counts(preds, targets), average)


def jaccard_index(preds, targets, num_classes, average):
    """Ours, in scikit-learn's call shape: IoU from the confusion matrix."""
    return jaccard_from_counts(counts_from_confusion(confusion_matrix(preds, targets,
                                                                      num_classes)), average)


sk = pytest.importorskip("sklearn.metrics", reason="scikit-learn is the test-only reference")


def multilabel_case(seed, n=200, c=7, ties=False):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, c)) < rng.uniform(0.05, 0.6, c)).astype(np.int64)
    s = rng.normal(size=(n, c)) + 1.5 * y
    if ties:
        s = np.round(s, 0)  # many equal scores
    y[:, -1] = 0  # one class with no positive target
    return torch.from_numpy(s).float(), torch.from_numpy(y)


@pytest.mark.parametrize("seed,ties", [(0, False), (1, True), (2, True)])
def test_average_precision_matches_sklearn(seed, ties):
    s, y = multilabel_case(seed, ties=ties)
    present = y.sum(0) > 0
    ref_macro = sk.average_precision_score(y[:, present].numpy(), s[:, present].numpy(),
                                           average="macro")
    ref_micro = sk.average_precision_score(y.numpy(), s.numpy(), average="micro")
    assert average_precision(s, y, "macro") == pytest.approx(ref_macro, abs=1e-6)
    assert average_precision(s, y, "micro") == pytest.approx(ref_micro, abs=1e-6)


def test_average_precision_all_tied_and_none_positive():
    y = torch.tensor([[1], [0], [1], [0]])
    assert average_precision(torch.zeros(4, 1), y) == pytest.approx(
        sk.average_precision_score(y.numpy().ravel(), np.zeros(4)))
    assert np.isnan(average_precision(torch.randn(4, 2), torch.zeros(4, 2)))


@pytest.mark.parametrize("average", ["micro", "macro", "weighted"])
@pytest.mark.parametrize("seed", [0, 3])
def test_multilabel_f1_matches_sklearn(average, seed):
    s, y = multilabel_case(seed)
    p = (s >= 0.5).long()
    p[:, 2] = 0  # all-negative predictions for one class
    present = ((p + y).sum(0) > 0).nonzero().flatten().tolist()
    ref = sk.f1_score(y.numpy(), p.numpy(), average=average, labels=present, zero_division=0)
    assert f1_score(p, y, average) == pytest.approx(ref, abs=1e-9)


def test_f1_all_negative_predictions():
    y = torch.tensor([[1, 0], [0, 1]])
    p = torch.zeros(2, 2, dtype=torch.long)
    for avg in ("micro", "macro", "weighted"):
        assert f1_score(p, y, avg) == pytest.approx(
            sk.f1_score(y.numpy(), p.numpy(), average=avg, zero_division=0))


def segmentation_case(seed, c=5, shape=(4, 16, 16)):
    rng = np.random.default_rng(seed)
    t = rng.integers(0, c - 1, shape)  # class c-1 never in the targets
    p = np.where(rng.random(shape) < 0.7, t, rng.integers(0, c, shape))
    return torch.from_numpy(p), torch.from_numpy(t)


def test_confusion_matrix_and_segmentation_metrics_match_sklearn():
    p, t = segmentation_case(0)
    pf, tf = p.numpy().ravel(), t.numpy().ravel()
    cm = confusion_matrix(p, t, 5)
    assert np.array_equal(cm.numpy(), sk.confusion_matrix(tf, pf, labels=range(5)))
    counts = counts_from_confusion(cm)
    labels = sorted(set(pf) | set(tf))
    assert f1_from_counts(counts, "micro") == pytest.approx(sk.f1_score(tf, pf, average="micro"))
    assert f1_from_counts(counts, "macro") == pytest.approx(
        sk.f1_score(tf, pf, average="macro", labels=labels))
    assert jaccard_from_counts(counts, "weighted") == pytest.approx(
        sk.jaccard_score(tf, pf, average="weighted", zero_division=0))
    assert jaccard_index(p, t, 5, "macro") == pytest.approx(
        sk.jaccard_score(tf, pf, average="macro", labels=labels))
    assert np.allclose(jaccard_from_counts(counts, "none").numpy(),
                       sk.jaccard_score(tf, pf, average=None, labels=range(5), zero_division=0))


def test_ignore_index_is_left_out():
    p, t = segmentation_case(1)
    t[:, :4] = 255
    keep = (t != 255).numpy().ravel()
    cm = confusion_matrix(p, t, 5, ignore_index=255)
    assert cm.sum() == keep.sum()
    assert np.array_equal(cm.numpy(), sk.confusion_matrix(
        t.numpy().ravel()[keep], p.numpy().ravel()[keep], labels=range(5)))
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(p, t, 5)  # 255 counted without ignore_index


def test_meters_pool_batches_like_one_pass():
    s, y = multilabel_case(4)
    meter = MultiLabelMeter()
    for i in range(0, 200, 64):
        meter.update(s[i:i + 64], y[i:i + 64])
    out = meter.compute()
    assert out["num_samples"] == 200
    assert out["mAP_macro"] == pytest.approx(average_precision(s, y, "macro"))
    assert out["F1_weighted"] == pytest.approx(f1_score((s >= 0).long(), y, "weighted"))
    p, t = segmentation_case(2)
    seg = ConfusionMeter(5)
    logits = torch.nn.functional.one_hot(p, 5).permute(0, 3, 1, 2).float()
    seg.update(logits[:2], t[:2])
    seg.update(logits[2:], t[2:])
    res = seg.compute()
    assert res["OA"] == pytest.approx((p == t).float().mean().item())
    assert res["mIoU"] == pytest.approx(jaccard_index(p, t, 5, "macro"))


def multiclass_case(kind, n=300, c=6, seed=0):
    """(logits (n, c), one-hot targets (n, c)) of a kind of single-label input."""
    rng = np.random.default_rng(seed)
    t = rng.integers(0, c - 1, n)  # class c-1 never a target
    p = np.where(rng.random(n) < 0.6, t, rng.integers(0, c, n))
    if kind == "one_predicted":  # every sample predicted as class 2
        p[:] = 2
    elif kind == "perfect":
        p = t.copy()
    elif kind == "one_sample":
        t, p = t[:1], p[:1]
    elif kind == "one_class":  # a single class in targets and predictions
        t[:], p[:] = 1, 1
    logits = torch.from_numpy(np.eye(c)[p] + rng.random((len(p), c)) * 0.1).float()
    return logits, torch.from_numpy(np.eye(c, dtype=np.uint8)[t]), p, t


@pytest.mark.parametrize("kind", ["random", "one_predicted", "perfect", "one_sample",
                                  "one_class"])
def test_multiclass_meter_matches_sklearn(kind):
    logits, onehot, p, t = multiclass_case(kind)
    meter = ConfusionMeter(6)
    for i in range(0, len(p), 64):  # batches pool like one pass
        meter.update(logits[i:i + 64], onehot[i:i + 64])
    r = meter.compute()
    assert r["num_samples"] == len(p)
    assert r["OA"] == pytest.approx(sk.accuracy_score(t, p))
    for average in ("macro", "weighted"):
        assert r[f"F1_{average}"] == pytest.approx(
            sk.f1_score(t, p, average=average, zero_division=0), abs=1e-12)
    assert np.allclose(r["F1_per_class"], sk.f1_score(t, p, average=None, labels=range(6),
                                                      zero_division=0))
    assert r["confusion_matrix"] == sk.confusion_matrix(t, p, labels=range(6)).tolist()


def test_multiclass_meter_takes_class_ids_like_one_hot():
    logits, onehot, _, t = multiclass_case("random", seed=5)
    by_id, by_onehot = ConfusionMeter(6), ConfusionMeter(6)
    by_id.update(logits, torch.from_numpy(t))
    by_onehot.update(logits, onehot)
    assert by_id.compute() == by_onehot.compute()
