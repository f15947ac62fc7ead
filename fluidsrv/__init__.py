"""fluidsrv: a self-hosted server for real-time AI face editing, built on StyleGAN2.

Plugin authors write ``from fluidsrv import hookimpl``.
"""

from fluidsrv.hookspecs import hookimpl

__all__ = ["__version__", "hookimpl"]
__version__ = "0.1.0"
