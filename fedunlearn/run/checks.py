"""Every check a run passes before work starts, each failure one line saying what to do.

In the order a run meets them: the machine and the output directory (:func:`preflight`, the
writer lock); the names the config uses, after importing the user's extensions
(:func:`validate_names`); each configured removal method built from its parameters and checked
against the protocol, the rest of the config and the network (:func:`build_methods`,
:func:`check_replayable`); the train step, the strategy, the network against the data and one
step of local training on the clients' batches; the requests against the seeded sampling.
Checks that need the trained history (:func:`check_requests`,
:func:`check_replayable_history`) run when serving starts, before any method. What a user's
extension gets wrong is named with where in the user's code it failed
(:func:`fedunlearn.config.extensions.describe_failure`). A check reads; it never writes.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import os
import re
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedunlearn.config.extensions import (
    USER_ERRORS,
    describe_failure,
    load_extensions,
)
from fedunlearn.config.registry import Registry
from fedunlearn.config.requests import GRANULARITIES
from fedunlearn.config.tree import Config, ConfigError
from fedunlearn.data.federated import FederatedData
from fedunlearn.data.removal import Step
from fedunlearn.data.sources import SOURCES
from fedunlearn.evaluation.schema import (
    INDEPENDENT_SUFFIX,
    NOISE_SUFFIX,
    REFERENCE,
    Role,
)
from fedunlearn.history.store import HistoryStore
from fedunlearn.models import MODELS, build_model
from fedunlearn.models.params import Params
from fedunlearn.models.seeding import sample_participants
from fedunlearn.models.training import (
    OPTIMIZERS,
    TRAIN_STEPS,
    batch_bounds,
    device_for,
    has_batchnorm,
    local_training,
    train,
)
from fedunlearn.run.console import listed
from fedunlearn.run.lock import LOCK_FILE, refuse_if_live, run_dir_lock
from fedunlearn.unlearning.base import (
    UNLEARNERS,
    HistoryNotReplayable,
    Unlearner,
    call_check_config,
    call_check_model,
    capabilities_of,
    declared_setting,
    protocol_gaps,
    setting_of,
)


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def gpu_count() -> int:
    """CUDA devices PyTorch can see (0 on a CPU build)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_engine(cfg: Config) -> None:
    """A local engine cannot reserve more per client than the machine has: Ray would wait
    forever for a client slot. On a cluster (``engine.address``) Ray's nodes decide."""
    e = cfg.engine
    if e.address:
        return
    cpus = available_cpus()
    if e.num_cpus > cpus:
        raise ConfigError(f"config key 'engine.num_cpus' = {e.num_cpus:g} asks more CPUs per "
                          f"client than this machine has ({cpus}); use at most {cpus}, or attach "
                          "to a cluster with engine.address")
    if e.num_gpus > 0:
        gpus = gpu_count()
        if gpus == 0:
            raise ConfigError(f"config key 'engine.num_gpus' = {e.num_gpus:g} but PyTorch sees "
                              "no GPU on this machine; set engine.num_gpus = 0 (or attach to a "
                              "cluster with GPUs via engine.address)")
        if e.num_gpus > gpus:
            raise ConfigError(f"config key 'engine.num_gpus' = {e.num_gpus:g} asks more GPUs "
                              f"per client than this machine has ({gpus})")


def check_out_dir(out: Path) -> None:
    """``out`` must be new or empty (but for this run's lock file), and writable: create it
    (and its parents) if needed, write and remove a probe file, and leave nothing behind that
    was not there before."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(p.name != LOCK_FILE for p in out.iterdir())):
        raise ConfigError(f"output directory '{out}' is not empty; nothing was overwritten - "
                          "choose another --out")
    created = []
    parent = out
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    probe = out / f".probe-{uuid.uuid4().hex}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"fedunlearn")
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"output directory '{out}' cannot be written ({reason}); choose "
                          "another --out") from None
    finally:
        for d in created:  # innermost first
            try:
                d.rmdir()
            except OSError:
                pass


def preflight(cfg: Config, out: Path) -> None:
    """Every check that needs the machine, in the order a user would fix them."""
    check_engine(cfg)
    check_out_dir(out)


@contextlib.contextmanager
def writer_lock(out: Path, command: str) -> Iterator[None]:
    """Hold ``out``'s writer lock (:mod:`fedunlearn.run.lock`; a ``run`` creates a new
    ``out``, removed again if the run is refused before writing into it). Another live writer
    raises :class:`~fedunlearn.run.lock.RunDirLocked`; an ``out`` that cannot be created or
    locked is a :class:`ConfigError`, and so is a non-empty ``out`` of a ``run`` or
    ``compare`` that no live process holds (refused as it is found: a dead run's lock file is
    not taken over)."""
    if command != "resume" and Path(out).is_dir() and \
            any(p.name != LOCK_FILE for p in Path(out).iterdir()):
        refuse_if_live(Path(out), command)  # a live run is named; else --out is not empty:
        check_out_dir(out)  # refused without taking over a dead run's lock
    stack = contextlib.ExitStack()
    try:
        stack.enter_context(run_dir_lock(Path(out), command=command,
                                         create=command != "resume"))
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        what = "resumed" if command == "resume" else "written"
        raise ConfigError(f"run directory '{out}' cannot be {what} ({reason})"
                          + ("" if command == "resume" else "; choose another --out")) from None
    with stack:
        yield


def _resolve(registry: Registry[object] | dict[str, object], key: str, name: str) -> None:
    if name not in registry:
        known = registry.names() if isinstance(registry, Registry) else sorted(registry)
        raise ConfigError(f"config key '{key}' = '{name}' is unknown; known: {', '.join(known)}")


def validate_names(cfg: Config) -> None:
    """Import extensions, then check every registered name the config uses."""
    from fedunlearn.engine.strategy import STRATEGIES

    load_extensions(cfg.experiment.extensions)
    _resolve(SOURCES, "data.source", cfg.data.source)  # type: ignore[arg-type]
    _resolve(MODELS, "model.name", cfg.model.name)  # type: ignore[arg-type]
    _resolve(TRAIN_STEPS, "training.step", cfg.training.step)  # type: ignore[arg-type]
    _resolve(OPTIMIZERS, "training.optimizer", cfg.training.optimizer)  # type: ignore[arg-type]
    _resolve(STRATEGIES, "training.strategy", cfg.training.strategy)  # type: ignore[arg-type]
    check_step_params(cfg)
    check_strategy(cfg)
    if cfg.unlearning.requests:
        from fedunlearn.run.checks import build_methods

        build_methods(cfg)


def check_step_params(cfg: Config) -> None:
    """``training.step_params`` must be keywords the train step takes (its first four
    positional parameters are ``model, x, y, ctx``)."""
    step, name = TRAIN_STEPS.get(cfg.training.step), cfg.training.step
    try:
        signature = inspect.signature(step)
    except ValueError:  # no signature to read (a builtin): the warm-up batch will tell
        return
    try:
        signature.bind_partial(None, None, None, None)  # (the params may be required ones)
    except TypeError as exc:
        raise ConfigError(f"train step '{name}' is called as step(model, x, y, ctx, "
                          f"**training.step_params) and does not take that ({exc}); fix its "
                          "signature") from None
    try:
        signature.bind(None, None, None, None, **cfg.training.step_params)
    except TypeError as exc:
        raise ConfigError(f"config key 'training.step_params' = {dict(cfg.training.step_params)} "
                          f"does not fit train step '{name}' ({exc})") from None


def _strategy_misfit(name: str, params: Mapping[str, Any], exc: Exception) -> str:
    """What a strategy factory's ``TypeError``/``ValueError`` says: its signature does not take
    the call, the parameters do not fit it, or it refused them itself."""
    from fedunlearn.engine.strategy import STRATEGIES

    try:
        signature = inspect.signature(STRATEGIES.get(name))
    except ValueError:  # no signature to read
        return f"config key 'training.strategy_params': {exc}"
    try:
        signature.bind_partial(evaluate_fraction=0.0)
    except TypeError:
        return (f"strategy '{name}': its factory is called as factory(evaluate_fraction=..., "
                "**training.strategy_params) and does not take that; define it as "
                "def factory(evaluate_fraction=0.0, **params)")
    try:
        signature.bind(evaluate_fraction=0.0, **params)
    except TypeError as bad:
        return f"config key 'training.strategy_params' = {dict(params)}: {bad}"
    return f"config key 'training.strategy_params' = {dict(params)}: {describe_failure(exc)}"


def check_strategy(cfg: Config) -> None:
    """Build the strategy once, so a bad factory or bad strategy_params stop before any work;
    it must be a Flower ``Strategy`` that trains every node it is offered (fedunlearn samples
    each round's participants itself)."""
    from flwr.serverapp.strategy import Strategy

    from fedunlearn.engine.strategy import STRATEGIES

    name = cfg.training.strategy
    flwr_log = logging.getLogger("flwr")
    level = flwr_log.level
    flwr_log.setLevel(logging.ERROR)  # Flower's construction warnings belong to the run
    try:
        strategy = STRATEGIES.get(name)(evaluate_fraction=cfg.training.evaluate_fraction,
                                        **cfg.training.strategy_params)
    except (TypeError, ValueError) as exc:
        raise ConfigError(_strategy_misfit(name, cfg.training.strategy_params, exc)) from None
    except USER_ERRORS as exc:  # a user's factory: its error, in one line
        raise ConfigError(f"strategy '{name}' could not be built: {describe_failure(exc)}; "
                          "fix its factory") from None
    finally:
        flwr_log.setLevel(level)
    if not isinstance(strategy, Strategy):
        raise ConfigError(f"strategy '{name}': its factory returned {type(strategy).__name__}, "
                          "not a flwr.serverapp.strategy.Strategy; return one (e.g. FedAvg)")
    fraction = getattr(strategy, "fraction_train", 1.0)
    if fraction != 1.0:
        raise ConfigError(f"strategy '{name}' has fraction_train = {fraction}: fedunlearn "
                          "samples each round's participants itself (training.sample_fraction), "
                          "so the strategy must train every node offered; set "
                          "fraction_train=1.0 in its factory")


def checked_model(cfg: Config, data: FederatedData) -> torch.nn.Module:
    """The experiment's initial network, checked against the data: a ``torch.nn.Module`` with
    trainable parameters that maps a batch to one score per class."""
    about = f"config [model] ({cfg.model.name}, params {dict(cfg.model.params)})"
    try:
        model = build_model(cfg.model.name, data.input_shape, data.num_classes, seed=cfg.seed,
                            **cfg.model.params)
    except ConfigError:
        raise
    except USER_ERRORS as exc:  # the builder itself failing, in one line
        raise ConfigError(f"{about} could not be built: {describe_failure(exc)}") from None
    try:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"its builder returned {type(model).__name__}, not a "
                            "torch.nn.Module")
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError("it has no trainable parameters")
        sample = next(d.x[:2] for d in data.clients if len(d))
        with torch.no_grad():  # the model must take the data (shapes, channel counts)
            out = model.eval()(torch.from_numpy(np.asarray(sample, np.float32)))
        shape = tuple(getattr(out, "shape", ()))
        if shape != (len(sample), data.num_classes):
            raise ValueError(f"it maps {len(sample)} samples to "
                             f"{shape or type(out).__name__}, not to "
                             f"({len(sample)}, {data.num_classes}): one score per class of the "
                             f"data's {data.num_classes}")
    except USER_ERRORS as exc:  # a forward pass failing, in one line
        raise ConfigError(f"{about} does not fit the data: {describe_failure(exc)}") from None
    return model


def _reached(bounds: list[tuple[int, int]], epochs: float) -> list[tuple[int, int]]:
    """The batches of an epoch that ``epochs`` epochs of local training reach (0.5 epochs of
    three batches take the first two of a shuffle, never the partial third)."""
    return bounds[:max(1, min(len(bounds), round(epochs * len(bounds))))]


def check_local_training(cfg: Config, data: FederatedData, network: torch.nn.Module) -> None:
    """One training step on one batch, as every client takes them (train step, optimizer,
    model), before any work; it also pays torch's one-off start-up in this process.
    ``network`` (the experiment's, :func:`checked_model`) is left as it is."""
    from fedunlearn.engine.local import warm_up

    t = cfg.training
    try:
        warm_up(cfg, data)
    except USER_ERRORS as exc:  # a user's step or optimizer, in one line
        raise ConfigError(f"config [training] (step '{t.step}', optimizer '{t.optimizer}', "
                          f"model '{cfg.model.name}') fails on one batch before any round: "
                          f"{describe_failure(exc)}") from None
    # the smallest batch a client will take (a client's last, partial one), if smaller (the
    # warm-up's samples, cut to that size): a model may fail on it (BatchNorm on a client of one
    # sample; a last batch of one joins the one before, training.batch_bounds)
    fold = has_batchnorm(network)
    size, k = min((b - a, k) for k, d in enumerate(data.clients)
                  for a, b in _reached(batch_bounds(len(d), t.batch_size, fold_single=fold),
                                       t.local_epochs))
    local = next(d for d in data.clients if len(d))
    if size < min(t.batch_size, len(local)):
        try:
            train(copy.deepcopy(network), local.x[:size], local.y[:size],
                  local_training(cfg, 1.0), seed=0, device=device_for(cfg))
        except USER_ERRORS as exc:  # in one line, with the batch that fails
            raise ConfigError(
                f"config [training] (step '{t.step}', model '{cfg.model.name}') fails on a "
                f"batch of {size} sample{'s' if size > 1 else ''} (client {k} holds "
                f"{len(data.clients[k])}, training.batch_size is {t.batch_size}): "
                f"{describe_failure(exc)}; change training.batch_size or "
                "data.num_clients") from None


def _check_methods_against_model(cfg: Config, model: Any) -> None:
    """Run each configured method's optional ``check_model(net)`` on the experiment's network
    (NoT's layer indices, for instance), before any training; also for the methods that have
    parameters but are not run this time, whose other parameters are checked too."""
    from fedunlearn.run.checks import build_methods, unlisted_methods

    if not cfg.unlearning.requests:
        return
    listed = [(m.name, m.method) for m in build_methods(cfg)]
    for name, method in [*listed, *unlisted_methods(cfg, {n for n, _ in listed})]:
        try:
            call_check_model(method, model)
        except ValueError as exc:
            raise ConfigError(f"config key 'unlearning.params.{name}': {exc}") from None
        except USER_ERRORS as exc:  # a user's check failing otherwise
            raise ConfigError(f"unlearning method '{name}': its check_model(net) failed: "
                              f"{describe_failure(exc)}") from None


def check_replayable(cfg: Config) -> None:
    """Refuse a strategy declared to break ``M_{t+1} = M_t + Σ_k w_k U_k`` when removal
    requests go to methods that need that identity (``needs_replayable_history``), and a
    retention interval other than 1 for methods that need every round (``needs_every_round``,
    FedRecover).

    A strategy that declares nothing passes here; the history store checks every round as it
    records it, and those methods refuse a history that broke the identity.
    """
    from fedunlearn.engine.strategy import (
        STRATEGIES,
        identity_breaker,
        keeps_history_identity,
    )
    from fedunlearn.run.checks import factory_of

    t = cfg.training
    if not cfg.unlearning.requests:
        return
    every = [n for n in cfg.unlearning.methods
             if capabilities_of(factory_of(n)).needs_every_round]
    if every and cfg.history.retention_interval != 1:
        raise ConfigError(
            f"config key 'history.retention_interval' = {cfg.history.retention_interval}, but "
            f"{', '.join(every)} needs the global model and every client's update of every "
            "round; set history.retention_interval = 1 or drop it from unlearning.methods")
    if keeps_history_identity(t.strategy, t.strategy_params) is not False:
        return
    needy = [n for n in cfg.unlearning.methods
             if capabilities_of(factory_of(n)).needs_replayable_history]
    if not needy:
        return
    why = identity_breaker(t.strategy)
    keepers = [n for n in STRATEGIES.names()
               if getattr(STRATEGIES.get(n), "keeps_history_identity", None) is True]
    given = f" with strategy_params {t.strategy_params}" if t.strategy_params else ""
    raise ConfigError(
        f"config key 'training.strategy' = '{t.strategy}'{given} breaks the history identity "
        f"M_{{t+1}} = M_t + Σ w U{f' ({why})' if why else ''}, so the history-based methods "
        f"{', '.join(needy)} cannot replay it; use {' or '.join(keepers) or 'another strategy'} "
        "or drop those methods from unlearning.methods")


def _check_requests_against_sampling(cfg: Config) -> None:
    """Participation is decided by the seeded sampler, so a request for a client that will
    never take part is refused before training starts.

    The rounds are drawn in order until every requested client has been seen: one round when
    every client takes part, about ``K/m · ln(requested)`` rounds when ``m`` of ``K`` do; all
    ``training.rounds`` (at most :data:`~fedunlearn.config.tree.MAX_ROUNDS`) only for a client the
    run truly never samples."""
    t = cfg.training
    unseen = {c for r in cfg.requests if r.granularity != "class" for c in r.clients}
    for r in range(1, t.rounds + 1):
        if not unseen:
            return
        unseen.difference_update(sample_participants(cfg.seed, r, cfg.data.num_clients,
                                                     t.sample_fraction))
    if unseen:
        raise ConfigError(f"config key 'unlearning.requests' names {listed(sorted(unseen))}, "
                          "which are never sampled for training with this seed and "
                          "sample_fraction; remove them from the requests")


def model_misfit(model: Params, like: Params) -> str | None:
    """How ``model`` fails to be a model of ``like``'s network (array names in order, shapes,
    dtypes, finite floats), or ``None``.

    >>> import numpy as np
    >>> net = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)}
    >>> model_misfit(net, net) is None
    True
    >>> model_misfit({"w": np.zeros((2, 2), np.float32), "b": net["b"]}, net)
    "'w' has shape (2, 2), the network's (2, 3)"
    >>> model_misfit({"b": net["b"]}, net)
    "its arrays are ['b'], the network's ['w', 'b']"
    """
    if list(model) != list(like):
        return f"its arrays are {list(model)[:6]}, the network's {list(like)[:6]}"
    for key, ref in like.items():
        value = model[key]
        if getattr(value, "shape", None) != ref.shape:
            return f"'{key}' has shape {getattr(value, 'shape', None)}, the network's {ref.shape}"
        if value.dtype != ref.dtype:
            return f"'{key}' is {value.dtype}, the network's is {ref.dtype}"
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            return f"'{key}' holds NaN or Inf"
    return None


def check_saved_model(model: Params, like: Params, where: Path, instead: str) -> None:
    """Refuse a model read back from a run directory (a checkpoint, a part-served request's
    state) that is not a model of the run's network, in one line: its checksum only proves it
    is what was written, not that a whole run wrote it.

    Raises
    ------
    ResumeError
        Naming ``where``, what does not fit, and ``instead``: what else the user can do.
    """
    from fedunlearn.run.resume import ResumeError  # (resume imports the checks)

    if why := model_misfit(model, like):
        raise ResumeError(f"'{where}' holds a model that does not fit the run's network "
                          f"({why}); it was edited or damaged: rerun into a new --out, or "
                          f"{instead}")


EXACT = frozenset(REFERENCE.values())


class RequestError(ValueError):
    """A removal request that cannot be served (nothing was changed)."""


@dataclass
class Method:
    """A configured method instance with its name and role in the table."""

    name: str
    method: Unlearner
    role: str  # a Role

    @property
    def setting(self) -> str:
        return setting_of(self.method)


def base_name(name: str) -> str:
    """The registered method behind a configured name: ``"federaser:r1"`` is FedEraser with
    the parameters of ``[unlearning.params."federaser:r1"]``, so one run can compare several
    settings of one method.

    >>> base_name("federaser:r1"), base_name("retrain")
    ('federaser', 'retrain')
    """
    return name.split(":", 1)[0]


def factory_of(name: str) -> Callable[..., Unlearner]:
    """The registered factory of a configured method name (see :func:`base_name`)."""
    return UNLEARNERS.get(base_name(name))


def method_order(cfg: Config) -> list[str]:
    """Configured methods grouped by setting, each setting's reference first.

    ``retrain`` is always present (the federated run is always trained); ``central_retrain``
    joins as soon as a centralized method is configured.
    """
    names = list(cfg.unlearning.methods)
    for name in names:
        _check_name("unlearning.methods", name)
        if setting_of(factory_of(name)) not in REFERENCE:  # it would never run, silently
            raise _protocol_error(name, factory_of(name))
    order: list[str] = []
    for setting, ref in REFERENCE.items():
        members = [n for n in names if setting_of(factory_of(n)) == setting and n != ref]
        if setting == "federated" or members or ref in names:
            order += [ref, *members]
    return order


_LABEL = re.compile(r"[A-Za-z0-9_.+-]+")


def _check_name(key: str, name: str) -> None:
    """A registered method, optionally with a ``:label`` of letters, digits, ``_.+-``."""
    base, sep, label = name.partition(":")
    if base not in UNLEARNERS:
        raise ConfigError(f"config key '{key}': {UNLEARNERS.unknown_message(base)}")
    if sep and not _LABEL.fullmatch(label):
        raise ConfigError(f"config key '{key}': '{name}' has an empty or unusual label after "
                          "':'; use letters, digits and _.+- (e.g. 'federaser:r1')")


def _protocol_error(name: str, method: object) -> ConfigError:
    cls = method if isinstance(method, type) else type(method)
    setting = declared_setting(method)
    which = f"the {setting} protocol" if setting in REFERENCE else "a protocol"
    declared = "" if setting in REFERENCE or setting is None else f" (it declares {setting!r})"
    return ConfigError(f"unlearning method '{name}' ({cls.__name__}) does not implement {which} "
                       f"of fedunlearn.unlearning.base: it lacks "
                       f"{', '.join(protocol_gaps(method))}{declared}")


def _check_types(name: str, factory: Callable[..., Any], params: dict[str, Any]) -> None:
    """A value of the wrong kind for its default (a string or a list for a number, anything
    but true/false for a flag) is named here, before the method's own range checks."""
    defaults = {p.name: p.default for p in inspect.signature(factory).parameters.values()}
    for key, value in params.items():
        default = defaults.get(key)
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"config key 'unlearning.params.{name}.{key}' must be true or "
                                  f"false, got {value!r}")
        elif isinstance(default, int | float) and (
                isinstance(value, bool) or not isinstance(value, int | float)):
            raise ConfigError(f"config key 'unlearning.params.{name}.{key}' must be a number "
                              f"(default {default!r}), got {value!r}")


def _create(cfg: Config, name: str, **forced: Any) -> Unlearner:
    factory = factory_of(name)
    params = dict(cfg.unlearning.params.get(name, {}))
    accepted = [p for p in inspect.signature(factory).parameters if p != "self"]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ConfigError(f"config key 'unlearning.params.{name}' has unknown parameters "
                          f"{unknown}; accepted: {', '.join(accepted) or 'none'}")
    _check_types(name, factory, params)
    try:
        method = factory(**{**params, **forced})
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"config key 'unlearning.params.{name}': {exc}") from None
    except USER_ERRORS as exc:  # a user's constructor: its error, in one line
        raise ConfigError(f"unlearning method '{name}' could not be built: "
                          f"{describe_failure(exc)}") from None
    if protocol_gaps(method):
        raise _protocol_error(name, method)
    try:
        method.check()  # hyperparameter checks that need no data run before any work
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"config key 'unlearning.params.{name}': {exc}") from None
    except USER_ERRORS as exc:  # a user's check failing otherwise, in one line
        raise ConfigError(f"unlearning method '{name}': its check() failed: "
                          f"{describe_failure(exc)}") from None
    return method


def _check_config(cfg: Config, name: str, method: Unlearner) -> None:
    """A configured method's optional ``check_config(cfg)``: checks that need the rest of the
    config (the requests, the purge level), run before any work; ``ValueError`` becomes a
    one-line :class:`ConfigError`."""
    try:
        call_check_config(method, cfg)
    except ValueError as exc:
        raise ConfigError(f"config key 'unlearning.methods' ({name}): {exc}") from None
    except USER_ERRORS as exc:  # a user's check failing otherwise
        raise ConfigError(f"unlearning method '{name}': its check_config(cfg) failed: "
                          f"{describe_failure(exc)}") from None


def build_methods(cfg: Config) -> list[Method]:
    """Instantiate every configured method (and each setting's references); unknown names or
    parameters are ConfigErrors raised before any work."""
    out: list[Method] = []
    for name in method_order(cfg):
        role = Role.REFERENCE if name in EXACT else Role.METHOD
        method = _create(cfg, name)
        _check_config(cfg, name, method)
        check_granularities(cfg, name, method)
        out.append(Method(name, method, role))
        if role == Role.REFERENCE and cfg.verification.noise_floor:
            out.append(Method(name + NOISE_SUFFIX, _create(cfg, name, stream=1),
                              Role.NOISE_FLOOR))
        if role == Role.REFERENCE and cfg.verification.independent_retrain:
            out.append(Method(name + INDEPENDENT_SUFFIX, _create(cfg, name, variant=1),
                              Role.CONTEXT))
    unlisted_methods(cfg, {m.name for m in out})
    return out


def check_granularities(cfg: Config, name: str, method: Unlearner) -> None:
    """Refuse, before any work, a method asked for a request granularity it does not serve
    (``Capabilities.granularities``): it is never served at another level instead."""
    serves = capabilities_of(method).granularities
    for i, request in enumerate(cfg.requests):
        if request.granularity not in serves:
            kinds = ", ".join(g for g in GRANULARITIES if g in serves)
            what = {"client": "a client", "samples": "samples", "class": "a class"}
            raise ConfigError(
                f"config key 'unlearning.methods': method '{name}' serves {kinds} requests "
                f"only, and request {i} ({request.describe()}) removes "
                f"{what[request.granularity]}; leave '{name}' out of unlearning.methods "
                "or drop that request")


def unlisted_methods(cfg: Config, listed: Collection[str]) -> list[tuple[str, Unlearner]]:
    """Instances of the methods that have parameters in ``unlearning.params`` but are not in
    ``listed`` (the ones run this time, e.g. after ``--set unlearning.methods``): their
    parameters are still checked, so a typo in them is caught now rather than on the next
    run."""
    out = []
    for name in sorted(set(cfg.unlearning.params) - set(listed)):
        _check_name(f"unlearning.params.{name}", name)
        method = _create(cfg, name)
        _check_config(cfg, name, method)
        out.append((name, method))
    return out


def settings_in(cfg: Config) -> set[str]:
    """The settings the configured methods (and their references) serve."""
    return {setting_of(factory_of(name)) for name in method_order(cfg)}


def check_requests(cfg: Config, store: HistoryStore, start: int = 0) -> None:
    """Every target of request ``start`` and later (the ones still to serve) must have taken
    part in training and still be in the store."""
    present = set(store.clients())
    for i, request in enumerate(cfg.requests):
        if i < start or request.granularity != "client":
            continue  # samples: their clients stay, and retraining needs no history
        absent = sorted(set(request.clients) - present)
        if absent:
            raise RequestError(f"request {i} asks to remove clients {absent}, which never took "
                               "part in training (or were already purged); nothing was changed")


def check_replayable_history(methods: list[Method], store: HistoryStore) -> None:
    """Methods that consume stored updates or running sums refuse, before any of them runs, a
    history whose rounds broke ``M_{t+1} = M_t + Σ w U`` (e.g. server momentum)."""
    needy = [m.name for m in methods if capabilities_of(m.method).needs_replayable_history]
    if needy and not store.replayable():
        rounds = store.identity_violations()
        raise HistoryNotReplayable(
            f"the stored history is not replayable: training broke M_(t+1) = M_t + Σ w U in "
            f"rounds {rounds[:5]}{' ...' if len(rounds) > 5 else ''} (a server-side optimiser "
            f"such as momentum), so {', '.join(needy)} cannot use it; train with fedavg or "
            "fedprox, or drop those methods")


def check_purged_before(steps: Sequence[Step]) -> None:
    """Refuse, before any work, a client request for a client whose stored updates the purge
    after an earlier sample or class request deletes (docs/history.md)."""
    touched: dict[int, int] = {}
    for i, step in enumerate(steps):
        if step.request.granularity != "client":
            touched.update({c: i for c in step.targets if c not in touched})
        elif hit := sorted(set(step.targets) & set(touched)):
            raise ConfigError(
                f"request {i} asks to remove client {hit[0]}, whose stored updates the purge "
                f"after request {touched[hit[0]]} ({steps[touched[hit[0]]].request.describe()}) "
                "deletes; put the client request first, or set unlearning.purge=false")
