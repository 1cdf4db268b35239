"""Ship the bundled recipes and tiny models (the top-level `recipes/` folder) inside the
wheel as the package `mergecli.bundled`; everything else is in pyproject.toml."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["mergecli", "mergecli.*"]), "mergecli.bundled"],
    package_dir={"mergecli.bundled": "recipes"},
    package_data={"mergecli.bundled": ["*.yaml", "models/*.py", "models/*/*"]},
)
