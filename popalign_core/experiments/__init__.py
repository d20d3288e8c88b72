"""Small, self-contained experiments that reproduce results of the PopAlign paper.

`mog`: the synthetic 1-D mixture-of-three-Gaussians evaluation of Section 5 (Fig. 3), run with
``python -m popalign_core.experiments.mog``.
"""
