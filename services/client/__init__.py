"""The command-line client of the management API: ``proxyfleet status``, ``flows``,
``config``, ``rules``, ``approvals``, ``decisions``, ``events``, ``keys`` (see
``commands``)."""

# the first word of a client command line (``services.cli`` routes these here without
# importing click, rich and httpx for the service commands)
COMMANDS = frozenset(
    {
        "status",
        "start",
        "stop",
        "flows",
        "config",
        "rules",
        "approvals",
        "decisions",
        "events",
        "keys",
    }
)
GLOBAL_OPTIONS = ("--api-url", "--key-file")
