"""The web UI at ``/ui``: server-rendered page shells, small ES modules that call the REST
API with a cookie session (``sessions``), and the browsable API docs at ``/api/docs``."""
