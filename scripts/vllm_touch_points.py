"""Every vLLM symbol, signature and attribute the plugin touches, checked
against another vLLM's source tree: where a port to a new vLLM starts.

    python scripts/vllm_touch_points.py TARGET [--base BASE] [--check]

TARGET and BASE are the ``vllm/`` folders of two vLLM releases (BASE: the
installed one, which the plugin is written against). A wheel's Python files
are enough: ``pip download --no-deps vllm==0.34.0`` and unzip it. Both trees
are read as source, never imported, so any release can be checked here.

What is listed, found by reading the plugin's version layer
(``vllm_multiverse/vllm032/``) rather than from a hand-kept list:

- imports: every ``from vllm... import name``; the module and the name must
  exist in TARGET, and a function's parameters (a class's ``__init__`` or
  dataclass fields) are compared with BASE;
- overrides: every method of a vLLM class that a plugin class overrides
  (found on the plugin's classes at run time, through their MRO), and every
  method ``patches.py`` wraps or replaces; each must exist in TARGET with
  BASE's parameters;
- attributes: every attribute name the version layer reads or writes that
  BASE's vLLM defines (``self.x =``, fields, methods, properties) and the
  plugin does not. Name-level: an attribute that moved to another class
  still counts as present, so a "present" here is necessary, not sufficient.

Prints a Markdown report; ``--check`` exits 1 when something is missing.
"""

from __future__ import annotations

import argparse
import ast
import builtins
import functools
import importlib
import inspect
import pkgutil
import re
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYER = "vllm_multiverse.vllm032"
LAYER_DIR = ROOT / "vllm_multiverse" / "vllm032"
# Outside the layer, the replay benchmark's forcing processor uses vLLM's
# logits-processor API.
ALSO = (ROOT / "benchmarks" / "forcing.py",)
# Not read for attribute names: model definitions and vendored code would
# make every short name "defined by vLLM".
SKIP_DIRS = ("model_executor/models", "models/", "third_party", "benchmarks")


class Tree:
    """One release's ``vllm/`` folder, read with ``ast``."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        if not (self.root / "__init__.py").is_file():
            raise SystemExit(f"{root} is not a vllm/ package folder")

    def version(self) -> str:
        for name in ("_version.py", "version.py"):
            path = self.root / name
            if path.is_file():
                for node in ast.walk(self.parse_file(path)):
                    if isinstance(node, ast.Assign) and any(
                        isinstance(t, ast.Name) and t.id in ("__version__", "version") for t in node.targets
                    ):
                        if isinstance(node.value, ast.Constant):
                            return str(node.value.value)
        return "?"

    def module_file(self, module: str) -> Path | None:
        parts = module.split(".")[1:]  # below "vllm"
        base = self.root.joinpath(*parts)
        for path in (base.with_suffix(".py"), base / "__init__.py"):
            if path.is_file():
                return path
        return None

    @functools.cache  # noqa: B019 (one Tree per release, alive for the run)
    def parse_file(self, path: Path) -> ast.Module:
        return ast.parse(path.read_text(encoding="utf-8"))

    def relative(self, module: str) -> str:
        path = self.module_file(module)
        return "" if path is None else path.relative_to(self.root).as_posix()

    def module(self, module: str) -> ast.Module | None:
        path = self.module_file(module)
        return None if path is None else self.parse_file(path)

    def resolve(self, module: str, name: str, depth: int = 0) -> tuple[str, ast.AST] | None:
        """The definition of ``module.name``, following re-exports."""
        tree = self.module(module)
        if tree is None or depth > 8:
            return None
        if self.module_file(f"{module}.{name}") is not None:
            return f"{module}.{name}", self.module(f"{module}.{name}")
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
                return module, node
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
                return module, node
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == name:
                return module, node
        for node in ast.walk(tree):  # imports, also inside `if TYPE_CHECKING` and lazy tables
            if isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    if (alias.asname or alias.name) == name:
                        source = _absolute(module, node, self.module_file(module))
                        if source.startswith("vllm"):
                            return self.resolve(source, alias.name, depth + 1)
                        return source, node
        for node in tree.body:  # a module __getattr__ that answers the name (lazy attributes)
            if isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
                if any(isinstance(c, ast.Constant) and c.value == name for c in ast.walk(node)):
                    return module, node
        return None

    def method(self, module: str, cls: str, name: str, depth: int = 0) -> ast.FunctionDef | None:
        """``cls.name`` in ``module``, looked up through the class's vLLM bases."""
        found = self.resolve(module, cls)
        if found is None or not isinstance(found[1], ast.ClassDef) or depth > 8:
            return None
        where, node = found
        for item in node.body:
            if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.name == name:
                return item
        for base in node.bases:
            base_name = {ast.Name: "id", ast.Attribute: "attr"}.get(type(base))
            base_name = getattr(base, base_name) if base_name else None
            if base_name is not None and base_name != cls:
                hit = self.method(where, base_name, name, depth + 1)
                if hit is not None:
                    return hit
        return None

    @functools.cached_property
    def attributes(self) -> dict[str, frozenset[str]]:
        """Every name vLLM defines as an attribute of something, with the
        files (relative to ``vllm/``) that define it."""
        where: dict[str, set[str]] = defaultdict(set)
        for path in self.root.rglob("*.py"):
            rel = path.relative_to(self.root).as_posix()
            if any(rel.startswith(d) for d in SKIP_DIRS):
                continue
            for name in _defined_attributes(path.read_text(encoding="utf-8", errors="replace")):
                where[name].add(rel)
        return {name: frozenset(files) for name, files in where.items()}


def _absolute(module: str, node: ast.ImportFrom, file: Path | None) -> str:
    if not node.level:
        return node.module or ""
    package = module if file is not None and file.name == "__init__.py" else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


# Read with patterns rather than ast: a release's 2,000 files in a second
# rather than a minute, and the check is by name either way.
_ATTRIBUTE_DEFINITIONS = re.compile(
    r"\.(\w+)[ \t]*(?::[^\n=]+)?=(?!=)"  # obj.x = ..., self.x: T = ...
    r"|^[ \t]*(?:async[ \t]+)?def[ \t]+(\w+)"  # methods, properties
    r"|^[ \t]+(\w+)[ \t]*:[ \t]*[\w\"'\[]"  # annotated fields
    r"|^[ \t]+([A-Z][A-Z0-9_]*)[ \t]*=",  # enum members, class constants
    re.MULTILINE,
)


def _defined_attributes(source: str, on_self_only: bool = False) -> set[str]:
    """With ``on_self_only``, ``obj.x = ...`` counts only where ``obj`` is
    ``self``: the plugin's own attributes, not the ones it sets on vLLM's."""
    names = set()
    for m in _ATTRIBUTE_DEFINITIONS.finditer(source):
        if on_self_only and m.group(1) and not source[: m.start()].endswith("self"):
            continue
        names.add(next(g for g in m.groups() if g))
    return names


def parameters(node: ast.AST | None) -> tuple[str, ...] | None:
    """A function's parameters (``*``/``**`` marked), a class's ``__init__``
    or, without one, its annotated fields; None for anything else."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        a = node.args
        names = [p.arg for p in a.posonlyargs + a.args]
        if a.vararg:
            names.append("*" + a.vararg.arg)
        names += [p.arg for p in a.kwonlyargs]
        if a.kwarg:
            names.append("**" + a.kwarg.arg)
        return tuple(names)
    if isinstance(node, ast.ClassDef):
        for item in node.body:
            if isinstance(item, ast.FunctionDef) and item.name == "__init__":
                return parameters(item)
        fields = [
            i.target.id
            for i in node.body
            if isinstance(i, ast.AnnAssign)
            and isinstance(i.target, ast.Name)
            and "ClassVar" not in ast.unparse(i.annotation)
        ]
        return tuple(fields) or None
    return None


@dataclass
class Finding:
    kind: str  # "import", "override", "patch", "attribute"
    symbol: str
    where: str  # the plugin's file:line (first use)
    status: str = "same"  # "same", "changed", "missing"
    detail: str = ""


@dataclass
class Layer:
    """What the version layer touches, read from its source and classes."""

    imports: dict[tuple[str, str], str] = field(default_factory=dict)  # (module, name) -> where
    methods: dict[tuple[str, str, str], tuple[str, str]] = field(default_factory=dict)  # -> (kind, where)
    attributes: dict[str, str] = field(default_factory=dict)  # name -> where


def read_layer() -> Layer:
    layer = Layer()
    own: set[str] = set()
    files = sorted(LAYER_DIR.rglob("*.py")) + list(ALSO)
    for path in files:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
        own |= _defined_attributes(source, on_self_only=True)
        rel = path.relative_to(ROOT).as_posix()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "vllm":
                for alias in node.names:
                    layer.imports.setdefault((node.module, alias.name), f"{rel}:{node.lineno}")
            elif isinstance(node, ast.Attribute):
                layer.attributes.setdefault(node.attr, f"{rel}:{node.lineno}")
    for path in ROOT.joinpath("vllm_multiverse").rglob("*.py"):
        if LAYER_DIR not in path.parents:
            own |= _defined_attributes(path.read_text(encoding="utf-8"), on_self_only=True)
    _read_patches(layer)
    _read_overrides(layer)
    common = set(dir(builtins)) | {n for t in (object, list, dict, set, str, tuple, int, float, bytes, type)
                                   for n in dir(t)}
    try:
        import numpy
        import torch

        common |= set(dir(torch.Tensor)) | set(dir(numpy.ndarray)) | set(dir(torch)) | set(dir(numpy))
    except ImportError:
        pass
    layer.attributes = {n: w for n, w in layer.attributes.items() if n not in own and n not in common}
    return layer


def _read_patches(layer: Layer) -> None:
    """``_wrap(Cls, "name", ...)`` and ``Cls.name = ...`` in patches.py."""
    path = LAYER_DIR / "patches.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    classes = {
        alias.asname or alias.name: node.module
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vllm.")
        for alias in node.names
    }
    rel = path.relative_to(ROOT).as_posix()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "_wrap"
            and isinstance(node.args[0], ast.Name)
            and isinstance(node.args[1], ast.Constant)
        ):
            cls = node.args[0].id
            layer.methods[(classes[cls], cls, node.args[1].value)] = ("patch", f"{rel}:{node.lineno}")
        elif isinstance(node, ast.Assign):
            for t in node.targets:
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id in classes:
                    layer.methods[(classes[t.value.id], t.value.id, t.attr)] = ("patch", f"{rel}:{node.lineno}")


def _read_overrides(layer: Layer) -> None:
    """Methods of vLLM classes that the layer's classes override (their MRO,
    as Python builds it against the installed vLLM)."""
    package = importlib.import_module(LAYER)
    for info in pkgutil.walk_packages(package.__path__, LAYER + "."):
        module = importlib.import_module(info.name)
        for cls in vars(module).values():
            if not (inspect.isclass(cls) and cls.__module__ == info.name):
                continue
            ours = [c for c in cls.__mro__ if c.__module__.startswith("vllm_multiverse")]
            theirs = [c for c in cls.__mro__ if c.__module__.split(".")[0] == "vllm"]
            for c in ours:
                for name, value in vars(c).items():
                    if not callable(value) and not isinstance(value, (property, staticmethod, classmethod)):
                        continue
                    if name.startswith("__") and name != "__init__":
                        continue
                    owner = next((b for b in theirs if name in vars(b)), None)
                    if owner is None:
                        continue
                    try:
                        line = inspect.getsourcelines(value)[1]
                    except (OSError, TypeError):
                        line = 0
                    where = f"{Path(inspect.getfile(c)).relative_to(ROOT).as_posix()}:{line}"
                    layer.methods.setdefault((owner.__module__, owner.__qualname__, name), ("override", where))


def compare(layer: Layer, base: Tree, target: Tree) -> list[Finding]:
    findings: list[Finding] = []
    for (module, name), where in sorted(layer.imports.items()):
        f = Finding("import", f"{module}.{name}", where)
        then, now = base.resolve(module, name), target.resolve(module, name)
        if now is None:
            f.status = "missing"
            f.detail = "module gone" if target.module(module) is None else "name gone"
        else:
            before, after = parameters(then[1]) if then else None, parameters(now[1])
            if before != after and before is not None:
                f.status, f.detail = "changed", _diff(before, after)
        findings.append(f)
    for (module, cls, name), (kind, where) in sorted(layer.methods.items()):
        f = Finding(kind, f"{module}.{cls}.{name}", where)
        then, now = base.method(module, cls, name), target.method(module, cls, name)
        if now is None:
            f.status = "missing"
            f.detail = "class gone" if target.resolve(module, cls) is None else "method gone"
        elif then is not None and parameters(then) != parameters(now):
            f.status, f.detail = "changed", _diff(parameters(then), parameters(now))
        findings.append(f)
    # The files whose classes the plugin reads: where its imports and the
    # classes it overrides are defined.
    read = {base.relative(module) for module, _ in layer.imports} | {base.relative(m) for m, _, _ in layer.methods}
    for module, name in layer.imports:
        found = base.resolve(module, name)
        if found is not None:
            read.add(base.relative(found[0]))
    for name, where in sorted(layer.attributes.items()):
        then = base.attributes.get(name)
        if then is None:
            continue
        now = target.attributes.get(name, frozenset())
        f = Finding("attribute", name, where)
        # Renamed or dropped in a file that is still there (a file that is
        # gone shows up as its imports and overrides).
        dropped = sorted(rel for rel in then & read if rel not in now and (target.root / rel).is_file())
        if not now:
            f.status, f.detail = "missing", "defined in " + ", ".join(sorted(then & read) or sorted(then))
        elif dropped:
            f.status, f.detail = "changed", "no longer in " + ", ".join(dropped)
        findings.append(f)
    return findings


def _diff(before: tuple[str, ...] | None, after: tuple[str, ...] | None) -> str:
    before, after = before or (), after or ()
    gone = [p for p in before if p not in after]
    new = [p for p in after if p not in before]
    parts = [f"-{', '.join(gone)}"] if gone else []
    parts += [f"+{', '.join(new)}"] if new else []
    return " ".join(parts) or "parameters reordered"


def report(findings: list[Finding], base: Tree, target: Tree) -> str:
    counts: dict[str, int] = defaultdict(int)
    for f in findings:
        counts[f.status] += 1
    lines = [
        f"# vLLM touch points: {base.version()} (written against) -> {target.version()}",
        "",
        f"{len(findings)} touch points: {counts['same']} same, {counts['changed']} changed, "
        f"{counts['missing']} missing.",
        "",
        "| status | kind | vLLM symbol | plugin (first use) | detail |",
        "|---|---|---|---|---|",
    ]
    order = {"missing": 0, "changed": 1, "same": 2}
    for f in sorted(findings, key=lambda f: (order[f.status], f.kind, f.symbol)):
        lines.append(f"| {f.status} | {f.kind} | `{f.symbol}` | {f.where} | {f.detail} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target", type=Path, help="the vllm/ folder of the release to check")
    parser.add_argument("--base", type=Path, default=None, help="default: the installed vLLM")
    parser.add_argument("--check", action="store_true", help="exit 1 when a touch point is missing")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if args.base is None:
        import vllm

        args.base = Path(vllm.__file__).parent
    base, target = Tree(args.base), Tree(args.target)
    findings = compare(read_layer(), base, target)
    print(report(findings, base, target), end="")
    return 1 if args.check and any(f.status == "missing" for f in findings) else 0


if __name__ == "__main__":
    sys.exit(main())
