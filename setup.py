"""Package list for the three import roots (see pyproject.toml [tool.setuptools] package-dir).

setuptools cannot find sub-packages of a remapped folder declaratively, so they are listed here.
operator/ itself has no __init__.py: a bare namespace portion never shadows the standard
library's `operator` module, even with the repository root first on sys.path.
"""
from setuptools import find_namespace_packages, setup


def packages_under(folder: str, import_name: str) -> list[str]:
    found = find_namespace_packages(where=folder, exclude=["*__pycache__*"])
    return [import_name] + [f"{import_name}.{name}" for name in found]


setup(
    packages=packages_under("kubetune", "kubetune")
    + packages_under("trainer", "kubetune.trainer")
    + packages_under("operator", "kubetune.operator"),
    package_data={"kubetune.trainer": ["configs/*.yaml"], "kubetune.operator": ["*.yaml"]},
)
