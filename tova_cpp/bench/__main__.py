"""`python -m tova_cpp.bench ppl|niah|speed|retention ...` (the same as `tova bench ...`)."""

import sys

from . import main

sys.exit(main())
