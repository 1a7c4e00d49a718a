import sys

from peftkit.cli import main

sys.exit(main())
