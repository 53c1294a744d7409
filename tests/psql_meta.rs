//! psql meta-commands give byte-identical output through pgfan and directly (issue 2,
//! "Tests": `\l`, `\dt+`, `\d+ t`, `\df`, `\copy`), and psql's error output and exit code
//! are the same too.
//!
//! The meta-command script runs twice: directly against database `pgfan_psqlmeta_direct`
//! and through pgfan against `pgfan_psqlmeta_proxy`. Both databases are created and filled
//! identically before either run, so `\l` (which lists both) and `\dt+` (sizes) agree, and
//! the `\copy ... from` of each run lands in its own database, so the counts match. `\l`
//! is limited to patterns (our two databases, the templates) so that databases other test
//! binaries create or drop on the shared cluster meanwhile cannot change its output.
//!
//! Run: `cargo test --test psql_meta`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use common::{
    cluster, connect_primary, create_database, drop_database, output_within, pg_tool, query_i64,
    show, test_logs_dir, Pgfan,
};

const PSQL_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs psql (`-X`, no pager) against 127.0.0.1:`port` as postgres, database `db`.
async fn psql(port: u16, db: &str, args: &[&str]) -> Output {
    let mut cmd = pg_tool("psql");
    cmd.arg("-X")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            "postgres",
            "-d",
            db,
        ])
        .args(args)
        .env("LC_ALL", "C.UTF-8")
        .env("COLUMNS", "200");
    output_within(cmd, PSQL_TIMEOUT, &format!("psql {args:?} on port {port}")).await
}

/// Asserts two psql runs are byte-identical (stdout, stderr, exit code); on a mismatch,
/// writes both outputs to target/test-logs and names the first differing line.
fn assert_same(label: &str, direct: &Output, proxied: &Output, pgfan: &Pgfan) {
    if direct.stdout == proxied.stdout
        && direct.stderr == proxied.stderr
        && direct.status.code() == proxied.status.code()
    {
        return;
    }
    let dir = test_logs_dir();
    let a = dir.join(format!("psql_meta-{label}-direct.txt"));
    let b = dir.join(format!("psql_meta-{label}-pgfan.txt"));
    std::fs::write(&a, show(direct)).expect("write log");
    std::fs::write(&b, show(proxied)).expect("write log");
    let sa = show(direct);
    let sb = show(proxied);
    let first = sa
        .lines()
        .zip(sb.lines())
        .enumerate()
        .find(|(_, (x, y))| x != y)
        .map(|(i, (x, y))| format!("line {}:\n  direct: {x:?}\n  pgfan:  {y:?}", i + 1))
        .unwrap_or_else(|| "(one output is a prefix of the other)".into());
    panic!(
        "{label}: psql output differs through pgfan; first difference at {first}\n\
         full outputs: {} and {}\npgfan log tail:\n{}",
        a.display(),
        b.display(),
        pgfan.log_tail()
    );
}

const SETUP: &str = r#"
CREATE SCHEMA extra;
CREATE TABLE t (
    id integer PRIMARY KEY,
    name text NOT NULL,
    score numeric(10,2),
    created date DEFAULT '2024-01-01',
    tags text[]
) WITH (autovacuum_enabled = off);
CREATE INDEX t_name_idx ON t (name);
CREATE UNIQUE INDEX t_score_name_idx ON t (score, name) WHERE score IS NOT NULL;
COMMENT ON TABLE t IS 'the main test table';
COMMENT ON COLUMN t.name IS 'a person''s name';
COMMENT ON INDEX t_name_idx IS 'lookup by name';
CREATE TABLE u (a bigint, b jsonb, c timestamptz) WITH (autovacuum_enabled = off);
CREATE TABLE extra.w (k text PRIMARY KEY) WITH (autovacuum_enabled = off);
CREATE VIEW v AS SELECT id, upper(name) AS uname FROM t WHERE score > 10;
COMMENT ON VIEW v IS 'high scores';
CREATE FUNCTION add_score(a numeric, b numeric) RETURNS numeric
    LANGUAGE sql IMMUTABLE AS $$ SELECT a + b $$;
CREATE FUNCTION t_count() RETURNS bigint LANGUAGE sql STABLE AS 'SELECT count(*) FROM t';
CREATE FUNCTION bump() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN NEW.score := coalesce(NEW.score, 0) + 1; RETURN NEW; END $$;
CREATE TRIGGER t_bump BEFORE INSERT ON t FOR EACH ROW WHEN (NEW.score IS NULL) EXECUTE FUNCTION bump();
COMMENT ON FUNCTION add_score(numeric, numeric) IS 'adds two scores';
INSERT INTO t SELECT g, 'name ' || g, g * 1.5, date '2024-01-01' + g, ARRAY['x', g::text]
    FROM generate_series(1, 100) g;
INSERT INTO u SELECT g, jsonb_build_object('g', g), timestamptz '2024-01-01 00:00+00' + g * interval '1 hour'
    FROM generate_series(1, 20) g;
"#;

/// Text-format COPY data for rows 101..=150 of `t` (with a NULL score for a few rows,
/// which the trigger turns into 1).
fn copy_file_contents() -> String {
    let mut s = String::new();
    for i in 101..=150 {
        let score = if i % 10 == 0 {
            "\\N".to_string()
        } else {
            format!("{}.25", i)
        };
        s.push_str(&format!(
            "{i}\tcopied {i}\t{score}\t2025-02-{:02}\t{{y,\"a b\",{i}}}\n",
            i % 28 + 1
        ));
    }
    s
}

fn script(copy_file: &Path) -> String {
    format!(
        r#"\pset pager off
\l pgfan_psqlmeta_*
\l template*
\dt+
\dt+ extra.*
\d+ t
\d+ v
\di+
\df
\df+ add_score
\dv+
\dn
\copy t to stdout
\copy (select id, name from t where id <= 5 order by id) to stdout with (format csv, header)
\copy t from '{}'
select count(*) from t;
select id, name, score, tags from t where id > 95 order by id;
select t_count(), add_score(1.5, 2.25);
\copy u to stdout with (format csv)
"#,
        copy_file.display()
    )
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pgfan-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    // psql runs as this user; the directory only needs to be readable by us.
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meta_commands_identical_through_pgfan() {
    let db_direct = "pgfan_psqlmeta_direct";
    let db_proxy = "pgfan_psqlmeta_proxy";
    for db in [db_direct, db_proxy] {
        create_database(db).await;
        let c = connect_primary(db).await;
        c.batch_execute(SETUP)
            .await
            .unwrap_or_else(|e| panic!("set up {db}: {e:?}"));
    }

    let dir = temp_dir("psql_meta");
    let copy_file = dir.join("t_rows.tsv");
    std::fs::write(&copy_file, copy_file_contents()).expect("write copy file");
    let script_file = dir.join("meta.sql");
    std::fs::write(&script_file, script(&copy_file)).expect("write script");
    let script_arg = script_file.display().to_string();

    let pgfan = Pgfan::start(&[]);
    let args = ["-v", "ON_ERROR_STOP=1", "-a", "-f", script_arg.as_str()];
    let direct = psql(cluster().primary_port, db_direct, &args).await;
    let proxied = psql(pgfan.port, db_proxy, &args).await;

    // The direct run must itself be a meaningful transcript, or the comparison proves
    // nothing.
    assert!(
        direct.status.success(),
        "direct psql failed:\n{}",
        show(&direct)
    );
    let out = String::from_utf8_lossy(&direct.stdout);
    for needle in [
        "List of databases",
        db_direct,
        db_proxy,
        "the main test table",
        "t_name_idx",
        "t_score_name_idx",
        "a person's name",
        "t_bump",
        "high scores",
        "add_score",
        "t_count",
        "name 100",
        "id,name\n1,name 1\n",
        " count \n-------\n   150\n",
        "copied 150",
        "{y,\"a b\",150}",
        "1,\"{\"\"g\"\": 1}\"",
    ] {
        assert!(
            out.contains(needle),
            "direct psql output lacks {needle:?}:\n{out}"
        );
    }
    assert_same("meta", &direct, &proxied, &pgfan);

    // The rows copied in through pgfan really are in the proxied database.
    let c = connect_primary(db_proxy).await;
    let n = query_i64(&c, "select count(*) from t where name like 'copied %'").await;
    assert_eq!(n, 50, "rows of \\copy from through pgfan");
    let n = query_i64(&c, "select count(*) from t where score = 1").await;
    assert_eq!(n, 5, "trigger-filled scores of \\copy from through pgfan");
    drop(c);

    assert!(
        psql(pgfan.port, db_proxy, &["-c", "select 1"])
            .await
            .status
            .success(),
        "pgfan still serves psql after the script; log:\n{}",
        pgfan.log_tail()
    );
    drop(pgfan);
    let _ = std::fs::remove_dir_all(&dir);
    drop_database(db_direct).await;
    drop_database(db_proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_identical_through_pgfan() {
    let pgfan = Pgfan::start(&[]);
    let cases: &[(&str, &[&str])] = &[
        ("div0", &["-c", "select 1/0"]),
        ("syntax", &["-c", "selec 1"]),
        (
            "verbose",
            &["-c", "\\set VERBOSITY verbose", "-c", "select 1/0"],
        ),
        (
            "undefined_column",
            &[
                "-c",
                "\\set VERBOSITY verbose",
                "-c",
                "select nosuchcol from pg_class",
            ],
        ),
        (
            "on_error_stop",
            &[
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                "select 1 as a",
                "-c",
                "select 1/0",
                "-c",
                "select 2 as b",
            ],
        ),
        (
            "notice_and_error",
            &[
                "-c",
                "do $$ begin raise notice 'hello %', 42; raise exception using errcode = '22P02', message = 'custom', detail = 'some detail', hint = 'a hint'; end $$",
            ],
        ),
    ];
    for (label, args) in cases {
        let direct = psql(cluster().primary_port, "postgres", args).await;
        let proxied = psql(pgfan.port, "postgres", args).await;
        let stderr = String::from_utf8_lossy(&direct.stderr);
        assert!(
            stderr.contains("ERROR:"),
            "{label}: direct psql printed no error:\n{}",
            show(&direct)
        );
        assert_ne!(direct.status.code(), Some(0), "{label}: direct exit code");
        assert_same(label, &direct, &proxied, &pgfan);
    }
    let direct = psql(cluster().primary_port, "postgres", &["-c", "select 1/0"]).await;
    assert_eq!(
        direct.status.code(),
        Some(1),
        "psql exit code of an SQL error"
    );
    assert_eq!(
        String::from_utf8_lossy(&direct.stderr),
        "ERROR:  division by zero\n"
    );
}
