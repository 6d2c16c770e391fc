"""The house rules of `fish_peft/`: a layer imports only the layers below it (also inside functions), and
`import fish_peft` loads nothing beyond what PEFT itself loads but fish-peft's own lower layers."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fish_peft"
LAYERS = ["utils", "distributed", "masks", "tuner", "dynamic", "hub", "cli"]  # bottom to top


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "fish_peft" and parts[1] in LAYERS else None


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_every_module_lives_in_a_layer_and_imports_no_higher_layer():
    climbs = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        own = _layer(".".join(relative.parts))
        if own is None:
            assert relative.parts[1] in ("__init__", "_moved_modules", "data"), f"{relative} is in no layer"
            continue
        for name in _imports(path):
            other = _layer(name)
            if other is not None and LAYERS.index(other) > LAYERS.index(own):
                climbs.append(f"{relative} imports {name}")
    assert not climbs, "\n".join(climbs)


def test_no_relative_imports_so_the_rule_above_sees_every_import():
    relative = [str(p) for p in PACKAGE.rglob("*.py") if any(
        isinstance(n, ast.ImportFrom) and n.level > 0 for n in ast.walk(ast.parse(p.read_text())))]
    assert not relative


def test_import_fish_peft_loads_no_sharing_or_command_line_code():
    code = (
        "import sys, peft; before = set(sys.modules); import fish_peft; "
        "print(' '.join(sorted(set(sys.modules) - before)))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    heavy = ("jinja2", "yaml", "matplotlib", "datasets", "sklearn", "huggingface_hub.hf_api", "fish_peft.hub.", "fish_peft.cli")
    assert not [m for m in loaded if m.startswith(heavy)]
    assert "fish_peft.tuner.model" in loaded


def test_old_module_paths_still_import_with_one_warning_each():
    code = (
        "import warnings; warnings.simplefilter('always'); import fish_peft\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    from fish_peft.config import FishConfig\n"
        "    from fish_peft.sparse.topkast import TopKAST\n"
        "    from fish_peft.sparse import evolving_diff_engine\n"
        "    import fish_peft.config\n"
        "from fish_peft.tuner.config import FishConfig as New\n"
        "from fish_peft.dynamic.topkast import TopKAST as NewTopKAST\n"
        "assert FishConfig is New and TopKAST is NewTopKAST\n"
        "print(sorted(str(w.message).split()[0] for w in caught if w.category is FutureWarning))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['fish_peft.config', 'fish_peft.sparse', 'fish_peft.sparse.topkast']"


def test_fish_peft_imported_before_peft_registers_when_peft_loads_even_after_a_lookup():
    code = (
        "import importlib.util, sys, fish_peft\n"
        "assert 'torch' not in sys.modules and 'peft' not in sys.modules\n"
        "importlib.util.find_spec('peft')  # what transformers' is_peft_available does\n"
        "from peft import PeftModel\n"
        "from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING\n"
        "print('FISH' in PEFT_TYPE_TO_TUNER_MAPPING, getattr(PeftModel.push_to_hub, '_fish_peft', False))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "True"]
