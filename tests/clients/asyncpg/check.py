"""asyncpg through pgfan (tests/clients/README.md lists the checks).

asyncpg uses the extended protocol with named statements and binary results everywhere.
Runs every check against PGFAN_CLIENT_TLS_URL (SCRAM over TLS), PGFAN_CLIENT_PLAIN_URL and
PGFAN_CLIENT_DIRECT_URL, and exits non-zero on the first failure:
  - connection: TLS in use exactly on the TLS target, a verified TLS connection to PGFAN_CLIENT_CA;
  - typed results over the common types (binary format);
  - fan-out aggregate and scan (literal and with a $1 parameter) equal to a direct connection;
    through pgfan the route is asserted by EXPLAIN FANOUT and pgfan_queries_total{route="fanout"};
  - named statements with conn.prepare(), run many times, equal to direct, seen in
    pg_prepared_statements;
  - executemany (a pipelined batch of Bind/Execute) into a temporary table;
  - conn.cursor(query, prefetch=N) in a transaction (Execute with max_rows, PortalSuspended) and
    cursor.fetch(n)/forward(n): count and sum equal to direct;
  - COPY in with copy_records_to_table, COPY out with copy_from_query / copy_from_table;
  - a transaction that writes client_facts, sees its write in a fan-out candidate, rolls back;
  - SELECT 1/0 raises DivisionByZeroError with sqlstate 22012 and the connection stays usable.
"""

import asyncio
import datetime as dt
import io
import json
import os
import ssl
import sys
from decimal import Decimal

import asyncpg

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
from pgfan_check import (  # noqa: E402 (the shared module sits beside the drivers)
    AGG, check, Fail, fanout_count, run_checks, same_rows, SCAN, TYPES, TYPES_WANT,
)


AGG_P = (
    "SELECT grp, count(*), sum(amount), min(label), max(created) FROM client_facts"
    " WHERE grp >= $1 GROUP BY grp ORDER BY grp"
)
SCAN_P = "SELECT id, amount, label FROM client_facts WHERE qty < $1"


async def connect(url, **kw):
    conn = await asyncpg.connect(url, **kw)
    for t in ("json", "jsonb"):
        await conn.set_type_codec(t, schema="pg_catalog", encoder=json.dumps, decoder=json.loads)
    return conn


def tuples(records):
    return [tuple(r) for r in records]


class Target:
    def __init__(self, name, url, via_pgfan, direct):
        self.name, self.url, self.via_pgfan, self.direct = name, url, via_pgfan, direct

    async def rows(self, query, *args):
        return tuples(await self.conn.fetch(query, *args))

    async def want(self, query, *args):
        return tuples(await self.direct.fetch(query, *args))

    async def fanout(self, what, query, *args, sort=False):
        """Asserts the route (through pgfan), then the rows equal direct."""
        if self.via_pgfan:
            plan = await self.rows("EXPLAIN FANOUT " + query, *args)
            if not plan or not plan[0][0].startswith("FanOut:"):
                raise Fail(f"{what}: EXPLAIN FANOUT gave {plan[:1]}, want a first row 'FanOut: ...'")
            before = fanout_count()
        got = await self.rows(query, *args)
        if self.via_pgfan:
            check(f"{what}: fanned out (pgfan_queries_total fanout +1)", fanout_count() - before, 1)
        want = await self.want(query, *args)
        if sort:
            got, want = sorted(got), sorted(want)
        same_rows(what, got, want)

    # ------------------------------------------------------------------ checks
    async def connection(self):
        self.conn = await connect(self.url)
        tls = self.conn._transport.get_extra_info("ssl_object") is not None
        check(f"TLS in use: {self.name == 'tls'}", tls, self.name == "tls")
        if self.name == "tls":
            ctx = ssl.create_default_context(cafile=os.environ["PGFAN_CLIENT_CA"])
            c = await asyncpg.connect(self.url.split("?")[0], ssl=ctx)
            check("TLS verified against PGFAN_CLIENT_CA (hostname too)", await c.fetchval("SELECT 1"), 1)
            await c.close()

    async def types(self):
        got = (await self.conn.fetchrow(TYPES)).values()
        check("typed results (binary format)", tuple(got), TYPES_WANT)
        got = await self.conn.fetchrow("SELECT $1::numeric, $2::timestamptz, $3::text[], $4::bytea, $5::uuid",
                                       Decimal("-1.50"), TYPES_WANT[13], ["a", None], b"\x01", TYPES_WANT[15])
        check("binary parameters round trip", tuple(got),
              (Decimal("-1.50"), TYPES_WANT[13], ["a", None], b"\x01", TYPES_WANT[15]))

    async def fanout_queries(self):
        await self.fanout("fan-out aggregate", AGG)
        await self.fanout("fan-out aggregate, grp >= $1", AGG_P, 3)
        await self.fanout("fan-out scan", SCAN, sort=True)
        await self.fanout("fan-out scan, qty < $1", SCAN_P, 5, sort=True)

    async def prepared(self):
        stmt = await self.conn.prepare(AGG_P)
        name = stmt.get_name()
        check("conn.prepare() gives a named statement", name.startswith("__asyncpg_stmt_"), True)
        before = fanout_count() if self.via_pgfan else 0
        for i in range(8):
            same_rows(f"named statement {name}, $1 = {i}", tuples(await stmt.fetch(i)), await self.want(AGG_P, i))
        if self.via_pgfan:
            print(f"    info: {fanout_count() - before} of the 8 executions fanned out", flush=True)
        check("fetchrow through the statement", tuple(await stmt.fetchrow(9)), tuple((await self.want(AGG_P, 9))[0]))
        n = await self.conn.fetchval("SELECT count(*) FROM pg_prepared_statements WHERE name = $1 AND statement = $2", name, AGG_P)
        check("statement in pg_prepared_statements", n, 1)
        check("statement's parameter types", [t.name for t in stmt.get_parameters()], ["int4"])

    async def batch(self):
        await self.conn.execute("CREATE TEMP TABLE IF NOT EXISTS batch_t (id int PRIMARY KEY, v text, amount numeric(8,2))")
        await self.conn.execute("TRUNCATE batch_t")
        rows = [(i, f"v'{i}", Decimal(i) / 4) for i in range(1000)]
        await self.conn.executemany("INSERT INTO batch_t VALUES ($1, $2, $3)", rows)
        same_rows("executemany read back", await self.rows("SELECT * FROM batch_t ORDER BY id"),
                  [(i, v, a.quantize(Decimal("0.01"))) for i, v, a in rows])
        try:
            await self.conn.executemany("INSERT INTO batch_t VALUES ($1, $2, $3)",
                                        [(2000, "a", 1), (2001, "b", 1), (5, "duplicate", 1), (2002, "c", 1)])
            raise Fail("executemany with a duplicate key raised nothing")
        except asyncpg.UniqueViolationError as e:
            check("executemany with a duplicate key: sqlstate", e.sqlstate, "23505")
        check("executemany is atomic", await self.conn.fetchval("SELECT count(*) FROM batch_t WHERE id >= 2000"), 0)

    async def cursor(self):
        q = "SELECT id, amount FROM client_facts WHERE grp = 3"
        want = (await self.want("SELECT count(*), sum(amount) FROM client_facts WHERE grp = 3"))[0]
        async with self.conn.transaction():
            n, total = 0, Decimal(0)
            async for r in self.conn.cursor(q, prefetch=500):
                n += 1
                total += r["amount"] or 0
            check("cursor(prefetch=500): count and sum", (n, total), want)
            cur = await self.conn.cursor(q)
            first = await cur.fetch(100)
            await cur.forward(50)
            rest = []
            while batch := await cur.fetch(1000):
                rest += batch
            check("cursor.fetch(100), forward(50), fetch(1000)...: rows", len(first) + 50 + len(rest), want[0])
        fa = await self.want("SELECT count(*), sum(amount) FROM client_facts")
        async with self.conn.transaction():
            n, total = 0, Decimal(0)
            async for r in self.conn.cursor("SELECT amount FROM client_facts", prefetch=5000):
                n += 1
                total += r[0] or 0
        check("cursor over a fan-out candidate (prefetch=5000): count and sum", [(n, total)], fa)

    async def copy(self):
        await self.conn.execute("CREATE TEMP TABLE IF NOT EXISTS copy_t (id int, name text, amount numeric(10,2), at timestamptz)")
        await self.conn.execute("TRUNCATE copy_t")
        at = dt.datetime(2026, 3, 4, 5, 6, 7, tzinfo=dt.timezone.utc)
        rows = [(i, f"name {i}\t\"q\"\n" if i % 3 == 0 else None, Decimal(i) / 4, at) for i in range(500)]
        res = await self.conn.copy_records_to_table("copy_t", records=rows)
        check("copy_records_to_table status", res, "COPY 500")
        same_rows("COPY in: rows read back", await self.rows("SELECT * FROM copy_t ORDER BY id"),
                  [(i, n, a.quantize(Decimal("0.01")), t) for i, n, a, t in rows])
        q = "SELECT id, amount, label, created FROM client_facts WHERE id <= 3000 ORDER BY id"
        out, want = io.BytesIO(), io.BytesIO()
        res = await self.conn.copy_from_query(q, output=out, format="csv")
        await self.direct.copy_from_query(q, output=want, format="csv")
        check("copy_from_query status", res, "COPY 3000")
        check("copy_from_query (csv): bytes equal to direct", out.getvalue() == want.getvalue(), True)
        out, want = io.BytesIO(), io.BytesIO()
        await self.conn.copy_from_table("copy_t", output=out, format="binary")
        await self.direct.execute("CREATE TEMP TABLE IF NOT EXISTS copy_t (id int, name text, amount numeric(10,2), at timestamptz)")
        await self.direct.execute("TRUNCATE copy_t")
        await self.direct.copy_records_to_table("copy_t", records=rows)
        await self.direct.copy_from_table("copy_t", output=want, format="binary")
        check("copy_from_table (binary): bytes equal to direct", out.getvalue() == want.getvalue(), True)

    async def transaction(self):
        agg = "SELECT count(*), sum(amount) FROM client_facts WHERE grp = 1"
        before = (await self.want(agg))[0]

        class Rollback(Exception):
            pass

        try:
            async with self.conn.transaction():
                await self.conn.execute("INSERT INTO client_facts VALUES (900001, 1, 1000.25, 1, 'tx', now())")
                check("transaction: sees its own write in a fan-out candidate", (await self.rows(agg))[0],
                      (before[0] + 1, before[1] + Decimal("1000.25")))
                raise Rollback()
        except Rollback:
            pass
        check("transaction: rolled-back row is gone", await self.conn.fetchval("SELECT count(*) FROM client_facts WHERE id = 900001"), 0)
        same_rows("transaction: aggregate after rollback", [(await self.rows(agg))[0]], [before])

    async def error(self):
        try:
            await self.conn.fetch("SELECT 1/0")
            raise Fail("SELECT 1/0 raised nothing")
        except asyncpg.DivisionByZeroError as e:
            check("SELECT 1/0 raises DivisionByZeroError with sqlstate", e.sqlstate, "22012")
        check("connection usable after the error", await self.conn.fetchval("SELECT $1::int", 7), 7)
        try:
            await self.conn.execute("SELECT 1/0")  # simple protocol
            raise Fail("execute('SELECT 1/0') raised nothing")
        except asyncpg.DivisionByZeroError as e:
            check("execute('SELECT 1/0'): sqlstate", e.sqlstate, "22012")
        async with self.conn.transaction():
            try:
                async with self.conn.transaction():
                    await self.conn.fetch("SELECT 1/$1::int", 0)
            except asyncpg.DivisionByZeroError as e:
                check("1/$1 in a savepoint: sqlstate", e.sqlstate, "22012")
            check("transaction usable after the savepoint rollback", await self.conn.fetchval("SELECT 1"), 1)


CHECKS = ["connection", "types", "fanout_queries", "prepared", "batch", "cursor", "copy", "transaction", "error"]


async def main():
    print(f"asyncpg {asyncpg.__version__}")
    direct = await connect(os.environ["PGFAN_CLIENT_DIRECT_URL"])
    await run_checks("asyncpg", CHECKS, lambda *a: Target(*a, direct), lambda t: t.conn.close())
    await direct.close()


if __name__ == "__main__":
    asyncio.run(main())
