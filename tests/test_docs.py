"""The README's links into the code point at the lines they name."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Links whose text is prose, not a name: a piece of the line they must point at.
PROSE_LINKS = {"init": "GPT-2's scaling", "the step": "clip_grad_norm_(", "micro-batches": "for micro in range"}


def test_readme_code_links_point_at_what_they_name():
    links = re.findall(r"\[([^\]]+)\]\(([a-z_]+\.py)#L(\d+)\)", (ROOT / "README.md").read_text())
    assert len(links) >= 15
    for text, path, line in links:
        lines = (ROOT / path).read_text().split("\n")
        target = lines[int(line) - 1]
        if text in PROSE_LINKS:
            assert PROSE_LINKS[text] in target, f"README link [{text}]({path}#L{line}) points at: {target!r}"
        else:
            *owner, name = text.strip("`").split(".")  # `GPT.forward`: forward, inside class GPT
            definition = re.compile(rf"^\s*(def|class) {re.escape(name)}\b")
            assert definition.match(target), f"README link [{text}]({path}#L{line}) points at: {target!r}"
            if owner:
                enclosing = next(l for l in reversed(lines[: int(line) - 1]) if l.startswith("class "))
                assert re.match(rf"class {re.escape(owner[0])}\b", enclosing), f"README link [{text}] is in {enclosing!r}"
