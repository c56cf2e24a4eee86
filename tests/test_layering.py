"""The package's layering, read off every import statement of its modules
(type-only and function-local ones included): each layer imports only the
layers below it, every vLLM import sits in the one version layer
(``vllm032/``), and the runtime package holds only what a server runs."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vllm_multiverse"

# The rule, bottom up: a module of a layer may import, of the package, only
# the layers named here (its own included); of third parties, only what the
# layer's row allows (None: anything but vLLM, which only vllm032 imports).
LAYERS: dict[str, tuple[set[str], set[str] | None]] = {
    "structure": ({"structure"}, {"numpy"}),
    "config": ({"structure", "config"}, set()),
    "model_config": ({"structure", "model_config"}, {"transformers"}),
    "tree": ({"structure", "tree"}, set()),
    # _C: the compiled ops of csrc/, where built.
    "kernels": ({"structure", "kernels", "_C"}, {"numpy", "torch", "flashinfer"}),
    "reference": ({"structure", "model_config", "reference"}, {"numpy", "torch", "transformers"}),
    "console": ({"model_config", "console"}, set()),
    "vllm032": ({"structure", "config", "model_config", "tree", "kernels", "vllm032", ""}, None),
    "": ({""}, set()),  # the package's __init__ and version
}
STDLIB = {
    "__future__", "argparse", "array", "collections", "contextlib", "copy", "dataclasses", "enum", "functools",
    "importlib", "inspect", "itertools", "json", "logging", "math", "os", "pathlib", "random", "re", "sys", "time",
    "types", "typing", "uuid",
}  # fmt: skip


def _layer(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py") if rel.parts[0] != "__init__.py" else ""


def _imports(path: Path) -> list[str]:
    """Every module an import statement of ``path`` names (absolute)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import"
            out.append(node.module)
    return out


MODULES = sorted(p for p in PACKAGE.rglob("*.py"))


def test_the_rule_covers_every_module():
    assert {_layer(p) for p in MODULES} == set(LAYERS)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_each_module_imports_only_the_layers_below_it(path):
    own, third_party = LAYERS[_layer(path)]
    for name in _imports(path):
        top, _, rest = name.partition(".")
        if top == "vllm_multiverse":
            layer = rest.split(".")[0] if rest else ""
            assert layer in own, f"{path.relative_to(PACKAGE)} imports {name} (layer {layer!r})"
        elif top == "vllm":
            assert third_party is None, f"{path.relative_to(PACKAGE)} imports {name}: vLLM belongs in vllm032/"
        elif top not in STDLIB and third_party is not None:
            assert top in third_party, f"{path.relative_to(PACKAGE)} imports {name}"


def test_the_runtime_package_ships_what_a_server_runs():
    """The tiny model's training and demo, and the benchmarks' forcing
    processor, live where a checkout has them."""
    tops = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in MODULES}
    assert tops == {"__init__", "structure", "config", "model_config", "tree", "kernels", "reference", "console",
                    "vllm032"}  # fmt: skip
    for path in MODULES:
        for name in _imports(path):
            assert name.split(".")[0] not in {"tiny_model", "forcing"}, f"{path} imports {name}"
