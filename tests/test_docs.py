"""The documentation site's generated references (tools/docgen.py, the MkDocs hook).

The configuration and CLI references are made from the code at build time; these tests add a
field (and an option) to the code and find it on the page the build makes, so a reference that
stopped following the code would fail here.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

import pytest
from pydantic import Field

from conftest import ROOT

import fedlora.config as config_module
from fedlora.config import FederationConfig, RunConfig


@pytest.fixture(scope="module")
def docgen():
    spec = importlib.util.spec_from_file_location("fedlora_docgen", ROOT / "tools" / "docgen.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["fedlora_docgen"] = module
    spec.loader.exec_module(module)
    return module


class FederationWithKnob(FederationConfig):
    knob_rounds: int = Field(7, ge=2)
    """A knob only this test adds: rounds of nothing."""


class RunConfigWithKnobs(RunConfig):
    federation: FederationWithKnob = Field(default_factory=FederationWithKnob)
    top_knob: float | None = Field(None, gt=0)
    """A top-level knob only this test adds."""
    undocumented_knob: bool = False


def row(markdown: str, key: str) -> list[str]:
    """The cells of the table row whose key is `key` (an AssertionError when there is none)."""
    for line in markdown.splitlines():
        if line.startswith(f"| `{key}` |"):
            return [cell.strip() for cell in line.strip("|").split(" | ")]
    raise AssertionError(f"no row for {key}")


def test_a_field_added_to_a_config_model_appears_with_type_default_constraint_and_description(docgen, monkeypatch):
    monkeypatch.setattr(config_module, "RunConfig", RunConfigWithKnobs)
    markdown, missing = docgen.config_markdown()
    assert row(markdown, "federation.knob_rounds") == [
        "`federation.knob_rounds`", "`int`", "`7`", "≥ 2", "A knob only this test adds: rounds of nothing."]
    assert row(markdown, "top_knob")[1:4] == ["`float \\| null`", "`null`", "> 0"]
    assert missing == ["undocumented_knob"]  # the strict build turns this into a failure
    # fields of the real models are still there, inherited docstrings included
    assert row(markdown, "federation.rounds")[2] == "`5`"


def test_every_real_config_field_is_documented(docgen):
    markdown, missing = docgen.config_markdown()
    assert missing == []
    for key in ("seed", "model.device", "data.columns.text", "devices.classes.<name>.flops",
                "aggregation.norm_bound", "algorithm.beta", "algorithm.svd_dtype"):
        row(markdown, key)
    assert "## `algorithm: hetlora`" in markdown
    assert row(docgen.method_markdown("aflora")[0], "algorithm.pruning_rule")[2] == "`zscore`"


def test_the_built_page_shows_a_field_added_to_a_model(docgen, monkeypatch, tmp_path):
    """A real (one-page) MkDocs build through the hook, as `make docs` runs it."""
    from mkdocs.commands.build import build
    from mkdocs.config import load_config

    monkeypatch.setattr(config_module, "RunConfig", RunConfigWithKnobs)
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text("# Configuration\n\n<!-- fedlora:config -->\n\n<!-- fedlora:cli -->\n")
    (tmp_path / "mkdocs.yml").write_text(
        f"site_name: t\ndocs_dir: docs\nsite_dir: site\nhooks:\n  - {ROOT / 'tools' / 'docgen.py'}\n")
    build(load_config(str(tmp_path / "mkdocs.yml")))
    html = (tmp_path / "site" / "index.html").read_text()
    assert "federation.knob_rounds" in html and "A knob only this test adds: rounds of nothing." in html
    assert "fedlora compare" in html and "--reference" in html


def test_an_option_added_to_the_parser_appears_in_the_cli_reference(docgen):
    parser = argparse.ArgumentParser(prog="fedlora")
    sub = parser.add_subparsers()
    run = sub.add_parser("run", help="run a federated fine-tuning")
    run.add_argument("config", nargs="?", help="YAML config")
    run.add_argument("--knob", type=int, default=3, help="a knob only this test adds")
    markdown = docgen.cli_markdown(parser)
    assert "## `fedlora run`" in markdown and "run a federated fine-tuning" in markdown
    assert "| `--knob KNOB` | `3` | a knob only this test adds |" in markdown
    assert "| `config` (optional) |  | YAML config |" in markdown


def test_the_site_wires_the_generator_into_its_pages():
    mkdocs_yml = (ROOT / "mkdocs.yml").read_text()
    assert "tools/docgen.py" in mkdocs_yml and "strict: true" in mkdocs_yml
    assert "<!-- fedlora:config -->" in (ROOT / "docs" / "reference" / "configuration.md").read_text()
    assert "<!-- fedlora:cli -->" in (ROOT / "docs" / "reference" / "cli.md").read_text()
    assert "::: fedlora.algorithms.base" in (ROOT / "docs" / "reference" / "api.md").read_text()
