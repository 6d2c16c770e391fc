"""`fish-peft ARGS...` in each process (run by tests/distributed/test_ddp.py under `torch.distributed.run`, as `accelerate
launch` would run it)."""

import sys

from fish_peft.cli.command import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
