"""Family knowledge lives in the registry: outside ``vtprune/adapters/`` no code names a registered model class, its
config class or a registered ``model_type`` (issue 13's grep, done from the registry itself).

Scanned: every module of ``vtprune/`` and ``eval/``, as code (string constants, names, attributes, imports);
docstrings and comments are documentation and are not read. Exempt: ``vtprune/adapters/`` (the registry) and
``vtprune/vllm/``, vLLM's own runtime package, which must subclass vLLM's model classes and register them under
vLLM's architecture names. Not code: the notebooks (tutorials, written as a user calls the API) and data files
(``config.json``s, ``eval/shapes_7b.json``). Tests name the families they test.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

from vtprune.adapters import ARCHITECTURES

ROOT = Path(__file__).resolve().parents[2]
EXEMPT = (ROOT / "vtprune" / "adapters", ROOT / "vtprune" / "vllm")
MODEL_TYPES = frozenset(arch.model_type for arch in ARCHITECTURES)
CLASS_NAMES = frozenset(arch.model_class for arch in ARCHITECTURES) | frozenset(
    CONFIG_MAPPING_NAMES[model_type] for model_type in MODEL_TYPES if model_type in CONFIG_MAPPING_NAMES
)
_CLASS_WORD = re.compile(r"\b(" + "|".join(sorted(CLASS_NAMES)) + r")\b")


def scanned_files() -> list[Path]:
    files = sorted((ROOT / "vtprune").rglob("*.py")) + sorted((ROOT / "eval").rglob("*.py"))
    return [path for path in files if not any(path.is_relative_to(folder) for folder in EXEMPT)]


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the string constants that are documentation: a module's, class's or function's docstring, and the
    bare strings under an attribute or constant (attribute docstrings)."""
    return {
        id(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
    }


def family_names(source: str) -> list[tuple[int, str]]:
    """(line, what) for every registered class name or model_type that ``source``'s code names."""
    tree = ast.parse(source)
    documentation = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in documentation:
            if node.value in MODEL_TYPES:
                found.append((node.lineno, f"model_type string {node.value!r}"))
            found += [(node.lineno, f"class name {name} in a string") for name in _CLASS_WORD.findall(node.value)]
        elif isinstance(node, ast.Name) and node.id in CLASS_NAMES:
            found.append((node.lineno, f"name {node.id}"))
        elif isinstance(node, ast.Attribute) and node.attr in CLASS_NAMES:
            found.append((node.lineno, f"attribute .{node.attr}"))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            found += [(node.lineno, f"import of {a.name}") for a in node.names if a.name.split(".")[-1] in CLASS_NAMES]
    return found


def test_the_scan_sees_every_registered_name_and_the_modules_that_used_to_name_them():
    assert {"llava", "qwen2_vl", "gemma3", "internvl", "llava_mistral"} <= MODEL_TYPES
    assert {"LlavaForConditionalGeneration", "LlavaConfig", "Qwen2VLConfig", "LlavaMistralForCausalLM"} <= CLASS_NAMES
    files = {path.relative_to(ROOT).as_posix() for path in scanned_files()}
    was_naming = {"vtprune/toyvlm/model.py", "vtprune/harness/lmm.py", "eval/bench_vllm.py", "eval/photo_figures.py"}
    assert was_naming <= files
    assert not any(name.startswith(("vtprune/adapters/", "vtprune/vllm/")) for name in files)


def test_the_scan_finds_dispatch_and_ignores_documentation():
    source = '''
"""Builds LlavaForConditionalGeneration models."""
from transformers import Qwen2VLConfig  # a config class
KIND = "qwen2_vl"

def f(model, transformers):
    """For a "llava" model."""
    # isinstance(model, LlavaForConditionalGeneration)
    if model.config.model_type == "gemma3":
        return transformers.LlavaForConditionalGeneration
    return f"the {type(model).__name__}, not a Qwen2VLForConditionalGeneration"
'''
    assert [line for line, _ in family_names(source)] == [3, 4, 9, 10, 11]


def test_no_code_outside_the_registry_names_a_model_class_or_model_type():
    hits = [
        f"{path.relative_to(ROOT)}:{line}: {what}"
        for path in scanned_files()
        for line, what in family_names(path.read_text())
    ]
    assert not hits, (
        "family knowledge outside vtprune/adapters/ (declare it in the family's Architecture):\n" + "\n".join(hits)
    )
