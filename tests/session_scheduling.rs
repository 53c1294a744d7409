//! The session threads' scheduling policy (`session_scheduling`, Linux only): by default
//! each `pgfan-session-N` thread runs under SCHED_BATCH and every other thread of the
//! process keeps SCHED_OTHER; `session_scheduling = "normal"` leaves the session threads
//! under SCHED_OTHER too. Either way sessions are served.
//!
//! The policy is read from `/proc/<pid>/task/<tid>/stat` of the running pgfan.
//!
//! Run: `cargo test --test session_scheduling`.
#![cfg(target_os = "linux")]

mod common;

use common::{connect_pgfan, text_rows, Pgfan};

/// SCHED_OTHER and SCHED_BATCH as numbered in `<linux/sched.h>`.
const SCHED_OTHER: u32 = 0;
const SCHED_BATCH: u32 = 3;

/// (thread name, scheduling policy) of every thread of process `pid`.
fn thread_policies(pid: u32) -> Vec<(String, u32)> {
    let mut out = Vec::new();
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("read /proc/<pid>/task");
    for task in tasks.flatten() {
        let stat = std::fs::read_to_string(task.path().join("stat")).expect("read task stat");
        // "tid (comm) state ...": comm may hold spaces, so fields are counted after the
        // last ')'; field 3 (state) comes first there and field 41 is the policy
        let (head, rest) = stat.rsplit_once(')').expect("stat has (comm)");
        let name = head.split_once('(').map_or("", |(_, n)| n).to_string();
        let policy = rest
            .split_whitespace()
            .nth(41 - 3)
            .and_then(|p| p.parse().ok())
            .expect("policy field of stat");
        out.push((name, policy));
    }
    out
}

/// Starts pgfan with `toml` (or no config at all), checks that a query is answered and
/// that the session threads, and only they, run under `session_policy`.
async fn check(toml: Option<&str>, session_policy: u32) {
    let pgfan = match toml {
        Some(t) => Pgfan::start_with_config(t, &["--auth", "trust"]),
        None => Pgfan::start(&[]),
    };
    let Some(pid) = pgfan.pid() else {
        eprintln!("PGFAN_TEST_PROXY=direct: no pgfan process to inspect");
        return;
    };
    let client = connect_pgfan(&pgfan, "postgres").await;
    let rows = text_rows(&client.simple_query("select 41 + 1").await.expect("select"));
    assert_eq!(rows, vec![vec![Some("42".to_string())]]);

    let threads = thread_policies(pid);
    let sessions: Vec<_> = threads
        .iter()
        .filter(|(name, _)| name.starts_with("pgfan-session-"))
        .collect();
    assert!(!sessions.is_empty(), "no session threads in {threads:?}");
    for (name, policy) in &threads {
        let expected = if name.starts_with("pgfan-session-") {
            session_policy
        } else {
            SCHED_OTHER
        };
        assert_eq!(
            *policy,
            expected,
            "thread {name}: policy {policy}, expected {expected} (all: {threads:?})\n{}",
            pgfan.log_tail()
        );
    }
}

#[tokio::test]
async fn session_threads_run_under_sched_batch_by_default() {
    check(None, SCHED_BATCH).await;
}

#[tokio::test]
async fn session_scheduling_normal_keeps_sched_other() {
    check(Some("session_scheduling = \"normal\"\n"), SCHED_OTHER).await;
}

#[tokio::test]
async fn session_scheduling_batch_in_a_config_file() {
    check(Some("session_scheduling = \"batch\"\n"), SCHED_BATCH).await;
}
