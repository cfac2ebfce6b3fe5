"""The result schema, defined once: the roles and settings of a comparison row, its fields,
and the keys of its metrics and costs.

:mod:`fedunlearn.run.serving` writes rows (:class:`Row`), :mod:`fedunlearn.evaluation.verify`
fills their metrics, and the summary over seeds, the verdicts and every report read them
through the names below rather than repeating strings. ``results.json`` → ``unlearning`` holds
one :class:`Row` per request and method, as a dict.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class Role(StrEnum):
    """What a row is in its setting's comparison (a ``str``: JSON holds the value)."""

    ORIGINAL = "original"
    """The model before removal."""
    REFERENCE = "reference"
    """Exact retraining without the removed clients (the setting's reference)."""
    NOISE_FLOOR = "noise_floor"
    """A second retraining from the same initial model and participants with fresh client-side
    randomness: how far two retrainings are apart where the methods do not share retraining's
    randomness."""
    CONTEXT = "context"
    """A fully independent retraining (new initial model, participants and shuffles), shown
    beside the noise floor for context; no verdict uses it."""
    METHOD = "method"
    """A removal method judged against the reference."""


ROLES: tuple[str, ...] = tuple(Role)
"""Roles in table order."""

REFERENCE: dict[str, str] = {"federated": "retrain", "centralized": "central_retrain"}
"""The reference method (exact retraining) of each setting."""

SETTINGS: tuple[str, ...] = tuple(REFERENCE)
"""Settings in table order: federated first."""

NOISE_SUFFIX = "_seed2"
INDEPENDENT_SUFFIX = "_independent"
"""Suffix of the independent retraining's method name (``retrain_independent``)."""
"""Suffix of the noise-floor row's method name (``retrain_seed2``)."""

MIA_ATTACKS: tuple[str, ...] = ("mia_loss", "mia_lira", "mia_lira_plain")
"""Key prefixes: the loss attack, population-calibrated offline LiRA, plain offline LiRA."""

MIA_SPLITS: tuple[str, ...] = ("", "_clean", "_triggered")
"""Key suffixes: all members against all non-members, the clean split, the triggered split."""

MIA_KEYS: tuple[str, ...] = tuple(
    key for split in MIA_SPLITS
    for key in (*(k for attack in MIA_ATTACKS
                  for k in (f"{attack}_auc{split}", f"{attack}_auc{split}_ci",
                            f"{attack}_tpr_at_1fpr{split}")),
                f"mia_members{split}", f"mia_nonmembers{split}"))
"""Every membership-inference metric key. Per attack and split: ``<attack>_auc<split>`` (float),
``<attack>_auc<split>_ci`` (``[low, high]``, 95 % percentile bootstrap over the members and
the non-members resampled independently, each within its clean and triggered parts), and
``<attack>_tpr_at_1fpr<split>`` (float); per split ``mia_members<split>`` and
``mia_nonmembers<split>`` (int: below 100 non-members, TPR at 1 % FPR allows no false
positive). LiRA keys appear only with shadow models, ``_triggered`` keys only with a backdoor;
an empty split has NaN metrics."""

PAIRED_ASR_KEYS: tuple[str, ...] = ("backdoor_asr_vs_retrain_p", "backdoor_discordant")
"""McNemar's exact test of the ASR against the reference on the same triggered inputs: the
p-value (float) and the discordant pairs ``[b, c]`` (b: only this model hits the target, c: only
the reference does). Present when both have triggered predictions."""



GRANULAR_KEYS: tuple[str, ...] = ("removed_class_accuracy", "other_classes_accuracy",
                                   "kept_accuracy")
"""Below the client level: a class request's test accuracy on the removed class and on every
other class; a sample request's accuracy on what its clients keep of their data."""

METRIC_KEYS: tuple[str, ...] = (
    "test_accuracy", "retain_accuracy", "forget_accuracy", *GRANULAR_KEYS, "backdoor_asr",
    "backdoor_p_value",
    "backdoor_trigger_active", *PAIRED_ASR_KEYS, "acc_err", "acc_dis", "param_distance",
    "kl_forget", "kl_test", "pred_diff_forget", "pred_diff_test", *MIA_KEYS)
"""Metric keys of a comparison row, in the column order of ``metrics.csv`` (the membership
keys are :data:`MIA_KEYS`)."""

COST_KEYS: tuple[str, ...] = (
    "wall_s", "speedup_vs_retrain", "client_epochs", "rounds", "messages_sent",
    "bytes_exchanged", "sample_epochs", "server_epochs")
"""Cost keys of a comparison row, in the column order of ``metrics.csv``."""

CSV_COLUMNS: tuple[str, ...] = ("request", "granularity", "seed", "setting", "role", "method",
                                 *METRIC_KEYS, *COST_KEYS)
"""The header of ``metrics.csv``."""

SETTINGS: tuple[str, ...] = ("federated", "centralized")


@dataclass
class Row:
    """One line of the comparison table."""

    request: list[int]
    method: str
    setting: str
    role: str
    wall_s: float
    speedup_vs_retrain: float | None
    client_epochs: float
    rounds: int
    messages_sent: int
    bytes_exchanged: int
    sample_epochs: float
    server_epochs: float
    metrics: dict[str, Any]
    model_hash: str
    details: dict[str, Any] = field(default_factory=dict)
    granularity: str = "client"
    """``client``, ``samples`` or ``class`` (:mod:`fedunlearn.config.requests`)."""
    removes: str = ""
    """What a sample or class request removes, in words (``samples of client 3 (backdoor)``,
    ``class 7``); empty for a client request, whose clients are ``request``."""


def request_key(row: Any) -> tuple[tuple[int, ...], str]:
    """What identifies a row's request across seeds: its clients and what it removes (two
    sample requests of one client differ in the second)."""
    return tuple(int(c) for c in row.get("request") or []), str(row.get("removes") or "")


