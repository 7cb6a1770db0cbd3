"""Output folders: created before any work, refused when they hold old results.

:func:`check_out_dir` runs before any computation (so a bad ``--out`` fails in milliseconds)
and :meth:`mechcna.report.page.Report.write` runs it again; every file mechcna writes into a
folder is listed in the folder's manifest (``.mechcna-files``), which is what ``overwrite``
deletes. Light on purpose: the command line imports it before anything heavy.
"""

import os
import re
from collections.abc import Collection
from pathlib import Path

from mechcna.errors import MechcnaError


class OutputPathError(MechcnaError):
    """An output folder cannot be created or written."""


#: The file, in every output folder, listing what mechcna wrote there (one name a line).
MANIFEST = ".mechcna-files"
#: What mechcna writes into a folder, for folders written before the manifest existed.
_KNOWN_OUTPUTS = re.compile(
    r"index\.html|report\.txt|provenance\.json|results\.json|reproduce\.md|table-\d+-.*\.csv"
)


#: Folders of saved reproduction stages (``mechcna reproduce --resume``, ``--preset paper``):
#: they are what a rerun continues from, so they neither count as old results nor are deleted
#: by ``overwrite`` (delete one by hand to start that run afresh).
CHECKPOINT_PREFIX = "checkpoint-"


def _resumable(p: Path) -> bool:
    return p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)


def written_files(out: Path) -> list[Path]:
    """The files mechcna wrote into ``out``: those its manifest lists or, without a manifest,
    those with the names mechcna gives its outputs."""
    manifest = out / MANIFEST
    if manifest.is_file():
        names = manifest.read_text(encoding="utf-8").split("\n")
        return [out / n for n in names if n and "/" not in n and (out / n).is_file()]
    return sorted(p for p in out.iterdir() if p.is_file() and _KNOWN_OUTPUTS.fullmatch(p.name))


def check_out_dir(path: str | Path, overwrite: bool = False, keep: Collection[str] = ()) -> Path:
    """Create ``path`` (and parents) if needed and check that it is an empty, writable folder.

    Call it before any computation so a bad ``--out`` fails in milliseconds, not after minutes.
    A folder that is not empty is refused (old and new results would mix) unless
    ``overwrite``, which deletes the files mechcna wrote there (:func:`written_files`) and
    keeps everything else.

    ``keep`` names files this run already wrote there (e.g. a trained checkpoint): they
    neither count as content nor are deleted; nor do the folders of saved reproduction stages
    (``checkpoint-*``, :data:`CHECKPOINT_PREFIX`) that a resumed run continues from.

    Raises:
        OutputPathError: ``path`` is a file, is not empty (without ``overwrite``), or cannot be
            created or written.
    """
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise OutputPathError(f"output path {out} exists and is not a folder")
    if out.is_dir() and any(p.name not in keep and not _resumable(p) for p in out.iterdir()):
        if not overwrite:
            raise OutputPathError(
                f"output folder {out} is not empty; choose a new folder or pass --overwrite "
                "(overwrite=True) to replace what mechcna wrote there"
            )
        for file in written_files(out):
            if file.name not in keep:
                file.unlink()
        (out / MANIFEST).unlink(missing_ok=True)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputPathError(f"cannot create output folder {out}: {err.strerror}") from err
    if not os.access(out, os.W_OK | os.X_OK):
        raise OutputPathError(f"output folder {out} is not writable")
    return out
