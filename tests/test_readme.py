"""README.md: every ``python`` block runs as written; the API table names every public export."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import ensemblekit as ek

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
PYTHON_BLOCKS = re.findall(r"^```python\n(.*?)^```", README, flags=re.S | re.M)


def _api_table_names():
    """First-column names of the table under ``## API``: ``ek.x``, ``ek.prune.y``, ..."""
    section = README.split("\n## API\n", 1)[1].split("\n## ", 1)[0]
    return {match for row in section.splitlines() if row.startswith("| `ek.")
            for match in re.findall(r"`(ek(?:\.\w+)+)", row.split("|")[1])}


def test_readme_has_a_runnable_quickstart():
    assert PYTHON_BLOCKS, "README.md has no ```python block"
    quickstart = README.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", quickstart, flags=re.S).group(1)
    assert len(code.strip().splitlines()) <= 20
    for call in ("ek.ensemble(", "ek.evaluate(", ".save(", "load_model(", "ek.pack("):
        assert call in code


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_python_block_runs_as_written(index, tmp_path):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", PYTHON_BLOCKS[index]], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, f"README python block {index}:\n{result.stderr[-3000:]}"


def test_api_table_lists_every_public_name():
    listed = _api_table_names()
    expected = ({f"ek.{name}" for name in ek.__all__}
                | {f"ek.prune.{name}" for name in ek.prune.__all__}
                | {f"ek.deploy.{name}" for name in ek.deploy.__all__}
                | {f"ek.merge.{name}" for name in ek.merge.__all__}
                | {f"ek.pack.{name}" for name in ek.pack.__all__})
    assert not expected - listed, f"missing from the README's API table: {sorted(expected - listed)}"
    assert not listed - expected, f"not public, yet in the API table: {sorted(listed - expected)}"


def test_ci_runs_the_readme_test_command_verbatim():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    readme_command = next(line for line in (root / "README.md").read_text().splitlines()
                          if line.startswith('pip install -e ".[test]"'))
    assert "lint-imports" in readme_command
    assert readme_command in (root / ".ci" / "run").read_text().splitlines()


def test_layout_section_names_every_module_and_package():
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    layout = (root / "README.md").read_text().split("## Layout", 1)[1]
    named = set(re.findall(r"^\s+([\w.]+(?:\.py|/))", layout, flags=re.MULTILINE))
    package = root / "ensemblekit"
    actual = {p.name for p in package.glob("*.py") if p.name != "__init__.py"}
    actual |= {f"{p.name}/" for p in package.iterdir() if (p / "__init__.py").exists()}
    assert actual <= named, f"not in the README layout: {sorted(actual - named)}"
    assert {n for n in named if n.endswith((".py", "/")) and not n.startswith(("tests", "benchmarks"))
            and n != "results/"} <= actual | {"tests/", "benchmarks/"}, sorted(named - actual)
