"""Print step N of README.md's set-up block, the command exactly as written.

    python3 .ci/readme_command.py 1

The block is the first ``sh`` code block under "## Set-up"; a step starts at
a comment ``# N. ...`` and its command is the first line after it that is not
a comment. CI runs what this prints, so the README cannot drift from what is
tested.
"""

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def command(step: int) -> str:
    text = README.read_text(encoding="utf-8")
    section = re.search(r"^## Set-up\n(.*?)(?=^## )", text, re.S | re.M)
    if section is None:
        raise SystemExit(f"{README}: no '## Set-up' section")
    block = re.search(r"^```sh\n(.*?)^```", section.group(1), re.S | re.M)
    if block is None:
        raise SystemExit(f"{README}: no sh code block under '## Set-up'")
    lines = block.group(1).splitlines()
    for i, line in enumerate(lines):
        if re.match(rf"#\s*{step}\.\s", line):
            for candidate in lines[i + 1:]:
                if candidate.strip() and not candidate.lstrip().startswith("#"):
                    return candidate.strip()
    raise SystemExit(f"{README}: the set-up block has no step '# {step}.' with a command")


if __name__ == "__main__":
    if len(sys.argv) != 2 or not sys.argv[1].isdigit():
        raise SystemExit("usage: python3 .ci/readme_command.py STEP")
    print(command(int(sys.argv[1])))
