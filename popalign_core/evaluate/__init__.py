"""Step 5 of the flow, evaluation: how biased is a model (or a folder of images), before and after.

- `metrics`: bias metrics of a population (`METRICS`: discrepancy Eq. 13, bias(P), recall, ...) with bootstrap CIs;
- `audit`: ``popalign audit``: sample -> detect -> classify -> metrics -> ``audit.json``; ``audit compare``;
- `report`: Markdown / HTML reports and their plots.
"""

from popalign_core.common.lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        **dict.fromkeys(["METRICS", "discrepancy", "bias_pairwise", "bootstrap_ci", "per_prompt_report"], ".metrics"),
        **dict.fromkeys(["run_audit", "compare_audits", "load_audit", "compute_metrics"], ".audit"),
        **dict.fromkeys(["write_report", "write_compare_report", "plot_shares"], ".report"),
    },
)
