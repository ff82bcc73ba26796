"""`python -m maas` is the `maas` command."""

import sys

from maas.cli import main

sys.exit(main())
