//! The group committer: takes queued jobs, forms groups and runs each group in one
//! transaction (`engine::run_group`).
//!
//! On PostgreSQL two groups may run at once ("lanes"), and the scheduler keeps them
//! apart: a group of plain transfers (`group::is_plain_transfer`) only takes jobs whose
//! accounts no running group touches, so the two never wait on each other's row locks;
//! they hold the write lock shared and queue only for the audit chain's lock, just
//! before appending their audit entries and committing. Anything else (holds, deposits,
//! withdrawals, opening accounts, batches) runs in an exclusive group, alone: it is
//! started only when nothing else runs, and nothing starts beside it. Jobs keep their
//! queue order except that a plain transfer waiting for a busy account lets later
//! plain transfers over free accounts go first; nothing overtakes a waiting
//! non-plain job. SQLite has one writer connection, so one lane.
//!
//! Measured with the open-loop bench (see BENCHMARKS.md): on PostgreSQL one group's
//! statements are mostly the database's own per-row work (foreign-key checks, index
//! inserts); with one lane every request waited for the group in flight and then for
//! its own, serially.

use crate::engine::{run_group, Queued};
use crate::group::is_plain_transfer;
use crate::Core;
use futures::stream::{FuturesUnordered, StreamExt};
use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use tokio::sync::mpsc;
use vaultpay_proto::ledger::TransferRequest;

/// Groups that may run at once on PostgreSQL. Two lanes gave +17% peak single
/// transfers in the bench (2,439 / 2,511 vs 2,072 / 2,149/s, alternating runs).
const LANES: usize = 2;

/// Runs until every sender is gone and every queued job is answered.
pub(crate) async fn committer(core: Arc<Core>, mut rx: mpsc::Receiver<Queued>) {
    // Each job of an exclusive group that is not a plain transfer is a subtransaction
    // (savepoint), and so is each run of plain transfers (see `group`); PostgreSQL caches
    // 64 per transaction and slows down sharply beyond that, so on PostgreSQL such a
    // group takes at most 30 other jobs (at most 61 savepoints with the runs between).
    let max = core.config.group_max.max(1);
    let (max_slow, lanes) = match core.db.backend() {
        vaultpay_store::Backend::Postgres => (30, LANES),
        vaultpay_store::Backend::Sqlite => (max, 1),
    };
    let mut sched = Scheduler::new(max, max_slow);
    let mut running = FuturesUnordered::new();
    let mut open = true;
    loop {
        while running.len() < lanes && !sched.exclusive_running {
            let Some(group) = sched.next_group(running.is_empty()) else {
                break;
            };
            metrics::histogram!("ledger_group_commit_size").record(group.jobs.len() as f64);
            let core = core.clone();
            running.push(async move {
                let Formed { mut jobs, accounts } = group;
                run_group(&core, &mut jobs).await;
                accounts
            });
        }
        if !open && running.is_empty() && sched.pending.is_empty() {
            return;
        }
        tokio::select! {
            q = rx.recv(), if open => match q {
                Some(q) => {
                    sched.pending.push_back(q);
                    while sched.pending.len() < max * lanes {
                        match rx.try_recv() {
                            Ok(q) => sched.pending.push_back(q),
                            Err(_) => break,
                        }
                    }
                }
                None => open = false,
            },
            Some(accounts) = running.next(), if !running.is_empty() => sched.finished(accounts),
            else => return,
        }
    }
}

/// A group ready to run, and the accounts it holds in the scheduler (`None`: exclusive).
struct Formed {
    jobs: Vec<Queued>,
    accounts: Option<Vec<String>>,
}

struct Scheduler {
    pending: VecDeque<Queued>,
    /// Accounts of the running plain groups.
    busy: HashSet<String>,
    exclusive_running: bool,
    max: usize,
    max_slow: usize,
}

impl Scheduler {
    fn new(max: usize, max_slow: usize) -> Self {
        Self {
            pending: VecDeque::new(),
            busy: HashSet::new(),
            exclusive_running: false,
            max,
            max_slow,
        }
    }

    /// The next group that may start now, if any. `idle`: nothing is running.
    fn next_group(&mut self, idle: bool) -> Option<Formed> {
        let head = self.pending.front()?;
        if !is_plain_transfer(&head.0) {
            if !idle {
                return None;
            }
            // Exclusive: the queue's front, in order, as before lanes existed.
            let mut jobs = Vec::new();
            let mut slow = 0;
            while jobs.len() < self.max && slow < self.max_slow {
                let Some(q) = self.pending.pop_front() else {
                    break;
                };
                slow += usize::from(!is_plain_transfer(&q.0));
                jobs.push(q);
            }
            self.exclusive_running = true;
            return Some(Formed {
                jobs,
                accounts: None,
            });
        }
        // Plain: every plain transfer up to the first other job whose accounts no
        // running group holds; the rest keep their places.
        let mut jobs = Vec::new();
        let mut taken = Vec::new();
        let mut rest = VecDeque::with_capacity(self.pending.len());
        while let Some(q) = self.pending.pop_front() {
            let free = match plain_accounts(&q) {
                Some(r) if jobs.len() < self.max => {
                    !self.busy.contains(r.from_account_id.as_str())
                        && !self.busy.contains(r.to_account_id.as_str())
                }
                Some(_) => false,
                None => {
                    // A non-plain job: it and everything after it wait.
                    rest.push_back(q);
                    rest.extend(self.pending.drain(..));
                    break;
                }
            };
            if free {
                jobs.push(q);
            } else {
                rest.push_back(q);
            }
        }
        self.pending = rest;
        // Mark after choosing: jobs of one group may share accounts.
        for (job, _) in &jobs {
            if let crate::engine::Op::Transfer(r) = &job.op {
                for id in [&r.from_account_id, &r.to_account_id] {
                    if self.busy.insert(id.clone()) {
                        taken.push(id.clone());
                    }
                }
            }
        }
        if jobs.is_empty() {
            return None;
        }
        Some(Formed {
            jobs,
            accounts: Some(taken),
        })
    }

    /// A group finished: its accounts (or the exclusive slot) are free again.
    fn finished(&mut self, accounts: Option<Vec<String>>) {
        match accounts {
            Some(ids) => {
                for id in ids {
                    self.busy.remove(&id);
                }
            }
            None => self.exclusive_running = false,
        }
    }
}

fn plain_accounts(q: &Queued) -> Option<&TransferRequest> {
    match &q.0.op {
        crate::engine::Op::Transfer(r) if is_plain_transfer(&q.0) => Some(r),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::engine::{Job, Op};
    use crate::model::Actor;
    use vaultpay_proto::ledger::TreasuryRequest;
    use vaultpay_store::audit::Origin;

    fn queued(op: Op) -> Queued {
        let actor = Actor::new("u", vec!["customer".into()], "");
        let (tx, _rx) = tokio::sync::oneshot::channel();
        (Job::new(actor, None, op, Origin::default(), None), tx)
    }

    fn tr(from: &str, to: &str) -> Queued {
        queued(Op::Transfer(TransferRequest {
            from_account_id: from.into(),
            to_account_id: to.into(),
            amount: 1,
            currency: "USD".into(),
            description: format!("{from}>{to}"),
            pending: false,
            timeout_secs: None,
        }))
    }

    fn deposit(to: &str) -> Queued {
        queued(Op::Deposit(TreasuryRequest {
            account_id: to.into(),
            amount: 1,
            currency: "USD".into(),
            reference: "r".into(),
        }))
    }

    fn names(f: &Formed) -> Vec<String> {
        f.jobs
            .iter()
            .map(|(j, _)| match &j.op {
                Op::Transfer(r) => r.description.clone(),
                Op::Deposit(r) => format!("deposit {}", r.account_id),
                _ => "other".into(),
            })
            .collect()
    }

    fn sched(jobs: Vec<Queued>) -> Scheduler {
        let mut s = Scheduler::new(256, 30);
        s.pending.extend(jobs);
        s
    }

    #[test]
    fn a_second_group_takes_only_free_accounts_and_the_rest_keep_their_order() {
        let mut s = sched(vec![tr("a", "b"), tr("b", "c")]);
        let first = s.next_group(true).unwrap();
        // Jobs of one group may share accounts.
        assert_eq!(names(&first), ["a>b", "b>c"]);
        s.pending
            .extend([tr("c", "d"), tr("e", "f"), tr("d", "a"), tr("g", "h")]);
        let second = s.next_group(false).unwrap();
        assert_eq!(names(&second), ["e>f", "g>h"], "c and a are busy");
        assert!(s.next_group(false).is_none(), "only busy accounts left");
        s.finished(first.accounts);
        let third = s.next_group(false).unwrap();
        assert_eq!(names(&third), ["c>d", "d>a"], "queue order kept");
        s.finished(second.accounts);
        s.finished(third.accounts);
        assert!(s.busy.is_empty());
    }

    #[test]
    fn nothing_overtakes_a_waiting_exclusive_job_and_it_runs_alone() {
        let mut s = sched(vec![tr("a", "b")]);
        let first = s.next_group(true).unwrap();
        s.pending.extend([deposit("x"), tr("c", "d")]);
        assert!(
            s.next_group(false).is_none(),
            "the deposit waits for the running group, and c>d waits behind it"
        );
        s.finished(first.accounts);
        let excl = s.next_group(true).unwrap();
        assert!(excl.accounts.is_none());
        assert_eq!(names(&excl), ["deposit x", "c>d"]);
        assert!(s.exclusive_running);
        s.finished(None);
        assert!(!s.exclusive_running);
    }

    #[test]
    fn a_plain_group_stops_at_the_first_other_job() {
        let mut s = sched(vec![tr("a", "b"), deposit("x"), tr("c", "d")]);
        let g = s.next_group(true).unwrap();
        assert_eq!(names(&g), ["a>b"]);
        assert_eq!(s.pending.len(), 2);
    }

    #[test]
    fn a_group_never_exceeds_its_size_limit() {
        let mut s = Scheduler::new(2, 30);
        s.pending.extend([tr("a", "b"), tr("c", "d"), tr("e", "f")]);
        let g = s.next_group(true).unwrap();
        assert_eq!(g.jobs.len(), 2);
        let h = s.next_group(false).unwrap();
        assert_eq!(names(&h), ["e>f"]);
    }
}
