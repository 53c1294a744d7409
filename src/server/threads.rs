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

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tracing::{warn, Instrument};

use super::{session, ServerContext};

/// An accepted client on its way to a session thread.
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

impl SessionThreads {
    /// Starts one thread per session pool of `ctx` (`session_threads` in the config).
    pub fn start(ctx: &Arc<ServerContext>) -> std::io::Result<Self> {
        let mut threads = Vec::new();
        for index in 0..ctx.session_pools.len() {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (tx, mut rx) = mpsc::unbounded_channel::<Handoff>();
            let sessions = Arc::new(AtomicUsize::new(0));
            let live = sessions.clone();
            let ctx = ctx.clone();
            std::thread::Builder::new()
                .name(format!("pgfan-session-{index}"))
                .spawn(move || {
                    runtime.block_on(async move {
                        while let Some(h) = rx.recv().await {
                            let guard = Live(live.clone());
                            let socket = match TcpStream::from_std(h.socket) {
                                Ok(s) => s,
                                Err(e) => {
                                    warn!(session = h.session_id, error = %e, "cannot register client socket");
                                    continue;
                                }
                            };
                            let span = tracing::info_span!("session", session = h.session_id, peer = %h.peer);
                            let ctx = ctx.clone();
                            tokio::spawn(
                                async move {
                                    let _guard = guard;
                                    session::run(ctx, socket, h.session_id, index).await;
                                }
                                .instrument(span),
                            );
                        }
                    })
                })?;
            threads.push(SessionThread {
                handoff: tx,
                sessions,
            });
        }
        Ok(SessionThreads { threads })
    }

    /// Hands an accepted client to the thread with the fewest sessions.
    pub fn hand_off(&self, socket: TcpStream, session_id: u64, peer: SocketAddr) {
        let Some(thread) = self
            .threads
            .iter()
            .min_by_key(|t| t.sessions.load(Ordering::Relaxed))
        else {
            return;
        };
        let socket = match socket.into_std() {
            Ok(s) => s,
            Err(e) => {
                warn!(session = session_id, error = %e, "cannot hand off client socket");
                return;
            }
        };
        thread.sessions.fetch_add(1, Ordering::Relaxed);
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
