"""``python -m mechcna.reproduce --model M --out DIR [--paper ...] [--quick]``."""

import sys

from mechcna.reproduce.command import main

sys.exit(main())
