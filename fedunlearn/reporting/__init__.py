"""The only package that writes tables, plots and result files.

- ``files``: the provenance stamp, ``results.json`` and the atomic text writer.
- ``tables``: comparison rows (normalised, ordered, formatted), text tables, ``metrics.csv``.
- ``plots``: the PNG plots; matplotlib is imported lazily, inside the plotting functions.
- ``markdown``: ``report.md`` and :func:`write_report`, which writes a run's whole report.

Importing this package stays light: it does not import matplotlib.
"""

from fedunlearn.reporting.files import (
    read_results,
    stamp,
    training_block,
    training_summary,
    write_json,
)
from fedunlearn.reporting.markdown import report_markdown, write_report
from fedunlearn.reporting.plots import (
    DPI,
    plot_fidelity_speedup,
    plot_method_bars,
    plot_replay_trajectory,
    plot_training_curve,
)
from fedunlearn.reporting.tables import (
    COST_KEYS,
    CSV_COLUMNS,
    METRIC_KEYS,
    MISSING,
    NOISE_FLOOR_LABEL,
    ROLES,
    SETTINGS,
    comparison_table,
    display_rows,
    metrics_table_rows,
    normalize_row,
    ordered_rows,
    request_label,
    trigger_verdict,
    verdict_table,
    verification_line,
    verification_summary,
    write_metrics_csv,
)

__all__ = [
    "COST_KEYS",
    "CSV_COLUMNS",
    "DPI",
    "METRIC_KEYS",
    "MISSING",
    "NOISE_FLOOR_LABEL",
    "ROLES",
    "SETTINGS",
    "comparison_table",
    "display_rows",
    "metrics_table_rows",
    "normalize_row",
    "ordered_rows",
    "plot_fidelity_speedup",
    "plot_method_bars",
    "plot_replay_trajectory",
    "plot_training_curve",
    "read_results",
    "report_markdown",
    "request_label",
    "stamp",
    "training_block",
    "training_summary",
    "trigger_verdict",
    "verdict_table",
    "verification_line",
    "verification_summary",
    "write_json",
    "write_metrics_csv",
    "write_report",
]
