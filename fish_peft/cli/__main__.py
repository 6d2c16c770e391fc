"""`python -m fish_peft.cli ...` (what `accelerate launch -m` runs) is the `fish-peft` command."""

import sys

from fish_peft.cli.command import main

sys.exit(main())
