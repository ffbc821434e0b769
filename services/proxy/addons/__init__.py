"""Features on the hook seam, one small module each, in the order they run.

``build_chain`` is called once per config or policy revision: an addon whose config is
empty or off is not in the chain at all, so it costs nothing per request.
"""

from __future__ import annotations

from libs.common import telemetry
from services.proxy.addons import rules
from services.proxy.addons.ignore_hosts import IgnoreHosts
from services.proxy.addons.tracing import Tracing
from services.proxy.config import ProxyConfig
from services.proxy.hooks import Addon, AddonChain
from services.proxy.intercepts import Intercepts


def build_chain(
    config: ProxyConfig,
    policy: rules.CompiledPolicy = rules.EMPTY,
    replica: str = "",
    intercepts: Intercepts | None = None,
) -> AddonChain:
    """The addons of ``config`` and the rules ``policy``, in the order they run."""
    addons: list[Addon] = []
    if telemetry.ENABLED:  # first: later addons' decisions end up in the flow's span
        addons.append(Tracing())
    ignore = IgnoreHosts.configure(config)
    if ignore is not None:
        addons.append(ignore)
    policy_addon = None if intercepts is None else rules.build(policy, replica, intercepts)
    if policy_addon is not None:  # after ignore_hosts: a blind tunnel is still matched
        addons.append(policy_addon)
    return AddonChain(addons)
