"""``python -m metatrain``: the same as the ``metatrain`` console script."""

import sys

from metatrain.cli import main

sys.exit(main())
