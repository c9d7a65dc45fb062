"""Embedded explicit Runge-Kutta pairs for ``idode.solvers``: Butcher tableaus as data.

Every pair here is FSAL (first same as last): its last stage is evaluated at (t + h, y1), so an
accepted step hands that evaluation to the next one, and a step costs ``stages - 1`` evaluations.
``order`` is the order of the propagated solution; the step-size controller uses the exponent
1 / (embedded order + 1).

=========  ========================================================  ======  ====  ===========
name       pair                                                      stages  cost  orders
=========  ========================================================  ======  ====  ===========
dopri5     Dormand & Prince (1980), as torchode / scipy RK45          7       6     5(4)
tsit5      Tsitouras (2011), Comput. Math. Appl. 62, 770-775          7       6     5(4)
bs3        Bogacki & Shampine (1989), Appl. Math. Lett. 2, 321-325    4       3     3(2)
vern6      Verner's "most efficient" 6(5) pair (2010, his web page)  9       8     6(5)
=========  ========================================================  ======  ====  ===========

Caution: vern6 has nodes 0.9725, 0.9995 and 1 close together and large cancelling weights
(sum |b| = 354, sum |e| = 207, against 1.6 and 0.11 for dopri5; tsit5: 7.6 and 1.2), so noise
in f (a float32 network: ~1e-6 relative) reaches its solution and error estimate amplified a
hundredfold; use it with a float64 network (benchmarks/results/work_precision_digits_*).

The coefficients are the published ones (rationals where the authors give rationals); the
tests check every pair's order of convergence and its error estimate's order on problems with
an exact answer, which catches a wrong digit.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction as F
from typing import Literal, get_args

__all__ = ["METHODS", "MethodName", "Pair", "get_pair"]

MethodName = Literal["dopri5", "tsit5", "bs3", "vern6"]
METHODS: tuple[str, ...] = get_args(MethodName)


@dataclass(frozen=True)
class Pair:
    """An FSAL embedded pair: c [s], a (rows 1..s-1 of the strictly lower triangle), b, e."""

    name: str
    order: int  # order of the propagated solution (b)
    error_order: int  # order of the embedded solution (b - e)
    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]  # a[i] has i entries (a[0] is empty)
    b: tuple[float, ...]  # s weights of the propagated solution; b = a[s - 1] + (0,)
    e: tuple[float, ...]  # s weights of the error estimate: b - b_embedded

    @property
    def stages(self) -> int:
        return len(self.c)

    @property
    def evaluations_per_step(self) -> int:
        """New evaluations of f per attempted step (the first stage is the previous last)."""
        return self.stages - 1


def _f(*xs) -> tuple[float, ...]:
    return tuple(float(x) for x in xs)


_DOPRI5 = Pair(
    "dopri5",
    5,
    4,
    _f(0, F(1, 5), F(3, 10), F(4, 5), F(8, 9), 1, 1),
    (
        (),
        _f(F(1, 5)),
        _f(F(3, 40), F(9, 40)),
        _f(F(44, 45), F(-56, 15), F(32, 9)),
        _f(F(19372, 6561), F(-25360, 2187), F(64448, 6561), F(-212, 729)),
        _f(F(9017, 3168), F(-355, 33), F(46732, 5247), F(49, 176), F(-5103, 18656)),
        _f(F(35, 384), 0, F(500, 1113), F(125, 192), F(-2187, 6784), F(11, 84)),
    ),
    _f(F(35, 384), 0, F(500, 1113), F(125, 192), F(-2187, 6784), F(11, 84), 0),
    _f(
        F(35, 384) - F(1951, 21600),
        0,
        F(500, 1113) - F(22642, 50085),
        F(125, 192) - F(451, 720),
        F(-2187, 6784) + F(12231, 42400),
        F(11, 84) - F(649, 6300),
        -F(1, 60),
    ),
)

# Tsitouras 2011, Table 1: a_ij for j >= 2; the first column is c_i minus the rest of the row, as
# he defines it
_TS_A = (
    (),
    (),
    (0.335480655492357,),
    (-6.359448489975075, 4.362295432869581),
    (-11.74888356406283, 7.495539342889836, -0.09249506636175525),
    (-12.92096931784711, 8.159367898576159, -0.071584973281401, -0.02826905039406838),
    (0.01, 0.4798896504144996, 1.379008574103742, -3.290069515436081, 2.324710524099774),
)
_TS_C = (0.0, 0.161, 0.327, 0.9, 0.9800255409045097, 1.0, 1.0)
_TS_ROWS = ((),) + tuple((c - sum(r), *r) for c, r in zip(_TS_C[1:], _TS_A[1:], strict=True))
_TSIT5 = Pair(
    "tsit5",
    5,
    4,
    _TS_C,
    _TS_ROWS,
    (*_TS_ROWS[6], 0.0),
    (
        -0.00178001105222577714,
        -0.0008164344596567469,
        0.007880878010261995,
        -0.1447110071732629,
        0.5823571654525552,
        -0.45808210592918697,
        1 / 66,
    ),
)

_BS3 = Pair(
    "bs3",
    3,
    2,
    _f(0, F(1, 2), F(3, 4), 1),
    ((), _f(F(1, 2)), _f(0, F(3, 4)), _f(F(2, 9), F(1, 3), F(4, 9))),
    _f(F(2, 9), F(1, 3), F(4, 9), 0),
    _f(F(2, 9) - F(7, 24), F(1, 3) - F(1, 4), F(4, 9) - F(1, 3), -F(1, 8)),
)

# Verner, "A 'most efficient' Runge-Kutta (13:)6(5) pair" (coefficients from his web page,
# people.math.sfu.ca/~jverner): 9 stages, the last at c = 1 with a = b (FSAL)
_V6_B = (
    F(382735282417, 11129397249634),
    0,
    0,
    F(5535620703125000, 21434089949505429),
    F(13867056347656250, 32943296570459319),
    F(626271188750, 142160006043),
    F(-51160788125000, 289890548217),
    F(163193540017, 946795234),
)
_V6_A = (
    (),
    (F(3, 50),),
    (F(519479, 27000000), F(2070721, 27000000)),
    (F(1439, 40000), 0, F(4317, 40000)),
    (
        F(109225017611, 82828840000),
        0,
        F(-417627820623, 82828840000),
        F(43699198143, 10353605000),
    ),
    (
        F(-8036815292643907349452552172369, 191934985946683241245914401600),
        0,
        F(246134619571490020064824665, 1543816496655405117602368),
        F(-13880495956885686234074067279, 113663489566254201783474344),
        F(755005057777788994734129, 136485922925633667082436),
    ),
    (
        F(-1663299841566102097180506666498880934230261, 30558424506156170307020957791311384232000),
        0,
        F(130838124195285491799043628811093033, 631862949514135618861563657970240),
        F(-3287100453856023634160618787153901962873, 20724314915376755629135711026851409200),
        F(2771826790140332140865242520369241, 396438716042723436917079980147600),
        F(-1799166916139193, 96743806114007800),
    ),
    (
        F(-832144750039369683895428386437986853923637763,
          15222974550069600748763651844667619945204887),
        0,
        F(818622075710363565982285196611368750, 3936576237903728151856072395343129),
        F(-9818985165491658464841194581385463434793741875,
          61642597962658994069869370923196463581866011),
        F(31796692141848558720425711042548134769375, 4530254033500045975557858016006308628092),
        F(-14064542118843830075, 766928748264306853644),
        F(-1424670304836288125, 2782839104764768088217),
    ),
    _V6_B,
)  # fmt: skip
_V6_E = (
    F(12461131651614938103148389, 1445036234394733213298413835),
    0,
    0,
    F(-21633909117387045317965953125, 1113197271463372303940319369579),
    F(21633909117387045317965953125, 760416658004702652949661077764),
    F(-6922850917563854501749105, 3281421349740748616670708),
    F(173071272939096362543727625, 1672856277382934317688463),
    F(-74791376208282344108625901, 737588957781464692067010),
    F(1, 30),
)  # fmt: skip
_VERN6 = Pair(
    "vern6",
    6,
    5,
    _f(
        0,
        F(3, 50),
        F(1439, 15000),
        F(1439, 10000),
        F(4973, 10000),
        F(389, 400),
        F(1999, 2000),
        1,
        1,
    ),  # fmt: skip
    tuple(_f(*row) for row in _V6_A),
    _f(*_V6_B, 0),
    _f(*_V6_E),
)

_PAIRS = {p.name: p for p in (_DOPRI5, _TSIT5, _BS3, _VERN6)}


def get_pair(name: str) -> Pair:
    """The named pair; ValueError listing the valid names otherwise."""
    if name not in _PAIRS:
        raise ValueError(f"unknown method {name!r}; valid: {', '.join(METHODS)}")
    return _PAIRS[name]
