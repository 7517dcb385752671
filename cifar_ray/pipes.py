"""Every `python -m cifar_ray.*` command's way out. One whose output goes into a pipe closed early
(`python -m cifar_ray.sweep FILE --dry-run | head`) stops quietly with the shell's exit status for SIGPIPE,
as Unix tools do; one stopped by Ctrl-C exits 130; one that cannot write (a full disk, a read-only or
someone else's folder) says so in one line; none with a traceback."""
from __future__ import annotations

import errno
import os
import sys
from typing import Callable

from cifar_ray.files import printable

# 128 + SIGPIPE (13): what a shell reports for a tool the closed pipe stopped, so `set -o pipefail`
# scripts still see that the listing was cut short
EXIT_BROKEN_PIPE = 141
EXIT_CANNOT_WRITE = 1  # as a sweep stopped by a full disk
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a tool Ctrl-C stopped
# What the disk or the file system refused, in the user's words. Every file the commands write goes to a
# temporary name beside its own and is renamed when whole (cifar_ray.files.atomic_write), so what was
# there before stays as it was.
CANNOT_WRITE = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
                errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                errno.EPERM: "operation not permitted"}
# A path that does not lead where the command needs it to (the commands name their own paths where they
# check them; this is the last word for the rest)
BAD_PATH = {errno.ENOENT: "no such file or folder", errno.ENOTDIR: "a file where a folder is needed",
            errno.EISDIR: "a folder where a file is needed"}


def run_main(main: Callable[[], int]) -> int:
    """main()'s exit code; EXIT_BROKEN_PIPE when stdout's reader went away; EXIT_INTERRUPTED on Ctrl-C;
    EXIT_CANNOT_WRITE, in one line, when the disk or the file system refused a write."""
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
    except KeyboardInterrupt:
        # Ctrl-C in a command without a stop of its own (train, report, data prepare; the sweep and the
        # watch have theirs): what it was writing goes to a temporary name, so nothing is left half done
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as err:
        if err.errno not in CANNOT_WRITE and err.errno not in BAD_PATH:
            raise
        where = f" ({printable(err.filename)})" if err.filename else ""
        if err.errno in BAD_PATH:
            print(f"error: {BAD_PATH[err.errno]}{where}", file=sys.stderr)
            return EXIT_CANNOT_WRITE
        print(f"error: {CANNOT_WRITE[err.errno]}{where}; nothing written before was changed (files are written "
              "beside their name and renamed when whole): free space or choose another folder, then run the "
              "command again", file=sys.stderr)
        return EXIT_CANNOT_WRITE
