"""The README's links into the code point at the lines they name, and the code keeps the shape the
README promises: four scripts read in an afternoon, a package that never imports them, short functions."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ("transformer.py", "gpt_dataset.py", "gpt_train.py", "infer.py")
# Links whose text is prose, not a name: a piece of the line they must point at.
PROSE_LINKS = {"init": "GPT-2's scaling", "the step": "clip_grad_norm_(", "micro-batches": "for micro in range"}


def test_readme_code_links_point_at_what_they_name():
    links = re.findall(r"\[([^\]]+)\]\(([a-z_/]+\.py)#L(\d+)\)", (ROOT / "README.md").read_text())
    assert len(links) >= 15
    assert any(path.startswith("wikigpt/") for _, path, _ in links)  # links into the package are checked too
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


def line_count(path):
    return len((ROOT / path).read_text().splitlines())


def test_the_readme_gives_the_scripts_and_modules_their_real_sizes():
    readme = (ROOT / "README.md").read_text()
    total = sum(line_count(name) for name in SCRIPTS)
    assert f"({total:,} lines together)" in readme
    for name in SCRIPTS:
        assert f"[`{name}`]({name}): " in readme and f"({line_count(name):,} lines)" in readme, name
    for module in sorted((ROOT / "wikigpt").glob("*.py")):
        if module.name != "__init__.py":
            row = f"| [`{module.stem}`](wikigpt/{module.name}) | {line_count(module):,} |"
            assert row in readme, f"README's module table lacks: {row}"


def test_the_scripts_stay_short_and_the_package_never_imports_them():
    limits = {"transformer.py": 520, "gpt_train.py": 500}
    assert sum(line_count(name) for name in SCRIPTS) <= 1550
    for name, limit in limits.items():
        assert line_count(name) <= limit, name
    for module in (ROOT / "wikigpt").glob("*.py"):
        assert line_count(module) <= 420, f"{module.name}: past one sitting, it has two purposes: split it"
        imported = {alias.name.split(".")[0] for node in ast.walk(ast.parse(module.read_text()))
                    if isinstance(node, (ast.Import, ast.ImportFrom))
                    for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])}
        assert not imported & {Path(s).stem for s in SCRIPTS}, f"{module.name} imports a script"
    model_imports = (ROOT / "transformer.py").read_text()
    assert not re.search(r"^from wikigpt\.(checkpoint|runs|monitor|runtime|shards)\b", model_imports, re.MULTILINE)


def test_no_function_is_longer_than_80_lines():
    for path in [*SCRIPTS, *(str(p.relative_to(ROOT)) for p in (ROOT / "wikigpt").glob("*.py")),
                 *(str(p.relative_to(ROOT)) for p in (ROOT / "bench").glob("*.py"))]:
        for node in ast.walk(ast.parse((ROOT / path).read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno - node.lineno + 1 <= 80, f"{path}: {node.name} is longer than 80 lines"
