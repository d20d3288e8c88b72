"""`AuditConfig`: how `popalign audit` classifies and measures (the sampler's settings are a `SamplerConfig`).

    from popalign_core.evaluate.audit import AuditConfig, run_audit
    from popalign_core.models.sampling import SamplerConfig
    run_audit(model="toyworld", prompts="prompts.txt", config=AuditConfig(classifier="toy", axes=("form",)),
              sampler=SamplerConfig(steps=25, guidance_scale=1.5), out_dir="runs/audit")

The fields are checked by `AuditConfig.validate` (called by `run_audit` after its own inputs, before any work), so
a config may be built step by step; the error messages name the `run_audit` arguments they stood for.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from popalign_core.common.fields import help_field

DEFAULT_AXES = ("gender", "race")
DEFAULT_MAX_UNREADABLE = 0.1


@dataclass
class AuditConfig:
    """Classification and metric settings of `run_audit` (module docstring)."""

    classifier: Any = help_field(
        "a name of `CLASSIFIERS` (built with `make_classifier(name, detector=detector, "
        "**classifier_options)`) or a ready object with classify()",
        default="fairface",
    )
    classifier_options: Mapping[str, Any] | None = help_field(
        "options of a named classifier, e.g. {'weights': path, 'device': 'cpu'}", default=None
    )
    detector: Any = help_field(
        "None (the backend's own, or the whole image is the face), a name of `DETECTORS` or an "
        "object with detect(image)",
        default=None,
    )
    axes: Sequence[str] = help_field("the audited axes of the classifier", default=DEFAULT_AXES)
    targets: Mapping[str, Any] | None = help_field(
        "axis -> probabilities over the classifier's classes of that axis (default: uniform)", default=None
    )
    hard_labels: bool = help_field("argmax one-hot labels instead of probabilities", default=False)
    n_boot: int = help_field("bootstrap resamples of the CIs (>= 10)", default=1000)
    max_unreadable: float = help_field(
        "largest share of images that may be unreadable (skipped with a warning); more is an error",
        default=DEFAULT_MAX_UNREADABLE,
    )
    clip_score: Any = help_field(
        "None (skipped), options of the `clip` backend ({'weights': path, 'arch': 'ViT-B-32'}) "
        "or an object with embed_images / embed_texts: adds CLIPScore",
        default=None,
    )

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field (the classifier's axes are checked once it is built)."""
        axes, n_boot, mu = self.axes, self.n_boot, self.max_unreadable
        if isinstance(axes, str) or not axes:
            raise ValueError(f"`axes` must be a non-empty list of axis names; got {axes!r}")
        if not isinstance(n_boot, int) or isinstance(n_boot, bool) or n_boot < 10:
            raise ValueError(f"`n_boot` must be an integer >= 10; got {n_boot!r}")
        if isinstance(mu, bool) or not isinstance(mu, int | float) or not 0 <= mu <= 1:
            raise ValueError(f"`max_unreadable` must be a number in [0, 1]; got {mu!r}")
        dict(self.classifier_options or {})  # a mapping (TypeError otherwise, as before the config existed)
        if not isinstance(self.classifier, str) and not callable(getattr(self.classifier, "classify", None)):
            raise ValueError(
                f"`classifier` must be a classifier name or object with classify(); got {self.classifier!r}"
            )

    @classmethod
    def help(cls) -> dict[str, str]:
        """Field name -> help text."""
        return {name: f.metadata.get("help", "") for name, f in cls.__dataclass_fields__.items()}
