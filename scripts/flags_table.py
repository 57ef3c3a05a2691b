"""Print the README's flags table from train.py's Config (run after adding a flag; a test checks it)."""
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tiny  # noqa: E402
import train  # noqa: E402

body = open(train.__file__).read().split("class Config:")[1].split("\n\n")[0]
print("| flag | default | tiny default | meaning |\n|---|---|---|---|")
for line in body.splitlines():
    if line.strip().startswith("# ---"):
        print(f"| *{line.strip(' #-')}* | | | |")
    m = re.match(r"\s+(\w+): \w+ = (.+?)(?:\s+# (.*))?$", line)
    if m:
        name, _, comment = m.groups()
        default = getattr(train.Config, name)
        tiny_default = f"`{tiny.TINY[name]}`" if name in tiny.TINY else ""
        print(f"| `--{name}` | `{default}` | {tiny_default} | {(comment or '').replace('|', '/')} |")
