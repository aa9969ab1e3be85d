import sys

from softar.cli import main

sys.exit(main())
