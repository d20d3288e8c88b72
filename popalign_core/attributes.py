"""Attribute axes, their class lists, and target distributions (per axis, joint, conditional).

Class names are lower-case identifiers used everywhere (classifier outputs, metrics, reports, targets).
"""

from __future__ import annotations

# ------------------------------------------------------------------------------------------------ canonical axes
GENDER = ("female", "male")
RACE_FAIRFACE7 = ("white", "black", "latino_hispanic", "east_asian", "southeast_asian", "indian", "middle_eastern")
RACE_PAPER6 = ("white", "black", "latino_hispanic", "asian", "indian", "middle_eastern")  # DeepFace / PopAlign paper
RACE_GROUP4 = ("white", "black", "asian", "indian")  # the 4-group mapping of the fair-diffusion code
AGE_FAIRFACE9 = ("0-2", "3-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69", "70+")
AGE_BINARY = ("young", "old")  # under 40 / 40 and over

# mappings between race class sets (many-to-one): documented, used to compare classifiers with different sets
RACE_MAPS = {
    ("fairface7", "paper6"): {
        "white": "white",
        "black": "black",
        "latino_hispanic": "latino_hispanic",
        "east_asian": "asian",
        "southeast_asian": "asian",
        "indian": "indian",
        "middle_eastern": "middle_eastern",
    },
    ("fairface7", "group4"): {
        "white": "white",
        "black": "black",
        "latino_hispanic": "white",
        "east_asian": "asian",
        "southeast_asian": "asian",
        "indian": "indian",
        "middle_eastern": "white",
    },
}

# named class sets per axis: AXES[axis][variant] -> class tuple; the first variant is the axis default
AXES: dict[str, dict[str, tuple[str, ...]]] = {
    "gender": {"binary": GENDER},
    "race": {"fairface7": RACE_FAIRFACE7, "paper6": RACE_PAPER6, "group4": RACE_GROUP4},
    "age": {"fairface9": AGE_FAIRFACE9, "binary": AGE_BINARY},
}
