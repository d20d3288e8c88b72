"""Step 3, the second way to train: distributional alignment (DAL) by adjusted direct fine-tuning.

The flow inside: generate with a gradient (`dft`) -> classify -> dynamic targets by expected optimal transport
(`ot`) -> the distributional alignment loss (`loss`, patent Eq. 6) plus the semantics and face-realism losses on
image embeddings (`embedders`, face banks) -> LoRA and / or a soft prompt prefix (`prefix`). `config` holds `DALConfig`
(a `train.runconfig.RunConfig`); `trainer` runs it all on the trainer skeleton (``popalign dal``,
``python -m popalign_core.dal``).
"""

from popalign_core.common.lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        **dict.fromkeys(["DALOutput", "DALTargets", "dal_loss", "dal_targets"], ".loss"),
        **dict.fromkeys(["DALConfig", "TRAIN_TARGETS", "load_dal_config", "build_target"], ".config"),
        **dict.fromkeys(["DALTrainer", "run_dal"], ".trainer"),
        **dict.fromkeys(["dynamic_targets", "expected_ot_targets", "expected_ot_targets_axes"], ".ot"),
        **dict.fromkeys(["DFTConfig", "generate", "GRADIENTS"], ".dft"),
        **dict.fromkeys(["EMBEDDERS", "make_embedder"], ".embedders"),
        "FaceBank": ".facebank",
        "SoftPrefix": ".prefix",
    },
)
