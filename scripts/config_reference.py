"""Write docs/config.md, the config reference, from the dataclasses in text23d/schema/.

    python scripts/config_reference.py          # rewrite it
    python scripts/config_reference.py --check  # exit 1 when it is stale (tests/test_schema.py does this too)
"""
import sys
from pathlib import Path

from text23d.schema import reference

PATH = Path(__file__).resolve().parent.parent / "docs" / "config.md"

if __name__ == "__main__":
    text = reference() + "\n"
    if "--check" in sys.argv[1:]:
        stale = not PATH.is_file() or PATH.read_text(encoding="utf-8") != text
        print(f"{PATH}: {'stale: run python scripts/config_reference.py' if stale else 'current'}")
        sys.exit(1 if stale else 0)
    PATH.write_text(text, encoding="utf-8")
    print(f"wrote {PATH}")
