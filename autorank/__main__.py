import sys

from autorank.cli import main

sys.exit(main())
