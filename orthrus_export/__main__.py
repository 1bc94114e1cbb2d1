import sys

from orthrus_export.cli import main

sys.exit(main())
