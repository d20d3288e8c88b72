"""``python -m popalign_core.dal``: distributional alignment from the command line (same as ``popalign dal``)."""

import sys

from popalign_core.dal.trainer import main

sys.exit(main())
