"""Progress bars that follow tqdm's own switch.

``tqdm.auto`` draws a widget in JupyterLab and text elsewhere, but its notebook
class passes ``disable=False`` itself, so ``TQDM_DISABLE=1`` (which the report
runner sets) never reaches it (tqdm 4.70). With the switch on, the text class,
which honours it, is used instead.
"""

from __future__ import annotations

import os

from tqdm import tqdm as _text
from tqdm.auto import tqdm as _auto

QUIET = os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes")  # the switch is on
tqdm = _text if QUIET else _auto
