//! VaultPay ledger: wallets, atomic double-entry transfers, holds, batches and
//! idempotency, over SQLite or PostgreSQL.
//!
//! - [`Ledger`] is the service: its methods are what the HTTP handlers call (one each);
//!   [`Ledger::router`] is the HTTP API under `/v1`.
//! - Every write runs in one transaction that also writes its audit entry, its outbox
//!   event and its idempotency record (see [`engine`](crate::engine) for the lock order
//!   and group commit).
//! - [`verify`] checks every invariant of the ledger.
#![deny(clippy::unwrap_used, clippy::expect_used)]

mod admin;
mod background;
mod committer;
mod engine;
mod error;
mod group;
mod ids;
mod model;
mod ops;
mod pipeline;
mod query;
mod routes;
mod tally;
mod verify;

pub use admin::AccountAction;
pub use background::{EventSink, OutboxEvent};
pub use engine::Reply;
pub use error::LedgerError;
pub use model::Actor;
pub use query::HistoryFilter;
pub use routes::openapi;
pub use verify::{verify, VerifyReport, Violation};

use engine::{Inflight, Job, Op, Queued};
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use vaultpay_proto::ledger as wire;
use vaultpay_store::audit::Origin;
use vaultpay_store::Db;
use vaultpay_web::Introspector;

use model::{AUDITORS, STAFF_READERS};

/// Ledger settings (the `[ledger]` table of the server config).
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(default)]
pub struct LedgerConfig {
    /// Transfers of at least this many minor units need a live session (introspection).
    pub introspection_threshold_minor: i64,
    /// Transfers (and batches), deposits and withdrawals at or above
    /// `introspection_threshold_minor` also need a second factor within
    /// `step_up_max_age_secs` (RFC 9470 step-up at AuthShield).
    pub step_up_large_transfers: bool,
    /// How recent that second factor must be (match `[auth.step_up] max_age_secs`).
    pub step_up_max_age_secs: i64,
    /// Unfreezing and closing an account also need the admin's second factor within
    /// `step_up_max_age_secs`. Freezing does not: stopping money must be quick.
    pub step_up_account_actions: bool,
    /// Timeout of a hold when the request names none.
    pub hold_default_timeout_secs: i64,
    /// Longest hold timeout a request may ask for.
    pub hold_max_timeout_secs: i64,
    /// How long idempotency keys are kept (at least 24 hours whatever this says).
    pub idempotency_ttl_secs: i64,
    /// Most transfers in one batch request.
    pub max_batch: usize,
    /// Largest body of a batch request (`POST /v1/transfers/batch`), which the
    /// server-wide `body_limit_bytes` does not bound: 1,000 transfers with long
    /// descriptions are several hundred KiB.
    pub batch_body_limit_bytes: usize,
    /// Group concurrent write requests into shared commits (one fsync for many).
    /// Off: one transaction per request.
    pub group_commit: bool,
    /// Most requests in one group commit.
    pub group_max: usize,
    /// Largest page a list endpoint returns.
    pub page_size_max: i64,
    /// Most transactions in one CSV statement (the whole statement is built in memory
    /// and answered at once); a longer period is refused with `statement_too_large`.
    pub statement_max_rows: usize,
    pub expiry_interval_ms: u64,
    pub purge_interval_secs: u64,
    pub outbox_interval_ms: u64,
    /// How long published outbox events are kept before the purge deletes them (at
    /// least an hour whatever this says).
    pub outbox_retention_secs: i64,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        Self {
            introspection_threshold_minor: 100_000,
            step_up_large_transfers: true,
            step_up_max_age_secs: 900,
            step_up_account_actions: true,
            hold_default_timeout_secs: 7 * 86_400,
            hold_max_timeout_secs: 30 * 86_400,
            idempotency_ttl_secs: 86_400,
            max_batch: 1000,
            batch_body_limit_bytes: 4 * 1024 * 1024,
            group_commit: true,
            group_max: 256,
            page_size_max: 200,
            statement_max_rows: 100_000,
            expiry_interval_ms: 1000,
            purge_interval_secs: 300,
            outbox_interval_ms: 200,
            outbox_retention_secs: 7 * 86_400,
        }
    }
}

/// What the committer task and the background tasks share.
pub(crate) struct Core {
    pub db: Db,
    pub config: LedgerConfig,
}

struct Inner {
    core: Arc<Core>,
    introspector: Arc<dyn Introspector>,
    /// Money moved per session since AuthShield last confirmed it live.
    unchecked: parking_lot::Mutex<UncheckedMap>,
    inflight: Arc<Inflight>,
    committer: OnceLock<mpsc::Sender<Queued>>,
    events: broadcast::Sender<OutboxEvent>,
    /// Where relayed events go besides in-process subscribers.
    sink: OnceLock<Arc<dyn EventSink>>,
    /// Refused staff requests, recorded in the audit log (rate-limited per actor).
    denials: vaultpay_store::audit::DenialLog,
}

/// What a session has moved, and how much of it AuthShield has confirmed it live for.
struct Unchecked {
    /// All the session has moved (counted as each movement starts).
    moved: i64,
    /// `moved` as it was when the latest passing live check began: everything up to
    /// it was moved by a session confirmed live afterwards. Checks overlap, so a check
    /// that passes confirms only what was counted before it began, not movements
    /// counted while it was in flight.
    confirmed: i64,
    last: std::time::Instant,
    /// AuthShield answered that the session is over: every movement is checked live
    /// from then on (a check that began earlier and passes must not reset the count).
    revoked: bool,
}

/// Per-session counts, with the time idle ones were last dropped.
#[derive(Default)]
struct UncheckedMap {
    sessions: HashMap<String, Unchecked>,
    pruned: Option<std::time::Instant>,
}

impl UncheckedMap {
    /// Counts `amount` moved by `session`; `Some(snapshot)` when a live check is due
    /// (the amount is at `threshold`, or what the session has moved unconfirmed
    /// reaches it, or it was found revoked), to be passed to [`Self::confirm`] if the
    /// check passes.
    fn count(&mut self, session: &str, amount: i64, threshold: i64) -> Option<i64> {
        let amount = amount.max(0);
        let now = std::time::Instant::now();
        if amount >= threshold {
            return Some(self.sessions.get(session).map_or(0, |u| u.moved));
        }
        if let Some(u) = self.sessions.get_mut(session) {
            u.moved = u.moved.saturating_add(amount);
            u.last = now;
            let due = u.revoked || u.moved.saturating_sub(u.confirmed) >= threshold;
            return due.then_some(u.moved);
        }
        if self.sessions.len() >= UNCHECKED_SESSIONS_MAX {
            if self
                .pruned
                .is_some_and(|t| now.duration_since(t) < UNCHECKED_PRUNE_EVERY)
            {
                return Some(0);
            }
            self.sessions
                .retain(|_, u| now.duration_since(u.last) < UNCHECKED_IDLE);
            self.pruned = Some(now);
            if self.sessions.len() >= UNCHECKED_SESSIONS_MAX {
                return Some(0);
            }
        }
        self.sessions.insert(
            session.to_owned(),
            Unchecked {
                moved: amount,
                confirmed: 0,
                last: now,
                revoked: false,
            },
        );
        None
    }

    /// A live check that began at `snapshot` passed: what was moved up to it is
    /// confirmed (a session with nothing unconfirmed left is forgotten).
    fn confirm(&mut self, session: &str, snapshot: i64) {
        if let Some(u) = self.sessions.get_mut(session) {
            if u.revoked {
                return;
            }
            u.confirmed = u.confirmed.max(snapshot);
            if u.confirmed >= u.moved {
                self.sessions.remove(session);
            }
        }
    }

    /// AuthShield answered that `session` is over: remembered even when a large
    /// movement made the check (no entry yet), so that smaller ones after it are
    /// checked too.
    fn revoke(&mut self, session: &str) {
        self.sessions
            .entry(session.to_owned())
            .or_insert(Unchecked {
                moved: 0,
                confirmed: 0,
                last: std::time::Instant::now(),
                revoked: true,
            })
            .revoked = true;
    }
}

/// Sessions tracked in [`Inner::unchecked`] before idle ones are dropped; at this many
/// recently active ones, a new session's movements are all checked live.
const UNCHECKED_SESSIONS_MAX: usize = 100_000;
/// A session idle this long is dropped from [`Inner::unchecked`] when the map is full
/// (longer than any access token lives), at most once per [`UNCHECKED_PRUNE_EVERY`].
const UNCHECKED_IDLE: std::time::Duration = std::time::Duration::from_secs(3600);
const UNCHECKED_PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// The ledger service.
#[derive(Clone)]
pub struct Ledger {
    inner: Arc<Inner>,
}

impl Ledger {
    pub fn new(db: Db, config: LedgerConfig, introspector: Arc<dyn Introspector>) -> Self {
        let (events, _) = broadcast::channel(4096);
        Self {
            inner: Arc::new(Inner {
                core: Arc::new(Core { db, config }),
                introspector,
                unchecked: Default::default(),
                inflight: Arc::new(Inflight::default()),
                committer: OnceLock::new(),
                events,
                sink: OnceLock::new(),
                denials: Default::default(),
            }),
        }
    }

    /// Hands relayed outbox events to `sink` as well (see [`EventSink`]); set before
    /// [`Ledger::spawn_background`]. Returns false if one was set already.
    pub fn set_event_sink(&self, sink: Arc<dyn EventSink>) -> bool {
        self.inner.sink.set(sink).is_ok()
    }

    /// All ledger routes, with state applied.
    pub fn router(&self) -> axum::Router {
        routes::router(self.clone())
    }

    /// Expired-hold voiding, idempotency purge and the outbox relay; they stop when
    /// `shutdown` becomes true.
    pub fn spawn_background(
        &self,
        shutdown: watch::Receiver<bool>,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        background::spawn_all(
            self.inner.core.clone(),
            self.inner.events.clone(),
            self.inner.sink.get().cloned(),
            shutdown,
        )
    }

    pub fn db(&self) -> &Db {
        &self.inner.core.db
    }

    pub fn config(&self) -> &LedgerConfig {
        &self.inner.core.config
    }

    /// Events relayed from the outbox (in process).
    pub fn subscribe(&self) -> broadcast::Receiver<OutboxEvent> {
        self.inner.events.subscribe()
    }

    /// Runs the hold-expiry step once (the background task calls this periodically).
    pub async fn expire_holds(&self) -> Result<u64, LedgerError> {
        background::expire_holds(&self.inner.core).await
    }

    /// [`Self::expire_holds`] as if the time were `now` (microseconds since the epoch):
    /// tests whose holds expire in the future (a hold's expiry cannot be changed).
    #[doc(hidden)]
    pub async fn expire_holds_as_of(&self, now: i64) -> Result<u64, LedgerError> {
        background::expire_holds_as_of(&self.inner.core, now).await
    }

    /// Runs the outbox relay once.
    pub async fn relay_outbox(&self) -> Result<u64, LedgerError> {
        background::relay_outbox(
            &self.inner.core,
            &self.inner.events,
            self.inner.sink.get().map(|s| &**s),
        )
        .await
    }

    /// Runs the idempotency purge once.
    pub async fn purge_idempotency(&self) -> Result<u64, LedgerError> {
        background::purge_idempotency(&self.inner.core).await
    }

    /// Runs the outbox purge once (published events past their retention).
    pub async fn purge_outbox(&self) -> Result<u64, LedgerError> {
        background::purge_outbox(&self.inner.core).await
    }

    /// Asks AuthShield whether the caller's session is still live and, for an admin
    /// action (`admin`: the permission it needs), whether the caller still holds the
    /// admin role (the token's roles are as they were when it was signed).
    async fn require_live_admin(
        &self,
        actor: &Actor,
        admin: &'static str,
        origin: &Origin,
    ) -> Result<(), LedgerError> {
        self.require_live_role(actor, &["admin"], admin, origin)
            .await
    }

    /// The caller holds one of `roles` by its token, its session is live, and
    /// AuthShield reports it still holds one of them; else 403 for `perm`, recorded in
    /// the audit log.
    async fn require_live_role(
        &self,
        actor: &Actor,
        roles: &[&str],
        perm: &'static str,
        origin: &Origin,
    ) -> Result<(), LedgerError> {
        let checked = async {
            if !roles.iter().any(|r| actor.has(r)) {
                return Err(LedgerError::Forbidden(perm));
            }
            let live = self.require_live_session(actor).await?;
            if !live.is_some_and(|l| l.iter().any(|r| roles.contains(&r.as_str()))) {
                metrics::counter!("ledger_role_revoked_total").increment(1);
                return Err(LedgerError::Forbidden(perm));
            }
            Ok(())
        };
        self.audit_refusal(actor, origin, checked.await).await
    }

    /// `r`, with a refused permission (403 `forbidden`) first recorded in the ledger's
    /// audit log (at most [`DenialLog::PER_ACTOR`](vaultpay_store::audit::DenialLog)
    /// entries per actor per minute).
    async fn audit_refusal<T>(
        &self,
        actor: &Actor,
        origin: &Origin,
        r: Result<T, LedgerError>,
    ) -> Result<T, LedgerError> {
        if let Err(LedgerError::Forbidden(perm)) = &r {
            metrics::counter!("ledger_permission_refused_total").increment(1);
            self.inner
                .denials
                .record(
                    self.db(),
                    origin,
                    "ledger.access.denied",
                    &actor.user_id,
                    perm,
                )
                .await;
        }
        r
    }

    /// Asks AuthShield whether the caller's session is still live; returns the roles it
    /// reports the caller still holds (if it reports them).
    async fn require_live_session(
        &self,
        actor: &Actor,
    ) -> Result<Option<Vec<String>>, LedgerError> {
        let r = self
            .inner
            .introspector
            .introspect(&actor.token, actor.client_ip)
            .await
            .map_err(LedgerError::IntrospectionUnavailable)?;
        if !r.active && r.network_trusted == Some(false) {
            metrics::counter!("ledger_untrusted_network_total").increment(1);
            return Err(LedgerError::UntrustedNetwork);
        }
        if !r.active {
            metrics::counter!("ledger_session_revoked_total").increment(1);
            return Err(LedgerError::SessionRevoked);
        }
        Ok(r.roles)
    }

    /// [`Self::require_live_session`] when moving `amount` needs AuthShield to confirm
    /// first that the caller's session is live: an amount at the introspection
    /// threshold, or one that brings what the session has moved since its last
    /// confirmation to it ([`UncheckedMap::count`]). A threshold per request alone would
    /// let the token of a revoked session (valid until it expires, up to its lifetime)
    /// move any sum in transfers just under it. Counted per process and before the
    /// outcome is known (a refused transfer counts too); a session found over stays
    /// checked on every movement.
    async fn check_session_for(&self, actor: &Actor, amount: i64) -> Result<(), LedgerError> {
        let threshold = self.config().introspection_threshold_minor;
        let Some(snapshot) =
            self.inner
                .unchecked
                .lock()
                .count(actor.session_key(), amount, threshold)
        else {
            return Ok(());
        };
        let r = self.require_live_session(actor).await;
        let mut m = self.inner.unchecked.lock();
        match &r {
            Ok(_) => m.confirm(actor.session_key(), snapshot),
            Err(LedgerError::SessionRevoked) => m.revoke(actor.session_key()),
            Err(_) => {}
        }
        r.map(|_| ())
    }

    /// Refuses to move `amount` (a transfer, a batch's total, a deposit or withdrawal)
    /// at or over the threshold for a token that shows no recent second factor.
    fn require_step_up(&self, actor: &Actor, amount: i64) -> Result<(), LedgerError> {
        let cfg = self.config();
        if !cfg.step_up_large_transfers || amount < cfg.introspection_threshold_minor {
            return Ok(());
        }
        self.require_fresh_mfa(actor)
    }

    /// Refuses a token that shows no second factor within `step_up_max_age_secs`
    /// (401 `insufficient_user_authentication`, the RFC 9470 challenge).
    fn require_fresh_mfa(&self, actor: &Actor) -> Result<(), LedgerError> {
        let cfg = self.config();
        let now = vaultpay_core::time::now_micros() / 1_000_000;
        if vaultpay_core::step_up::is_fresh_mfa(
            actor.acr.as_deref(),
            actor.auth_time,
            now,
            cfg.step_up_max_age_secs,
        ) {
            Ok(())
        } else {
            metrics::counter!("ledger_step_up_required_total").increment(1);
            Err(LedgerError::StepUpRequired {
                max_age_secs: cfg.step_up_max_age_secs,
            })
        }
    }

    fn committer(&self) -> &mpsc::Sender<Queued> {
        self.inner.committer.get_or_init(|| {
            let (tx, rx) = mpsc::channel(self.inner.core.config.group_max.max(1) * 8);
            let core = self.inner.core.clone();
            // The committer gets a thread and a runtime of its own: its statements then
            // never wait behind request handling in the shared runtime's queues.
            match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => {
                    let spawned = std::thread::Builder::new()
                        .name("ledger-committer".into())
                        .spawn(move || {
                            rt.block_on(async move {
                                // Its own connections too, opened on this runtime (see
                                // `Db::with_own_writer`): one per lane, and a spare for
                                // a group's one-by-one fallback.
                                let db = core.db.with_own_writer(3);
                                let own = Arc::new(Core {
                                    db: db.clone(),
                                    config: core.config.clone(),
                                });
                                drop(core);
                                committer::committer(own, rx).await;
                                db.close_writer().await;
                            })
                        });
                    if let Err(e) = spawned {
                        tracing::error!(error = %e, "could not start the committer thread");
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "committer runtime unavailable; using the shared runtime");
                    tokio::spawn(committer::committer(core, rx));
                }
            }
            tx
        })
    }

    /// Runs a write operation with its idempotency key (group commit or its own transaction).
    async fn submit(
        &self,
        actor: &Actor,
        key: Option<String>,
        op: Op,
        origin: Origin,
    ) -> Result<Reply, LedgerError> {
        let guard = match &key {
            Some(k) => {
                engine::check_key(k)?;
                Some(
                    self.inner
                        .inflight
                        .claim(&actor.user_id, k)
                        .ok_or(LedgerError::IdempotencyInProgress)?,
                )
            }
            None => None,
        };
        let job = Job::new(actor.clone(), key, op, origin, guard);
        if !self.inner.core.config.group_commit {
            return engine::run_single(&self.inner.core, job).await;
        }
        let (reply_to, reply) = oneshot::channel();
        self.committer()
            .send((job, reply_to))
            .await
            .map_err(|_| LedgerError::Internal("committer stopped".into()))?;
        reply
            .await
            .map_err(|_| LedgerError::Internal("committer dropped the request".into()))?
    }

    // ---- the service functions the handlers call ----

    /// `POST /v1/accounts` (Idempotency-Key optional).
    pub async fn open_account(
        &self,
        actor: &Actor,
        key: Option<String>,
        req: wire::OpenAccountRequest,
        origin: Origin,
    ) -> Result<Reply, LedgerError> {
        self.submit(actor, key, Op::Open(req), origin).await
    }

    /// `GET /v1/accounts`: the caller's accounts (staff may name another `owner_id`).
    pub async fn list_accounts(
        &self,
        actor: &Actor,
        owner: Option<&str>,
        cursor: Option<&str>,
        limit: Option<i64>,
        origin: &Origin,
    ) -> Result<wire::AccountList, LedgerError> {
        // Another user's list is a staff read, checked live (see `readable_account`).
        if owner.is_some_and(|o| o != actor.user_id) && actor.can_read_any() {
            self.require_live_role(actor, STAFF_READERS, "accounts:read", origin)
                .await?;
        }
        let max = self.config().page_size_max;
        let r = query::list_accounts(self.db(), actor, owner, cursor, limit, max).await;
        self.audit_refusal(actor, origin, r).await
    }

    /// `GET /v1/accounts/{id}`: 404 unless the caller owns it or is staff.
    pub async fn get_account(
        &self,
        actor: &Actor,
        id: &str,
        origin: &Origin,
    ) -> Result<wire::Account, LedgerError> {
        Ok(self
            .readable_account(actor, id, origin)
            .await?
            .to_wire(actor))
    }

    /// The account `id` as `actor` may read it: its own (404 for anyone else's), or
    /// any for staff. A staff read of someone else's account is checked live with
    /// AuthShield, as the audit reads are: the token's roles are as they were when it
    /// was signed, and a support agent whose role was revoked (or whose session ended)
    /// must not go on reading customers' money for the token's last minutes. An
    /// owner's reads of their own accounts ask AuthShield nothing.
    async fn readable_account(
        &self,
        actor: &Actor,
        id: &str,
        origin: &Origin,
    ) -> Result<model::AccountRow, LedgerError> {
        let a = match query::account_row(self.db(), id).await? {
            Some(a) if a.visible_to(actor) => a,
            Some(a) => {
                // Someone else's account: the same 404 as no account at all, but
                // recorded (an IDOR probe; at most `DenialLog::PER_ACTOR` a minute per
                // user, the rest dropped), off the request path so that the answer
                // takes no longer than for an id that does not exist. No metric: an
                // open `/metrics` would tell a caller which ids exist.
                if self.inner.denials.admit(&actor.user_id) {
                    let (db, origin, user, account) = (
                        self.db().clone(),
                        origin.clone(),
                        actor.user_id.clone(),
                        a.id,
                    );
                    tokio::spawn(async move {
                        vaultpay_store::audit::DenialLog::write(
                            &db,
                            &origin,
                            "ledger.access.denied",
                            &user,
                            "accounts:read",
                            &account,
                        )
                        .await
                    });
                }
                return Err(LedgerError::AccountNotFound);
            }
            None => return Err(LedgerError::AccountNotFound),
        };
        if !a.owned_by(actor) {
            self.require_live_role(actor, STAFF_READERS, "accounts:read", origin)
                .await?;
        }
        Ok(a)
    }

    /// `POST /v1/transfers` (Idempotency-Key required).
    pub async fn transfer(
        &self,
        actor: &Actor,
        key: Option<String>,
        req: wire::TransferRequest,
        origin: Origin,
    ) -> Result<Reply, LedgerError> {
        let key = required_key(key)?;
        // An amount no transfer can have moves nothing: it goes straight to its
        // refusal (`amount_invalid`, recorded and kept under the key), not through a
        // live check or a step-up the caller could never make good on.
        let gates = self.money_gates(actor, movable(req.amount)).await;
        self.submit_gated(actor, Some(key), Op::Transfer(req), origin, gates)
            .await
    }

    /// The gates in front of moving `amount` (0: an amount no transfer may have,
    /// which moves nothing and passes): the live-session check it may need, and a
    /// step-up at or over the threshold.
    async fn money_gates(&self, actor: &Actor, amount: i64) -> Result<(), LedgerError> {
        if amount > 0 {
            self.check_session_for(actor, amount).await?;
            self.require_step_up(actor, amount)?;
        }
        Ok(())
    }

    /// [`Self::submit`] once the request's gates (live session, step-up, live admin)
    /// passed. A refusal of a request already answered under its key gives that
    /// answer instead: a retry must replay, not be sent to step up (or told AuthShield
    /// is down) for a payment that was made, and then perhaps be made again under a
    /// new key. The stored answer is read only on a refusal.
    async fn submit_gated(
        &self,
        actor: &Actor,
        key: Option<String>,
        op: Op,
        origin: Origin,
        gates: Result<(), LedgerError>,
    ) -> Result<Reply, LedgerError> {
        if let Err(refused) = gates {
            let Some(k) = &key else {
                return Err(refused);
            };
            return match engine::stored_replay(self.db(), &actor.user_id, k, &op).await {
                Ok(Some(replay)) => Ok(replay),
                Err(LedgerError::IdempotencyKeyReused) => Err(LedgerError::IdempotencyKeyReused),
                _ => Err(refused),
            };
        }
        self.submit(actor, key, op, origin).await
    }

    /// `POST /v1/transfers/batch` (Idempotency-Key required).
    pub async fn batch(
        &self,
        actor: &Actor,
        key: Option<String>,
        req: wire::BatchRequest,
        origin: Origin,
    ) -> Result<Reply, LedgerError> {
        let key = required_key(key)?;
        let total = req
            .transfers
            .iter()
            .fold(0i64, |s, t| s.saturating_add(movable(t.amount)));
        let gates = self.money_gates(actor, total).await;
        self.submit_gated(actor, Some(key), Op::Batch(req), origin, gates)
            .await
    }

    /// `POST /v1/transfers/{id}/post` (Idempotency-Key required).
    pub async fn post_hold(
        &self,
        actor: &Actor,
        key: Option<String>,
        id: &str,
        req: wire::PostHoldRequest,
        origin: Origin,
    ) -> Result<Reply, LedgerError> {
        let key = required_key(key)?;
        // Posting the whole hold (no amount) is checked live whatever its size.
        let gates = self
            .check_session_for(actor, req.amount.unwrap_or(i64::MAX))
            .await;
        let op = Op::Post(id.to_owned(), req);
        self.submit_gated(actor, Some(key), op, origin, gates).await
    }

    /// `POST /v1/transfers/{id}/void` (Idempotency-Key optional: a hold is voided at most
    /// once; a repeat without a key gets 409 `hold_not_pending`, with one the first answer).
    pub async fn void_hold(
        &self,
        actor: &Actor,
        key: Option<String>,
        id: &str,
        req: wire::VoidHoldRequest,
        origin: Origin,
    ) -> Result<Reply, LedgerError> {
        // No money moves, but funds reserved for someone are released: not by the token
        // of a session that has ended.
        if let Some(k) = &key {
            engine::check_key(k)?;
        }
        let gates = self.require_live_session(actor).await.map(|_| ());
        let op = Op::Void(id.to_owned(), req);
        self.submit_gated(actor, key, op, origin, gates).await
    }

    /// `GET /v1/transfers/{id}`.
    pub async fn get_transfer(
        &self,
        actor: &Actor,
        id: &str,
    ) -> Result<wire::Transfer, LedgerError> {
        query::get_transfer(self.db(), actor, id).await
    }

    /// `POST /v1/admin/deposits` and `/withdrawals` (admin; Idempotency-Key required).
    pub async fn treasury(
        &self,
        actor: &Actor,
        key: Option<String>,
        req: wire::TreasuryRequest,
        deposit: bool,
        origin: Origin,
    ) -> Result<Reply, LedgerError> {
        let key = required_key(key)?;
        let amount = movable(req.amount);
        let op = if deposit {
            Op::Deposit(req)
        } else {
            Op::Withdraw(req)
        };
        // Money entering or leaving the ledger: a live admin session and, from the
        // threshold on, a recent second factor, as for a transfer that large.
        let gates = self
            .require_live_admin(actor, "treasury:move", &origin)
            .await
            .and_then(|()| self.require_step_up(actor, amount));
        self.submit_gated(actor, Some(key), op, origin, gates).await
    }

    /// `POST /v1/admin/accounts/{id}/freeze|unfreeze|close` (admin, audited; unfreeze
    /// and close need a recent second factor, see `step_up_account_actions`).
    pub async fn account_action(
        &self,
        actor: &Actor,
        id: &str,
        action: AccountAction,
        reason: &str,
        origin: Origin,
    ) -> Result<wire::Account, LedgerError> {
        self.require_live_admin(actor, "accounts:manage", &origin)
            .await?;
        if action != AccountAction::Freeze && self.config().step_up_account_actions {
            self.require_fresh_mfa(actor)?;
        }
        Ok(
            admin::account_action(&self.inner.core, actor, &origin, id, action, reason)
                .await?
                .to_wire(actor),
        )
    }

    /// `GET /v1/accounts/{id}/transactions`: newest first, `cursor` from the previous page.
    pub async fn transactions(
        &self,
        actor: &Actor,
        account_id: &str,
        mut filter: HistoryFilter,
        cursor: Option<&str>,
        origin: &Origin,
    ) -> Result<wire::TransactionList, LedgerError> {
        filter.limit = filter.limit.clamp(1, self.config().page_size_max);
        let acct = self.readable_account(actor, account_id, origin).await?;
        query::transactions(self.db(), &acct, filter, cursor).await
    }

    /// `GET /v1/accounts/{id}/statement.csv`.
    pub async fn statement_csv(
        &self,
        actor: &Actor,
        account_id: &str,
        from: Option<i64>,
        to: Option<i64>,
        origin: &Origin,
    ) -> Result<String, LedgerError> {
        let acct = self.readable_account(actor, account_id, origin).await?;
        query::statement(self.db(), &acct, from, to, self.config().statement_max_rows).await
    }

    /// `GET /v1/admin/failed-transfers` (compliance, admin).
    pub async fn failed_transfers(
        &self,
        actor: &Actor,
        user: Option<&str>,
        cursor: Option<&str>,
        limit: Option<i64>,
        origin: &Origin,
    ) -> Result<wire::FailedTransferList, LedgerError> {
        self.require_live_auditor(actor, origin).await?;
        let max = self.config().page_size_max;
        query::failed_transfers(self.db(), actor, user, cursor, limit, max).await
    }

    /// `GET /v1/admin/ledger/audit` (compliance, admin).
    pub async fn audit_log(
        &self,
        actor: &Actor,
        cursor: Option<&str>,
        limit: Option<i64>,
        origin: &Origin,
    ) -> Result<wire::AuditList, LedgerError> {
        self.require_live_auditor(actor, origin).await?;
        query::audit_log(self.db(), actor, cursor, limit).await
    }

    /// The staff reads of the ledger's records (its audit log, failed transfers):
    /// like an admin action, AuthShield confirms that the caller's session is live and
    /// that it still holds compliance or admin, so a revoked session or role stops
    /// reading at once, not when the token expires.
    async fn require_live_auditor(
        &self,
        actor: &Actor,
        origin: &Origin,
    ) -> Result<(), LedgerError> {
        self.require_live_role(actor, AUDITORS, "audit:read", origin)
            .await
    }
}

/// What a transfer of `amount` minor units could move: the amount when it is one a
/// transfer may have (`1..=MAX_MINOR_UNITS`), else nothing (it will be refused).
fn movable(amount: i64) -> i64 {
    if vaultpay_core::money::Amount::new(amount).is_ok() {
        amount
    } else {
        0
    }
}

/// The `Idempotency-Key` a money movement requires, checked before anything else (a
/// live-session check or a step-up demand for a request that can never run).
fn required_key(key: Option<String>) -> Result<String, LedgerError> {
    let key = key.ok_or(LedgerError::IdempotencyKeyRequired)?;
    engine::check_key(&key)?;
    Ok(key)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod unchecked_tests {
    use super::UncheckedMap;

    const T: i64 = 1_000;

    #[test]
    fn movements_under_the_threshold_add_up_to_a_check() {
        let mut m = UncheckedMap::default();
        assert_eq!(m.count("s", 600, T), None);
        assert_eq!(m.count("s", 399, T), None);
        assert_eq!(m.count("s", 1, T), Some(1_000));
        m.confirm("s", 1_000);
        // confirmed: counting starts again
        assert_eq!(m.count("s", 999, T), None);
        // an amount at the threshold is checked on its own
        assert_eq!(m.count("x", T, T), Some(0));
    }

    /// A check that passes confirms only what was moved before it began: movements
    /// counted while it was in flight stay unconfirmed (before, a passing check
    /// forgot the session's whole count, so overlapping checks let a session moving
    /// many transfers at once move up to the threshold again after each).
    #[test]
    fn a_passing_check_does_not_confirm_movements_counted_after_it_began() {
        let mut m = UncheckedMap::default();
        assert_eq!(m.count("s", 900, T), None);
        let first = m.count("s", 200, T).unwrap();
        // in flight: more is moved, each due for its own check
        assert_eq!(m.count("s", 300, T), Some(1_400));
        m.confirm("s", first);
        // 300 unconfirmed; 700 more reaches the threshold again
        assert_eq!(m.count("s", 699, T), None);
        assert_eq!(m.count("s", 1, T), Some(2_100));
        // an older check passing late confirms nothing new
        m.confirm("s", 900);
        assert_eq!(m.count("s", 1, T), Some(2_101));
    }

    #[test]
    fn a_revoked_session_is_checked_on_every_movement() {
        let mut m = UncheckedMap::default();
        m.revoke("s");
        assert!(m.count("s", 1, T).is_some());
        // a check that began before the revocation and passes does not reset it
        m.confirm("s", 10);
        assert!(m.count("s", 1, T).is_some());
    }
}
