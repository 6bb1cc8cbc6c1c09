"""``python -m pretrain.hf import|export|export-adapter``: the Hugging Face converter, which
lives in ``pretrain.interop.hf`` (this name stays for the command line and for code that
imports it)."""
import sys

from pretrain.interop.hf import *  # noqa: F401,F403
from pretrain.interop.hf import main

if __name__ == "__main__":
    sys.exit(main())
