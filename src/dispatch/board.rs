//! The fragment board of one query: which fragments wait, which run where, which are
//! finished, and what an idle worker does next (take the largest waiting fragment, or the
//! smallest when its backend is slow; hedge a straggler; wait; or stop). Pure state, no
//! I/O, so its decisions are unit-tested.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// How a fragment's rows reach the merge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Rows stream to the client as they come: once a fragment has sent a row, no other
    /// copy of it may run.
    Stream,
    /// Rows are reduced (combine step): a copy's rows are kept until it finishes, so any
    /// copy may win until then.
    Reduced,
    /// Each fragment streams on its own channel into a k-way merge; every fragment has a
    /// worker of its own, and, as with `Stream`, a fragment's first row pins its copy.
    Ordered,
}

/// What an idle worker does next.
#[derive(Debug)]
pub enum Next {
    /// Run this attempt.
    Run(Ticket),
    /// Nothing to take now: wait for a change, or until the instant (a hedge may be due).
    Wait(Option<Instant>),
    /// The query needs nothing more from this worker.
    Exit,
    /// A fragment waits that no worker can take (its servers failed it, or have no
    /// worker left): this worker should move to a server that can.
    Move,
}

/// One attempt at a fragment.
#[derive(Debug, Clone)]
pub struct Ticket {
    /// Fragment index.
    pub fragment: usize,
    /// Attempt id, unique within the query.
    pub attempt: u64,
    /// Cancelled when another copy wins or the query stops.
    pub stop: CancellationToken,
    /// A hedged copy of a running fragment.
    pub hedge: bool,
}

/// Why an attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailKind {
    /// The backend could not be reached or dropped the connection.
    Connection,
    /// The statement failed (its error is the answer) or ran out of time.
    Final,
}

/// What to do after a failed attempt.
#[derive(Debug, PartialEq, Eq)]
pub enum AfterFailure {
    /// Another copy still runs, or the fragment is finished: nothing.
    Ignore,
    /// The fragment waits again, for another backend.
    Retry,
    /// The fragment cannot be answered: report the failure to the merge.
    Report,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Waiting,
    Running,
    Finished,
}

struct Attempt {
    id: u64,
    server: usize,
    started: Instant,
    stop: CancellationToken,
}

struct Fragment {
    pages: u64,
    state: State,
    attempts: Vec<Attempt>,
    /// The attempt whose rows the merge has seen.
    claimed: Option<u64>,
    /// Servers on which an attempt failed with a connection error.
    avoid: Vec<usize>,
    hedged: bool,
    retries: u32,
    /// Static dispatch: the only server that may run it.
    pinned: Option<usize>,
}

/// Connection-failure retries of one fragment, at most.
const MAX_RETRIES: u32 = 3;

/// The fragment board of one query.
pub struct Board {
    fragments: Vec<Fragment>,
    servers: usize,
    delivery: Delivery,
    hedge_after: f64,
    finished_secs: Vec<f64>,
    next_attempt: u64,
    stop: CancellationToken,
    closed: bool,
    /// Live workers per server.
    workers_on: Vec<usize>,
}

impl Board {
    /// A board for fragments of `pages` heap pages each (estimates), over `servers`
    /// servers. `pinned`: static dispatch, fragment i only on server `pinned[i]`, never
    /// hedged or retried. `stop`: the query's token (attempt tokens are its children).
    pub fn new(
        pages: &[u64],
        servers: usize,
        delivery: Delivery,
        hedge_after: f64,
        pinned: Option<Vec<usize>>,
        stop: CancellationToken,
    ) -> Self {
        let fragments = pages
            .iter()
            .enumerate()
            .map(|(i, p)| Fragment {
                pages: *p,
                state: State::Waiting,
                attempts: Vec::new(),
                claimed: None,
                avoid: Vec::new(),
                hedged: false,
                retries: 0,
                pinned: pinned.as_ref().and_then(|p| p.get(i).copied()),
            })
            .collect();
        let hedge_after = if pinned.is_some() { 0.0 } else { hedge_after };
        Board {
            fragments,
            servers,
            delivery,
            hedge_after,
            finished_secs: Vec::new(),
            next_attempt: 1,
            stop,
            closed: false,
            workers_on: vec![0; servers],
        }
    }

    /// A worker joins on `server`.
    pub fn worker_started(&mut self, server: usize) {
        if let Some(n) = self.workers_on.get_mut(server) {
            *n += 1;
        }
    }

    /// A worker moves from one server to another.
    pub fn worker_moved(&mut self, from: usize, to: usize) {
        if let Some(n) = self.workers_on.get_mut(from) {
            *n = n.saturating_sub(1);
        }
        self.worker_started(to);
    }

    /// A worker on `server` leaves; returns the fragments that now nobody will run (to
    /// report as failed): all unfinished ones when it was the last worker, in an ordered
    /// merge the waiting ones (the other workers are busy streaming theirs), otherwise the
    /// waiting ones no live worker can take.
    pub fn worker_stopped(&mut self, server: usize) -> Vec<usize> {
        if let Some(n) = self.workers_on.get_mut(server) {
            *n = n.saturating_sub(1);
        }
        if self.closed {
            return vec![];
        }
        if self.workers_on.iter().sum::<usize>() > 0 && self.delivery != Delivery::Ordered {
            return self.stranded();
        }
        let live = self.workers_on.iter().sum::<usize>();
        let orphan = |f: &Fragment| match f.state {
            State::Finished => false,
            State::Running => f.attempts.is_empty(),
            State::Waiting => true,
        };
        let out: Vec<usize> = if live == 0 {
            (0..self.fragments.len())
                .filter(|i| self.fragments[*i].state != State::Finished)
                .collect()
        } else if self.delivery == Delivery::Ordered {
            (0..self.fragments.len())
                .filter(|i| orphan(&self.fragments[*i]))
                .collect()
        } else {
            vec![]
        };
        for i in &out {
            self.fragments[*i].state = State::Finished;
        }
        out
    }

    /// Waiting fragments that no live worker can take; they count as finished from now on
    /// (the caller reports them as failed).
    pub fn stranded(&mut self) -> Vec<usize> {
        let out: Vec<usize> = (0..self.fragments.len())
            .filter(|i| self.unreachable(*i))
            .collect();
        for i in &out {
            self.fragments[*i].state = State::Finished;
        }
        out
    }

    /// Fragment `i` waits, and no server with a live worker may take it.
    fn unreachable(&self, i: usize) -> bool {
        let f = &self.fragments[i];
        f.state == State::Waiting
            && (0..self.servers).all(|s| self.workers_on[s] == 0 || !takes(f, s))
    }

    /// Some fragment waits for a worker of `server`.
    pub fn has_work_for(&self, server: usize) -> bool {
        !self.closed && self.fragments.iter().any(|f| takes(f, server))
    }

    /// The query is over (answered, failed or abandoned): every attempt stops.
    pub fn close(&mut self) {
        self.closed = true;
        self.stop.cancel();
    }

    /// What a worker of `server` does next; `slow`: its backend is much slower than the
    /// query's best, so it takes the smallest waiting fragment instead of the largest.
    pub fn next(&mut self, server: usize, slow: bool, now: Instant) -> Next {
        if self.closed || self.stop.is_cancelled() {
            return Next::Exit;
        }
        let waiting = self
            .fragments
            .iter()
            .enumerate()
            .filter(|(_, f)| takes(f, server));
        let pick = if slow {
            waiting.min_by_key(|(i, f)| (f.pages, std::cmp::Reverse(*i)))
        } else {
            waiting.max_by_key(|(i, f)| (f.pages, std::cmp::Reverse(*i)))
        }
        .map(|(i, _)| i);
        if let Some(i) = pick {
            return Next::Run(self.start_attempt(i, server, now, false));
        }
        let mut due: Option<Instant> = None;
        if let Some(limit) = self.hedge_limit() {
            for i in 0..self.fragments.len() {
                let f = &self.fragments[i];
                let hedgeable = f.state == State::Running
                    && !f.hedged
                    && f.attempts.len() == 1
                    && f.claimed.is_none()
                    && !f.avoid.contains(&server)
                    && f.attempts.iter().all(|a| a.server != server);
                if !hedgeable {
                    continue;
                }
                let at = f.attempts[0].started + limit;
                if at <= now {
                    self.fragments[i].hedged = true;
                    return Next::Run(self.start_attempt(i, server, now, true));
                }
                due = Some(due.map_or(at, |d| d.min(at)));
            }
        }
        if self.fragments.iter().all(|f| f.state == State::Finished) {
            return Next::Exit;
        }
        if (0..self.fragments.len()).any(|i| self.unreachable(i)) {
            return Next::Move;
        }
        Next::Wait(due)
    }

    /// How long a fragment may run before it is hedged: `hedge_after` times the median
    /// of its finished siblings' times; `None` while nothing has finished.
    fn hedge_limit(&self) -> Option<Duration> {
        if self.hedge_after <= 0.0 || self.finished_secs.is_empty() {
            return None;
        }
        let mut secs = self.finished_secs.clone();
        secs.sort_by(f64::total_cmp);
        let median = secs[secs.len() / 2];
        Some(Duration::from_secs_f64(median * self.hedge_after))
    }

    fn start_attempt(&mut self, i: usize, server: usize, now: Instant, hedge: bool) -> Ticket {
        let id = self.next_attempt;
        self.next_attempt += 1;
        let stop = self.stop.child_token();
        let f = &mut self.fragments[i];
        f.state = State::Running;
        f.attempts.push(Attempt {
            id,
            server,
            started: now,
            stop: stop.clone(),
        });
        Ticket {
            fragment: i,
            attempt: id,
            stop,
            hedge,
        }
    }

    /// The attempt is about to hand rows to the merge. `false`: another copy got there
    /// first (or the fragment is over), and this one must stop. Other copies stop.
    pub fn claim(&mut self, t: &Ticket) -> bool {
        let Some(f) = self.fragments.get_mut(t.fragment) else {
            return false;
        };
        if f.state == State::Finished || f.claimed.is_some_and(|c| c != t.attempt) {
            return false;
        }
        f.claimed = Some(t.attempt);
        for a in f.attempts.iter().filter(|a| a.id != t.attempt) {
            a.stop.cancel();
        }
        true
    }

    /// The attempt finished after `secs`. `true`: it is the winner (its rows count);
    /// other copies stop.
    pub fn finish(&mut self, t: &Ticket, secs: f64) -> bool {
        if !self.claim(t) {
            return false;
        }
        let f = &mut self.fragments[t.fragment];
        f.state = State::Finished;
        f.attempts.retain(|a| a.id != t.attempt);
        for a in &f.attempts {
            a.stop.cancel();
        }
        f.attempts.clear();
        self.finished_secs.push(secs);
        true
    }

    /// The attempt stopped without finishing (cancelled as a loser): forget it.
    pub fn abandon(&mut self, t: &Ticket) {
        if let Some(f) = self.fragments.get_mut(t.fragment) {
            f.attempts.retain(|a| a.id != t.attempt);
        }
    }

    /// The attempt on `server` failed.
    pub fn fail(&mut self, t: &Ticket, server: usize, kind: FailKind) -> AfterFailure {
        if self.closed {
            return AfterFailure::Ignore;
        }
        let servers = self.servers;
        let Some(f) = self.fragments.get_mut(t.fragment) else {
            return AfterFailure::Ignore;
        };
        f.attempts.retain(|a| a.id != t.attempt);
        if f.state == State::Finished || f.claimed.is_some_and(|c| c != t.attempt) {
            return AfterFailure::Ignore;
        }
        let delivered = f.claimed == Some(t.attempt) && self.delivery != Delivery::Reduced;
        if kind == FailKind::Connection && !delivered && f.pinned.is_none() {
            if !f.avoid.contains(&server) {
                f.avoid.push(server);
            }
            f.claimed = None;
            if !f.attempts.is_empty() {
                return AfterFailure::Ignore;
            }
            if f.avoid.len() < servers && f.retries < MAX_RETRIES {
                f.retries += 1;
                f.state = State::Waiting;
                return AfterFailure::Retry;
            }
        }
        f.state = State::Finished;
        for a in &f.attempts {
            a.stop.cancel();
        }
        f.attempts.clear();
        AfterFailure::Report
    }

    /// A worker could not connect to `server`: waiting fragments avoid it (unless every
    /// server is to be avoided; then the last workers' exit reports them).
    pub fn server_failed(&mut self, server: usize) {
        let servers = self.servers;
        for f in &mut self.fragments {
            if f.state == State::Waiting
                && f.pinned.is_none()
                && !f.avoid.contains(&server)
                && f.avoid.len() + 1 < servers
            {
                f.avoid.push(server);
            }
        }
    }

    /// Servers a fragment of this query may still run on, for a worker that moves after
    /// its own server failed.
    pub fn wanted_servers(&self) -> Vec<usize> {
        (0..self.servers)
            .filter(|s| self.fragments.iter().any(|f| takes(f, *s)))
            .collect()
    }
}

fn takes(f: &Fragment, server: usize) -> bool {
    f.state == State::Waiting && f.pinned.is_none_or(|p| p == server) && !f.avoid.contains(&server)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn board(pages: &[u64], servers: usize, delivery: Delivery) -> Board {
        Board::new(
            pages,
            servers,
            delivery,
            2.0,
            None,
            CancellationToken::new(),
        )
    }

    fn run(n: Next) -> Ticket {
        match n {
            Next::Run(t) => t,
            other => panic!("expected Run, got {other:?}"),
        }
    }

    #[test]
    fn largest_first_and_slow_servers_take_the_smallest() {
        let now = Instant::now();
        let mut b = board(&[10, 40, 20, 30], 2, Delivery::Stream);
        assert_eq!(run(b.next(0, false, now)).fragment, 1);
        assert_eq!(run(b.next(1, true, now)).fragment, 0);
        assert_eq!(run(b.next(0, false, now)).fragment, 3);
        assert_eq!(run(b.next(0, false, now)).fragment, 2);
        assert!(matches!(b.next(0, false, now), Next::Wait(None)));
    }

    #[test]
    fn hedges_a_straggler_on_another_server_and_first_finish_wins() {
        let t0 = Instant::now();
        let mut b = board(&[10, 10], 2, Delivery::Reduced);
        let a = run(b.next(0, false, t0));
        let slow = run(b.next(1, false, t0));
        assert!(b.finish(&a, 1.0));
        // median 1 s, hedge_after 2: due at t0 + 2 s, not on the straggler's own server
        assert!(matches!(
            b.next(1, false, t0 + Duration::from_secs(1)),
            Next::Wait(None)
        ));
        match b.next(0, false, t0 + Duration::from_secs(1)) {
            Next::Wait(Some(at)) => assert_eq!(at, t0 + Duration::from_secs(2)),
            other => panic!("{other:?}"),
        }
        let hedge = run(b.next(0, false, t0 + Duration::from_secs(3)));
        assert!(hedge.hedge);
        assert_eq!(hedge.fragment, slow.fragment);
        assert!(b.finish(&hedge, 0.5));
        assert!(slow.stop.is_cancelled());
        assert!(!b.finish(&slow, 4.0));
        assert!(matches!(b.next(0, false, t0), Next::Exit));
    }

    #[test]
    fn a_streamed_fragment_is_neither_hedged_nor_retried() {
        let t0 = Instant::now();
        let mut b = board(&[10, 10], 2, Delivery::Stream);
        let a = run(b.next(0, false, t0));
        let c = run(b.next(1, false, t0));
        assert!(b.finish(&a, 1.0));
        assert!(b.claim(&c));
        assert!(matches!(
            b.next(0, false, t0 + Duration::from_secs(10)),
            Next::Wait(None)
        ));
        assert_eq!(b.fail(&c, 1, FailKind::Connection), AfterFailure::Report);
    }

    #[test]
    fn connection_failures_retry_elsewhere_then_report() {
        let t0 = Instant::now();
        let mut b = board(&[10], 2, Delivery::Stream);
        let a = run(b.next(1, false, t0));
        assert_eq!(b.fail(&a, 1, FailKind::Connection), AfterFailure::Retry);
        assert!(!b.has_work_for(1));
        assert_eq!(b.wanted_servers(), vec![0]);
        let again = run(b.next(0, false, t0));
        assert_eq!(
            b.fail(&again, 0, FailKind::Connection),
            AfterFailure::Report
        );
    }

    #[test]
    fn sql_errors_are_final() {
        let t0 = Instant::now();
        let mut b = board(&[10, 10], 2, Delivery::Reduced);
        let a = run(b.next(0, false, t0));
        assert_eq!(b.fail(&a, 0, FailKind::Final), AfterFailure::Report);
    }

    #[test]
    fn the_last_worker_leaving_orphans_what_is_unfinished() {
        let t0 = Instant::now();
        let mut b = board(&[10, 10], 1, Delivery::Stream);
        b.worker_started(0);
        b.worker_started(0);
        let a = run(b.next(0, false, t0));
        assert!(b.finish(&a, 1.0));
        assert!(b.worker_stopped(0).is_empty());
        assert_eq!(b.worker_stopped(0), vec![1]);
    }

    #[test]
    fn a_fragment_only_a_workerless_server_may_take_moves_a_worker() {
        let t0 = Instant::now();
        let mut b = board(&[10, 10], 2, Delivery::Stream);
        b.worker_started(0);
        b.worker_started(0);
        let a = run(b.next(0, false, t0));
        let c = run(b.next(0, false, t0));
        assert!(b.finish(&a, 1.0));
        assert_eq!(b.fail(&c, 0, FailKind::Connection), AfterFailure::Retry);
        assert!(matches!(b.next(0, false, t0), Next::Move));
        b.worker_moved(0, 1);
        assert_eq!(run(b.next(1, false, t0)).fragment, c.fragment);
    }

    #[test]
    fn static_dispatch_keeps_fragments_on_their_server() {
        let t0 = Instant::now();
        let mut b = Board::new(
            &[10, 10],
            2,
            Delivery::Stream,
            2.0,
            Some(vec![0, 1]),
            CancellationToken::new(),
        );
        b.worker_started(0);
        b.worker_started(1);
        let a = run(b.next(0, false, t0));
        assert_eq!(a.fragment, 0);
        assert!(matches!(b.next(0, false, t0), Next::Wait(None)));
        assert_eq!(b.fail(&a, 0, FailKind::Connection), AfterFailure::Report);
    }
}
