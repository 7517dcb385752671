"""A command whose output goes into a pipe closed early (`python -m cifar_ray.sweep FILE --dry-run | head`)
stops quietly with the shell's exit status for SIGPIPE, as Unix tools do, instead of a traceback."""
from __future__ import annotations

import os
import sys
from typing import Callable

# 128 + SIGPIPE (13): what a shell reports for a tool the closed pipe stopped, so `set -o pipefail`
# scripts still see that the listing was cut short
EXIT_BROKEN_PIPE = 141


def run_main(main: Callable[[], int]) -> int:
    """main()'s exit code, or EXIT_BROKEN_PIPE when stdout's reader went away."""
    try:
        code = main()
        sys.stdout.flush()  # a closed pipe shows itself at the last flush too
        return code
    except BrokenPipeError:
        # Python would flush stdout once more at exit and print "Exception ignored ... BrokenPipeError";
        # pointing the descriptor at /dev/null lets that flush succeed silently
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
