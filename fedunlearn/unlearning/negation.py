"""NoT: forget by negating layers of the global model, then fine-tune without the targets.

Khalil, Brunswic, Lamghari, Li, Beitollahi and Chen, CVPR 2025, "NoT: Federated Unlearning via
Weight Negation" (arXiv:2503.05657). The server multiplies the parameters of selected layers of
the current global model by −1 (:func:`negate_layers`). Negation keeps each layer's weight
statistics (norms, spread) but breaks the co-adaptation between consecutive layers, so the
model no longer computes what it learned; it is then recovered by a few FedAvg rounds over the
remaining clients only (:func:`~fedunlearn.unlearning.finetune.remaining_rounds`). No stored
history is used and the targets take no part (nor need their data): client-level forgetting
only asks the targets to leave.

The full text of the paper was not accessible while this was written; the method follows
ALGORITHMS.md ("History-free methods") and the paper's abstract and overview (Figure 2:
"applying layer-wise parameter negation to the global model ... Subsequent fine-tuning rounds
restore essential knowledge"). The default layer (the first) is the one third-party summaries
of the paper name as its default; the number of fine-tuning rounds is not known to us from the
paper, and on ``baselines_digits`` five are too few in all three seeds while ten are enough
(``scripts/baseline_sensitivity.py``; the default stays five, see Notes of :class:`NoT`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from fedunlearn.params import Params, get_params
from fedunlearn.unlearning.base import (
    UNLEARNERS,
    Setting,
    UnlearningContext,
    UnlearningResult,
    finite_positive,
)
from fedunlearn.unlearning.finetune import remaining_rounds

_FINETUNE_PURPOSE = 0x2E67


def layer_groups(names: Sequence[str]) -> list[list[str]]:
    """Parameter names grouped by layer (the module path before the last dot), in order.

    >>> layer_groups(["1.weight", "1.bias", "3.weight", "3.bias", "head"])
    [['1.weight', '1.bias'], ['3.weight', '3.bias'], ['head']]
    """
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(name.rsplit(".", 1)[0] if "." in name else name, []).append(name)
    return list(groups.values())


def negate_layers(params: Params, groups: Sequence[Sequence[str]],
                  layers: Sequence[int]) -> Params:
    """A copy of ``params`` with every array of the chosen layers multiplied by −1.

    ``layers`` index ``groups`` (0 = first layer, −1 = last), each layer at most once.

    Raises
    ------
    ValueError
        If an index is out of range or repeated.
    """
    n = len(groups)
    resolved = [i % n if -n <= i < n else None for i in layers]
    if None in resolved:
        raise ValueError(f"NoT's layers {list(layers)} do not fit a model with {n} "
                         f"parameterised layers (indices -{n}..{n - 1})")
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"NoT's layers {list(layers)} name a layer twice")
    out = {k: v.copy() for k, v in params.items()}
    for i in resolved:
        for name in groups[i]:  # type: ignore[index]
            out[name] = (-params[name]).astype(params[name].dtype)
    return out


@UNLEARNERS.register("not")
class NoT:
    """Negate selected layers, then FedAvg rounds over the remaining clients (Khalil et al.
    2025).

    Parameters
    ----------
    layers : list of int, optional
        Which parameterised layers to negate, weights and biases (0 = first, −1 = last;
        default ``[0]``, the first layer). A layer is a module owning trainable parameters,
        in the model's order (for the MLP: each ``Linear``).
    rounds : int, optional
        Fine-tuning FedAvg rounds with the remaining clients (default 5; see Notes).
    epochs : float or None, optional
        Local epochs per fine-tuning round (default ``None``: ``training.local_epochs``).

    Notes
    -----
    ``rounds`` was measured on the training of ``simulations/backdoor_digits.toml``
    (in-process, seed 0, request seed 123; retraining: backdoor ASR 0.003, test accuracy
    0.972), first layer negated:

    ======  =====  ========
    rounds  ASR    test acc
    ======  =====  ========
    1       0.124  0.231
    3       0.003  0.855
    5       0.003  0.936
    ======  =====  ========

    Five rounds (5 · 9 · 4 = 180 client epochs, against retraining's 1,440) put both the
    backdoor's success and the test accuracy within the acceptance bands (0.10 and 0.05 of
    retraining's). The backdoor does not come back: the targets never train again and the
    negated first layer no longer computes the trigger's features.
    """

    setting: ClassVar[Setting] = "federated"

    def __init__(self, layers: Sequence[int] = (0,), rounds: int = 5,
                 epochs: float | None = None) -> None:
        self.layers = layers
        self.rounds = rounds
        self.epochs = epochs

    def check(self) -> None:
        """Refuse bad hyperparameters (one line each) before any work."""
        layers = list(self.layers) if isinstance(self.layers, list | tuple) else None
        if not layers or not all(isinstance(i, int) and not isinstance(i, bool)
                                 for i in layers):
            raise ValueError(f"NoT's layers must be a non-empty list of layer indices, got "
                             f"{self.layers!r}")
        if len(set(layers)) != len(layers):
            raise ValueError(f"NoT's layers {layers} name a layer twice")
        if not isinstance(self.rounds, int) or isinstance(self.rounds, bool) or self.rounds < 0:
            raise ValueError(f"NoT's rounds must be an integer >= 0, got {self.rounds!r}")
        if self.epochs is not None and not finite_positive(self.epochs):
            raise ValueError(f"NoT's epochs must be a finite number > 0, got {self.epochs!r}")

    def check_model(self, net: Any) -> None:
        """Refuse, before training, layer indices the experiment's network does not have."""
        groups = layer_groups([n for n, p in net.named_parameters() if p.requires_grad])
        negate_layers(get_params(net), groups, list(self.layers))  # raises ValueError

    def unlearn(self, ctx: UnlearningContext) -> UnlearningResult:
        """Negate, then fine-tune with the remaining clients; reads no history but round
        numbers, never contacts a removed client; ``ctx`` unchanged."""
        self.check()
        net = ctx.build_model()
        groups = layer_groups([n for n, p in net.named_parameters() if p.requires_grad])
        negated = negate_layers(ctx.model, groups, list(self.layers))
        epochs = ctx.cfg.training.local_epochs if self.epochs is None else self.epochs
        first = len(ctx.history.rounds()) + 1
        model, cost, log = remaining_rounds(ctx, negated, self.rounds, epochs=epochs,
                                            first_round=first, purpose=_FINETUNE_PURPOSE)
        details: dict[str, Any] = {
            "negated": [name for i in self.layers for name in groups[i]],
            "rounds": self.rounds, "fine_tune_rounds": log}
        return UnlearningResult(model=model, cost=cost, details=details)
