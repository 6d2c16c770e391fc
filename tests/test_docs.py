"""The README and the manual in docs/ stay true: the quick start runs as pasted, every Python block compiles, links
resolve, mkdocs.yml lists every page, the layout page lists every module, and module paths named in the text exist."""

from __future__ import annotations

import ast
import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
LAYERS = ["utils", "distributed", "masks", "tuner", "dynamic", "hub", "cli"]


def fenced_blocks(path: Path, language: str) -> list[tuple[int, str]]:
    """(first line number, code) of every ```language block of a Markdown file."""
    blocks, lines, start = [], path.read_text().splitlines(), None
    for number, line in enumerate(lines, 1):
        if start is None and line.strip() == f"```{language}":
            start, body = number + 1, []
        elif start is not None and line.strip() == "```":
            blocks.append((start, "\n".join(body) + "\n"))
            start = None
        elif start is not None:
            body.append(line)
    assert start is None, f"{path.name}: a ```{language} block opened at line {start - 1} is never closed"
    return blocks


def section(path: Path, heading: str) -> str:
    """The text of a `## heading` section, up to the next heading of level 2."""
    text = path.read_text()
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"{path.name} has no '## {heading}' section"
    return match.group(1)


PYTHON_BLOCKS = [(path, line, code) for path in PAGES for line, code in fenced_blocks(path, "python")]


def test_the_pages_exist_and_hold_python_blocks():
    names = {p.relative_to(ROOT).as_posix() for p in PAGES}
    assert {"README.md", "docs/index.md", "docs/masks.md", "docs/adapter.md", "docs/layout.md"} <= names
    assert len(PYTHON_BLOCKS) >= 7  # README 1; masks, adapter, hub, sparse-training, distributed, evolving-diffs


@pytest.mark.parametrize(
    "path, line, code", PYTHON_BLOCKS, ids=[f"{p.relative_to(ROOT)}:{line}" for p, line, _ in PYTHON_BLOCKS]
)
def test_every_python_block_compiles(path, line, code):
    compile(code, f"{path.relative_to(ROOT)}:{line}", "exec")


def test_readme_quick_start_runs_as_pasted_offline(tmp_path):
    blocks = re.findall(r"^```python\n(.*?)^```$", section(ROOT / "README.md", "Quick start"), re.M | re.S)
    assert len(blocks) == 1, "the quick start is one Python block"
    script = tmp_path / "quick_start.py"
    script.write_text(blocks[0])
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_ENDPOINT": "http://127.0.0.1:9",  # a closed port: any Hub request would fail
        "HF_HOME": str(tmp_path / "hf-home"),  # an empty cache: nothing downloaded earlier can stand in
    }
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "merged model matches the trained adapter" in done.stdout
    assert re.search(r"FishMask\(\d+ parameters, [\d,]+ entries selected\)", done.stdout)
    assert len(re.findall(r"^step \d: loss \d", done.stdout, re.M)) >= 2
    folder = tmp_path / "fish-adapter"
    assert (folder / "adapter_model.safetensors").stat().st_size > 0
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "FISH" and config["modules_to_save"] == ["classifier"]


def test_setup_section_comes_before_any_other_shell_block():
    """tests/test_readme.py reads the first two ```bash blocks as the demo and test commands."""
    setup = section(ROOT / "README.md", "Set up")
    assert setup.count("```bash\n") == 2
    first_bash = (ROOT / "README.md").read_text().index("```bash\n")
    assert (ROOT / "README.md").read_text().index("## Set up") < first_bash


def test_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 210
    headings = [line for line in lines if line.startswith("## ")]
    assert "## Quick start" in headings and "## Set up" in headings


LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """The anchor GitHub and mkdocs give a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)
    return {slug(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}


def relative_links() -> list[tuple[Path, str]]:
    return [
        (page, target)
        for page in PAGES
        for target in LINK.findall(page.read_text())
        if not re.match(r"[a-z]+:", target)
    ]


def test_relative_links_and_anchors_resolve():
    links = relative_links()
    assert len(links) > 20
    broken = []
    for page, target in links:
        file_part, _, anchor = target.partition("#")
        destination = (page.parent / file_part).resolve() if file_part else page
        if not destination.exists():
            broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
        elif anchor and anchor not in anchors(destination):
            broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_every_docs_page_is_linked_from_the_readme_and_the_index():
    pages = {p.name for p in DOCS.glob("*.md")}
    linked_from = lambda page: {Path(t.partition("#")[0]).name for p, t in relative_links() if p == page}
    assert pages <= linked_from(ROOT / "README.md")
    assert pages - {"index.md"} <= linked_from(DOCS / "index.md")


def test_mkdocs_nav_lists_exactly_the_docs_pages():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assert config["docs_dir"] == "docs"
    nav = [page for entry in config["nav"] for page in entry.values()]
    assert nav[0] == "index.md"
    assert len(nav) == len(set(nav))
    assert set(nav) == {p.name for p in DOCS.glob("*.md")}


def layout_entries() -> set[tuple[str, str]]:
    """(sub-package, module file) pairs of the tree on docs/layout.md."""
    (_, tree), = fenced_blocks(DOCS / "layout.md", "")
    entries, package = set(), None
    for line in tree.splitlines():
        if match := re.match(r"^  (\w+)/\s", line + " "):
            package = match.group(1)
        elif match := re.match(r"^    (\w+\.py)\s", line + " "):
            assert package is not None, line
            entries.add((package, match.group(1)))
        elif re.match(r"^\S", line):
            package = None
    return entries


def test_layout_page_lists_every_module_of_every_layer_and_nothing_else():
    actual = {
        (package, path.name)
        for package in LAYERS
        for path in (ROOT / "fish_peft" / package).glob("*.py")
        if path.name != "__init__.py"
    }
    listed = {entry for entry in layout_entries() if entry[1] != "__init__.py"}
    assert actual - listed == set(), f"modules missing from docs/layout.md: {sorted(actual - listed)}"
    assert listed - actual == set(), f"docs/layout.md lists modules that do not exist: {sorted(listed - actual)}"
    documented_inits = {package for package, name in layout_entries() if name == "__init__.py"}
    assert all((ROOT / "fish_peft" / package / "__init__.py").exists() for package in documented_inits)


def old_module_paths() -> set[str]:
    tree = ast.parse((ROOT / "fish_peft" / "_moved_modules.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "MOVED" for t in node.targets):
            return set(ast.literal_eval(node.value))
    raise AssertionError("fish_peft/_moved_modules.py has no MOVED table")


def module_file(dotted: str) -> Path | None:
    base = ROOT.joinpath(*dotted.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def test_module_paths_named_in_the_text_exist():
    """`fish_peft.a.b.name` resolves to a module file holding `name`; old flat paths only on the layout page."""
    old = old_module_paths()
    wrong = []
    for page in PAGES:
        for dotted in sorted(set(re.findall(r"\bfish_peft(?:\.[A-Za-z_]\w*)+", page.read_text()))):
            parts = dotted.split(".")
            if any(".".join(parts[:n]) in old for n in range(2, len(parts) + 1)):
                if page.name != "layout.md":
                    wrong.append(f"{page.relative_to(ROOT)}: {dotted} is an old module path")
                continue
            n = next(n for n in range(len(parts), 0, -1) if module_file(".".join(parts[:n])))
            source = module_file(".".join(parts[:n])).read_text()
            missing = [name for name in parts[n:] if not re.search(rf"\b{name}\b", source)]
            if missing:
                wrong.append(f"{page.relative_to(ROOT)}: {dotted} ({'.'.join(parts[:n])} has no {missing[0]})")
    assert not wrong, "\n".join(wrong)


def expand(pattern: str) -> list[str]:
    """`recipes/glue/{cola,rte}.yaml` -> both names (one brace group at most per part)."""
    match = re.search(r"\{([^}]*)\}", pattern)
    if not match:
        return [pattern]
    return list(itertools.chain.from_iterable(
        expand(pattern[: match.start()] + choice + pattern[match.end():]) for choice in match.group(1).split(",")
    ))


def test_repository_paths_named_in_the_text_exist():
    missing = []
    for page in PAGES:
        text = page.read_text()
        for path in sorted(set(re.findall(r"(?<![\w/.])(?:fish_peft|tests|recipes|benchmarks|model_cards|docs)/[\w./{},*-]*", text))):
            path = path.rstrip(".,")
            for name in expand(path):
                if not list(ROOT.glob(name.rstrip("/"))):
                    missing.append(f"{page.relative_to(ROOT)}: {name}")
    assert not missing, "\n".join(missing)
