"""Affiliated parties (关联方, POLICY.md; arts. 8, 9), pure: a graph over an in-memory list of relations.
No I/O, no clock: `vouchers/affiliations.py` loads the relations, caches the graph and answers requests.

The rule, on a date d (a relation holds on d when valid_from <= d <= valid_to; valid_to is inclusive, the
last day of a relation is still a related day, and an open relation has no end):
- X *controls* Y: equity strictly above `control_pct`, or a `control` relation; control is transitive.
- X *influences* Y: equity at or above `influence_pct` and not above `control_pct`.
- `personnel` is undirected; influence counts in either direction too ("links").
- UC(X), the ultimate controllers of X: the entities with a chain of control to X (X included) that nobody
  outside their own control cycle controls. An entity with no controller is its own ultimate controller;
  an entity may have several (two control agreements), and members of a control cycle that nobody else
  controls are all ultimate.
- group(X) = every entity sharing an ultimate controller with X = the union over u in UC(X) of desc*(u),
  everything u controls, u included.
- A and B are affiliated on d if A = B; or group(A) and group(B) share a member; or an influence or
  personnel relation links a member of group(A) with a member of group(B).
- Look-back (POLICY.md; `Thresholds.lookback_months`, the service's default 12): A and B are affiliated on d
  if they were on any day from `months_before(d, lookback_months)` to d, both included, by the relations
  that held on that one day (a chain A-B in January and B-C in June never held at one time). The rule is
  monotone in the set of relations (a new controller's group contains its controlled entity's group, a new
  link only adds), so the relations of a whole span taken together over-approximate every day in it: one
  check over the window answers "no" for unrelated parties, and a "yes" is narrowed down to a single day
  among the last days of relations in the window (between two such days only relations start, so each
  stretch is dominated by its last day), halving spans, the later half first. The answer names the latest
  day it held and the relations that held on it.

The algorithm (100,000 entities, 300,000 relations, groups of thousands, p99 well under 20 ms):
1. UC(A) and UC(B) by a backward walk over A's and B's controllers. Chains of control are short compared
   with groups (depth 20 is a deep holding structure), so this touches tens of nodes, never a group.
2. UC(A) ∩ UC(B) ≠ ∅: affiliated, under a common controller. This settles every pair inside one group, big
   or small, without enumerating it.
3. Otherwise a group member or a link has to bridge the two groups. If one side's groups are small (at
   most a few hundred members, found by a walk down from its ultimate controllers that stops at that
   budget), that side is summarised: every relation that leaves the group (a link to a non-member, or a
   control relation from a non-member into a member) is followed to the ultimate controllers of the entity
   at its other end, and `reach` maps each such foreign ultimate controller to one witness (member,
   relation, outsider). The pair is affiliated iff some u' in the other side's UC is in `reach`. Complete:
   a member shared by both groups is reached from u' by a chain of control that enters the group through
   a control relation from a non-member, whose ultimate controllers include u'; a link between the groups
   leaves group(A) unless both its ends are in group(A), and then that end is a shared member. The big
   side is never enumerated.
4. When both sides are big, both member sets are listed (a walk down each tree, no ultimate controllers
   of outsiders needed), a shared member is looked up in the bigger set, and then the links of the smaller
   side's members are scanned for an end in the bigger set: linear in the groups' size, a few
   milliseconds for groups of thousands.
5. The member trees (and the summaries of small groups) depend only on (u, d), so they are cached (LRU)
   for the life of the graph: a big provider group checked again and again on one date is walked once.

Paths: the answer names the chain of relations that makes the parties affiliated, as a walk from A to B
in which consecutive relations share an entity (each relation keeps its recorded direction). A common
controller is preferred to a bridge; among common controllers, the one with the shortest chains (then the
first found). Control chains are shortest chains (breadth-first), with the shared upper part of two chains
cut off, so a path never climbs above the node where A's and B's chains meet. A bridge's witness is the
first found breadth-first from the group's ultimate controller, so its member is near the top; with two
big groups, a shared member is preferred to a link. Ties follow the relations' ids, so answers are
deterministic, and the same whether a graph was built at once or had changes applied.

Changes: relations are events with dates (one is recorded, or an open one ended), so a later state of the
relations is this one plus a few changed rows. `RelationTable.apply` and then `AffiliationGraph.apply` take
them in place, in microseconds a change where a build takes seconds at the scale above. In place, because
copying the table's and the graph's top-level dicts and lists, and freeing the old ones, cost 35 to 90 ms
at that scale (on a loaded machine), more than the target for the whole first check after a change (50 ms);
the caller makes sure nothing reads the table or the graph meanwhile.
"""

from __future__ import annotations

import calendar
import math
from array import array
from bisect import bisect_left, bisect_right, insort
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from typing import Any, Literal

__all__ = [
    "Affiliation",
    "AffiliationGraph",
    "Effect",
    "Kind",
    "Relation",
    "RelationTable",
    "Thresholds",
    "months_before",
]

Kind = Literal["equity", "control", "personnel"]
Effect = Literal["control", "influence", "personnel"]
KINDS: tuple[Kind, ...] = ("equity", "control", "personnel")
_KIND_CODE: dict[str, int] = {kind: code for code, kind in enumerate(KINDS)}
_EQUITY, _CONTROL, _PERSONNEL = 0, 1, 2
_NO_PCT = -1
# an open relation (valid_to NULL) holds on every date after it starts
_OPEN_END = date.max.toordinal()

# Member trees kept per graph, keyed by (ultimate controller, first and last day of the span); a group of
# thousands holds ~100 KB.
SUMMARY_CACHE_SIZE = 4096
# Answers kept per graph, keyed by (a, b, day): a redemption asks about its holder and provider on today's
# date, the same pairs again and again; the graph never changes, so an answer holds for the graph's life.
ANSWER_CACHE_SIZE = 65_536
# A side with at most this many members is summarised (its outsiders' controllers looked up).
PROBE_BUDGET = 256

# (other end, first day, last day, relation index); days are proleptic ordinals, as date.toordinal()
_Adj = tuple[int, int, int, int]
# a relation as `RelationTable.add` takes it: id, from and to entity ids, kind, hundredths of a percent or
# None, first day, last day or None
_Row = tuple[str, str, str, str, int | None, int, int | None]
# what a relation does under a graph's thresholds
_CONTROLS, _LINKS = 0, 1


@dataclass(frozen=True, slots=True)
class Thresholds:
    """POLICY.md: control is equity strictly above `control_pct`; influence is equity at or above
    `influence_pct` and not above `control_pct`; parties affiliated on any day of the `lookback_months`
    before a date are affiliated on it (0: on the day only). Configuration, not constants (Settings)."""

    control_pct: Decimal
    influence_pct: Decimal
    lookback_months: int = 0

    def __post_init__(self) -> None:
        assert self.lookback_months >= 0

    def effect(self, kind: Kind, equity_pct: Decimal | None) -> Effect | None:
        """What a relation does under these thresholds; None for equity below influence."""
        if kind == "control":
            return "control"
        if kind == "personnel":
            return "personnel"
        assert equity_pct is not None
        if equity_pct > self.control_pct:
            return "control"
        if equity_pct >= self.influence_pct:
            return "influence"
        return None


@dataclass(frozen=True, slots=True)
class Relation:
    """A recorded relation: equity (holder -> investee), control (controller -> controlled) or personnel."""

    id: str
    from_entity_id: str
    to_entity_id: str
    kind: Kind
    equity_pct: Decimal | None
    valid_from: date
    valid_to: date | None = None

    def holds_on(self, on: date) -> bool:
        return self.valid_from <= on and (self.valid_to is None or on <= self.valid_to)


@dataclass(frozen=True, slots=True)
class Affiliation:
    """The answer: whether the parties are affiliated, and the relations that make them so, as a walk from
    the first party to the second (empty when they are one entity or not affiliated)."""

    affiliated: bool
    path: list[Relation]
    held_on: date | None = None  # the day every relation of `path` held (None when not affiliated)


class RelationTable:
    """Relations stored column by column, with entity ids interned to small integers: 300,000 relations
    cost arrays of machine integers, not 300,000 objects. Shared by the graphs of every threshold set.

    Filled by `add`; `apply` brings it to a later state of the relations in place, and then the graphs over
    it (`AffiliationGraph.apply`), before anything reads them again. A relation is found by its id
    (`position`): by bisection among the leading rows, which are in id order when the table is loaded
    ordered by id, and in a small dict for the rows after them."""

    def __init__(self) -> None:
        self.index: dict[str, int] = {}
        self.entity_ids: list[str] = []
        self.ids: list[str] = []
        self.from_node = array("i")
        self.to_node = array("i")
        self.kind = array("b")
        self.pct_hundredths = array("i")  # _NO_PCT when absent
        self.first_day = array("i")
        self.last_day = array("i")  # _OPEN_END when open
        self.ordered = 0  # the leading rows in increasing id order
        self.late: dict[str, int] = {}  # the position of each row after them

    def __len__(self) -> int:
        return len(self.ids)

    def node(self, entity_id: str) -> int:
        found = self.index.get(entity_id)
        if found is None:
            found = self.index[entity_id] = len(self.entity_ids)
            self.entity_ids.append(entity_id)
        return found

    def add(
        self,
        id: str,
        from_entity_id: str,
        to_entity_id: str,
        kind: str,
        pct_hundredths: int | None,
        first_day: int,
        last_day: int | None,
    ) -> None:
        """One relation; days are proleptic ordinals (`date.toordinal()`), `last_day` None when open."""
        code = _KIND_CODE[kind]
        assert from_entity_id != to_entity_id, id
        assert (code == _EQUITY) == (pct_hundredths is not None), id
        assert pct_hundredths is None or 0 < pct_hundredths <= 10_000, id
        assert last_day is None or last_day >= first_day, id
        count = len(self.ids)
        if self.ordered == count and (count == 0 or self.ids[-1] < id):
            self.ordered += 1
        else:
            assert self.position(id) is None, f"{id} twice"
            self.late[id] = count
        self.ids.append(id)
        self.from_node.append(self.node(from_entity_id))
        self.to_node.append(self.node(to_entity_id))
        self.kind.append(code)
        self.pct_hundredths.append(_NO_PCT if pct_hundredths is None else pct_hundredths)
        self.first_day.append(first_day)
        self.last_day.append(_OPEN_END if last_day is None else last_day)

    def position(self, id: str) -> int | None:
        at = bisect_left(self.ids, id, 0, self.ordered)
        if at < self.ordered and self.ids[at] == id:
            return at
        return self.late.get(id)

    def apply(self, rows: Iterable[_Row]) -> list[int]:
        """Apply `rows`, the relations changed since this table's state, each once in its latest state, and
        return their positions. A row with a new id is added; a row with a known id is that relation ended,
        the one change a relation takes (migration 0004), so only its last day may differ."""
        positions = []
        for row in rows:
            id, from_entity_id, to_entity_id, _kind, _pct, first_day, last_day = row
            at = self.position(id)
            if at is None:
                positions.append(len(self))
                self.add(*row)
                continue
            last = _OPEN_END if last_day is None else last_day
            assert self.last_day[at] in (_OPEN_END, last), f"{id}: an end is final"
            assert (self.entity_ids[self.from_node[at]], self.entity_ids[self.to_node[at]], self.first_day[at]) == (
                from_entity_id,
                to_entity_id,
                first_day,
            ), id
            assert last >= first_day, id
            self.last_day[at] = last
            positions.append(at)
        return positions

    @classmethod
    def of(cls, relations: Iterable[Relation]) -> RelationTable:
        table = cls()
        for r in relations:
            pct = None
            if r.equity_pct is not None:
                hundredths = r.equity_pct * 100
                assert hundredths == hundredths.to_integral_value(), f"{r.id}: at most two decimals"
                pct = int(hundredths)
            table.add(
                r.id,
                r.from_entity_id,
                r.to_entity_id,
                r.kind,
                pct,
                r.valid_from.toordinal(),
                None if r.valid_to is None else r.valid_to.toordinal(),
            )
        return table

    def relation(self, index: int) -> Relation:
        pct = self.pct_hundredths[index]
        last = self.last_day[index]
        return Relation(
            id=self.ids[index],
            from_entity_id=self.entity_ids[self.from_node[index]],
            to_entity_id=self.entity_ids[self.to_node[index]],
            kind=KINDS[self.kind[index]],
            equity_pct=None if pct == _NO_PCT else Decimal(pct).scaleb(-2),
            valid_from=date.fromordinal(self.first_day[index]),
            valid_to=None if last == _OPEN_END else date.fromordinal(last),
        )


@dataclass(slots=True)
class _Up:
    """The controllers above x on a day: `down[v]` is the relation from v one step towards x (-1 for x)."""

    x: int
    ucs: list[int]
    down: dict[int, int]


@dataclass(slots=True)
class _Tree:
    """desc*(u) on a day, breadth-first: `members[m]` is the relation from m's parent (-1 for u). `reach`,
    worked out for small groups only, maps each foreign ultimate controller to a witness (member, relation,
    outsider): the outsider is linked to the member, or controls it, and has that ultimate controller."""

    u: int
    members: dict[int, int]
    reach: dict[int, tuple[int, int, int]] | None = None


class AffiliationGraph:
    """The affiliation rule over a relation table under one set of thresholds. Changed only by `apply`, so
    member trees and summaries are cached until a change that has an effect. Not thread-safe: one event loop
    uses it, and applies changes between checks."""

    def __init__(
        self,
        table: RelationTable,
        thresholds: Thresholds,
        *,
        summary_cache_size: int = SUMMARY_CACHE_SIZE,
        probe_budget: int = PROBE_BUDGET,
    ) -> None:
        assert summary_cache_size >= 0 and probe_budget >= 0
        self.table = table
        self.thresholds = thresholds
        # exact integer cut-offs on hundredths of a percent: control when pct > control_pct (strictly),
        # influence when pct >= influence_pct
        self._control_floor = math.floor(thresholds.control_pct * 100)
        self._influence_ceil = math.ceil(thresholds.influence_pct * 100)
        ctrl_in: dict[int, list[_Adj]] = {}
        ctrl_out: dict[int, list[_Adj]] = {}
        link: dict[int, list[_Adj]] = {}
        # one int object per node and per day, shared by every tuple that names it: a third less memory
        nodes = list(range(len(table.entity_ids)))
        days: dict[int, int] = {}
        ordered, ids = table.ordered, table.ids
        for i, (f_raw, t_raw, first_raw, last_raw) in enumerate(
            zip(table.from_node, table.to_node, table.first_day, table.last_day, strict=True)
        ):
            effect = self._effect(i)
            if effect is None:
                continue  # equity below influence
            f, t = nodes[f_raw], nodes[t_raw]
            first, last = days.setdefault(first_raw, first_raw), days.setdefault(last_raw, last_raw)
            if i >= ordered:  # rows after the id-ordered ones go where id order puts them
                for which, node, other in _ends(effect, f, t):
                    _insert((ctrl_out, ctrl_in, link)[which].setdefault(node, []), (other, first, last, i), ids)
            elif effect == _CONTROLS:
                ctrl_out.setdefault(f, []).append((t, first, last, i))
                ctrl_in.setdefault(t, []).append((f, first, last, i))
            else:  # influence or personnel: either direction links
                link.setdefault(f, []).append((t, first, last, i))
                link.setdefault(t, []).append((f, first, last, i))
        self._ctrl_in = ctrl_in
        self._ctrl_out = ctrl_out
        self._link = link
        # the last days of the relations that have an effect, sorted: the days a look-back examines
        self._end_days = sorted(
            {last for edges in (ctrl_in, link) for adj in edges.values() for _o, _f, last, _i in adj} - {_OPEN_END}
        )
        self._trees: OrderedDict[tuple[int, int, int], _Tree] = OrderedDict()
        self._summary_cache_size = summary_cache_size
        self._answers: OrderedDict[tuple[int, int, int], Affiliation] = OrderedDict()
        self._answer_cache_size = ANSWER_CACHE_SIZE if summary_cache_size else 0
        self._probe_budget = probe_budget
        self._size = len(table)  # the table's rows this graph has taken in

    def _effect(self, i: int) -> int | None:
        """What relation i of the table does under these thresholds: _CONTROLS, _LINKS, or None."""
        kind = self.table.kind[i]
        if kind == _EQUITY:
            pct = self.table.pct_hundredths[i]
            if pct > self._control_floor:
                return _CONTROLS
            return None if pct < self._influence_ceil else _LINKS
        return _CONTROLS if kind == _CONTROL else _LINKS

    def apply(self, changed: Iterable[int]) -> list[OrderedDict[Any, Any]]:
        """Take in the relations at `changed`, new or ended, as `RelationTable.apply` returned them, so that
        this graph answers exactly as one built afresh from its table: adjacency lists keep relation id
        order, and the look-back's days gain the new last days (relations only start and end, so none is
        lost). Microseconds a change, where a build takes seconds at the scale of the module docstring.

        Member trees, summaries and answers are kept when nothing changed under these thresholds (equity
        below influence); otherwise they are dropped: a new or ended control moves the ultimate controllers
        of everything below it, and finding the entries that reaches costs more than walking the trees again.
        The caches dropped are returned for the caller to free: full, they hold millions of members, and
        freeing them at once takes 100 ms."""
        table = self.table
        edges_of = (self._ctrl_out, self._ctrl_in, self._link)
        effective = False
        for i in changed:
            effect = self._effect(i)
            if effect is None:
                continue
            first, last = table.first_day[i], table.last_day[i]
            for which, node, other in _ends(effect, table.from_node[i], table.to_node[i]):
                edges = edges_of[which].setdefault(node, [])
                if i < self._size:  # ended: the relation keeps its place
                    at = next(k for k, (_o, _f, _l, j) in enumerate(edges) if j == i)
                    effective = effective or edges[at][2] != last
                    edges[at] = (other, first, last, i)
                else:
                    _insert(edges, (other, first, last, i), table.ids)
                    effective = True
            if last != _OPEN_END and last not in self._end_days:
                insort(self._end_days, last)
        self._size = len(table)
        if not effective:
            return []
        dropped: list[OrderedDict[Any, Any]] = [self._trees, self._answers]
        self._trees, self._answers = OrderedDict(), OrderedDict()
        return dropped

    @classmethod
    def of(cls, relations: Iterable[Relation], thresholds: Thresholds) -> AffiliationGraph:
        return cls(RelationTable.of(relations), thresholds)

    # ----------------------------------------------------------------------------------------------------
    # The question

    def check(self, a: str, b: str, on: date) -> Affiliation:
        """Are `a` and `b` affiliated on `on`, or on any day of the look-back before it, and by which
        relations (a walk from a to b, every relation holding on `held_on`)? The latest such day is named."""
        if a == b:
            return Affiliation(affiliated=True, path=[], held_on=on)
        ia, ib = self.table.index.get(a), self.table.index.get(b)
        if ia is None or ib is None:  # an entity with no relation at all is a group of its own
            return Affiliation(affiliated=False, path=[])
        day = on.toordinal()
        key = (ia, ib, day)
        answer = self._answers.get(key)
        if answer is None:
            answer = self._check(ia, ib, on, day)
            if self._answer_cache_size:
                self._answers[key] = answer
                if len(self._answers) > self._answer_cache_size:
                    self._answers.popitem(last=False)
        return answer

    def _check(self, ia: int, ib: int, on: date, day: int) -> Affiliation:
        months = self.thresholds.lookback_months
        if months == 0:
            return self._answer(self._walk(ia, ib, day, day), day)
        first = months_before(on, months).toordinal()
        # The rule only gains from more relations (a new controller's group contains the old one's; a new
        # link only links), so the relations holding on ANY day of a span, taken together, are affiliated
        # whenever the parties are affiliated on one of its days. One check over the whole window settles
        # the common case, unrelated parties; a chain that never held on one day is sorted out below.
        if self._walk(ia, ib, first, day) is None:
            return Affiliation(affiliated=False, path=[])
        walk = self._walk(ia, ib, day, day)
        if walk is not None:
            return self._answer(walk, day)
        # Between two consecutive last days of relations only relations start, so each such stretch is
        # dominated by its last day: the candidates are the last days inside [first, day). Spans of them
        # are tested together, the later half first, so the latest day that held is found in a few checks.
        ends = self._end_days
        lo, hi = bisect_left(ends, first), bisect_left(ends, day)
        found = self._latest(ia, ib, ends, lo, hi, first)
        if found is None:
            return Affiliation(affiliated=False, path=[])
        return self._answer(found[1], found[0])

    def _latest(self, ia: int, ib: int, ends: list[int], lo: int, hi: int, first: int) -> tuple[int, list[int]] | None:
        """The latest candidate day in ends[lo:hi] on which a and b are affiliated, and the walk then."""
        if lo >= hi:
            return None
        if hi - lo == 1:
            walk = self._walk(ia, ib, ends[lo], ends[lo])
            return None if walk is None else (ends[lo], walk)
        start = ends[lo - 1] + 1 if lo > 0 and ends[lo - 1] >= first else first
        if self._walk(ia, ib, start, ends[hi - 1]) is None:
            return None
        mid = (lo + hi) // 2
        return self._latest(ia, ib, ends, mid, hi, first) or self._latest(ia, ib, ends, lo, mid, first)

    def _answer(self, walk: list[int] | None, day: int) -> Affiliation:
        if walk is None:
            return Affiliation(affiliated=False, path=[])
        return Affiliation(affiliated=True, path=[self.table.relation(i) for i in walk], held_on=date.fromordinal(day))

    def _walk(self, ia: int, ib: int, lo: int, hi: int) -> list[int] | None:
        """The rule over the relations holding on some day in [lo, hi] (lo == hi: on that day)."""
        up_a, up_b = self._up(ia, lo, hi), self._up(ib, lo, hi)
        walk = self._common_controller(up_a, up_b)
        if walk is None:
            walk = self._bridge(up_a, up_b, lo, hi)
        return walk

    def _common_controller(self, up_a: _Up, up_b: _Up) -> list[int] | None:
        in_b = set(up_b.ucs)
        best: list[int] | None = None
        for u in up_a.ucs:
            if u in in_b:
                walk = _join(self._chain_up(up_a, u), self._chain_up(up_b, u))
                if best is None or len(walk) < len(best):
                    best = walk
        return best

    def _bridge(self, up_a: _Up, up_b: _Up, lo: int, hi: int) -> list[int] | None:
        budget = self._probe_budget
        trees_a = self._walk_trees(up_a.ucs, lo, hi, budget)
        if trees_a is not None:
            return self._bridge_by_reach(trees_a, up_a, up_b, lo, hi)
        trees_b = self._walk_trees(up_b.ucs, lo, hi, budget)
        if trees_b is not None:
            walk = self._bridge_by_reach(trees_b, up_b, up_a, lo, hi)
            return None if walk is None else walk[::-1]
        # two big sides: compare their members, no ultimate controllers of outsiders needed
        trees_a, trees_b = self._walk_trees(up_a.ucs, lo, hi, None), self._walk_trees(up_b.ucs, lo, hi, None)
        assert trees_a is not None and trees_b is not None
        if sum(len(t.members) for t in trees_a) <= sum(len(t.members) for t in trees_b):
            return self._bridge_by_members(trees_a, trees_b, up_a, up_b, lo, hi)
        walk = self._bridge_by_members(trees_b, trees_a, up_b, up_a, lo, hi)
        return None if walk is None else walk[::-1]

    def _bridge_by_reach(self, trees: list[_Tree], up_x: _Up, up_y: _Up, lo: int, hi: int) -> list[int] | None:
        """A walk from x to y through a witness of x's (small) groups, or None."""
        for tree in trees:
            if tree.reach is None:
                tree.reach = self._reach(tree, lo, hi)
            for v in up_y.ucs:
                witness = tree.reach.get(v)
                if witness is None:
                    continue
                member, relation, outsider = witness
                to_member = _join(self._chain_up(up_x, tree.u), self._chain_down(tree, member))
                up_outsider = self._up(outsider, lo, hi)
                to_y = _join(self._chain_up(up_outsider, v), self._chain_up(up_y, v))
                return [*to_member, relation, *to_y]
        return None

    def _bridge_by_members(
        self, small: list[_Tree], large: list[_Tree], up_x: _Up, up_y: _Up, lo: int, hi: int
    ) -> list[int] | None:
        """A walk from x to y through a member of both groups, or through a link from a member of x's
        groups (the smaller side, whose members are scanned) to a member of y's; or None."""

        def walk(tree_x: _Tree, m: int, tree_y: _Tree, n: int, link: list[int]) -> list[int]:
            to_m = _join(self._chain_up(up_x, tree_x.u), self._chain_down(tree_x, m))
            from_n = _join(self._chain_down(tree_y, n), self._chain_up(up_y, tree_y.u))
            return [*to_m, *link, *from_n]

        for tree_x in small:
            for m in tree_x.members:
                for tree_y in large:
                    if m in tree_y.members:
                        return walk(tree_x, m, tree_y, m, [])
        for tree_x in small:
            for m in tree_x.members:
                for other, first, last, i in self._link.get(m, ()):
                    if first <= hi and lo <= last:
                        for tree_y in large:
                            if other in tree_y.members:
                                return walk(tree_x, m, tree_y, other, [i])
        return None

    # ----------------------------------------------------------------------------------------------------
    # Controllers above a node

    def _controllers(self, v: int, lo: int, hi: int) -> Iterator[tuple[int, int]]:
        for c, first, last, i in self._ctrl_in.get(v, ()):
            if first <= hi and lo <= last:
                yield c, i

    def _up(self, x: int, lo: int, hi: int) -> _Up:
        down: dict[int, int] = {x: -1}
        preds: dict[int, list[int]] = {}
        queue = [x]
        for v in queue:  # breadth-first: the chains are shortest
            found = preds[v] = []
            for c, i in self._controllers(v, lo, hi):
                found.append(c)
                if c not in down:
                    down[c] = i
                    queue.append(c)
        roots = [v for v in queue if not preds[v]]
        if len(roots) == len(queue) or _all_below(roots, preds, len(queue)):
            return _Up(x, roots, down)
        return _Up(x, _source_components(queue, preds), down)

    def _chain_up(self, up: _Up, u: int) -> list[int]:
        """The relations from u down to up.x, top first."""
        chain = []
        v = u
        while v != up.x:
            i = up.down[v]
            chain.append(i)
            v = self.table.to_node[i]
        return chain

    def _ucs(self, v: int, lo: int, hi: int, memo: dict[int, list[int]]) -> list[int]:
        found = memo.get(v)
        if found is None:
            if not any(first <= hi and lo <= last for _c, first, last, _i in self._ctrl_in.get(v, ())):
                found = [v]
            else:
                found = self._up(v, lo, hi).ucs
            memo[v] = found
        return found

    # ----------------------------------------------------------------------------------------------------
    # Group summaries

    def _walk_trees(self, ucs: Sequence[int], lo: int, hi: int, budget: int | None) -> list[_Tree] | None:
        """desc*(u) for each u, or None when they hold more than `budget` members together."""
        trees = []
        left = budget
        for u in ucs:
            key = (u, lo, hi)
            tree = self._trees.get(key)
            if tree is None:
                tree = self._walk_down(u, lo, hi, left)
                if tree is None:
                    return None
                self._remember(key, tree)
            else:
                self._trees.move_to_end(key)
            if left is not None:
                left -= len(tree.members)
                if left < 0:
                    return None
            trees.append(tree)
        return trees

    def _remember(self, key: tuple[int, int, int], tree: _Tree) -> None:
        if self._summary_cache_size == 0:
            return
        self._trees[key] = tree
        while len(self._trees) > self._summary_cache_size:
            self._trees.popitem(last=False)

    def _walk_down(self, u: int, lo: int, hi: int, budget: int | None) -> _Tree | None:
        members: dict[int, int] = {u: -1}
        queue = [u]
        ctrl_out = self._ctrl_out
        for v in queue:
            for t, first, last, i in ctrl_out.get(v, ()):
                if first <= hi and lo <= last and t not in members:
                    members[t] = i
                    queue.append(t)
            if budget is not None and len(members) > budget:
                return None
        return _Tree(u, members)

    def _reach(self, tree: _Tree, lo: int, hi: int) -> dict[int, tuple[int, int, int]]:
        reach: dict[int, tuple[int, int, int]] = {}
        memo: dict[int, list[int]] = {}
        members = tree.members
        for m in members:
            for edges in (self._ctrl_in.get(m, ()), self._link.get(m, ())):
                for other, first, last, i in edges:
                    if first <= hi and lo <= last and other not in members:
                        for v in self._ucs(other, lo, hi, memo):
                            if v not in reach:
                                reach[v] = (m, i, other)
        return reach

    def _chain_down(self, tree: _Tree, member: int) -> list[int]:
        """The relations from the tree's ultimate controller down to `member`, top first."""
        chain = []
        v = member
        while v != tree.u:
            i = tree.members[v]
            chain.append(i)
            v = self.table.from_node[i]
        chain.reverse()
        return chain


def _ends(effect: int, f: int, t: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Where a relation from f to t is listed: (0 for out of a controller, 1 for into the controlled, 2 for
    links; the node whose list it is; the other end). A link is listed at both ends."""
    return ((0, f, t), (1, t, f)) if effect == _CONTROLS else ((2, f, t), (2, t, f))


def _insert(edges: list[_Adj], entry: _Adj, ids: list[str]) -> None:
    """Put `entry` in `edges` in relation id order, where a table loaded ordered by id has it: the order
    ties are broken in, so a graph with changes applied names the same paths as one built afresh."""
    edges.insert(bisect_right(edges, ids[entry[3]], key=lambda e: ids[e[3]]), entry)


def _join(to_a: list[int], to_b: list[int]) -> list[int]:
    """Two chains from one controller, down to a and down to b: the walk from a up to where they part and
    down to b (the shared upper part explains nothing)."""
    shared = 0
    for i, j in zip(to_a, to_b, strict=False):
        if i != j:
            break
        shared += 1
    return [*reversed(to_a[shared:]), *to_b[shared:]]


def _all_below(roots: list[int], preds: dict[int, list[int]], count: int) -> bool:
    """Does every node lie below a root? Then there is no control cycle that nobody else controls, and
    the ultimate controllers are exactly the roots."""
    if not roots:
        return False
    succ: dict[int, list[int]] = {}
    for v, ps in preds.items():
        for p in ps:
            succ.setdefault(p, []).append(v)
    seen = set(roots)
    stack = list(roots)
    while stack:
        for w in succ.get(stack.pop(), ()):
            if w not in seen:
                seen.add(w)
                stack.append(w)
    return len(seen) == count


def _source_components(nodes: list[int], preds: dict[int, list[int]]) -> list[int]:
    """The members of the strongly connected components nobody outside controls (Kosaraju's algorithm on
    the small graph of a node's controllers): the ultimate controllers when control runs in a cycle."""
    succ: dict[int, list[int]] = {v: [] for v in nodes}
    for v, ps in preds.items():
        for p in ps:
            succ[p].append(v)
    order: list[int] = []
    seen: set[int] = set()
    for start in nodes:
        if start in seen:
            continue
        seen.add(start)
        stack = [(start, iter(succ[start]))]
        while stack:
            v, it = stack[-1]
            for w in it:
                if w not in seen:
                    seen.add(w)
                    stack.append((w, iter(succ[w])))
                    break
            else:
                stack.pop()
                order.append(v)
    component: dict[int, int] = {}
    for start in reversed(order):
        if start in component:
            continue
        component[start] = start
        stack2 = [start]
        while stack2:
            for p in preds[stack2.pop()]:
                if p not in component:
                    component[p] = start
                    stack2.append(p)
    sources = {component[v] for v in nodes} - {
        component[v] for v in nodes for p in preds[v] if component[p] != component[v]
    }
    return [v for v in nodes if component[v] in sources]


def months_before(on: date, months: int) -> date:
    """The same day `months` calendar months earlier; when that month is shorter, its last day (12 months
    before 29 February 2028 is 28 February 2027; 1 month before 31 March is the last day of February)."""
    assert months >= 0
    index = on.year * 12 + on.month - 1 - months
    year, month = divmod(index, 12)
    return date(year, month + 1, min(on.day, calendar.monthrange(year, month + 1)[1]))
