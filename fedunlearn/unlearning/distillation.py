"""Knowledge-distillation unlearning: subtract the target's history, repair on the server.

Wu, Zhu and Mitra, 2022, "Federated Unlearning with Knowledge Distillation". The server
subtracts the forgotten clients' aggregation-weighted updates summed over every round they took
part in, ``M' = M_F - Σ_u Σ_t w_u^t U_u^t`` (one running sum per client in the history), and
leaves the other clients' contributions as they were. The subtraction leaves a skew, since later
rounds were computed on models that contained the targets; the server repairs it by distilling
the model before the removal (teacher) into ``M'`` (student) on its own *unlabeled* inputs with
the teacher's soft labels at temperature ``T``, loss ``KL(p_T^teacher ‖ p_T^student) · T²``.
No client takes part.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from fedunlearn.aggregation import apply_update, l2_norm, weighted_sum
from fedunlearn.params import Params, get_params, set_params
from fedunlearn.seeding import derive_seed
from fedunlearn.training import OPTIMIZERS
from fedunlearn.unlearning.base import (
    UNLEARNERS,
    Cost,
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
class Distillation:
    """Subtract the targets' running sums, then distil the previous model into the result.

    The paper publishes no distillation hyperparameters; the defaults below were chosen on the
    default data (digits, MLP, a server split of 10 %, about 180 inputs) where they restore the
    clean accuracy lost by the subtraction within a fraction of a second, without bringing
    back a backdoor planted by the forgotten client.

    Parameters
    ----------
    temperature : float, optional
        Softmax temperature ``T`` of the soft labels (default 3.0, mid-range of the usual
        2–10: soft enough to carry the teacher's class similarities, sharp enough to keep its
        decisions).
    epochs : int, optional
        Passes over the server's inputs (default 10; the server split is small, so this is
        about 60 steps). ``0`` returns the subtracted model.
    learning_rate : float, optional
        Step size of the optimizer (default 0.01, a usual value for Adam on a small net that
        only needs a repair, not a retraining).
    batch_size : int, optional
        Mini-batch size (default 32, as in local training).
    optimizer : str, optional
        A name in :data:`~fedunlearn.training.OPTIMIZERS` (default ``"adam"``: insensitive to
        the loss scale, which the temperature changes).

    Notes
    -----
    Only ``ctx.data.server.x`` is used (its labels never); ``ctx.federation`` is never called.
    Shuffles come from a ``torch.Generator`` seeded from ``ctx.seed``.
    """

    setting: ClassVar[Setting] = "federated"

    def __init__(self, temperature: float = 3.0, epochs: int = 10, learning_rate: float = 0.01,
                 batch_size: int = 32, optimizer: str = "adam") -> None:
        self.temperature = temperature
        self.epochs = epochs
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.optimizer = optimizer

    def unlearn(self, ctx: UnlearningContext) -> UnlearningResult:
        """Subtract, then distil on the server; no client is contacted."""
        factory = OPTIMIZERS.get(self.optimizer)
        if not self.temperature > 0 or self.epochs < 0 or self.batch_size < 1:
            raise ValueError("distillation needs temperature > 0, epochs >= 0 and "
                             f"batch_size >= 1, got {self.temperature}, {self.epochs}, "
                             f"{self.batch_size}")
        x = np.asarray(ctx.data.server.x, np.float32)
        if self.epochs > 0 and len(x) == 0:
            raise ValueError("distillation needs server inputs but the server split is empty; "
                             "set data.server_fraction > 0")
        subtracted, norm = subtract_targets(ctx)
        student = ctx.build_model()
        set_params(student, subtracted)
        if self.epochs > 0:
            teacher = ctx.build_model()
            set_params(teacher, ctx.model)
            teacher.eval()
            with torch.no_grad():
                soft = torch.cat([teacher(torch.from_numpy(x[i:i + 2048]))
                                  for i in range(0, len(x), 2048)])
            opt = factory(student.parameters(), lr=self.learning_rate)
            gen = torch.Generator().manual_seed(derive_seed(ctx.seed, _SHUFFLE_PURPOSE))
            self._distil(student, torch.from_numpy(x), soft, opt, gen)
        details = {"subtracted_norm": norm, "temperature": self.temperature,
                   "epochs": self.epochs}
        return UnlearningResult(model=get_params(student), cost=Cost(server_epochs=self.epochs),
                                details=details)

    def _distil(self, student: torch.nn.Module, x: torch.Tensor, teacher_logits: torch.Tensor,
                opt: torch.optim.Optimizer, gen: torch.Generator) -> None:
        """``self.epochs`` shuffled passes of the distillation loss over ``x``."""
        student.train()
        for _ in range(self.epochs):
            perm = torch.randperm(len(x), generator=gen)
            for start in range(0, len(x), self.batch_size):
                idx = perm[start:start + self.batch_size]
                opt.zero_grad(set_to_none=True)
                loss = distillation_loss(student(x[idx]), teacher_logits[idx], self.temperature)
                loss.backward()
                opt.step()
        student.eval()
