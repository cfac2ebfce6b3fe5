"""Class-discriminative pruning: forget a class by pruning the channels that tell it apart.

Wang, Guo, Xie and Qi, 2022, "Federated Unlearning via Class-Discriminative Pruning" (WWW '22,
arXiv:2110.11794). A class request only (``Capabilities.granularities = {"class"}``). Three
steps:

1. **Local representations** (every client still in the federation, on the data it holds
   before the request): the mean post-ReLU activation of every channel of every hidden layer,
   per class, and the class counts (the port's ``"activations"`` task,
   :func:`class_activations`). Only these averages leave a client, never samples.
2. **TF-IDF and pruning** (server). The clients' averages are pooled, weighted by their class
   counts, into ``a[l][k, c]`` (layer ``l``, class ``k``, channel ``c``). A channel is a word,
   a class a document: ``tf = a[k, c] / Σ_c' a[k, c']`` and ``idf = log(K / (1 + #{k' :
   a[k', c] ≥ mean_k'' a[k'', c]}))``, so a channel scores high for class ``k`` when it fires
   strongly on ``k`` and on few other classes (:func:`tfidf`). In every hidden layer the
   ``ratio`` of channels with the highest score for the removed class are pruned: the weights
   and bias that produce them are set to zero (:func:`prune_channels`).
3. **Fine-tuning** (the remaining clients, on what they keep: the class is gone from every
   client's data): FedAvg rounds from the pruned model, by default until the remaining
   clients' accuracy is back (:func:`~fedunlearn.unlearning.federated.finetune.repair`).

Departures from the paper (docs/algorithms.md, "Class-discriminative pruning"): a "channel"
is a convolution's output channel (activations averaged over space) or a hidden linear layer's
unit, so the method also runs on the MLPs of the embedded data (the paper prunes convolution
channels only); the IDF counts the classes on which a channel fires at least its mean over
classes (our reading of the paper's "relevant" classes); the pruning ratio is a fraction per
layer; fine-tuning stops on recovery rather than after a fixed number of rounds. A layer
followed by a normalisation layer keeps that layer's shift, so pruning there is partial.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from fedunlearn.models.params import Params
from fedunlearn.unlearning.base import (
    UNLEARNERS,
    Capabilities,
    Cost,
    FederatedUnlearner,
    Setting,
    UnlearningContext,
    UnlearningResult,
    finite_positive,
)
from fedunlearn.unlearning.federated.finetune import check_repair, repair

_ACTIVATIONS_PURPOSE = 0xC1A5
_FINETUNE_PURPOSE = 0xC1A6
ACTIVATION_PREFIX = "a."
COUNT_PREFIX = "n."


def channel_layers(model: nn.Module) -> list[str]:
    """Names of the modules whose output channels can be pruned: every ``nn.Linear`` and
    ``nn.Conv2d`` but the last parameterised layer (the classifier), in model order."""
    layers = [name for name, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    return layers[:-1]


@torch.no_grad()
def class_activations(model: nn.Module, x: np.ndarray, y: np.ndarray, num_classes: int, *,
                      batch_size: int = 256, device: str = "cpu") -> dict[str, float]:
    """Per hidden layer, class and channel, the mean ReLU of the channel's output over the
    class's samples (spatial mean for convolutions), and per class the sample count: the flat
    ``{"a.<layer>.<class>.<channel>": mean, "n.<class>": count}`` a client reports (layers by
    position in :func:`channel_layers`; classes absent from ``y`` are left out)."""
    model.eval().to(device)
    names = channel_layers(model)
    modules = dict(model.named_modules())
    sums: dict[int, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}
    hooks = [modules[n].register_forward_hook(
        lambda _m, _i, out, i=i: outputs.__setitem__(i, out)) for i, n in enumerate(names)]
    counts = np.bincount(y, minlength=num_classes)
    try:
        for start in range(0, len(x), batch_size):
            xb = torch.as_tensor(x[start:start + batch_size], device=device)
            yb = torch.as_tensor(y[start:start + batch_size], device=device, dtype=torch.long)
            model(xb)
            onehot = torch.nn.functional.one_hot(yb, num_classes).to(torch.float64)
            for i, out in outputs.items():
                act = torch.relu(out).to(torch.float64)
                if act.dim() > 2:  # convolution: mean over space
                    act = act.flatten(2).mean(dim=2)
                sums[i] = sums.get(i, 0) + onehot.T @ act  # (K, C)
    finally:
        for h in hooks:
            h.remove()
    stats: dict[str, float] = {}
    for k in np.flatnonzero(counts):
        stats[f"{COUNT_PREFIX}{k}"] = float(counts[k])
        for i, total in sums.items():
            for c, v in enumerate((total[k] / counts[k]).cpu().numpy()):
                stats[f"{ACTIVATION_PREFIX}{i}.{k}.{c}"] = float(v)
    return stats


def pool_activations(reports: Sequence[Mapping[str, float]], layers: int, num_classes: int
                     ) -> list[np.ndarray]:
    """The clients' reports (:func:`class_activations`) pooled per layer into ``(K, C)``
    arrays, every class weighted by its sample count at each client (the mean over every
    client's samples of the class); a class no client holds stays 0."""
    shapes: dict[int, int] = {}
    for rep in reports:
        for key in rep:
            if key.startswith(ACTIVATION_PREFIX):
                i, _, c = (int(p) for p in key[len(ACTIVATION_PREFIX):].split("."))
                shapes[i] = max(shapes.get(i, 0), c + 1)
    sums = [np.zeros((num_classes, shapes.get(i, 0))) for i in range(layers)]
    totals = np.zeros(num_classes)
    for rep in reports:
        for k in range(num_classes):
            n = rep.get(f"{COUNT_PREFIX}{k}", 0.0)
            if not n:
                continue
            totals[k] += n
            for i in range(layers):
                for c in range(sums[i].shape[1]):
                    sums[i][k, c] += n * rep.get(f"{ACTIVATION_PREFIX}{i}.{k}.{c}", 0.0)
    return [s / np.maximum(totals, 1.0)[:, None] for s in sums]


def tfidf(acts: np.ndarray, target: int) -> np.ndarray:
    """TF-IDF score of every channel for class ``target`` from the ``(K, C)`` mean activations.

    >>> a = np.array([[4.0, 1.0, 1.0], [0.0, 1.0, 1.0], [0.0, 1.0, 1.0]])
    >>> int(np.argmax(tfidf(a, 0)))  # fires on class 0 alone
    0
    """
    k = acts.shape[0]
    tf = acts[target] / max(float(acts[target].sum()), 1e-12)
    relevant = (acts >= acts.mean(axis=0, keepdims=True)).sum(axis=0)
    idf = np.log(k / (1.0 + relevant))
    return tf * idf


def prune_channels(params: Params, layer: str, channels: Sequence[int]) -> Params:
    """A copy of ``params`` with the weights and bias producing ``channels`` of ``layer``
    (a module name of :func:`channel_layers`) set to zero."""
    out = {k: v.copy() for k, v in params.items()}
    for suffix in ("weight", "bias"):
        key = f"{layer}.{suffix}"
        if key in out and len(channels):
            out[key][np.asarray(channels, dtype=np.int64)] = 0
    return out


@UNLEARNERS.register("class_pruning")
class ClassPruning(FederatedUnlearner):
    """Forget a class: prune its most discriminative channels (TF-IDF), then fine-tune.

    Parameters
    ----------
    ratio : float
        Fraction of each hidden layer's channels pruned, the highest TF-IDF scores for the
        removed class first (default 0.1; at least one channel per layer).
    rounds, until, tolerance :
        The fine-tuning (as NoT's repair): by default until the remaining clients' accuracy
        is within ``tolerance`` (0.01) of the model's before the request, at most
        ``training.rounds`` rounds; ``until = "rounds"`` runs exactly ``rounds``.
    epochs : float or None
        Local epochs per fine-tuning round (default ``training.local_epochs``).
    """

    setting: ClassVar[Setting] = "federated"
    capabilities: ClassVar[Capabilities] = Capabilities(granularities=frozenset({"class"}))

    def __init__(self, ratio: float = 0.1, rounds: int | None = None, until: str = "recovered",
                 tolerance: float = 0.01, epochs: float | None = None) -> None:
        self.ratio = ratio
        self.rounds = rounds
        self.until = until
        self.tolerance = tolerance
        self.epochs = epochs

    def check(self) -> None:
        """Refuse bad hyperparameters (one line each) before any work."""
        if not (isinstance(self.ratio, int | float) and not isinstance(self.ratio, bool)
                and 0 < self.ratio <= 1):
            raise ValueError(f"class_pruning's ratio must be in (0, 1], got {self.ratio!r}")
        check_repair("class_pruning", self.rounds, self.until, self.tolerance)
        if self.epochs is not None and not finite_positive(self.epochs):
            raise ValueError(f"class_pruning's epochs must be a finite number > 0, got "
                             f"{self.epochs!r}")

    def unlearn(self, ctx: UnlearningContext) -> UnlearningResult:
        """Local representations, TF-IDF pruning, fine-tuning; ``ctx`` unchanged."""
        self.check()
        assert ctx.removal is not None and ctx.removal.request.label is not None
        label = ctx.removal.request.label
        net = ctx.build_model()
        layers = channel_layers(net)
        first = len(ctx.history.rounds()) + 1
        holders = [k for k in range(ctx.federation.num_clients) if k not in ctx.removed
                   or k in ctx.targets]
        before = {"through": float(ctx.request)}  # the data before this request
        reports = ctx.federation.train_clients(
            ctx.model, holders, epochs=0.0, server_round=first,
            tag=_ACTIVATIONS_PURPOSE, task="activations", task_params=before)
        acts = pool_activations([r.stats for r in reports.values()], len(layers),
                                ctx.data.num_classes)
        pruned = {k: v.copy() for k, v in ctx.model.items()}
        chosen: dict[str, list[int]] = {}
        for name, a in zip(layers, acts, strict=True):
            if a.shape[1] == 0:
                continue
            n = max(1, math.floor(self.ratio * a.shape[1]))
            top = np.argsort(-tfidf(a, label), kind="stable")[:n]
            chosen[name] = sorted(int(c) for c in top)
            pruned = prune_channels(pruned, name, chosen[name])
        epochs = ctx.cfg.training.local_epochs if self.epochs is None else self.epochs
        done = repair(ctx, pruned, rounds=self.rounds, until=self.until,
                      tolerance=self.tolerance, epochs=epochs, first_round=first + 1,
                      purpose=_FINETUNE_PURPOSE)
        cost = Cost(client_epochs=done.cost.client_epochs, rounds=done.cost.rounds + 1,
                    messages_sent=done.cost.messages_sent + len(holders))
        details: dict[str, Any] = {
            "label": label, "pruned": chosen, "reporting_clients": sorted(reports),
            "fine_tune_rounds": done.log, "recovery": done.recovery}
        return UnlearningResult(model=done.model, cost=cost, details=details)
