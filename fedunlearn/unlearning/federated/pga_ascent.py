"""Projected gradient ascent on one client's data: the client side of PGA unlearning.

Halimi, Kadhe, Rawat and Baracaldo, 2022, "Federated Unlearning: How to Efficiently Erase a
Client in FL?" (arXiv:2207.05521). The client to be forgotten *maximises* its own empirical
loss, starting from a reference model ``w_ref`` it received, and after every step projects the
model back onto the L2 ball ``{w : ‖w − w_ref‖ ≤ δ}``, so the ascent cannot run off to an
arbitrary (useless) model. It stops early as soon as the model's accuracy on the client's
*clean* samples (the ones it did not poison) falls below a threshold ``τ``.

The optimizer is the authors' (IBM/federated-unlearning, ``federated_unlearning.ipynb``): SGD
with momentum (0.9 there) and the gradient's L2 norm clipped (at 5 there) before each step;
both are hyperparameters of :class:`Ascent`. Where this departs from the paper and the
authors' code, and what each departure measured, is in ``docs/algorithms.md`` (section PGA).

The loop is engine-independent: the Flower ClientApp and the in-process federation both run it
through :func:`fedunlearn.engine.local.client_ascent`, so both do bit-for-bit the same work.
The projection (:func:`project_onto_ball_`) is pure math on tensors and unit-tested by hand.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedunlearn.models.training import batch_bounds, has_batchnorm

ASCENT_FORGET = "forget_of"
"""Optional ``task_params`` entry of the client task ``"ascent"``: N > 0 ascends on the samples
removal request N - 1 removes from the client (a sample or class request), judged on them,
instead of on the client's whole data judged on its clean samples
(:func:`fedunlearn.engine.local.client_ascent`)."""


@dataclass(frozen=True)
class Ascent:
    """Hyperparameters of one projected gradient ascent run.

    Attributes
    ----------
    epochs : float
        Largest number of passes over the local data (the ascent may stop earlier).
    batch_size : int
    learning_rate : float
        SGD step size (no weight decay), applied to ``+∇ loss``.
    momentum : float
        SGD momentum in ``[0, 1)`` (the authors' code: 0.9; 0 is plain SGD).
    clip_norm : float
        The gradient's L2 norm (all trainable parameters together) is clipped to this before
        each step (:func:`torch.nn.utils.clip_grad_norm_`; the authors' code: 5); 0 disables
        the clipping.
    radius : float
        ``δ``: the model stays within L2 distance ``δ`` of the model it started from (all
        trainable parameters taken together). ``inf`` disables the projection.
    threshold : float
        ``τ``: stop as soon as the accuracy on the judged samples (see
        :func:`projected_ascent`) is below it (checked before every step, so a model already
        below ``τ`` takes no step).
    """

    epochs: float
    batch_size: int
    learning_rate: float
    momentum: float
    clip_norm: float
    radius: float
    threshold: float


def project_onto_ball_(tensors: Sequence[torch.Tensor], center: Sequence[torch.Tensor],
                       radius: float) -> float:
    """Project ``tensors`` (in place) onto ``{w : ‖w − center‖₂ ≤ radius}``.

    The norm is taken over all tensors together (one ball in the whole parameter space). A
    point outside moves along the segment to the centre, ``w ← c + (w − c) · radius / ‖w − c‖``;
    a point inside is left untouched. Returns the scale applied to ``w − c`` (1.0 when inside).

    >>> w, c = [torch.tensor([3.0, 4.0])], [torch.zeros(2)]
    >>> project_onto_ball_(w, c, 2.5), w[0].tolist()
    (0.5, [1.5, 2.0])
    """
    if radius < 0:
        raise ValueError(f"the ball's radius must be >= 0, got {radius}")
    with torch.no_grad():
        sq = sum(float(torch.sum((w.double() - c.double()) ** 2))
                 for w, c in zip(tensors, center, strict=True))
        dist = math.sqrt(sq)
        if dist <= radius:
            return 1.0
        scale = radius / dist
        for w, c in zip(tensors, center, strict=True):
            w.copy_(c + (w - c) * scale)
    return scale


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    acc = float((model(x).argmax(1) == y).double().mean())
    model.train()
    return acc


def projected_ascent(model: nn.Module, x: np.ndarray, y: np.ndarray, spec: Ascent, *,
                     seed: int, device: str = "cpu",
                     judged: np.ndarray | None = None) -> dict[str, float]:
    """Run projected gradient ascent on ``(x, y)`` in place; return what happened.

    Each step: mini-batch of ``(x, y)`` (shuffled from a generator seeded with ``seed``),
    gradient of ``−CE`` clipped to ``spec.clip_norm``, an SGD step with ``spec.momentum``
    (so ``w`` moves along ``+∇ CE``), then :func:`project_onto_ball_` around the starting
    model. Before every step the accuracy on the *judged* samples is checked against
    ``spec.threshold``.

    Parameters
    ----------
    judged : np.ndarray or None, optional
        Boolean mask over ``(x, y)``: the samples ``τ`` is judged on (PGA: the client's clean
        samples). Default ``None``, or a mask selecting nothing: all of ``(x, y)``. The ascent
        itself always runs on all of ``(x, y)``.

    Returns
    -------
    dict
        ``steps`` taken, ``epochs`` done (steps / batches per epoch), ``stopped_early`` (1.0 if
        the threshold stopped it), ``accuracy`` on the judged samples at the end, ``distance``
        from the start at the end, ``loss`` (mean batch loss over the steps, 0 without steps),
        ``judged`` (number of judged samples), ``accuracy_passes`` (forward passes over the
        judged samples: one before every step and one for the final accuracy, which the
        early stop's last check provides; so ``steps + 1``) and ``check_epochs``
        (``accuracy_passes · judged / len(x)``, those passes in epochs of the local data).
    """
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    center = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=spec.learning_rate, momentum=spec.momentum)
    xt = torch.from_numpy(x).to(device)
    yt = torch.from_numpy(y).to(device)
    n = len(xt)
    mask = np.ones(n, dtype=bool) if judged is None else np.asarray(judged, dtype=bool)
    if mask.shape != (n,):
        raise ValueError(f"judged must be a boolean mask of the {n} samples, got shape "
                         f"{mask.shape}")
    if not mask.any():
        mask = np.ones(n, dtype=bool)
    pick = torch.from_numpy(np.flatnonzero(mask)).to(device)
    xj, yj = xt[pick], yt[pick]
    gen = torch.Generator().manual_seed(seed)
    bounds = batch_bounds(n, spec.batch_size, fold_single=has_batchnorm(model))
    batches_per_epoch = max(1, len(bounds))
    total = round(spec.epochs * batches_per_epoch) if n > 0 else 0
    losses: list[float] = []
    stopped = False
    done = 0
    passes = 0
    checked = float("nan")
    while done < total and not stopped:
        perm = torch.randperm(n, generator=gen)
        for b in range(batches_per_epoch):
            if done >= total:
                break
            passes += 1
            checked = _accuracy(model, xj, yj)
            if checked < spec.threshold:
                stopped = True
                break
            idx = perm[bounds[b][0]:bounds[b][1]].to(device)
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(xt[idx]), yt[idx])
            (-loss).backward()  # ascent: descend on the negated loss
            if spec.clip_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, spec.clip_norm)
            opt.step()
            if math.isfinite(spec.radius):
                project_onto_ball_(params, center, spec.radius)
            losses.append(float(loss.detach()))
            done += 1
    with torch.no_grad():
        distance = math.sqrt(sum(float(torch.sum((p.double() - c.double()) ** 2))
                                 for p, c in zip(params, center, strict=True)))
    if stopped:  # the early stop's last check measured the final model
        final_accuracy = checked
    elif n > 0:
        passes += 1
        final_accuracy = _accuracy(model, xj, yj)
    else:
        final_accuracy = float("nan")
    model.to("cpu")
    m = len(pick) if n > 0 else 0
    return {"steps": float(done), "epochs": done / batches_per_epoch,
            "stopped_early": float(stopped), "accuracy": final_accuracy,
            "distance": distance, "loss": float(np.mean(losses)) if losses else 0.0,
            "judged": float(m), "accuracy_passes": float(passes),
            "check_epochs": passes * m / n if n > 0 else 0.0}
