"""psycopg2 through pgfan (tests/clients/README.md lists the checks).

psycopg2 speaks only the simple query protocol and binds parameters on the client. Runs every
check against PGFAN_CLIENT_TLS_URL (SCRAM over TLS), PGFAN_CLIENT_PLAIN_URL and
PGFAN_CLIENT_DIRECT_URL, and exits non-zero on the first failure:
  - connection: TLS in use exactly on the TLS target, verify-full against PGFAN_CLIENT_CA;
  - typed results over the common types;
  - fan-out aggregate and scan (literal and with a %s parameter) equal to a direct connection;
    through pgfan the route is asserted by EXPLAIN FANOUT and pgfan_queries_total{route="fanout"};
  - prepared statements: psycopg2 has none, so SQL PREPARE/EXECUTE of a fan-out aggregate;
  - batches: execute_batch and execute_values, and a multi-statement query string;
  - a named cursor with itersize (DECLARE/FETCH): count and sum equal to direct;
  - COPY in and out with copy_expert;
  - a transaction that writes client_facts, sees its write in a fan-out candidate, rolls back;
  - SELECT 1/0 raises DivisionByZero with pgcode 22012 and the connection stays usable.
"""

import csv
import asyncio
import io
import os
import sys
from decimal import Decimal

import psycopg2
import psycopg2.errors
import psycopg2.extras

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
from pgfan_check import (  # noqa: E402 (the shared module sits beside the drivers)
    AGG, check, Fail, fanout_count, run_checks, same_rows, SCAN, TYPES, TYPES_WANT,
)


psycopg2.extras.register_uuid()

AGG_P = (
    "SELECT grp, count(*), sum(amount), min(label), max(created) FROM client_facts"
    " WHERE grp >= %s GROUP BY grp ORDER BY grp"
)
SCAN_P = "SELECT id, amount, label FROM client_facts WHERE qty < %s"


def plain(v):
    return bytes(v) if isinstance(v, memoryview) else v


def fetch(conn, query, params=None):
    with conn.cursor() as cur:
        cur.execute(query, params)
        return cur.fetchall()


class Target:
    def __init__(self, name, url, via_pgfan, direct):
        self.name, self.url, self.via_pgfan, self.direct = name, url, via_pgfan, direct
        self.conn = psycopg2.connect(url)
        self.conn.autocommit = True

    def rows(self, query, params=None):
        return fetch(self.conn, query, params)

    def want(self, query, params=None):
        return fetch(self.direct, query, params)

    def fanout(self, what, query, params=None, sort=False):
        """Asserts the route (through pgfan), then the rows equal direct."""
        if self.via_pgfan:
            plan = self.rows("EXPLAIN FANOUT " + query, params)
            if not plan or not plan[0][0].startswith("FanOut:"):
                raise Fail(f"{what}: EXPLAIN FANOUT gave {plan[:1]}, want a first row 'FanOut: ...'")
            before = fanout_count()
        got = self.rows(query, params)
        if self.via_pgfan:
            check(f"{what}: fanned out (pgfan_queries_total fanout +1)", fanout_count() - before, 1)
        want = self.want(query, params)
        if sort:
            got, want = sorted(got), sorted(want)
        same_rows(what, got, want)

    # ------------------------------------------------------------------ checks
    def connection(self):
        check(f"TLS in use: {self.name == 'tls'}", bool(self.conn.info.ssl_in_use), self.name == "tls")
        if self.name == "tls":
            ca = os.environ["PGFAN_CLIENT_CA"]
            with psycopg2.connect(self.url, sslmode="verify-full", sslrootcert=ca) as c:
                check("sslmode=verify-full against PGFAN_CLIENT_CA", fetch(c, "SELECT 1"), [(1,)])
            c.close()

    def types(self):
        check("typed results", tuple(plain(v) for v in self.rows(TYPES)[0]), TYPES_WANT)

    def fanout_queries(self):
        self.fanout("fan-out aggregate", AGG)
        self.fanout("fan-out aggregate, grp >= %s", AGG_P, (3,))
        self.fanout("fan-out scan", SCAN, sort=True)
        self.fanout("fan-out scan, qty < %s", SCAN_P, (5,), sort=True)

    def prepared(self):
        self.conn.cursor().execute(
            "PREPARE agg_p(int) AS SELECT count(*), sum(amount), max(created) FROM client_facts WHERE grp >= $1"
        )
        q = "SELECT count(*), sum(amount), max(created) FROM client_facts WHERE grp >= %s"
        for i in (0, 4, 9):
            same_rows(f"SQL EXECUTE agg_p({i})", self.rows("EXECUTE agg_p(%s)", (i,)), self.want(q, (i,)))
        self.conn.cursor().execute("DEALLOCATE agg_p")

    def batches(self):
        cur = self.conn.cursor()
        cur.execute("CREATE TEMP TABLE IF NOT EXISTS batch_t (id int, v text, amount numeric(8,2))")
        cur.execute("TRUNCATE batch_t")
        rows = [(i, f"v'{i}", Decimal(i) / 4) for i in range(1000)]
        psycopg2.extras.execute_batch(cur, "INSERT INTO batch_t VALUES (%s, %s, %s)", rows[:500], page_size=100)
        psycopg2.extras.execute_values(cur, "INSERT INTO batch_t VALUES %s", rows[500:], page_size=200)
        same_rows("execute_batch + execute_values read back", self.rows("SELECT * FROM batch_t ORDER BY id"),
                  [(i, v, a.quantize(Decimal("0.01"))) for i, v, a in rows])
        cur.execute("SELECT count(*) FROM batch_t; " + AGG)
        same_rows("multi-statement query ending in the aggregate", cur.fetchall(), self.want(AGG))

    def cursor(self):
        q = "SELECT id, amount FROM client_facts WHERE grp = 3"
        self.conn.autocommit = False
        n = total = fetches = 0
        with self.conn.cursor(name="facts_cur") as cur:
            cur.itersize = 700
            cur.execute(q)
            while batch := cur.fetchmany(700):
                fetches += 1
                n += len(batch)
                total += sum(r[1] for r in batch if r[1] is not None)
        self.conn.commit()
        self.conn.autocommit = True
        want = self.want("SELECT count(*), sum(amount) FROM client_facts WHERE grp = 3")[0]
        check(f"named cursor: count and sum in {fetches} fetches", (n, total), want)
        check("named cursor: more than one fetch", fetches > 1, True)

    def copy(self):
        cur = self.conn.cursor()
        cur.execute("CREATE TEMP TABLE IF NOT EXISTS copy_t (id int, name text, amount numeric(10,2))")
        cur.execute("TRUNCATE copy_t")
        rows = [(i, f"name {i}, \"q\"" if i % 3 == 0 else None, Decimal(i) / 4) for i in range(500)]
        csv_in = io.StringIO()
        csv.writer(csv_in, lineterminator="\n").writerows(rows)  # None is written as an empty field: NULL
        csv_in.seek(0)
        cur.copy_expert("COPY copy_t FROM STDIN (FORMAT csv)", csv_in)
        check("COPY in: rowcount", cur.rowcount, 500)
        same_rows("COPY in: rows read back", self.rows("SELECT * FROM copy_t ORDER BY id"),
                  [(i, n, a.quantize(Decimal("0.01"))) for i, n, a in rows])
        q = "SELECT id, amount, label, created FROM client_facts WHERE id <= 3000 ORDER BY id"
        out = io.StringIO()
        cur.copy_expert(f"COPY ({q}) TO STDOUT", out)
        want = io.StringIO()
        self.direct.cursor().copy_expert(f"COPY ({q}) TO STDOUT", want)
        check("COPY out: line count", out.getvalue().count("\n"), 3000)
        check("COPY out: bytes equal to direct", out.getvalue() == want.getvalue(), True)

    def transaction(self):
        agg = "SELECT count(*), sum(amount) FROM client_facts WHERE grp = 1"
        before = self.want(agg)[0]
        self.conn.autocommit = False
        cur = self.conn.cursor()
        cur.execute("INSERT INTO client_facts VALUES (900001, 1, 1000.25, 1, 'tx', now())")
        check("transaction: sees its own write in a fan-out candidate", self.rows(agg)[0],
              (before[0] + 1, before[1] + Decimal("1000.25")))
        self.conn.rollback()
        self.conn.autocommit = True
        check("transaction: rolled-back row is gone", self.rows("SELECT count(*) FROM client_facts WHERE id = 900001"), [(0,)])
        same_rows("transaction: aggregate after rollback", [self.rows(agg)[0]], [before])

    def error(self):
        try:
            self.rows("SELECT 1/0")
            raise Fail("SELECT 1/0 raised nothing")
        except psycopg2.errors.DivisionByZero as e:
            check("SELECT 1/0 raises DivisionByZero with pgcode", e.pgcode, "22012")
        check("connection usable after the error", self.rows("SELECT %s::int", (7,)), [(7,)])
        self.conn.autocommit = False
        try:
            self.rows("SELECT 1/0")
            raise Fail("SELECT 1/0 in a transaction raised nothing")
        except psycopg2.errors.DivisionByZero as e:
            check("1/0 in a transaction: pgcode", e.pgcode, "22012")
        try:
            self.rows("SELECT 1")
            raise Fail("statement after an error in a transaction was not rejected")
        except psycopg2.errors.InFailedSqlTransaction as e:
            check("next statement in the failed transaction: pgcode", e.pgcode, "25P02")
        self.conn.rollback()
        self.conn.autocommit = True
        check("usable after rollback", self.rows("SELECT 'after'"), [("after",)])


CHECKS = ["connection", "types", "fanout_queries", "prepared", "batches", "cursor", "copy", "transaction", "error"]


def main():
    print(f"psycopg2 {psycopg2.__version__} (libpq {psycopg2.extensions.libpq_version()})")
    direct = psycopg2.connect(os.environ["PGFAN_CLIENT_DIRECT_URL"])
    direct.autocommit = True
    asyncio.run(run_checks("psycopg2", CHECKS, lambda *a: Target(*a, direct), lambda t: t.conn.close()))
    direct.close()


if __name__ == "__main__":
    main()
