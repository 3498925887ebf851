"""The import rule between trainer/'s folders (README "Layout"), checked two ways.

1. An AST scan of every `import` in trainer/:
   - contract/ imports only the standard library and yaml;
   - executors/ never imports torch, transformers, colossalai, datasets, rl/, r1/, runtime, checkpoint or a
     recipe at module level; executors/kubernetes/ never imports them at all (local.py may, inside the
     functions that build its summary table);
   - rl/ never imports colossalai, nor anything in trainer/ outside rl/;
   - r1/ never imports torch, transformers, colossalai or datasets at module level;
   - only cli.py (and the executors themselves) import executors/.
2. A subprocess whose import system refuses torch, transformers, colossalai and datasets imports every module
   of contract/, executors/ and r1/ and runs `r1-grpo status --help`, `r1-grpo controller --help` and
   `r1-grpo pipeline show`: what the controller image and a laptop running `r1-grpo status` need.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAINER = ROOT / "trainer"
HEAVY = ("torch", "transformers", "colossalai", "datasets")
TRAINING_SIDE = ("trainer.rl", "trainer.r1", "trainer.runtime", "trainer.checkpoint")
RECIPES = ("trainer.sft", "trainer.grpo", "trainer.evaluate")


@dataclass(frozen=True)
class Import:
    file: str  # relative to the repository root
    line: int
    name: str  # absolute module name (for `from a import b`: a.b as well as a)
    module_level: bool  # runs when the file is imported (not inside a function or `if TYPE_CHECKING:`)


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return isinstance(test, ast.Name | ast.Attribute) and ast.unparse(test).endswith("TYPE_CHECKING")


def imports_of(path: Path) -> list[Import]:
    """Every import statement of a file in trainer/, with the names it can load and where it runs."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    return imports_in(path.read_text(encoding="utf-8"), package, path.relative_to(ROOT).as_posix())


def imports_in(source: str, package: str, rel: str) -> list[Import]:
    """The imports of `source`, a module of `package` (for relative imports) shown as `rel` in messages."""
    found: list[Import] = []

    def visit(node: ast.AST, module_level: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend(Import(rel, child.lineno, a.name, module_level) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                found.append(Import(rel, child.lineno, base, module_level))
                found.extend(Import(rel, child.lineno, f"{base}.{a.name}", module_level) for a in child.names)
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef) or _is_type_checking(child):
                visit(child, False)
            else:
                visit(child, module_level)

    visit(ast.parse(source, filename=rel), True)
    return found


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _files(folder: str) -> list[Path]:
    files = sorted((TRAINER / folder).rglob("*.py"))
    assert files, f"trainer/{folder} has no Python files"
    return files


def violations(folder: str, forbidden: tuple[str, ...], module_level_only: bool) -> list[str]:
    found = {
        (imp.file, imp.line): imp.name  # `from a import b` yields a and a.b: report the statement once
        for path in _files(folder)
        for imp in reversed(imports_of(path))
        if _under(imp.name, forbidden) and (imp.module_level or not module_level_only)
    }
    where = " at module level" if module_level_only else ""
    return [f"{file}:{line}: imports {name}{where}" for (file, line), name in sorted(found.items())]


# ---- 1. the AST scan ----------------------------------------------------------------------------------------


def test_contract_imports_only_the_standard_library_and_yaml() -> None:
    allowed = set(sys.stdlib_module_names) | {"yaml"}
    bad = [
        f"{imp.file}:{imp.line}: imports {imp.name}"
        for path in _files("contract")
        for imp in imports_of(path)
        if imp.name.split(".")[0] not in allowed and not _under(imp.name, ("trainer.contract",))
    ]
    assert not bad, "trainer/contract/ may import only the standard library and yaml:\n" + "\n".join(bad)


def test_executors_never_import_the_training_side_at_module_level() -> None:
    bad = violations("executors", HEAVY + TRAINING_SIDE + RECIPES, module_level_only=True)
    assert not bad, "\n".join(bad)


def test_the_kubernetes_executor_never_imports_the_training_side() -> None:
    bad = violations("executors/kubernetes", HEAVY + TRAINING_SIDE + RECIPES, module_level_only=False)
    assert not bad, "\n".join(bad)


def test_rl_imports_neither_colossalai_nor_trainer_modules_outside_rl() -> None:
    bad = [
        f"{imp.file}:{imp.line}: imports {imp.name}"
        for path in _files("rl")
        for imp in imports_of(path)
        if _under(imp.name, ("colossalai", "trainer")) and not _under(imp.name, ("trainer.rl",))
    ]
    assert not bad, "trainer/rl/ is a torch-only library:\n" + "\n".join(bad)


def test_r1_imports_no_heavy_package_at_module_level() -> None:
    bad = violations("r1", HEAVY, module_level_only=True)
    assert not bad, "\n".join(bad)


def test_only_the_cli_imports_the_executors() -> None:
    bad = [
        f"{imp.file}:{imp.line}: imports {imp.name}"
        for path in sorted(TRAINER.rglob("*.py"))
        if not _under(_module_name(path), ("trainer.executors", "trainer.cli"))
        for imp in imports_of(path)
        if _under(imp.name, ("trainer.executors",))
    ]
    assert not bad, "\n".join(bad)


def test_the_scan_sees_what_it_must_refuse() -> None:
    """The scan resolves relative imports and tells where each import runs: module level, class body,
    a function, `if TYPE_CHECKING:`."""
    source = textwrap.dedent(
        """
        import torch.nn
        from typing import TYPE_CHECKING
        from . import objective
        from ..runtime import Dist
        if TYPE_CHECKING:
            import colossalai
        class A:
            import datasets
        def f():
            from transformers import AutoModel
        """
    )
    found = {(imp.name, imp.module_level) for imp in imports_in(source, "trainer.rl", "probe.py")}
    assert {
        ("torch.nn", True),
        ("trainer.rl.objective", True),
        ("trainer.runtime", True),
        ("trainer.runtime.Dist", True),
        ("colossalai", False),
        ("datasets", True),
        ("transformers", False),
        ("transformers.AutoModel", False),
    } <= found


# ---- 2. a subprocess in which torch & co cannot be imported --------------------------------------------------

BLOCKED_RUN = """
import importlib, importlib.abc, pkgutil, sys

BLOCKED = {blocked!r}


class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is blocked by tests/test_layers.py")
        return None


sys.meta_path.insert(0, Refuse())
for name in sorted(BLOCKED):
    try:
        importlib.import_module(name)
    except ImportError:
        pass
    else:
        raise SystemExit(f"the import hook let {{name}} through")

import trainer.contract, trainer.executors, trainer.r1
from trainer import cli

modules = []
for package in (trainer.contract, trainer.executors, trainer.r1):
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        importlib.import_module(info.name)
        modules.append(info.name)
print("imported", " ".join(modules))
for argv in (["status", "--help"], ["controller", "--help"], ["pipeline", "show"]):
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = e.code
    if code not in (0, None):
        raise SystemExit(f"r1-grpo {{' '.join(argv)}} exited {{code}}")
    print("ran r1-grpo", *argv)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
if loaded:
    raise SystemExit(f"blocked modules were loaded: {{loaded}}")
"""


def _run_blocked(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_contract_executors_and_r1_run_without_torch_and_co() -> None:
    proc = _run_blocked(BLOCKED_RUN.format(blocked=HEAVY))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    imported = proc.stdout.splitlines()[0].split()[1:]
    for expected in (
        "trainer.contract.stages",
        "trainer.contract.output",
        "trainer.executors.local",
        "trainer.executors.kubernetes.cli",
        "trainer.executors.kubernetes.controller",
        "trainer.r1.rewards",
        "trainer.r1.scoring",
    ):
        assert expected in imported, imported
    for argv in ("status --help", "controller --help", "pipeline show"):
        assert f"ran r1-grpo {argv}" in proc.stdout
    assert "usage: r1-grpo status" in proc.stdout and "-m trainer.grpo" in proc.stdout


def test_the_blocking_hook_stops_the_training_side() -> None:
    """The same hook makes the algorithm library fail to import, so the run above proves something."""
    code = (
        BLOCKED_RUN.format(blocked=HEAVY).split("import trainer.contract")[0]
        + "import trainer.rl.objective\n"
    )
    proc = _run_blocked(code)
    assert proc.returncode != 0
    assert "ImportError: torch is blocked by tests/test_layers.py" in proc.stderr


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))
