//! Login, refresh-token rotation with reuse detection, sessions and logout,
//! and token introspection.

use crate::accounts::normalise_email;
use crate::rotation::{Rotated, Rotation};
use crate::service::SessionFacts;
use crate::{AuthError, AuthService};
use futures::future::BoxFuture;
use sqlx::Row;
use std::net::IpAddr;
use vaultpay_core::crypto::{opaque_token, sha256_hex};
use vaultpay_core::time::{now_micros, rfc3339, secs};
use vaultpay_proto::auth as wire;
use vaultpay_store::audit::{append, append_with, Insert, NewAudit, Param};
use vaultpay_store::Tx;
use vaultpay_web::{Ctx, Principal};

const MAX_DEVICE_ID: usize = 128;
const MAX_DEVICE_NAME: usize = 100;

fn check_device(id: &str, name: &str) -> Result<(), AuthError> {
    let ok = |s: &str, max: usize| {
        !s.trim().is_empty() && s.chars().count() <= max && !s.chars().any(char::is_control)
    };
    if !ok(id, MAX_DEVICE_ID) || !ok(name, MAX_DEVICE_NAME) {
        return Err(AuthError::Invalid(
            "device_invalid",
            format!("device.id (1–{MAX_DEVICE_ID}) and device.name (1–{MAX_DEVICE_NAME}) must be non-empty printable text."),
        ));
    }
    Ok(())
}

fn amr_of(text: &str) -> Vec<String> {
    text.split(' ')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// A refresh checked up to its rotation ([`AuthService::start_refresh`]).
pub(crate) struct RefreshStart {
    /// The token's session as read before the rotation.
    pub facts: SessionFacts,
    /// The OAuth client the session was created for (`None`: first-party).
    pub client_id: Option<String>,
    /// The session's OAuth grant.
    pub scope: Option<String>,
    pub rotation: Rotation,
}

/// A sign-in whose password matched, and the account state read with the hash.
pub(crate) struct Signin {
    pub user_id: String,
    /// Normalised.
    pub email: String,
    /// A "this wasn't me" lock is set (see `iptrust`).
    pub security_locked: bool,
    /// The hash the password matched: the session transaction refuses the sign-in if
    /// the password changed while Argon2 ran ([`password_changed_since`]).
    pub password_hash: String,
}

/// Whether a row of [`sign_in_check_sql`] (asked for `password_hash`) shows another
/// password than the one a sign-in matched: a reset or change committed while Argon2
/// ran, which revoked the user's sessions and must not be followed by one opened with
/// the old password.
pub(crate) fn password_changed_since(
    row: &sqlx::any::AnyRow,
    matched: &str,
) -> Result<bool, sqlx::Error> {
    Ok(row.try_get::<String, _>("password_hash")? != matched)
}

/// The statement a sign-in's session transaction starts with (password login, second
/// factor, confirmed IP hold, OAuth browser sign-in): resets the failure count and
/// returns `security_locked_at` (and `more` columns of `users`), under the user row's
/// write lock. `deny_login_network` takes that lock before it revokes sessions, so a
/// sign-in is ordered either before it (and its session is revoked) or after it (and
/// sees the lock). No row: the user is gone.
pub(crate) fn sign_in_check_sql(more: &str) -> String {
    format!("UPDATE users SET failed_logins = 0 WHERE id = $1 RETURNING security_locked_at{more}")
}

/// Whether `user_id` is locked by "this wasn't me", read in `tx` under the user row's
/// lock without writing the row (where [`sign_in_check_sql`] would reset the failure
/// count too); `None`: no such user.
pub(crate) async fn security_locked_in(
    db: &vaultpay_store::Db,
    tx: &mut Tx,
    user_id: &str,
) -> Result<Option<bool>, AuthError> {
    let row = sqlx::query(&format!(
        "SELECT security_locked_at FROM users WHERE id = $1{}",
        db.for_no_key_update()
    ))
    .bind(user_id)
    .fetch_optional(&mut **tx)
    .await?;
    Ok(row.as_ref().map(is_security_locked).transpose()?)
}

/// Locks the row of the user that `table`'s row with `key = value` belongs to, in `tx`,
/// before the caller locks that row; returns the user's id (`None`: no such row, or no
/// user on it yet). Every step that uses a grant, ticket or link (a code exchange, a
/// device poll or approval, a second factor, a held login's confirmation or
/// completion, an email link) takes the user's row first, as a revocation of the
/// user's sessions does ([`AuthService::revoke_sessions_tx`]): the two are then
/// ordered on that row. A step ordered after a revocation finds its grant ended; one
/// ordered before it has committed what it opened, which the revocation then ends. (In
/// the other order the revocation, holding the user's row, met the grant's row locked
/// by a step waiting for the user's row: it had to skip the row, and the step went on
/// after the revocation committed.) On SQLite, whose write transactions do not
/// overlap, this is only a read. The caller compares the returned id with the user id
/// on the row it then locks, and refuses the step if they differ (a device code
/// approved in between).
pub(crate) async fn lock_owner(
    db: &vaultpay_store::Db,
    tx: &mut Tx,
    table: &'static str,
    key: &'static str,
    value: &str,
) -> Result<Option<String>, AuthError> {
    // `table` and `key` are constants of this crate, never input.
    let row = sqlx::query(&format!(
        "SELECT id FROM users WHERE id = (SELECT user_id FROM {table} WHERE {key} = $1){}",
        db.for_no_key_update()
    ))
    .bind(value)
    .fetch_optional(&mut **tx)
    .await?;
    Ok(row.map(|r| r.try_get("id")).transpose()?)
}

/// Ends the sessions `filter` selects (with `binds` for `$1`, `$2`, …; it names live
/// ones itself), revoked at `now` for `reason`; returns how many. On PostgreSQL they are
/// locked first in id order: the order the refresh rotation locks a group's sessions
/// in (`rotation::lock_rows`). A plain `UPDATE` locked them in whatever order its plan
/// read them, and a rotation group holding two of the same user's sessions could wait
/// for it in a cycle (a deadlock, one of the two refused). SQLite's write transactions
/// do not overlap.
pub(crate) async fn revoke_sessions_where(
    db: &vaultpay_store::Db,
    tx: &mut Tx,
    filter: &'static str,
    binds: &[&str],
    reason: &str,
    now: i64,
) -> Result<u64, AuthError> {
    // `filter` is a constant of this crate, never input.
    if db.backend() == vaultpay_store::Backend::Postgres {
        let sql = format!("SELECT id FROM sessions WHERE {filter} ORDER BY id FOR UPDATE");
        let mut q = sqlx::query(&sql);
        for b in binds {
            q = q.bind(*b);
        }
        q.fetch_all(&mut **tx).await?;
    }
    let sql = format!(
        "UPDATE sessions SET revoked_at = ${}, revoked_reason = ${} WHERE {filter}",
        binds.len() + 1,
        binds.len() + 2
    );
    let mut q = sqlx::query(&sql);
    for b in binds {
        q = q.bind(*b);
    }
    let n = q
        .bind(now)
        .bind(reason)
        .execute(&mut **tx)
        .await?
        .rows_affected();
    Ok(n)
}

/// What a step proved before its transaction, for [`recheck_authority`].
#[derive(Clone, Copy, Default)]
pub(crate) struct Proof<'a> {
    /// The hash the step's password matched.
    pub password_hash: Option<&'a str>,
    /// The session of the step's token.
    pub session: Option<&'a str>,
}

impl<'a> Proof<'a> {
    /// A password that matched `hash`.
    pub(crate) fn password(hash: &'a str) -> Self {
        Self {
            password_hash: Some(hash),
            session: None,
        }
    }

    /// The session `id` of the caller's token.
    pub(crate) fn session(id: &'a str) -> Self {
        Self {
            password_hash: None,
            session: Some(id),
        }
    }
}

/// A session that is neither revoked nor expired: `$1` its id, `$2` its user, `$3` now.
const LIVE_SESSION_SQL: &str = "SELECT id FROM sessions WHERE id = $1 AND user_id = $2 AND revoked_at IS NULL AND expires_at > $3 AND idle_expires_at > $3";

/// Re-checks in `tx`, under the user's row lock (see [`lock_owner`]), what a step
/// proved before its transaction began: the password (Argon2 runs outside any
/// transaction) and the caller's session. A password reset or change, "log out
/// everywhere" or "this wasn't me" that committed meanwhile refuses the step, which
/// would otherwise act after it on the authority it ended (set a password of its own
/// choosing over a reset, mail an email-change link, approve a device, carry an OAuth
/// sign-in on to consent). Returns the account's current password hash.
pub(crate) async fn recheck_authority(
    db: &vaultpay_store::Db,
    tx: &mut Tx,
    user_id: &str,
    proof: Proof<'_>,
) -> Result<String, AuthError> {
    let row = sqlx::query(&format!(
        "SELECT password_hash FROM users WHERE id = $1{}",
        db.for_no_key_update()
    ))
    .bind(user_id)
    .fetch_optional(&mut **tx)
    .await?
    .ok_or(AuthError::InvalidCredentials)?;
    if let Some(sid) = proof.session {
        let now = now_micros();
        let live = sqlx::query(LIVE_SESSION_SQL)
            .bind(sid)
            .bind(user_id)
            .bind(now)
            .fetch_optional(&mut **tx)
            .await?;
        if live.is_none() {
            return Err(AuthError::SessionInactive);
        }
    }
    // The password the step was given is no longer the account's.
    if let Some(m) = proof.password_hash {
        if password_changed_since(&row, m)? {
            return Err(AuthError::InvalidCredentials);
        }
    }
    Ok(row.try_get("password_hash")?)
}

/// Begins a transaction that first re-checks the caller of `p` under the user's row
/// lock ([`recheck_authority`]): its session, and the hash its password matched, if
/// the step took one. For the caller's own account changes: a reset, change or "log
/// out everywhere" that committed since the step's checks ended the session, and no
/// password, email, second factor or link changes on its authority.
pub(crate) async fn begin_as_caller(
    db: &vaultpay_store::Db,
    p: &vaultpay_web::Principal,
    password_hash: Option<&str>,
) -> Result<Tx, AuthError> {
    let mut tx = db.begin().await?;
    let proof = Proof {
        password_hash,
        session: Some(p.session_id()),
    };
    recheck_authority(db, &mut tx, p.user_id(), proof).await?;
    Ok(tx)
}

/// Expires a user's logins held for a network confirmation (see `iptrust`): neither
/// their confirm and deny links nor completing them does anything afterwards.
pub(crate) async fn expire_login_holds(
    tx: &mut Tx,
    user_id: &str,
    now: i64,
) -> Result<(), AuthError> {
    end_user_rows(
        tx,
        "login_holds",
        "expires_at = 0",
        "completed_at IS NULL AND expires_at > $1",
        user_id,
        now,
    )
    .await
}

/// Applies `set` to `user_id`'s (`$2`) rows of `table` that match `filter` (now is
/// `$1`), in a transaction that holds the user's row (see [`lock_owner`]). The names,
/// the assignment and the filter are constants of this crate, never input. A grant
/// that expires is ended with `expires_at = 0`, not now: a step that read its clock
/// before it waited for the user's row compares with an earlier now, by which a grant
/// ended now would still look live.
pub(crate) async fn end_user_rows(
    tx: &mut Tx,
    table: &'static str,
    set: &'static str,
    filter: &'static str,
    user_id: &str,
    now: i64,
) -> Result<(), AuthError> {
    sqlx::query(&format!(
        "UPDATE {table} SET {set} WHERE user_id = $2 AND {filter}"
    ))
    .bind(now)
    .bind(user_id)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Whether a row of [`sign_in_check_sql`] shows a "this wasn't me" lock.
pub(crate) fn is_security_locked(row: &sqlx::any::AnyRow) -> Result<bool, sqlx::Error> {
    Ok(row
        .try_get::<Option<i64>, _>("security_locked_at")?
        .is_some())
}

impl AuthService {
    /// `POST /v1/auth/login`.
    pub async fn login(
        &self,
        ctx: &Ctx,
        req: wire::LoginRequest,
    ) -> Result<wire::TokenResponse, AuthError> {
        check_device(&req.device.id, &req.device.name)?;
        let Signin {
            user_id,
            email,
            security_locked,
            password_hash,
        } = self
            .check_credentials(ctx, &req.email, req.password)
            .await?;
        let now = now_micros();
        // A lock by "this wasn't me" (as read with the hash), then IP trust: a hold for
        // an untrusted network.
        if security_locked {
            return Err(self.refuse_security_locked(ctx, &user_id).await);
        }
        self.ip_trust_login_gate(ctx, &user_id, &email, &req.device, &password_hash)
            .await?;

        let db = &self.inner.db;
        let mut tx = db.begin().await?;
        // The lock was read with the password hash, before Argon2 ran; read it again,
        // with the second factors, under the user row's write lock, so that a "this
        // wasn't me" lock or a second factor committed in between refuses this session
        // (the lock's own transaction revokes sessions, and sees this one if it commits
        // first). A user with a factor gets its challenge instead. The same statement
        // resets the failure count.
        let row = sqlx::query(&sign_in_check_sql(&format!(
            ", password_hash, {}",
            crate::mfa::FACTOR_COLUMNS
        )))
        .bind(&user_id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            // Deleted while its password was checked.
            return Err(AuthError::InvalidCredentials);
        };
        if password_changed_since(&row, &password_hash)? {
            tx.rollback().await?;
            return Err(AuthError::InvalidCredentials);
        }
        if is_security_locked(&row)? {
            tx.rollback().await?;
            return Err(self.refuse_security_locked(ctx, &user_id).await);
        }
        let factors = crate::mfa::Factors::from_row(&row)?;
        if factors.any() {
            tx.rollback().await?;
            return Err(self
                .mfa_challenge(ctx, &user_id, &req.device, &factors, &password_hash)
                .await?);
        }
        let facts = SessionFacts {
            user_id: user_id.clone(),
            session_id: uuid::Uuid::now_v7().to_string(),
            device_id: req.device.id.trim().to_owned(),
            auth_time: now,
            amr: vec!["pwd".into()],
        };
        let refresh = self
            .open_session(
                &mut tx,
                ctx,
                &facts,
                req.device.name.trim(),
                now,
                serde_json::Value::Null,
            )
            .await?;
        tx.commit().await?;
        self.reset_login_limit(&email).await;
        metrics::counter!("auth_logins_total", "outcome" => "success").increment(1);
        self.token_response(facts, refresh).await
    }

    /// The password check every sign-in shares (`/v1/auth/login`, the OAuth browser
    /// pages): rate limits per address and per account, the lockout, Argon2 off the
    /// runtime (an unknown email costs the same), failures counted and audited, one
    /// generic error. Returns what the gates after it need (see [`Signin`]).
    pub(crate) async fn check_credentials(
        &self,
        ctx: &Ctx,
        email: &str,
        password: String,
    ) -> Result<Signin, AuthError> {
        let cfg = &self.inner.cfg;
        if password.len() > 1024 {
            return Err(AuthError::InvalidCredentials);
        }
        let limiter = &*self.inner.limiter;
        vaultpay_web::enforce(
            limiter,
            &format!("login:ip:{}", ctx.ip_key()),
            cfg.rate_limits.login_per_ip,
        )
        .await?;
        let email = normalise_email(email).map_err(|_| AuthError::InvalidCredentials)?;
        vaultpay_web::enforce(
            limiter,
            &format!("login:acct:{email}"),
            cfg.rate_limits.login_per_account,
        )
        .await?;

        // One read for what the sign-in checks before Argon2 (its second factors are
        // read once, in the session transaction: see `login`).
        let row = sqlx::query(
            "SELECT id, password_hash, locked_until, security_locked_at FROM users WHERE email = $1",
        )
        .bind(&email)
        .fetch_optional(self.inner.db.read())
        .await?;
        let now = now_micros();
        let (user_id, phc) = match &row {
            Some(r) => {
                if let Err(locked) = AuthError::if_locked(r.try_get("locked_until")?, now) {
                    metrics::counter!("auth_logins_total", "outcome" => "locked").increment(1);
                    let id: String = r.try_get("id")?;
                    self.audit_only(
                        ctx,
                        NewAudit::failure("login.refused_locked")
                            .actor(&id)
                            .resource(&id),
                    )
                    .await?;
                    return Err(locked);
                }
                (
                    Some(r.try_get::<String, _>("id")?),
                    Some(r.try_get::<String, _>("password_hash")?),
                )
            }
            None => (None, None),
        };
        let ok = self.verify_password(password, phc).await?;
        let (Some(user_id), Some(row)) = (user_id.filter(|_| ok), &row) else {
            self.login_failed(ctx, &email, row.is_some()).await?;
            metrics::counter!("auth_logins_total", "outcome" => "failure").increment(1);
            return Err(AuthError::InvalidCredentials);
        };
        Ok(Signin {
            user_id,
            email,
            security_locked: is_security_locked(row)?,
            password_hash: row.try_get("password_hash")?,
        })
    }

    /// Opens a first-party session (its row and first refresh token) inside `tx` and
    /// audits `login.succeeded` there, with `extra` merged into the entry's metadata;
    /// returns the refresh token. The caller commits, then calls `token_response`.
    pub(crate) async fn open_session(
        &self,
        tx: &mut Tx,
        ctx: &Ctx,
        facts: &SessionFacts,
        device_name: &str,
        now: i64,
        extra: serde_json::Value,
    ) -> Result<String, AuthError> {
        let cfg = &self.inner.cfg;
        let expires = now + secs(cfg.session_absolute_ttl_secs);
        let idle = (now + secs(cfg.session_idle_ttl_secs)).min(expires);
        let text = |s: &str| Param::Text(Some(s.to_owned()));
        let session = Insert {
            target: "sessions (id, user_id, device_id, device_name, ip, user_agent, created_at, last_seen_at, \
                     idle_expires_at, expires_at, auth_time, amr)",
            values: vec![
                text(&facts.session_id),
                text(&facts.user_id),
                text(&facts.device_id),
                text(device_name.trim()),
                Param::Text(ctx.ip.map(|i| i.to_string())),
                Param::Text(ctx.user_agent.clone()),
                Param::Int(now),
                Param::Int(now),
                Param::Int(idle),
                Param::Int(expires),
                Param::Int(facts.auth_time),
                text(&facts.amr.join(" ")),
            ],
        };
        let refresh = opaque_token();
        let refresh_row = Insert {
            target: "refresh_tokens (token_hash, session_id, created_at)",
            values: vec![
                text(&sha256_hex(refresh.as_bytes())),
                text(&facts.session_id),
                Param::Int(now),
            ],
        };
        let mut metadata = serde_json::json!({ "device_id": facts.device_id, "amr": facts.amr });
        if let (Some(m), serde_json::Value::Object(more)) = (metadata.as_object_mut(), extra) {
            m.extend(more);
        }
        // The session, its first refresh token and the audit entry: one round trip.
        append_with(
            &self.inner.db,
            tx,
            &[session, refresh_row],
            &ctx.origin(),
            NewAudit::success("login.succeeded")
                .actor(&facts.user_id)
                .resource(&facts.session_id)
                .metadata(metadata),
        )
        .await?;
        metrics::counter!("auth_tokens_issued_total", "kind" => "refresh").increment(1);
        Ok(refresh)
    }

    /// The token response of a session: an access token with the user's current roles,
    /// and the refresh token given.
    pub(crate) async fn token_response(
        &self,
        facts: SessionFacts,
        refresh: String,
    ) -> Result<wire::TokenResponse, AuthError> {
        let roles = self.effective(&facts.user_id).await?.roles.clone();
        let (access, ttl) = self.issue_access(&facts, roles)?;
        Ok(wire::TokenResponse {
            access_token: access,
            token_type: "Bearer".into(),
            expires_in: ttl,
            refresh_token: Some(refresh),
            scope: None,
            session_id: Some(facts.session_id),
        })
    }

    /// Counts a failed login; locks the account after too many in a row.
    pub(crate) async fn login_failed(
        &self,
        ctx: &Ctx,
        email: &str,
        known: bool,
    ) -> Result<(), AuthError> {
        let db = &self.inner.db;
        let lock = &self.inner.cfg.lockout;
        let mut tx = db.begin().await?;
        let mut actor = None;
        let mut locked_for = None;
        if known {
            let r = sqlx::query(
                "UPDATE users SET failed_logins = failed_logins + 1 WHERE email = $1 RETURNING id, failed_logins, lock_count",
            )
            .bind(email)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some(r) = r {
                let id: String = r.try_get("id")?;
                let failed: i64 = r.try_get("failed_logins")?;
                let count: i64 = r.try_get("lock_count")?;
                if failed >= lock.threshold {
                    let dur = lock.duration_secs(count + 1);
                    sqlx::query(
                        "UPDATE users SET failed_logins = 0, lock_count = lock_count + 1, locked_until = $1 WHERE id = $2",
                    )
                    .bind(now_micros() + secs(dur))
                    .bind(&id)
                    .execute(&mut *tx)
                    .await?;
                    locked_for = Some(dur);
                }
                actor = Some(id);
            }
        }
        let failed =
            NewAudit::failure("login.failed").metadata(serde_json::json!({ "email": email }));
        let failed = match &actor {
            Some(id) => failed.actor(id).resource(id),
            None => failed,
        };
        append(db, &mut tx, &ctx.origin(), failed).await?;
        if let (Some(id), Some(dur)) = (&actor, locked_for) {
            append(
                db,
                &mut tx,
                &ctx.origin(),
                NewAudit::success("account.locked")
                    .actor("system")
                    .resource(id)
                    .metadata(serde_json::json!({ "seconds": dur })),
            )
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// The refresh-token grant of `POST /oauth/token` for first-party sessions.
    ///
    /// The answer is made before the rotation, with everything it reads (the roles):
    /// once the rotation commits, the old token is spent, and a failure to answer then
    /// (a database read timing out under load) would lose the new token and make the
    /// client's retry with the old one a reuse that ends the session. A session whose
    /// sign-in facts changed meanwhile (a step-up) is answered from the rotation's own
    /// reading instead.
    pub async fn refresh(
        &self,
        ctx: &Ctx,
        token: &str,
        device_id: Option<&str>,
    ) -> Result<wire::TokenResponse, AuthError> {
        let start = self.start_refresh(ctx, token, device_id, None).await?;
        let before = start.facts.clone();
        let mut answer = self.token_response(start.facts, String::new()).await?;
        let rotated = self.rotate_refresh(start.rotation, &before.user_id).await?;
        if before.session_id == rotated.session_id
            && before.auth_time == rotated.auth_time
            && before.amr == amr_of(&rotated.amr)
        {
            answer.refresh_token = Some(rotated.refresh_token);
            return Ok(answer);
        }
        let facts = SessionFacts {
            user_id: rotated.user_id,
            session_id: rotated.session_id,
            device_id: rotated.device_id,
            auth_time: rotated.auth_time,
            amr: amr_of(&rotated.amr),
        };
        self.token_response(facts, rotated.refresh_token).await
    }

    /// A refresh up to its rotation, for first-party sessions (`client = None`) or for
    /// the sessions of one OAuth client (a refresh token only ever refreshes for the
    /// client its session was created for; the rotation refuses any other): the form
    /// checked, the limits and the network gate passed, and the token's session as it
    /// reads now, from which the caller makes its answer before [`Self::rotate_refresh`].
    pub(crate) async fn start_refresh(
        &self,
        ctx: &Ctx,
        token: &str,
        device_id: Option<&str>,
        client: Option<&str>,
    ) -> Result<RefreshStart, AuthError> {
        let cfg = &self.inner.cfg;
        vaultpay_web::enforce(
            &*self.inner.limiter,
            &format!("refresh:ip:{}", ctx.ip_key()),
            cfg.rate_limits.refresh_per_ip,
        )
        .await?;
        // Login stores the device id trimmed; compare it the same way here.
        let Some(device_id) = device_id.map(str::trim).filter(|d| !d.is_empty()) else {
            return Err(AuthError::OAuth(
                "invalid_request",
                "device_id is required".into(),
            ));
        };
        if token.is_empty() || token.len() > 256 {
            return Err(AuthError::OAuth(
                "invalid_grant",
                "refresh token is invalid".into(),
            ));
        }
        let hash = sha256_hex(token.as_bytes());
        let db = &self.inner.db;
        // The per-session limit is checked before the write transaction starts, so no
        // database lock is held across a limiter round trip (Redis in production).
        let family = sqlx::query(
            "SELECT r.session_id AS session_id, r.used_at AS used_at, s.user_id AS user_id, \
             s.device_id AS device_id, s.auth_time AS auth_time, s.amr AS amr, \
             s.client_id AS client_id, s.scope AS scope \
             FROM refresh_tokens r JOIN sessions s ON s.id = r.session_id WHERE r.token_hash = $1",
        )
        .bind(&hash)
        .fetch_optional(db.read())
        .await?;
        let Some(family) = family else {
            return Err(AuthError::OAuth(
                "invalid_grant",
                "refresh token is invalid".into(),
            ));
        };
        let session_id: String = family.try_get("session_id")?;
        vaultpay_web::enforce(
            &*self.inner.limiter,
            &format!("refresh:sid:{session_id}"),
            cfg.rate_limits.refresh_per_session,
        )
        .await?;
        let spent = family.try_get::<Option<i64>, _>("used_at")?.is_some();
        let user_id: String = family.try_get("user_id")?;
        // An OAuth client refreshes from its own servers, not the user's network: the
        // user's network was checked when they signed in to the client.
        if client.is_none() {
            self.ip_trust_refresh_gate(ctx, &user_id, &session_id, spent)
                .await?;
        }
        Ok(RefreshStart {
            facts: SessionFacts {
                user_id,
                session_id,
                device_id: family.try_get("device_id")?,
                auth_time: family.try_get("auth_time")?,
                amr: amr_of(&family.try_get::<String, _>("amr")?),
            },
            client_id: family.try_get("client_id")?,
            scope: family.try_get("scope")?,
            rotation: Rotation {
                hash,
                device_id: device_id.to_owned(),
                client: client.map(str::to_owned),
                origin: ctx.origin(),
            },
        })
    }

    /// Rotates the token of a [`Self::start_refresh`] of `user_id`'s session. The
    /// rotation and, when it was refused, the cache invalidation run on their own
    /// task: a refused rotation may have revoked the session (reuse, wrong device), and
    /// a client that hangs up meanwhile must not leave this node's `/v1/me` cache and
    /// the other nodes believing the session is live.
    pub(crate) async fn rotate_refresh(
        &self,
        rotation: Rotation,
        user_id: &str,
    ) -> Result<Rotated, AuthError> {
        let svc = self.clone();
        let user = user_id.to_owned();
        tokio::spawn(async move {
            let r = svc.inner.rotations.rotate(rotation).await;
            if r.is_err() {
                svc.sessions_changed(Some(&user)).await;
            }
            r
        })
        .await
        .map_err(|e| AuthError::Internal(format!("rotation task: {e}")))?
    }

    /// After a commit that revoked sessions or changed a profile: drops what the caches
    /// hold of `user` (everyone's when `None`), here and on the other nodes.
    pub(crate) async fn sessions_changed(&self, user: Option<&str>) {
        self.invalidate_everywhere(user).await;
    }

    /// Revokes a user's live sessions (all, or all but `keep`); returns how many.
    /// The sessions not opened yet go too, so that nothing begun before a password
    /// reset or change, "log out everywhere" or "this wasn't me" (perhaps by whoever had
    /// the old password) opens a session after it: the user's OAuth authorization codes
    /// and approved device codes not yet exchanged expire, their signed-in OAuth
    /// authorization requests (at consent or second factor) are deleted, their login
    /// tickets waiting for a second factor are spent, and their logins held for a
    /// network confirmation expire. So does a pending email change: its link went to
    /// the new address, which may be the intruder's, and confirming it needs no session
    /// (the notice to the current address tells its owner to change the password or end
    /// the other sessions).
    /// The caller calls [`AuthService::sessions_changed`] once it has committed.
    pub(crate) async fn revoke_sessions_tx(
        &self,
        tx: &mut Tx,
        user_id: &str,
        keep: Option<&str>,
        reason: &str,
    ) -> Result<u64, AuthError> {
        let now = now_micros();
        // The user's row first (the callers that change it have locked it already):
        // every step that uses one of the grants ended below locks that row before
        // the grant's (see `lock_owner`), so it is ordered before this revocation or
        // after it, never half-way.
        sqlx::query(&format!(
            "SELECT id FROM users WHERE id = $1{}",
            self.inner.db.for_no_key_update()
        ))
        .bind(user_id)
        .fetch_optional(&mut **tx)
        .await?;
        // Requests next: a consent in flight (it locks its request, never the user
        // row) is waited for, and the code it issues is then expired below.
        sqlx::query("DELETE FROM oauth_requests WHERE user_id = $1")
            .bind(user_id)
            .execute(&mut **tx)
            .await?;
        end_user_rows(
            tx,
            "oauth_codes",
            "expires_at = 0",
            "used_at IS NULL AND expires_at > $1",
            user_id,
            now,
        )
        .await?;
        end_user_rows(
            tx,
            "oauth_device_codes",
            "expires_at = 0",
            "status = 'approved' AND expires_at > $1",
            user_id,
            now,
        )
        .await?;
        end_user_rows(
            tx,
            "mfa_tickets",
            "used_at = $1",
            "used_at IS NULL",
            user_id,
            now,
        )
        .await?;
        expire_login_holds(tx, user_id, now).await?;
        crate::accounts::void_email_tokens(tx, user_id, crate::email_change::PURPOSE, now).await?;
        revoke_sessions_where(
            &self.inner.db,
            tx,
            "user_id = $1 AND revoked_at IS NULL AND id <> $2",
            &[user_id, keep.unwrap_or("")],
            reason,
            now,
        )
        .await
    }

    /// A sign-in passed: the account's sign-in rate limit starts again (best effort: a
    /// limiter that cannot answer keeps the count, which only errs toward limiting).
    pub(crate) async fn reset_login_limit(&self, email: &str) {
        let _ = self
            .inner
            .limiter
            .reset(&format!("login:acct:{email}"))
            .await;
    }

    /// Refuses a token whose session has been revoked or has expired.
    pub async fn require_live_session(&self, p: &Principal) -> Result<(), AuthError> {
        // A token issued to an OAuth client acts on the first-party API only with `api`.
        crate::oauth::require_api_scope(p)?;
        if self.session_live(p.session_id(), p.user_id()).await? {
            Ok(())
        } else {
            Err(AuthError::SessionInactive)
        }
    }

    pub(crate) async fn session_live(
        &self,
        session_id: &str,
        user_id: &str,
    ) -> Result<bool, AuthError> {
        let now = now_micros();
        let r = sqlx::query(LIVE_SESSION_SQL)
            .bind(session_id)
            .bind(user_id)
            .bind(now)
            .fetch_optional(self.inner.db.read())
            .await?;
        Ok(r.is_some())
    }

    /// `GET /v1/sessions`: the caller's live sessions.
    pub async fn list_sessions(&self, p: &Principal) -> Result<wire::SessionList, AuthError> {
        self.require_live_session(p).await?;
        let now = now_micros();
        let rows = sqlx::query(
            "SELECT id, device_id, device_name, ip, user_agent, created_at, last_seen_at, idle_expires_at, expires_at \
             FROM sessions WHERE user_id = $1 AND revoked_at IS NULL AND expires_at > $2 AND idle_expires_at > $2 \
             ORDER BY created_at DESC LIMIT 200",
        )
        .bind(p.user_id())
        .bind(now)
        .fetch_all(self.inner.db.read())
        .await?;
        let sessions = rows
            .iter()
            .map(|r| {
                let id: String = r.try_get("id")?;
                let idle: i64 = r.try_get("idle_expires_at")?;
                let abs: i64 = r.try_get("expires_at")?;
                Ok(wire::Session {
                    current: id == p.session_id(),
                    id,
                    device_id: r.try_get("device_id")?,
                    device_name: r.try_get("device_name")?,
                    ip: r.try_get("ip")?,
                    user_agent: r.try_get("user_agent")?,
                    created_at: rfc3339(r.try_get("created_at")?),
                    last_seen_at: rfc3339(r.try_get("last_seen_at")?),
                    expires_at: rfc3339(idle.min(abs)),
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        Ok(wire::SessionList { sessions })
    }

    /// `DELETE /v1/sessions/{id}`: only the caller's own sessions (others: 404).
    pub async fn revoke_session(
        &self,
        ctx: &Ctx,
        p: &Principal,
        session_id: &str,
    ) -> Result<(), AuthError> {
        // An OAuth client may end its own session, not the user's others.
        if session_id != p.session_id() {
            crate::oauth::require_first_party(p)?;
        }
        self.revoke_own(
            ctx,
            p,
            "UPDATE sessions SET revoked_at = $1, revoked_reason = 'revoked_by_user' \
             WHERE id = $2 AND user_id = $3 AND revoked_at IS NULL",
            session_id,
            "session",
            "session.revoked",
        )
        .await
    }

    /// Revokes one of the caller's own rows (`update` binds now, the id and the user
    /// id) and audits it, in one transaction; another user's or an unknown id is 404.
    pub(crate) async fn revoke_own(
        &self,
        ctx: &Ctx,
        p: &Principal,
        update: &'static str,
        id: &str,
        what: &'static str,
        action: &'static str,
    ) -> Result<(), AuthError> {
        self.require_live_session(p).await?;
        let db = &self.inner.db;
        let mut tx = db.begin().await?;
        let n = sqlx::query(update)
            .bind(now_micros())
            .bind(id)
            .bind(p.user_id())
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if n == 0 {
            return Err(AuthError::NotFound(what));
        }
        append(
            db,
            &mut tx,
            &ctx.origin(),
            NewAudit::success(action).actor(p.user_id()).resource(id),
        )
        .await?;
        tx.commit().await?;
        self.sessions_changed(Some(p.user_id())).await;
        Ok(())
    }

    /// `POST /v1/auth/logout`: ends this session, or every session of the user.
    pub async fn logout(
        &self,
        ctx: &Ctx,
        p: &Principal,
        everywhere: bool,
    ) -> Result<wire::Accepted, AuthError> {
        // A token whose session has already ended must not act (above all, not end
        // the user's live sessions with `everywhere`).
        self.require_live_session(p).await?;
        if everywhere {
            // Every session of the user (and its pending codes and tickets): not for an
            // OAuth client to decide, which may end only its own.
            crate::oauth::require_first_party(p)?;
        }
        let db = &self.inner.db;
        let mut tx = db.begin().await?;
        let n = if everywhere {
            self.revoke_sessions_tx(&mut tx, p.user_id(), None, "logout_everywhere")
                .await?
        } else {
            sqlx::query("UPDATE sessions SET revoked_at = $1, revoked_reason = 'logout' WHERE id = $2 AND user_id = $3 AND revoked_at IS NULL")
                .bind(now_micros())
                .bind(p.session_id())
                .bind(p.user_id())
                .execute(&mut *tx)
                .await?
                .rows_affected()
        };
        let action = if everywhere {
            "logout.everywhere"
        } else {
            "logout"
        };
        append(
            db,
            &mut tx,
            &ctx.origin(),
            NewAudit::success(action)
                .actor(p.user_id())
                .resource(p.session_id())
                .metadata(serde_json::json!({ "sessions_revoked": n })),
        )
        .await?;
        tx.commit().await?;
        self.sessions_changed(Some(p.user_id())).await;
        Ok(wire::Accepted {
            status: "logged_out".into(),
        })
    }

    /// RFC 7662: is this access token valid and its session live?
    pub async fn introspect_token(&self, token: &str) -> Result<wire::Introspection, AuthError> {
        let Ok(claims) = self.inner.verifier.verify(token).await else {
            return Ok(wire::Introspection::default());
        };
        if !claims.sid.is_empty() && !self.session_live(&claims.sid, &claims.sub).await? {
            return Ok(wire::Introspection::default());
        }
        // Session-less (client_credentials) tokens can be revoked one by one, and end
        // with their client: a deleted client's tokens are not active, though they have
        // not expired (they are not listed anywhere to revoke one by one).
        if claims.sid.is_empty() {
            if crate::oauth::tokens::jti_revoked(self, &claims.jti).await? {
                return Ok(wire::Introspection::default());
            }
            if let Some(client) = &claims.client_id {
                if crate::oauth::clients::get(self.db(), client)
                    .await?
                    .is_none()
                {
                    return Ok(wire::Introspection::default());
                }
            }
        }
        // The token's roles that the user still holds: a role revoked since the token
        // was signed is not reported (the ledger's admin actions, which introspect,
        // then stop at once instead of when the token expires). A role granted since
        // needs a new token. Only tokens claiming more than the default role pay the
        // (cached) lookup; session-less tokens carry no user's roles.
        let mut claims = claims;
        if !claims.sid.is_empty() && claims.roles.iter().any(|r| r != "customer") {
            let live = self.effective(&claims.sub).await?;
            claims.roles.retain(|r| live.roles.contains(r));
        }
        Ok(wire::Introspection {
            active: true,
            sub: Some(claims.sub),
            sid: (!claims.sid.is_empty()).then_some(claims.sid),
            exp: Some(claims.exp),
            iat: Some(claims.iat),
            token_type: Some("Bearer".into()),
            roles: Some(claims.roles),
            client_id: claims.client_id,
            network_trusted: None,
        })
    }
}

/// In-process introspection for the all-in-one deployment.
impl vaultpay_web::Introspector for AuthService {
    fn introspect<'a>(
        &'a self,
        token: &'a str,
        client_ip: Option<IpAddr>,
    ) -> BoxFuture<'a, Result<wire::Introspection, String>> {
        Box::pin(async move {
            self.introspect_from(token, client_ip)
                .await
                .map_err(|e| e.to_string())
        })
    }
}
