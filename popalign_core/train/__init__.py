"""Step 3 of the flow, training: preference data on disk -> a LoRA (or full) fine-tune with a loss of the zoo.

- `data`: the preference manifests (JSONL / CSV) and their images (docs/data-format.md);
- `manifest`: manifest files as text (the JSONL / CSV readers and `write_manifest`);
- `losses`: the loss zoo (`LOSSES`: SFT, Diffusion-DPO, PopAlign Eq. 11, RPO, KTO, MaPO, ORPO, DSPO);
- `objective`: one loss evaluation on a batch of clean latents through the model adapter;
- `runconfig`: `RunConfig`, the fields and checks every run config shares (`TrainConfig`, `dal.DALConfig`);
- `config`: `TrainConfig` and `load_config`;
- `loop`: `TrainerBase`, the trainer skeleton (output folder, resume / checkpoints, metrics, the run loop);
- `trainer`: `Trainer` (the preference trainer) and ``popalign train``.

``python -m popalign_core.train --config run.yaml`` (or ``torchrun ... -m popalign_core.train``) runs the trainer.
"""

from popalign_core.common.lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        **dict.fromkeys(
            ["MIXED_PRECISION", "OPTIMIZERS", "POPULATION_SAMPLING", "TrainConfig", "load_config"], ".config"
        ),
        **dict.fromkeys(["RunConfig", "LORA_FORMAT_CHOICES", "config_fingerprint", "load_yaml_config"], ".runconfig"),
        **dict.fromkeys(
            ["TrainerBase", "TrainingError", "train_outputs", "TRAIN_OUTPUTS", "load_training_model"], ".loop"
        ),
        **dict.fromkeys(["Trainer", "train", "build_parser", "main"], ".trainer"),
        **dict.fromkeys(
            ["LOSSES", "LossInputs", "LossOutput", "LossSpec", "compute_loss", "loss_config", "per_sample_error"],
            ".losses",
        ),
        **dict.fromkeys(["PreferenceData", "Sample", "load_preference_data", "write_manifest"], ".data"),
    },
)
