r"""Great Expectations validation of ingested rows, with row-level attribution.

The suite lives in ``expectations/<suite>.json`` (GX 1.x suite JSON). Two of its
kwargs follow ``validate_rows`` arguments through ``meta``: ``meta.bind`` sets a kwarg
to an argument (``min_rows``, ``max_field_chars``), ``meta.cap`` lowers it to one.
``meta.reason`` is the row-level message, with ``{placeholders}`` filled in here.

Invisible text (the rule): Python's ``re`` (what GX runs on pandas) has no Unicode
properties, so a suite regex may write ``\p{Default_Ignorable_Code_Point}`` and
``load_suite`` replaces it with that property's code points, read from the ``regex``
package's Unicode tables (zero-width spaces and joiners, soft hyphen, word joiner, BOM,
the Hangul fillers U+115F U+1160 U+3164 U+FFA0, U+034F, variation selectors, tag
characters, ...). With it, the suite says:

- a field is *blank* when every character is white space (``\s``), default-ignorable,
  U+180E or U+2800 BRAILLE PATTERN BLANK (shown as an empty cell, not a space to Unicode);
- a *think tag* is ``<think>`` / ``</think>`` in any letter case, also with spaces or
  default-ignorable characters anywhere inside it (``</\u200bthink>`` reads as the tag);
- *hidden text* is refused like the bidirectional controls: Unicode tag characters
  (U+E0000-U+E007F, invisible copies of ASCII that a model reads as instructions) and
  runs of two or more variation selectors (one picks a glyph; a run carries bytes).
  A single default-ignorable character inside text (a ZWJ in an emoji, a ZWNJ in Persian,
  a soft hyphen, one variation selector) is ordinary text and passes.

GX produces the report; the bad rows are GX's own ``unexpected_index_list``s, so the
report and the attribution agree by construction. The one difference is uniqueness:
GX flags every copy of a duplicated question, we keep the first and drop the rest.
Great Expectations is imported lazily (the import costs ~6 s).
"""

from __future__ import annotations

import functools
import json
import logging
import re
import unicodedata
from dataclasses import dataclass, field
from html import escape
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from sft_core.data import write_jsonl
from sft_core.errors import ConfigError, DataValidationError

DOCS_SITE = "qwen_sft"
MAX_LISTED = 5  # problems spelled out in an error message
REPORT_HTML = "validation_report.html"  # the report as one page that needs nothing else (no CDN, no links)
SAMPLE_ROWS = 20  # bad row numbers kept per expectation in the report
IGNORABLE = r"\p{Default_Ignorable_Code_Point}"  # a suite regex may use it; `re` gets its code points
TAGS = range(0xE0000, 0xE0080)  # Unicode tag characters: U+E0020-U+E007E mirror ASCII


@dataclass
class ValidationResult:
    """Outcome of one validation: ``success`` is False whenever any row or table check failed."""

    success: bool
    good_rows: list[dict[str, Any]]
    bad_rows: list[dict[str, Any]]
    report: dict[str, Any]
    report_path: Path | None = None
    docs_path: Path | None = None
    quarantine_path: Path | None = None
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # worth a look, not a reason to refuse (near duplicates)


def suites() -> Path:
    """The folder of the shipped suites (`expectations/` in the repository, `sft_core/expectations` in the wheel)."""
    return Path(str(resources.files("sft_core.expectations")))


def suite_path(suite: str) -> Path:
    """A shipped suite by name (``delicate_medical_r1``), or ``suite`` itself when it is a path to a .json file."""
    path = Path(suite) if suite.endswith(".json") else suites() / f"{suite}.json"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in suites().glob("*.json"))) or "none"
        raise ConfigError(f"expectation suite '{suite}' not found at {path} (data.suite; available: {known})")
    return path


def load_suite(suite: str, *, min_rows: int = 10, max_field_chars: int = 20000,
               control_tokens: list[str] | None = None) -> dict[str, Any]:
    """The suite as a dict, with ``meta.bind`` / ``meta.cap`` kwargs resolved.

    `control_tokens` (the tokenizer's special tokens) bind as escaped regexes; without them the
    suite's own list (the Qwen chat tokens) stays. An expectation bound to an empty list is left
    out (GX refuses an empty regex list).
    """
    path = suite_path(suite)
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: line {exc.lineno}: not valid JSON: {exc.msg}") from exc
    for exp in spec.get("expectations", []):
        for holder, key in ((exp.get("kwargs", {}), "regex"), (exp.get("meta", {}), "locate")):
            if isinstance(holder.get(key), str):
                holder[key] = holder[key].replace(IGNORABLE, default_ignorable())
    tokens = sorted(set(control_tokens or []), key=lambda t: (-len(t), t))  # the longest first: `<|im_end|>` whole
    params = {"min_rows": min_rows, "max_field_chars": max_field_chars,
              "control_tokens": [re.escape(t) for t in tokens] if control_tokens is not None else None}
    kept = []
    for exp in spec.get("expectations", []):
        meta, kwargs = exp.get("meta", {}), exp.setdefault("kwargs", {})
        for key, name in meta.get("bind", {}).items():
            if params[name] is not None:
                kwargs[key] = params[name]
        for key, name in meta.get("cap", {}).items():
            kwargs[key] = min(kwargs[key], params[name]) if kwargs.get(key) is not None else params[name]
        if "locate_list" in meta:
            meta["locate"] = "|".join(kwargs[meta["locate_list"]])
        if any(isinstance(v, list) and not v for v in kwargs.values()):
            continue
        kept.append(exp)
    spec["expectations"] = kept
    return spec


@functools.cache
def default_ignorable() -> str:
    """The Default_Ignorable_Code_Point code points as ranges for a ``re`` character class (``\\u00ad\\u034f...``),
    from the ``regex`` package's Unicode tables (Python's ``unicodedata`` does not carry the property)."""
    import regex

    every = "".join(map(chr, range(0x110000)))
    ranges = [(m.start(), m.end() - 1) for m in regex.finditer(r"\p{Default_Ignorable_Code_Point}+", every)]
    return "".join(_escaped(a) if a == b else f"{_escaped(a)}-{_escaped(b)}" for a, b in ranges)


def _escaped(code: int) -> str:
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def validate_rows(
    rows: list[dict[str, Any]],
    *,
    source_name: str,
    suite: str = "delicate_medical_r1",
    policy: Literal["fail", "quarantine"] = "fail",
    out_dir: Path | None = None,
    min_rows: int = 10,
    max_field_chars: int = 20000,
    row_numbers: list[int] | None = None,
    data_docs: bool = True,
    control_tokens: list[str] | None = None,
) -> ValidationResult:
    """Validate ``rows`` against the suite; write the report, Data Docs and quarantine into ``out_dir``.

    ``policy="fail"`` raises DataValidationError on any bad row; ``"quarantine"`` drops bad
    rows (with reasons, to ``out_dir/quarantine.jsonl``) and keeps the rest. Table-level
    failures (too few rows, a missing column) raise under both policies, and so does a
    quarantine that leaves fewer than ``min_rows``. ``data_docs=False`` skips the HTML
    (about 1 s of template rendering) but still writes the JSON report.
    """
    numbers = list(range(1, len(rows) + 1)) if row_numbers is None else list(row_numbers)
    if len(numbers) != len(rows):
        raise ValueError(f"row_numbers has {len(numbers)} entries for {len(rows)} rows")
    spec = load_suite(suite, min_rows=min_rows, max_field_chars=max_field_chars, control_tokens=control_tokens)
    columns = list(dict.fromkeys(e["kwargs"]["column"] for e in spec["expectations"] if "column" in e["kwargs"]))
    out_dir = Path(out_dir) if out_dir is not None else None
    gx_result, docs_path = _run_gx(spec, rows, columns, source_name, out_dir if data_docs else None)

    row_problems, table_problems, summary = _attribute(gx_result, rows, numbers)
    bad_rows = [
        {"row": numbers[pos], "column": found[0][0], "reason": found[0][1],
         "problems": [{"column": c, "reason": r} for c, r in found], "data": rows[pos]}
        for pos, found in sorted(row_problems.items())
    ]
    good_rows = [r for pos, r in enumerate(rows) if pos not in row_problems]
    messages = table_problems + [
        f"row {b['row']} column '{p['column']}' {p['reason']}" for b in bad_rows for p in b["problems"]
    ]

    warnings = near_duplicates(rows, numbers, skip=set(row_problems))
    quarantine_path = None
    if policy == "quarantine" and bad_rows and out_dir is not None and not table_problems:
        quarantine_path = write_jsonl(bad_rows, out_dir / "quarantine.jsonl")
    report = {
        "suite": spec.get("name", suite),
        "source": source_name,
        "policy": policy,
        "success": bool(gx_result["success"]) and not messages,
        "gx_version": _gx().__version__,
        "rows": {"total": len(rows), "good": len(good_rows), "bad": len(bad_rows)},
        "statistics": gx_result.get("statistics", {}),
        "expectations": summary,
        "table_problems": table_problems,
        "warnings": warnings,
        "bad_rows": [{"row": b["row"], "problems": b["problems"]} for b in bad_rows[:200]],
        "quarantine_path": str(quarantine_path) if quarantine_path else None,
        "data_docs": str(docs_path) if docs_path else None,
    }
    report_path = None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        report_path = out_dir / "validation_report.json"
        report_path.write_text(json.dumps(report, ensure_ascii=False, indent=2, default=str), encoding="utf-8")
        (out_dir / REPORT_HTML).write_text(render_report_html(report), encoding="utf-8")
    result = ValidationResult(
        success=report["success"], good_rows=good_rows, bad_rows=bad_rows, report=report,
        report_path=report_path, docs_path=docs_path, quarantine_path=quarantine_path, problems=messages,
        warnings=warnings,
    )
    _raise_if_failed(result, table_problems, source_name=source_name, policy=policy, min_rows=min_rows)
    return result


def _raise_if_failed(
    result: ValidationResult, table_problems: list[str], *, source_name: str, policy: str, min_rows: int
) -> None:
    """One-line DataValidationError naming the source, the first bad rows and what is wrong."""
    where = f" (report: {result.report_path})" if result.report_path else ""
    n_bad, n_good = len(result.bad_rows), len(result.good_rows)
    if table_problems:
        also = f" (and {_plural(n_bad)} row checks)" if n_bad else ""
        message = f"{source_name}: {_listing(table_problems)}{also}{where}"
    elif n_bad and policy == "fail":
        message = (f"{source_name}: {_plural(n_bad)} validation: {_listing(result.problems)} "
                   f"(policy=quarantine drops them){where}")
    elif n_good < min_rows:
        message = (f"{source_name}: only {n_good} of {n_good + n_bad} rows pass validation, "
                   f"need at least {min_rows} (data.min_rows){where}")
    else:
        return
    err = DataValidationError(" ".join(message.split()))
    err.result = result  # type: ignore[attr-defined]  # callers may read the report of a failed run
    raise err


# -- GX -------------------------------------------------------------------------------


def _gx() -> Any:
    import great_expectations as gx

    return gx


def _run_gx(
    spec: dict[str, Any], rows: list[dict[str, Any]], columns: list[str], source_name: str, docs_parent: Path | None
) -> tuple[dict[str, Any], Path | None]:
    """Run the suite on a dataframe of ``columns`` in an ephemeral context; Data Docs into ``docs_parent``."""
    import pandas as pd

    gx = _gx()
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.data_context.types.base import ProgressBarsConfig

    present = [c for c in columns if any(c in r for r in rows)]
    # object dtype keeps type checks per value (a number in a column of strings is one bad row)
    df = pd.DataFrame({c: pd.Series([r.get(c) for r in rows], dtype=object) for c in present}, index=range(len(rows)))

    # an ephemeral context announces the temporary folder of its docs site at INFO on every run
    logging.getLogger("great_expectations.data_context.types.base").setLevel(logging.WARNING)
    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    for site in list(ctx.get_site_names()):
        ctx.delete_data_docs_site(site)
    suite = ctx.suites.add(gx.ExpectationSuite(name=spec.get("name", "suite"), expectations=spec["expectations"],
                                               meta=spec.get("meta", {})))
    asset = ctx.data_sources.add_pandas("ingested").add_dataframe_asset("rows")
    batch = asset.add_batch_definition_whole_dataframe("all")
    vd = ctx.validation_definitions.add(gx.ValidationDefinition(name="validate", data=batch, suite=suite))
    params = {"dataframe": df}
    if docs_parent is None:
        return vd.run(batch_parameters=params, result_format="COMPLETE").to_json_dict(), None

    docs_dir = docs_parent / "data_docs"
    ctx.add_data_docs_site(DOCS_SITE, {
        "class_name": "SiteBuilder",
        "show_how_to_buttons": False,
        # the rows' text is escaped before GX writes it into the page (stored XSS otherwise: sft_core.data_docs)
        "site_section_builders": {"validations": {"renderer": {"module_name": "sft_core.data_docs",
                                                               "class_name": "EscapedValidationResultsPageRenderer"}}},
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
    })
    checkpoint = ctx.checkpoints.add(gx.Checkpoint(
        name="validate", validation_definitions=[vd], result_format={"result_format": "COMPLETE"},
        actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs", site_names=[DOCS_SITE])],
    ))
    run_name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(source_name).name)[:80] or "rows"
    cp_result = checkpoint.run(batch_parameters=params, run_id=RunIdentifier(run_name=run_name))
    (suite_result,) = cp_result.run_results.values()
    return suite_result.to_json_dict(), docs_dir / "index.html"


# -- attribution ----------------------------------------------------------------------


def _attribute(
    gx_result: dict[str, Any], rows: list[dict[str, Any]], numbers: list[int]
) -> tuple[dict[int, list[tuple[str, str]]], list[str], list[dict[str, Any]]]:
    """GX results -> (problems per row position, table-level problems, per-expectation summary)."""
    per_row: dict[int, list[tuple[str, str]]] = {}
    table: list[str] = []
    summary: list[dict[str, Any]] = []
    missing = {
        r["expectation_config"]["kwargs"]["column"]
        for r in gx_result["results"]
        if r["expectation_config"]["type"] == "expect_column_to_exist" and not r["success"]
    }
    for res in gx_result["results"]:
        cfg, out = res["expectation_config"], res.get("result") or {}
        typ, kwargs, meta = cfg["type"], cfg.get("kwargs", {}), cfg.get("meta") or {}
        col = kwargs.get("column")
        index = out.get("unexpected_index_list")
        summary.append({
            "type": typ,
            "column": col,
            "success": bool(res["success"]),
            "unexpected_count": out.get("unexpected_count", 0 if res["success"] else None),
            "unexpected_rows": [numbers[i] for i in (index or [])[:SAMPLE_ROWS]],
            "observed_value": out.get("observed_value"),
            "kwargs": {k: v for k, v in kwargs.items() if k not in ("column", "batch_id")},
        })
        if res["success"]:
            continue
        template = meta.get("reason", typ)
        if typ == "expect_column_to_exist":
            table.append(f"column '{col}' is missing")
        elif col in missing:
            continue  # every check on a missing column fails; the one above says why
        elif index is None:
            exc = (res.get("exception_info") or {}).get("exception_message")
            fill = {"observed": out.get("observed_value"), **kwargs}
            text = f"{typ} raised {exc}" if exc else _fill(template, fill)
            table.append(f"column '{col}' {text}" if col else text)
        elif typ == "expect_column_values_to_be_unique":
            first: dict[str, int] = {}
            for pos in sorted(index):
                value = rows[pos].get(col)
                key = value if isinstance(value, str) else repr(value)
                if key in first:
                    per_row.setdefault(pos, []).append((col, _fill(template, {"first_row": numbers[first[key]]})))
                else:
                    first[key] = pos
        else:
            for pos in index:
                value = rows[pos].get(col)
                fill = {**kwargs, "type": type(value).__name__,
                        "length": len(value) if isinstance(value, str) else "?", "found": _found(meta, value)}
                per_row.setdefault(pos, []).append((col, _fill(template, fill)))
    return per_row, table, summary


def _found(meta: dict[str, Any], value: Any) -> str:
    """What a `meta.locate` regex found in `value`, written so that invisible characters are named."""
    pattern = meta.get("locate")
    match = re.search(pattern, value) if pattern and isinstance(value, str) else None
    if match is None:
        return "?"
    return shown(match.group(0))


def shown(text: str, most: int = 8) -> str:
    """`text` written so that invisible characters are named: `'</think>'`, `U+202E`, `'</think>' with U+200B
    inside`, or for tag characters what they spell."""
    def codes(chars: str, most: int = most) -> str:
        return " ".join(f"U+{ord(ch):04X}" for ch in chars[:most]) + (" …" if len(chars) > most else "")

    if all(ord(ch) in TAGS for ch in text):
        spelled = "".join(chr(ord(ch) - TAGS.start) for ch in text if 0x20 <= ord(ch) - TAGS.start < 0x7F)
        return f"Unicode tag characters spelling '{spelled}'" if spelled else f"Unicode tag characters {codes(text)}"
    hidden = "".join(ch for ch in text if not _visible(ch))
    if not hidden:
        return f"'{text}'"
    visible = "".join(ch for ch in text if _visible(ch))
    if not visible.strip():
        return f"a run of {len(text)} variation selectors ({codes(text, 3)})" if len(text) > 1 and all(
            unicodedata.name(ch, "").startswith("VARIATION SELECTOR") for ch in text) else codes(text)
    return f"'{visible}' with {codes(hidden)} inside"


def _visible(ch: str) -> bool:
    return ch == " " or (ch.isprintable() and not unicodedata.category(ch).startswith(("C", "Z", "M")))


def near_duplicates(rows: list[dict[str, Any]], numbers: list[int], skip: set[int] = frozenset(),
                    column: str = "question") -> list[str]:
    """Questions that are the same text once spaces, punctuation and case are ignored (exact copies are errors)."""
    groups: dict[str, list[int]] = {}
    for pos, row in enumerate(rows):
        value = row.get(column)
        if pos in skip or not isinstance(value, str):
            continue
        key = "".join(ch for ch in unicodedata.normalize("NFKC", value).casefold()
                      if not unicodedata.category(ch).startswith(("P", "Z", "S", "C")))
        groups.setdefault(key, []).append(pos)
    out = []
    for positions in groups.values():
        texts = {rows[p][column] for p in positions}
        if len(positions) > 1 and len(texts) > 1:
            out.append(f"rows {', '.join(str(numbers[p]) for p in positions)}: column '{column}' is nearly the same "
                       f"text (ignoring spaces, punctuation and case)")
    return out


def _fill(template: str, values: dict[str, Any]) -> str:
    try:
        return template.format(**values)
    except (KeyError, IndexError, ValueError):
        return template


def _plural(n: int) -> str:
    return f"{n} row fails" if n == 1 else f"{n} rows fail"


def _listing(messages: list[str]) -> str:
    shown = "; ".join(messages[:MAX_LISTED])
    more = len(messages) - MAX_LISTED
    return f"{shown}; and {more} more" if more > 0 else shown


# -- the report as one self-contained page ---------------------------------------------------------

def render_report_html(report: dict[str, Any]) -> str:
    """The validation report as one HTML page with its own style: readable offline, from any artifact store."""
    ok = report["success"]
    rows = report["rows"]
    exp_rows = "".join(
        f"<tr class={'ok' if e['success'] else 'bad'}><td>{escape(e['type'])}</td><td>{escape(str(e['column'] or ''))}</td>"
        f"<td>{'passed' if e['success'] else 'FAILED'}</td><td>{escape(str(e.get('unexpected_count')))}</td>"
        f"<td>{escape(', '.join(map(str, e.get('unexpected_rows') or [])))}</td>"
        f"<td>{escape(json.dumps(e.get('kwargs') or {}, ensure_ascii=False))}</td></tr>"
        for e in report["expectations"])
    bad_rows = "".join(
        f"<tr><td>{b['row']}</td><td>{escape(p['column'])}</td><td>{escape(p['reason'])}</td></tr>"
        for b in report["bad_rows"] for p in b["problems"])
    table = "".join(f"<li>{escape(t)}</li>" for t in report["table_problems"])
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Validation of {escape(str(report['source']))}</title>
<style>
body {{ font: 14px/1.45 system-ui, sans-serif; margin: 2em; color: #1d1d1f; }}
h1 {{ font-size: 1.4em; }} table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: .3em .6em; text-align: left; vertical-align: top; }}
th {{ background: #f2f2f2; }} tr.bad td {{ background: #fde8e8; }} .verdict {{ font-weight: bold; }}
.pass {{ color: #137333; }} .fail {{ color: #b3261e; }}
</style></head><body>
<h1>Validation of <code>{escape(str(report['source']))}</code></h1>
<p class="verdict {'pass' if ok else 'fail'}">{'All checks passed' if ok else 'Validation failed'}</p>
<table><tr><th>suite</th><td>{escape(str(report['suite']))}</td></tr>
<tr><th>policy</th><td>{escape(str(report['policy']))}</td></tr>
<tr><th>rows</th><td>{rows['total']} read, {rows['good']} good, {rows['bad']} bad</td></tr>
<tr><th>Great Expectations</th><td>{escape(str(report['gx_version']))}</td></tr></table>
{f'<h2>Table problems</h2><ul>{table}</ul>' if table else ''}
<h2>Expectations</h2>
<table><tr><th>expectation</th><th>column</th><th>result</th><th>unexpected</th><th>rows (first)</th><th>settings</th></tr>
{exp_rows}</table>
{f'<h2>Bad rows</h2><table><tr><th>row</th><th>column</th><th>reason</th></tr>{bad_rows}</table>' if bad_rows else ''}
</body></html>
"""
