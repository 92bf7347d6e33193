"""Run a command; fail if any process it started outlives it.

    python3 .ci/no_leftovers.py CMD [ARG...]

This process becomes a child subreaper, so a descendant whose parent exits is
re-parented here instead of to init and cannot slip away. When the command
has exited, every process still under here is listed and killed, and the exit
status is 1 (else the command's own).
"""

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import process_tree  # noqa: E402


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    process_tree.become_subreaper()
    status = subprocess.call(argv)
    left = process_tree.kill_new_children(set())
    if not left:
        return status
    print(f"no_leftovers: {len(left)} process(es) outlived `{' '.join(argv)}` (killed now):",
          file=sys.stderr)
    for line in left:
        print("  " + line, file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
