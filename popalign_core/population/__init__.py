"""Steps 1-2 of the flow, population data (PopAlign Sec. 4.1): prompts -> population -> filter -> preference data.

- `prompts`: identity keywords and prompt augmentation ("a doctor" -> "a female doctor", ...);
- `sample`: population runs, the images of every augmented prompt from the seeded sampler;
- `filter`: face detector + attribute classifier keep the images that show what their prompt asked for;
- `build`: the filtered run -> preference manifests in the trainer's format (`popalign_core.train.data`);
- `pipeline`: ``popalign data augment|sample|filter|build|pipeline`` over a YAML config.
"""

from popalign_core.common.lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        **dict.fromkeys(
            [
                "PIPELINE_OUTPUTS",
                "read_prompt_file",
                "keyword_sets",
                "PIPELINE_SECTIONS",
                "PIPELINE_TOP",
                "load_pipeline_config",
                "augment_config",
                "sampler_config",
                "make_filter_classifier",
                "filter_config",
                "build_config",
                "run_pipeline",
                "check_augmented",
                "main",
            ],
            ".pipeline",
        ),
        **dict.fromkeys(["AugmentConfig", "augment_prompts", "is_identity_specific"], ".prompts"),
        **dict.fromkeys(["sample_population", "read_samples"], ".sample"),
        **dict.fromkeys(["FilterConfig", "filter_population"], ".filter"),
        **dict.fromkeys(["BuildConfig", "build_preferences"], ".build"),
    },
)
