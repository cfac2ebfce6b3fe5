"""Where a method's KL to retraining on the forgotten data comes from (one seed, in process).

Trains ``simulations/baselines_digits.toml`` for one seed with the in-process federation
(the same models as Flower for the same seed), serves request 0 with retraining, the noise
floor, FedRecover, PGA and NoT under the run's own method seed, and splits
``KL(p_retrain ‖ p_method)`` on the forgotten client's data into its clean and triggered
samples, beside the KL on the test split, how often the two models' predicted classes agree,
how many samples the method sends to the backdoor's target where retraining does not (and the
share of the KL they carry), the share of the 10 largest terms and the mean top probability.
The KL figures equal the CLI run's ``kl_forget`` / ``kl_test`` for the same seed.

    .venv/bin/python scripts/forget_kl_split.py --seed 0 --out /tmp/kl-0
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from fedunlearn.config.tree import load_config
from fedunlearn.data.backdoor import Trigger
from fedunlearn.engine.inprocess import InProcessFederation
from fedunlearn.history.store import HistoryStore
from fedunlearn.models.seeding import derive_seed
from fedunlearn.run.pipeline import prepare, train_federation
from fedunlearn.unlearning import UNLEARNERS
from fedunlearn.unlearning.base import UnlearningContext

METHODS = (("retrain", "retrain", {}), ("retrain_seed2", "retrain", {"variant": 1}),
           ("fedrecover", "fedrecover", {}), ("pga", "pga", {}), ("not", "not", {}))


def kl_rows(probs: dict[str, np.ndarray], test: dict[str, np.ndarray], triggered: np.ndarray,
            target: int) -> list[str]:
    """One line per model: the KL split and the agreement figures (see the module text)."""
    ref, ref_test = probs["retrain"], test["retrain"]
    lines = []
    for name, p in probs.items():
        if name == "retrain":
            continue
        kl = np.sum(ref * np.log(ref / p), axis=1)
        kl_test = float(np.mean(np.sum(ref_test * np.log(ref_test / test[name]), axis=1)))
        to_target = (p.argmax(1) == target) & (ref.argmax(1) != target)
        lines.append(
            f"{name:14s} KL forget {kl.mean():.3f} (clean {kl[~triggered].mean():.3f}, "
            f"triggered {kl[triggered].mean():.3f}); KL test {kl_test:.3f}; classes agree "
            f"{np.mean(ref.argmax(1) == p.argmax(1)):.3f}; {int(to_target.sum())} samples to "
            f"the target carry {kl[to_target].sum() / kl.sum():.2f} of the KL; top-10 share "
            f"{np.sort(kl)[::-1][:10].sum() / kl.sum():.2f}; mean top probability "
            f"{p.max(1).mean():.3f} (retraining {ref.max(1).mean():.3f})")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="simulations/baselines_digits.toml")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="new directory for the history")
    args = parser.parse_args()
    cfg = load_config(args.config, [f"experiment.seeds=[{args.seed}]",
                                    f"experiment.seed={args.seed}"])
    setup = prepare(cfg)
    fed = InProcessFederation(cfg, setup.evaluator())
    store = HistoryStore.create(args.out / "history", retention_interval=1)
    run = train_federation(fed, setup, store, progress=False)
    data = setup.data
    models = {"original": run.final}
    for name, base, forced in METHODS:
        method = UNLEARNERS.get(base)(**{**dict(cfg.unlearning.params.get(base, {})), **forced})
        models[name] = method.unlearn(UnlearningContext(
            cfg=cfg, targets=(0,), removed=frozenset({0}), model=run.final,
            initial=setup.initial, history=store, federation=fed, data=data,
            build_model=setup.build_model, seed=derive_seed(cfg.seed, 0xA11, 0))).model
    target = cfg.backdoor.target_class
    forget = data.clients[0]
    assert data.triggered_test is not None
    trigger = Trigger.recover(data.test.x[data.test.y != target], data.triggered_test.x)
    triggered = trigger.carried_by(forget.x) & (forget.y == target)
    predictor = setup.predictor()

    def probabilities(x: np.ndarray) -> dict[str, np.ndarray]:
        return {k: np.clip(np.asarray(predictor(v)(x), np.float64), 1e-12, 1.0)
                for k, v in models.items()}

    print(f"seed {args.seed}: {len(forget.y)} forgotten samples, {int(triggered.sum())} "
          "triggered")
    print("\n".join(kl_rows(probabilities(forget.x), probabilities(data.test.x), triggered,
                            target)))


if __name__ == "__main__":
    main()
