"""PopAlign core: bias measurement and debiasing of text-to-image diffusion models.

Standalone: never imports ComfyUI. The sub-packages follow the data flow (docs/architecture.md):

    models -> population (prompts, sample, filter, build) -> train (data, losses, trainer) | dal -> lora -> evaluate
    classify (detectors, attribute classifiers) serves population and evaluate; common serves all;
    toyworld and experiments build on the rest.

Sub-packages import their modules lazily, so importing `popalign_core` alone stays cheap (no torch / diffusers).
Modules that moved in 0.2 still import under their old names (`popalign_core.audit` ->
`popalign_core.evaluate.audit`, ...; `MOVED`) for one release, with a DeprecationWarning.
"""

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

__version__ = "0.2.0"

#: Old module path -> new module path (0.1 -> 0.2). The old path gives the very same module object.
MOVED = {
    f"{__name__}.{old}": f"{__name__}.{new}"
    for old, new in {
        "adapters": "models",
        "adapters.base": "models.adapter",
        "adapters.diffusers": "models.diffusers_adapter",
        "checkpoints": "models.single_file",
        "tokenizers": "models.tokenizers",
        "sampling": "models.sampling",
        "testing": "models.tiny",
        "fileio": "common.fileio",
        "userinput": "common.userinput",
        "attributes": "common.attributes",
        "prompts": "population.prompts",
        "pop_sample": "population.sample",
        "pop_filter": "population.filter",
        "pop_build": "population.build",
        "data": "train.data",
        "losses": "train.losses",
        "objective": "train.objective",
        "ot": "dal.ot",
        "dft": "dal.dft",
        "prefix": "dal.prefix",
        "embedders": "dal.embedders",
        "dal_train": "dal.trainer",
        "lora_io": "lora.files",
        "metrics": "evaluate.metrics",
        "audit": "evaluate.audit",
        "report": "evaluate.report",
        "demo": "experiments.demo",
    }.items()
}
# `models`, `population`, `train` and `dal` were modules and are packages now: their ``__init__`` re-exports the old
# module's public names.


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Import an old module path as the module it moved to (the same object, so patches and isinstance agree)."""

    def find_spec(self, fullname, path=None, target=None):
        new = MOVED.get(fullname)
        if new is None:
            return None
        target_spec = importlib.util.find_spec(new)
        return importlib.util.spec_from_loader(
            fullname, self, origin=target_spec.origin, is_package=target_spec.submodule_search_locations is not None
        )

    def create_module(self, spec):
        warnings.warn(f"{spec.name} moved to {MOVED[spec.name]}; the old path goes away in the next release",
                      DeprecationWarning, stacklevel=2)  # fmt: skip
        module = importlib.import_module(MOVED[spec.name])
        spec.loader_state = module.__spec__  # importlib then sets __spec__ = spec on the object it gets back
        return module

    def exec_module(self, module):
        module.__spec__ = module.__spec__.loader_state  # the moved module's own spec again

    def get_code(self, fullname):  # ``python -m <old path>`` runs the moved module
        spec = importlib.util.find_spec(MOVED[fullname])
        return spec.loader.get_code(spec.name)


if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
    sys.meta_path.append(_MovedModules())
