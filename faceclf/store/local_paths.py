"""Where a flow's local paths may lead: flow parameters are input (the Prefect server has no login), so a
parameter that becomes a local path (a face/ folder, a runs folder, a local bucket, a scoring source or output)
must lie inside the worker's own folder (its working directory) or a folder the deployment lists in
FACECLF_ALLOW_PATHS (os.pathsep-separated, as PATH; read from the worker's environment, never a parameter)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

ALLOW_PATHS_ENV = "FACECLF_ALLOW_PATHS"  # extra folders a flow's local paths may name (worker's environment)


def allowed_roots(environ: Mapping[str, str] = os.environ) -> list[Path]:
    """Where a flow's local paths may lead: the worker's own folder (the working directory), then each
    folder listed in FACECLF_ALLOW_PATHS (os.pathsep-separated), all resolved."""
    extra = [Path(p).expanduser() for p in environ.get(ALLOW_PATHS_ENV, "").split(os.pathsep) if p.strip()]
    return [Path.cwd().resolve(), *(p.resolve() for p in extra)]


def confine(path: str | os.PathLike[str], roots: Sequence[Path], what: str) -> Path:
    """``path`` resolved (symbolic links and '..' included) if it lies inside one of ``roots``; else ValueError
    naming it, where it leads and the roots. For local paths that arrive as flow parameters."""
    resolved = Path(path).expanduser().resolve()
    if any(resolved.is_relative_to(root) for root in roots):
        return resolved
    raise ValueError(f"{what} {str(path)!r} resolves to {str(resolved)!r}, outside the worker's folder "
                     f"{str(roots[0])!r}{' and ' + ', '.join(map(str, roots[1:])) if roots[1:] else ''}; a flow "
                     f"parameter may only name local paths inside them (the deployment may list more folders in "
                     f"{ALLOW_PATHS_ENV}, separated by {os.pathsep!r})")
