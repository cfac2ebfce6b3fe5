"""NoT: forget by negating layers of the global model, then fine-tune without the targets.

Khalil, Brunswic, Lamghari, Li, Beitollahi and Chen, CVPR 2025, "NoT: Federated Unlearning via
Weight Negation" (arXiv:2503.05657). The server multiplies the parameters of selected layers of
the current global model by −1 (:func:`negate_layers`). Negation keeps each layer's weight
statistics (norms, spread) but breaks the co-adaptation between consecutive layers, so the
model no longer computes what it learned; it is then recovered by a few FedAvg rounds over the
remaining clients only (:func:`~fedunlearn.unlearning.federated.finetune.remaining_rounds`). No stored
history is used and the targets take no part (nor need their data): client-level forgetting
only asks the targets to leave.

The full text of the paper was not accessible while this was written; the method follows
docs/algorithms.md and the paper's abstract and overview (Figure 2:
"applying layer-wise parameter negation to the global model ... Subsequent fine-tuning rounds
restore essential knowledge"). The default layer (the first) is the one third-party summaries
of the paper name as its default. The paper's number of fine-tuning rounds is not known to us,
so by default the fine-tuning runs until the remaining clients report the accuracy the model
had before the request, within ``tolerance`` (:mod:`fedunlearn.unlearning.federated.finetune`), for at
most ``training.rounds`` rounds; ``until = "rounds"`` runs a fixed number.

The paper serves one request; a chain of requests must never negate a layer twice, which
undoes the earlier negation (:func:`chain_layers`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from fedunlearn.config.requests import GRANULARITIES
from fedunlearn.config.tree import Config
from fedunlearn.models.params import Params
from fedunlearn.unlearning.base import (
    UNLEARNERS,
    Capabilities,
    FederatedUnlearner,
    Setting,
    UnlearningContext,
    UnlearningResult,
    finite_positive,
)
from fedunlearn.unlearning.federated.finetune import check_repair, repair

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


def resolve_layers(n: int, layers: Sequence[int]) -> list[int]:
    """``layers`` as indices ``0..n−1`` of a model with ``n`` parameterised layers.

    >>> resolve_layers(3, [0, -1])
    [0, 2]

    Raises
    ------
    ValueError
        If an index is out of range or repeated.
    """
    resolved = [i % n if -n <= i < n else None for i in layers]
    if None in resolved:
        raise ValueError(f"NoT's layers {list(layers)} do not fit a model with {n} "
                         f"parameterised layers (indices -{n}..{n - 1})")
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"NoT's layers {list(layers)} name a layer twice")
    return resolved  # type: ignore[return-value]


def negate_layers(params: Params, groups: Sequence[Sequence[str]],
                  layers: Sequence[int]) -> Params:
    """A copy of ``params`` with every array of the chosen layers multiplied by −1.

    ``layers`` index ``groups`` (0 = first layer, −1 = last), each layer at most once.

    Raises
    ------
    ValueError
        If an index is out of range or repeated.
    """
    resolved = resolve_layers(len(groups), layers)
    out = {k: v.copy() for k, v in params.items()}
    for i in resolved:
        for name in groups[i]:  # type: ignore[index]
            out[name] = (-params[name]).astype(params[name].dtype)
    return out


def chain_layers(n: int, layers: Sequence[int], request: int) -> list[int]:
    """The layers NoT negates for the request at position ``request`` of a chain (0 = first).

    Negation is its own inverse: negating the first request's layers again, in the model
    that answered it, restores the pairing of those layers with what fine-tuning left of the
    original's other layers, and with it an earlier target's contribution. So no layer is
    negated twice in a chain, and no layer ever returns to the sign it had in an earlier
    model: the layers form units (``layers`` as one unit, then every other layer alone, in
    model order) and request ``k`` negates unit ``k``. The first request negates ``layers``,
    as in the paper (Khalil et al. 2025). No layer restored is the invariant; the repair's
    utility is reported per request (measurements: ``docs/benchmarks.md``,
    negation.py).

    >>> [chain_layers(3, [0], k) for k in range(3)]
    [[0], [1], [2]]
    >>> [chain_layers(3, [-1, 0], k) for k in range(2)]
    [[0, 2], [1]]

    Raises
    ------
    ValueError
        For a bad index (:func:`resolve_layers`), and past the last unit: a chain serves at
        most ``1 + n − len(layers)`` requests.
    """
    chosen = sorted(resolve_layers(n, layers))
    units = [chosen, *([i] for i in range(n) if i not in chosen)]
    if request >= len(units):
        raise ValueError(
            f"NoT with layers {list(layers)} on a model with {n} parameterised layers serves "
            f"at most {len(units)} request{'s' if len(units) != 1 else ''} in a chain "
            f"(request {request + 1} would negate a layer an earlier request negated, which "
            "brings an earlier target's contribution back); list fewer layers or serve fewer "
            "requests")
    return units[request]


@UNLEARNERS.register("not")
class NoT(FederatedUnlearner):
    """Negate selected layers, then FedAvg rounds over the remaining clients (Khalil et al.
    2025).

    Parameters
    ----------
    layers : list of int, optional
        Which parameterised layers to negate, weights and biases (0 = first, −1 = last;
        default ``[0]``, the first layer), for the first request of a chain; later requests
        flip one unit at a time (:func:`chain_layers`). A layer is a module owning trainable
        parameters, in the model's order (for the MLP: each ``Linear``).
    rounds : int or None, optional
        With ``until = "recovered"``: the most fine-tuning rounds (default ``None``:
        ``training.rounds``, what retraining spends); with ``until = "rounds"``: exactly this
        many.
    until : {"recovered", "rounds"}, optional
        End the fine-tuning once the remaining clients' accuracy is back (default) or after
        ``rounds`` rounds (see :func:`fedunlearn.unlearning.federated.finetune.remaining_rounds`).
    tolerance : float, optional
        ``"recovered"`` means: a fixed sample of remaining clients reports, on its own data, at
        least the accuracy the original model had there minus ``tolerance`` (default 0.01).
    epochs : float or None, optional
        Local epochs per fine-tuning round (default ``None``: ``training.local_epochs``).

    Notes
    -----
    How many fine-tuning rounds the paper uses is not known to us, and a fixed number chosen on
    one data set did not carry over to another (``docs/benchmarks.md``, negation.py),
    so by default the repair stops on what a server can observe: the remaining clients'
    accuracy. The backdoor does not come back: the targets never train again and the negated
    first layer no longer computes the trigger's features. Later requests of a chain negate other
    layers (:func:`chain_layers`): negating the first layer again would bring it back.
    """

    setting: ClassVar[Setting] = "federated"
    capabilities: ClassVar[Capabilities] = Capabilities(
        checks_config=True, checks_model=True, granularities=frozenset(GRANULARITIES))

    def __init__(self, layers: Sequence[int] = (0,), rounds: int | None = None,
                 until: str = "recovered", tolerance: float = 0.01,
                 epochs: float | None = None) -> None:
        self.layers = layers
        self.rounds = rounds
        self.until = until
        self.tolerance = tolerance
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
        check_repair("NoT", self.rounds, self.until, self.tolerance)
        if self.epochs is not None and not finite_positive(self.epochs):
            raise ValueError(f"NoT's epochs must be a finite number > 0, got {self.epochs!r}")

    def check_config(self, cfg: Config) -> None:
        """Note how many requests the chain serves, for :meth:`check_model`."""
        self._requests = len(cfg.unlearning.requests)

    def check_model(self, net: Any) -> None:
        """Refuse, before training, layer indices the experiment's network does not have,
        and a chain of requests longer than the layers left to negate (:func:`chain_layers`)."""
        groups = layer_groups([n for n, p in net.named_parameters() if p.requires_grad])
        last = max(getattr(self, "_requests", 1), 1) - 1
        chain_layers(len(groups), self.layers, last)  # raises ValueError

    def unlearn(self, ctx: UnlearningContext) -> UnlearningResult:
        """Negate, then fine-tune with the remaining clients; reads no history but round
        numbers, never contacts a removed client; ``ctx`` unchanged."""
        self.check()
        net = ctx.build_model()
        groups = layer_groups([n for n, p in net.named_parameters() if p.requires_grad])
        flipped = chain_layers(len(groups), self.layers, ctx.request)
        negated = negate_layers(ctx.model, groups, flipped)
        epochs = ctx.cfg.training.local_epochs if self.epochs is None else self.epochs
        first = len(ctx.history.rounds()) + 1
        done = repair(ctx, negated, rounds=self.rounds, until=self.until,
                      tolerance=self.tolerance, epochs=epochs, first_round=first,
                      purpose=_FINETUNE_PURPOSE)
        details: dict[str, Any] = {
            "negated": [name for i in flipped for name in groups[i]],
            "rounds": done.cost.rounds, "fine_tune_rounds": done.log,
            "recovery": done.recovery}
        return UnlearningResult(model=done.model, cost=done.cost, details=details)
