"""The three tasks a split file can hold (its `task` attribute), and what differs between them.

Task names are torchmetrics': `multilabel` (multi-hot `labels` (N, C): sigmoid per class),
`multiclass` (one class per image, stored one-hot in `labels` (N, C): softmax over classes) and
`segmentation` (`masks` (N, H, W): softmax per pixel). The model is the same ViT for both
classification tasks; they differ in the loss, the meter, the activation that turns logits into
predict.py's output, and the metrics a run reports unless config.yaml lists others: `TASKS`.
"""
from functools import partial
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from rvit.metrics import ConfusionMeter, MultiLabelMeter
from rvit.upernet import segmentation_loss


class Task(NamedTuple):
    loss: Callable  # (output, targets, ignore_index, label_smoothing) -> scalar tensor
    meter: Callable  # (num_classes, ignore_index) -> meter with update / compute
    activation: Callable  # logits -> predict.py's output (segmentation: logits, tiles blend)
    metrics: tuple  # reported unless config.yaml lists others; the first picks best.pt
    names: tuple  # every scalar metric the meter computes: what config.yaml may name


def _multilabel_loss(out, y, ignore_index=None, label_smoothing=0.0):
    return F.binary_cross_entropy_with_logits(out.float(), y)


def _multiclass_loss(out, y, ignore_index=None, label_smoothing=0.0):
    # y is one-hot (B, C) float as stored: cross-entropy with probability targets, which
    # label_smoothing mixes with the uniform distribution
    return F.cross_entropy(out.float(), y, label_smoothing=label_smoothing)


def _segmentation_loss(out, y, ignore_index=None, label_smoothing=0.0):
    return segmentation_loss(out, y, ignore_index)


TASKS = {
    "multilabel": Task(_multilabel_loss, lambda num_classes, ignore_index: MultiLabelMeter(),
                       torch.sigmoid, ("mAP_macro", "F1_macro", "F1_weighted"),
                       MultiLabelMeter.METRICS),
    "multiclass": Task(_multiclass_loss, ConfusionMeter, partial(torch.softmax, dim=1),
                       ("OA", "F1_macro", "F1_weighted"), ConfusionMeter.METRICS),
    "segmentation": Task(_segmentation_loss, ConfusionMeter, lambda logits: logits,
                         ("mIoU", "F1_macro", "jaccard_weighted"), ConfusionMeter.METRICS),
}


def task_of(meta) -> Task:
    """The `Task` of a split's or checkpoint's meta. Raises ValueError for an unknown task."""
    if meta["task"] not in TASKS:
        raise ValueError(f"unknown task {meta['task']!r}; known: {', '.join(TASKS)}")
    return TASKS[meta["task"]]


def criterion(meta, label_smoothing=0.0):
    """The training loss (output, targets) -> scalar tensor of meta's task (and ignore_index).

    Raises:
        ValueError: `label_smoothing` (in [0, 1)) asked for a task other than multiclass.
    """
    if label_smoothing and meta["task"] != "multiclass":
        raise ValueError(f"--label-smoothing {label_smoothing:g} applies to single-label "
                         f"(multiclass) data; this split's task is {meta['task']}")
    return partial(task_of(meta).loss, ignore_index=meta.get("ignore_index"),
                   label_smoothing=label_smoothing)


def meter(meta):
    """A fresh evaluation meter for meta's task and classes."""
    return task_of(meta).meter(len(meta["classes"]), meta.get("ignore_index"))


def report_metrics(task, metrics=None, main_metric=None, where="config.yaml: "):
    """(main metric, metrics) a run reports: config.yaml's `metrics` list, else the task's
    defaults; the main metric (best.pt's) defaults to the first. Call it before reading any
    data, so that a misspelt name stops a run before its first epoch.

    Raises:
        ValueError: naming `where` (file and section, as 'config.yaml: datasets.x.'), the key
            and the task's names, for a name the task's meter does not compute (gflops or
            num_samples is no metric), or `metrics` that is not a list.
    """
    names = TASKS[task].names
    if metrics is not None and not isinstance(metrics, list):
        raise ValueError(f"{where}metrics: expected a list of names, got {metrics!r}")
    for key, listed in (("main_metric", [main_metric] if main_metric else []),
                        ("metrics", metrics or [])):
        bad = [m for m in listed if m not in names]
        if bad:
            raise ValueError(f"{where}{key}: unknown {task} metric {', '.join(map(repr, bad))}; "
                             f"valid: {', '.join(names)}")
    metrics = list(metrics or TASKS[task].metrics)
    return main_metric or metrics[0], metrics


def label_columns(meta, threshold=0.5):
    """predictions.csv's label columns: (header list, function from one sample's probabilities
    (C,) float numpy to a list of str): multiclass, the top class and its probability;
    multilabel, the labels above `threshold`, joined by ';'."""
    classes = meta["classes"]
    if meta["task"] == "multiclass":
        return ["class", "probability"], lambda p: [classes[int(p.argmax())], f"{p.max():.6f}"]
    return ["labels"], lambda p: [";".join(n for n, v in zip(classes, p) if v > threshold)]
