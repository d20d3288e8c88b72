"""``python -m popalign_core.population``: the population data pipeline (same as ``popalign data``)."""

import sys

from popalign_core.population.pipeline import main

sys.exit(main())
