"""The affiliation rule (POLICY.md, arts. 8, 9), pure: table-driven cases, a brute-force oracle on random
graphs, every path checked relation by relation, and graphs brought forward by changes compared with graphs
built afresh."""

from __future__ import annotations

import random
import re
from dataclasses import astuple, dataclass
from datetime import date, timedelta
from decimal import Decimal

import pytest

from vouchers.affiliation_graph import Affiliation, AffiliationGraph, Relation, RelationTable, Thresholds

DEFAULT = Thresholds(control_pct=Decimal("50"), influence_pct=Decimal("20"))
DAY = date(2026, 6, 1)
_counter = iter(range(10**9))


def rel(
    frm: str,
    to: str,
    what: str,
    valid_from: date = date(2020, 1, 1),
    valid_to: date | None = None,
) -> Relation:
    """`what` is "control", "personnel" or an equity percentage."""
    n = next(_counter)
    if what in ("control", "personnel"):
        return Relation(f"r{n:05d}", frm, to, what, None, valid_from, valid_to)  # type: ignore[arg-type]
    return Relation(f"r{n:05d}", frm, to, "equity", Decimal(what), valid_from, valid_to)


def chain(prefix: str, top: str, depth: int, what: str = "51") -> list[Relation]:
    """top -> prefix1 -> prefix2 -> ... -> prefix<depth>."""
    names = [top, *(f"{prefix}{i}" for i in range(1, depth + 1))]
    return [rel(names[i], names[i + 1], what) for i in range(depth)]


def assert_path_proves(
    answer: Affiliation, a: str, b: str, on: date, relations: list[Relation], thresholds: Thresholds
) -> None:
    """The path is a walk from a to b over relations that exist and hold on the day, shaped as
    up* down* (link)? up* down*: a and a member x share a controller (the top of the first climb), x and y
    are one entity or linked, y and b share a controller. That is the rule's definition of affiliated."""
    recorded = {r.id: r for r in relations}
    if not answer.affiliated or a == b:
        assert answer.path == []
        return
    assert answer.path, "an affiliation names its relations"
    at = a
    moves = []
    for r in answer.path:
        assert recorded[r.id] == r, "a path names recorded relations as they are"
        assert r.holds_on(on), f"{r.id} does not hold on {on}"
        effect = thresholds.effect(r.kind, r.equity_pct)
        assert effect is not None, f"{r.id} has no effect under {thresholds}"
        assert at in (r.from_entity_id, r.to_entity_id), f"the path breaks at {at} ({r})"
        if effect == "control":
            moves.append("U" if at == r.to_entity_id else "D")
        else:
            moves.append("L")
        at = r.to_entity_id if at == r.from_entity_id else r.from_entity_id
    assert at == b, f"the path ends at {at}, not {b}"
    assert re.fullmatch("U*D*L?U*D*", "".join(moves)), f"the path does not prove affiliation: {moves}"


@dataclass(frozen=True)
class Case:
    name: str
    relations: list[Relation]
    a: str
    b: str
    expected: bool
    on: date = DAY
    thresholds: Thresholds = DEFAULT
    path_length: int | None = None


def _dated(valid_from: date, valid_to: date) -> list[Relation]:
    return [rel("R", "A", "60", valid_from, valid_to), rel("R", "B", "control", date(2000, 1, 1))]


DATED = _dated(date(2024, 1, 1), date(2024, 12, 31))

CASES = [
    Case("one entity", [], "A", "A", True, path_length=0),
    Case("strangers", [rel("A", "X", "60"), rel("B", "Y", "60")], "A", "B", False),
    Case("unknown to the graph", [rel("A", "X", "60")], "A", "Q", False),
    Case("direct control", [rel("A", "B", "50.01")], "A", "B", True, path_length=1),
    Case("50% is influence, and influence links", [rel("A", "B", "50")], "A", "B", True, path_length=1),
    Case(
        "siblings at 50.01% are one group",
        [rel("R", "A", "50.01"), rel("R", "B", "50.01")],
        "A",
        "B",
        True,
        path_length=2,
    ),
    Case("siblings at exactly 50% are not", [rel("R", "A", "50"), rel("R", "B", "50")], "A", "B", False),
    Case("19.99% is nothing", [rel("A", "B", "19.99")], "A", "B", False),
    Case("exactly 20% influences", [rel("A", "B", "20")], "A", "B", True, path_length=1),
    Case("20% held by a parent influences", [rel("R", "A", "60"), rel("R", "B", "20")], "A", "B", True, path_length=2),
    Case("19.99% held by a parent does not", [rel("R", "A", "60"), rel("R", "B", "19.99")], "A", "B", False),
    Case("influence is not transitive", [rel("A", "B", "30"), rel("B", "C", "30")], "A", "C", False),
    Case("control without equity", [rel("R", "A", "control"), rel("R", "B", "control")], "A", "B", True, path_length=2),
    Case(
        "deep chain, depth 12, and a sibling at the top",
        [*chain("C", "R", 12), rel("R", "D", "60")],
        "C12",
        "D",
        True,
        path_length=13,
    ),
    Case(
        "two deep chains meet below the top: the shared part is cut",
        [*chain("C", "R", 10), rel("C10", "E", "70"), *chain("F", "C10", 15, "control")],
        "E",
        "F15",
        True,
        path_length=16,
    ),
    Case("deep chain, depth 25, both ends", chain("C", "R", 25), "R", "C25", True, path_length=25),
    Case(
        "50% in a chain stops control; its influence still links",
        [*chain("C", "R", 5), rel("C5", "C6", "50"), rel("C6", "C7", "60")],
        "R",
        "C7",
        True,
        path_length=7,
    ),
    Case(
        "15% in a chain breaks it",
        [*chain("C", "R", 5), rel("C5", "C6", "15"), rel("C6", "C7", "60")],
        "R",
        "C7",
        False,
    ),
    Case(
        "influence between members of two groups",
        [
            *chain("X", "R1", 4),
            rel("R1", "A", "70"),
            *chain("Y", "R2", 3, "control"),
            rel("R2", "B", "90"),
            rel("X4", "Y3", "25"),
        ],
        "A",
        "B",
        True,
        path_length=1 + 4 + 1 + 3 + 1,
    ),
    Case(
        "influence pointing the other way links as well",
        [rel("R1", "A", "70"), rel("R2", "B", "90"), rel("B", "R1", "30")],
        "A",
        "B",
        True,
        path_length=2,
    ),
    Case("personnel, recorded one way", [rel("A", "B", "personnel")], "A", "B", True, path_length=1),
    Case("personnel, asked the other way", [rel("A", "B", "personnel")], "B", "A", True, path_length=1),
    Case(
        "personnel between members of two groups",
        [rel("R1", "A", "60"), rel("R2", "B", "60"), rel("R2", "R1", "personnel")],
        "A",
        "B",
        True,
        path_length=3,
    ),
    Case(
        "a member with two ultimate controllers joins their groups",
        [rel("U1", "A", "60"), rel("U2", "B", "60"), rel("U1", "J", "control"), rel("U2", "J", "control")],
        "A",
        "B",
        True,
        path_length=4,
    ),
    Case(
        "a controller's influence is not its subsidiary's",
        [rel("R", "A", "60"), rel("A", "X", "30"), rel("Q", "B", "60")],
        "X",
        "B",
        False,
    ),
    Case(
        "control in a cycle: both are ultimate",
        [rel("A", "B", "control"), rel("B", "A", "60"), rel("B", "C", "70"), rel("D", "E", "60")],
        "C",
        "A",
        True,
    ),
    Case(
        "a cycle under an outside controller",
        [rel("X", "A", "60"), rel("A", "B", "60"), rel("B", "A", "control"), rel("X", "Z", "control")],
        "B",
        "Z",
        True,
    ),
    Case("before valid_from", DATED, "A", "B", False, on=date(2023, 12, 31)),
    Case("on valid_from", DATED, "A", "B", True, on=date(2024, 1, 1), path_length=2),
    Case("on valid_to: the last day is still related", DATED, "A", "B", True, on=date(2024, 12, 31)),
    Case("after valid_to", DATED, "A", "B", False, on=date(2025, 1, 1)),
    Case(
        "an ended control leaves the influence that follows it",
        [rel("R", "A", "60", date(2020, 1, 1), date(2025, 6, 30)), rel("R", "A", "30", date(2025, 7, 1))],
        "R",
        "A",
        True,
        on=date(2025, 8, 1),
        path_length=1,
    ),
    Case(
        "thresholds are configuration: 40% controls when control is above 30%",
        [rel("R", "A", "40"), rel("R", "B", "40")],
        "A",
        "B",
        True,
        thresholds=Thresholds(Decimal("30"), Decimal("10")),
    ),
    Case(
        "thresholds are configuration: 25% no longer influences at 30%",
        [rel("A", "B", "25")],
        "A",
        "B",
        False,
        thresholds=Thresholds(Decimal("50"), Decimal("30")),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
@pytest.mark.parametrize("probe_budget", [0, 10_000], ids=["summarise-a", "probe"])
def test_rule(case: Case, probe_budget: int) -> None:
    graph = AffiliationGraph.of(case.relations, case.thresholds)
    graph_probe = AffiliationGraph(graph.table, case.thresholds, probe_budget=probe_budget)
    for g in (graph, graph_probe):
        for a, b in ((case.a, case.b), (case.b, case.a)):
            answer = g.check(a, b, case.on)
            assert answer.affiliated is case.expected, (a, b)
            assert_path_proves(answer, a, b, case.on, case.relations, case.thresholds)
            if case.path_length is not None and case.expected:
                assert len(answer.path) == case.path_length, answer.path


def test_an_ended_relation_stays_related_through_its_last_day() -> None:
    relations = [rel("A", "B", "personnel", date(2025, 1, 1), date(2025, 3, 31))]
    graph = AffiliationGraph.of(relations, DEFAULT)
    days = {d: graph.check("A", "B", d).affiliated for d in (date(2025, 3, 31), date(2025, 4, 1))}
    assert days == {date(2025, 3, 31): True, date(2025, 4, 1): False}


def test_common_controller_is_named_with_the_branching_point() -> None:
    relations = [*chain("C", "R", 3), rel("C3", "A", "80"), rel("C3", "B", "control")]
    answer = AffiliationGraph.of(relations, DEFAULT).check("A", "B", DAY)
    assert [(r.from_entity_id, r.to_entity_id) for r in answer.path] == [("C3", "A"), ("C3", "B")]
    assert answer.path[0].equity_pct == Decimal("80.00")


def test_big_groups_and_a_bridge_deep_inside() -> None:
    """Two groups of 3,000 under ultimate controllers, joined by one personnel relation between members deep
    in each: found whichever side is summarised, and cached summaries answer the same."""
    relations: list[Relation] = []
    for top in ("P", "Q"):
        relations += chain(f"{top}c", top, 20)  # a deep spine
        for i in range(3000 - 21):
            relations.append(rel(f"{top}c{1 + i % 20}", f"{top}m{i}", "control"))
    relations.append(rel("Pm2500", "Qc20", "personnel"))
    relations += [rel("S", "T", "60"), rel("T", "Pm17", "19")]  # not enough to link
    graph = AffiliationGraph.of(relations, DEFAULT)
    for _ in range(2):  # the second round answers from cached summaries
        for a, b, expected in (
            ("Pm5", "Qm7", True),
            ("Qc20", "P", True),
            ("S", "Pm17", False),
            ("Pm17", "S", False),
            ("Qm9", "Pm2500", True),
            ("Pm1", "Pc3", True),
        ):
            answer = graph.check(a, b, DAY)
            assert answer.affiliated is expected, (a, b)
            assert_path_proves(answer, a, b, DAY, relations, DEFAULT)


# --------------------------------------------------------------------------------------------------------
# A brute-force oracle: the definition, read literally, on small random graphs


def oracle(relations: list[Relation], a: str, b: str, on: date, thresholds: Thresholds) -> bool:
    if a == b:
        return True
    nodes = {a, b} | {r.from_entity_id for r in relations} | {r.to_entity_id for r in relations}
    controls: dict[str, set[str]] = {n: set() for n in nodes}
    links: set[frozenset[str]] = set()
    for r in relations:
        if not r.holds_on(on):
            continue
        effect = thresholds.effect(r.kind, r.equity_pct)
        if effect == "control":
            controls[r.from_entity_id].add(r.to_entity_id)
        elif effect is not None:
            links.add(frozenset((r.from_entity_id, r.to_entity_id)))

    def below(n: str) -> set[str]:  # n and everything it controls, transitively
        seen, stack = {n}, [n]
        while stack:
            for m in controls[stack.pop()]:
                if m not in seen:
                    seen.add(m)
                    stack.append(m)
        return seen

    desc = {n: below(n) for n in nodes}
    anc = {n: {m for m in nodes if n in desc[m]} for n in nodes}
    # ultimate: every entity above it is also below it (nobody outside its cycle controls it)
    ultimate = {n: {u for u in anc[n] if anc[u] <= desc[u]} for n in nodes}
    group = {n: {m for m in nodes if ultimate[m] & ultimate[n]} for n in nodes}
    if group[a] & group[b]:
        return True
    return any(
        (x in group[a] and y in group[b]) or (x in group[b] and y in group[a])
        for x, y in (tuple(link) for link in links)
    )


def random_relations(rng: random.Random, size: int) -> list[Relation]:
    names = [f"E{i}" for i in range(size)]
    relations = []
    for _ in range(rng.randrange(0, size * 2)):
        frm, to = rng.sample(names, 2)
        what = rng.choice(["control", "personnel", "60", "50", "50.01", "20", "19.99", "35", "100", "5"])
        start = date(2025, 1, 1) + timedelta(days=rng.randrange(0, 10))
        end = None if rng.random() < 0.5 else start + timedelta(days=rng.randrange(0, 10))
        relations.append(rel(frm, to, what, start, end))
    return relations


@pytest.mark.parametrize("seed", range(300))
def test_agrees_with_the_definition(seed: int) -> None:
    rng = random.Random(seed)
    relations = random_relations(rng, rng.randrange(2, 14))
    thresholds = DEFAULT if seed % 3 else Thresholds(Decimal("34.5"), Decimal("19.99"))
    table = AffiliationGraph.of(relations, thresholds).table
    graphs = [  # summaries of the smaller side; members compared (no side is small); a mix, and no cache
        AffiliationGraph(table, thresholds),
        AffiliationGraph(table, thresholds, probe_budget=0),
        AffiliationGraph(table, thresholds, probe_budget=3, summary_cache_size=0),
    ]
    names = sorted({r.from_entity_id for r in relations} | {r.to_entity_id for r in relations} | {"E0", "E1"})
    for _ in range(30):
        a, b = rng.choice(names), rng.choice(names)
        on = date(2025, 1, 1) + timedelta(days=rng.randrange(0, 20))
        expected = oracle(relations, a, b, on, thresholds)
        for graph in graphs:
            answer = graph.check(a, b, on)
            assert answer.affiliated is expected, (a, b, on, relations)
            assert_path_proves(answer, a, b, on, relations, thresholds)


# --------------------------------------------------------------------------------------------------------
# Changes applied to a graph: it answers exactly as one built afresh


def _row(r: Relation) -> tuple[str, str, str, str, int | None, int, int | None]:
    pct = None if r.equity_pct is None else int(r.equity_pct * 100)
    valid_to = None if r.valid_to is None else r.valid_to.toordinal()
    return r.id, r.from_entity_id, r.to_entity_id, r.kind, pct, r.valid_from.toordinal(), valid_to


def _built(relations: dict[str, Relation], thresholds: Thresholds) -> AffiliationGraph:
    """The graph as the service loads it: ordered by id."""
    return AffiliationGraph(RelationTable.of(sorted(relations.values(), key=lambda r: r.id)), thresholds)


def _applied(graph: AffiliationGraph, changes: list[Relation]) -> None:
    graph.apply(graph.table.apply(_row(r) for r in changes))


def _changes(rng: random.Random, relations: dict[str, Relation], names: list[str]) -> list[Relation]:
    """A few relations recorded (some with an end, some not started yet) and open ones ended, as the service
    reads them: each changed relation once, in its latest state. Ids are random, so a new relation lands
    anywhere in id order."""
    changed: dict[str, Relation] = {}
    for _ in range(rng.randrange(1, 4)):
        frm, to = rng.sample(names, 2)
        what = rng.choice(["control", "personnel", "60", "50", "20", "19.99", "35"])
        start = date(2025, 1, 1) + timedelta(days=rng.randrange(0, 40))
        end = None if rng.random() < 0.7 else start + timedelta(days=rng.randrange(0, 20))
        id = f"r{rng.getrandbits(40):010x}"
        changed[id] = Relation(id, *astuple(rel(frm, to, what, start, end))[1:])
    open_ = [r for r in [*relations.values(), *changed.values()] if r.valid_to is None]
    for r in rng.sample(open_, min(len(open_), rng.randrange(0, 3))):
        changed[r.id] = Relation(*astuple(r)[:6], r.valid_from + timedelta(days=rng.randrange(0, 30)))
    return list(changed.values())


@pytest.mark.parametrize("seed", range(40))
def test_a_graph_with_changes_applied_answers_as_one_built_afresh(seed: int) -> None:
    rng = random.Random(seed)
    thresholds = Thresholds(Decimal("50"), Decimal("20"), lookback_months=rng.choice([0, 1]))
    names = [f"E{i}" for i in range(rng.randrange(4, 12))]
    relations: dict[str, Relation] = {}
    graph = _built(relations, thresholds)
    for _ in range(6):
        questions = [
            (*rng.sample(names, 2), date(2025, 1, 1) + timedelta(days=rng.randrange(0, 70))) for _ in range(12)
        ]
        for a, b, on in questions:  # the caches fill, and must not outlive what a change affects
            graph.check(a, b, on)
        changes = _changes(rng, relations, names)
        _applied(graph, changes)
        relations |= {r.id: r for r in changes}
        built = _built(relations, thresholds)
        for a, b, on in questions:
            assert graph.check(a, b, on) == built.check(a, b, on), (a, b, on, changes)


def test_a_change_below_influence_keeps_the_caches_and_an_end_drops_them() -> None:
    r_a, r_b = rel("R", "A", "60"), rel("R", "B", "control")
    graph = AffiliationGraph.of([r_a, r_b], DEFAULT)
    assert graph.check("A", "B", DAY).affiliated
    _applied(graph, [rel("A", "C", "5")])
    assert graph._answers
    ended = Relation(*astuple(r_b)[:6], DAY - timedelta(days=1))
    _applied(graph, [ended])
    assert not graph.check("A", "B", DAY).affiliated
    assert graph.check("A", "B", DAY - timedelta(days=1)).path == [r_a, ended]
