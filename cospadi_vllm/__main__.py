import sys

from cospadi_vllm.cli import main

sys.exit(main())
