"""``python -m medtune`` and ``accelerate launch -m medtune``."""

import sys

from medtune.cli import main

sys.exit(main())
