"""Knowledge-distillation unlearning: subtract the target's history, repair on the server.

Wu, Zhu and Mitra, 2022, "Federated Unlearning with Knowledge Distillation". The server
subtracts the forgotten clients' aggregation-weighted updates summed over every round they took
part in, ``M' = M_F - Σ_u Σ_t w_u^t U_u^t`` (one running sum per client in the history), and
leaves the other clients' contributions as they were. The subtraction leaves a skew, since later
rounds were computed on models that contained the targets; the server repairs it by distilling
the model before the removal (teacher) into ``M'`` (student) on its own *unlabeled* inputs with
the teacher's soft labels at temperature ``T``, loss ``KL(p_T^teacher ‖ p_T^student) · T²``.
No client takes part.

Budget. The repair's cost would grow with the server split (``epochs`` passes over it), so
``max_steps`` bounds the optimizer steps: the passes stop after ``max_steps`` mini-batches, and
the teacher then labels only the batches drawn. Invariants: no client is contacted, only the
server's unlabeled inputs are read, ``ctx`` is not modified. The measurements behind the
defaults are in ``docs/benchmarks.md`` (distillation.py).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from fedunlearn.engine.aggregation import apply_update, l2_norm, weighted_sum
from fedunlearn.models.params import Params, get_params, set_params
from fedunlearn.models.seeding import derive_seed
from fedunlearn.models.training import OPTIMIZERS, batch_bounds, has_batchnorm
from fedunlearn.unlearning.base import (
    UNLEARNERS,
    Capabilities,
    Cost,
    FederatedUnlearner,
    Setting,
    UnlearningContext,
    UnlearningResult,
)

_SHUFFLE_PURPOSE = 0xD157
"""Mixed into the request seed to seed the distillation shuffles."""


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """``KL(p_T^teacher ‖ p_T^student) · T²``, averaged over the batch (Hinton et al., 2015).

    The ``T²`` factor keeps the gradient scale independent of the temperature.
    """
    return F.kl_div(F.log_softmax(student_logits / temperature, dim=1),
                    F.softmax(teacher_logits / temperature, dim=1),
                    reduction="batchmean") * temperature * temperature


def subtract_targets(ctx: UnlearningContext) -> tuple[Params, float]:
    """``M' = ctx.model - Σ_{u ∈ targets} S_u`` over float arrays, and ``‖Σ_u S_u‖``.

    ``S_u = Σ_t w_u^t U_u^t`` is the target's running sum in the history. Non-float arrays are
    copied from ``ctx.model``; neither ``ctx.model`` nor the history is modified.
    """
    if not ctx.targets:
        return {k: v.copy() for k, v in ctx.model.items()}, 0.0
    sums = [ctx.history.running_sum(u) for u in ctx.targets]
    total = weighted_sum(sums, [1.0] * len(sums))
    return apply_update(ctx.model, total, scale=-1.0), l2_norm(total)


@UNLEARNERS.register("distillation")
class Distillation(FederatedUnlearner):
    """Subtract the targets' running sums, then distil the previous model into the result.

    Wu, Zhu and Mitra (2022) publish no distillation hyperparameters; the defaults below were
    chosen by measurement (``docs/benchmarks.md``, distillation.py).

    Parameters
    ----------
    temperature : float, optional
        Softmax temperature ``T`` of the soft labels (default 2.0, the low end of the usual
        2–10: the teacher's decisions stay sharp, and since the ``T²``-scaled loss has
        gradients growing with ``T``, a low ``T`` also keeps the steps small).
    epochs : int, optional
        Passes over the server's inputs (default 20). ``0`` returns the subtracted model.
    learning_rate : float, optional
        Step size (default 0.05, the default local learning rate).
    batch_size : int, optional
        Mini-batch size (default 32, as in local training).
    optimizer : str, optional
        A name in :data:`~fedunlearn.models.training.OPTIMIZERS` (default ``"sgd"``, without
        momentum). Plain SGD moves a weight in proportion to its gradient, so weights the
        clean server inputs barely touch (those reading a trigger) stay where the subtraction
        put them. Adam rescales every weight's step to a similar size and pulls those weights
        back towards the teacher (and the backdoor with them).
    max_steps : int or None, optional
        At most this many optimizer steps in all (default 500; None: no cap). With ``epochs``
        passes of ``ceil(n / batch_size)`` steps each over ``n`` server inputs, the budget binds
        once ``n > max_steps · batch_size / epochs`` (800 inputs at the defaults); the server
        cost is then bounded whatever the server split's size.

    Notes
    -----
    Only ``ctx.data.server.x`` is used (its labels never); ``ctx.federation`` is never called.
    Shuffles come from a ``torch.Generator`` seeded from ``ctx.seed``. ``details`` report the
    steps taken and the cost's ``server_epochs`` is the passes actually made (samples drawn
    over the server split's size).

    Attributes
    ----------
    steps_ : int
        Optimizer steps of the last :meth:`unlearn`.
    """

    setting: ClassVar[Setting] = "federated"
    capabilities: ClassVar[Capabilities] = Capabilities(needs_replayable_history=True)

    def __init__(self, temperature: float = 2.0, epochs: int = 20, learning_rate: float = 0.05,
                 batch_size: int = 32, optimizer: str = "sgd",
                 max_steps: int | None = 500) -> None:
        self.temperature = temperature
        self.epochs = epochs
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.optimizer = optimizer
        self.max_steps = max_steps

    def unlearn(self, ctx: UnlearningContext) -> UnlearningResult:
        """Subtract, then distil on the server; no client is contacted."""
        self._check(ctx)
        subtracted, norm = subtract_targets(ctx)
        student = ctx.build_model()
        set_params(student, subtracted)
        self.steps_, samples = self._distil(student, ctx) if self.epochs > 0 else (0, 0)
        n = len(ctx.data.server.x)
        passes = samples / n if n else 0.0
        details = {"subtracted_norm": norm, "temperature": self.temperature,
                   "epochs": self.epochs, "max_steps": self.max_steps, "steps": self.steps_,
                   "server_samples": n, "passes": passes}
        return UnlearningResult(model=get_params(student), cost=Cost(server_epochs=passes),
                                details=details)

    def check(self) -> None:
        """Refuse bad hyperparameters (called when the config is read, before any work)."""
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(OPTIMIZERS.unknown_message(self.optimizer))
        if not self.temperature > 0 or self.epochs < 0 or self.batch_size < 1 \
                or not self.learning_rate >= 0:
            raise ValueError("distillation needs temperature > 0, epochs >= 0, "
                             "learning_rate >= 0 and batch_size >= 1, got "
                             f"{self.temperature}, {self.epochs}, {self.learning_rate}, "
                             f"{self.batch_size}")
        if self.max_steps is not None and (isinstance(self.max_steps, bool)
                                           or not isinstance(self.max_steps, int)
                                           or self.max_steps < 1):
            raise ValueError(f"distillation needs max_steps >= 1 (an integer; a value above "
                             f"epochs × the server split's batches sets no cap), got "
                             f"{self.max_steps!r}")

    def _check(self, ctx: UnlearningContext) -> None:
        """Refuse bad hyperparameters or a missing server split before any work."""
        self.check()
        if self.epochs > 0 and len(ctx.data.server.x) == 0:
            raise ValueError("distillation needs server inputs but the server split is empty; "
                             "set data.server_fraction > 0")

    def _distil(self, student: torch.nn.Module, ctx: UnlearningContext) -> tuple[int, int]:
        """Train ``student`` in place for ``self.epochs`` shuffled passes over the server inputs
        towards the soft labels of the teacher ``ctx.model``, stopping after ``max_steps``
        steps; return the steps taken and the samples drawn."""
        x = torch.from_numpy(np.asarray(ctx.data.server.x, np.float32))
        teacher = ctx.build_model()
        set_params(teacher, ctx.model)
        bounds = batch_bounds(len(x), self.batch_size, fold_single=has_batchnorm(student))
        per_epoch = len(bounds)
        budget = self.epochs * per_epoch if self.max_steps is None else min(
            self.epochs * per_epoch, self.max_steps)
        # the whole split is labelled at once unless the budget draws fewer samples than it has
        teacher_logits = _logits(teacher, x) if budget == self.epochs * per_epoch else None
        opt = OPTIMIZERS.get(self.optimizer)(student.parameters(), lr=self.learning_rate)
        gen = torch.Generator().manual_seed(derive_seed(ctx.seed, _SHUFFLE_PURPOSE))
        steps = samples = 0
        student.train()
        while steps < budget:
            perm = torch.randperm(len(x), generator=gen)
            for start, stop in bounds:
                if steps == budget:
                    break
                idx = perm[start:stop]
                soft = (teacher_logits[idx] if teacher_logits is not None
                        else _logits(teacher, x[idx]))
                opt.zero_grad(set_to_none=True)
                loss = distillation_loss(student(x[idx]), soft, self.temperature)
                loss.backward()
                opt.step()
                steps += 1
                samples += len(idx)
        student.eval()
        return steps, samples


@torch.no_grad()
def _logits(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 2048) -> torch.Tensor:
    """``model``'s logits on ``x`` in evaluation mode, computed in chunks."""
    model.eval()
    return torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
