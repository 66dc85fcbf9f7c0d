"""Root conftest: load the lcc-harness pytest plugin when the package is not installed as one."""

from importlib.metadata import entry_points

# pytester drives the plugin end to end in tests/test_plugin.py
pytest_plugins = ["pytester"]
if not any(ep.name == "lcc_harness" for ep in entry_points(group="pytest11")):
    pytest_plugins.append("lcc_harness.plugin")
