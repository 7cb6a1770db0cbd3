"""One self-contained HTML page per run: sections, captioned figures and tables, provenance.

A :class:`Report` collects prose, plotly figures and pandas tables in order, then
:meth:`Report.write` puts into one folder

* ``index.html``: every figure inline, plotly.js embedded once, no external URL (readable
  offline, from a USB stick, years later);
* one CSV per table (``table-01-<slug>.csv``, numbered in page order);
* ``report.txt``: the same run as plain text (what the demo prints);
* ``provenance.json``: model, weight processing, dequantisation, BOS policy, versions, date,
  wall time.

Every figure and table carries a caption saying what it shows and, where there is one, the
paper table or figure it corresponds to (``paper_ref="ARITH Table 5"``).

Example:
    >>> import pandas as pd, plotly.graph_objects as go, tempfile
    >>> report = Report("demo", Provenance(model="toy"))
    >>> report.section("Accuracy", "Held-out accuracy per cell.")
    >>> report.table(pd.DataFrame({"cell": ["+"], "accuracy": [1.0]}), "accuracy per cell",
    ...              paper_ref="ARITH Table 1")
    >>> report.figure(go.Figure(go.Bar(x=[0, 1], y=[1, 2])), "a bar chart")
    >>> path = report.write(tempfile.mkdtemp())
    >>> sorted(p.name for p in path.parent.iterdir())  # doctest: +NORMALIZE_WHITESPACE
    ['.mechcna-files', 'index.html', 'provenance.json', 'report.txt',
     'table-01-accuracy-per-cell.csv']
"""

import datetime as _dt
import html
import json
import platform
import re
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
from plotly.offline import get_plotlyjs

from mechcna.errors import MechcnaError
from mechcna.report.outdir import (
    MANIFEST,
    OutputPathError,
    check_out_dir,
    written_files,
)

__all__ = [
    "MANIFEST",
    "OutputPathError",
    "Provenance",
    "Report",
    "check_out_dir",
    "package_versions",
    "written_files",
]

_VERSION_PACKAGES = ("mechcna", "torch", "transformer-lens", "transformers", "plotly")


def package_versions() -> dict[str, str]:
    """Python and the versions of the packages a result depends on."""
    versions = {"python": platform.python_version()}
    for name in _VERSION_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


@dataclass(frozen=True)
class Provenance:
    """What a run used, shown at the top of the page and saved as ``provenance.json``.

    Attributes:
        model: the model's name (``cfg.model_name`` or what was passed to ``load_model``).
        weight_processing: the TransformerLens weight processing applied, in words.
        dequantisation: how quantised weights were expanded (``"none"`` for float weights).
        bos: the BOS policy (``"prepended"`` / ``"not prepended"``).
        versions: package versions (see :func:`package_versions`).
        date: UTC time the run started (ISO 8601).
        wall_time_s: seconds the run took; filled in by :meth:`Report.write` if ``None``.
        extra: anything else worth recording (seed, number of cases, command line).
    """

    model: str
    weight_processing: str = "none"
    dequantisation: str = "none"
    bos: str = "unknown"
    versions: dict[str, str] = field(default_factory=package_versions)
    date: str = field(
        default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    )
    wall_time_s: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_model(cls, model: Any, **extra: Any) -> "Provenance":
        """Read name, weight processing, dequantisation and BOS policy off a loaded model.

        ``model`` is a :class:`~transformer_lens.HookedTransformer` loaded by
        :func:`mechcna.load_model`; ``extra`` goes to :attr:`extra`.
        """
        from mechcna.models.processing import get_processing
        from mechcna.models.provenance import get_provenance

        processing = get_processing(model)
        if processing is None:
            words = "unknown (not loaded by mechcna.load_model)"
        else:
            done = [k for k, v in asdict(processing).items() if v]
            words = ", ".join(done) if done else "none (raw weights, as the papers)"
        source = get_provenance(model)
        bos = "prepended" if model.cfg.default_prepend_bos else "not prepended"
        dequant = "none (float weights)"
        if source is not None:
            bos += f" (policy: {source.bos_policy})"
            if source.quantization is not None:
                dequant = f"dequantised from {source.quantization} ({source.format})"
            extra = {"source": source.describe(), **extra}
        return cls(
            model=str(model.cfg.model_name),
            weight_processing=words,
            dequantisation=str(dequant),
            bos=bos,
            extra=extra,
        )

    def rows(self) -> list[tuple[str, str]]:
        """``(field, value)`` pairs in display order."""
        wall = "-" if self.wall_time_s is None else f"{self.wall_time_s:.1f} s"
        rows = [
            ("model", self.model),
            ("weight processing", self.weight_processing),
            ("dequantisation", self.dequantisation),
            ("BOS", self.bos),
            ("date (UTC)", self.date),
            ("wall time", wall),
            ("versions", ", ".join(f"{k} {v}" for k, v in self.versions.items())),
        ]
        return rows + [(str(k), str(v)) for k, v in self.extra.items()]


@dataclass(frozen=True)
class _Block:
    kind: str  # "section", "text", "figure", "table", "pre"
    payload: Any
    caption: str = ""
    paper_ref: str | None = None
    name: str = ""


_ACCURACY = re.compile(r"(^|_)(accuracy|gain)($|_)")


def percent_accuracy(frame: pd.DataFrame) -> pd.DataFrame:
    """Accuracy in percent on every page: numeric columns named ``accuracy`` (or
    ``base_accuracy``, ``delta_accuracy``, ``accuracy_int``, a LoRA's ``gain``, ...) hold
    fractions in the library's frames; on a page they are shown times 100, named ``... %``
    (a difference of two accuracies is then in percentage points). Columns already named with
    ``%`` are left alone."""
    cols = [
        c
        for c in frame.columns
        if isinstance(c, str)
        and "%" not in c
        and _ACCURACY.search(c)
        and pd.api.types.is_numeric_dtype(frame[c])
        and not pd.api.types.is_bool_dtype(frame[c])
    ]
    if not cols:
        return frame
    out = frame.copy()
    for c in cols:
        out[c] = 100 * out[c]
    return out.rename(columns={c: f"{c} %" for c in cols})


def _slug(text: str, limit: int = 40) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:limit].rstrip("-") or "table"


class Report:
    """Builds one self-contained HTML page; blocks appear in the order they are added.

    Args:
        title: the page title (``<h1>``).
        provenance: what the run used; a model name is enough (``Provenance(model=...)``).
        intro: a paragraph under the title.
    """

    def __init__(self, title: str, provenance: Provenance | None = None, intro: str = "") -> None:
        self.title = title
        self.provenance = provenance
        self._blocks: list[_Block] = []
        self._files: dict[str, str] = {}
        self._adopted: set[str] = set()
        self._start = time.perf_counter()
        if intro:
            self.text(intro)

    # ----------------------------------------------------------------------------- building
    def section(self, title: str, text: str = "") -> None:
        """Start a new section (``<h2>``), optionally with a first paragraph."""
        self._blocks.append(_Block("section", title))
        if text:
            self.text(text)

    def text(self, text: str) -> None:
        """A paragraph of prose (plain text; blank lines separate paragraphs)."""
        self._blocks.append(_Block("text", text))

    def preformatted(self, text: str, caption: str = "") -> None:
        """Fixed-width text (a printed table, a log), kept as is."""
        self._blocks.append(_Block("pre", text, caption))

    def figure(
        self, fig: go.Figure, caption: str, paper_ref: str | None = None, name: str = ""
    ) -> None:
        """A plotly figure, inline, with a caption naming what it shows and its paper source."""
        if not isinstance(fig, go.Figure):
            raise MechcnaError(f"Report.figure takes a plotly Figure, not {type(fig).__name__}")
        self._blocks.append(_Block("figure", fig, caption, paper_ref, name))

    def table(
        self,
        frame: pd.DataFrame,
        caption: str,
        paper_ref: str | None = None,
        name: str = "",
        index: bool = False,
    ) -> None:
        """A pandas table: shown on the page and saved as its own CSV.

        Args:
            frame: the table.
            caption: what it shows.
            paper_ref: the paper table it corresponds to (``"ARITH Table 5"``).
            name: the CSV's name stem (default: from the caption).
            index: keep the frame's index as columns (for tables indexed by setting).

        Accuracy columns (fractions in the library) are shown in percent
        (:func:`percent_accuracy`), so every page gives accuracy in one unit.
        """
        if not isinstance(frame, pd.DataFrame):
            raise MechcnaError(f"Report.table takes a DataFrame, not {type(frame).__name__}")
        frame = percent_accuracy(frame.reset_index() if index else frame)
        self._blocks.append(_Block("table", frame, caption, paper_ref, name or _slug(caption)))

    # ----------------------------------------------------------------------------- reading
    @property
    def figures(self) -> list[go.Figure]:
        return [b.payload for b in self._blocks if b.kind == "figure"]

    @property
    def tables(self) -> list[pd.DataFrame]:
        return [b.payload for b in self._blocks if b.kind == "table"]

    def finished_provenance(self) -> Provenance | None:
        """The provenance with the wall time filled in (seconds since the report began)."""
        prov = self.provenance
        if prov is not None and prov.wall_time_s is None:
            prov = replace(prov, wall_time_s=time.perf_counter() - self._start)
        return prov

    def to_text(self) -> str:
        """The run as plain text: headings, prose, tables and captions (no figures)."""
        out = [f"# {self.title}"]
        for block in self._blocks:
            if block.kind == "section":
                out.append(f"\n== {block.payload}")
            elif block.kind == "text":
                out.append(str(block.payload))
            elif block.kind == "pre":
                out.append(str(block.payload).rstrip("\n"))
            elif block.kind == "table":
                out.append(f"{_label(block)}:")
                out.append(block.payload.to_string(index=False))
        return "\n".join(out) + "\n"

    # ----------------------------------------------------------------------------- writing
    def to_html(self) -> str:
        """The whole page as one string (plotly.js inlined once)."""
        prov = self.finished_provenance()
        body: list[str] = [f"<h1>{_esc(self.title)}</h1>"]
        if prov is not None:
            rows = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in prov.rows())
            body.append(f'<table class="provenance"><caption>Provenance</caption>{rows}</table>')
        n_fig = n_tab = 0
        for block in self._blocks:
            if block.kind == "section":
                body.append(f"<h2>{_esc(block.payload)}</h2>")
            elif block.kind == "text":
                paras = [p for p in str(block.payload).split("\n\n") if p.strip()]
                body.extend(f"<p>{_esc(p)}</p>" for p in paras)
            elif block.kind == "pre":
                cap = f"<figcaption>{_esc(block.caption)}</figcaption>" if block.caption else ""
                body.append(f"<figure><pre>{_esc(block.payload)}</pre>{cap}</figure>")
            elif block.kind == "figure":
                n_fig += 1
                body.append(_figure_html(block, n_fig))
            elif block.kind == "table":
                n_tab += 1
                table = block.payload.to_html(index=False, border=0, float_format=_fmt)
                body.append(
                    f'<figure class="table">{_caption(block, f"Table {n_tab}")}{table}</figure>'
                )
        return _PAGE.format(
            title=_esc(self.title), css=_CSS, plotlyjs=self._plotlyjs(), body="\n".join(body)
        )

    def attach(self, name: str, text: str) -> None:
        """A further file (e.g. ``results.json``) that :meth:`write` puts beside the page."""
        if not name or "/" in name or name.startswith(".") or name == "index.html":
            raise MechcnaError(f"an attached file needs a plain file name, not {name!r}")
        self._files[name] = text

    def adopt(self, names: Iterable[str]) -> None:
        """Files this run already wrote into the output folder (e.g. a trained checkpoint):
        :meth:`write` accepts them there and lists them in the manifest."""
        self._adopted.update(names)

    def _plotlyjs(self) -> str:
        """plotly.js (4.7 MB) once, and only on a page that has figures."""
        return f"<script>{get_plotlyjs()}</script>" if self.figures else ""

    def write(self, out_dir: str | Path, overwrite: bool = False) -> Path:
        """Write ``index.html``, one CSV per table, ``report.txt``, ``provenance.json`` and the
        attached files, and list them in the folder's manifest (``.mechcna-files``).

        Args:
            out_dir: the folder; created if needed. It must be empty unless ``overwrite``.
            overwrite: first delete what mechcna wrote into the folder before (other files
                are kept), so old and new results never mix.

        Returns:
            the path of ``index.html``.

        Raises:
            OutputPathError: the folder is not empty and ``overwrite`` is false.
        """
        out = check_out_dir(out_dir, overwrite, keep=self._adopted)
        prov = self.finished_provenance()
        files: dict[str, str] = {}
        n_tab = 0
        for block in self._blocks:
            if block.kind == "table":
                n_tab += 1
                files[f"table-{n_tab:02d}-{block.name}.csv"] = block.payload.to_csv(index=False)
        files["report.txt"] = self.to_text()
        if prov is not None:
            files["provenance.json"] = json.dumps(asdict(prov), indent=2, default=str) + "\n"
        files.update(self._files)
        files["index.html"] = self.to_html()
        names = [*sorted(self._adopted - set(files)), *files]
        (out / MANIFEST).write_text("\n".join(names) + "\n", encoding="utf-8")
        for name, text in files.items():
            (out / name).write_text(text, encoding="utf-8")
        return out / "index.html"


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _fmt(x: Any) -> str:  # numpy floats too
    return f"{x:.4g}"


def _label(block: _Block) -> str:
    ref = f" [paper: {block.paper_ref}]" if block.paper_ref else ""
    return f"{block.caption}{ref}"


def _caption(block: _Block, number: str) -> str:
    ref = f' <span class="paper">Paper: {_esc(block.paper_ref)}.</span>' if block.paper_ref else ""
    return f"<figcaption><b>{number}.</b> {_esc(block.caption)}{ref}</figcaption>"


def _figure_html(block: _Block, number: int) -> str:
    """A div and the script that draws the figure into it; JSON made safe inside <script>."""
    div = f"figure-{number}"
    spec = str(pio.to_json(block.payload, validate=True, remove_uids=True))
    spec = spec.replace("</", "<\\/").replace("<!--", "<\\!--")
    script = (
        f"(function(){{var f={spec};"
        f'Plotly.newPlot("{div}",f.data,f.layout||{{}},'
        f"{{responsive:true,displaylogo:false}});}})();"
    )
    caption = _caption(block, f"Figure {number}")
    return (
        f'<figure class="plot"><div id="{div}" class="plotly-figure"></div>'
        f"<script>{script}</script>{caption}</figure>"
    )


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{border-bottom:2px solid #444;padding-bottom:.2em}h2{margin-top:2em;border-bottom:1px solid #bbb}
figure{margin:1.2em 0}figcaption{font-size:.92em;color:#333;margin:.4em 0}
.paper{color:#7a3b00;font-style:italic}
table{border-collapse:collapse;font-size:.9em;margin:.4em 0}
th,td{border:1px solid #ccc;padding:.2em .6em;text-align:right}
th{background:#f2f2f2}table.provenance th,table.provenance td{text-align:left}
table.provenance caption{text-align:left;font-weight:bold;padding:.3em 0}
pre{background:#f7f7f7;padding:.6em;overflow-x:auto;font-size:.85em}
.plotly-figure{width:100%;min-height:420px}
"""

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{css}</style>
{plotlyjs}
</head>
<body>
{body}
</body>
</html>
"""
