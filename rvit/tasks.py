"""The three tasks a split file can hold (its `task` attribute), and what differs between them.

Task names are torchmetrics': `multilabel` (multi-hot `labels` (N, C): sigmoid per class),
`multiclass` (one class per image, stored one-hot in `labels` (N, C): softmax over classes) and
`segmentation` (`masks` (N, H, W): softmax per pixel). The model is the same ViT for both
classification tasks; they differ in the loss, the meter, the activation that turns logits into
predict.py's output, and the metrics a run reports unless config.yaml lists others. This table
is the one place those differences live.
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
    """The training loss of meta's task: a function (output, targets) -> scalar tensor.

    Args:
        meta: split attributes with task (and ignore_index for segmentation).
        label_smoothing: in [0, 1); multiclass only.

    Raises:
        ValueError: label smoothing asked for another task.
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
    """(main metric, metrics) a run reports: config.yaml's when its section lists them, else
    the task's defaults; the main metric defaults to the first. Cheap: call it before reading
    any data, so that a misspelt name stops a run before its first epoch.

    Args:
        task: a key of TASKS (the split file's `task` attribute).
        metrics: list of names from config.yaml, or None.
        main_metric: the name best.pt is chosen by, or None.
        where: prefix of the error's key: the file and the section the names come from, as
            'config.yaml: datasets.bigearthnet.'.

    Raises:
        ValueError: in one line naming `where`, the key and the task's names, when a name is
            not one the task's meter computes (bookkeeping such as gflops or num_samples is
            not a metric), or `metrics` is not a list.
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
    """predictions.csv's label columns for one sample's probabilities: multiclass, the top class
    and its probability; multilabel, the labels above `threshold`, joined by ';'.

    Returns:
        (header list of str, function from probabilities (C,) float numpy to a list of str).
    """
    classes = meta["classes"]
    if meta["task"] == "multiclass":
        return ["class", "probability"], lambda p: [classes[int(p.argmax())], f"{p.max():.6f}"]
    return ["labels"], lambda p: [";".join(n for n, v in zip(classes, p) if v > threshold)]
