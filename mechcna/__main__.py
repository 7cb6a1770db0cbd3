import sys

from mechcna.cli import main

sys.exit(main())
