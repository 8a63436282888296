"""The optional ``viz`` extra: what needs it, and the one clear error when it is missing.

The HTML reports are written by this package itself (inline SVG and CSS) and need nothing beyond the base install.
The PNG figures are drawn with matplotlib, which the base client does not install (it stays light): ``pip install
'linlens[viz]'`` adds it.
"""

from __future__ import annotations

#: The command that installs what the PNG reports need.
VIZ_INSTALL = "pip install 'linlens[viz]'"


class MissingExtraError(ImportError):
    """A feature needs an optional extra that is not installed; the message names the pip command."""


def require_viz() -> None:
    """Raise MissingExtraError, naming the extra, unless matplotlib can be imported (call it before costly work)."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError as error:
        raise MissingExtraError(
            f"PNG reports need matplotlib, which linlens installs with its viz extra: {VIZ_INSTALL} ({error})"
        ) from error
