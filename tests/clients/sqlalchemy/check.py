"""SQLAlchemy 2 (postgresql+psycopg, psycopg 3) through pgfan (tests/clients/README.md).

Runs every check against PGFAN_CLIENT_TLS_URL (SCRAM over TLS), PGFAN_CLIENT_PLAIN_URL and
PGFAN_CLIENT_DIRECT_URL, and exits non-zero on the first failure:
  - connection: TLS in use exactly on the TLS target;
  - inspect(engine) of client_facts and client_kinds (columns, types, nullability, defaults,
    primary key, indexes) and Table(autoload_with=...) equal to the direct engine's;
  - typed results of the common types through text() and the psycopg dialect;
  - ORM: a mapped class over client_kinds, select() and session.query() with filter/order_by,
    equal to direct; ORM objects of a fan-out scan over client_facts;
  - fan-out aggregate select(func.count(), func.sum(...)).group_by(...) and fan-out scan, without
    and with a bound parameter, equal to direct; through pgfan the route is asserted by
    EXPLAIN FANOUT of the compiled statement and by pgfan_queries_total{route="fanout"};
  - prepared statements: the same ORM statement run 7 times becomes a psycopg named statement;
  - batches: session.add_all() flushed as one insertmanyvalues INSERT, and an executemany;
  - stream_results/yield_per (a server-side cursor): count and sum equal to direct;
  - COPY in and out through the DBAPI connection of a pooled SQLAlchemy connection;
  - a session that writes client_facts and client_kinds, sees its writes, rolls back;
  - text("SELECT 1/0") raises DataError whose .orig.sqlstate is 22012, the session stays usable.
"""

import asyncio
import datetime as dt
import os
import sys
from decimal import Decimal
from typing import Optional

import sqlalchemy
from sqlalchemy import BigInteger, Numeric, Table, create_engine, func, insert, inspect, select, text
from sqlalchemy.exc import DataError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
from pgfan_check import (  # noqa: E402 (the shared module sits beside the drivers)
    check, Fail, fanout_count, run_checks, same_rows, TYPES, TYPES_WANT,
)



class Base(DeclarativeBase):
    pass


class Kind(Base):
    __tablename__ = "client_kinds"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]
    weight: Mapped[Optional[Decimal]] = mapped_column(Numeric(10, 3))
    active: Mapped[bool]

    def row(self):
        return (self.id, self.name, self.weight, self.active)


class Fact(Base):
    __tablename__ = "client_facts"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    grp: Mapped[int]
    amount: Mapped[Optional[Decimal]] = mapped_column(Numeric(12, 2))
    qty: Mapped[Optional[int]]
    label: Mapped[str]
    created: Mapped[dt.datetime] = mapped_column(sqlalchemy.DateTime(timezone=True))

    def row(self):
        return (self.id, self.grp, self.amount, self.qty, self.label, self.created)


AGG = (select(Fact.grp, func.count(), func.sum(Fact.amount), func.min(Fact.label), func.max(Fact.created))
       .group_by(Fact.grp).order_by(Fact.grp))


def engine_for(url):
    return create_engine(url.replace("postgres://", "postgresql+psycopg://", 1), pool_size=2)


class Target:
    def __init__(self, name, url, via_pgfan, direct):
        self.name, self.via_pgfan, self.direct = name, via_pgfan, direct
        self.engine = engine_for(url)

    def rows(self, stmt, engine=None):
        with Session(engine or self.engine) as s:
            return [tuple(r) for r in s.execute(stmt)]

    def fanout(self, what, stmt, sort=False):
        """Asserts the route (through pgfan), then the rows equal direct."""
        if self.via_pgfan:
            with self.engine.connect() as c:
                compiled = stmt.compile(c)
                plan = c.exec_driver_sql("EXPLAIN FANOUT " + str(compiled), compiled.params or ()).all()
            if not plan or not plan[0][0].startswith("FanOut:"):
                raise Fail(f"{what}: EXPLAIN FANOUT gave {plan[:1]}, want a first row 'FanOut: ...'")
            before = fanout_count()
        got = self.rows(stmt)
        if self.via_pgfan:
            check(f"{what}: fanned out (pgfan_queries_total fanout +1)", fanout_count() - before, 1)
        want = self.rows(stmt, self.direct)
        if sort:
            got, want = sorted(got), sorted(want)
        same_rows(what, got, want)

    # ------------------------------------------------------------------ checks
    def connection(self):
        with self.engine.connect() as c:
            tls = c.connection.driver_connection.pgconn.ssl_in_use
            check(f"TLS in use: {self.name == 'tls'}", tls, self.name == "tls")
            check("dialect server_version_info", c.dialect.server_version_info >= (10,), True)

    def reflection(self):
        got, want = inspect(self.engine), inspect(self.direct)
        names = got.get_table_names()
        check("get_table_names() equal to direct", names, want.get_table_names())
        check("client_facts and client_kinds reflected", {"client_facts", "client_kinds"} <= set(names), True)
        for t in ("client_facts", "client_kinds"):
            cols = [(c["name"], str(c["type"]), c["nullable"], c["default"]) for c in got.get_columns(t)]
            check(f"{t}: get_columns() equal to direct ({len(cols)} columns)", cols,
                  [(c["name"], str(c["type"]), c["nullable"], c["default"]) for c in want.get_columns(t)])
            pk = got.get_pk_constraint(t)
            check(f"{t}: get_pk_constraint() equal to direct ({pk['constrained_columns']})", pk, want.get_pk_constraint(t))
            check(f"{t}: get_indexes() equal to direct", got.get_indexes(t), want.get_indexes(t))
            check(f"{t}: get_foreign_keys() equal to direct", got.get_foreign_keys(t), want.get_foreign_keys(t))
            a = Table(t, sqlalchemy.MetaData(), autoload_with=self.engine)
            b = Table(t, sqlalchemy.MetaData(), autoload_with=self.direct)
            desc = lambda tb: [(c.name, repr(c.type), c.primary_key, c.nullable) for c in tb.columns]
            check(f"{t}: Table(autoload_with=engine) equal to direct", desc(a), desc(b))

    def types(self):
        with self.engine.connect() as c:
            check("typed results through text()", tuple(c.execute(text(TYPES)).one()), TYPES_WANT)
            got = c.execute(text("SELECT :n * 2, :t || '!', :d"), {"n": Decimal("1.25"), "t": "x", "d": dt.date(2020, 1, 2)}).one()
            check("bound parameters", tuple(got), (Decimal("2.50"), "x!", dt.date(2020, 1, 2)))

    def orm(self):
        for what, stmt in [
            ("select(Kind).where(active).order_by(id desc)", select(Kind).where(Kind.active.is_(True)).order_by(Kind.id.desc())),
            ("select(Kind).where(weight > 3).order_by(name)", select(Kind).where(Kind.weight > 3).order_by(Kind.name)),
        ]:
            with Session(self.engine) as s, Session(self.direct) as d:
                got = [k.row() for k in s.scalars(stmt)]
                same_rows(f"ORM {what}", got, [k.row() for k in d.scalars(stmt)])
                check(f"ORM {what}: not empty", len(got) > 0, True)
        with Session(self.engine) as s, Session(self.direct) as d:
            q = lambda ss: [k.row() for k in ss.query(Kind).filter(Kind.id.between(2, 7), Kind.name != "kind 5").order_by(Kind.weight.desc())]
            same_rows("session.query(Kind).filter(...).order_by(...)", q(s), q(d))
            k = s.get(Kind, 3)
            check("session.get(Kind, 3)", k.row(), d.get(Kind, 3).row())
        with Session(self.engine) as s, Session(self.direct) as d:
            stmt = select(Fact).where(Fact.qty < 3)
            same_rows("ORM objects of a fan-out scan (Fact, qty < 3)", sorted(f.row() for f in s.scalars(stmt)),
                      sorted(f.row() for f in d.scalars(stmt)))

    def fanout_queries(self):
        self.fanout("fan-out aggregate (select count, sum, min, max group_by grp)", AGG)
        self.fanout("fan-out aggregate, where grp >= :param", AGG.where(Fact.grp >= 3))
        self.fanout("fan-out aggregate of one group, where grp = :param", select(func.count(), func.sum(Fact.amount)).where(Fact.grp == 4))
        self.fanout("fan-out scan, qty < :param", select(Fact.id, Fact.amount, Fact.label).where(Fact.qty < 5), sort=True)

    def prepared(self):
        stmt = select(func.count(), func.sum(Fact.amount)).where(Fact.grp >= sqlalchemy.bindparam("g"))
        with self.engine.connect() as c:
            for g in range(7):
                same_rows(f"same statement, run {g + 1}", [tuple(c.execute(stmt, {"g": g}).one())], self.rows(stmt.params(g=g), self.direct))
            n = c.execute(text("SELECT count(*) FROM pg_prepared_statements WHERE name LIKE '\\_pg3\\_%' AND statement LIKE '%sum(client_facts.amount)%'")).scalar()
            check("psycopg switched the statement to a named prepared statement", n, 1)

    def batches(self):
        with Session(self.engine) as s:
            s.execute(text("CREATE TEMP TABLE IF NOT EXISTS batch_kinds (LIKE client_kinds)"))
            t = Table("batch_kinds", sqlalchemy.MetaData(), autoload_with=s.connection())
            rows = [{"id": i, "name": f"k{i}", "weight": Decimal(i) / 8, "active": i % 3 == 0} for i in range(300)]
            s.execute(insert(t), rows[:150])  # executemany
            s.execute(insert(t).returning(t.c.id), rows[150:])  # insertmanyvalues with RETURNING
            got = [tuple(r) for r in s.execute(select(t).order_by(t.c.id))]
            same_rows("executemany + insertmanyvalues read back", got,
                      [(r["id"], r["name"], (r["weight"]).quantize(Decimal("0.001")), r["active"]) for r in rows])
            s.add_all([Kind(id=1000 + i, name=f"new {i}", weight=Decimal(i), active=True) for i in range(20)])
            s.flush()
            check("session.add_all + flush: 20 new kinds visible", s.scalar(select(func.count()).where(Kind.id >= 1000)), 20)
            s.rollback()
        with Session(self.engine) as s:
            check("rolled back: no new kinds", s.scalar(select(func.count()).where(Kind.id >= 1000)), 0)

    def cursor(self):
        stmt = select(Fact.id, Fact.amount).where(Fact.grp == 3)
        n, total, parts = 0, Decimal(0), 0
        with self.engine.connect() as c:
            result = c.execution_options(stream_results=True, yield_per=700).execute(stmt)
            for part in result.partitions():
                parts += 1
                n += len(part)
                total += sum(r.amount for r in part if r.amount is not None)
        want = self.rows(select(func.count(), func.sum(Fact.amount)).where(Fact.grp == 3), self.direct)[0]
        check(f"stream_results, yield_per=700: count and sum in {parts} partitions", (n, total), tuple(want))
        check("stream_results: more than one partition", parts > 1, True)

    def copy(self):
        with self.engine.connect() as c:
            raw = c.connection.driver_connection
            c.execute(text("CREATE TEMP TABLE copy_k (LIKE client_kinds)"))
            with raw.cursor() as cur:
                with cur.copy("COPY copy_k FROM STDIN") as cp:
                    for k in range(100):
                        cp.write_row((k, f"copy {k}", Decimal(k) / 2, k % 2 == 1))
                with cur.copy("COPY (SELECT * FROM copy_k ORDER BY id) TO STDOUT") as cp:
                    cp.set_types(["int4", "text", "numeric", "bool"])
                    out = list(cp.rows())
            same_rows("COPY in then out through the DBAPI connection", out,
                      [(k, f"copy {k}", (Decimal(k) / 2).quantize(Decimal("0.001")), k % 2 == 1) for k in range(100)])
            c.rollback()

    def transaction(self):
        one = select(func.count(), func.sum(Fact.amount)).where(Fact.grp == 1)
        before = self.rows(one, self.direct)[0]
        with Session(self.engine) as s:
            s.add(Fact(id=900001, grp=1, amount=Decimal("1000.25"), qty=1, label="tx", created=dt.datetime.now(dt.timezone.utc)))
            s.add(Kind(id=999, name="tx kind", weight=None, active=False))
            s.flush()
            check("session sees its own write in a fan-out candidate", tuple(s.execute(one).one()),
                  (before[0] + 1, before[1] + Decimal("1000.25")))
            s.rollback()
            check("rolled-back fact is gone", s.get(Fact, 900001), None)
            check("rolled-back kind is gone", s.get(Kind, 999), None)
        same_rows("aggregate after rollback", self.rows(one), [before])

    def error(self):
        with Session(self.engine) as s:
            try:
                s.execute(text("SELECT 1/0"))
                raise Fail("SELECT 1/0 raised nothing")
            except DataError as e:
                check("SELECT 1/0 raises DataError, .orig.sqlstate", e.orig.sqlstate, "22012")
            s.rollback()
            check("session usable after the error", s.scalar(text("SELECT :x"), {"x": 7}), 7)


CHECKS = ["connection", "reflection", "types", "orm", "fanout_queries", "prepared", "batches", "cursor", "copy",
          "transaction", "error"]


def main():
    import psycopg

    print(f"SQLAlchemy {sqlalchemy.__version__}, psycopg {psycopg.__version__}")
    direct = engine_for(os.environ["PGFAN_CLIENT_DIRECT_URL"])
    asyncio.run(run_checks("sqlalchemy", CHECKS, lambda *a: Target(*a, direct), lambda t: t.engine.dispose()))
    direct.dispose()


if __name__ == "__main__":
    main()
