"""``python -m pretrain.titan import|export``: torchtitan checkpoints both ways; the
converter lives in ``pretrain.interop.titan``."""
import sys

from pretrain.interop.titan import *  # noqa: F401,F403
from pretrain.interop.titan import main

if __name__ == "__main__":
    sys.exit(main())
