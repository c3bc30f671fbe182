"""Run outputs: per-round ``metrics.jsonl``, ``summary.json``, PNG plots and ``report.html``.

The plotting half (:mod:`fedft.reporting.report`) imports matplotlib; import it directly
where a report is written so training processes never load it.
"""

from fedft.reporting.metrics import MetricsWriter, read_metrics, read_summary, write_summary

__all__ = ["MetricsWriter", "read_metrics", "read_summary", "write_summary"]
