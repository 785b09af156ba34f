"""Regenerate README.md's technique table (between the techniques:begin / techniques:end markers)
from the registry: `python scripts/readme_techniques.py` (tests/test_catalog.py checks they agree)."""
from pathlib import Path

from pipeline.techniques import catalog
from pipeline.techniques.catalog import markdown

README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN, END = "<!-- techniques:begin", "<!-- techniques:end -->"

text = README.read_text()
head, rest = text.split(BEGIN, 1)
marker_line, _, _ = rest.partition("\n")
_, tail = rest.split(END, 1)
README.write_text(head + BEGIN + marker_line + "\n" + markdown(catalog()) + END + tail)
print(f"updated {README}")
