"""MkDocs hook: the configuration reference page, generated from faceclf/config.py at every build.

`reference/configuration.md` is never a file in docs/pages/: it is added to the build's files here from
``faceclf.devtools.configdoc.render()``, so the page lists exactly the fields, defaults, flags and help texts the
code has.
"""

from __future__ import annotations

import sys
from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]  # the checkout: faceclf is imported from it, installed or not
PAGE = "reference/configuration.md"


def on_files(files: Files, config) -> Files:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from faceclf.devtools.configdoc import render

    stale = files.get_file_from_path(PAGE)
    if stale is not None:  # a hand-written copy would drift: the generated page always wins
        files.remove(stale)
    files.append(File.generated(config, PAGE, content=render()))
    return files
