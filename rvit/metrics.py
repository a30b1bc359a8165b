"""Metrics of the study, from scratch: average precision, F1, Jaccard / IoU, overall accuracy.

Definitions follow scikit-learn (`average_precision_score`, `f1_score`, `jaccard_score`) and are
checked against it in tests/test_metrics.py. Counting metrics (F1, IoU, accuracy) come from int64
counts, which DDP sums exactly; average precision needs every score, which DDP gathers.

Rule for classes that are absent: a class with no positive target has no average precision and is
left out of the macro mAP; a class absent from both targets and predictions has no F1 or IoU and is
left out of macro F1 and mIoU (scikit-learn would count it as 0 unless given `labels=`), and is 0
in per-class lists (scikit-learn's `zero_division=0`). Weighted averages weight each class by its
target support, so absent classes weigh nothing either way.

Letters: N samples (or pixels), C classes.
"""
import torch

from rvit import distributed


def _binary_average_precision(scores, targets):
    """AP of one ranking: sum over distinct thresholds of (R_n - R_{n-1}) P_n (scikit-learn's)."""
    order = torch.argsort(scores, descending=True, stable=True)
    s, tps = scores[order], targets[order].double().cumsum(0)
    # one operating point per distinct score: the last sample of each tie group
    last = torch.ones_like(s, dtype=torch.bool)
    last[:-1] = s[1:] != s[:-1]
    seen = torch.arange(1, len(s) + 1, dtype=torch.float64, device=s.device)[last]
    tps = tps[last]
    precision, recall = tps / seen, tps / tps[-1]
    return float((torch.diff(recall, prepend=recall.new_zeros(1)) * precision).sum())


def average_precision(scores, targets, average: str = "macro") -> float:
    """Multi-label average precision (area under the step precision-recall curve).

    Args:
        scores: (N, C) float, higher means more likely positive (logits or probabilities).
        targets: (N, C) {0, 1} integer or bool.
        average: "macro" (mean over classes with at least one positive) or "micro" (all
            (sample, class) pairs pooled into one ranking).

    Returns:
        AP in [0, 1]; NaN if no target is positive.

    Raises:
        ValueError: on shape mismatch or an unknown `average`.
    """
    if scores.shape != targets.shape or scores.dim() != 2:
        raise ValueError(f"scores {tuple(scores.shape)} and targets {tuple(targets.shape)} "
                         "must both be (N, C)")
    scores, targets = scores.float(), targets.bool()
    if average == "micro":
        flat = targets.flatten()
        return _binary_average_precision(scores.flatten(), flat) if flat.any() else float("nan")
    if average != "macro":
        raise ValueError(f"unknown average {average!r}; choose 'macro' or 'micro'")
    aps = [_binary_average_precision(scores[:, c], targets[:, c])
           for c in range(scores.shape[1]) if targets[:, c].any()]
    return sum(aps) / len(aps) if aps else float("nan")


def multilabel_counts(preds, targets):
    """(3, C) int64 per-class counts, rows tp, fp, fn, of multi-label predictions `preds` against
    `targets`, both (N, C) {0, 1}."""
    p, t = preds.bool(), targets.bool()
    return torch.stack([(p & t).sum(0), (p & ~t).sum(0), (~p & t).sum(0)]).long()


def confusion_matrix(preds, targets, num_classes: int, ignore_index=None):
    """(C, C) int64 confusion matrix, rows target class, columns predicted class, of integer
    `preds` and `targets` of one shape (e.g. (B, H, W) class maps); targets equal to
    `ignore_index` (nodata) are left out.

    Raises:
        ValueError: when a counted target or prediction lies outside [0, num_classes).
    """
    p, t = preds.flatten().long(), targets.flatten().long()
    if ignore_index is not None:
        p, t = p[t != ignore_index], t[t != ignore_index]
    for name, v in (("target", t), ("prediction", p)):
        if v.numel() and (v.min() < 0 or v.max() >= num_classes):
            raise ValueError(f"{name} class outside [0, {num_classes}): "
                             f"{int(v.min())}..{int(v.max())}")
    cm = torch.bincount(t * num_classes + p, minlength=num_classes ** 2)
    return cm.reshape(num_classes, num_classes)


def counts_from_confusion(cm):
    """(C, C) confusion matrix -> (3, C) int64 rows tp, fp, fn (one-vs-rest per class)."""
    tp = cm.diagonal()
    return torch.stack([tp, cm.sum(0) - tp, cm.sum(1) - tp]).long()


def _ratio(num, den):
    num, den = num.double(), den.double()
    return torch.where(den > 0, num / den.clamp_min(1), torch.zeros_like(num))


def _score(num, den, counts, average):
    """num / den of (C,) counts: pooled over classes ("micro"), per class ("none": (C,)
    float64, 0 where den is 0), or a mean over the classes present ("macro") or weighted by
    target support ("weighted"). Raises ValueError for another `average`."""
    if average == "micro":
        return float(_ratio(num.sum(), den.sum()))
    per_class = _ratio(num, den)
    tp, fp, fn = counts
    if average == "none":
        return per_class
    if average == "macro":
        present = (tp + fp + fn) > 0
        return float(per_class[present].mean()) if present.any() else float("nan")
    if average == "weighted":
        support = (tp + fn).double()
        return float((per_class * support).sum() / support.sum()) if support.sum() else 0.0
    raise ValueError(f"unknown average {average!r}; choose 'micro', 'macro' or 'weighted'")


def f1_from_counts(counts, average: str = "macro"):
    """F1 = 2 tp / (2 tp + fp + fn) from (3, C) int64 counts; average micro, macro or weighted,
    or "none" for the (C,) float64 per-class F1s (0 for a class with no count)."""
    tp, fp, fn = counts
    return _score(2 * tp, 2 * tp + fp + fn, counts, average)


def jaccard_from_counts(counts, average: str = "macro"):
    """IoU = tp / (tp + fp + fn) from (3, C) counts; "macro" is mIoU, "none" gives (C,) IoUs."""
    tp, fp, fn = counts
    return _score(tp, tp + fp + fn, counts, average)


class MultiLabelMeter:
    """Collects logits and targets over an evaluation; `compute` gives the study's metrics.
    Predictions are sigmoid(logit) >= 0.5, i.e. logit >= 0."""

    # the scalar metrics `compute` returns (besides num_samples): names config.yaml may use
    METRICS = ("mAP_macro", "mAP_micro", "F1_micro", "F1_macro", "F1_weighted")

    def __init__(self):
        self.scores, self.targets = [], []

    def update(self, logits, targets):
        """logits: (B, C) float; targets: (B, C) {0, 1}."""
        self.scores.append(logits.detach().float().cpu())
        self.targets.append(targets.detach().cpu().to(torch.uint8))

    def compute(self) -> dict:
        """Metrics over every sample of every DDP rank (each counted once)."""
        scores = distributed.gather_cat(_cat(self.scores, torch.float32))
        targets = distributed.gather_cat(_cat(self.targets, torch.uint8))
        counts = multilabel_counts(scores >= 0, targets)
        return {"mAP_macro": average_precision(scores, targets, "macro"),
                "mAP_micro": average_precision(scores, targets, "micro"),
                "F1_micro": f1_from_counts(counts, "micro"),
                "F1_macro": f1_from_counts(counts, "macro"),
                "F1_weighted": f1_from_counts(counts, "weighted"),
                "num_samples": int(scores.shape[0])}


class ConfusionMeter:
    """Accumulates a (C, C) confusion matrix of argmax predictions over images (multiclass) or
    pixels (segmentation), leaving out targets equal to `ignore_index` (unlabelled pixels);
    `compute` gives overall accuracy, F1, Jaccard / IoU and the matrix itself."""

    METRICS = ("OA", "F1_micro", "F1_macro", "F1_weighted", "jaccard_weighted", "mIoU")

    def __init__(self, num_classes: int, ignore_index=None):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.cm = torch.zeros(num_classes, num_classes, dtype=torch.long)
        self.samples = 0

    def update(self, logits, targets):
        """logits: (B, C) or (B, C, H, W) float; targets: class ids (B,) or (B, H, W), or
        one-hot (B, C) as a multiclass split stores them."""
        preds = logits.detach().argmax(1)
        if targets.shape == logits.shape:  # one-hot rows -> class ids
            targets = targets.argmax(1)
        self.cm += confusion_matrix(preds, targets, self.num_classes, self.ignore_index).cpu()
        self.samples += targets.shape[0]

    def compute(self) -> dict:
        """Metrics over every sample of every DDP rank; per-class lists in class order, the
        confusion matrix as a list of rows (reference class) of columns (predicted class)."""
        cm = distributed.all_reduce(self.cm.clone())
        counts = counts_from_confusion(cm)
        total = int(cm.sum())
        return {"OA": float(cm.diagonal().sum()) / total if total else float("nan"),
                "F1_micro": f1_from_counts(counts, "micro"),
                "F1_macro": f1_from_counts(counts, "macro"),
                "F1_weighted": f1_from_counts(counts, "weighted"),
                "jaccard_weighted": jaccard_from_counts(counts, "weighted"),
                "mIoU": jaccard_from_counts(counts, "macro"),
                "F1_per_class": f1_from_counts(counts, "none").tolist(),
                "IoU_per_class": jaccard_from_counts(counts, "none").tolist(),
                "confusion_matrix": cm.tolist(),
                "num_samples": int(distributed.all_reduce(torch.tensor(self.samples)))}


def _cat(chunks, dtype):
    return torch.cat(chunks) if chunks else torch.zeros(0, 0, dtype=dtype)
