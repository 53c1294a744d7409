//! Session threads: each runs a single-threaded tokio runtime and the client sessions
//! handed to it, from TLS negotiation to the end of the relay.
//!
//! A session's client and backend sockets are read and written on one thread, so relaying
//! a message wakes no other thread. With the multi-threaded scheduler the cross-thread
//! wakeups and work stealing cost more CPU than the relay itself (pgbench -S measured
//! about twice the user time per transaction). This is pgbouncer's model, one event loop
//! per core. A fanned-out statement's fragment workers run on its session's thread too,
//! beside the merge they feed (streaming 1M rows took 1.7-2.2 s instead of 2.3-2.5 s with
//! the workers on the shared runtime). Health checks and metrics stay on the shared runtime.
//!
//! The first session thread also accepts. On the shared runtime, each connection woke its
//! driver thread and the `block_on` thread as well: `pgbench -S -C -c 4` measured 7.3
//! context switches per connection, against 4.1 now.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tracing::{error, warn};

use super::{session, ServerContext};
use crate::config::SessionScheduling;

/// An accepted client on its way to another session thread.
struct Handoff {
    socket: std::net::TcpStream,
    session_id: u64,
    peer: SocketAddr,
}

struct SessionThread {
    handoff: mpsc::UnboundedSender<Handoff>,
    /// Sessions handed to this thread and not yet ended.
    sessions: Arc<AtomicUsize>,
}

/// The running session threads.
pub struct SessionThreads {
    threads: Vec<SessionThread>,
}

/// Counts a session out of its thread when it ends, however it ends.
struct Live(Arc<AtomicUsize>);

impl Drop for Live {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Which session thread accepts clients. Accepting on a session thread, not on the shared
/// runtime, spares two thread wakeups per connection, and a client that stays on the
/// accepting thread is not moved between event loops at all.
const ACCEPTING_THREAD: usize = 0;

impl SessionThreads {
    /// Starts one thread per session pool of `ctx` (`session_threads` in the config); the
    /// first of them accepts the clients of `listener`.
    pub fn start(ctx: &Arc<ServerContext>, listener: std::net::TcpListener) -> std::io::Result<()> {
        let mut receivers = Vec::new();
        let mut threads = Vec::new();
        for _ in 0..ctx.session_pools.len() {
            let (tx, rx) = mpsc::unbounded_channel::<Handoff>();
            receivers.push(rx);
            threads.push(SessionThread {
                handoff: tx,
                sessions: Arc::new(AtomicUsize::new(0)),
            });
        }
        let all = Arc::new(SessionThreads { threads });
        let mut listener = Some(listener);
        for (index, mut rx) in receivers.into_iter().enumerate() {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let ctx = ctx.clone();
            let all = all.clone();
            // registered with the accepting thread's runtime here, so a failure stops the
            // start instead of leaving a server that accepts nobody
            let listener = match (index == ACCEPTING_THREAD)
                .then(|| listener.take())
                .flatten()
            {
                Some(l) => {
                    let _runtime = runtime.enter();
                    Some(TcpListener::from_std(l)?)
                }
                None => None,
            };
            let scheduling = ctx.config.session_scheduling;
            std::thread::Builder::new()
                .name(format!("pgfan-session-{index}"))
                .spawn(move || {
                    if let Err(e) = apply_scheduling(scheduling) {
                        warn!(thread = index, ?scheduling, error = %e, "cannot set the session thread's scheduling policy; it keeps the default");
                    }
                    runtime.block_on(async move {
                        if let Some(listener) = listener {
                            tokio::spawn(accept_clients(listener, ctx.clone(), all.clone(), index));
                        }
                        let live = all.threads[index].sessions.clone();
                        while let Some(h) = rx.recv().await {
                            let socket = match TcpStream::from_std(h.socket) {
                                Ok(s) => s,
                                Err(e) => {
                                    live.fetch_sub(1, Ordering::Relaxed);
                                    warn!(session = h.session_id, error = %e, "cannot register client socket");
                                    continue;
                                }
                            };
                            spawn_session(&ctx, socket, h.session_id, h.peer, index, Live(live.clone()));
                        }
                    })
                })?;
        }
        Ok(())
    }

    /// Gives an accepted client to the thread with the fewest sessions, preferring
    /// `current` (the caller's own thread) on a tie.
    fn hand_off(
        &self,
        ctx: &Arc<ServerContext>,
        current: usize,
        socket: TcpStream,
        session_id: u64,
        peer: SocketAddr,
    ) {
        let Some((index, thread)) = self
            .threads
            .iter()
            .enumerate()
            .min_by_key(|(i, t)| (t.sessions.load(Ordering::Relaxed), *i != current))
        else {
            return;
        };
        thread.sessions.fetch_add(1, Ordering::Relaxed);
        if index == current {
            let live = Live(thread.sessions.clone());
            spawn_session(ctx, socket, session_id, peer, index, live);
            return;
        }
        // the receiving thread counts the session out when it ends
        let socket = match socket.into_std() {
            Ok(s) => s,
            Err(e) => {
                thread.sessions.fetch_sub(1, Ordering::Relaxed);
                warn!(session = session_id, error = %e, "cannot hand off client socket");
                return;
            }
        };
        let handoff = Handoff {
            socket,
            session_id,
            peer,
        };
        if thread.handoff.send(handoff).is_err() {
            thread.sessions.fetch_sub(1, Ordering::Relaxed);
            warn!(
                session = session_id,
                "session thread is gone; client dropped"
            );
        }
    }
}

/// Accepts clients forever on the current session thread and hands each to a thread.
async fn accept_clients(
    listener: TcpListener,
    ctx: Arc<ServerContext>,
    threads: Arc<SessionThreads>,
    current: usize,
) {
    loop {
        match listener.accept().await {
            Ok((socket, peer)) => {
                // replies go out as soon as they are written, as from PostgreSQL itself
                let _ = socket.set_nodelay(true);
                let id = ctx.next_session.fetch_add(1, Ordering::Relaxed);
                threads.hand_off(&ctx, current, socket, id, peer);
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning
                error!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Puts the calling thread under `scheduling`.
///
/// `SCHED_BATCH` tells the kernel that the thread is not interactive: a session thread
/// woken by a socket does not preempt the task running on its CPU (often the PostgreSQL
/// backend or client that just wrote), but runs once that task blocks or its slice ends,
/// and then finds several events ready instead of one. `scripts/bench scheduling`
/// measured it against `SCHED_OTHER`: pgbench -S at 8 clients +3-5% TPS, and beside two
/// CPU-bound processes one client's mean latency 184-188 µs instead of 267-283 (README,
/// Benchmarks).
#[cfg(target_os = "linux")]
fn apply_scheduling(scheduling: SessionScheduling) -> std::io::Result<()> {
    let policy = match scheduling {
        SessionScheduling::Batch => libc::SCHED_BATCH,
        SessionScheduling::Normal => libc::SCHED_OTHER,
    };
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 names the calling thread, and `param` is a valid sched_param that
    // outlives the call (non-real-time policies take priority 0). Leaving SCHED_OTHER
    // for SCHED_BATCH needs no privilege.
    let rc = unsafe { libc::sched_setscheduler(0, policy, &param) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Other systems have no SCHED_BATCH: the threads keep their default policy.
#[cfg(not(target_os = "linux"))]
fn apply_scheduling(_scheduling: SessionScheduling) -> std::io::Result<()> {
    Ok(())
}

/// Runs a client session on the current session thread (`index`).
fn spawn_session(
    ctx: &Arc<ServerContext>,
    socket: TcpStream,
    session_id: u64,
    peer: SocketAddr,
    index: usize,
    live: Live,
) {
    let span = tracing::info_span!("session", session = session_id, peer = %peer);
    let ctx = ctx.clone();
    tokio::spawn(async move {
        let _live = live;
        session::run(ctx, socket, session_id, index, span).await;
    });
}
