"""The package's shape (docs/design.md): layers that import one way, kernels a leaf, no cycles.

Read from the source with ast, not by importing, so that an import hidden inside a function counts too; then
each checked module is imported in a fresh interpreter to see what it really loads.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "nanogptq"

# the rows of docs/design.md, bottom up; a module may import from its own row or rows below, except that
# kernels/ and quant/ share a row and stay apart
LAYERS = {
    "config": 0,
    "model": 1, "data": 1,
    "kernels": 2, "quant": 2,
    "runtime": 3,
    "checkpoint": 4,
    "train": 5, "evaluate": 5, "pipeline": 5, "sample": 5, "interop": 5,
    "app": 6, "cli": 6, "__main__": 6,
}
# what an import inside a function may load: optional dependencies, and the kernels that need one (Triton)
OPTIONAL_IMPORTS = ("gradio", "triton", "transformers", "huggingface_hub", "llama_cpp", "nanogptq.kernels.triton_gemv",
                    "nanogptq.kernels.triton_dequant", "nanogptq.kernels.decode_attention")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, bool]]:
    """(module imported, whether the import sits inside a function) for every import statement outside an
    `if TYPE_CHECKING:` block; `from pkg import name` counts as pkg.name where that is a module."""
    tree = ast.parse(path.read_text())
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return  # annotations only: never executed
        if isinstance(node, ast.Import):
            found.extend((alias.name, in_function) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                is_module = (PACKAGE.parent / sub.replace(".", "/")).with_suffix(".py").exists() or \
                    (PACKAGE.parent / sub.replace(".", "/") / "__init__.py").exists()
                found.append((sub if is_module else node.module, in_function))
        for child in ast.iter_child_nodes(node):
            visit(child, in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return found


def package_graph() -> dict[str, set[str]]:
    """Module -> the nanogptq modules it imports (anywhere in it)."""
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        graph[name] = {m for m, _ in imports(path) if m.startswith("nanogptq.") or m == "nanogptq"}
    return graph


def layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else module
    return LAYERS[top]


def test_every_module_has_a_layer():
    for name in package_graph():
        if name != "nanogptq":
            assert name.split(".")[1] in LAYERS, f"{name}: add its layer to LAYERS and docs/design.md"


def test_no_import_cycles():
    graph = package_graph()  # (a package's own __init__ importing its modules is not a cycle: not counted)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph or nxt == node:
                continue
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_imports_run_one_way_down():
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        if name == "nanogptq":
            continue
        for target, _ in imports(path):
            if not target.startswith("nanogptq.") or target == name:
                continue
            src_top, dst_top = name.split(".")[1], target.split(".")[1]
            assert layer(target) <= layer(name), f"{name} imports {target}, a layer above it"
            apart = {src_top, dst_top} != {"kernels", "quant"}
            assert apart, f"{name} imports {target}: kernels/ and quant/ stay apart"


def test_imports_inside_functions_are_optional_dependencies_only():
    for path in sorted(PACKAGE.rglob("*.py")):
        for target, in_function in imports(path):
            if in_function:
                assert target.startswith(OPTIONAL_IMPORTS), f"{module_name(path)} imports {target} inside a function"


def test_kernels_import_only_torch_triton_and_each_other():
    for path in sorted((PACKAGE / "kernels").rglob("*.py")):
        for target, _ in imports(path):
            top = target.split(".")[0]
            ok = top in ("torch", "triton", "__future__") or target.startswith("nanogptq.kernels") or \
                top in sys.stdlib_module_names
            assert ok, f"{module_name(path)} imports {target}: kernels/ is a leaf (torch and triton only)"


def loaded_modules(module: str) -> set[str]:
    """The nanogptq modules that importing `module` loads, in a fresh interpreter."""
    code = (f"import json, sys; import {module}; "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('nanogptq'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def _forbidden(loaded: set[str], prefixes: tuple[str, ...]) -> list[str]:
    return sorted(m for m in loaded if m.startswith(prefixes))


QUANTIZERS = ("nanogptq.quant.gptq", "nanogptq.quant.rtn", "nanogptq.quant.quantize", "nanogptq.quant.qat")
RUNTIME = ("nanogptq.runtime",)
CHECKPOINT = ("nanogptq.checkpoint", "nanogptq.pipeline")
TRAINING = ("nanogptq.train",)
KERNELS = ("nanogptq.kernels",)
MODEL = ("nanogptq.model",)


@pytest.mark.parametrize("module", ["nanogptq.kernels.mma", "nanogptq.kernels.launch", "nanogptq.kernels.triton_gemv",
                                    "nanogptq.kernels.triton_dequant", "nanogptq.kernels.decode_attention"])
def test_a_kernel_loads_no_model_quantizer_checkpoint_or_training_code(module):
    if module != "nanogptq.kernels.mma" and module != "nanogptq.kernels.launch":
        pytest.importorskip("triton")
    loaded = loaded_modules(module)
    assert not _forbidden(loaded, MODEL + ("nanogptq.quant",) + RUNTIME + CHECKPOINT + TRAINING), loaded


def test_the_model_loads_no_kernel_quantizer_runtime_or_checkpoint_code():
    loaded = loaded_modules("nanogptq.model")
    assert not _forbidden(loaded, KERNELS + ("nanogptq.quant",) + RUNTIME + CHECKPOINT), loaded


@pytest.mark.parametrize("module", ["nanogptq.quant.gptq", "nanogptq.quant.rtn"])
def test_quantizers_load_no_kernel_runtime_or_checkpoint_code(module):
    loaded = loaded_modules(module)
    assert not _forbidden(loaded, KERNELS + RUNTIME + CHECKPOINT), loaded


def test_checkpoint_format_loads_no_runtime():
    loaded = loaded_modules("nanogptq.checkpoint")
    assert not _forbidden(loaded, KERNELS + RUNTIME), loaded
