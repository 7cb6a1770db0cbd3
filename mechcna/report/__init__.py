"""Report: self-contained HTML pages of tables and figures, and the demo that writes one.

Owns :class:`Report` (sections, text, tables and plotly figures with their paper references,
written as one offline ``index.html`` with a CSV per table, ``report.txt`` and
``provenance.json``), :class:`Provenance`, and :mod:`~mechcna.report.demo` (the arithmetic
pipeline on the shipped model, the README's main job).

May import: :mod:`mechcna.applications`, :mod:`mechcna.analyses`, :mod:`mechcna.tasks`,
:mod:`mechcna.engine`, :mod:`mechcna.interventions`, :mod:`mechcna.models` and the bottom
layer.
"""

from typing import TYPE_CHECKING, Any

from mechcna.report.outdir import OutputPathError, check_out_dir

if TYPE_CHECKING:
    from mechcna.report.page import Provenance, Report

__all__ = ["OutputPathError", "Provenance", "Report", "check_out_dir"]


def __getattr__(name: str) -> Any:
    """``Report`` and ``Provenance`` on first use (they import pandas and plotly)."""
    if name in ("Report", "Provenance"):
        from mechcna.report import page

        return getattr(page, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
