"""The packages form layers, and imports only run down them: ``nft_core`` (the library) < ``harden`` (the stages)
< ``components`` (Kubeflow components) < ``pipeline`` (the pipeline and the CLI). Read from the source (every
``import``, including those inside functions), so a lazy import that runs up a layer fails here too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("nft_core", "harden", "components", "pipeline")


def imported_packages(path: Path) -> set[str]:
    """Top-level packages a module imports (absolute imports only; the project uses no relative ones)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import"
            found.add((node.module or "").split(".")[0])
    return found


@pytest.mark.parametrize("layer", LAYERS)
def test_imports_only_run_down_the_layers(layer: str) -> None:
    above = set(LAYERS[LAYERS.index(layer) + 1:])
    upward = {str(path.relative_to(REPO)): sorted(imported_packages(path) & above)
              for path in sorted((REPO / layer).rglob("*.py"))}
    assert {k: v for k, v in upward.items() if v} == {}


def test_the_layer_check_sees_imports_inside_functions(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from pipeline.cli import app\n    import harden.stages\n")
    assert imported_packages(module) == {"pipeline", "harden"}
