//! IP trust: the networks each user has confirmed, logins from other networks held
//! until an emailed link confirms them, and the trust check at login, refresh and
//! introspection.
//!
//! A network is the client address masked to `ipv4_prefix` / `ipv6_prefix` (32 / 128
//! trusts exact addresses only). The database is the source of truth; the check is
//! answered from memory (per-user network lists, loaded lazily, refreshed after
//! `LOCAL_TTL` and dropped on every change made here) or, when a [`TrustBackend`]
//! (Redis) is installed, from a per-user set every node shares.

use crate::service::SessionFacts;
use crate::{AuthError, AuthService};
use futures::future::BoxFuture;
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use sqlx::Row;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vaultpay_core::crypto::{opaque_token, sha256_hex};
use vaultpay_core::time::{now_micros, rfc3339, secs};
use vaultpay_proto::auth as wire;
use vaultpay_proto::iptrust as iwire;
use vaultpay_store::audit::{append, NewAudit};
use vaultpay_web::{Ctx, Principal};

/// The `[auth.ip_trust]` table.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IpTrustConfig {
    pub enabled: bool,
    /// Prefix length an IPv4 address is trusted with (32 = the exact address).
    pub ipv4_prefix: u8,
    /// Prefix length an IPv6 address is trusted with (128 = the exact address).
    pub ipv6_prefix: u8,
    /// A trusted network expires this long after it was last used (sliding).
    pub trust_ttl_days: i64,
    /// How long a held login, its ticket and its emailed links stay usable.
    pub hold_ttl_secs: i64,
}

impl Default for IpTrustConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            ipv4_prefix: 24,
            ipv6_prefix: 64,
            trust_ttl_days: 90,
            hold_ttl_secs: 1800,
        }
    }
}

impl IpTrustConfig {
    /// Refuses prefixes longer than the address or so short that one network is a
    /// large share of the Internet (`ipv4_prefix = 0` trusted everyone after a first
    /// login), and non-positive lifetimes.
    pub fn validate(&self) -> Result<(), String> {
        if !(16..=32).contains(&self.ipv4_prefix) || !(32..=128).contains(&self.ipv6_prefix) {
            return Err(
                "ipv4_prefix must be between 16 and 32 and ipv6_prefix between 32 and 128".into(),
            );
        }
        if self.trust_ttl_days <= 0 || self.hold_ttl_secs <= 0 {
            return Err("trust_ttl_days and hold_ttl_secs must be positive".into());
        }
        Ok(())
    }

    fn ttl_micros(&self) -> i64 {
        secs(self.trust_ttl_days.saturating_mul(86_400))
    }
}

/// The network (CIDR text) `ip` is trusted as; IPv4-mapped IPv6 counts as IPv4.
pub fn network_of(ip: IpAddr, cfg: &IpTrustConfig) -> String {
    match ip.to_canonical() {
        IpAddr::V4(a) => {
            let len = cfg.ipv4_prefix.min(32);
            let mask = if len == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(len))
            };
            format!("{}/{len}", Ipv4Addr::from(u32::from(a) & mask))
        }
        IpAddr::V6(a) => {
            let len = cfg.ipv6_prefix.min(128);
            let mask = if len == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(len))
            };
            format!("{}/{len}", Ipv6Addr::from(u128::from(a) & mask))
        }
    }
}

/// What a shared store knows of a user's networks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// The user's set is present: is the network in it?
    Member(bool),
    /// No set: load it from the database and `fill` it with this generation.
    Missing(u64),
}

/// A shared membership store for trusted networks (Redis in production), so every
/// node answers the same. It caches the database; any change here calls `forget`.
pub trait TrustBackend: Send + Sync + 'static {
    fn contains<'a>(
        &'a self,
        user: &'a str,
        network: &'a str,
    ) -> BoxFuture<'a, Result<Lookup, String>>;
    /// Stores the user's live networks (possibly none) for `ttl_secs`, unless a
    /// `forget` happened since the `Missing(generation)` answer (then it is stale).
    fn fill<'a>(
        &'a self,
        user: &'a str,
        generation: u64,
        networks: Vec<String>,
        ttl_secs: u64,
    ) -> BoxFuture<'a, Result<(), String>>;
    /// Drops the user's set (the next check reloads it from the database).
    fn forget<'a>(&'a self, user: &'a str) -> BoxFuture<'a, Result<(), String>>;
}

/// How long a node keeps a user's network list before reloading it.
const LOCAL_TTL: Duration = Duration::from_secs(30);
/// Longest a shared (Redis) set lives before it is refilled from the database; also
/// how long a failed drop of one is retried for, so that a network revoked while Redis
/// could not be reached is trusted elsewhere at most this long (it was an hour, with
/// retries for three minutes).
const SHARED_TTL_SECS: i64 = 600;
/// A sliding expiry is written back at most this often per network.
const TOUCH_EVERY: i64 = 3_600 * 1_000_000;

struct Known {
    loaded: Instant,
    /// (network, expires_at)
    nets: Vec<(String, i64)>,
}

impl Known {
    fn expiry(&self, network: &str, now: i64) -> Option<i64> {
        self.nets
            .iter()
            .find(|(n, exp)| n == network && *exp > now)
            .map(|(_, e)| *e)
    }
}

/// The per-node state of IP trust.
#[derive(Default)]
pub(crate) struct TrustState {
    /// Bumped by every change, so a load that raced with one is not kept.
    generation: AtomicU64,
    local: RwLock<HashMap<String, Arc<Known>>>,
    backend: RwLock<Option<Arc<dyn TrustBackend>>>,
    /// Users whose shared set a background task is still trying to drop (one task
    /// each, however many changes fail meanwhile).
    retrying: crate::retry::Retrier,
}

/// Result of a trust check.
enum Verdict {
    /// Trusted; the network's current expiry when known.
    Trusted(Option<i64>),
    Untrusted,
}

impl AuthService {
    /// Installs a shared trust store (Redis), used instead of the in-process lists.
    pub fn set_trust_backend(&self, backend: Arc<dyn TrustBackend>) {
        *self.inner.iptrust.backend.write() = Some(backend);
    }

    fn trust_cfg(&self) -> &IpTrustConfig {
        &self.inner.cfg.ip_trust
    }

    async fn load_known(&self, user_id: &str) -> Result<Arc<Known>, AuthError> {
        let generation = self.inner.iptrust.generation.load(Ordering::Acquire);
        let rows = sqlx::query(
            "SELECT network, expires_at FROM trusted_networks WHERE user_id = $1 AND revoked_at IS NULL AND expires_at > $2",
        )
        .bind(user_id)
        .bind(now_micros())
        .fetch_all(self.inner.db.read())
        .await?;
        let nets = rows
            .iter()
            .map(|r| Ok((r.try_get("network")?, r.try_get("expires_at")?)))
            .collect::<Result<Vec<(String, i64)>, sqlx::Error>>()?;
        let known = Arc::new(Known {
            loaded: Instant::now(),
            nets,
        });
        let mut map = self.inner.iptrust.local.write();
        if self.inner.iptrust.generation.load(Ordering::Acquire) != generation {
            return Ok(known);
        }
        if map.len() > 100_000 {
            map.clear();
        }
        map.insert(user_id.to_owned(), known.clone());
        Ok(known)
    }

    /// Drops what this node (and the shared store) holds for `user_id`.
    async fn forget_trust(&self, user_id: &str) {
        {
            let mut map = self.inner.iptrust.local.write();
            self.inner.iptrust.generation.fetch_add(1, Ordering::AcqRel);
            map.remove(user_id);
        }
        let backend = self.inner.iptrust.backend.read().clone();
        if let Some(b) = backend {
            if let Err(e) = b.forget(user_id).await {
                // Other replicas would go on trusting what was just revoked until the
                // set's TTL (10 minutes): keep trying, in the background, until then.
                tracing::warn!(error = %e, "could not drop the shared trusted-network set; retrying");
                let user = user_id.to_owned();
                self.inner.iptrust.retrying.retry(
                    user.clone(),
                    std::time::Duration::from_secs(SHARED_TTL_SECS.unsigned_abs()),
                    "dropping a shared trusted-network set",
                    move || {
                        let (b, user) = (b.clone(), user.clone());
                        async move { b.forget(&user).await }
                    },
                );
            }
        }
    }

    async fn check_network(&self, user_id: &str, network: &str) -> Result<Verdict, AuthError> {
        let now = now_micros();
        let backend = self.inner.iptrust.backend.read().clone();
        if let Some(b) = backend {
            match b.contains(user_id, network).await {
                Ok(Lookup::Member(true)) => return Ok(Verdict::Trusted(None)),
                Ok(Lookup::Member(false)) => return Ok(Verdict::Untrusted),
                Ok(Lookup::Missing(generation)) => {
                    let known = self.load_known(user_id).await?;
                    let earliest = known.nets.iter().map(|(_, e)| *e).min();
                    let ttl = earliest
                        .map(|e| ((e - now) / 1_000_000).min(SHARED_TTL_SECS))
                        .unwrap_or(SHARED_TTL_SECS)
                        .max(1);
                    let nets = known.nets.iter().map(|(n, _)| n.clone()).collect();
                    if let Err(e) = b.fill(user_id, generation, nets, ttl as u64).await {
                        tracing::warn!(error = %e, "could not fill the shared trusted-network set");
                    }
                    return Ok(match known.expiry(network, now) {
                        Some(e) => Verdict::Trusted(Some(e)),
                        None => Verdict::Untrusted,
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "shared trusted-network store unavailable; using the database");
                }
            }
        }
        let cached = self.inner.iptrust.local.read().get(user_id).cloned();
        if let Some(k) = cached.filter(|k| k.loaded.elapsed() < LOCAL_TTL) {
            if let Some(e) = k.expiry(network, now) {
                return Ok(Verdict::Trusted(Some(e)));
            }
        }
        // A miss reloads: the network may have been confirmed on another node.
        let known = self.load_known(user_id).await?;
        Ok(match known.expiry(network, now) {
            Some(e) => Verdict::Trusted(Some(e)),
            None => Verdict::Untrusted,
        })
    }

    /// Whether `ip` is in one of the user's live trusted networks (true when IP
    /// trust is disabled).
    pub async fn ip_trusted(&self, user_id: &str, ip: IpAddr) -> Result<bool, AuthError> {
        if !self.trust_cfg().enabled {
            return Ok(true);
        }
        let network = network_of(ip, self.trust_cfg());
        Ok(matches!(
            self.check_network(user_id, &network).await?,
            Verdict::Trusted(_)
        ))
    }

    /// Pushes a used network's expiry forward (written at most hourly).
    async fn touch_network(
        &self,
        user_id: &str,
        network: &str,
        expiry: Option<i64>,
    ) -> Result<(), AuthError> {
        let now = now_micros();
        let ttl = self.trust_cfg().ttl_micros();
        if expiry.is_some_and(|e| e > now + ttl - TOUCH_EVERY) {
            return Ok(());
        }
        let n = sqlx::query(
            "UPDATE trusted_networks SET last_used_at = $1, expires_at = $2 \
             WHERE user_id = $3 AND network = $4 AND revoked_at IS NULL AND expires_at > $1 AND last_used_at < $5",
        )
        .bind(now)
        .bind(now + ttl)
        .bind(user_id)
        .bind(network)
        .bind(now - TOUCH_EVERY)
        .execute(self.inner.db.writer())
        .await?
        .rows_affected();
        if n > 0 {
            // the shared set holds memberships only; its expiry is refreshed on refill
            let mut map = self.inner.iptrust.local.write();
            self.inner.iptrust.generation.fetch_add(1, Ordering::AcqRel);
            map.remove(user_id);
        }
        Ok(())
    }

    /// The login hook: after the password was verified, before tokens are issued.
    /// Trusts the first network of a new account; holds a login from any other
    /// untrusted network (`IpConfirmationRequired`). The caller has refused an account
    /// locked by "this wasn't me" first (see `sessions::sign_in_check_sql`).
    pub(crate) async fn ip_trust_login_gate(
        &self,
        ctx: &Ctx,
        user_id: &str,
        email: &str,
        device: &wire::DeviceInfo,
        password_hash: &str,
    ) -> Result<(), AuthError> {
        let cfg = self.trust_cfg();
        let Some(ip) = ctx.ip.filter(|_| cfg.enabled) else {
            return Ok(());
        };
        let network = network_of(ip, cfg);
        if let Verdict::Trusted(exp) = self.check_network(user_id, &network).await? {
            return self.touch_network(user_id, &network, exp).await;
        }
        if self.trust_first_network(ctx, user_id, &network).await? {
            return Ok(());
        }
        self.hold_login(ctx, user_id, email, device, (ip, &network), password_hash)
            .await
    }

    /// Audits the refusal of a sign-in to a security-locked account; returns the error
    /// to answer with.
    pub(crate) async fn refuse_security_locked(&self, ctx: &Ctx, user_id: &str) -> AuthError {
        let audited = self
            .audit_only(
                ctx,
                NewAudit::failure("login.refused_security_lock")
                    .actor(user_id)
                    .resource(user_id),
            )
            .await;
        match audited {
            Ok(_) => AuthError::ResetRequired,
            Err(e) => e,
        }
    }

    /// Trusts `network` when the user has never had a trusted network (their first
    /// login). Returns whether it did.
    async fn trust_first_network(
        &self,
        ctx: &Ctx,
        user_id: &str,
        network: &str,
    ) -> Result<bool, AuthError> {
        let db = &self.inner.db;
        let now = now_micros();
        let id = uuid::Uuid::now_v7().to_string();
        let mut tx = db.begin().await?;
        // Concurrent first sign-ins of one account (PostgreSQL runs them in parallel):
        // the user row's lock makes the check-and-insert below one step.
        sqlx::query(&format!(
            "SELECT id FROM users WHERE id = $1{}",
            db.for_no_key_update()
        ))
        .bind(user_id)
        .fetch_optional(&mut *tx)
        .await?;
        let n = sqlx::query(
            "INSERT INTO trusted_networks (id, user_id, network, created_at, last_used_at, expires_at) \
             SELECT $1, $2, $3, $4, $4, $5 WHERE NOT EXISTS (SELECT 1 FROM trusted_networks WHERE user_id = $2)",
        )
        .bind(&id)
        .bind(user_id)
        .bind(network)
        .bind(now)
        .bind(now + self.trust_cfg().ttl_micros())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n == 0 {
            // Not the first: a concurrent first sign-in may have just trusted this
            // very network, in which case this sign-in is from a trusted one too.
            let same = sqlx::query(
                "SELECT id FROM trusted_networks WHERE user_id = $1 AND network = $2 \
                 AND revoked_at IS NULL AND expires_at > $3",
            )
            .bind(user_id)
            .bind(network)
            .bind(now)
            .fetch_optional(&mut *tx)
            .await?
            .is_some();
            return Ok(same);
        }
        append(
            db,
            &mut tx,
            &ctx.origin(),
            NewAudit::success("ip_trust.added")
                .actor(user_id)
                .resource(&id)
                .metadata(serde_json::json!({ "network": network, "reason": "first_login" })),
        )
        .await?;
        tx.commit().await?;
        self.forget_trust(user_id).await;
        Ok(true)
    }

    async fn hold_login(
        &self,
        ctx: &Ctx,
        user_id: &str,
        email: &str,
        device: &wire::DeviceInfo,
        (ip, network): (IpAddr, &str),
        password_hash: &str,
    ) -> Result<(), AuthError> {
        let cfg = self.trust_cfg();
        let db = &self.inner.db;
        let (ticket, confirm, deny) = (opaque_token(), opaque_token(), opaque_token());
        let now = now_micros();
        let ticket_hash = sha256_hex(ticket.as_bytes());
        let mut tx = db.begin().await?;
        // No hold for a password that a reset or change replaced while Argon2 ran (the
        // revocation expired the holds it saw; this one would have come after it).
        crate::sessions::recheck_authority(
            db,
            &mut tx,
            user_id,
            crate::sessions::Proof::password(password_hash),
        )
        .await?;
        sqlx::query(
            "INSERT INTO login_holds (ticket_hash, user_id, network, ip, device_id, device_name, confirm_hash, deny_hash, \
             created_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(&ticket_hash)
        .bind(user_id)
        .bind(network)
        .bind(ip.to_string())
        .bind(device.id.trim())
        .bind(device.name.trim())
        .bind(sha256_hex(confirm.as_bytes()))
        .bind(sha256_hex(deny.as_bytes()))
        .bind(now)
        .bind(now + secs(cfg.hold_ttl_secs))
        .execute(&mut *tx)
        .await?;
        append(
            db,
            &mut tx,
            &ctx.origin(),
            NewAudit::failure("login.held_untrusted_network")
                .actor(user_id)
                .resource(user_id)
                .metadata(serde_json::json!({ "network": network, "device_id": device.id.trim() })),
        )
        .await?;
        tx.commit().await?;
        metrics::counter!("auth_logins_total", "outcome" => "held").increment(1);
        let base = self.public_url();
        let text = format!(
            "Someone signed in to your VaultPay account with your password from a network \
             you have not used before:\n\n  address: {ip}\n  network: {network}\n  device:  {}\n\n\
             If this was you, confirm the network here:\n\n{base}/v1/auth/login/confirm?token={confirm}\n\n\
             If this was NOT you, open this link. It signs you out everywhere and locks the \
             account until you reset your password:\n\n{base}/v1/auth/login/deny?token={deny}\n\n\
             Both links work once and expire in {} minutes.\n",
            device.name.trim(),
            (cfg.hold_ttl_secs / 60).max(1)
        );
        self.send_mail(email, "Confirm a sign-in from a new network", text)
            .await;
        Err(AuthError::IpConfirmationRequired(ticket))
    }

    /// `POST /v1/auth/login/confirm`: the emailed "this was me" link.
    pub async fn confirm_login_network(
        &self,
        ctx: &Ctx,
        token: &str,
    ) -> Result<wire::Accepted, AuthError> {
        let db = &self.inner.db;
        let now = now_micros();
        let mut tx = db.begin().await?;
        let hold = self.hold_by(&mut tx, "confirm_hash", token).await?;
        if hold.confirmed || hold.denied || hold.expires_at <= now {
            return Err(AuthError::BadEmailToken);
        }
        // A locked account trusts no new network: "this wasn't me" denies the holds it
        // finds, and one opened beside it (by a sign-in that read the lock before it
        // was set) must not make the attacker's network trusted once confirmed.
        if crate::sessions::security_locked_in(db, &mut tx, &hold.user_id)
            .await?
            .unwrap_or(false)
        {
            tx.rollback().await?;
            return Err(self.refuse_security_locked(ctx, &hold.user_id).await);
        }
        sqlx::query("UPDATE login_holds SET confirmed_at = $1 WHERE ticket_hash = $2")
            .bind(now)
            .bind(&hold.ticket_hash)
            .execute(&mut *tx)
            .await?;
        let id = uuid::Uuid::now_v7().to_string();
        let row = sqlx::query(
            "INSERT INTO trusted_networks (id, user_id, network, created_at, last_used_at, expires_at) \
             VALUES ($1, $2, $3, $4, $4, $5) \
             ON CONFLICT (user_id, network) WHERE revoked_at IS NULL \
             DO UPDATE SET last_used_at = excluded.last_used_at, expires_at = excluded.expires_at RETURNING id",
        )
        .bind(&id)
        .bind(&hold.user_id)
        .bind(&hold.network)
        .bind(now)
        .bind(now + self.trust_cfg().ttl_micros())
        .fetch_one(&mut *tx)
        .await?;
        let id: String = row.try_get("id")?;
        append(
            db,
            &mut tx,
            &ctx.origin(),
            NewAudit::success("ip_trust.added")
                .actor(&hold.user_id)
                .resource(&id)
                .metadata(
                    serde_json::json!({ "network": hold.network, "reason": "confirmed_by_email" }),
                ),
        )
        .await?;
        tx.commit().await?;
        self.forget_trust(&hold.user_id).await;
        Ok(wire::Accepted {
            status: "network_confirmed".into(),
        })
    }

    /// `POST /v1/auth/login/deny`: "this wasn't me". Ends every session, un-trusts the
    /// held network, refuses the user's pending holds and locks the account until a
    /// password reset.
    pub async fn deny_login_network(
        &self,
        ctx: &Ctx,
        token: &str,
    ) -> Result<wire::Accepted, AuthError> {
        let db = &self.inner.db;
        let now = now_micros();
        let mut tx = db.begin().await?;
        let hold = self.hold_by(&mut tx, "deny_hash", token).await?;
        if hold.denied || hold.expires_at <= now {
            return Err(AuthError::BadEmailToken);
        }
        let user = hold.user_id.as_str();
        sqlx::query(
            "UPDATE login_holds SET denied_at = $1 WHERE user_id = $2 AND denied_at IS NULL AND completed_at IS NULL",
        )
        .bind(now)
        .bind(user)
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE login_holds SET denied_at = $1 WHERE ticket_hash = $2")
            .bind(now)
            .bind(&hold.ticket_hash)
            .execute(&mut *tx)
            .await?;
        let untrusted = sqlx::query(
            "UPDATE trusted_networks SET revoked_at = $1 WHERE user_id = $2 AND network = $3 AND revoked_at IS NULL",
        )
        .bind(now)
        .bind(user)
        .bind(&hold.network)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        // The lock first, then the revocation: the user row's write lock orders this
        // transaction with a sign-in's session transaction (which starts by updating
        // that row, see `login`). A sign-in ordered after it sees the lock and is
        // refused; one ordered before it has committed its session, which the
        // revocation below then sees (on PostgreSQL the revoking statement starts after
        // the row lock was granted, so its snapshot includes that session).
        sqlx::query("UPDATE users SET security_locked_at = $1, updated_at = $1 WHERE id = $2")
            .bind(now)
            .bind(user)
            .execute(&mut *tx)
            .await?;
        let revoked = self
            .revoke_sessions_tx(&mut tx, user, None, "ip_login_denied")
            .await?;
        append(
            db,
            &mut tx,
            &ctx.origin(),
            NewAudit::success("login.denied_by_user")
                .actor(user)
                .resource(user)
                .metadata(serde_json::json!({
                    "network": hold.network,
                    "sessions_revoked": revoked,
                    "network_untrusted": untrusted > 0,
                })),
        )
        .await?;
        append(
            db,
            &mut tx,
            &ctx.origin(),
            NewAudit::success("account.locked")
                .actor(user)
                .resource(user)
                .metadata(
                    serde_json::json!({ "reason": "ip_login_denied", "until": "password_reset" }),
                ),
        )
        .await?;
        tx.commit().await?;
        self.sessions_changed(Some(user)).await;
        self.forget_trust(user).await;
        Ok(wire::Accepted {
            status: "account_locked".into(),
        })
    }

    async fn hold_by(
        &self,
        tx: &mut vaultpay_store::Tx,
        column: &'static str,
        token: &str,
    ) -> Result<Hold, AuthError> {
        if token.is_empty() || token.len() > 128 {
            return Err(AuthError::BadEmailToken);
        }
        let hash = sha256_hex(token.as_bytes());
        let db = &self.inner.db;
        let owner = crate::sessions::lock_owner(db, tx, "login_holds", column, &hash).await?;
        // `column` is one of three literals chosen in this module, never input.
        let row = sqlx::query(&format!(
            "SELECT ticket_hash, user_id, network, device_id, device_name, expires_at, confirmed_at, denied_at, \
             completed_at FROM login_holds WHERE {column} = $1{}",
            db.for_update()
        ))
        .bind(&hash)
        .fetch_optional(&mut **tx)
        .await?
        .ok_or(AuthError::BadEmailToken)?;
        if owner != row.try_get::<Option<String>, _>("user_id")? {
            return Err(AuthError::BadEmailToken);
        }
        Ok(Hold {
            ticket_hash: row.try_get("ticket_hash")?,
            user_id: row.try_get("user_id")?,
            network: row.try_get("network")?,
            device_id: row.try_get("device_id")?,
            device_name: row.try_get("device_name")?,
            expires_at: row.try_get("expires_at")?,
            confirmed: row.try_get::<Option<i64>, _>("confirmed_at")?.is_some(),
            denied: row.try_get::<Option<i64>, _>("denied_at")?.is_some(),
            completed: row.try_get::<Option<i64>, _>("completed_at")?.is_some(),
        })
    }

    /// `POST /v1/auth/login/complete`: `IpConfirmationRequired` until the network is
    /// confirmed, then the token response (once; same device and network only).
    pub async fn complete_login(
        &self,
        ctx: &Ctx,
        req: iwire::LoginCompleteRequest,
    ) -> Result<wire::TokenResponse, AuthError> {
        let cfg = &self.inner.cfg;
        vaultpay_web::enforce(
            &*self.inner.limiter,
            &format!("login-complete:ip:{}", ctx.ip_key()),
            cfg.rate_limits.refresh_per_ip,
        )
        .await?;
        let db = &self.inner.db;
        let now = now_micros();
        let mut tx = db.begin().await?;
        let hold = self
            .hold_by(&mut tx, "ticket_hash", &req.login_ticket)
            .await
            .map_err(|e| match e {
                AuthError::BadEmailToken => AuthError::BadLoginTicket,
                other => other,
            })?;
        let same_network = ctx
            .ip
            .is_some_and(|ip| network_of(ip, self.trust_cfg()) == hold.network);
        if hold.completed
            || hold.denied
            || hold.expires_at <= now
            || !vaultpay_core::crypto::ct_eq(
                hold.device_id.as_bytes(),
                req.device_id.trim().as_bytes(),
            )
            || !same_network
        {
            return Err(AuthError::BadLoginTicket);
        }
        if !hold.confirmed {
            return Err(AuthError::IpConfirmationRequired(req.login_ticket));
        }
        // The lock and the second factors, under the user row's lock (see
        // `sessions::sign_in_check_sql`), without resetting the failure count yet: with
        // a second factor the count must survive until its code passes, or a caller
        // with the password and the mailbox could guess codes for ever, a held login
        // apart (`mfa_challenge` keeps it the same way).
        let row = sqlx::query(&format!(
            "SELECT security_locked_at, {} FROM users WHERE id = $1{}",
            crate::mfa::FACTOR_COLUMNS,
            self.inner.db.for_no_key_update()
        ))
        .bind(&hold.user_id)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(AuthError::BadLoginTicket)?;
        if crate::sessions::is_security_locked(&row)? {
            tx.rollback().await?;
            return Err(self.refuse_security_locked(ctx, &hold.user_id).await);
        }
        let factors = crate::mfa::Factors::from_row(&row)?;
        let done = sqlx::query(
            "UPDATE login_holds SET completed_at = $1 WHERE ticket_hash = $2 AND completed_at IS NULL",
        )
        .bind(now)
        .bind(&hold.ticket_hash)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if done != 1 {
            return Err(AuthError::BadLoginTicket);
        }
        // A confirmed network replaces no factor: a user with a second factor goes on
        // to the MFA step (202 mfa_required with a ticket) exactly as a trusted login.
        if factors.any() {
            let device = wire::DeviceInfo {
                id: hold.device_id.clone(),
                name: hold.device_name.clone(),
            };
            // in this transaction, which holds the user's row: a revocation is wholly
            // before the ticket (and the hold was ended) or after it (and spends it)
            let challenge = self
                .mfa_challenge_in(&mut tx, ctx, &hold.user_id, &device, &factors)
                .await?;
            tx.commit().await?;
            return Err(challenge);
        }
        sqlx::query(crate::oauth::signin::RESET_FAILURES_SQL)
            .bind(&hold.user_id)
            .execute(&mut *tx)
            .await?;
        let facts = SessionFacts {
            user_id: hold.user_id.clone(),
            session_id: uuid::Uuid::now_v7().to_string(),
            device_id: hold.device_id.clone(),
            auth_time: now,
            amr: vec!["pwd".into()],
        };
        let refresh = self
            .open_session(
                &mut tx,
                ctx,
                &facts,
                &hold.device_name,
                now,
                serde_json::json!({ "via": "ip_confirmation" }),
            )
            .await?;
        tx.commit().await?;
        metrics::counter!("auth_logins_total", "outcome" => "success").increment(1);
        self.token_response(facts, refresh).await
    }

    /// The refresh hook (before the rotation transaction): a live refresh token used
    /// from an untrusted network is refused with `invalid_grant`; nothing is revoked.
    /// A spent token passes on, so reuse detection still revokes its family.
    pub(crate) async fn ip_trust_refresh_gate(
        &self,
        ctx: &Ctx,
        user_id: &str,
        session_id: &str,
        spent: bool,
    ) -> Result<(), AuthError> {
        let cfg = self.trust_cfg();
        let Some(ip) = ctx.ip.filter(|_| cfg.enabled && !spent) else {
            return Ok(());
        };
        let network = network_of(ip, cfg);
        match self.check_network(user_id, &network).await? {
            Verdict::Trusted(exp) => self.touch_network(user_id, &network, exp).await,
            Verdict::Untrusted => {
                self.audit_only(
                    ctx,
                    NewAudit::failure("token.refresh_refused_untrusted_network")
                        .actor(user_id)
                        .resource(session_id)
                        .metadata(
                            serde_json::json!({ "network": network, "session_revoked": false }),
                        ),
                )
                .await?;
                Err(AuthError::OAuth(
                    "invalid_grant",
                    "this request comes from a network the account has not confirmed; \
                     sign in again from here to confirm it (the session stays valid elsewhere)"
                        .into(),
                ))
            }
        }
    }

    /// Introspection with the caller's address: inactive (`network_trusted: false`)
    /// when `client_ip` is outside the user's trusted networks.
    pub async fn introspect_from(
        &self,
        token: &str,
        client_ip: Option<IpAddr>,
    ) -> Result<wire::Introspection, AuthError> {
        let mut r = self.introspect_token(token).await?;
        let cfg = self.trust_cfg();
        let (Some(ip), Some(sub), true, true) = (client_ip, r.sub.clone(), r.active, cfg.enabled)
        else {
            return Ok(r);
        };
        if r.sid.is_none() {
            return Ok(r);
        }
        let network = network_of(ip, cfg);
        if let Verdict::Trusted(_) = self.check_network(&sub, &network).await? {
            r.network_trusted = Some(true);
            return Ok(r);
        }
        let sid = r.sid.clone().unwrap_or_default();
        let ctx = Ctx {
            ip: Some(ip),
            request_id: vaultpay_web::current_request_id(),
            user_agent: None,
        };
        self.audit_only(
            &ctx,
            NewAudit::failure("introspection.untrusted_network")
                .actor(&sub)
                .resource(&sid)
                .metadata(serde_json::json!({ "network": network })),
        )
        .await?;
        Ok(wire::Introspection {
            active: false,
            network_trusted: Some(false),
            ..wire::Introspection::default()
        })
    }

    /// `GET /v1/me/trusted-networks`.
    pub async fn list_trusted_networks(
        &self,
        ctx: &Ctx,
        p: &Principal,
    ) -> Result<iwire::TrustedNetworkList, AuthError> {
        self.require_live_session(p).await?;
        let here = ctx.ip.map(|ip| network_of(ip, self.trust_cfg()));
        let rows = sqlx::query(
            "SELECT id, network, created_at, last_used_at, expires_at FROM trusted_networks \
             WHERE user_id = $1 AND revoked_at IS NULL AND expires_at > $2 ORDER BY created_at LIMIT 500",
        )
        .bind(p.user_id())
        .bind(now_micros())
        .fetch_all(self.inner.db.read())
        .await?;
        let networks = rows
            .iter()
            .map(|r| {
                let network: String = r.try_get("network")?;
                Ok(iwire::TrustedNetwork {
                    id: r.try_get("id")?,
                    current: here.as_deref() == Some(network.as_str()),
                    network,
                    created_at: rfc3339(r.try_get("created_at")?),
                    last_used_at: rfc3339(r.try_get("last_used_at")?),
                    expires_at: rfc3339(r.try_get("expires_at")?),
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        Ok(iwire::TrustedNetworkList { networks })
    }

    /// `DELETE /v1/me/trusted-networks/{id}`: only the caller's own (others: 404).
    pub async fn revoke_trusted_network(
        &self,
        ctx: &Ctx,
        p: &Principal,
        id: &str,
    ) -> Result<(), AuthError> {
        self.revoke_own(
            ctx,
            p,
            "UPDATE trusted_networks SET revoked_at = $1 WHERE id = $2 AND user_id = $3 AND revoked_at IS NULL",
            id,
            "trusted network",
            "ip_trust.revoked",
        )
        .await?;
        self.forget_trust(p.user_id()).await;
        Ok(())
    }
}

struct Hold {
    ticket_hash: String,
    user_id: String,
    network: String,
    device_id: String,
    device_name: String,
    expires_at: i64,
    confirmed: bool,
    denied: bool,
    completed: bool,
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn networks_are_masked_prefixes() {
        let cfg = IpTrustConfig::default();
        let n = |s: &str| network_of(s.parse().unwrap(), &cfg);
        assert_eq!(n("203.0.113.77"), "203.0.113.0/24");
        assert_eq!(n("::ffff:203.0.113.77"), "203.0.113.0/24");
        assert_eq!(n("2001:db8:1:2:3:4:5:6"), "2001:db8:1:2::/64");
        let exact = IpTrustConfig {
            ipv4_prefix: 32,
            ipv6_prefix: 128,
            ..IpTrustConfig::default()
        };
        assert_eq!(
            network_of("203.0.113.77".parse().unwrap(), &exact),
            "203.0.113.77/32"
        );
        assert_ne!(n("203.0.114.1"), n("203.0.113.1"));
    }

    type Attempt = (String, tokio::sync::oneshot::Sender<Result<(), String>>);
    type Attempts = tokio::sync::mpsc::UnboundedReceiver<Attempt>;

    /// A shared store whose every `forget` waits for the test's answer.
    struct Scripted(tokio::sync::mpsc::UnboundedSender<Attempt>);

    impl TrustBackend for Scripted {
        fn contains<'a>(&'a self, _: &'a str, _: &'a str) -> BoxFuture<'a, Result<Lookup, String>> {
            Box::pin(async { Err("not in this test".to_owned()) })
        }

        fn fill<'a>(
            &'a self,
            _: &'a str,
            _: u64,
            _: Vec<String>,
            _: u64,
        ) -> BoxFuture<'a, Result<(), String>> {
            Box::pin(async { Err("not in this test".to_owned()) })
        }

        fn forget<'a>(&'a self, user: &'a str) -> BoxFuture<'a, Result<(), String>> {
            Box::pin(async move {
                let (answer, answered) = tokio::sync::oneshot::channel();
                self.0
                    .send((user.to_owned(), answer))
                    .map_err(|_| "test over".to_owned())?;
                answered.await.map_err(|_| "test over".to_owned())?
            })
        }
    }

    /// A service on a fresh SQLite database whose shared trust store is `Scripted`:
    /// its `forget` calls come out of the receiver.
    async fn scripted_service() -> (AuthService, Attempts, std::path::PathBuf) {
        let (svc, _db, dir) = crate::service::test_service().await;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        svc.set_trust_backend(Arc::new(Scripted(tx)));
        (svc, rx, dir)
    }

    /// Retry tasks alive (one per user being retried).
    fn retry_tasks(svc: &AuthService) -> usize {
        svc.inner.iptrust.retrying.tasks()
    }

    /// Waits (bounded) until `n` retry tasks are alive.
    async fn until_tasks(svc: &AuthService, n: usize) {
        guard(async {
            while retry_tasks(svc) != n {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
    }

    /// A hang guard, not a timing assertion.
    async fn guard<F: std::future::Future>(f: F) -> F::Output {
        tokio::time::timeout(Duration::from_secs(30), f)
            .await
            .expect("hung")
    }

    async fn next_attempt(attempts: &mut Attempts) -> Attempt {
        guard(attempts.recv()).await.unwrap()
    }

    /// A change for `user` whose own drop of the shared set fails: returns once
    /// `forget_trust` has.
    async fn failed_change(svc: &AuthService, attempts: &mut Attempts, user: &'static str) {
        let change = {
            let svc = svc.clone();
            tokio::spawn(async move { svc.forget_trust(user).await })
        };
        let (whose, answer) = next_attempt(attempts).await;
        assert_eq!(whose, user);
        answer.send(Err("Redis is down".into())).unwrap();
        guard(change).await.unwrap();
    }

    /// A failed drop of the shared set gets one retry task per user, however many
    /// changes fail while it runs; changes that came while an attempt ran make it drop
    /// the set once more; once it is done, the next failure starts a new task.
    #[tokio::test]
    async fn a_failed_shared_drop_has_one_retry_task_that_drops_again_after_a_change() {
        let (svc, mut attempts, dir) = scripted_service().await;
        let ok = |(_, answer): Attempt| answer.send(Ok(())).unwrap();

        failed_change(&svc, &mut attempts, "u1").await;
        assert_eq!(retry_tasks(&svc), 1);
        // the retry task's first attempt, held in flight
        let held = next_attempt(&mut attempts).await;
        assert_eq!(held.0, "u1");
        // more changes meanwhile, whose own drops fail too: no task of their own
        for _ in 0..3 {
            failed_change(&svc, &mut attempts, "u1").await;
            assert_eq!(retry_tasks(&svc), 1, "a second retry task for one user");
        }
        // another user's failed drop does get a retry task of its own
        failed_change(&svc, &mut attempts, "u2").await;
        assert_eq!(retry_tasks(&svc), 2);
        let other = next_attempt(&mut attempts).await;
        assert_eq!(other.0, "u2");
        ok(other);
        until_tasks(&svc, 1).await;

        // the held attempt succeeds, but changes came while it ran: once more
        ok(held);
        let again = guard(async {
            tokio::select! {
                a = attempts.recv() => Some(a.unwrap()),
                () = until_tasks(&svc, 0) => None,
            }
        })
        .await
        .expect("the retry task ended without dropping the set once more");
        assert_eq!(again.0, "u1");
        ok(again);
        until_tasks(&svc, 0).await;
        assert!(
            attempts.try_recv().is_err(),
            "an attempt after the task ended"
        );

        // the task is done: the next failure starts a new one
        failed_change(&svc, &mut attempts, "u1").await;
        assert_eq!(retry_tasks(&svc), 1, "no retry task after a failed drop");
        let retry = next_attempt(&mut attempts).await;
        assert_eq!(retry.0, "u1");
        ok(retry);
        until_tasks(&svc, 0).await;
        let _ = std::fs::remove_dir_all(dir);
    }
}
