"""The worklist web page: static files in ``static/``, served by :mod:`node.api.app`."""
