"""psycopg 3 through pgfan (tests/clients/README.md lists the checks).

Runs every check against PGFAN_CLIENT_TLS_URL (SCRAM over TLS), PGFAN_CLIENT_PLAIN_URL and
PGFAN_CLIENT_DIRECT_URL, and exits non-zero on the first failure:
  - connection: TLS in use exactly on the TLS target;
  - typed results over the common types, in text and in binary result format;
  - fan-out aggregate and scan (literal and with a server-side bound parameter, the aggregate
    also in binary) equal to a direct connection; through pgfan the route is asserted by
    EXPLAIN FANOUT and by pgfan_queries_total{route="fanout"} going up by one;
  - prepared statements: prepare_threshold (a parameterised fan-out aggregate run 7 times
    switches to a named statement) and prepare=True, each result equal to direct;
  - conn.pipeline() with several queries in flight, an error inside a pipeline;
  - a server-side cursor (DECLARE/FETCH) with itersize: count and sum equal to direct;
  - COPY in (text) into a temporary table and COPY out (text and binary) with cursor.copy();
  - a transaction that writes client_facts, sees its write in a fan-out candidate, rolls back;
  - SELECT 1/0 raises DivisionByZero with sqlstate 22012 and the connection stays usable.
"""

import asyncio
import datetime as dt
import os
import sys
from decimal import Decimal

import psycopg
from psycopg import errors

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
from pgfan_check import (  # noqa: E402 (the shared module sits beside the drivers)
    AGG, check, Fail, fanout_count, ok, run_checks, same_rows, SCAN, TYPES, TYPES_WANT,
)


AGG_P = (
    "SELECT grp, count(*), sum(amount), min(label), max(created) FROM client_facts"
    " WHERE grp >= %s GROUP BY grp ORDER BY grp"
)
SCAN_P = "SELECT id, amount, label FROM client_facts WHERE qty < %s"


class Target:
    def __init__(self, name, url, via_pgfan, direct):
        self.name, self.url, self.via_pgfan, self.direct = name, url, via_pgfan, direct
        self.conn = psycopg.connect(url, autocommit=True, prepare_threshold=5)

    def rows(self, query, params=None, binary=False, conn=None):
        with (conn or self.conn).cursor(binary=binary) as cur:
            cur.execute(query, params)
            return cur.fetchall()

    def want(self, query, params=None):
        with self.direct.cursor() as cur:
            cur.execute(query, params)
            return cur.fetchall()

    def fanout(self, what, query, params=None, binary=False, sort=False):
        """Asserts the route (through pgfan), then the rows equal direct."""
        if self.via_pgfan:
            plan = self.rows("EXPLAIN FANOUT " + query, params)
            if not plan or not plan[0][0].startswith("FanOut:"):
                raise Fail(f"{what}: EXPLAIN FANOUT gave {plan[:1]}, want a first row 'FanOut: ...'")
            before = fanout_count()
        got = self.rows(query, params, binary)
        if self.via_pgfan:
            check(f"{what}: fanned out (pgfan_queries_total fanout +1)", fanout_count() - before, 1)
        want = self.want(query, params)
        if sort:
            got, want = sorted(got), sorted(want)
        same_rows(what, got, want)

    # ------------------------------------------------------------------ checks
    def connection(self):
        check(f"TLS in use: {self.name == 'tls'}", self.conn.pgconn.ssl_in_use, self.name == "tls")
        if self.name == "tls":
            ca = os.environ["PGFAN_CLIENT_CA"]
            with psycopg.connect(self.url, sslmode="verify-full", sslrootcert=ca) as c:
                check("sslmode=verify-full against PGFAN_CLIENT_CA", c.execute("SELECT 1").fetchall(), [(1,)])
        check("server_version reported", bool(self.conn.info.parameter_status("server_version")), True)

    def types(self):
        check("typed results (text format)", self.rows(TYPES)[0], TYPES_WANT)
        check("typed results (binary format)", self.rows(TYPES, binary=True)[0], TYPES_WANT)

    def fanout_queries(self):
        self.fanout("fan-out aggregate", AGG)
        self.fanout("fan-out aggregate, grp >= $1", AGG_P, (3,))
        self.fanout("fan-out aggregate, binary results", AGG, binary=True)
        self.fanout("fan-out scan", SCAN, sort=True)
        self.fanout("fan-out scan, qty < $1", SCAN_P, (5,), sort=True)

    def prepared(self):
        q = "SELECT count(*), sum(amount) FROM client_facts WHERE grp >= %s"
        before = fanout_count() if self.via_pgfan else 0
        for i in range(7):
            same_rows(f"prepare_threshold run {i + 1}, grp >= {i}", self.rows(q, (i,)), self.want(q, (i,)))
        if self.via_pgfan:
            print(f"    info: {fanout_count() - before} of the 7 executions fanned out", flush=True)
        names = self.rows("SELECT name FROM pg_prepared_statements WHERE statement = %s", (q.replace("%s", "$1"),))
        check("prepare_threshold switched to a named statement", len(names) == 1 and names[0][0].startswith("_pg3_"), True)
        with self.conn.cursor() as cur:
            cur.execute("SELECT %s::int * 2, %s::text", (21, "prepared"), prepare=True)
            check("prepare=True result", cur.fetchall(), [(42, "prepared")])
        n = self.rows("SELECT count(*) FROM pg_prepared_statements WHERE statement = 'SELECT $1::int * 2, $2::text'")
        check("prepare=True made a named statement", n, [(1,)])

    def pipeline(self):
        self.conn.execute("CREATE TEMP TABLE IF NOT EXISTS pipe_t (id int, v text)")
        self.conn.execute("TRUNCATE pipe_t")
        with self.conn.pipeline() as p:
            c1, c2, c3, c4, c5 = (self.conn.cursor() for _ in range(5))
            c1.execute(AGG)
            c2.execute("SELECT %s::int + 1", (41,))
            c3.executemany("INSERT INTO pipe_t VALUES (%s, %s)", [(i, f"v{i}") for i in range(10)])
            c4.execute("SELECT count(*), string_agg(v, ',' ORDER BY id) FROM pipe_t")
            c5.execute(SCAN_P, (5,))
            p.sync()
            got = [c1.fetchall(), c2.fetchall(), c4.fetchall(), sorted(c5.fetchall())]
        same_rows("pipeline: fan-out aggregate", got[0], self.want(AGG))
        check("pipeline: parameter query", got[1], [(42,)])
        check("pipeline: executemany then read back", got[2], [(10, ",".join(f"v{i}" for i in range(10)))])
        same_rows("pipeline: fan-out scan", got[3], sorted(self.want(SCAN)))
        try:
            with self.conn.pipeline():
                a = self.conn.execute("SELECT 1")
                self.conn.execute("SELECT 1/0")
                self.conn.execute("SELECT 2")
            raise Fail("pipeline with 1/0 raised nothing")
        except errors.DivisionByZero as e:
            check("pipeline: 1/0 raised 22012", e.sqlstate, "22012")
        check("pipeline: statement before the error", a.fetchall(), [(1,)])
        check("usable after the pipeline error", self.rows("SELECT 'after'"), [("after",)])

    def cursor(self):
        q = "SELECT id, amount FROM client_facts WHERE grp = 3"
        n = total = fetches = 0
        with self.conn.transaction():
            with self.conn.cursor(name="facts_cur") as cur:
                cur.itersize = 700
                cur.execute(q)
                while batch := cur.fetchmany(700):
                    fetches += 1
                    n += len(batch)
                    total += sum(r[1] for r in batch if r[1] is not None)
        want = self.want("SELECT count(*), sum(amount) FROM client_facts WHERE grp = 3")[0]
        check(f"server-side cursor: count and sum in {fetches} fetches", (n, total), want)
        check("server-side cursor: more than one fetch", fetches > 1, True)

    def copy(self):
        self.conn.execute("CREATE TEMP TABLE IF NOT EXISTS copy_t (id int, name text, amount numeric(10,2), at timestamptz)")
        self.conn.execute("TRUNCATE copy_t")
        at = dt.datetime(2026, 3, 4, 5, 6, 7, tzinfo=dt.timezone.utc)
        rows = [(i, f"name {i}\t\"q\"\n" if i % 3 == 0 else None, Decimal(i) / 4, at) for i in range(500)]
        with self.conn.cursor() as cur:
            with cur.copy("COPY copy_t (id, name, amount, at) FROM STDIN") as cp:
                for r in rows:
                    cp.write_row(r)
            check("COPY in: rowcount", cur.rowcount, 500)
        same_rows("COPY in: rows read back", self.rows("SELECT * FROM copy_t ORDER BY id"),
                  [(i, n, a.quantize(Decimal("0.01")), t) for i, n, a, t in rows])
        q = "SELECT id, label, created FROM client_facts WHERE id <= 3000 ORDER BY id"
        with self.conn.cursor() as cur:
            with cur.copy(f"COPY ({q}) TO STDOUT") as cp:
                cp.set_types(["bigint", "text", "timestamptz"])
                text_rows = list(cp.rows())
            with cur.copy(f"COPY ({q}) TO STDOUT (FORMAT BINARY)") as cp:
                cp.set_types(["bigint", "text", "timestamptz"])
                binary_rows = list(cp.rows())
        same_rows("COPY out (text)", text_rows, self.want(q))
        same_rows("COPY out (binary)", binary_rows, self.want(q))

    def transaction(self):
        agg = "SELECT count(*), sum(amount) FROM client_facts WHERE grp = 1"
        before = self.want(agg)[0]
        with self.conn.transaction():
            self.conn.execute("INSERT INTO client_facts VALUES (900001, 1, 1000.25, 1, 'tx', now())")
            got = self.rows(agg)[0]
            check("transaction: sees its own write in a fan-out candidate", got, (before[0] + 1, before[1] + Decimal("1000.25")))
            raise psycopg.Rollback()
        check("transaction: rolled-back row is gone", self.rows("SELECT count(*) FROM client_facts WHERE id = 900001"), [(0,)])
        same_rows("transaction: aggregate after rollback", [self.rows(agg)[0]], [before])
        self.conn.autocommit = False
        self.conn.execute("CREATE TEMP TABLE tx_t (id int)")
        self.conn.execute("INSERT INTO tx_t VALUES (1)")
        self.conn.rollback()
        self.conn.autocommit = True
        try:
            self.conn.execute("SELECT * FROM tx_t")
            raise Fail("temp table created in a rolled-back transaction still exists")
        except errors.UndefinedTable:
            ok("conn.rollback() undid CREATE TABLE and INSERT")

    def error(self):
        try:
            self.conn.execute("SELECT 1/0")
            raise Fail("SELECT 1/0 raised nothing")
        except errors.DivisionByZero as e:
            check("SELECT 1/0 raises DivisionByZero with sqlstate", e.sqlstate, "22012")
        check("connection usable after the error", self.rows("SELECT %s::int", (7,)), [(7,)])
        with self.conn.transaction():
            try:
                with self.conn.transaction():
                    self.conn.execute("SELECT 1/0")
            except errors.DivisionByZero as e:
                check("1/0 in a savepoint: sqlstate", e.sqlstate, "22012")
            check("transaction usable after the savepoint rollback", self.rows("SELECT 1"), [(1,)])


CHECKS = ["connection", "types", "fanout_queries", "prepared", "pipeline", "cursor", "copy", "transaction", "error"]


def main():
    print(f"psycopg {psycopg.__version__} (libpq {psycopg.pq.version()}, impl {psycopg.pq.__impl__})")
    with psycopg.connect(os.environ["PGFAN_CLIENT_DIRECT_URL"], autocommit=True) as direct:
        asyncio.run(run_checks("psycopg", CHECKS, lambda *a: Target(*a, direct), lambda t: t.conn.close()))


if __name__ == "__main__":
    main()
