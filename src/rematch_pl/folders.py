"""Generated folders (synthetic datasets, tiny checkpoints) made once, atomically."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable


def build_once(final: str | os.PathLike, marker: str, params: dict, build: Callable[[Path], None],
               error: type[Exception] = ValueError) -> Path:
    """Make the folder `final` with `build(tmp)` and return it; reuse it when it is complete.

    The folder is built in a temporary sibling and renamed into place, with `marker` (a JSON file
    holding `params`) written last: a killed build never leaves a folder that looks complete, and
    when several processes (ranks) race the first rename wins. A complete folder made with other
    `params`, or a non-empty folder without the marker, raises `error` naming it.
    """
    final = Path(final)
    done = final / marker
    if done.exists():
        found = json.loads(done.read_text())
        if found != params:
            raise error(f"{final} was made with {found}, not {params}: delete that folder or write elsewhere")
        return final
    if final.exists() and any(final.iterdir()):
        raise error(f"{final} exists, is not empty and is not complete (no {marker}): "
                    "delete that folder or write elsewhere")
    tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        build(tmp)
        (tmp / marker).write_text(json.dumps(params))
        if final.exists():
            final.rmdir()  # empty (checked above)
        tmp.rename(final)
    except OSError:
        if not done.exists():  # not another process finishing first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
