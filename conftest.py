"""Root conftest: load the lcc-harness pytest plugin when the package is not installed as one."""

from importlib.metadata import entry_points

if not any(ep.name == "lcc_harness" for ep in entry_points(group="pytest11")):
    pytest_plugins = ["lcc_harness.plugin"]
