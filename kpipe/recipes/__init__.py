"""Patch recipes: YAML files in recipes/, rendered per target kernel into a BuildSpec.

A recipe is data, its string fields are Jinja2 templates rendered in a
SandboxedEnvironment with StrictUndefined, and every problem carries the
file and line it comes from. The YAML is composed into a node tree (not
loaded straight into Python objects) so that every value keeps its line.

Template variables: `kernel` (the parsed release: release, version, distro,
flavour, arch, ...; arch/distro from the catalog when it says more),
`options` (the recipe's `options:`, keys overridden by the catalog entry's
options of the same name) and `recipe` (the recipe's name). File templates
(kbuild sources and the Kbuild file) also see `module` (the module name) and
`module_sysfs` (the name sysfs and lsmod show, '-' as '_').

Nothing here runs a command: every value, shell metacharacters included,
stays data until a builder puts it into an argv tuple.

Modules: problems (Problem), schema (checks; YAML with lines from kpipe.yamlnodes),
paths (containment), sandbox (Jinja2), loading (Recipe, list/load),
render (BuildSpec), lint.
"""

from __future__ import annotations

from kpipe.recipes.lint import lint
from kpipe.recipes.loading import (
    Recipe,
    kernels_for_recipe,
    list_recipes,
    load_recipe,
    recipe_files,
    recipes_for_kernel,
)
from kpipe.recipes.paths import PathRefused, resolve_patch_path, resolve_template_path, safe_path
from kpipe.recipes.problems import Problem
from kpipe.recipes.render import predict_module_name, render
from kpipe.recipes.sandbox import c_string
from kpipe.recipes.schema import BUILDERS, MODULE_NAME_MAX, ROLLBACK_POLICIES, parse_duration

__all__ = [
    "BUILDERS", "MODULE_NAME_MAX", "ROLLBACK_POLICIES", "PathRefused", "Problem", "Recipe", "c_string",
    "kernels_for_recipe", "lint", "list_recipes", "load_recipe", "parse_duration", "predict_module_name",
    "recipe_files", "recipes_for_kernel", "render", "resolve_patch_path", "resolve_template_path", "safe_path",
]
