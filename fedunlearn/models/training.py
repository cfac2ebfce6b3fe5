"""Plain PyTorch training and evaluation loops, shared by Flower clients, retraining, SISA and
distillation.

The loss of one mini-batch is computed by a *train step*, the extension point for client
behaviour: register a function under a name in :data:`TRAIN_STEPS` and select it with
``training.step = "name"`` (its keyword arguments come from ``training.step_params``). A step sees
the model, the batch and a :class:`StepContext` holding the global model the client started from,
which is what a proximal term (FedProx) needs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedunlearn.config.registry import Registry

if TYPE_CHECKING:
    from fedunlearn.config.tree import Config


@dataclass
class StepContext:
    """What a train step may use besides the batch.

    Attributes
    ----------
    global_params : list of torch.Tensor
        Detached copies of the model's parameters at the start of local training, in
        ``model.parameters()`` order.
    epoch : int
        Current local epoch (0-based).
    """

    global_params: list[torch.Tensor]
    epoch: int = 0


TrainStep = Callable[..., torch.Tensor]
TRAIN_STEPS: Registry[TrainStep] = Registry("train step")


@TRAIN_STEPS.register("cross_entropy")
def cross_entropy_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                       ctx: StepContext) -> torch.Tensor:
    """The default step: mean cross-entropy of the batch."""
    return F.cross_entropy(model(x), y)


@TRAIN_STEPS.register("proximal")
def proximal_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: StepContext,
                  mu: float = 0.01) -> torch.Tensor:
    """FedProx's local objective (Li et al., MLSys 2020): CE + (mu/2)·||w - w_global||²."""
    if not mu >= 0:
        raise ValueError(f"the proximal step needs mu >= 0 (a pull towards the global model), "
                         f"got training.step_params.mu = {mu}")
    prox = sum(torch.sum((p - g) ** 2) for p, g in zip(model.parameters(), ctx.global_params,
                                                       strict=True))
    return F.cross_entropy(model(x), y) + 0.5 * mu * prox


OPTIMIZERS: Registry[Callable[..., torch.optim.Optimizer]] = Registry("optimizer")
OPTIMIZERS.add("sgd", torch.optim.SGD)
OPTIMIZERS.add("adam", torch.optim.Adam)


@dataclass(frozen=True)
class LocalTraining:
    """Hyperparameters of one local training run.

    Attributes
    ----------
    epochs : float
        Passes over the local data (a fraction trains on a prefix of the shuffled batches).
    batch_size : int
    learning_rate : float
    optimizer : str
        A name in :data:`OPTIMIZERS` (default ``"sgd"``).
    momentum : float
        SGD momentum (ignored by Adam).
    weight_decay : float
    step : str
        A name in :data:`TRAIN_STEPS` (default ``"cross_entropy"``).
    step_params : dict
        Keyword arguments for the step.
    """

    epochs: float = 1.0
    batch_size: int = 32
    learning_rate: float = 0.05
    optimizer: str = "sgd"
    momentum: float = 0.0
    weight_decay: float = 0.0
    step: str = "cross_entropy"
    step_params: tuple[tuple[str, Any], ...] = ()


def _check_loss(loss: Any, step: str) -> None:
    """A train step returns the batch's loss: a one-element tensor attached to the model."""
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        what = (f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor)
                else type(loss).__name__)
        raise TypeError(f"train step '{step}' returned {what}; it must return the batch's loss "
                        "as a one-element tensor (e.g. F.cross_entropy(model(x), y))")
    if not loss.requires_grad:
        raise TypeError(f"train step '{step}' returned a loss that does not depend on the "
                        "model's parameters (detached, or computed without them): nothing to "
                        "train")


def batch_bounds(n: int, batch_size: int, *, fold_single: bool = False) -> list[tuple[int, int]]:
    """``(start, stop)`` of each mini-batch of an epoch over ``n`` shuffled samples; with
    ``fold_single`` a last batch of one sample joins the batch before it (BatchNorm cannot
    train on one sample; PyTorch's ``drop_last`` would lose it instead).

    >>> batch_bounds(5, 2), batch_bounds(5, 2, fold_single=True)
    ([(0, 2), (2, 4), (4, 5)], [(0, 2), (2, 5)])
    """
    bounds = [(lo, min(lo + batch_size, n)) for lo in range(0, n, batch_size)]
    if fold_single and len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds[-2:] = [(bounds[-2][0], n)]
    return bounds


_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` holds a BatchNorm layer (see :func:`batch_bounds`)."""
    return any(isinstance(m, _BATCHNORM) for m in model.modules())


def make_optimizer(model: nn.Module, spec: LocalTraining) -> torch.optim.Optimizer:
    """Build the optimizer named in ``spec``."""
    factory = OPTIMIZERS.get(spec.optimizer)
    kwargs: dict[str, Any] = {"lr": spec.learning_rate, "weight_decay": spec.weight_decay}
    if spec.optimizer == "sgd":
        kwargs["momentum"] = spec.momentum
    return factory(model.parameters(), **kwargs)


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, spec: LocalTraining, *, seed: int,
          device: str = "cpu") -> dict[str, float]:
    """Train ``model`` in place on ``(x, y)``; return ``{"loss": mean loss, "steps": n}``.

    Shuffling is drawn from a generator seeded with ``seed``, so the same inputs give the same
    model. A fractional ``spec.epochs`` (e.g. 0.5) runs that share of one epoch's batches.
    """
    step_fn = TRAIN_STEPS.get(spec.step)
    step_params = dict(spec.step_params)
    model.to(device).train()
    opt = make_optimizer(model, spec)
    xt = torch.from_numpy(x)
    yt = torch.from_numpy(y)
    n = len(xt)
    gen = torch.Generator().manual_seed(seed)
    ctx = StepContext(global_params=[p.detach().clone() for p in model.parameters()])
    bounds = batch_bounds(n, spec.batch_size, fold_single=has_batchnorm(model))
    batches_per_epoch = max(1, len(bounds))
    total_batches = round(spec.epochs * batches_per_epoch)
    losses: list[float] = []
    done = 0
    epoch = 0
    while done < total_batches and n > 0:
        perm = torch.randperm(n, generator=gen)
        ctx.epoch = epoch
        for b in range(batches_per_epoch):
            if done >= total_batches:
                break
            idx = perm[bounds[b][0]:bounds[b][1]]
            xb, yb = xt[idx].to(device), yt[idx].to(device)
            opt.zero_grad(set_to_none=True)
            loss = step_fn(model, xb, yb, ctx, **step_params)
            if done == 0:  # a step's kind of result, once per call (not in the hot loop)
                _check_loss(loss, spec.step)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            done += 1
        epoch += 1
    model.to("cpu")
    return {"loss": float(np.mean(losses)) if losses else 0.0, "steps": float(done)}


@torch.no_grad()
def predict_proba(model: nn.Module, x: np.ndarray, *, batch_size: int = 2048,
                  device: str = "cpu") -> np.ndarray:
    """Class probabilities, shape ``(N, num_classes)``, float64."""
    model.to(device).eval()
    out = [F.softmax(model(torch.from_numpy(x[i:i + batch_size]).to(device)), dim=1).cpu()
           for i in range(0, len(x), batch_size)]
    model.to("cpu")
    if not out:
        return np.zeros((0, 0))
    return torch.cat(out).double().numpy()


def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray, *,
             device: str = "cpu") -> dict[str, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``(x, y)``."""
    if len(x) == 0:
        return {"loss": float("nan"), "accuracy": float("nan")}
    p = predict_proba(model, x, device=device)
    loss = float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None))))
    return {"loss": loss, "accuracy": float(np.mean(p.argmax(1) == y))}


# ------------------------------------------------------------ from the config
def device_for(cfg: Config) -> str:
    """CUDA when the config grants GPUs and one is visible, else CPU."""
    return "cuda" if cfg.engine.num_gpus > 0 and torch.cuda.is_available() else "cpu"


def local_training(cfg: Config, epochs: float | None = None,
                   learning_rate: float | None = None) -> LocalTraining:
    """The local training hyperparameters of ``cfg``; ``epochs`` and ``learning_rate``, when
    given, override ``training.local_epochs`` and ``training.learning_rate``."""
    t = cfg.training
    return LocalTraining(epochs=t.local_epochs if epochs is None else epochs,
                         batch_size=t.batch_size,
                         learning_rate=t.learning_rate if learning_rate is None else learning_rate,
                         optimizer=t.optimizer, momentum=t.momentum,
                         weight_decay=t.weight_decay, step=t.step,
                         step_params=tuple(sorted(t.step_params.items())))
