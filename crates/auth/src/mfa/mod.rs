//! Second factors and step-up (RFC 9470).
//!
//! - TOTP (RFC 6238): a secret sealed with the master-key envelope, enabled after a
//!   confirming code; the last accepted time step is stored so no code works twice.
//!   Enabling issues single-use recovery codes (stored SHA-256 hashed).
//! - Emailed one-time codes: 6 digits, short-lived, single use, dead after a few wrong
//!   guesses, sending rate limited (GCRA), stored hashed.
//! - Login: a correct password for a user with a second factor answers a short-lived,
//!   single-use ticket (stored hashed, bound to the user and device) instead of
//!   tokens; `/v1/auth/mfa/verify` trades it and a code for the token response.
//! - Step-up: `/v1/auth/step-up` proves a factor again for the current session; the
//!   session row's `auth_time`/`amr` move forward so refreshed tokens keep `acr` until
//!   `max_age` passes. Wrong codes everywhere count toward the login lockout.

mod config;
pub(crate) mod routes;

pub use config::{MfaConfig, StepUpConfig};

use crate::service::SessionFacts;
use crate::{AuthError, AuthService};
use axum::http::StatusCode;
use rand::Rng;
use sqlx::Row;
use vaultpay_core::crypto::{ct_eq, opaque_token, sha256_hex};
use vaultpay_core::step_up::{AMR_MFA, AMR_OTP};
use vaultpay_core::time::{now_micros, secs};
use vaultpay_core::totp;
use vaultpay_proto::auth as wire;
use vaultpay_proto::mfa as mw;
use vaultpay_store::audit::{append, NewAudit};
use vaultpay_store::Tx;
use vaultpay_web::{ApiError, Ctx, Principal};

pub(crate) const METHOD_TOTP: &str = "totp";
pub(crate) const METHOD_EMAIL: &str = "email";
pub(crate) const METHOD_RECOVERY: &str = "recovery_code";

/// Operations step-up can guard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepUpOp {
    PasswordChange,
    EmailChange,
    RoleChange,
    /// An administrator removing another user's second factors: always.
    MfaReset,
}

/// What a second-factor check found.
enum Check {
    /// The code was right and has been consumed (in the caller's transaction).
    Ok(&'static str),
    /// Wrong, used, expired or dead: the caller commits (attempt counters) and counts it.
    Wrong(&'static str),
}

/// The user's enabled second factors.
#[derive(Debug, Default, Clone)]
pub(crate) struct Factors {
    totp: bool,
    email: bool,
    recovery_left: i64,
}

/// The second factors of the `users` row a query selects, as three columns
/// (`mfa_totp`, `mfa_email`, `mfa_recovery`) that [`Factors::from_row`] reads: a
/// sign-in reads them in its session transaction, under the user row's lock.
/// Whether `code` has the shape of a TOTP or emailed code (six digits).
fn is_six_digits(code: &str) -> bool {
    let c = code.trim();
    c.len() == 6 && c.bytes().all(|b| b.is_ascii_digit())
}

pub(crate) const FACTOR_COLUMNS: &str = "\
     (SELECT CAST(COUNT(*) AS BIGINT) FROM mfa_totp f WHERE f.user_id = users.id AND f.enabled_at IS NOT NULL) AS mfa_totp, \
     (SELECT CAST(COUNT(*) AS BIGINT) FROM mfa_email f WHERE f.user_id = users.id) AS mfa_email, \
     (SELECT CAST(COUNT(*) AS BIGINT) FROM mfa_recovery_codes f WHERE f.user_id = users.id AND f.used_at IS NULL) AS mfa_recovery";

impl Factors {
    /// Reads the columns of [`FACTOR_COLUMNS`].
    pub(crate) fn from_row(r: &sqlx::any::AnyRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            totp: r.try_get::<i64, _>("mfa_totp")? > 0,
            email: r.try_get::<i64, _>("mfa_email")? > 0,
            recovery_left: r.try_get("mfa_recovery")?,
        })
    }

    pub(crate) fn any(&self) -> bool {
        self.totp || self.email
    }

    fn methods(&self) -> Vec<String> {
        let mut m = Vec::new();
        if self.totp {
            m.push(METHOD_TOTP.to_owned());
        }
        if self.email {
            m.push(METHOD_EMAIL.to_owned());
        }
        if self.totp && self.recovery_left > 0 {
            m.push(METHOD_RECOVERY.to_owned());
        }
        m
    }
}

/// A wrong code where the code is what signs the user in (the second step of a
/// login): 401.
fn code_invalid() -> AuthError {
    AuthError::Api(
        ApiError::new(StatusCode::UNAUTHORIZED, "mfa_code_invalid", "Unauthorized")
            .detail("The code is wrong, expired or already used."),
    )
}

/// A wrong code from a signed-in user (enrolling, turning a factor off, stepping up):
/// 403, as [`crate::error::current_password_wrong`] says why.
fn code_rejected() -> AuthError {
    AuthError::Api(
        ApiError::new(StatusCode::FORBIDDEN, "mfa_code_invalid", "Forbidden")
            .detail("The code is wrong, expired or already used."),
    )
}

fn ticket_invalid() -> AuthError {
    AuthError::Api(
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "mfa_ticket_invalid",
            "Unauthorized",
        )
        .detail("The MFA ticket is invalid, expired or already used; log in again."),
    )
}

fn totp_aad(user_id: &str) -> Vec<u8> {
    format!("mfa_totp:{user_id}").into_bytes()
}

fn email_code_hash(id: &str, code: &str) -> String {
    sha256_hex(format!("{id}:{code}").as_bytes())
}

/// Recovery codes compare without dashes, spaces or case.
fn normalise_recovery(code: &str) -> String {
    code.chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .map(|c| c.to_ascii_uppercase())
        .collect()
}

/// `XXXX-XXXX-XXXX-XXXX`: 80 random bits in base32.
fn new_recovery_code() -> String {
    let bytes: [u8; 10] = rand::rngs::OsRng.gen();
    let b = totp::base32_encode(&bytes);
    format!("{}-{}-{}-{}", &b[0..4], &b[4..8], &b[8..12], &b[12..16])
}

fn six_digits() -> String {
    format!("{:06}", rand::rngs::OsRng.gen_range(0..1_000_000u32))
}

fn qr_svg(data: &str) -> Result<String, AuthError> {
    let code = qrcode::QrCode::new(data.as_bytes())
        .map_err(|e| AuthError::Internal(format!("qr code: {e}")))?;
    Ok(code
        .render::<qrcode::render::svg::Color>()
        .min_dimensions(200, 200)
        .build())
}

/// The subject of an emailed code's mail, and what the user did to ask for it, by
/// the kind of its purpose (`send_email_code`): a user who did none of it learns
/// which step someone with their password attempted.
fn email_code_words(kind: &str) -> (&'static str, &'static str) {
    match kind {
        "enrol" => (
            "Confirm emailed sign-in codes for VaultPay",
            "ask to turn on emailed sign-in codes",
        ),
        "step_up" => (
            "Your VaultPay confirmation code",
            "ask to confirm a sensitive action (a large payment, a security change)",
        ),
        _ => ("Your VaultPay sign-in code", "try to sign in"),
    }
}

fn with_mfa_amr(amr: &[String]) -> Vec<String> {
    let mut out: Vec<String> = amr
        .iter()
        .filter(|m| *m != AMR_OTP && *m != AMR_MFA)
        .cloned()
        .collect();
    if out.is_empty() {
        out.push("pwd".into());
    }
    out.push(AMR_OTP.into());
    out.push(AMR_MFA.into());
    out
}

impl AuthService {
    async fn factors(&self, user_id: &str) -> Result<Factors, AuthError> {
        let r = sqlx::query(&format!("SELECT {FACTOR_COLUMNS} FROM users WHERE id = $1"))
            .bind(user_id)
            .fetch_optional(self.inner.db.read())
            .await?;
        Ok(match r {
            Some(r) => Factors::from_row(&r)?,
            None => Factors::default(),
        })
    }

    pub(crate) async fn user_email(&self, user_id: &str) -> Result<String, AuthError> {
        let r = sqlx::query("SELECT email FROM users WHERE id = $1")
            .bind(user_id)
            .fetch_optional(self.inner.db.read())
            .await?
            .ok_or(AuthError::NotFound("user"))?;
        Ok(r.try_get("email")?)
    }

    /// Refuses a locked account (second-factor and current-password guesses count
    /// toward lockout).
    pub(crate) async fn refuse_locked(&self, user_id: &str) -> Result<(), AuthError> {
        let r = sqlx::query("SELECT locked_until FROM users WHERE id = $1")
            .bind(user_id)
            .fetch_optional(self.inner.db.read())
            .await?;
        let until: Option<i64> = match r {
            Some(r) => r.try_get("locked_until")?,
            None => None,
        };
        AuthError::if_locked(until, now_micros())
    }

    /// Adding a second factor needs proof of a recent authentication, so a stolen
    /// (or long-refreshed) access token cannot enrol an attacker's authenticator:
    /// a login within `max_age` (RFC 9470 `max_age` challenge), or, when the user
    /// already has a second factor, a step-up within `max_age`. And the user's own
    /// session: an OAuth client, whatever its scope, enrols no factor for the user (it
    /// would hold the only TOTP secret and the recovery codes, and lock the user out),
    /// and changes no credential ([`crate::oauth::require_first_party`]).
    pub(crate) async fn require_recent_auth(&self, p: &Principal) -> Result<(), AuthError> {
        crate::oauth::require_first_party(p)?;
        let max_age = self.inner.cfg.step_up.max_age_secs;
        let now = now_micros() / 1_000_000;
        if self.factors(p.user_id()).await?.any() {
            return vaultpay_web::require_step_up(p, max_age, now).map_err(AuthError::Api);
        }
        let auth_time = p.claims.auth_time;
        if auth_time <= now + 60 && now - auth_time <= max_age {
            Ok(())
        } else {
            Err(AuthError::Api(vaultpay_web::reauthentication_required(
                max_age,
            )))
        }
    }

    // ---- TOTP enrolment ----

    /// `POST /v1/mfa/totp`: a new pending secret (replaces a pending one).
    pub async fn totp_enroll(
        &self,
        ctx: &Ctx,
        p: &Principal,
    ) -> Result<mw::TotpEnrollment, AuthError> {
        self.require_live_session(p).await?;
        self.require_recent_auth(p).await?;
        let user_id = p.user_id();
        let email = self.user_email(user_id).await?;
        let secret = zeroize::Zeroizing::new(totp::generate_secret());
        let sealed = self
            .inner
            .env
            .seal(&*secret, &totp_aad(user_id))
            .map_err(|e| AuthError::Internal(e.to_string()))?;
        let db = &self.inner.db;
        let now = now_micros();
        let mut tx = db.begin().await?;
        let n = sqlx::query(
            "INSERT INTO mfa_totp (user_id, secret_sealed, created_at) VALUES ($1, $2, $3) \
             ON CONFLICT (user_id) DO UPDATE SET secret_sealed = $2, created_at = $3, last_step = NULL \
             WHERE mfa_totp.enabled_at IS NULL",
        )
        .bind(user_id)
        .bind(&sealed)
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n != 1 {
            return Err(AuthError::Api(ApiError::conflict(
                "totp_already_enabled",
                "TOTP is already enabled; disable it first to enrol a new authenticator.",
            )));
        }
        append(
            db,
            &mut tx,
            &ctx.origin(),
            NewAudit::success("mfa.totp_enrollment_started")
                .actor(user_id)
                .resource(user_id),
        )
        .await?;
        tx.commit().await?;
        let b32 = zeroize::Zeroizing::new(totp::base32_encode(&*secret));
        let uri = totp::otpauth_uri(&self.inner.cfg.mfa.totp_issuer, &email, &b32);
        let svg = qr_svg(&uri)?;
        Ok(mw::TotpEnrollment {
            secret: b32.to_string(),
            otpauth_uri: uri,
            qr_svg: svg,
        })
    }

    /// `POST /v1/mfa/totp/confirm`: enables the pending secret and answers fresh
    /// recovery codes (shown once).
    pub async fn totp_confirm(
        &self,
        ctx: &Ctx,
        p: &Principal,
        code: &str,
    ) -> Result<mw::TotpConfirmed, AuthError> {
        self.require_live_session(p).await?;
        self.require_recent_auth(p).await?;
        let user_id = p.user_id();
        self.mfa_limit(ctx, user_id).await?;
        let db = &self.inner.db;
        let now = now_micros();
        let mut tx = crate::sessions::begin_as_caller(db, p, None).await?;
        let row = sqlx::query(&format!(
            "SELECT secret_sealed, enabled_at FROM mfa_totp WHERE user_id = $1{}",
            db.for_update()
        ))
        .bind(user_id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row.filter(|r| {
            r.try_get::<Option<i64>, _>("enabled_at")
                .is_ok_and(|e| e.is_none())
        }) else {
            return Err(AuthError::Invalid(
                "totp_not_pending",
                "There is no pending TOTP enrolment; start one with POST /v1/mfa/totp.".into(),
            ));
        };
        let sealed: String = row.try_get("secret_sealed")?;
        let secret = self
            .inner
            .env
            .open(&sealed, &totp_aad(user_id))
            .map_err(|e| AuthError::Internal(e.to_string()))?;
        let Some(step) = totp::verify(&secret, code, now / 1_000_000, None, Default::default())
        else {
            drop(tx);
            self.audit_only(
                ctx,
                NewAudit::failure("mfa.totp_confirm_failed")
                    .actor(user_id)
                    .resource(user_id),
            )
            .await?;
            return Err(code_rejected());
        };
        sqlx::query("UPDATE mfa_totp SET enabled_at = $1, last_step = $2 WHERE user_id = $3")
            .bind(now)
            .bind(step)
            .bind(user_id)
            .execute(&mut *tx)
            .await?;
        let codes = self.new_recovery_codes(&mut tx, user_id, now).await?;
        append(
            db,
            &mut tx,
            &ctx.origin(),
            NewAudit::success("mfa.totp_enabled")
                .actor(user_id)
                .resource(user_id)
                .metadata(serde_json::json!({ "recovery_codes": codes.len() })),
        )
        .await?;
        tx.commit().await?;
        self.notify_security_change(
            user_id,
            "A second factor was added to your account",
            "An authenticator app was added to your VaultPay account as a second factor.",
        )
        .await;
        Ok(mw::TotpConfirmed {
            status: "enabled".into(),
            recovery_codes: codes,
        })
    }

    async fn new_recovery_codes(
        &self,
        tx: &mut Tx,
        user_id: &str,
        now: i64,
    ) -> Result<Vec<String>, AuthError> {
        sqlx::query("DELETE FROM mfa_recovery_codes WHERE user_id = $1")
            .bind(user_id)
            .execute(&mut **tx)
            .await?;
        let mut codes = Vec::new();
        for _ in 0..self.inner.cfg.mfa.recovery_codes {
            let c = new_recovery_code();
            sqlx::query(
                "INSERT INTO mfa_recovery_codes (code_hash, user_id, created_at) VALUES ($1, $2, $3)",
            )
            .bind(sha256_hex(normalise_recovery(&c).as_bytes()))
            .bind(user_id)
            .bind(now)
            .execute(&mut **tx)
            .await?;
            codes.push(c);
        }
        Ok(codes)
    }

    /// `POST /v1/mfa/totp/disable`: needs the password and a current code (or a
    /// recovery code, for a lost authenticator).
    pub async fn totp_disable(
        &self,
        ctx: &Ctx,
        p: &Principal,
        req: mw::TotpDisableRequest,
    ) -> Result<wire::Accepted, AuthError> {
        self.require_live_session(p).await?;
        // Second-factor changes are the user's own session's, removing one above all
        // (a client holding the password and a code would strip the account's TOTP).
        crate::oauth::require_first_party(p)?;
        let user_id = p.user_id();
        self.refuse_locked(user_id).await?;
        self.mfa_limit(ctx, user_id).await?;
        let email = self.user_email(user_id).await?;
        let phc: String = sqlx::query("SELECT password_hash FROM users WHERE id = $1")
            .bind(user_id)
            .fetch_one(self.inner.db.read())
            .await?
            .try_get("password_hash")?;
        if req.password.len() > 1024
            || !self
                .verify_password(req.password, Some(phc.clone()))
                .await?
        {
            self.audit_only(
                ctx,
                NewAudit::failure("mfa.totp_disable_failed")
                    .actor(user_id)
                    .resource(user_id)
                    .metadata(serde_json::json!({ "reason": "password" })),
            )
            .await?;
            self.login_failed(ctx, &email, true).await?;
            return Err(crate::error::current_password_wrong());
        }
        let db = &self.inner.db;
        let mut tx = crate::sessions::begin_as_caller(db, p, Some(&phc)).await?;
        // A current TOTP code, or a recovery code when the authenticator is lost.
        let method = if req.code.trim().len() == 6 {
            METHOD_TOTP
        } else {
            METHOD_RECOVERY
        };
        match self
            .consume_factor(&mut tx, user_id, Some(method), &req.code, "")
            .await?
        {
            Check::Ok(_) => {}
            Check::Wrong(_) => {
                drop(tx);
                self.factor_failed(ctx, user_id, &email, "mfa.totp_disable_failed")
                    .await?;
                return Err(code_rejected());
            }
        }
        sqlx::query("DELETE FROM mfa_totp WHERE user_id = $1")
            .bind(user_id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM mfa_recovery_codes WHERE user_id = $1")
            .bind(user_id)
            .execute(&mut *tx)
            .await?;
        append(
            db,
            &mut tx,
            &ctx.origin(),
            NewAudit::success("mfa.totp_disabled")
                .actor(user_id)
                .resource(user_id),
        )
        .await?;
        tx.commit().await?;
        self.notify_security_change(
            user_id,
            "A second factor was removed from your account",
            "The authenticator app was removed from your VaultPay account's second factors.",
        )
        .await;
        Ok(wire::Accepted {
            status: "disabled".into(),
        })
    }

    /// `GET /v1/mfa`.
    pub async fn mfa_status(&self, p: &Principal) -> Result<mw::MfaStatus, AuthError> {
        self.require_live_session(p).await?;
        let f = self.factors(p.user_id()).await?;
        Ok(mw::MfaStatus {
            totp_enabled: f.totp,
            email_enabled: f.email,
            recovery_codes_remaining: if f.totp { f.recovery_left } else { 0 },
        })
    }

    // ---- emailed codes ----

    /// Mails a fresh code for `purpose` (older unused ones of that purpose die).
    async fn send_email_code(
        &self,
        ctx: &Ctx,
        user_id: &str,
        purpose: &str,
    ) -> Result<(), AuthError> {
        let cfg = &self.inner.cfg.mfa;
        vaultpay_web::enforce(
            &*self.inner.limiter,
            &format!("mfa:email:{user_id}"),
            cfg.email_send,
        )
        .await?;
        let email = self.user_email(user_id).await?;
        let code = zeroize::Zeroizing::new(six_digits());
        let id = uuid::Uuid::now_v7().to_string();
        let now = now_micros();
        let db = &self.inner.db;
        let mut tx = db.begin().await?;
        sqlx::query(
            "UPDATE mfa_email_codes SET used_at = $1 WHERE user_id = $2 AND purpose = $3 AND used_at IS NULL",
        )
        .bind(now)
        .bind(user_id)
        .bind(purpose)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO mfa_email_codes (id, user_id, purpose, code_hash, attempts, created_at, expires_at) \
             VALUES ($1, $2, $3, $4, 0, $5, $6)",
        )
        .bind(&id)
        .bind(user_id)
        .bind(purpose)
        .bind(email_code_hash(&id, &code))
        .bind(now)
        .bind(now + secs(cfg.email_code_ttl_secs))
        .execute(&mut *tx)
        .await?;
        let kind = purpose.split(':').next().unwrap_or("");
        append(
            db,
            &mut tx,
            &ctx.origin(),
            NewAudit::success("mfa.email_code_sent")
                .actor(user_id)
                .resource(user_id)
                .metadata(serde_json::json!({ "purpose": kind })),
        )
        .await?;
        tx.commit().await?;
        let minutes = (cfg.email_code_ttl_secs + 59) / 60;
        let (subject, what) = email_code_words(kind);
        self.send_mail(
            &email,
            subject,
            format!(
                "Your VaultPay code is {}.\n\nIt expires in {minutes} minutes and works once. \
                 If you did not {what}, change your password.\n",
                &*code
            ),
        )
        .await;
        Ok(())
    }

    /// `POST /v1/mfa/email/enable`: mails a code that `/v1/mfa/email/confirm` takes.
    pub async fn email_mfa_start(
        &self,
        ctx: &Ctx,
        p: &Principal,
    ) -> Result<wire::Accepted, AuthError> {
        self.require_live_session(p).await?;
        self.require_recent_auth(p).await?;
        self.send_email_code(ctx, p.user_id(), "enrol").await?;
        Ok(wire::Accepted {
            status: "code_sent".into(),
        })
    }

    /// `POST /v1/mfa/email/confirm`: turns emailed codes on as a login factor.
    pub async fn email_mfa_confirm(
        &self,
        ctx: &Ctx,
        p: &Principal,
        code: &str,
    ) -> Result<mw::MfaStatus, AuthError> {
        self.require_live_session(p).await?;
        self.require_recent_auth(p).await?;
        let user_id = p.user_id();
        self.mfa_limit(ctx, user_id).await?;
        let db = &self.inner.db;
        let mut tx = crate::sessions::begin_as_caller(db, p, None).await?;
        match self
            .check_email_code(&mut tx, user_id, "enrol", code)
            .await?
        {
            Check::Ok(_) => {}
            Check::Wrong(_) => {
                tx.commit().await?;
                self.audit_only(
                    ctx,
                    NewAudit::failure("mfa.email_confirm_failed")
                        .actor(user_id)
                        .resource(user_id),
                )
                .await?;
                return Err(code_rejected());
            }
        }
        let added = sqlx::query(
            "INSERT INTO mfa_email (user_id, enabled_at) VALUES ($1, $2) ON CONFLICT (user_id) DO NOTHING",
        )
        .bind(user_id)
        .bind(now_micros())
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        append(
            db,
            &mut tx,
            &ctx.origin(),
            NewAudit::success("mfa.email_enabled")
                .actor(user_id)
                .resource(user_id),
        )
        .await?;
        tx.commit().await?;
        if added {
            self.notify_security_change(
                user_id,
                "A second factor was added to your account",
                "Codes mailed to this address were turned on as a second factor for your VaultPay account.",
            )
            .await;
        }
        self.mfa_status(p).await
    }

    /// `POST /v1/mfa/email/disable`: needs the password and a token that has
    /// stepped up within `max_age` (a second factor, whichever).
    pub async fn email_mfa_disable(
        &self,
        ctx: &Ctx,
        p: &Principal,
        password: String,
    ) -> Result<mw::MfaStatus, AuthError> {
        self.require_live_session(p).await?;
        crate::oauth::require_first_party(p)?;
        let user_id = p.user_id();
        self.refuse_locked(user_id).await?;
        if !self.factors(user_id).await?.email {
            return Err(AuthError::Invalid(
                "mfa_method_unavailable",
                "Emailed codes are not enabled for this account.".into(),
            ));
        }
        vaultpay_web::require_step_up(
            p,
            self.inner.cfg.step_up.max_age_secs,
            now_micros() / 1_000_000,
        )?;
        self.mfa_limit(ctx, user_id).await?;
        let email = self.user_email(user_id).await?;
        let phc: String = sqlx::query("SELECT password_hash FROM users WHERE id = $1")
            .bind(user_id)
            .fetch_one(self.inner.db.read())
            .await?
            .try_get("password_hash")?;
        if password.len() > 1024 || !self.verify_password(password, Some(phc.clone())).await? {
            self.audit_only(
                ctx,
                NewAudit::failure("mfa.email_disable_failed")
                    .actor(user_id)
                    .resource(user_id),
            )
            .await?;
            self.login_failed(ctx, &email, true).await?;
            return Err(crate::error::current_password_wrong());
        }
        let db = &self.inner.db;
        let mut tx = crate::sessions::begin_as_caller(db, p, Some(&phc)).await?;
        sqlx::query("DELETE FROM mfa_email WHERE user_id = $1")
            .bind(user_id)
            .execute(&mut *tx)
            .await?;
        append(
            db,
            &mut tx,
            &ctx.origin(),
            NewAudit::success("mfa.email_disabled")
                .actor(user_id)
                .resource(user_id),
        )
        .await?;
        tx.commit().await?;
        self.notify_security_change(
            user_id,
            "A second factor was removed from your account",
            "Codes mailed to this address were turned off as a second factor for your VaultPay account.",
        )
        .await;
        self.mfa_status(p).await
    }

    async fn check_email_code(
        &self,
        tx: &mut Tx,
        user_id: &str,
        purpose: &str,
        code: &str,
    ) -> Result<Check, AuthError> {
        let db = &self.inner.db;
        let now = now_micros();
        let row = sqlx::query(&format!(
            "SELECT id, code_hash, attempts, expires_at FROM mfa_email_codes \
             WHERE user_id = $1 AND purpose = $2 AND used_at IS NULL ORDER BY created_at DESC LIMIT 1{}",
            db.for_update()
        ))
        .bind(user_id)
        .bind(purpose)
        .fetch_optional(&mut **tx)
        .await?;
        let Some(row) = row else {
            return Ok(Check::Wrong(METHOD_EMAIL));
        };
        let id: String = row.try_get("id")?;
        let attempts: i64 = row.try_get("attempts")?;
        let expires_at: i64 = row.try_get("expires_at")?;
        let max = self.inner.cfg.mfa.email_code_max_attempts;
        if expires_at <= now || attempts >= max {
            return Ok(Check::Wrong(METHOD_EMAIL));
        }
        let stored: String = row.try_get("code_hash")?;
        let code = code.trim();
        let shaped = code.len() == 6 && code.bytes().all(|b| b.is_ascii_digit());
        if shaped && ct_eq(email_code_hash(&id, code).as_bytes(), stored.as_bytes()) {
            let n = sqlx::query(
                "UPDATE mfa_email_codes SET used_at = $1 WHERE id = $2 AND used_at IS NULL",
            )
            .bind(now)
            .bind(&id)
            .execute(&mut **tx)
            .await?
            .rows_affected();
            return Ok(if n == 1 {
                Check::Ok(METHOD_EMAIL)
            } else {
                Check::Wrong(METHOD_EMAIL)
            });
        }
        // A wrong guess; the code dies with the last allowed one.
        sqlx::query(
            "UPDATE mfa_email_codes SET attempts = attempts + 1, \
             used_at = CASE WHEN attempts + 1 >= $1 THEN $2 ELSE used_at END WHERE id = $3",
        )
        .bind(max)
        .bind(now)
        .bind(&id)
        .execute(&mut **tx)
        .await?;
        Ok(Check::Wrong(METHOD_EMAIL))
    }

    /// Checks and consumes a second factor of `user_id` inside `tx`. `method = None`
    /// picks by the code's shape: six digits are TOTP (or the emailed code when TOTP
    /// is off), anything else a recovery code. Six digits from a user with both TOTP
    /// and emailed codes are ambiguous: refused (422 `mfa_method_required`) before
    /// anything is counted, rather than checked as TOTP and counted as a failure when
    /// they were the mailed code.
    async fn consume_factor(
        &self,
        tx: &mut Tx,
        user_id: &str,
        method: Option<&str>,
        code: &str,
        email_purpose: &str,
    ) -> Result<Check, AuthError> {
        if code.len() > 64 {
            return Ok(Check::Wrong("unknown"));
        }
        let f = self.factors(user_id).await?;
        let six = is_six_digits(code);
        let method = match method {
            Some(m) => m,
            None if six && f.totp && f.email => {
                return Err(AuthError::Invalid(
                    "mfa_method_required",
                    "This account has both an authenticator app and emailed codes: say which one this code is from with \"method\": \"totp\" or \"email\"."
                        .into(),
                ))
            }
            None if six && f.totp => METHOD_TOTP,
            None if six => METHOD_EMAIL,
            None => METHOD_RECOVERY,
        };
        let db = &self.inner.db;
        let now = now_micros();
        match method {
            METHOD_TOTP if f.totp => {
                let row = sqlx::query(&format!(
                    "SELECT secret_sealed, last_step FROM mfa_totp WHERE user_id = $1 AND enabled_at IS NOT NULL{}",
                    db.for_update()
                ))
                .bind(user_id)
                .fetch_optional(&mut **tx)
                .await?;
                let Some(row) = row else {
                    return Ok(Check::Wrong(METHOD_TOTP));
                };
                let sealed: String = row.try_get("secret_sealed")?;
                let last: Option<i64> = row.try_get("last_step")?;
                let secret = self
                    .inner
                    .env
                    .open(&sealed, &totp_aad(user_id))
                    .map_err(|e| AuthError::Internal(e.to_string()))?;
                let Some(step) =
                    totp::verify(&secret, code, now / 1_000_000, last, Default::default())
                else {
                    return Ok(Check::Wrong(METHOD_TOTP));
                };
                let n = sqlx::query(
                    "UPDATE mfa_totp SET last_step = $1 WHERE user_id = $2 AND (last_step IS NULL OR last_step < $1)",
                )
                .bind(step)
                .bind(user_id)
                .execute(&mut **tx)
                .await?
                .rows_affected();
                Ok(if n == 1 {
                    Check::Ok(METHOD_TOTP)
                } else {
                    Check::Wrong(METHOD_TOTP)
                })
            }
            METHOD_EMAIL if f.email && !email_purpose.is_empty() => {
                self.check_email_code(tx, user_id, email_purpose, code)
                    .await
            }
            METHOD_RECOVERY if f.totp => {
                let hash = sha256_hex(normalise_recovery(code).as_bytes());
                let n = sqlx::query(
                    "UPDATE mfa_recovery_codes SET used_at = $1 WHERE code_hash = $2 AND user_id = $3 AND used_at IS NULL",
                )
                .bind(now)
                .bind(&hash)
                .bind(user_id)
                .execute(&mut **tx)
                .await?
                .rows_affected();
                Ok(if n == 1 {
                    Check::Ok(METHOD_RECOVERY)
                } else {
                    Check::Wrong(METHOD_RECOVERY)
                })
            }
            METHOD_TOTP | METHOD_EMAIL | METHOD_RECOVERY => Err(AuthError::Invalid(
                "mfa_method_unavailable",
                format!("The method `{method}` is not available for this account."),
            )),
            _ => Err(AuthError::Invalid(
                "mfa_method_unknown",
                "method must be one of totp, email, recovery_code.".into(),
            )),
        }
    }

    /// A wrong second factor: audited and counted toward the login lockout.
    async fn factor_failed(
        &self,
        ctx: &Ctx,
        user_id: &str,
        email: &str,
        action: &str,
    ) -> Result<(), AuthError> {
        metrics::counter!("auth_mfa_failures_total").increment(1);
        self.audit_only(
            ctx,
            NewAudit::failure(action).actor(user_id).resource(user_id),
        )
        .await?;
        self.login_failed(ctx, email, true).await
    }

    /// Second-factor attempts share the login limits (per IP and per account).
    async fn mfa_limit(&self, ctx: &Ctx, user_id: &str) -> Result<(), AuthError> {
        let rl = &self.inner.cfg.rate_limits;
        vaultpay_web::enforce(
            &*self.inner.limiter,
            &format!("login:ip:{}", ctx.ip_key()),
            rl.login_per_ip,
        )
        .await?;
        vaultpay_web::enforce(
            &*self.inner.limiter,
            &format!("mfa:acct:{user_id}"),
            rl.login_per_account,
        )
        .await?;
        Ok(())
    }

    // ---- browser sign-in (OAuth authorize and device pages) ----

    /// Whether the browser sign-in of `user_id` needs a second factor; mails a code
    /// (if `mail`) when emailed codes are the user's only factor.
    pub(crate) async fn browser_second_factor_start(
        &self,
        ctx: &Ctx,
        user_id: &str,
        mail: bool,
    ) -> Result<bool, AuthError> {
        let f = self.factors(user_id).await?;
        if mail && f.any() && !f.totp {
            self.send_email_code(ctx, user_id, &format!("browser:{user_id}"))
                .await?;
        }
        Ok(f.any())
    }

    /// Checks and consumes a second factor of `user_id` for the browser sign-in. A
    /// wrong code is audited and counts toward the lockout like a wrong password.
    pub(crate) async fn browser_second_factor(
        &self,
        ctx: &Ctx,
        user_id: &str,
        code: &str,
    ) -> Result<bool, AuthError> {
        self.mfa_limit(ctx, user_id).await?;
        self.refuse_locked(user_id).await?;
        // The browser page mails no code to an account with TOTP (see
        // `browser_needs_second_factor`), so six digits there are its TOTP code.
        let method =
            (self.factors(user_id).await?.totp && is_six_digits(code)).then_some(METHOD_TOTP);
        let mut tx = self.inner.db.begin().await?;
        let check = self
            .consume_factor(
                &mut tx,
                user_id,
                method,
                code,
                &format!("browser:{user_id}"),
            )
            .await?;
        // Which factor passed (a recovery code spent among them), and the failure
        // count's reset, in the transaction that spends it: the user's row first, then
        // the audit chain's lock, the order every sign-in takes them in (the other
        // order deadlocks against a concurrent password sign-in on PostgreSQL).
        if let Check::Ok(method) = check {
            sqlx::query(crate::oauth::signin::RESET_FAILURES_SQL)
                .bind(user_id)
                .execute(&mut *tx)
                .await?;
            append(
                &self.inner.db,
                &mut tx,
                &ctx.origin(),
                NewAudit::success("oauth.mfa_passed")
                    .actor(user_id)
                    .resource(user_id)
                    .metadata(serde_json::json!({ "mfa_method": method })),
            )
            .await?;
        }
        tx.commit().await?;
        match check {
            Check::Ok(_) => {
                let email = self.user_email(user_id).await?;
                self.reset_login_limit(&email).await;
                Ok(true)
            }
            Check::Wrong(_) => {
                let email = self.user_email(user_id).await?;
                self.factor_failed(ctx, user_id, &email, "oauth.mfa_failed")
                    .await?;
                Ok(false)
            }
        }
    }

    /// `POST /v1/admin/users/{id}/mfa/reset`: removes every second factor of
    /// `user_id` (for a person who lost them, or whose account someone else enrolled
    /// one on), in one transaction with the end of their sessions and of everything a
    /// revocation ends (login tickets waiting for a factor among them), audited with
    /// `reason`; the user is told by mail. Not for the caller's own account (the
    /// self-service routes need the password and a factor).
    pub async fn admin_reset_mfa(
        &self,
        ctx: &Ctx,
        actor: &Principal,
        user_id: &str,
        req: &mw::MfaResetRequest,
    ) -> Result<wire::Accepted, AuthError> {
        let reason = req.reason.trim();
        if reason.is_empty() || reason.chars().count() > 500 || reason.chars().any(char::is_control)
        {
            return Err(AuthError::Invalid(
                "reason_invalid",
                "reason must be 1 to 500 characters, without control characters".into(),
            ));
        }
        if user_id == actor.user_id() {
            return Err(AuthError::Invalid(
                "mfa_reset_self",
                "An administrator resets other users' second factors; turn your own off with \
                 POST /v1/mfa/totp/disable or /v1/mfa/email/disable."
                    .into(),
            ));
        }
        self.require_step_up(actor, StepUpOp::MfaReset).await?;
        let db = &self.inner.db;
        let mut tx = db.begin().await?;
        let row = sqlx::query(&format!(
            "SELECT {FACTOR_COLUMNS} FROM users WHERE id = $1{}",
            db.for_no_key_update()
        ))
        .bind(user_id)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(AuthError::NotFound("user"))?;
        // Nobody strips the factors of an account that can do more than they can (a
        // help desk with `users:manage`, an administrator's): checked under the user's
        // row, which a role change takes too, so a role granted meanwhile is seen.
        let mine = crate::rbac::permissions_in(&mut tx, actor.user_id()).await?;
        let theirs = crate::rbac::permissions_in(&mut tx, user_id).await?;
        if let Some(p) = theirs.iter().find(|p| !mine.contains(*p)) {
            return Err(AuthError::Forbidden(p.clone()));
        }
        let had = Factors::from_row(&row)?;
        if !had.any() {
            return Err(AuthError::Api(ApiError::conflict(
                "mfa_not_enrolled",
                "This user has no second factor to reset.",
            )));
        }
        let had = had.methods();
        for table in ["mfa_totp", "mfa_recovery_codes", "mfa_email"] {
            sqlx::query(&format!("DELETE FROM {table} WHERE user_id = $1"))
                .bind(user_id)
                .execute(&mut *tx)
                .await?;
        }
        let now = now_micros();
        sqlx::query(
            "UPDATE mfa_email_codes SET used_at = $1 WHERE user_id = $2 AND used_at IS NULL",
        )
        .bind(now)
        .bind(user_id)
        .execute(&mut *tx)
        .await?;
        if req.require_password_reset {
            sqlx::query("UPDATE users SET security_locked_at = $1, updated_at = $1 WHERE id = $2")
                .bind(now)
                .bind(user_id)
                .execute(&mut *tx)
                .await?;
        }
        let revoked = self
            .revoke_sessions_tx(&mut tx, user_id, None, "mfa_reset")
            .await?;
        append(
            db,
            &mut tx,
            &ctx.origin(),
            NewAudit::success("mfa.reset")
                .actor(actor.user_id())
                .resource(user_id)
                .metadata(serde_json::json!({
                    "reason": reason,
                    "methods": had,
                    "sessions_revoked": revoked,
                    "password_reset_required": req.require_password_reset,
                })),
        )
        .await?;
        tx.commit().await?;
        self.sessions_changed(Some(user_id)).await;
        let next = if req.require_password_reset {
            "Reset your password (\"Forgot password\"), sign in, and enrol a second factor again."
        } else {
            "Sign in with your password and enrol a second factor again."
        };
        self.notify_security_change(
            user_id,
            "Your second factors were reset by an administrator",
            &format!(
                "An administrator removed every second factor from your VaultPay account (your \
                 authenticator app, recovery codes and emailed codes) and signed you out \
                 everywhere. {next}"
            ),
        )
        .await;
        Ok(wire::Accepted {
            status: "mfa_reset".into(),
        })
    }

    // ---- login ----

    /// Opens a second-factor ticket for a user with factors `f` whose password matched
    /// `matched`; returns the 202 `mfa_required` answer (as the error the sign-in ends
    /// with). Its own transaction (the sign-in's rolled back, so that a right password
    /// does not reset the failure count the second factor's guesses add to) re-checks
    /// the password under the user's row lock first: a reset that committed since the
    /// sign-in's check, and spent the tickets it found, is not followed by a new one.
    pub(crate) async fn mfa_challenge(
        &self,
        ctx: &Ctx,
        user_id: &str,
        device: &wire::DeviceInfo,
        f: &Factors,
        matched: &str,
    ) -> Result<AuthError, AuthError> {
        let db = &self.inner.db;
        let mut tx = db.begin().await?;
        let proof = crate::sessions::Proof::password(matched);
        crate::sessions::recheck_authority(db, &mut tx, user_id, proof).await?;
        let challenge = self
            .mfa_challenge_in(&mut tx, ctx, user_id, device, f)
            .await?;
        tx.commit().await?;
        Ok(challenge)
    }

    /// [`Self::mfa_challenge`] in the caller's transaction, which holds the user's row
    /// and commits.
    pub(crate) async fn mfa_challenge_in(
        &self,
        tx: &mut Tx,
        ctx: &Ctx,
        user_id: &str,
        device: &wire::DeviceInfo,
        f: &Factors,
    ) -> Result<AuthError, AuthError> {
        let cfg = &self.inner.cfg.mfa;
        let ticket = opaque_token();
        let now = now_micros();
        let db = &self.inner.db;
        sqlx::query(
            "INSERT INTO mfa_tickets (ticket_hash, user_id, device_id, device_name, attempts, created_at, expires_at) \
             VALUES ($1, $2, $3, $4, 0, $5, $6)",
        )
        .bind(sha256_hex(ticket.as_bytes()))
        .bind(user_id)
        .bind(device.id.trim())
        .bind(device.name.trim())
        .bind(now)
        .bind(now + secs(cfg.ticket_ttl_secs))
        .execute(&mut **tx)
        .await?;
        let methods = f.methods();
        append(
            db,
            tx,
            &ctx.origin(),
            NewAudit::success("login.mfa_required")
                .actor(user_id)
                .resource(user_id)
                .metadata(serde_json::json!({ "device_id": device.id.trim(), "methods": methods })),
        )
        .await?;
        metrics::counter!("auth_logins_total", "outcome" => "mfa_required").increment(1);
        Ok(AuthError::MfaRequired(Box::new(mw::MfaChallenge {
            status: "mfa_required".into(),
            mfa_ticket: ticket,
            methods,
            expires_in: cfg.ticket_ttl_secs,
        })))
    }

    /// The user of a live ticket (read only; the verify transaction re-checks).
    async fn ticket_user(&self, ticket: &str) -> Result<String, AuthError> {
        if ticket.is_empty() || ticket.len() > 128 {
            return Err(ticket_invalid());
        }
        let r = sqlx::query(
            "SELECT user_id FROM mfa_tickets WHERE ticket_hash = $1 AND used_at IS NULL AND expires_at > $2",
        )
        .bind(sha256_hex(ticket.as_bytes()))
        .bind(now_micros())
        .fetch_optional(self.inner.db.read())
        .await?;
        match r {
            Some(r) => Ok(r.try_get("user_id")?),
            None => Err(ticket_invalid()),
        }
    }

    /// `POST /v1/auth/mfa/email`: mails the login code for a ticket.
    pub async fn mfa_login_email(
        &self,
        ctx: &Ctx,
        ticket: &str,
    ) -> Result<wire::Accepted, AuthError> {
        vaultpay_web::enforce(
            &*self.inner.limiter,
            &format!("login:ip:{}", ctx.ip_key()),
            self.inner.cfg.rate_limits.login_per_ip,
        )
        .await?;
        let user_id = self.ticket_user(ticket).await?;
        if !self.factors(&user_id).await?.email {
            return Err(AuthError::Invalid(
                "mfa_method_unavailable",
                "Emailed codes are not enabled for this account.".into(),
            ));
        }
        let purpose = format!("login:{}", sha256_hex(ticket.as_bytes()));
        self.send_email_code(ctx, &user_id, &purpose).await?;
        Ok(wire::Accepted {
            status: "code_sent".into(),
        })
    }

    /// `POST /v1/auth/mfa/verify`: ticket + code → the token response of a login.
    pub async fn mfa_verify(
        &self,
        ctx: &Ctx,
        req: mw::MfaVerifyRequest,
    ) -> Result<wire::TokenResponse, AuthError> {
        let cfg = &self.inner.cfg;
        vaultpay_web::enforce(
            &*self.inner.limiter,
            &format!("login:ip:{}", ctx.ip_key()),
            cfg.rate_limits.login_per_ip,
        )
        .await?;
        let user_id = self.ticket_user(&req.mfa_ticket).await?;
        let email = self.user_email(&user_id).await?;
        vaultpay_web::enforce(
            &*self.inner.limiter,
            &format!("login:acct:{email}"),
            cfg.rate_limits.login_per_account,
        )
        .await?;
        self.refuse_locked(&user_id).await?;
        let ticket_hash = sha256_hex(req.mfa_ticket.as_bytes());
        let db = &self.inner.db;
        let now = now_micros();
        let mut tx = db.begin().await?;
        let owner =
            crate::sessions::lock_owner(db, &mut tx, "mfa_tickets", "ticket_hash", &ticket_hash)
                .await?;
        if owner.as_deref() != Some(user_id.as_str()) {
            return Err(ticket_invalid());
        }
        let row = sqlx::query(&format!(
            "SELECT user_id, device_id, device_name, attempts FROM mfa_tickets \
             WHERE ticket_hash = $1 AND used_at IS NULL AND expires_at > $2{}",
            db.for_update()
        ))
        .bind(&ticket_hash)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Err(ticket_invalid());
        };
        let device_id: String = row.try_get("device_id")?;
        let device_name: String = row.try_get("device_name")?;
        let attempts: i64 = row.try_get("attempts")?;
        if attempts >= cfg.mfa.ticket_max_attempts {
            return Err(ticket_invalid());
        }
        if req
            .device_id
            .as_deref()
            .is_some_and(|d| d.trim() != device_id)
        {
            // A ticket presented from another device is burnt.
            sqlx::query("UPDATE mfa_tickets SET used_at = $1 WHERE ticket_hash = $2")
                .bind(now)
                .bind(&ticket_hash)
                .execute(&mut *tx)
                .await?;
            append(
                db,
                &mut tx,
                &ctx.origin(),
                NewAudit::failure("login.mfa_device_mismatch")
                    .actor(&user_id)
                    .resource(&user_id),
            )
            .await?;
            tx.commit().await?;
            return Err(ticket_invalid());
        }
        let purpose = format!("login:{ticket_hash}");
        let method = match self
            .consume_factor(
                &mut tx,
                &user_id,
                req.method.as_deref(),
                &req.code,
                &purpose,
            )
            .await?
        {
            Check::Ok(m) => m,
            Check::Wrong(m) => {
                sqlx::query(
                    "UPDATE mfa_tickets SET attempts = attempts + 1, \
                     used_at = CASE WHEN attempts + 1 >= $1 THEN $2 ELSE used_at END WHERE ticket_hash = $3",
                )
                .bind(cfg.mfa.ticket_max_attempts)
                .bind(now)
                .bind(&ticket_hash)
                .execute(&mut *tx)
                .await?;
                append(
                    db,
                    &mut tx,
                    &ctx.origin(),
                    NewAudit::failure("login.mfa_failed")
                        .actor(&user_id)
                        .resource(&user_id)
                        .metadata(serde_json::json!({ "method": m })),
                )
                .await?;
                tx.commit().await?;
                metrics::counter!("auth_mfa_failures_total").increment(1);
                self.login_failed(ctx, &email, true).await?;
                return Err(code_invalid());
            }
        };
        let n = sqlx::query(
            "UPDATE mfa_tickets SET used_at = $1 WHERE ticket_hash = $2 AND used_at IS NULL",
        )
        .bind(now)
        .bind(&ticket_hash)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n != 1 {
            return Err(ticket_invalid());
        }
        // A "this wasn't me" lock set since the ticket was issued refuses the session.
        let row = sqlx::query(&crate::sessions::sign_in_check_sql(""))
            .bind(&user_id)
            .fetch_optional(&mut *tx)
            .await?;
        let locked = match &row {
            Some(r) => crate::sessions::is_security_locked(r)?,
            None => return Err(ticket_invalid()),
        };
        if locked {
            tx.rollback().await?;
            return Err(self.refuse_security_locked(ctx, &user_id).await);
        }
        let facts = SessionFacts {
            user_id: user_id.clone(),
            session_id: uuid::Uuid::now_v7().to_string(),
            device_id,
            auth_time: now,
            amr: with_mfa_amr(&["pwd".into()]),
        };
        let refresh = self
            .open_session(
                &mut tx,
                ctx,
                &facts,
                &device_name,
                now,
                serde_json::json!({ "mfa_method": method }),
            )
            .await?;
        tx.commit().await?;
        self.reset_login_limit(&email).await;
        metrics::counter!("auth_logins_total", "outcome" => "success").increment(1);
        self.token_response(facts, refresh).await
    }

    // ---- step-up ----

    /// Refuses `op` (when the policy marks it sensitive) unless the caller's token
    /// shows a recent enough authentication:
    /// - role changes: a second factor within `max_age`, from everyone; an
    ///   administrator without a second factor is told to enrol one first;
    /// - password and email changes: a second factor within `max_age` from users who
    ///   have one, a sign-in within `max_age` from users who have none (they have
    ///   nothing stronger to offer, and the current password is checked as well).
    pub async fn require_step_up(&self, p: &Principal, op: StepUpOp) -> Result<(), AuthError> {
        // Credential, role and second-factor changes are the user's own session's.
        crate::oauth::require_first_party(p)?;
        let sc = &self.inner.cfg.step_up;
        let on = match op {
            StepUpOp::PasswordChange => sc.password_change,
            StepUpOp::EmailChange => sc.email_change,
            StepUpOp::RoleChange => sc.role_changes,
            // always: it removes what protects another person's account
            StepUpOp::MfaReset => true,
        };
        if !on {
            return Ok(());
        }
        let now = now_micros() / 1_000_000;
        // a fresh second factor satisfies every operation without a database read
        let Err(challenge) = vaultpay_web::require_step_up(p, sc.max_age_secs, now) else {
            return Ok(());
        };
        match op {
            StepUpOp::RoleChange => {
                self.second_factor_challenge(p, challenge, "role_change", "Role changes need")
                    .await
            }
            StepUpOp::MfaReset => {
                let what = "Resetting another user's second factors needs";
                self.second_factor_challenge(p, challenge, "mfa_reset", what)
                    .await
            }
            StepUpOp::PasswordChange | StepUpOp::EmailChange => self.require_recent_auth(p).await,
        }
    }

    /// Refuses an operation that needs a fresh second factor with `challenge`, told
    /// (`what`, e.g. "Role changes need") how to get one when the caller has none.
    async fn second_factor_challenge(
        &self,
        p: &Principal,
        challenge: ApiError,
        label: &'static str,
        what: &str,
    ) -> Result<(), AuthError> {
        metrics::counter!("auth_step_up_required_total", "op" => label).increment(1);
        if self.factors(p.user_id()).await?.any() {
            return Err(AuthError::Api(challenge));
        }
        Err(AuthError::Api(
            challenge
                .detail(format!(
                    "{what} a second factor within the last few minutes, and this account has \
                     none: enrol one (POST /v1/mfa/totp), step up (POST /v1/auth/step-up) and \
                     retry with the new token."
                ))
                .with("mfa_enrolled", false),
        ))
    }

    /// `POST /v1/auth/step-up/email`: mails a step-up code for the current session.
    pub async fn step_up_email(
        &self,
        ctx: &Ctx,
        p: &Principal,
    ) -> Result<wire::Accepted, AuthError> {
        self.require_live_session(p).await?;
        if !self.factors(p.user_id()).await?.email {
            return Err(AuthError::Invalid(
                "mfa_method_unavailable",
                "Emailed codes are not enabled for this account.".into(),
            ));
        }
        let purpose = format!("step_up:{}", p.session_id());
        self.send_email_code(ctx, p.user_id(), &purpose).await?;
        Ok(wire::Accepted {
            status: "code_sent".into(),
        })
    }

    /// `POST /v1/auth/step-up`: a second factor for the current session; answers a
    /// fresh access token with `acr`, `amr` and `auth_time` updated. The session row
    /// keeps them, so refreshed tokens carry the step-up until `max_age` passes.
    pub async fn step_up(
        &self,
        ctx: &Ctx,
        p: &Principal,
        req: mw::StepUpRequest,
    ) -> Result<wire::TokenResponse, AuthError> {
        self.require_live_session(p).await?;
        let user_id = p.user_id();
        if p.session_id().is_empty() {
            return Err(AuthError::SessionInactive);
        }
        self.refuse_locked(user_id).await?;
        self.mfa_limit(ctx, user_id).await?;
        if !self.factors(user_id).await?.any() {
            return Err(AuthError::Invalid(
                "mfa_not_enrolled",
                "Enrol a second factor (POST /v1/mfa/totp) before stepping up.".into(),
            ));
        }
        let email = self.user_email(user_id).await?;
        let db = &self.inner.db;
        let now = now_micros();
        let purpose = format!("step_up:{}", p.session_id());
        let mut tx = db.begin().await?;
        let method = match self
            .consume_factor(&mut tx, user_id, req.method.as_deref(), &req.code, &purpose)
            .await?
        {
            Check::Ok(m) => m,
            Check::Wrong(_) => {
                tx.commit().await?;
                self.factor_failed(ctx, user_id, &email, "mfa.step_up_failed")
                    .await?;
                return Err(code_rejected());
            }
        };
        let row = sqlx::query(&format!(
            "SELECT device_id, amr FROM sessions WHERE id = $1 AND user_id = $2 AND revoked_at IS NULL{}",
            db.for_update()
        ))
        .bind(p.session_id())
        .bind(user_id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Err(AuthError::SessionInactive);
        };
        let amr: String = row.try_get("amr")?;
        let amr: Vec<String> = amr
            .split(' ')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        let facts = SessionFacts {
            user_id: user_id.to_owned(),
            session_id: p.session_id().to_owned(),
            device_id: row.try_get("device_id")?,
            auth_time: now,
            amr: with_mfa_amr(&amr),
        };
        sqlx::query("UPDATE sessions SET auth_time = $1, amr = $2 WHERE id = $3")
            .bind(now)
            .bind(facts.amr.join(" "))
            .bind(&facts.session_id)
            .execute(&mut *tx)
            .await?;
        append(
            db,
            &mut tx,
            &ctx.origin(),
            NewAudit::success("mfa.step_up")
                .actor(user_id)
                .resource(&facts.session_id)
                .metadata(serde_json::json!({ "method": method, "amr": facts.amr })),
        )
        .await?;
        tx.commit().await?;
        let roles = self.effective(user_id).await?.roles.clone();
        // The stepped-up token is for whom the presented one was: a token issued to an
        // OAuth client stays that client's, with its scope. (A first-party token for the
        // client's session would pass every first-party-only check, the approval of
        // devices among them.)
        let (access, ttl) = match &p.claims.client_id {
            Some(client_id) => {
                let ttl = self.inner.cfg.access_token_ttl_secs;
                let scope = p.claims.scope.as_deref().unwrap_or_default();
                (
                    self.oauth_access(&facts, roles, scope, client_id, ttl)?,
                    ttl,
                )
            }
            None => self.issue_access(&facts, roles)?,
        };
        Ok(wire::TokenResponse {
            access_token: access,
            token_type: "Bearer".into(),
            expires_in: ttl,
            refresh_token: None,
            scope: p.claims.scope.clone(),
            session_id: Some(facts.session_id),
        })
    }
}

#[cfg(test)]
mod tests {
    /// Each emailed code says what it is for: enrolling, a step-up, or signing in
    /// (first-party and browser sign-ins alike).
    #[test]
    fn emailed_codes_say_what_they_are_for() {
        assert!(super::email_code_words("enrol")
            .1
            .contains("turn on emailed"));
        assert!(super::email_code_words("step_up")
            .1
            .contains("sensitive action"));
        for sign_in in ["login", "browser"] {
            assert_eq!(
                super::email_code_words(sign_in),
                ("Your VaultPay sign-in code", "try to sign in")
            );
        }
    }

    use super::*;

    #[test]
    fn recovery_codes_are_80_bits_and_normalise() {
        let c = new_recovery_code();
        assert_eq!(c.len(), 19);
        assert_eq!(normalise_recovery(&c).len(), 16);
        assert_eq!(
            normalise_recovery(&c.to_lowercase().replace('-', " ")),
            normalise_recovery(&c)
        );
        assert_ne!(new_recovery_code(), c);
    }

    #[test]
    fn mfa_amr_is_added_once() {
        assert_eq!(with_mfa_amr(&["pwd".into()]), ["pwd", "otp", "mfa"]);
        assert_eq!(
            with_mfa_amr(&["pwd".into(), "otp".into(), "mfa".into()]),
            ["pwd", "otp", "mfa"]
        );
    }

    #[test]
    fn six_digit_codes() {
        for _ in 0..100 {
            let c = six_digits();
            assert_eq!(c.len(), 6);
            assert!(c.bytes().all(|b| b.is_ascii_digit()));
        }
    }
}
