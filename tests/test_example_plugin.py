"""The example plugin is discovered through its `lcc_harness.methods` entry point, without editing the harness."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from lcc_harness.methods import registry

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "lcc-example-plugin"


@pytest.fixture()
def installed_example(tmp_path, monkeypatch):
    """Make the example importable and visible to importlib.metadata as an installed distribution."""
    dist = tmp_path / "lcc_example_plugin-0.1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: lcc-example-plugin\nVersion: 0.1.0\n")
    eps = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]["entry-points"]
    lines = [f"{k} = {v}" for k, v in eps["lcc_harness.methods"].items()]
    (dist / "entry_points.txt").write_text("[lcc_harness.methods]\n" + "\n".join(lines) + "\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(EXAMPLE / "src"))
    monkeypatch.setattr(registry, "_loaded", False)
    monkeypatch.setattr(registry, "_FAMILIES", dict(registry._FAMILIES))
    registry._FAMILIES.pop("noise", None)
    yield
    sys.modules.pop("lcc_example_plugin", None)


def test_example_plugin_found_through_entry_point(installed_example, tiny):
    import torch

    assert "noise" in registry.families()
    m = registry.parse_method("noise-r2")
    assert m.id == "noise-r2" and type(m).__module__ == "lcc_example_plugin"
    import copy

    model = copy.deepcopy(tiny.model)
    m.apply(model, registry.CompressContext(seed=0))
    w0, w1 = tiny.model.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight
    rel = ((w1 - w0).pow(2).mean(1).sqrt() / w0.pow(2).mean(1).sqrt()).mean()
    assert 0.015 < float(rel) < 0.025  # std = 2 % of row RMS
    assert torch.equal(model.lm_head.weight, tiny.model.lm_head.weight)


def test_example_plugin_listed_by_cli(installed_example, capsys):
    from lcc_harness.cli import main

    assert main(["methods"]) == 0
    assert "noise-r{pct}" in capsys.readouterr().out
