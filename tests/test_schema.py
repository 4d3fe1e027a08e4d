"""rt_lib.runs.schema: the declared columns agree with the docs page, the writers and the committed results."""

import json
from pathlib import Path

import pytest

from rt_lib.runs import read as rundir
from rt_lib.paper import tidy
from rt_lib.runs import schema

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "results_format.md"
RUNS = ROOT / "results" / "runs"
TABLES = ROOT / "results" / "tables"


# ---------------------------------------------------------------------------- docs page
def test_docs_tables_are_the_generated_ones():
    text = DOC.read_text(encoding="utf-8")
    assert schema.render_doc(text) == text, "docs/results_format.md is out of date: python -m rt_lib schema " + str(DOC)


def test_docs_page_holds_every_declared_file_once():
    keys = schema.doc_keys(DOC.read_text(encoding="utf-8"))
    assert sorted(keys) == sorted(schema.DOC_KEYS)
    assert len(keys) == len(set(keys))


def test_docs_tables_list_every_column_of_every_file():
    text = DOC.read_text(encoding="utf-8")
    for kind in (*schema.RUN_FILES, *schema.TABLE_FILES):
        for col in kind.columns:
            assert f"| `{col.name}` |" in text, (kind.path, col.name)


def test_render_doc_rewrites_a_stale_block_and_refuses_an_unknown_one():
    stale = f"intro\n{schema.BEGIN.format(key='eval/paired.csv')}\n| old |\n{schema.END}\noutro\n"
    out = schema.render_doc(stale)
    assert out.startswith("intro\n") and out.endswith("\noutro\n")
    assert "| old |" not in out and "| `ci_low` |" in out
    with pytest.raises(KeyError, match="does not declare"):
        schema.render_doc(f"{schema.BEGIN.format(key='eval/nothing.csv')}\n{schema.END}")


# ---------------------------------------------------------------------------- committed files
def _committed(path_in_run: str) -> list[Path]:
    return sorted(RUNS.glob(f"*/{path_in_run}"))


@pytest.mark.parametrize("kind", schema.RUN_FILES, ids=lambda k: k.path)
def test_committed_run_files_have_the_declared_columns(kind):
    files = _committed(kind.path)
    assert files, f"no committed {kind.path} to check"
    for f in files:
        header = f.read_text(encoding="utf-8").splitlines()[0].split(",")
        assert schema.header_matches(kind.path, header), f"{f.relative_to(ROOT)}: {header} vs {kind.names}"


@pytest.mark.parametrize("kind", [schema.TIDY_RUNS, schema.SWEEP_TABLE], ids=lambda k: k.path)
def test_committed_tables_have_the_declared_columns(kind):
    header = (TABLES / Path(kind.path).name).read_text(encoding="utf-8").splitlines()[0].split(",")
    assert header == kind.names


@pytest.mark.parametrize("path,pattern", [("run.json", "run.json"), ("train/summary.json", "train/summary.json"),
                                          ("eval/results.json", "eval/results.json"),
                                          ("profile/profile.json", "profile/profile.json"),
                                          ("baselines/static_drop.json", "baselines/static_drop*.json")])
def test_committed_json_files_have_the_declared_fields(path, pattern):
    declared = {f.name for f in schema.JSON_FIELDS[path]}
    always = {f.name for f in schema.JSON_FIELDS[path] if f.always}
    files = _committed(pattern)
    assert files
    for f in files:
        keys = set(json.loads(f.read_text(encoding="utf-8")))
        assert always <= keys <= declared, (f.relative_to(ROOT), sorted(always - keys), sorted(keys - declared))


# ---------------------------------------------------------------------------- writers and reader
def test_writers_write_the_declared_columns():
    from rt_lib.speed import moe_load, profiling
    from rt_lib.evaluation import results as evaluation

    written = {kind.path: [c.name for c in kind.columns if c.written] for kind in schema.RUN_FILES}
    assert evaluation.RESULT_COLUMNS == written["eval/results.csv"]
    assert evaluation.PAIRED_COLUMNS == written["eval/paired.csv"]
    assert evaluation.SKIP_COLUMNS == written["eval/skip_stats.csv"]
    assert profiling.COLUMNS == written["profile/profile.csv"]
    assert list(moe_load.COLUMNS) == written["moe/expert_load.csv"]
    assert tidy.TIDY_COLUMNS == schema.TIDY_RUNS.names


def test_reader_checks_come_from_the_schema():
    assert rundir.REQUIRED_COLUMNS["train/log.csv"] == ["step", "loss", "lm_loss", "reg_loss", "lr", "mean_capacity"]
    assert "threshold" not in rundir.REQUIRED_COLUMNS["eval/paired.csv"]  # added by sweeps only
    assert "threshold" in rundir.NUMERIC_COLUMNS["eval/paired.csv"]
    assert rundir.FRACTION_COLUMNS == {"eval/results.csv": ["value", "skip_ratio"],
                                      "eval/skip_stats.csv": ["executed_fraction"],
                                      "profile/profile.csv": ["skip_ratio"]}


# ---------------------------------------------------------------------------- header_matches
def test_header_matches_order_patterns_and_optional_columns():
    log = ["step", "loss", "lm_loss", "reg_loss", "lr", "mean_capacity"]
    assert schema.header_matches("train/log.csv", [*log, "capacity_L3", "capacity_L4", "tokens", "elapsed_s"])
    assert not schema.header_matches("train/log.csv", [*log, "tokens", "capacity_L3", "elapsed_s"])  # order
    assert not schema.header_matches("train/log.csv", [*log, "capacity_L3", "tokens"])  # elapsed_s missing
    paired = ["variant", "task", "metric", "diff", "ci_low", "ci_high", "n", "confidence"]
    assert schema.header_matches("eval/paired.csv", paired)
    assert schema.header_matches("eval/paired.csv", ["variant", "threshold", *paired[1:]])  # a sweep's file
    assert not schema.header_matches("eval/paired.csv", [*paired, "extra"])
    assert not schema.header_matches("eval/paired.csv", paired[:-1])


def test_schema_command_has_help_and_rewrites_the_page(tmp_path, capsys):
    from rt_lib.cli import main

    with pytest.raises(SystemExit) as e:
        main(["schema", "--help"])
    assert e.value.code == 0 and "page" in capsys.readouterr().out
    page = tmp_path / "results_format.md"
    page.write_text((ROOT / "docs" / "results_format.md").read_text())
    assert main(["schema", str(page)]) == 0
    assert page.read_text() == (ROOT / "docs" / "results_format.md").read_text()
