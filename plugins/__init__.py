"""The built-in stage plugins of fluidsrv (installed as the ``fluidsrv_plugins`` package)."""
