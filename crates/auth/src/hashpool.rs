//! Password hashing threads.
//!
//! Argon2 runs on a fixed set of threads (`hash_concurrency`, by default one per
//! CPU) that take jobs from one queue. A thread starts its next hash the moment the
//! last one ends, with no round trip through the async runtime in between (a
//! semaphore plus `spawn_blocking` left a core idle while the finishing request was
//! woken, released its permit and the next one was scheduled), and each thread keeps
//! its Argon2 memory (see `core::password`). The queue is bounded: when it is full,
//! sign-ins are refused with 503 rather than waiting without end.

use crate::AuthError;
use parking_lot::Mutex;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use tokio::sync::oneshot;
use vaultpay_core::password::{PasswordHasher, PasswordPolicy, PolicyViolation};

/// Jobs waiting beyond the ones running.
const QUEUE: usize = 4096;

enum Job {
    Verify {
        password: String,
        phc: String,
        reply: oneshot::Sender<bool>,
    },
    Hash {
        password: String,
        reply: oneshot::Sender<Result<String, String>>,
    },
    Policy {
        password: String,
        inputs: Vec<String>,
        policy: PasswordPolicy,
        reply: oneshot::Sender<Result<(), PolicyViolation>>,
    },
}

/// The queue in front of the hashing threads. Dropping it stops them.
pub(crate) struct HashPool {
    tx: SyncSender<Job>,
    /// Kept so the queue stays open while the pool lives (whatever its threads do).
    _rx: Arc<Mutex<Receiver<Job>>>,
}

impl HashPool {
    pub fn start(hasher: PasswordHasher, threads: usize) -> Result<Self, AuthError> {
        Self::with_queue(hasher, threads.max(1), QUEUE)
    }

    fn with_queue(hasher: PasswordHasher, threads: usize, queue: usize) -> Result<Self, AuthError> {
        let (tx, rx) = sync_channel(queue);
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads {
            let (rx, hasher) = (rx.clone(), hasher.clone());
            std::thread::Builder::new()
                .name(format!("argon2-{i}"))
                .spawn(move || work(&rx, &hasher))
                .map_err(|e| AuthError::Internal(format!("starting hash threads: {e}")))?;
        }
        Ok(Self { tx, _rx: rx })
    }

    fn submit(&self, job: Job) -> Result<(), AuthError> {
        self.tx.try_send(job).map_err(|e| match e {
            TrySendError::Full(_) => AuthError::Api(
                vaultpay_web::ApiError::unavailable("password hashing queue full")
                    .detail("Too many sign-ins at once; retry in a moment."),
            ),
            TrySendError::Disconnected(_) => AuthError::Internal("hash threads stopped".into()),
        })
    }

    /// Whether `password` matches the PHC string.
    pub async fn verify(&self, password: String, phc: String) -> Result<bool, AuthError> {
        let (reply, rx) = oneshot::channel();
        self.submit(Job::Verify {
            password,
            phc,
            reply,
        })?;
        rx.await
            .map_err(|_| AuthError::Internal("hash thread dropped a job".into()))
    }

    /// `policy`'s verdict on `password`, on the hashing threads: zxcvbn's matching can
    /// take a second of CPU on a crafted password (l33t substitutions multiply its
    /// dictionary lookups), so it runs off the async runtime, as many at once as
    /// hashes, behind the same bounded queue.
    pub async fn check_policy(
        &self,
        policy: PasswordPolicy,
        password: &str,
        inputs: &[&str],
    ) -> Result<Result<(), PolicyViolation>, AuthError> {
        let (reply, rx) = oneshot::channel();
        self.submit(Job::Policy {
            password: password.to_owned(),
            inputs: inputs.iter().map(|s| (*s).to_owned()).collect(),
            policy,
            reply,
        })?;
        rx.await
            .map_err(|_| AuthError::Internal("hash thread dropped a job".into()))
    }

    /// A new PHC string for `password`.
    pub async fn hash(&self, password: String) -> Result<String, AuthError> {
        let (reply, rx) = oneshot::channel();
        self.submit(Job::Hash { password, reply })?;
        rx.await
            .map_err(|_| AuthError::Internal("hash thread dropped a job".into()))?
            .map_err(AuthError::Internal)
    }
}

fn work(rx: &Mutex<Receiver<Job>>, hasher: &PasswordHasher) {
    loop {
        // One thread waits in `recv` holding the lock; the others wait for the lock.
        let job = rx.lock().recv();
        match job {
            Ok(Job::Verify {
                password,
                phc,
                reply,
            }) => {
                let ok = hasher.verify(&password, &phc);
                drop(zeroize::Zeroizing::new(password));
                let _ = reply.send(ok);
            }
            Ok(Job::Hash { password, reply }) => {
                let phc = hasher.hash(&password).map_err(|e| e.to_string());
                drop(zeroize::Zeroizing::new(password));
                let _ = reply.send(phc);
            }
            Ok(Job::Policy {
                password,
                inputs,
                policy,
                reply,
            }) => {
                let inputs: Vec<&str> = inputs.iter().map(String::as_str).collect();
                let verdict = policy.check(&password, &inputs);
                drop(zeroize::Zeroizing::new(password));
                let _ = reply.send(verdict);
            }
            Err(_) => return,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn verifies_and_hashes_on_its_threads() {
        let pool = HashPool::start(PasswordHasher::default(), 2).unwrap();
        let phc = pool.hash("pool-password-1".into()).await.unwrap();
        let (a, b) = tokio::join!(
            pool.verify("pool-password-1".into(), phc.clone()),
            pool.verify("pool-password-2".into(), phc.clone())
        );
        assert!(a.unwrap());
        assert!(!b.unwrap());
    }

    #[tokio::test]
    async fn a_full_queue_is_refused_with_503_not_a_wait() {
        // No threads and room for one job: the second is refused at once.
        let pool = HashPool::with_queue(PasswordHasher::default(), 0, 1).unwrap();
        let waiting = pool.verify("x".into(), "y".into());
        let _ = futures::poll!(Box::pin(waiting));
        match pool.verify("x".into(), "y".into()).await {
            Err(AuthError::Api(e)) => assert_eq!(e.status().as_u16(), 503),
            other => panic!("expected 503, got {other:?}"),
        }
    }
}
