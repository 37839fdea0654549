import sys

from lmforge_operator.cli import main

sys.exit(main())
