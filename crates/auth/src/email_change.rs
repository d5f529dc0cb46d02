//! Changing the account's email address.
//!
//! `POST /v1/auth/email/change` {new_email, password} is a sensitive operation
//! (`[auth.step_up] email_change`): it needs the current password and a recent
//! authentication (a fresh second factor when the user has one). It changes nothing
//! yet: the new address gets a single-use, expiring confirmation link (the token is
//! stored hashed, with the new address beside it) and the current address a notice.
//! Opening the link (`GET /v1/auth/email/confirm?token=…`) shows a page whose button
//! posts the token (so a mail scanner's prefetch changes nothing); the `POST` (form or
//! JSON {token}) switches the address, marks it verified and audits the change, in
//! one transaction. A newer request voids the pending link of an older one, and so
//! does revoking the user's sessions (a password reset or change, "log out
//! everywhere", "this wasn't me"): the link may be in an intruder's mailbox.

use crate::accounts::{insert_email_token, void_email_tokens};
use crate::mfa::StepUpOp;
use crate::{AuthError, AuthService};
use sqlx::Row;
use vaultpay_core::time::now_micros;
use vaultpay_proto::auth as wire;
use vaultpay_store::audit::{append, NewAudit};
use vaultpay_web::{Ctx, Principal};

pub(crate) const PURPOSE: &str = "email_change";

impl AuthService {
    /// Starts an email change: mails a confirmation link to the new address.
    pub async fn request_email_change(
        &self,
        ctx: &Ctx,
        p: &Principal,
        req: wire::ChangeEmailRequest,
    ) -> Result<wire::Accepted, AuthError> {
        self.require_live_session(p).await?;
        self.require_step_up(p, StepUpOp::EmailChange).await?;
        let user_id = p.user_id();
        let new_email = crate::accounts::normalise_email(&req.new_email)?;
        let row = sqlx::query("SELECT email, password_hash FROM users WHERE id = $1")
            .bind(user_id)
            .fetch_optional(self.inner.db.read())
            .await?
            .ok_or(AuthError::NotFound("user"))?;
        let email: String = row.try_get("email")?;
        let phc: String = row.try_get("password_hash")?;
        self.check_current_password(
            ctx,
            user_id,
            &email,
            req.password,
            phc.clone(),
            "email.change_failed",
        )
        .await?;
        if new_email == email {
            return Err(AuthError::Invalid(
                "email_unchanged",
                "This is already the account's email address.".into(),
            ));
        }
        // mails to addresses the caller chose: limited like password-reset mails
        // (wrong passwords are limited by the lockout above instead). Counted before
        // the address is looked up, so "taken" answers cannot be asked for faster than
        // mails can be sent (no cheap probing of which addresses have accounts).
        vaultpay_web::enforce(
            &*self.inner.limiter,
            &format!("email_change:acct:{user_id}"),
            self.inner.cfg.rate_limits.reset_per_account,
        )
        .await?;
        let taken = sqlx::query("SELECT id FROM users WHERE email = $1")
            .bind(&new_email)
            .fetch_optional(self.inner.db.read())
            .await?;
        if taken.is_some() {
            return Err(AuthError::EmailTaken);
        }
        let now = now_micros();
        let ttl = self.inner.cfg.email_verify_ttl_secs;
        let db = &self.inner.db;
        let mut tx = crate::sessions::begin_as_caller(db, p, Some(&phc)).await?;
        void_email_tokens(&mut tx, user_id, PURPOSE, now).await?;
        let token = insert_email_token(&mut *tx, user_id, PURPOSE, ttl, Some(&new_email)).await?;
        append(
            db,
            &mut tx,
            &ctx.origin(),
            NewAudit::success("email.change_requested")
                .actor(user_id)
                .resource(user_id)
                .metadata(serde_json::json!({ "new_email": new_email })),
        )
        .await?;
        tx.commit().await?;
        let link = format!("{}/v1/auth/email/confirm?token={token}", self.public_url());
        let hours = (ttl / 3600).max(1);
        self.send_mail(
            &new_email,
            "Confirm your new email address",
            format!(
                "Someone asked to use this address for their VaultPay account.\n\n\
                 Confirm it by opening this link:\n\n{link}\n\n\
                 The link works once and expires in {hours} hours. If this was not you, ignore this message.\n"
            ),
        )
        .await;
        self.send_mail(
            &email,
            "Your email address is being changed",
            format!(
                "A change of your VaultPay account's email address to {new_email} was requested \
                 and will happen when the new address is confirmed.\n\n\
                 If this was not you, change your password now: that, or ending your other \
                 sessions, also cancels this change.\n"
            ),
        )
        .await;
        Ok(wire::Accepted {
            status: "confirmation_sent".into(),
        })
    }

    /// Completes an email change from the link mailed to the new address.
    pub async fn confirm_email_change(
        &self,
        ctx: &Ctx,
        token: &str,
    ) -> Result<wire::User, AuthError> {
        let db = &self.inner.db;
        let now = now_micros();
        let mut tx = db.begin().await?;
        let (user_id, new_email) = self
            .consume_email_token_payload(&mut tx, token, PURPOSE)
            .await?;
        let new_email = new_email.ok_or(AuthError::BadEmailToken)?;
        let old: String = sqlx::query("SELECT email FROM users WHERE id = $1")
            .bind(&user_id)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or(AuthError::BadEmailToken)?
            .try_get("email")?;
        let updated = sqlx::query(
            "UPDATE users SET email = $1, email_verified = 1, updated_at = $2 WHERE id = $3",
        )
        .bind(&new_email)
        .bind(now)
        .bind(&user_id)
        .execute(&mut *tx)
        .await;
        match updated {
            // another account took the address since the request: nothing changes
            Err(e) if vaultpay_store::is_unique_violation(Some(&e)) => {
                return Err(AuthError::EmailTaken)
            }
            r => {
                r?;
            }
        }
        // Links mailed to the old address act no more: a verification link must not
        // verify the new one, and a password reset or a held login's confirm link
        // (perhaps in the mailbox the owner is moving away from) must not take or open
        // the account.
        void_email_tokens(&mut tx, &user_id, "verify", now).await?;
        void_email_tokens(&mut tx, &user_id, "reset", now).await?;
        crate::sessions::expire_login_holds(&mut tx, &user_id, now).await?;
        append(
            db,
            &mut tx,
            &ctx.origin(),
            NewAudit::success("email.changed")
                .actor(&user_id)
                .resource(&user_id)
                .metadata(serde_json::json!({ "from": old, "to": new_email })),
        )
        .await?;
        tx.commit().await?;
        self.sessions_changed(Some(&user_id)).await;
        self.user(&user_id).await
    }
}
