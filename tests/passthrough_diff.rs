//! Pass-through differential suite (DESIGN.md invariant 2).
//!
//! Every corpus statement runs in one session directly on the primary and in one session
//! through pgfan, each in its own fresh database, and the two transcripts (every backend
//! message up to ReadyForQuery, normalized only for user OIDs) must be equal. The corpus
//! runs three times: simple protocol, extended protocol with text results and extended
//! protocol with binary results.
//!
//! Run: `cargo test --test passthrough_diff` (starts the cluster with
//! `scripts/pg-cluster start`). `PGFAN_TEST_PROXY=direct` compares the server with itself,
//! which checks the corpus. A failure report is also written to
//! `target/test-logs/passthrough-<mode>.txt`.

mod common;

use bytes::{BufMut, Bytes, BytesMut};
use common::wire::{self, Batch, Format, Mode, Msg, Transcript, WireClient};
use common::{cluster, create_database, drop_database, test_logs_dir, Pgfan};

// ---------------------------------------------------------------------------------------
// Corpus
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Only {
    /// All three modes.
    Any,
    /// Simple protocol only (several statements in one string).
    Simple,
    /// Extended protocol only (uses `$n` parameters).
    Extended,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Expect {
    /// No ErrorResponse.
    Ok,
    /// The first ErrorResponse has this SQLSTATE.
    Error(&'static str),
}

#[derive(Clone, Debug)]
struct Stmt {
    sql: String,
    params: Vec<Option<String>>,
    /// Data sent in answer to CopyInResponse (one CopyData per chunk, then CopyDone);
    /// without it the client answers CopyFail.
    copy: Option<Vec<Bytes>>,
    only: Only,
    expect: Expect,
    /// Expected ReadyForQuery status of the direct run.
    status: Option<char>,
}

fn q(sql: impl Into<String>) -> Stmt {
    Stmt {
        sql: sql.into(),
        params: Vec::new(),
        copy: None,
        only: Only::Any,
        expect: Expect::Ok,
        status: None,
    }
}

impl Stmt {
    /// Several statements in one Query string: simple protocol only.
    fn simple_only(mut self) -> Self {
        self.only = Only::Simple;
        self
    }

    /// Text parameters `$1..`: extended protocol only.
    fn params(mut self, params: &[Option<&str>]) -> Self {
        self.params = params.iter().map(|p| p.map(String::from)).collect();
        self.only = Only::Extended;
        self
    }

    fn copy(mut self, chunks: &[&[u8]]) -> Self {
        self.copy = Some(chunks.iter().map(|c| Bytes::copy_from_slice(c)).collect());
        self
    }

    fn copy_bytes(mut self, chunks: Vec<Bytes>) -> Self {
        self.copy = Some(chunks);
        self
    }

    fn err(mut self, code: &'static str) -> Self {
        self.expect = Expect::Error(code);
        self
    }

    fn status(mut self, s: char) -> Self {
        self.status = Some(s);
        self
    }

    fn runs_in(&self, mode: Mode) -> bool {
        match self.only {
            Only::Any => true,
            Only::Simple => mode == Mode::Simple,
            Only::Extended => mode != Mode::Simple,
        }
    }
}

/// PGCOPY binary stream of rows of (int4, text) with NULLs allowed, plus two NULL
/// columns (for `copy_t (id, name, amount, at)`).
fn binary_copy(rows: &[(Option<i32>, Option<&str>)]) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_slice(b"PGCOPY\n\xff\r\n\0");
    b.put_i32(0);
    b.put_i32(0);
    for (id, name) in rows {
        b.put_i16(4);
        match id {
            Some(v) => {
                b.put_i32(4);
                b.put_i32(*v);
            }
            None => b.put_i32(-1),
        }
        match name {
            Some(s) => {
                b.put_i32(s.len() as i32);
                b.put_slice(s.as_bytes());
            }
            None => b.put_i32(-1),
        }
        b.put_i32(-1);
        b.put_i32(-1);
    }
    b.put_i16(-1);
    b.to_vec()
}

/// Text COPY data of `n` rows starting at `from`, cut into chunks of `chunk` bytes
/// (chunks end mid-row on purpose).
fn text_copy_chunks(from: i32, n: i32, chunk: usize) -> Vec<Bytes> {
    let mut all = Vec::new();
    for i in from..from + n {
        all.extend_from_slice(
            format!("{i}\trow {i}\t{}.25\t2024-05-{:02}\n", i, i % 28 + 1).as_bytes(),
        );
    }
    all.chunks(chunk).map(Bytes::copy_from_slice).collect()
}

fn corpus() -> Vec<Stmt> {
    let one_mb = "0123456789abcdef".repeat(65536);
    let mut c = vec![
        // --- basics, empty queries, errors --------------------------------------------
        q("SELECT 1"),
        q("SELECT 1 AS one, 'two' AS two, NULL AS three, true AS four, 2.5 AS five"),
        q(""),
        q("-- only a comment"),
        q("   ;  "),
        q("SELECT"),
        q("SELEC 1").err("42601"),
        q("SELECT (1").err("42601"),
        q("SELECT 1/0").err("22012").status('I'),
        q("SELECT 1::numeric / 0").err("22012"),
        q("SELECT * FROM no_such_table").err("42P01"),
        q("SELECT 'abc'::int").err("22P02"),
        q("SELECT 1 + 'a'").err("22P02"),
        q("SELECT no_such_function(1)").err("42883"),
        q("SELECT 2147483647::int4 + 1").err("22003"),
        // --- DDL -----------------------------------------------------------------------
        q("CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy')"),
        q("CREATE TYPE pair AS (a int, b text)"),
        q("CREATE DOMAIN posint AS int CHECK (VALUE > 0)"),
        q("CREATE SEQUENCE seq1 START 100 INCREMENT 5"),
        q("CREATE TABLE items (id serial PRIMARY KEY, name text NOT NULL UNIQUE, \
           qty int DEFAULT 0, price numeric(10,2), m mood, p pair, created date)"),
        q("CREATE TABLE items (id int)").err("42P07"),
        q("CREATE INDEX items_qty_idx ON items (qty)"),
        q("CREATE UNIQUE INDEX items_lower_name ON items (lower(name))"),
        q("CREATE VIEW cheap_items AS SELECT id, name, price FROM items WHERE price < 10"),
        q("CREATE TABLE kv (k text PRIMARY KEY, v int)"),
        q("ALTER TABLE items ADD COLUMN note varchar(20)"),
        q("COMMENT ON TABLE items IS 'inventory'"),
        q("CREATE FUNCTION add_one(x int) RETURNS int LANGUAGE plpgsql AS $$ \
           BEGIN RETURN x + 1; END $$"),
        q("CREATE FUNCTION items_by_mood(mm mood) RETURNS SETOF items LANGUAGE plpgsql AS $$ \
           BEGIN RETURN QUERY SELECT * FROM items WHERE m = mm ORDER BY id; END $$"),
        q("CREATE FUNCTION fail_with(code text) RETURNS void LANGUAGE plpgsql AS $$ \
           BEGIN RAISE EXCEPTION USING ERRCODE = code, MESSAGE = 'custom failure ' || code, \
           DETAIL = 'the detail', HINT = 'the hint'; END $$"),
        q("CREATE PROCEDURE insert_kv(key text, val int) LANGUAGE plpgsql AS $$ \
           BEGIN INSERT INTO kv VALUES (key, val); END $$"),
        q("CREATE TABLE gen_t (a int, b int GENERATED ALWAYS AS (a * 2) STORED, \
           c int GENERATED ALWAYS AS IDENTITY)"),
        // --- DML with RETURNING ----------------------------------------------------------
        q("INSERT INTO items (name, qty, price, m, p, created) VALUES \
           ('apple', 10, 1.50, 'happy', ROW(1, 'x'), '2024-01-15') RETURNING *"),
        q("INSERT INTO items (name, qty, price, m, p, created) VALUES \
           ('pear', 3, 12.00, 'ok', ROW(2, NULL), '2024-02-01'), \
           ('plum', 7, 0.99, 'sad', NULL, NULL), ('fig', NULL, NULL, NULL, NULL, NULL) \
           RETURNING id, name, price"),
        q("INSERT INTO items (name) VALUES ('apple')").err("23505"),
        q("INSERT INTO items (name) VALUES (NULL)").err("23502"),
        q("INSERT INTO items (name, m) VALUES ('bad', 'angry')").err("22P02"),
        q("INSERT INTO items (name, qty) SELECT 'gen' || g, g FROM generate_series(1, 50) g"),
        q("INSERT INTO kv VALUES ('a', 1), ('b', 2) ON CONFLICT (k) DO NOTHING RETURNING k"),
        q("INSERT INTO kv VALUES ('a', 10), ('c', 3) ON CONFLICT (k) \
           DO UPDATE SET v = kv.v + EXCLUDED.v RETURNING k, v"),
        q("INSERT INTO kv VALUES ('a', 0) ON CONFLICT DO NOTHING"),
        q("UPDATE items SET qty = qty + 1 WHERE qty > 45 RETURNING id, qty"),
        q("UPDATE items SET note = 'this is far too long for twenty' WHERE id = 1").err("22001"),
        q("DELETE FROM kv WHERE k = 'b' RETURNING *"),
        q("DELETE FROM items WHERE name = 'nothing'"),
        q("INSERT INTO gen_t (a) VALUES (1), (2) RETURNING *"),
        q("INSERT INTO gen_t (a, b) VALUES (1, 1)").err("428C9"),
        q("WITH upd AS (UPDATE items SET note = 'cheap' WHERE price < 5 RETURNING id) \
           SELECT count(*) FROM upd"),
        q("MERGE INTO kv USING (VALUES ('z', 26), ('a', 100)) AS s(k, v) ON kv.k = s.k \
           WHEN MATCHED THEN UPDATE SET v = s.v WHEN NOT MATCHED THEN INSERT VALUES (s.k, s.v)"),
        q("SELECT * FROM items ORDER BY id LIMIT 6"),
        q("SELECT * FROM cheap_items ORDER BY id"),
        q("TABLE kv ORDER BY k"),
        q("SELECT add_one(41), add_one(NULL)"),
        q("SELECT * FROM items_by_mood('happy')"),
        q("SELECT fail_with('AB123')").err("AB123"),
        q("CALL insert_kv('proc', 7)"),
        q("SELECT nextval('seq1'), nextval('seq1')"),
        q("SELECT currval('seq1'), setval('seq1', 1000), nextval('seq1')"),
        q("SELECT (-1)::posint").err("23514"),
        q("SELECT nosuchcol FROM items").err("42703"),
        q("SELECT * FROM items WHERE nosuch = 1").err("42703"),
        q("SELECT count(*), sum(qty), avg(qty), min(name), max(name), \
           sum(price), avg(price) FROM items"),
        q("SELECT m, count(*) FROM items GROUP BY m ORDER BY m NULLS FIRST"),
        q("SELECT id, sum(qty) OVER (ORDER BY id) FROM items ORDER BY id LIMIT 8"),
        q("SELECT * INTO items_copy FROM items WHERE id <= 10"),
        q("CREATE TABLE items_ctas AS SELECT id, name FROM items WHERE id > 40"),
        q("CREATE MATERIALIZED VIEW mood_counts AS SELECT m, count(*) AS n FROM items GROUP BY m"),
        q("REFRESH MATERIALIZED VIEW mood_counts"),
        q("SELECT * FROM mood_counts ORDER BY m"),
        q("TRUNCATE items_copy"),
        q("EXPLAIN (COSTS OFF) SELECT * FROM kv"),
        q("VACUUM kv"),
        q("ANALYZE kv"),
        q("DROP TABLE IF EXISTS no_such_table"),
        q("DROP TYPE mood").err("2BP01"),
        q("DROP TABLE items_ctas"),
        q("SELECT 'x' FROM generate_series(1, 3) WHERE false"),
        q("VALUES (1, 'a'), (2, 'b')"),
        q("SELECT 1 AS x UNION ALL SELECT 2 ORDER BY 1"),
        q("SELECT x, y FROM generate_series(1, 3) AS g(x) CROSS JOIN LATERAL (SELECT x * 10) s(y)"),
        q("SELECT format('%s|%L|%I', 'a', 'b''c', 'Col'), regexp_replace('hello', 'l+', 'L'), \
           'abc' ~ 'b'"),
        q("SELECT current_user, session_user, current_setting('server_encoding')"),
        // --- transactions ----------------------------------------------------------------
        q("BEGIN").status('T'),
        q("INSERT INTO kv VALUES ('t1', 1)").status('T'),
        q("SELECT k, v FROM kv WHERE k = 't1'").status('T'),
        q("COMMIT").status('I'),
        q("BEGIN").status('T'),
        q("INSERT INTO kv VALUES ('t2', 2)").status('T'),
        q("ROLLBACK").status('I'),
        q("SELECT count(*) FROM kv WHERE k = 't2'").status('I'),
        q("BEGIN").status('T'),
        q("SAVEPOINT sp1").status('T'),
        q("INSERT INTO kv VALUES ('s1', 1)").status('T'),
        q("ROLLBACK TO SAVEPOINT sp1").status('T'),
        q("SAVEPOINT sp2").status('T'),
        q("INSERT INTO kv VALUES ('s2', 2)").status('T'),
        q("RELEASE SAVEPOINT sp2").status('T'),
        q("SAVEPOINT sp3").status('T'),
        q("SELECT no_such_column FROM kv").err("42703").status('E'),
        q("ROLLBACK TO sp3").status('T'),
        q("COMMIT").status('I'),
        q("SELECT k FROM kv WHERE k LIKE 's%' ORDER BY k"),
        q("BEGIN").status('T'),
        q("INSERT INTO kv VALUES ('e1', 1)").status('T'),
        q("SELECT 1/0").err("22012").status('E'),
        q("SELECT 1").err("25P02").status('E'),
        q("COMMIT").status('I'),
        q("SELECT count(*) FROM kv WHERE k = 'e1'"),
        q("BEGIN").status('T'),
        q("SELECT 1/0").err("22012").status('E'),
        q("ROLLBACK").status('I'),
        q("COMMIT").status('I'),
        q("ROLLBACK").status('I'),
        q("BEGIN ISOLATION LEVEL REPEATABLE READ").status('T'),
        q("SHOW transaction_isolation").status('T'),
        q("BEGIN").status('T'),
        q("COMMIT").status('I'),
        q("START TRANSACTION READ ONLY").status('T'),
        q("INSERT INTO kv VALUES ('ro', 1)").err("25006").status('E'),
        q("ROLLBACK").status('I'),
        q("BEGIN").status('T'),
        q("LOCK TABLE kv IN ACCESS EXCLUSIVE MODE").status('T'),
        q("SET LOCAL TimeZone = 'Asia/Tokyo'").status('T'),
        q("SHOW TimeZone").status('T'),
        q("COMMIT").status('I'),
        q("LOCK TABLE kv").err("25P01"),
        q("BEGIN; INSERT INTO kv VALUES ('m1', 1); COMMIT").simple_only(),
        q("SELECT 1 AS a; SELECT 2 AS b, 3 AS c; VALUES ('x')").simple_only(),
        q("INSERT INTO kv VALUES ('m2', 1); SELECT 1/0; INSERT INTO kv VALUES ('m3', 1)")
            .simple_only()
            .err("22012"),
        q("SELECT count(*) FROM kv WHERE k IN ('m2', 'm3')"),
        q("SELECT 1; SELEC 2").simple_only().err("42601"),
        q("BEGIN; SELECT 1/0; COMMIT").simple_only().err("22012").status('E'),
        q("ROLLBACK").status('I'),
        q("CREATE TABLE multi_t (a int); INSERT INTO multi_t VALUES (1), (2); \
           UPDATE multi_t SET a = a + 1 RETURNING a; DROP TABLE multi_t")
        .simple_only(),
        // --- types -------------------------------------------------------------------------
        q("SELECT '-32768'::int2, 32767::int2, '-2147483648'::int4, 2147483647, \
           '-9223372036854775808'::int8, 9223372036854775807"),
        q("SELECT 'NaN'::numeric, 'Infinity'::numeric, '-Infinity'::numeric, 0::numeric, \
           -0.0::numeric, 0.000000000000000000000000000001::numeric"),
        q("SELECT 123456789012345678901234567890.123456789012345678901234567890::numeric, \
           1::numeric / 3, 2::numeric ^ 200, 1.5::numeric(10,4), 12.345::numeric(5,1), \
           '1e-100'::numeric"),
        q("SELECT 'NaN'::float8, 'Infinity'::float8, '-Infinity'::float8, '-0'::float8, \
           0.1::float8, 1e308::float8, 5e-324::float8, pi()"),
        q("SELECT 'NaN'::float4, 'Infinity'::float4, '-Infinity'::float4, '-0'::float4, \
           0.1::float4, 3.4e38::float4, 1.17549435e-38::float4"),
        q("SET extra_float_digits = 0"),
        q("SELECT 0.1::float8, 1/3::float8, 0.1::float4, 1e100::float8"),
        q("SET extra_float_digits = 3"),
        q("SELECT 0.1::float8, 1/3::float8, 0.1::float4, 1e100::float8"),
        q("RESET extra_float_digits"),
        q("SELECT 'hello'::text, 'abc'::varchar(5), 'abcdef'::varchar(3), 'ab'::char(5), \
           ''::text, E'tab\\there\\nnewline'::text, 'unicode ✓ ñ 日本 🐘'::text, \
           'nm'::name, 'q'::\"char\""),
        q("SELECT '\\xdeadbeef'::bytea, ''::bytea, decode('00ff10', 'hex'), 'a\\\\b'::bytea"),
        q("SET bytea_output = 'escape'"),
        q("SELECT '\\xdeadbeef00'::bytea, 'plain'::bytea"),
        q("RESET bytea_output"),
        q("SELECT true, false, NULL::bool, 'yes'::bool"),
        q("SELECT '2024-02-29'::date, 'infinity'::date, '-infinity'::date, \
           '4713-01-01 BC'::date, '5874897-12-31'::date"),
        q("SELECT '13:45:10.123456'::time, '24:00'::time, '13:45:10+05:30'::timetz, \
           '00:00:00.5-14'::timetz, '13:45:10.987'::time(1)"),
        q("SELECT '2024-03-10 02:30:00'::timestamp, 'infinity'::timestamp, \
           '2000-01-01 00:00:00.000001'::timestamp, '2000-01-01 12:34:56.789'::timestamp(2), \
           '1999-12-31 23:59:59 BC'::timestamp"),
        q("SET TimeZone = 'UTC'"),
        q("SELECT '2024-03-10 12:00:00+00'::timestamptz, '2024-07-01 12:00:00'::timestamptz, \
           'infinity'::timestamptz"),
        q("SET TimeZone = 'America/New_York'"),
        q("SELECT '2024-03-10 12:00:00+00'::timestamptz, '2024-07-01 12:00:00'::timestamptz, \
           '1883-11-18 12:00:00+00'::timestamptz"),
        q("SET TIME ZONE 'Asia/Kolkata'"),
        q("SELECT '2024-03-10 12:00:00+00'::timestamptz, \
           '2024-03-10 12:00:00+00'::timestamptz AT TIME ZONE 'Australia/Adelaide'"),
        q("SELECT '1 year 2 months 3 days 04:05:06.789'::interval, '-1 day +02:00'::interval, \
           '0'::interval, interval '1' hour, '-1 year -2 mons +3 days'::interval"),
        q("SET IntervalStyle = 'postgres_verbose'"),
        q("SELECT '1 year 2 months 3 days 04:05:06.789'::interval, '-1 day +02:00'::interval"),
        q("SET IntervalStyle = 'iso_8601'"),
        q("SELECT '1 year 2 months 3 days 04:05:06.789'::interval, '-1 day +02:00'::interval"),
        q("SET IntervalStyle = 'sql_standard'"),
        q("SELECT '1 year 2 months 3 days 04:05:06.789'::interval, '-1 day +02:00'::interval"),
        q("RESET IntervalStyle"),
        q("SET DateStyle = 'SQL, DMY'"),
        q("SELECT '2024-02-29'::date, '2024-02-29 13:14:15'::timestamp, \
           '2024-02-29 13:14:15+00'::timestamptz"),
        q("SET DateStyle = 'German'"),
        q("SELECT '2024-02-29'::date, '2024-02-29 13:14:15'::timestamp"),
        q("SET DateStyle = 'Postgres, MDY'"),
        q("SELECT '2024-02-29'::date, '2024-02-29 13:14:15+00'::timestamptz"),
        q("RESET DateStyle"),
        q("SELECT 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid, \
           '{A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A12}'::uuid"),
        q("SELECT '{\"b\": [1, 2, {\"c\": null}], \"a\": 1}'::json, \
           '{\"b\": [1, 2, {\"c\": null}], \"a\": 1}'::jsonb, '[]'::jsonb, '\"str\"'::jsonb, \
           'null'::jsonb, jsonb_build_object('k', 1.50, 'u', 'ü')"),
        q("SELECT '{\"a\": {\"b\": 2}}'::jsonb -> 'a', '{\"a\": {\"b\": 2}}'::jsonb #>> '{a,b}', \
           jsonb_path_query_array('{\"a\": [1, 2, 3]}', '$.a[*] ? (@ > 1)')"),
        q("SELECT ARRAY[1, 2, 3], ARRAY[[1, 2], [3, 4]], ARRAY[1, NULL, 3], '{}'::int[], \
           '[2:3]={5,6}'::int[], ARRAY[[[1]]]::int8[], ARRAY[1.5, 2.25]::numeric[]"),
        q("SELECT ARRAY['a', 'b c', '\"q\"', NULL, '', 'NULL']::text[], \
           '{{a,b},{c,NULL}}'::varchar[], ARRAY['2024-01-01'::date], ARRAY[true, false]"),
        q("SELECT ARRAY['\\x01ff'::bytea], ARRAY['1 day'::interval], \
           ARRAY['a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid], ARRAY['{\"a\": 1}'::jsonb], \
           ARRAY['NaN'::float8, '-Infinity'], ARRAY[int4range(1, 3)]"),
        q("SELECT int4range(1, 10), '[1,5]'::int4range, 'empty'::int4range, \
           numrange(1.5, 2.5, '(]'), daterange('2024-01-01', NULL), \
           tstzrange('2024-01-01 00:00+00', '2024-01-02 00:00+00'), int8range(NULL, 5)"),
        q("SELECT '{[1,3), [5,7)}'::int4multirange, '{}'::datemultirange"),
        q("SELECT 'happy'::mood, ARRAY['sad', 'ok']::mood[], ROW(1, 'a')::pair, \
           ARRAY[ROW(2, 'b')::pair, NULL]"),
        q("SELECT ROW(1, 'x', NULL), ROW('happy'::mood, ARRAY[1, 2]), \
           ROW(ROW(1, 'y')::pair, 'ok'::mood)"),
        q("SELECT p, m, (p).a, (p).b FROM items WHERE p IS NOT NULL ORDER BY id"),
        q("SELECT 5::posint, ARRAY[3::posint]"),
        q("SELECT '12.34'::money, '-1234.56'::money, 0::money"),
        q("SELECT '192.168.1.5/24'::inet, '10.0.0.0/8'::cidr, '::1'::inet, \
           '2001:db8::/32'::cidr, '08:00:2b:01:02:03'::macaddr, '08:00:2b:01:02:03:04:05'::macaddr8"),
        q("SELECT B'1010'::bit(4), B'101'::varbit, '(1,2)'::point, '((0,0),(1,1))'::box, \
           '<(0,0),1>'::circle, '[(0,0),(1,1)]'::lseg, '{1,-1,0}'::line"),
        q("SELECT to_tsvector('simple', 'The quick brown fox'), 'fat & rat'::tsquery"),
        q("SELECT 'pg_class'::regclass, 'int4'::regtype, 'now'::regproc, 123::oid, \
           'x'::\"char\", pg_typeof(1::int2)"),
        q("SELECT pg_sleep(0), pg_typeof(pg_sleep(0))"),
        q("CREATE TABLE typed_t (vc varchar(10), ch char(3), num numeric(12,3), \
           ts timestamp(3), tstz timestamptz(0), t time(2), b bit(3), arr int[], \
           vca varchar(4)[], iv interval(0), js jsonb)"),
        q("INSERT INTO typed_t VALUES ('abc', 'x', 1.23456, '2024-01-01 01:02:03.456789', \
           '2024-01-01 01:02:03.5+00', '01:02:03.456', B'101', '{1,2}', '{ab,cd}', \
           '1 day 01:02:03.7', '{\"z\": [true]}'), (NULL, NULL, NULL, NULL, NULL, NULL, \
           NULL, NULL, NULL, NULL, NULL)"),
        q("SELECT * FROM typed_t ORDER BY vc NULLS LAST"),
        // --- SET / SHOW ------------------------------------------------------------------------
        q("SHOW TimeZone"),
        q("SHOW DateStyle"),
        q("SHOW server_encoding"),
        q("SHOW client_encoding"),
        q("SHOW standard_conforming_strings"),
        q("SHOW integer_datetimes"),
        q("SHOW search_path"),
        q("SHOW no_such_setting").err("42704"),
        q("SET application_name = 'pgfan-diff'"),
        q("SHOW application_name"),
        q("SET search_path = public, pg_catalog"),
        q("SHOW search_path"),
        q("SET statement_timeout = '50s'"),
        q("SHOW statement_timeout"),
        q("RESET statement_timeout"),
        q("SET work_mem = '8MB'"),
        q("SET no_such_setting = 1").err("42704"),
        q("SET pgfan_test.custom = 'on'"),
        q("SELECT current_setting('pgfan_test.custom')"),
        q("SET standard_conforming_strings = off"),
        q("SELECT 'a\\\\b' AS escaped"),
        q("RESET standard_conforming_strings"),
        q("SET client_encoding = 'LATIN1'"),
        q("SELECT 'caf' || chr(233) AS latin1"),
        q("RESET client_encoding"),
        q("SET client_min_messages = warning"),
        q("DO $$ BEGIN RAISE NOTICE 'suppressed'; RAISE WARNING 'shown'; END $$"),
        q("RESET client_min_messages"),
        q("SET TimeZone = 'Europe/Berlin'"),
        q("RESET ALL"),
        q("SHOW TimeZone"),
        // --- temp tables ---------------------------------------------------------------------
        q("CREATE TEMP TABLE tmp1 (a int, b text) ON COMMIT PRESERVE ROWS"),
        q("INSERT INTO tmp1 VALUES (1, 'one'), (2, 'two')"),
        q("SELECT * FROM tmp1 ORDER BY a"),
        q("BEGIN"),
        q("CREATE TEMP TABLE tmp2 (x int) ON COMMIT DROP"),
        q("INSERT INTO tmp2 VALUES (1)"),
        q("SELECT * FROM tmp2"),
        q("COMMIT"),
        q("SELECT * FROM tmp2").err("42P01"),
        q("CREATE TEMP TABLE tmp1 (a int)").err("42P07"),
        // --- SQL-level prepared statements ----------------------------------------------------
        q("PREPARE p_add(int, int) AS SELECT $1 + $2 AS sum"),
        q("EXECUTE p_add(2, 3)"),
        q("PREPARE p_items(text) AS SELECT id, name, m FROM items WHERE name = $1"),
        q("EXECUTE p_items('apple')"),
        q("PREPARE p_ins(text, int) AS INSERT INTO kv VALUES ($1, $2) RETURNING k"),
        q("EXECUTE p_ins('prep', 5)"),
        q("EXECUTE no_such_prepared(1)").err("26000"),
        q("PREPARE p_add(int) AS SELECT 1").err("42P05"),
        q("SELECT name, statement, parameter_types FROM pg_prepared_statements ORDER BY name"),
        q("DEALLOCATE p_add"),
        q("EXECUTE p_add(1, 2)").err("26000"),
        q("DEALLOCATE ALL"),
        // --- cursors -------------------------------------------------------------------------
        q("DECLARE c_out CURSOR FOR SELECT 1").err("25P01"),
        q("BEGIN"),
        q("DECLARE c1 SCROLL CURSOR FOR SELECT g, g * 2 AS double FROM generate_series(1, 20) g"),
        q("FETCH 3 FROM c1"),
        q("FETCH NEXT FROM c1"),
        q("MOVE FORWARD 5 IN c1"),
        q("FETCH BACKWARD 2 FROM c1"),
        q("FETCH ALL FROM c1"),
        q("FETCH 1 FROM c1"),
        q("CLOSE c1"),
        q("FETCH 1 FROM c1").err("34000").status('E'),
        q("ROLLBACK"),
        q("BEGIN"),
        q("DECLARE ch CURSOR WITH HOLD FOR SELECT id, name FROM items ORDER BY id"),
        q("DECLARE cb BINARY CURSOR FOR SELECT 1::int4 AS i, 'x'::text AS t, 1.5::float8 AS f"),
        q("FETCH ALL FROM cb"),
        q("COMMIT"),
        q("FETCH 2 FROM ch"),
        q("MOVE ALL IN ch"),
        q("CLOSE ch"),
        // --- COPY --------------------------------------------------------------------------------
        q("CREATE TABLE copy_t (id int, name text, amount numeric, at date)"),
        q("COPY copy_t FROM STDIN").copy(&[
            b"1\talpha\t1.5\t2024-01-01\n2\tbe",
            b"ta\t\\N\t2024-02-01\n",
            b"3\tgamma \\t tab\t-0.25\t\\N\n",
        ]),
        q("COPY copy_t FROM STDIN (FORMAT csv, HEADER true)").copy(&[
            b"id,name,amount,at\n4,\"delta, with comma\",3.25,2024-03-01\n",
            b"5,,,\n6,\"\",\"7\",2024-03-02\n",
        ]),
        q("COPY copy_t (id, name, amount, at) FROM STDIN (FORMAT binary)").copy(&[&binary_copy(&[
            (Some(7), Some("epsilon")),
            (Some(8), None),
            (None, Some("no id")),
        ])]),
        q("COPY copy_t FROM STDIN").copy(&[b"x\ty\n"]).err("22P02"),
        q("COPY copy_t FROM STDIN").err("57014"),
        q("COPY no_such_table FROM STDIN").copy(&[b"1\n"]).err("42P01"),
        q("COPY copy_t TO STDOUT"),
        q("COPY (SELECT * FROM copy_t ORDER BY id) TO STDOUT (FORMAT csv, HEADER)"),
        q("COPY (SELECT * FROM copy_t ORDER BY id) TO STDOUT (FORMAT binary)"),
        q("COPY copy_t (id, name) TO STDOUT WITH (DELIMITER '|', NULL 'nil')"),
        q("COPY (SELECT g, 'line ' || g FROM generate_series(1, 10000) g) TO STDOUT"),
        q("COPY copy_t FROM STDIN").copy_bytes(text_copy_chunks(100, 5000, 65536)),
        q("SELECT count(*), sum(id), sum(amount), min(at), max(name) FROM copy_t"),
        // --- LISTEN / NOTIFY -------------------------------------------------------------------
        q("LISTEN chan_a"),
        q("NOTIFY chan_a, 'hello'"),
        q("SELECT pg_notify('chan_a', 'via function')"),
        q("NOTIFY chan_b, 'nobody listens'"),
        q("BEGIN"),
        q("NOTIFY chan_a, 'deferred'"),
        q("NOTIFY chan_a, 'deferred'"),
        q("NOTIFY chan_a, 'second'"),
        q("COMMIT"),
        q("BEGIN"),
        q("NOTIFY chan_a, 'rolled back'"),
        q("ROLLBACK"),
        q("LISTEN \"Mixed Case\""),
        q("NOTIFY \"Mixed Case\""),
        q("UNLISTEN chan_a"),
        q("NOTIFY chan_a, 'after unlisten'"),
        q("LISTEN chan_c; NOTIFY chan_c, 'in one string'; SELECT 1").simple_only(),
        q("UNLISTEN *"),
        // --- DO blocks and RAISE -----------------------------------------------------------------
        q("DO $$ BEGIN RAISE NOTICE 'hello %', 42; END $$"),
        q("DO $$ BEGIN RAISE WARNING 'careful' USING DETAIL = 'some detail', HINT = 'a hint'; END $$"),
        q("DO $$ BEGIN RAISE INFO 'info message'; RAISE LOG 'log only'; RAISE DEBUG 'hidden'; END $$"),
        q("DO $$ BEGIN RAISE EXCEPTION 'custom boom %', 7 USING ERRCODE = 'AB123'; END $$")
            .err("AB123"),
        q("DO $$ BEGIN RAISE EXCEPTION USING ERRCODE = 'unique_violation', \
           MESSAGE = 'fake unique', COLUMN = 'c1', TABLE = 't1', CONSTRAINT = 'k1', \
           SCHEMA = 's1', DATATYPE = 'int4'; END $$")
        .err("23505"),
        q("DO $$ BEGIN PERFORM 1/0; EXCEPTION WHEN division_by_zero THEN \
           RAISE NOTICE 'caught: %', SQLERRM; END $$"),
        q("DO $$ DECLARE r record; BEGIN FOR r IN SELECT g FROM generate_series(1, 3) g LOOP \
           RAISE NOTICE 'row %', r.g; END LOOP; END $$"),
        q("DO $$ BEGIN PERFORM fail_with('XX001'); END $$").err("XX001"),
        q("SELECT pg_advisory_lock(4242), pg_try_advisory_lock(4242)"),
        q("SELECT pg_advisory_unlock(4242), pg_advisory_unlock(4242), pg_advisory_unlock(4242)"),
        // --- big values ----------------------------------------------------------------------------
        q("SELECT repeat('abcdefghij', 100000) AS one_mb"),
        q("CREATE TABLE big_t (id int, v text)"),
        q("INSERT INTO big_t SELECT 1, repeat('0123456789abcdef', 65536)"),
        q("SELECT id, length(v), v FROM big_t"),
        q("SELECT g, g::text || 'x' AS t, g * 1.5 AS n FROM generate_series(1, 100000) g"),
        q("SELECT count(*), sum(g) FROM generate_series(1, 1000000) g"),
        // --- extended protocol with parameters -------------------------------------------------------
        q("SELECT $1::int + 1").params(&[Some("41")]),
        q("SELECT $1::text IS NULL, $2::int").params(&[None, None]),
        q("SELECT $1").params(&[Some("untyped")]),
        q("SELECT $1::int").params(&[Some("abc")]).err("22P02"),
        q("SELECT $1, $2").params(&[Some("1")]).err("08P01"),
        q("SELECT $1::int4[], $2::jsonb, $3::timestamptz, $4::numeric, $5::bytea").params(&[
            Some("{1,NULL,3}"),
            Some("{\"k\": [1, 2]}"),
            Some("2024-01-01 12:00:00+02"),
            Some("NaN"),
            Some("\\x00ff"),
        ]),
        q("INSERT INTO kv VALUES ($1, $2::int) RETURNING *").params(&[Some("param"), Some("9")]),
        q("SELECT id, name FROM items WHERE name = ANY($1::text[]) ORDER BY id")
            .params(&[Some("{apple,pear,nothing}")]),
        q("SELECT $1::mood, $2::pair").params(&[Some("ok"), Some("(3,z)")]),
        q("UPDATE items SET qty = $1 WHERE name = $2 RETURNING id, qty")
            .params(&[Some("99"), Some("fig")]),
    ];

    // --- generated: big SQL text, many parameters, many columns ------------------------
    c.push(q("SELECT length($1), md5($1), left($1, 20)").params(&[Some(one_mb.as_str())]));
    c.push(
        q("INSERT INTO big_t VALUES (2, $1) RETURNING id, length(v)")
            .params(&[Some(one_mb.as_str())]),
    );
    c.push(q(format!(
        "SELECT length('{one_mb}') AS one_mb_of_sql_text"
    )));
    let placeholders: Vec<String> = (1..=1000).map(|i| format!("${i}::int")).collect();
    let values: Vec<String> = (1..=1000).map(|i| i.to_string()).collect();
    let value_refs: Vec<Option<&str>> = values.iter().map(|v| Some(v.as_str())).collect();
    c.push(
        q(format!(
            "SELECT array_length(ARRAY[{}], 1) AS n, ARRAY[{}] AS a",
            placeholders.join(", "),
            placeholders[..10].join(", ")
        ))
        .params(&value_refs),
    );
    let columns: Vec<String> = (1..=1000).map(|i| format!("{i} AS c{i}")).collect();
    c.push(q(format!("SELECT {}", columns.join(", "))));
    c.push(
        q("COPY copy_t (id, name) FROM STDIN").copy_bytes(vec![Bytes::from(
            (0..20000)
                .map(|i| format!("{}\tline {i} {}\n", 100000 + i, "z".repeat(40)))
                .collect::<String>(),
        )]),
    );

    c.extend([
        // --- streams interrupted by errors, notices between rows ---------------------------
        q("CREATE FUNCTION noisy(i int) RETURNS int LANGUAGE plpgsql AS $$ \
           BEGIN RAISE NOTICE 'row %', i; RETURN i * 10; END $$"),
        q("SELECT g, noisy(g) FROM generate_series(1, 3) g"),
        q("SELECT 10 / (5 - g) FROM generate_series(1, 10) g").err("22012"),
        q("SELECT CASE WHEN g = 50000 THEN 1 / (g - g) ELSE g END \
           FROM generate_series(1, 100000) g")
        .err("22012"),
        q("COPY (SELECT 10 / (3 - g) FROM generate_series(1, 5) g) TO STDOUT").err("22012"),
        q("DO $$ BEGIN RAISE EXCEPTION '%', repeat('e', 100000); END $$").err("P0001"),
        q("SELECT set_config('TimeZone', 'Pacific/Chatham', false)"),
        q("SELECT '2024-01-01 00:00:00+00'::timestamptz"),
        q("SELECT set_config('TimeZone', 'UTC', true)"),
        q("SET statement_timeout = '20ms'"),
        q("SELECT pg_sleep(2)").err("57014"),
        q("RESET statement_timeout"),
        q("SET SESSION AUTHORIZATION pg_read_all_data"),
        q("SELECT current_user, session_user"),
        q("CREATE TABLE not_allowed (a int)").err("42501"),
        q("SELECT count(*) FROM kv"),
        q("RESET SESSION AUTHORIZATION"),
        q("SELECT 1 AS \"ünïcødé 🐘\", '' AS empty, NULL::text AS null_text, ''::bytea AS empty_bytea"),
        q("CREATE TABLE multi_copy (a int, b text); COPY multi_copy FROM STDIN; \
           SELECT count(*), max(b) FROM multi_copy")
        .simple_only()
        .copy(&[b"1\tone\n2\ttwo\n"]),
        q("LISTEN chan_big"),
        q("SELECT pg_notify('chan_big', repeat('p', 7999))"),
        q("UNLISTEN chan_big"),
        // --- end: DISCARD and CASCADE ------------------------------------------------------------------
        q("DISCARD ALL"),
        q("SELECT * FROM tmp1").err("42P01"),
        q("DROP TABLE items CASCADE"),
        q("DROP TYPE mood CASCADE"),
    ]);
    c
}

// ---------------------------------------------------------------------------------------
// Runner
// ---------------------------------------------------------------------------------------

async fn run_stmt(client: &mut WireClient, stmt: &Stmt, mode: Mode) -> std::io::Result<Transcript> {
    let copy = stmt.copy.as_deref();
    match mode.format() {
        None => client.simple_query_copy(&stmt.sql, copy).await,
        Some(format) => {
            let params: Vec<Option<&str>> = stmt.params.iter().map(|p| p.as_deref()).collect();
            client
                .extended_query_copy(&stmt.sql, &params, format, copy)
                .await
        }
    }
}

fn short_sql(sql: &str) -> String {
    let one_line: String = sql.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() > 160 {
        format!("{}…", one_line.chars().take(160).collect::<String>())
    } else {
        one_line
    }
}

/// Checks the direct transcript against the corpus annotations (catches corpus bugs that
/// would otherwise compare equal on both sides and test nothing).
fn check_expectation(stmt: &Stmt, t: &Transcript) -> Option<String> {
    let mut problems = Vec::new();
    match (&stmt.expect, t.error_code()) {
        (Expect::Ok, Some(code)) => problems.push(format!(
            "expected success, got error {code}: {:?}",
            t.errors().next()
        )),
        (Expect::Error(want), None) => problems.push(format!("expected error {want}, got none")),
        (Expect::Error(want), Some(code)) if *want != code => problems.push(format!(
            "expected error {want}, got {code}: {:?}",
            t.errors().next()
        )),
        _ => {}
    }
    if let Some(want) = stmt.status {
        if t.status() != Some(want) {
            problems.push(format!(
                "expected ReadyForQuery {want}, got {:?}",
                t.status()
            ));
        }
    }
    if t.count(|m| matches!(m, Msg::ReadyForQuery(_))) != 1 {
        problems.push("expected exactly one ReadyForQuery".into());
    }
    (!problems.is_empty()).then(|| problems.join("; "))
}

/// What one run of a corpus in one mode found.
#[derive(Default)]
struct Outcome {
    ran: usize,
    /// Full diffs, one per differing statement.
    mismatches: Vec<String>,
    /// One line per differing statement.
    index: Vec<String>,
    /// Direct transcripts that do not match the corpus annotations.
    corpus_bugs: Vec<String>,
    /// The statement at which the compared session failed (later ones did not run).
    dead_at: Option<String>,
    /// Every direct transcript, for review.
    dump: String,
}

/// Runs `corpus` in `mode` on both sessions statement by statement and compares.
async fn compare_corpus(
    mode: Mode,
    corpus: &[Stmt],
    direct: &mut WireClient,
    proxied: &mut WireClient,
) -> Outcome {
    let mut out = Outcome::default();
    let (sd, sp) = (
        direct.startup_parameters_sorted(),
        proxied.startup_parameters_sorted(),
    );
    if sd != sp {
        out.index.push("startup ParameterStatus".into());
        out.mismatches.push(format!(
            "[{}] startup ParameterStatus differ:\n{}",
            mode.tag(),
            param_diff(&sd, &sp)
        ));
    }
    for (i, stmt) in corpus.iter().enumerate() {
        if !stmt.runs_in(mode) {
            continue;
        }
        out.ran += 1;
        let sql = short_sql(&stmt.sql);
        let d = run_stmt(direct, stmt, mode)
            .await
            .unwrap_or_else(|e| panic!("[{}] #{i} {sql}: direct session failed: {e}", mode.tag()));
        out.dump.push_str(&format!("#{i} {sql}\n{d:?}\n"));
        if let Some(problem) = check_expectation(stmt, &d) {
            out.corpus_bugs
                .push(format!("#{i} {sql}: {problem}\n{d:?}"));
        }
        if out.dead_at.is_some() {
            continue;
        }
        match run_stmt(proxied, stmt, mode).await {
            Ok(p) => {
                if let Some(diff) = wire::diff(&d, &p) {
                    out.index.push(format!("#{i} {sql}"));
                    out.mismatches
                        .push(format!("[{}] statement #{i}: {sql}\n{diff}", mode.tag()));
                }
            }
            Err(e) => {
                out.index.push(format!("#{i} {sql} (session failed)"));
                out.mismatches.push(format!(
                    "[{}] statement #{i}: {sql}\npgfan session failed: {e}\ndirect: {d:?}",
                    mode.tag()
                ));
                out.dead_at = Some(format!("#{i}"));
            }
        }
    }
    out
}

/// One line per parameter whose value differs or that only one side reported.
fn param_diff(direct: &[(String, String)], proxied: &[(String, String)]) -> String {
    let mut names: Vec<&str> = direct
        .iter()
        .chain(proxied.iter())
        .map(|(n, _)| n.as_str())
        .collect();
    names.sort();
    names.dedup();
    let get = |v: &[(String, String)], n: &str| {
        v.iter()
            .filter(|(k, _)| k == n)
            .map(|(_, v)| format!("{v:?}"))
            .collect::<Vec<_>>()
            .join(" and ")
    };
    let mut out = String::new();
    for n in names {
        let (d, p) = (get(direct, n), get(proxied, n));
        if d != p {
            let show = |s: String| {
                if s.is_empty() {
                    "(not sent)".to_string()
                } else {
                    s
                }
            };
            out.push_str(&format!("  {n}: direct {} vs pgfan {}\n", show(d), show(p)));
        }
    }
    out
}

async fn run_mode(mode: Mode) {
    let cluster = cluster();
    let corpus = corpus();
    let db_direct = format!("pgfan_pt_{}_direct", mode.tag());
    let db_proxy = format!("pgfan_pt_{}_proxy", mode.tag());
    create_database(&db_direct).await;
    create_database(&db_proxy).await;
    let pgfan = Pgfan::start(&[]);

    let mut direct = WireClient::connect(&cluster.primary_addr(), "postgres", &db_direct)
        .await
        .expect("connect directly to the primary");
    let mut proxied = match WireClient::connect(&pgfan.addr(), "postgres", &db_proxy).await {
        Ok(c) => c,
        Err(e) => panic!(
            "[{}] cannot connect through pgfan: {e}\npgfan log tail:\n{}",
            mode.tag(),
            pgfan.log_tail()
        ),
    };

    let out = compare_corpus(mode, &corpus, &mut direct, &mut proxied).await;
    let _ = std::fs::write(
        test_logs_dir().join(format!("passthrough-{}-direct.txt", mode.tag())),
        &out.dump,
    );
    assert!(
        out.corpus_bugs.is_empty(),
        "[{}] corpus expectations not met by the direct run ({}):\n{}",
        mode.tag(),
        out.corpus_bugs.len(),
        out.corpus_bugs.join("\n")
    );

    if out.mismatches.is_empty() {
        drop(direct);
        drop(proxied);
        drop_database(&db_direct).await;
        drop_database(&db_proxy).await;
        eprintln!("[{}] {} statements: transcripts equal", mode.tag(), out.ran);
        return;
    }

    let mut report = format!(
        "[{}] {} of {} statements differ between direct and pgfan{}:\n  {}\n\n",
        mode.tag(),
        out.mismatches.len(),
        out.ran,
        match &out.dead_at {
            Some(at) => format!(" (pgfan session died at {at}; later statements not run)"),
            None => String::new(),
        },
        out.index.join("\n  ")
    );
    let full = format!("{report}{}", out.mismatches.join("\n"));
    let path = test_logs_dir().join(format!("passthrough-{}.txt", mode.tag()));
    let _ = std::fs::write(&path, &full);
    const SHOWN: usize = 12;
    report.push_str(&out.mismatches[..out.mismatches.len().min(SHOWN)].join("\n"));
    if out.mismatches.len() > SHOWN {
        report.push_str(&format!("\n… {} more", out.mismatches.len() - SHOWN));
    }
    report.push_str(&format!(
        "\nfull report: {}\npgfan log tail:\n{}",
        path.display(),
        pgfan.log_tail()
    ));
    panic!("{report}");
}

/// The harness itself: two direct sessions that differ only in settings must be reported
/// as different, user OIDs must not cause differences, and SCRAM authentication works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_self_check() {
    let cluster = cluster();
    let (db_a, db_b) = ("pgfan_pt_selfcheck_a", "pgfan_pt_selfcheck_b");
    create_database(db_a).await;
    create_database(db_b).await;
    let mut a = WireClient::connect(&cluster.primary_addr(), "postgres", db_a)
        .await
        .expect("connect a");
    let opts = wire::ConnectOptions::new("postgres", db_b).param("extra_float_digits", "0");
    let mut b = WireClient::connect_with(&cluster.primary_addr(), &opts)
        .await
        .expect("connect b");
    // Shift b's OID counter so that the same objects get other OIDs in the two databases.
    b.simple_query("CREATE TABLE shift_oids (x int); DROP TABLE shift_oids")
        .await
        .unwrap();
    let corpus = vec![
        q("CREATE TYPE color AS ENUM ('red', 'green')"),
        q("CREATE TABLE t (c color, n float8)"),
        q("INSERT INTO t VALUES ('red', 1.0 / 3), ('green', 0.5)"),
        q("SELECT c, ARRAY[c], ROW(c, n) FROM t ORDER BY c"),
        q("SELECT n FROM t ORDER BY c"),
        q("SELECT $1::color").params(&[Some("green")]),
    ];
    for mode in [Mode::Simple, Mode::ExtendedText, Mode::ExtendedBinary] {
        for c in [&mut a, &mut b] {
            c.simple_query("DROP TABLE IF EXISTS t; DROP TYPE IF EXISTS color")
                .await
                .unwrap();
        }
        let out = compare_corpus(mode, &corpus, &mut a, &mut b).await;
        assert!(out.corpus_bugs.is_empty(), "{:?}", out.corpus_bugs);
        assert!(out.dead_at.is_none());
        // Only the float8 text output differs (extra_float_digits); binary float8 and
        // everything with user OIDs compare equal.
        let want: Vec<String> = if mode == Mode::ExtendedBinary {
            vec![]
        } else {
            vec![
                "#3 SELECT c, ARRAY[c], ROW(c, n) FROM t ORDER BY c".into(),
                "#4 SELECT n FROM t ORDER BY c".into(),
            ]
        };
        assert_eq!(out.index, want, "{mode:?}:\n{}", out.mismatches.join("\n"));
    }

    // SCRAM-SHA-256 (role pgfan_pw of scripts/pg-cluster).
    let scram = wire::ConnectOptions::new("pgfan_pw", "postgres").password("pgfan_pw_secret");
    let mut c = WireClient::connect_with(&cluster.primary_addr(), &scram)
        .await
        .expect("SCRAM login of pgfan_pw");
    assert_eq!(c.auth_method, wire::AuthMethod::ScramSha256);
    let t = c.simple_query("SELECT current_user").await.unwrap();
    assert_eq!(t.data_rows()[0][0].as_ref().unwrap().0, &b"pgfan_pw"[..]);
    let bad = wire::ConnectOptions::new("pgfan_pw", "postgres").password("wrong");
    match WireClient::connect_with(&cluster.primary_addr(), &bad).await {
        Err(e) => assert_eq!(e.sqlstate(), Some("28P01"), "{e}"),
        Ok(_) => panic!("login with a wrong password succeeded"),
    }
    drop(a);
    drop(b);
    drop_database(db_a).await;
    drop_database(db_b).await;
}

#[test]
fn corpus_has_at_least_150_statements() {
    let corpus = corpus();
    let n = corpus.len();
    assert!(n >= 150, "corpus has only {n} statements");
    let simple = corpus.iter().filter(|s| s.runs_in(Mode::Simple)).count();
    let ext = corpus
        .iter()
        .filter(|s| s.runs_in(Mode::ExtendedText))
        .count();
    eprintln!("corpus: {n} statements ({simple} in simple mode, {ext} in extended modes)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_simple_protocol() {
    run_mode(Mode::Simple).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_extended_text() {
    run_mode(Mode::ExtendedText).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_extended_binary() {
    run_mode(Mode::ExtendedBinary).await;
}

// ---------------------------------------------------------------------------------------
// Protocol-level prepared statements, portals and pipelines
// ---------------------------------------------------------------------------------------

/// How much to read after sending a step's batch.
#[derive(Clone, Copy)]
enum ReadTo {
    Ready,
    /// That many ReadyForQuery messages (pipelined simple queries).
    ReadyN(usize),
    PortalSuspended,
    ParseComplete,
}

struct Step {
    name: &'static str,
    batch: Batch,
    read: ReadTo,
}

fn step(name: &'static str, read: ReadTo, build: impl FnOnce(&mut Batch)) -> Step {
    let mut batch = Batch::new();
    build(&mut batch);
    Step { name, batch, read }
}

fn protocol_steps() -> Vec<Step> {
    use Format::{Binary, Text};
    use ReadTo::*;
    const SQL: &str = "SELECT i, t FROM five WHERE i >= $1 ORDER BY i";
    vec![
        step("setup", Ready, |b| {
            b.query(
                "CREATE TABLE five (i int PRIMARY KEY, t text); \
                 INSERT INTO five SELECT g, 'row ' || g FROM generate_series(1, 5) g",
            );
        }),
        step("parse named statement", Ready, |b| {
            b.parse("s_five", SQL, &[23]).sync();
        }),
        step("describe statement", Ready, |b| {
            b.describe_statement("s_five").sync();
        }),
        step("execute with 4", Ready, |b| {
            b.bind("", "s_five", &[Some("4")], Text)
                .describe_portal("")
                .execute("", 0)
                .sync();
        }),
        step("execute with 1, binary", Ready, |b| {
            b.bind("", "s_five", &[Some("1")], Binary)
                .describe_portal("")
                .execute("", 0)
                .sync();
        }),
        step("execute with 99, no Describe", Ready, |b| {
            b.bind("", "s_five", &[Some("99")], Text)
                .execute("", 0)
                .sync();
        }),
        step("execute with NULL", Ready, |b| {
            b.bind("", "s_five", &[None], Text).execute("", 0).sync();
        }),
        step("execute with a bad parameter", Ready, |b| {
            b.bind("", "s_five", &[Some("abc")], Text)
                .execute("", 0)
                .sync();
        }),
        step("portal: first 2 rows", PortalSuspended, |b| {
            b.bind("p5", "s_five", &[Some("1")], Text)
                .describe_portal("p5")
                .execute("p5", 2)
                .flush();
        }),
        step("portal: next 2 rows", PortalSuspended, |b| {
            b.execute("p5", 2).flush();
        }),
        step("portal: last row", Ready, |b| {
            b.execute("p5", 2).sync();
        }),
        step("close statement", Ready, |b| {
            b.close_statement("s_five").sync();
        }),
        step("bind closed statement", Ready, |b| {
            b.bind("", "s_five", &[Some("1")], Text)
                .execute("", 0)
                .sync();
        }),
        step("close unknown statement and portal", Ready, |b| {
            b.close_statement("never_prepared")
                .close_portal("never_bound")
                .sync();
        }),
        step("pipeline: second group fails", Ready, |b| {
            b.parse("", "INSERT INTO five VALUES (10, 'ten')", &[])
                .bind("", "", &[], Text)
                .execute("", 0)
                .parse("", "SELECT 1/(i - i) FROM five WHERE i = 1", &[])
                .bind("", "", &[], Text)
                .execute("", 0)
                .parse("", "SELECT 3", &[])
                .bind("", "", &[], Text)
                .execute("", 0)
                .sync();
        }),
        step("pipeline was atomic", Ready, |b| {
            b.query("SELECT count(*) FROM five WHERE i = 10");
        }),
        step("pipeline of named statements", Ready, |b| {
            b.parse("a", "SELECT $1::int * 2 AS doubled", &[])
                .parse("b", "SELECT upper($1::text) AS up", &[])
                .bind("pa", "a", &[Some("21")], Text)
                .bind("pb", "b", &[Some("x")], Binary)
                .describe_portal("pa")
                .describe_portal("pb")
                .execute("pa", 0)
                .execute("pb", 0)
                .close_statement("a")
                .close_statement("b")
                .sync();
        }),
        step("parse error in pipeline", Ready, |b| {
            b.parse("", "SELEC 1", &[])
                .bind("", "", &[], Text)
                .execute("", 0)
                .sync();
        }),
        step("parse then flush", ParseComplete, |b| {
            b.parse("later", "SELECT 42 AS answer", &[]).flush();
        }),
        step("bind after flush", Ready, |b| {
            b.bind("", "later", &[], Text)
                .describe_portal("")
                .execute("", 0)
                .sync();
        }),
        step("duplicate statement name", Ready, |b| {
            b.parse("later", "SELECT 43", &[]).sync();
        }),
        step("describe unnamed empty statement", Ready, |b| {
            b.parse("", "", &[])
                .describe_statement("")
                .bind("", "", &[], Text)
                .describe_portal("")
                .execute("", 0)
                .sync();
        }),
        step("SET through extended protocol", Ready, |b| {
            b.parse("", "SET TimeZone = 'Pacific/Auckland'", &[])
                .bind("", "", &[], Text)
                .describe_portal("")
                .execute("", 0)
                .sync();
        }),
        step("begin", Ready, |b| {
            b.query("BEGIN");
        }),
        step("portal inside a transaction survives Sync", Ready, |b| {
            b.parse("tx", "SELECT g FROM generate_series(1, 5) g", &[])
                .bind("ptx", "tx", &[], Text)
                .execute("ptx", 3)
                .sync();
        }),
        step("resume the portal after Sync", Ready, |b| {
            b.execute("ptx", 0).sync();
        }),
        step("commit", Ready, |b| {
            b.query("COMMIT");
        }),
        step("lone Sync", Ready, |b| {
            b.sync();
        }),
        step("binary parameters, mixed result formats", Ready, |b| {
            b.parse(
                "",
                "SELECT $1::int4 + 1 AS n, $2::text AS t, $3::float8 AS f",
                &[23, 25, 0],
            )
            .describe_statement("")
            .bind_raw(
                "",
                "",
                &[1, 0, 0],
                &[Some(&41i32.to_be_bytes()), Some(b"text"), Some(b"-0")],
                &[0, 1, 1],
            )
            .describe_portal("")
            .execute("", 0)
            .sync();
        }),
        step("user types in ParameterDescription", ReadyN(2), |b| {
            b.query("CREATE TYPE proto_mood AS ENUM ('up', 'down')");
            b.parse(
                "",
                "SELECT $1::proto_mood AS m, ARRAY[$1::proto_mood] AS a",
                &[],
            )
            .describe_statement("")
            .bind("", "", &[Some("down")], Binary)
            .describe_portal("")
            .execute("", 0)
            .sync();
        }),
        step("pipelined simple queries", ReadyN(3), |b| {
            b.query("SELECT 1 AS first")
                .query("SELECT 1/0")
                .query("SELECT 3 AS third");
        }),
        step("begin again", Ready, |b| {
            b.query("BEGIN");
        }),
        step("extended error inside a transaction block", Ready, |b| {
            b.parse("", "SELECT 1/(i - i) FROM five", &[])
                .bind("", "", &[], Text)
                .execute("", 0)
                .sync();
        }),
        step("extended statement in a failed transaction", Ready, |b| {
            b.parse("", "SELECT 1", &[])
                .bind("", "", &[], Text)
                .execute("", 0)
                .sync();
        }),
        step("rollback", Ready, |b| {
            b.query("ROLLBACK");
        }),
        step("FunctionCall int4pl(2, 3) binary", Ready, |b| {
            b.function_call(
                177,
                &[1],
                &[Some(&2i32.to_be_bytes()), Some(&3i32.to_be_bytes())],
                1,
            );
        }),
        step("FunctionCall textcat('abc', 'def') text", Ready, |b| {
            b.function_call(1258, &[0], &[Some(b"abc"), Some(b"def")], 0);
        }),
        step("FunctionCall with NULL result", Ready, |b| {
            b.function_call(1258, &[0], &[None, Some(b"x")], 0);
        }),
        step("FunctionCall of a missing function", Ready, |b| {
            b.function_call(4_000_000_000, &[], &[], 0);
        }),
    ]
}

async fn run_protocol_step(client: &mut WireClient, s: &Step) -> std::io::Result<Transcript> {
    client.send(&s.batch).await?;
    match s.read {
        ReadTo::Ready => client.read_until_ready().await,
        ReadTo::ReadyN(n) => {
            // Pipelined: n ReadyForQuery in a row.
            let mut all = Transcript::default();
            for _ in 0..n {
                all.messages
                    .extend(client.read_until_ready().await?.messages);
            }
            Ok(all)
        }
        ReadTo::PortalSuspended => {
            client
                .read_until(|m| matches!(m, Msg::PortalSuspended | Msg::Error(_)))
                .await
        }
        ReadTo::ParseComplete => {
            client
                .read_until(|m| matches!(m, Msg::ParseComplete | Msg::Error(_)))
                .await
        }
    }
}

fn shape(t: &Transcript) -> Vec<&'static str> {
    t.messages.iter().map(Msg::kind).collect()
}

/// Assertions on the direct transcripts, so the comparison is known to cover what the
/// steps claim to cover.
fn check_protocol_step(name: &str, t: &Transcript) {
    let s = shape(t);
    let expect = |want: &[&str]| {
        assert_eq!(s, want, "direct transcript of step {name:?}: {t:?}");
    };
    match name {
        "describe statement" => {
            expect(&["ParameterDescription", "RowDescription", "ReadyForQuery"]);
            assert_eq!(
                t.messages[0],
                Msg::ParameterDescription(vec![wire::Oid::Sys(23)])
            );
        }
        "portal: first 2 rows" => expect(&[
            "BindComplete",
            "RowDescription",
            "DataRow",
            "DataRow",
            "PortalSuspended",
        ]),
        "portal: next 2 rows" => expect(&["DataRow", "DataRow", "PortalSuspended"]),
        "portal: last row" => expect(&["DataRow", "CommandComplete", "ReadyForQuery"]),
        "pipeline: second group fails" => {
            expect(&[
                "ParseComplete",
                "BindComplete",
                "CommandComplete",
                "ParseComplete",
                "BindComplete",
                "Error",
                "ReadyForQuery",
            ]);
            assert_eq!(t.error_code(), Some("22012"));
            assert_eq!(t.status(), Some('I'));
        }
        "pipeline was atomic" => {
            let rows = t.data_rows();
            assert_eq!(rows.len(), 1);
            assert_eq!(rows[0][0].as_ref().map(|r| &r.0[..]), Some(&b"0"[..]));
        }
        "bind closed statement" => assert_eq!(t.error_code(), Some("26000")),
        "execute with a bad parameter" => assert_eq!(t.error_code(), Some("22P02")),
        "duplicate statement name" => assert_eq!(t.error_code(), Some("42P05")),
        "parse error in pipeline" => {
            expect(&["Error", "ReadyForQuery"]);
            assert_eq!(t.error_code(), Some("42601"));
        }
        "portal inside a transaction survives Sync" => {
            expect(&[
                "ParseComplete",
                "BindComplete",
                "DataRow",
                "DataRow",
                "DataRow",
                "PortalSuspended",
                "ReadyForQuery",
            ]);
            assert_eq!(t.status(), Some('T'));
        }
        "resume the portal after Sync" => {
            expect(&["DataRow", "DataRow", "CommandComplete", "ReadyForQuery"])
        }
        "lone Sync" => expect(&["ReadyForQuery"]),
        "binary parameters, mixed result formats" => {
            expect(&[
                "ParseComplete",
                "ParameterDescription",
                "RowDescription",
                "BindComplete",
                "RowDescription",
                "DataRow",
                "CommandComplete",
                "ReadyForQuery",
            ]);
            assert_eq!(
                t.data_rows()[0][0].as_ref().map(|r| &r.0[..]),
                Some(&b"42"[..])
            );
        }
        "user types in ParameterDescription" => {
            assert_eq!(t.error_code(), None, "{t:?}");
            assert!(
                t.messages
                    .iter()
                    .any(|m| matches!(m, Msg::ParameterDescription(o) if matches!(o[..], [wire::Oid::User(_)]))),
                "{t:?}"
            );
        }
        "pipelined simple queries" => {
            assert_eq!(
                t.count(|m| matches!(m, Msg::ReadyForQuery('I'))),
                3,
                "{t:?}"
            );
            assert_eq!(t.error_code(), Some("22012"));
            assert_eq!(t.data_rows().len(), 2);
        }
        "extended error inside a transaction block" => {
            assert_eq!(t.error_code(), Some("22012"));
            assert_eq!(t.status(), Some('E'));
        }
        "extended statement in a failed transaction" => {
            expect(&["Error", "ReadyForQuery"]);
            assert_eq!(t.error_code(), Some("25P02"));
            assert_eq!(t.status(), Some('E'));
        }
        "FunctionCall int4pl(2, 3) binary" => {
            expect(&["FunctionCallResponse", "ReadyForQuery"]);
            assert_eq!(
                t.messages[0],
                Msg::FunctionCallResponse(Some(wire::Raw(Bytes::from_static(&[0, 0, 0, 5]))))
            );
        }
        "FunctionCall textcat('abc', 'def') text" => {
            assert_eq!(
                t.messages[0],
                Msg::FunctionCallResponse(Some(wire::Raw(Bytes::from_static(b"abcdef"))))
            );
        }
        "FunctionCall with NULL result" => {
            assert_eq!(t.messages[0], Msg::FunctionCallResponse(None));
        }
        "FunctionCall of a missing function" => {
            expect(&["Error", "ReadyForQuery"]);
            assert_eq!(t.error_code(), Some("42883"));
        }
        _ => assert_eq!(t.error_code(), None, "step {name:?}: {t:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_level_prepared_statements() {
    let cluster = cluster();
    let (db_direct, db_proxy) = ("pgfan_pt_protocol_direct", "pgfan_pt_protocol_proxy");
    create_database(db_direct).await;
    create_database(db_proxy).await;
    let pgfan = Pgfan::start(&[]);
    let mut direct = WireClient::connect(&cluster.primary_addr(), "postgres", db_direct)
        .await
        .expect("connect directly");
    let mut proxied = WireClient::connect(&pgfan.addr(), "postgres", db_proxy)
        .await
        .unwrap_or_else(|e| panic!("connect through pgfan: {e}\n{}", pgfan.log_tail()));

    let mut failures = Vec::new();
    for s in protocol_steps() {
        let d = run_protocol_step(&mut direct, &s)
            .await
            .unwrap_or_else(|e| panic!("direct step {:?}: {e}", s.name));
        check_protocol_step(s.name, &d);
        match run_protocol_step(&mut proxied, &s).await {
            Ok(p) => {
                if let Some(diff) = wire::diff(&d, &p) {
                    failures.push(format!("step {:?}:\n{diff}", s.name));
                }
            }
            Err(e) => {
                failures.push(format!(
                    "step {:?}: pgfan session failed: {e}\ndirect: {d:?}",
                    s.name
                ));
                break;
            }
        }
    }
    if !failures.is_empty() {
        panic!(
            "{} protocol steps differ between direct and pgfan:\n{}\npgfan log tail:\n{}",
            failures.len(),
            failures.join("\n"),
            pgfan.log_tail()
        );
    }
    drop(direct);
    drop(proxied);
    drop_database(db_direct).await;
    drop_database(db_proxy).await;
}

// ---------------------------------------------------------------------------------------
// Startup packet parameters and startup errors
// ---------------------------------------------------------------------------------------

/// Startup parameters reach the server (ParameterStatus, SHOW and output formats equal),
/// and startup failures give the server's ErrorResponse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_parameters_pass_through() {
    let cluster = cluster();
    let (db_direct, db_proxy) = ("pgfan_pt_startup_direct", "pgfan_pt_startup_proxy");
    create_database(db_direct).await;
    create_database(db_proxy).await;
    let pgfan = Pgfan::start(&[]);
    let with_params = |db: &str| {
        wire::ConnectOptions::new("postgres", db)
            .param("application_name", "startup-diff")
            .param("DateStyle", "German, DMY")
            .param("IntervalStyle", "iso_8601")
            .param("TimeZone", "America/Sao_Paulo")
            .param("client_encoding", "LATIN1")
            .param(
                "options",
                "-c search_path=pg_catalog,public -c extra_float_digits=0",
            )
    };
    let mut direct = WireClient::connect_with(&cluster.primary_addr(), &with_params(db_direct))
        .await
        .expect("direct connect with startup parameters");
    let mut proxied = WireClient::connect_with(&pgfan.addr(), &with_params(db_proxy))
        .await
        .unwrap_or_else(|e| panic!("connect through pgfan: {e}\n{}", pgfan.log_tail()));
    let corpus = vec![
        q("SHOW application_name"),
        q("SHOW DateStyle"),
        q("SHOW search_path"),
        q("SHOW extra_float_digits"),
        q(
            "SELECT '2024-02-29 13:14:15+00'::timestamptz, '1 day 2 hours'::interval, \
           1/3::float8, 'caf' || chr(233)",
        ),
    ];
    let out = compare_corpus(Mode::Simple, &corpus, &mut direct, &mut proxied).await;
    assert!(out.corpus_bugs.is_empty(), "{:?}", out.corpus_bugs);
    let mut failures = out.mismatches;

    // Startup errors: unknown database, unknown setting in options.
    let failing = [
        wire::ConnectOptions::new("postgres", "pgfan_no_such_database"),
        wire::ConnectOptions::new("postgres", db_direct).param("options", "-c no_such_setting=1"),
        wire::ConnectOptions::new("no_such_role_pgfan", "postgres"),
    ];
    for opts in failing {
        let d = WireClient::connect_with(&cluster.primary_addr(), &opts).await;
        let mut popts = opts.clone();
        if popts.database == db_direct {
            popts.database = db_proxy.to_string();
        }
        let p = WireClient::connect_with(&pgfan.addr(), &popts).await;
        let (Err(wire::ConnectError::Server(de)), Err(pe)) = (d, p) else {
            failures.push(format!("{opts:?}: expected both connections to fail"));
            continue;
        };
        let same = match &pe {
            wire::ConnectError::Server(pe) => {
                pe.code == de.code && pe.message == de.message && pe.severity == de.severity
            }
            _ => false,
        };
        if !same {
            failures.push(format!(
                "{opts:?}: startup error differs\n  direct: {de:?}\n  pgfan:  {pe}"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "startup differences:\n{}\npgfan log tail:\n{}",
        failures.join("\n"),
        pgfan.log_tail()
    );
    drop(direct);
    drop(proxied);
    drop_database(db_direct).await;
    drop_database(db_proxy).await;
}
