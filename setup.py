"""Which folders the wheel carries, and where inside it: what pyproject.toml cannot say.

The checkout keeps `graphs/` and `calibration/` at the repository root; an installed package
has nothing beside it, so the wheel maps both into the package (`reroute_export/graphs`,
`reroute_export/calibration`, found through `reroute_export.paths.shipped_dir`). A folder
with an `__init__.py` is code; every other folder (reroute_export/data/**, the two mapped
trees) is data, and all of its files ship, whatever their type, so a new data folder
needs no entry here. tests/test_wheel.py installs the wheel into a fresh environment and
runs the CLI from it.
"""

from setuptools import find_namespace_packages, find_packages, setup

MAPPED = {"reroute_export.graphs": "graphs", "reroute_export.calibration": "calibration"}
NO_CACHE = ["*__pycache__*"]


def data_packages() -> list[str]:
    """Data folders inside the package, then the mapped trees with their subfolders."""
    code = set(find_packages(include=["reroute_export*"]))
    found = [p for p in find_namespace_packages(include=["reroute_export*"], exclude=NO_CACHE) if p not in code]
    for name, folder in MAPPED.items():
        found += [name] + [f"{name}.{sub}" for sub in find_namespace_packages(where=folder, exclude=NO_CACHE)]
    return found


DATA = data_packages()
setup(packages=find_packages(include=["reroute_export*"]) + DATA, package_dir=MAPPED,
      package_data={name: ["*"] for name in DATA})
