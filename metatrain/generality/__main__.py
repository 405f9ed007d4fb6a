"""``python -m metatrain.generality``: see :mod:`metatrain.generality.suite`."""

import sys

from metatrain.generality.suite import main

sys.exit(main())
