"""The rules policy on the hook seam: match, edit, answer, hold (``libs.common.policy``).

A policy revision is compiled once (``CompiledPolicy.build``): filters become
predicates, regexes and header edits become bytes, rules are put in evaluation order
per phase, and the literals the filters require are gathered into one screen per phase
(``services.proxy.prefilter``). Per exchange, a phase costs the screen (one joined text,
a few substring tests); only rules the screen lets through are matched (over one
``LiveView``), and only matching rules do more. The decision is recorded on the flow
(``flow.policy``: the revision and, per applied rule, its id, phase and action).

Waiting (``delay``, ``intercept``) never blocks: the exchange is held at its hook
(``Exchange.hold``) and a timer or a decision resumes it (``Exchange.resume``),
answering it first where the outcome is an answer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import regex

from libs.common import flowfilter
from libs.common.policy import FINAL_ACTIONS, Phase, Policy, Rule, ordered
from services.proxy import prefilter
from services.proxy.exchange import HOLD
from services.proxy.flowview import LiveView
from services.proxy.hooks import Addon
from services.proxy.prefilter import Need
from services.proxy.rewrite import BodyRewrite

if TYPE_CHECKING:
    from services.proxy.exchange import Exchange
    from services.proxy.intercepts import Intercepts

log = logging.getLogger("proxyfleet.rules")

# a rule whose filter times out on an exchange counts as matching it for these actions
FAIL_CLOSED = frozenset({"block", "intercept"})
SUB_TIMEOUT = 0.05  # seconds a map_remote / replace_body substitution may take
_TEXT = (b"Content-Type", b"text/plain; charset=utf-8")

# (exchange, the phase so far, the rule's line in the decision) -> a note for that line
Apply = Callable[["Exchange", "Evaluation", dict[str, Any]], str | None]


@dataclass(slots=True)
class Evaluation:
    """What the matching rules of one phase add up to, before it is acted on."""

    phase: Phase
    delay_ms: int = 0
    final: CompiledRule | None = None
    entry: dict[str, Any] | None = None  # the final rule's line in the flow's decision


@dataclass(frozen=True, slots=True)
class CompiledRule:
    id: str
    phase: Phase
    kind: str  # the action's type
    matches: Callable[[LiveView], bool]
    apply: Apply
    spec: Any  # the validated action (final actions read it when they act)
    needs: tuple[Need, ...] | None  # literals one of which must be present (prefilter)

    @property
    def final(self) -> bool:
        return self.kind in FINAL_ACTIONS


# -- edits ------------------------------------------------------------------------------
def _pairs(pairs: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(n.encode("latin-1"), v.encode("latin-1")) for n, v in pairs]


def _set_headers(pairs: list[tuple[str, str]], phase: Phase) -> Apply:
    new = _pairs(pairs)
    names = frozenset(n.lower() for n, _ in new)
    response = phase == "response"

    def apply(ex: Exchange, ev: Evaluation, entry: dict[str, Any]) -> str | None:
        flow = ex.flow
        old = flow.resp_headers if response else flow.req_headers
        kept = [h for h in old if h[0].lower() not in names]
        kept.extend(new)
        if response:
            flow.resp_headers = kept
        else:
            flow.req_headers = kept
        return None

    return apply


def _remove_headers(names_in: list[str], phase: Phase) -> Apply:
    names = frozenset(n.lower().encode("latin-1") for n in names_in)
    response = phase == "response"

    def apply(ex: Exchange, ev: Evaluation, entry: dict[str, Any]) -> str | None:
        flow = ex.flow
        if response:
            flow.resp_headers = [h for h in flow.resp_headers if h[0].lower() not in names]
        else:
            flow.req_headers = [h for h in flow.req_headers if h[0].lower() not in names]
        return None

    return apply


def _map_remote(pattern: str, replacement: str) -> Apply:
    rx = regex.compile(pattern, regex.V0)

    def apply(ex: Exchange, ev: Evaluation, entry: dict[str, Any]) -> str | None:
        flow = ex.flow
        if flow.method == b"CONNECT":
            return "not applied to CONNECT"
        url = flowfilter.pretty_url(flow.scheme, flow.host, flow.port, flow.path.decode("latin-1"))
        try:
            new = rx.sub(lambda _m: replacement, url, timeout=SUB_TIMEOUT)
        except TimeoutError:
            return "pattern timed out: not applied"
        if new == url:
            return None
        why = ex.retarget(new)
        return f"{why}: not applied" if why else f"to {new[:200]}"

    return apply


def _tag(tags: list[str]) -> Apply:
    def apply(ex: Exchange, ev: Evaluation, entry: dict[str, Any]) -> str | None:
        flow = ex.flow
        if flow.tags is None:
            flow.tags = []
        flow.tags.extend(t for t in tags if t not in flow.tags)
        return None

    return apply


def _delay(ms: int) -> Apply:
    def apply(ex: Exchange, ev: Evaluation, entry: dict[str, Any]) -> str | None:
        ev.delay_ms += ms
        return None

    return apply


def _final(ex: Exchange, ev: Evaluation, entry: dict[str, Any]) -> str | None:
    return None  # acted on once the phase's edits and delays are done (``_act``)


def _replace_body(pattern: str, replacement: str, phase: Phase) -> Apply:
    rx = regex.compile(pattern.encode("utf-8", "surrogateescape"), regex.V0 | regex.DOTALL)
    new = replacement.encode("utf-8")
    response = phase == "response"

    def apply(ex: Exchange, ev: Evaluation, entry: dict[str, Any]) -> str | None:
        if ex.flow.method == b"CONNECT":
            return "not applied to CONNECT"
        rewrite = ex.resp_rewrite if response else ex.req_rewrite
        if rewrite is None:
            rewrite = BodyRewrite()
            if response:
                ex.resp_rewrite = rewrite
            else:
                ex.req_rewrite = rewrite
        rewrite.add(rx, new, entry)
        return "pending"  # the rewrite says what it did once the body is in

    return apply


def compile_rule(rule: Rule) -> CompiledRule:
    action = rule.action
    phase = rule.match.phase
    kind = action.type
    apply: Apply
    if kind == "set_headers":
        apply = _set_headers(action.headers, phase)  # type: ignore[union-attr]
    elif kind == "remove_headers":
        apply = _remove_headers(action.names, phase)  # type: ignore[union-attr]
    elif kind == "map_remote":
        apply = _map_remote(action.pattern, action.replacement)  # type: ignore[union-attr]
    elif kind == "tag":
        apply = _tag(action.tags)  # type: ignore[union-attr]
    elif kind == "delay":
        apply = _delay(action.ms)  # type: ignore[union-attr]
    elif kind == "replace_body":
        apply = _replace_body(action.pattern, action.replacement, phase)  # type: ignore[union-attr]
    else:
        apply = _final
    tree = flowfilter.parse(rule.match.filter)
    return CompiledRule(
        rule.id, phase, kind, flowfilter.predicate(tree), apply, action, prefilter.needs(tree)
    )


@dataclass(frozen=True, slots=True)
class CompiledPolicy:
    """One policy revision, ready for the relay."""

    revision: int
    request: tuple[CompiledRule, ...]
    response: tuple[CompiledRule, ...]
    request_screen: prefilter.Screen[CompiledRule]
    response_screen: prefilter.Screen[CompiledRule]

    @classmethod
    def build(cls, policy: Policy, revision: int) -> CompiledPolicy:
        request = tuple(compile_rule(r) for r in ordered(policy.rules, "request"))
        response = tuple(compile_rule(r) for r in ordered(policy.rules, "response"))
        return cls.of(revision, request, response)

    @classmethod
    def of(
        cls,
        revision: int,
        request: tuple[CompiledRule, ...] = (),
        response: tuple[CompiledRule, ...] = (),
    ) -> CompiledPolicy:
        screens = prefilter.Screen(request), prefilter.Screen(response)
        return cls(revision, request, response, *screens)

    @property
    def empty(self) -> bool:
        return not self.request and not self.response


EMPTY = CompiledPolicy.of(0)


# -- the addon ----------------------------------------------------------------------------
class Rules(Addon):
    """Evaluates a ``CompiledPolicy`` at the request and response heads."""

    name = "rules"

    def __init__(self, policy: CompiledPolicy, replica: str, intercepts: Intercepts) -> None:
        self.policy = policy
        self.replica = replica
        self.intercepts = intercepts
        self.loop = asyncio.get_running_loop()
        self.stamp: tuple[int, tuple[()]] = (policy.revision, ())  # no rule applied (yet)

    def request_head(self, ex: Exchange) -> None:
        ex.flow.policy = self.stamp
        policy = self.policy
        if policy.request:
            self._phase(ex, policy.request, policy.request_screen, "request")

    def _phase(
        self,
        ex: Exchange,
        rules: tuple[CompiledRule, ...],
        screen: prefilter.Screen[CompiledRule],
        phase: Phase,
    ) -> None:
        if screen.nothing_needed_present(ex.flow):
            if not screen.unconditional:
                return  # the usual request: no rule can match
            rules = screen.unconditional
        texts: prefilter.Texts | None = None  # objects cost: made only when a rule needs them
        view = LiveView(ex.flow, self.replica)
        matched: list[CompiledRule] = []
        timed_out: list[str] = []
        for rule in rules:
            needs = rule.needs
            if needs is not None:
                if texts is None:
                    texts = prefilter.Texts(ex.flow)
                if not texts.present(needs):
                    continue  # something the filter needs is absent: it cannot match
            try:
                if rule.matches(view):
                    matched.append(rule)
            except flowfilter.FilterTimeout:
                # fail closed: a pattern the exchange makes backtrack cannot be used to
                # slip past a block or an intercept; edits are left out
                timed_out.append(rule.id)
                if rule.kind in FAIL_CLOSED:
                    matched.append(rule)
        if timed_out:
            log.warning("rules %s: filter timed out on flow %s", timed_out, ex.flow.id)
        if not matched:
            return
        flow = ex.flow
        revision, applied = flow.policy or self.stamp
        record = applied if isinstance(applied, list) else list(applied)
        flow.policy = (revision, record)
        ev = Evaluation(phase)
        for rule in matched:
            entry: dict[str, Any] = {"rule": rule.id, "phase": phase, "action": rule.kind}
            record.append(entry)
            if rule.id in timed_out:
                entry["note"] = "filter timed out: counted as a match"
            if rule.final:
                ev.final, ev.entry = rule, entry
                break
            note = rule.apply(ex, ev, entry)
            if note:
                entry["note"] = note
        if ev.delay_ms:
            ex.hold()
            self.loop.call_later(ev.delay_ms / 1000, self._after_delay, ex, ev)
            return
        self._act(ex, ev)

    def _after_delay(self, ex: Exchange, ev: Evaluation) -> None:
        if ex.flow.state != "active" or ex.verdict != HOLD:
            return  # killed, or the client went away, while delayed
        if not self._act(ex, ev):
            ex.resume()  # goes on, or sends the answer the final action gave

    def _act(self, ex: Exchange, ev: Evaluation) -> bool:
        """Carry out the phase's final action (after its delays), if any: the verdict
        is acted on by the relay (in a hook) or by ``resume`` (after a hold). True
        when the exchange is now held for a decision."""
        rule = ev.final
        if rule is None or rule.kind == "allow":
            return False
        spec = rule.spec
        if rule.kind == "block":
            if spec.close:
                ex.kill(f"blocked by rule {rule.id}")
            else:
                ex.respond(spec.status, [_TEXT], spec.body.encode("utf-8"))
        elif rule.kind == "respond":
            ex.respond(spec.status, _pairs(spec.headers), spec.body.encode("utf-8"))
        elif rule.kind == "intercept":
            assert ev.entry is not None
            if ex.flow.replay_of is not None:  # a person already saw it (mitmproxy's rule)
                ev.entry["note"] = "not held: a replay"
                return False
            self.intercepts.hold(ex, rule.id, ev.phase, spec, ev.entry)
            return ex.verdict == HOLD
        return False


class RulesWithResponse(Rules):
    """``Rules`` for a policy with response-phase rules (only then is the hook there)."""

    def response_head(self, ex: Exchange) -> None:
        if ex.flow.policy is None:  # the policy arrived after this request was seen
            ex.flow.policy = self.stamp
        policy = self.policy
        if not ex.verdict:
            self._phase(ex, policy.response, policy.response_screen, "response")


def build(policy: CompiledPolicy, replica: str, intercepts: Intercepts) -> Rules | None:
    """The addon for ``policy``, or None when no rule is enabled (it costs nothing)."""
    if policy.empty:
        return None
    kind = RulesWithResponse if policy.response else Rules
    return kind(policy, replica, intercepts)
