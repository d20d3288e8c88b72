"""Step 5 of the flow, evaluation: how biased is a model (or a folder of images), before and after.

- `metrics`: bias metrics of a population (`METRICS`: discrepancy Eq. 13, bias(P), recall, ...) with bootstrap CIs;
- `audit`: ``popalign audit``: validate -> sample / classify / measure -> write ``audit.json``, and its CLI;
  `audit_config` (`AuditConfig`), `audit_files` (prompts, manifests, image folders, JSON), `audit_compute`
  (sampling, classification, metrics of an audit), `compare` (``audit compare``: before / after);
- `report`: Markdown / HTML reports and their plots.
"""

from popalign_core.common.lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        **dict.fromkeys(["METRICS", "discrepancy", "bias_pairwise", "bootstrap_ci", "per_prompt_report"], ".metrics"),
        "run_audit": ".audit",
        "AuditConfig": ".audit_config",
        "compute_metrics": ".audit_compute",
        "load_audit": ".audit_files",
        "compare_audits": ".compare",
        **dict.fromkeys(["write_report", "write_compare_report", "plot_shares", "plot_batch_shares"], ".report"),
        **dict.fromkeys(["batch_metrics", "chart_data"], ".batch"),
    },
)
