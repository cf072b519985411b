"""Docs that cannot drift: the README's commands, its Python example, the results.json schema."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_has_exactly_two_commands_and_ci_runs_the_test_one():
    commands = [b.strip() for b in readme_blocks("bash")]
    assert len(commands) == 2
    demo, tests = commands
    assert "latentexplainer demo" in demo and "torch==2.13.0" in demo
    assert "pytest" in tests
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci, "the README's test command must be what .ci/run runs"
    assert "torch==2.13.0" in ci.split(tests)[0], ".ci/run must install torch==2.13.0 before the tests"


def test_results_schema_documents_every_key():
    from latentexplainer_plugin.results import LatentResult

    doc = (ROOT / "docs" / "results-schema.md").read_text()
    keys = set(LatentResult("z0", 0, "ok").to_json("strips/z0.png")) | {"kl", "active", "factor"}
    for key in keys:
        assert f"`{key}`" in doc, f"results.json key {key!r} is not documented"


def test_readme_python_example_runs_as_written(capsys):
    import pytest

    from latentexplainer_plugin.demo import WEIGHTS_DIR

    if not (WEIGHTS_DIR / "model.safetensors").exists():
        pytest.skip("demo weights not built")
    (code,) = readme_blocks("python")
    exec(compile(code, "README.md", "exec"), {})
    lines = [l for l in capsys.readouterr().out.splitlines() if l.strip()]
    assert len(lines) == 3
    for line in lines:
        latent, importance, certainty, *explanation = line.split(" ", 3)
        assert latent.startswith("z") and float(importance) > 0 and 0 <= float(certainty) <= 1


def test_own_generator_example_prints_what_the_page_says(capsys):
    import re

    page = (ROOT / "docs" / "own-generator.md").read_text()
    code = re.findall(r"```python\n(.*?)```", page, re.S)[0]
    printed = page.split("prints\n\n```\n", 1)[1].split("```", 1)[0]
    exec(compile(code, "docs/own-generator.md", "exec"), {})
    assert capsys.readouterr().out == printed
