import sys

from perft.cli import main

sys.exit(main())
