"""Experiments that reproduce or probe the methods (run each with ``python -m popalign_core.experiments.X``).

- `demo`: the demo (README command #1): audit -> population data -> train -> audit on the toy world;
- `mog`: PopAlign Sec. 5, the 1-D mixture-of-three-Gaussians check (Fig. 3);
- `dal_toy`: distributional alignment on the toy world (the acceptance run of ``popalign dal``);
- `efficacy`: what limits the transfer of debiasing to roles never trained on (docs/efficacy.md).
"""
