//! Custom roles (admin API) and cluster-wide invalidation of cached permissions.
//!
//! The four built-in tiers (`builtin = 1`) can be neither changed nor deleted. A
//! custom role is a name plus permissions from the known set; the creator may only
//! hand out permissions they hold themselves. Every change is audited and drops
//! cached permissions on this node and, through an [`InvalidationBus`] (Redis
//! pub/sub), on every other node.

use crate::{AuthError, AuthService};
use futures::future::BoxFuture;
use parking_lot::RwLock;
use sqlx::Row;
use std::collections::BTreeSet;
use std::sync::Arc;
use vaultpay_proto::auth as wire;
use vaultpay_proto::iptrust as iwire;
use vaultpay_store::audit::{append, NewAudit};
use vaultpay_web::{Ctx, Principal};

/// Carries "drop cached permissions" to every node (`None` = every user).
pub trait InvalidationBus: Send + Sync + 'static {
    fn publish<'a>(&'a self, user: Option<&'a str>) -> BoxFuture<'a, Result<(), String>>;
}

/// The installed bus, if any, whether this node is deaf to it, and the background
/// retries of invalidations it failed to publish.
#[derive(Default)]
pub(crate) struct Bus(
    RwLock<Option<Arc<dyn InvalidationBus>>>,
    std::sync::atomic::AtomicBool,
    crate::retry::Retrier,
);

impl Bus {
    /// A bus is installed but this node is not subscribed to it (not yet, or its
    /// subscription was lost): invalidations from other nodes may be missed, so the
    /// permission and `/v1/me` caches are not used meanwhile. One atomic load: it is
    /// read on every permission and `/v1/me` lookup.
    pub(crate) fn deaf(&self) -> bool {
        self.1.load(std::sync::atomic::Ordering::Acquire)
    }
}

const MAX_ROLE_NAME: usize = 48;
const MAX_DESCRIPTION: usize = 200;

fn check_name(name: &str) -> Result<(), AuthError> {
    let ok = (2..=MAX_ROLE_NAME).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
    if ok {
        Ok(())
    } else {
        Err(AuthError::Invalid(
            "role_name_invalid",
            format!("A role name is 2–{MAX_ROLE_NAME} characters: a–z first, then a–z, 0–9, `_` or `-`."),
        ))
    }
}

/// Permissions the ledger enforces by built-in role name (see the ledger's
/// `Actor::can_own`, `can_read_any`, `is_admin`, `can_audit`): a custom role cannot
/// carry them.
const LEDGER_PERMISSIONS: &[&str] = &[
    "accounts:own",
    "transfers:create",
    "accounts:read",
    "accounts:manage",
    "transfers:read",
    "kyc:read",
    "treasury:move",
];

impl AuthService {
    /// Installs the bus that carries permission invalidations to other nodes.
    pub fn set_invalidation_bus(&self, bus: Arc<dyn InvalidationBus>) {
        *self.inner.bus.0.write() = Some(bus);
        // Deaf until the subscriber says it hears (`set_invalidations_heard`).
        self.inner
            .bus
            .1
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Whether this node hears the other nodes' invalidations (true without a bus).
    pub fn invalidations_heard(&self) -> bool {
        !self.inner.bus.deaf()
    }

    /// Whether this node's subscription to the bus is live (the subscriber says so on
    /// each (re)subscription and loss). While it is not, caches are bypassed.
    pub fn set_invalidations_heard(&self, heard: bool) {
        let installed = self.inner.bus.0.read().is_some();
        self.inner
            .bus
            .1
            .store(installed && !heard, std::sync::atomic::Ordering::Release);
        if !heard {
            self.drop_cached_permissions(None);
        }
    }

    /// Drops cached permissions, and the sessions and profile `/v1/me` caches, on
    /// this node only (what a bus subscriber calls).
    pub fn drop_cached_permissions(&self, user: Option<&str>) {
        self.inner.me.drop_user(user);
        match user {
            Some(u) => self.inner.perms.invalidate(u),
            None => self.inner.perms.invalidate_all(),
        }
    }

    /// Drops cached permissions (and `/v1/me` entries) here and tells the other nodes
    /// to do the same. The telling runs in a task of its own, which the caller waits for
    /// up to its first attempt: a request whose future is dropped after its commit (the
    /// client went away) still has the other nodes told, and a failed publish is
    /// retried in the background for as long as the other nodes' entries could live.
    pub(crate) async fn invalidate_everywhere(&self, user: Option<&str>) {
        self.drop_cached_permissions(user);
        let bus = self.inner.bus.0.read().clone();
        let Some(bus) = bus else {
            return;
        };
        let user = user.map(str::to_owned);
        let ttl = self.inner.cfg.permission_cache_ttl_secs.max(1);
        let retrier = self.inner.bus.2.clone();
        let (first, first_done) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let published = bus.publish(user.as_deref()).await;
            let _ = first.send(());
            if let Err(e) = published {
                tracing::warn!(error = %e, "could not publish a permission invalidation; retrying");
                // one task per user (`*` for everyone) however many changes fail
                let key = user.clone().unwrap_or_else(|| "*".to_owned());
                retrier.retry(
                    key,
                    std::time::Duration::from_secs(ttl),
                    "publishing a permission invalidation",
                    move || {
                        let (bus, user) = (bus.clone(), user.clone());
                        async move { bus.publish(user.as_deref()).await }
                    },
                );
            }
        });
        let _ = first_done.await;
    }

    /// Refuses, with the first permission missing, an actor who does not hold every
    /// permission of `role`: granting it, revoking it or deleting it is a change only
    /// someone holding all of it may make (a delegate with `roles:manage` alone must
    /// not strip `admin` from the administrators, nor delete a role it could not
    /// grant). Read in `tx`, so a role deleted and re-created meanwhile is seen.
    pub(crate) async fn ensure_holds_role(
        tx: &mut vaultpay_store::Tx,
        actor: &Principal,
        role: &str,
    ) -> Result<(), AuthError> {
        let rows = sqlx::query("SELECT permission FROM role_permissions WHERE role = $1")
            .bind(role)
            .fetch_all(&mut **tx)
            .await?;
        let mine = crate::rbac::permissions_in(tx, actor.user_id()).await?;
        for r in rows {
            let p: String = r.try_get("permission")?;
            if !mine.contains(&p) {
                return Err(AuthError::Forbidden(p));
            }
        }
        Ok(())
    }

    /// `POST /v1/admin/roles`.
    pub async fn create_role(
        &self,
        ctx: &Ctx,
        actor: &Principal,
        req: iwire::CreateRoleRequest,
    ) -> Result<wire::Role, AuthError> {
        self.require_step_up(actor, crate::mfa::StepUpOp::RoleChange)
            .await?;
        let name = req.name.trim().to_owned();
        check_name(&name)?;
        let description = req.description.trim().to_owned();
        if description.chars().count() > MAX_DESCRIPTION
            || description.chars().any(char::is_control)
        {
            return Err(AuthError::Invalid(
                "description_invalid",
                format!("The description is at most {MAX_DESCRIPTION} printable characters."),
            ));
        }
        let permissions: BTreeSet<String> = req
            .permissions
            .iter()
            .map(|p| p.trim().to_owned())
            .collect();
        if permissions.is_empty() || permissions.len() > 64 {
            return Err(AuthError::Invalid(
                "permissions_invalid",
                "A role needs 1 to 64 permissions.".into(),
            ));
        }
        let db = &self.inner.db;
        let known: BTreeSet<String> = sqlx::query("SELECT name FROM permissions")
            .fetch_all(db.read())
            .await?
            .iter()
            .map(|r| r.try_get::<String, _>("name"))
            .collect::<Result<_, _>>()?;
        if let Some(bad) = permissions.iter().find(|p| !known.contains(*p)) {
            return Err(AuthError::Invalid(
                "permission_unknown",
                format!(
                    "There is no permission `{}`.",
                    bad.chars().take(64).collect::<String>()
                ),
            ));
        }
        // The ledger authorises by the built-in roles a token carries, not by
        // permissions: a custom role with a ledger permission would show it in
        // `/v1/me` and grant nothing there. Refused rather than silently inert.
        if let Some(p) = permissions
            .iter()
            .find(|p| LEDGER_PERMISSIONS.contains(&p.as_str()))
        {
            return Err(AuthError::Invalid(
                "permission_not_delegable",
                format!(
                    "`{p}` is enforced by the ledger through the built-in roles (customer, \
                     support, compliance, admin); grant one of those instead."
                ),
            ));
        }
        // No escalation through roles: only permissions the creator holds.
        let mine = self.effective(actor.user_id()).await?;
        if let Some(p) = permissions.iter().find(|p| !mine.permissions.contains(*p)) {
            return Err(AuthError::Forbidden(p.clone()));
        }
        let mut tx = db.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO roles (name, description, builtin) VALUES ($1, $2, 0) ON CONFLICT (name) DO NOTHING",
        )
        .bind(&name)
        .bind(&description)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if inserted == 0 {
            return Err(AuthError::Conflict(
                "role_exists",
                format!("A role named `{name}` already exists."),
            ));
        }
        for p in &permissions {
            sqlx::query("INSERT INTO role_permissions (role, permission) VALUES ($1, $2)")
                .bind(&name)
                .bind(p)
                .execute(&mut *tx)
                .await?;
        }
        append(
            db,
            &mut tx,
            &ctx.origin(),
            NewAudit::success("role.created")
                .actor(actor.user_id())
                .resource(&name)
                .metadata(
                    serde_json::json!({ "permissions": permissions, "description": description }),
                ),
        )
        .await?;
        tx.commit().await?;
        self.invalidate_everywhere(None).await;
        Ok(wire::Role {
            name,
            description,
            builtin: false,
            permissions: permissions.into_iter().collect(),
        })
    }

    /// `DELETE /v1/admin/roles/{name}`: custom roles only; holders lose it at once.
    pub async fn delete_role(
        &self,
        ctx: &Ctx,
        actor: &Principal,
        name: &str,
    ) -> Result<(), AuthError> {
        self.require_step_up(actor, crate::mfa::StepUpOp::RoleChange)
            .await?;
        let db = &self.inner.db;
        let mut tx = db.begin().await?;
        let row = sqlx::query(&format!(
            "SELECT builtin FROM roles WHERE name = $1{}",
            db.for_update()
        ))
        .bind(name)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(AuthError::NotFound("role"))?;
        if row.try_get::<i64, _>("builtin")? != 0 {
            return Err(AuthError::Conflict(
                "role_builtin",
                format!("`{name}` is a built-in role; it cannot be changed or deleted."),
            ));
        }
        Self::ensure_holds_role(&mut tx, actor, name).await?;
        let holders = sqlx::query("DELETE FROM user_roles WHERE role = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        sqlx::query("DELETE FROM role_permissions WHERE role = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM roles WHERE name = $1 AND builtin = 0")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        append(
            db,
            &mut tx,
            &ctx.origin(),
            NewAudit::success("role.deleted")
                .actor(actor.user_id())
                .resource(name)
                .metadata(serde_json::json!({ "holders_removed": holders })),
        )
        .await?;
        tx.commit().await?;
        self.invalidate_everywhere(None).await;
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// A bus that never delivers (publishing fails).
    struct Silent;

    impl InvalidationBus for Silent {
        fn publish<'a>(&'a self, _: Option<&'a str>) -> BoxFuture<'a, Result<(), String>> {
            Box::pin(async { Err("down".to_owned()) })
        }
    }

    /// A bus whose publishes wait for a go-ahead, counting those that went out.
    struct Gated {
        go: Arc<tokio::sync::Notify>,
        sent: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl InvalidationBus for Gated {
        fn publish<'a>(&'a self, _: Option<&'a str>) -> BoxFuture<'a, Result<(), String>> {
            Box::pin(async move {
                self.go.notified().await;
                self.sent.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Ok(())
            })
        }
    }

    /// A request dropped after its commit (the client went away) while publishing its
    /// invalidation: the publish still goes out.
    #[tokio::test]
    async fn an_invalidation_is_published_even_if_the_request_is_dropped() {
        let (svc, _db, dir) = crate::service::test_service().await;
        let go = Arc::new(tokio::sync::Notify::new());
        let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        svc.set_invalidation_bus(Arc::new(Gated {
            go: go.clone(),
            sent: sent.clone(),
        }));
        {
            let request = svc.invalidate_everywhere(Some("u1"));
            tokio::pin!(request);
            assert!(futures::poll!(&mut request).is_pending());
        } // dropped mid-publish
        go.notify_one();
        tokio::time::timeout(std::time::Duration::from_secs(30), async {
            while sent.load(std::sync::atomic::Ordering::SeqCst) == 0 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the invalidation was never published");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    async fn role_count(svc: &AuthService, user: &str) -> usize {
        svc.effective(user).await.unwrap().roles.len()
    }

    /// With a bus installed, permissions are cached only while this node hears it: a
    /// role removed without an invalidation (another node's, missed) stops counting
    /// at once while deaf, and is served from the cache once heard again.
    #[tokio::test]
    async fn a_node_deaf_to_the_bus_does_not_cache_permissions() {
        let (svc, db, dir) = crate::service::test_service().await;
        let set = |sql: &'static str| {
            let db = db.clone();
            async move {
                sqlx::query(sql).execute(db.writer()).await.unwrap();
            }
        };
        set(
            "INSERT INTO users (id, email, name, password_hash, created_at, updated_at) \
             VALUES ('u1', 'u1@example.com', 'U', '!', 0, 0)",
        )
        .await;
        set("INSERT INTO user_roles (user_id, role, granted_at, granted_by) VALUES ('u1', 'support', 0, 't')").await;
        assert!(svc.invalidations_heard(), "no bus: caches in use");
        svc.set_invalidation_bus(Arc::new(Silent));
        assert!(!svc.invalidations_heard(), "not subscribed yet");
        assert_eq!(role_count(&svc, "u1").await, 1);
        set("DELETE FROM user_roles WHERE user_id = 'u1'").await;
        assert_eq!(role_count(&svc, "u1").await, 0, "deaf: read every time");
        svc.set_invalidations_heard(true);
        set("INSERT INTO user_roles (user_id, role, granted_at, granted_by) VALUES ('u1', 'support', 0, 't')").await;
        assert_eq!(role_count(&svc, "u1").await, 1);
        set("DELETE FROM user_roles WHERE user_id = 'u1'").await;
        assert_eq!(role_count(&svc, "u1").await, 1, "heard: cached");
        // losing the subscription drops what was cached
        svc.set_invalidations_heard(false);
        assert_eq!(role_count(&svc, "u1").await, 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
