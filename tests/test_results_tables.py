"""Every table in docs/ is rendered from the JSON beside it, by the script that wrote the JSON.

A table sits between benchlib's markers; its JSON records the command, the options and the runs. The test renders
each JSON again with its script's `render(record)` and compares it with the page, so a number edited by hand, or a
JSON from another run, fails. A markdown table outside the markers, in a page of results, fails too, as does a
number in the README's "The two commands" (the demo's output), "Results in brief" or "Performance" sections
that no rendered table shows.
"""

import glob
import importlib.util
import json
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import benchlib  # noqa: E402

PAGES = sorted(glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True))
RESULT_PAGES = [p for p in PAGES if os.sep + "results" + os.sep in p or p.endswith("performance.md")]


def script_module(script):
    """The module of a bench or experiment script, by its path relative to the repository."""
    name = "rendered_" + re.sub(r"\W", "_", script)
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, script))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tables_of(page):
    with open(page) as handle:
        return benchlib.published_tables(handle.read())


def all_rendered_text():
    return "".join(text for page in PAGES for _, text in tables_of(page))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: os.path.relpath(p, ROOT))
def test_each_table_is_its_json_rendered_again(page):
    for json_name, text in tables_of(page):
        path = os.path.join(os.path.dirname(page), json_name)
        assert os.path.isfile(path), f"{json_name} is not beside {page}"
        with open(path) as handle:
            record = json.load(handle)
        assert record["command"].startswith(f"python {record['script']}")
        assert script_module(record["script"]).render(record) == text, f"{json_name}: the page's table was edited"


@pytest.mark.parametrize("page", RESULT_PAGES, ids=lambda p: os.path.relpath(p, ROOT))
def test_results_pages_hold_no_table_without_its_json(page):
    with open(page) as handle:
        lines = handle.read().splitlines()
    inside = False
    for line in lines:
        if benchlib.TABLE_START_RE.match(line):
            inside = True
        elif line == benchlib.TABLE_END:
            inside = False
        else:
            assert inside or not line.startswith("|"), f"a table row with no JSON in {page}: {line}"


def readme_section(title):
    with open(os.path.join(ROOT, "README.md")) as handle:
        text = handle.read()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


@pytest.mark.parametrize("title", ["The two commands", "Results in brief", "Performance"])
def test_readme_numbers_come_from_rendered_tables(title):
    rendered = all_rendered_text()
    numbers = re.findall(r"(?<![\w.])\d+\.\d+(?![\w.])", readme_section(title))
    missing = [n for n in numbers if n not in rendered]
    assert not missing, f"README '{title}' numbers shown by no rendered table: {missing}"


def test_publish_keeps_the_page_around_its_table_and_renders_from_the_record(tmp_path):
    page = tmp_path / "study.md"
    page.write_text("# Study\n\nWhat it shows.\n")

    def render(record):
        return "| a | b |\n|---|---|\n" + "".join(f"| {r['a']} | {r['b']:.2f} |\n" for r in record["runs"])

    benchlib.publish(__file__, ["--x", "1"], None, [{"a": 1, "b": 0.5}], render, str(page))
    benchlib.publish(__file__, ["--x", "2"], None, [{"a": 2, "b": 0.25}], render, str(page))
    text = page.read_text()
    assert text.startswith("# Study\n\nWhat it shows.\n") and text.count("| a | b |") == 1
    assert benchlib.published_tables(text) == [("study.json", "| a | b |\n|---|---|\n| 2 | 0.25 |\n")]
    record = json.loads((tmp_path / "study.json").read_text())
    assert record["runs"] == [{"a": 2, "b": 0.25}] and record["command"].endswith("--x 2")
