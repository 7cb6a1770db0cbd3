"""Report: self-contained HTML pages of tables and figures, and the demo that writes one.

Owns :class:`Report` (sections, text, tables and plotly figures with their paper references,
written as one offline ``index.html`` with a CSV per table, ``report.txt`` and
``provenance.json``), :class:`Provenance`, and :mod:`~mechcna.report.demo` (the arithmetic
pipeline on the shipped model, the README's main job).

May import: :mod:`mechcna.applications`, :mod:`mechcna.analyses`, :mod:`mechcna.tasks`,
:mod:`mechcna.engine`, :mod:`mechcna.interventions`, :mod:`mechcna.models` and the bottom
layer.
"""

from mechcna.report.page import OutputPathError, Provenance, Report, check_out_dir

__all__ = ["OutputPathError", "Provenance", "Report", "check_out_dir"]
