"""What the Python driver programs share: the typed-result query and the values it must
decode to, the fan-out queries, exact row comparison, the fan-out counter, and the loop
that runs a driver's checks on the TLS, plain and direct targets (tests/clients/README.md).
"""

import datetime as dt
import inspect
import json
import os
import re
import sys
import time
import urllib.request
import uuid
from decimal import Decimal

AGG = "SELECT grp, count(*), sum(amount), min(label), max(created) FROM client_facts GROUP BY grp ORDER BY grp"
SCAN = "SELECT id, amount, label FROM client_facts WHERE qty < 5"

TYPES = """SELECT true, 32767::int2, 2147483647::int4, 9223372036854775807::int8,
  12345.678::numeric(10,3), 1.5::float4, 2.25::float8, 'text'::text, 'varchar'::varchar(10),
  '\\x00ff'::bytea, '2024-02-29'::date, '13:14:15.5'::time,
  '2024-02-29 13:14:15.123456'::timestamp, '2024-02-29 13:14:15.123456+02'::timestamptz,
  '1 day 02:03:04'::interval, 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid,
  '{"a": [1, 2]}'::json, '{"b": null}'::jsonb, ARRAY[1, 2, NULL]::int[],
  ARRAY['x', 'y z']::text[], NULL::int"""
TYPES_WANT = (
    True, 32767, 2147483647, 9223372036854775807, Decimal("12345.678"), 1.5, 2.25, "text",
    "varchar", b"\x00\xff", dt.date(2024, 2, 29), dt.time(13, 14, 15, 500000),
    dt.datetime(2024, 2, 29, 13, 14, 15, 123456),
    dt.datetime(2024, 2, 29, 13, 14, 15, 123456, tzinfo=dt.timezone(dt.timedelta(hours=2))),
    dt.timedelta(days=1, hours=2, minutes=3, seconds=4),
    uuid.UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"), {"a": [1, 2]}, {"b": None}, [1, 2, None],
    ["x", "y z"], None,
)


class Fail(Exception):
    pass


def ok(what):
    print(f"    ok  {what}", flush=True)


def check(what, got, want):
    if got != want:
        raise Fail(f"{what}: got {got!r}, want {want!r}")
    ok(what)


def exact(v):
    """A value as type name and text, so 1.50 != 1.5 and int != Decimal."""
    if isinstance(v, (memoryview, bytearray)):
        v = bytes(v)
    return (type(v).__name__, json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else str(v))


def same_rows(what, got, want):
    got = [tuple(exact(v) for v in r) for r in got]
    want = [tuple(exact(v) for v in r) for r in want]
    if len(got) != len(want):
        raise Fail(f"{what}: {len(got)} rows, want {len(want)} (first: {got[:1]} vs {want[:1]})")
    for i, (g, w) in enumerate(zip(got, want)):
        if g != w:
            raise Fail(f"{what}: row {i} is {g}, want {w}")
    ok(f"{what} ({len(got)} rows equal to direct)")


def fanout_count():
    """pgfan_queries_total{route="fanout"} once it is steady: pgfan counts a statement just
    after its answer went out, so a read right after the answer can miss it."""
    def read():
        with urllib.request.urlopen(os.environ["PGFAN_CLIENT_METRICS_URL"], timeout=10) as r:
            m = re.search(r'^pgfan_queries_total\{route="fanout"\} (\d+)', r.read().decode(), re.M)
        return int(m.group(1)) if m else 0

    n = read()
    for _ in range(50):
        time.sleep(0.1)
        if n == (n := read()):
            return n
    raise Fail("pgfan_queries_total kept changing for 5 s")


def targets():
    """(name, url, through pgfan) of the three targets every program checks."""
    env = os.environ
    return [
        ("tls", env["PGFAN_CLIENT_TLS_URL"], True),
        ("plain", env["PGFAN_CLIENT_PLAIN_URL"], True),
        ("direct", env["PGFAN_CLIENT_DIRECT_URL"], False),
    ]


async def run_checks(driver, checks, make_target, close_target):
    """Runs `checks` (method names of the object `make_target(name, url, via_pgfan)`
    returns) on every target, printing each; exits non-zero at the first failure. Methods
    and `close_target` may be plain functions or coroutines."""
    async def call(f, *args):
        r = f(*args)
        return await r if inspect.isawaitable(r) else r

    for name, url, via_pgfan in targets():
        print(f"== {name}: {re.sub(r':[^:@/]*@', ':***@', url)}", flush=True)
        t = await call(make_target, name, url, via_pgfan)
        for c in checks:
            print(f"  {c}", flush=True)
            try:
                await call(getattr(t, c))
            except Fail as e:
                sys.exit(f"FAIL [{name}] {c}: {e}")
            except Exception as e:
                sys.exit(f"FAIL [{name}] {c}: {type(e).__name__}: {e}")
        await call(close_target, t)
    print(f"{driver}: all checks passed on tls, plain and direct")
