"""The Great Expectations Data Docs page of a validation, with the rows' text escaped.

GX writes the values that failed an expectation (``partial_unexpected_list`` and the rest of each
result) into the page's table cells as they are: a row holding ``<script>`` or ``<img onerror=...>``
would run in the browser of whoever opens the Data Docs, which the run also logs to MLflow (stored
XSS). GX escapes the expectation's settings itself; what comes from the rows is the result of each
expectation, so this renderer escapes every string in it (and in its exception text) before GX
renders the page. The site builder loads it by name (``sft_core.validation`` configures the site),
so importing this module imports GX: nothing else imports it.
"""

from __future__ import annotations

import copy
import html
from typing import Any

from great_expectations.render.renderer import ValidationResultsPageRenderer


def escaped(value: Any) -> Any:
    """`value` with every string in it (keys of mappings too) HTML-escaped, quotes included."""
    if isinstance(value, str):
        return html.escape(value, quote=True)
    if isinstance(value, dict):
        return {escaped(k): escaped(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(escaped(v) for v in value)
    return value


class EscapedValidationResultsPageRenderer(ValidationResultsPageRenderer):
    """GX's validation results page, rendered from a copy whose row values are HTML-escaped."""

    def render(self, validation_results, *args: Any, **kwargs: Any):  # type: ignore[override]
        safe = copy.deepcopy(validation_results)
        for result in safe.results:
            result.result = escaped(result.result or {})
            if result.exception_info:
                result.exception_info = escaped(result.exception_info)
        return super().render(safe, *args, **kwargs)
