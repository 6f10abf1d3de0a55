"""`python -m pretrain ...` == `mesh-pretrain ...` (works under torchrun: `torchrun ... -m pretrain ...`)."""

import sys

from pretrain.cli import main

sys.exit(main())
