"""`python -m cigma_ray`: the same as the `cigma-ray` command."""
import sys

from .cli import main

sys.exit(main())
