"""`python -m tova_cpp ...` is the `tova` command; `python -m tova_cpp "prompt"` is `tova generate "prompt"`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
