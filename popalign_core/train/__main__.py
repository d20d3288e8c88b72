"""``python -m popalign_core.train``: the trainer's command line (same as ``popalign train``)."""

import sys

from popalign_core.train.trainer import main

sys.exit(main())
