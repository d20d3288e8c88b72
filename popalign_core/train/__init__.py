"""Step 3 of the flow, training: preference data on disk -> a LoRA (or full) fine-tune with a loss of the zoo.

- `data`: the preference manifests (JSONL / CSV) and their images (docs/data-format.md);
- `losses`: the loss zoo (`LOSSES`: SFT, Diffusion-DPO, PopAlign Eq. 11, RPO, KTO, MaPO, ORPO, DSPO);
- `objective`: one loss evaluation on a batch of clean latents through the model adapter;
- `trainer`: `TrainConfig`, `Trainer` and ``popalign train``.

``python -m popalign_core.train --config run.yaml`` (or ``torchrun ... -m popalign_core.train``) runs the trainer.
"""

from popalign_core.common.lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        **dict.fromkeys(
            [
                "MIXED_PRECISION",
                "OPTIMIZERS",
                "POPULATION_SAMPLING",
                "LORA_FORMAT_CHOICES",
                "TrainingError",
                "train_outputs",
                "TRAIN_OUTPUTS",
                "TrainConfig",
                "config_fingerprint",
                "load_yaml_config",
                "load_config",
                "load_training_model",
                "Trainer",
                "train",
                "build_parser",
                "main",
            ],
            ".trainer",
        ),
        **dict.fromkeys(
            ["LOSSES", "LossInputs", "LossOutput", "LossSpec", "compute_loss", "loss_config", "per_sample_error"],
            ".losses",
        ),
        **dict.fromkeys(["PreferenceData", "Sample", "load_preference_data", "write_manifest"], ".data"),
    },
)
