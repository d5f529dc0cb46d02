//! Roles and permissions: effective permissions per user, cached and invalidated on
//! every role change; the admin operations that change roles or unlock accounts.

use crate::{AuthError, AuthService};
use parking_lot::Mutex;
use sqlx::Row;
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vaultpay_core::time::now_micros;
use vaultpay_proto::auth as wire;
use vaultpay_store::audit::{append, NewAudit};
use vaultpay_web::{Ctx, Principal};

/// A user's roles and the permissions they grant.
#[derive(Debug)]
pub struct Effective {
    pub roles: Vec<String>,
    pub permissions: BTreeSet<String>,
}

type Shared = Arc<Effective>;

/// Effective roles and permissions per user, for `ttl` or until invalidated. A load
/// that started before an invalidation is not stored (the generation check), so a
/// role change is never masked by a slow concurrent read.
pub(crate) struct PermCache {
    ttl: Duration,
    generation: AtomicU64,
    map: Mutex<HashMap<String, (Instant, Shared)>>,
}

impl PermCache {
    pub fn new(ttl_secs: u64) -> Self {
        Self {
            ttl: Duration::from_secs(ttl_secs),
            generation: AtomicU64::new(0),
            map: Mutex::new(HashMap::new()),
        }
    }

    fn get(&self, user: &str) -> Option<Shared> {
        let map = self.map.lock();
        map.get(user)
            .filter(|(at, _)| at.elapsed() < self.ttl)
            .map(|(_, p)| p.clone())
    }

    fn put(&self, user: &str, generation: u64, e: Shared) {
        let mut map = self.map.lock();
        if self.generation.load(Ordering::Acquire) != generation {
            return;
        }
        if map.len() > 100_000 {
            map.clear();
        }
        map.insert(user.to_owned(), (Instant::now(), e));
    }

    pub fn invalidate_all(&self) {
        let mut map = self.map.lock();
        self.generation.fetch_add(1, Ordering::AcqRel);
        map.clear();
    }

    pub fn invalidate(&self, user: &str) {
        let mut map = self.map.lock();
        self.generation.fetch_add(1, Ordering::AcqRel);
        map.remove(user);
    }
}

pub(crate) async fn roles_of<'e, E>(exec: E, user_id: &str) -> Result<Vec<String>, AuthError>
where
    E: sqlx::Executor<'e, Database = sqlx::Any>,
{
    let rows = sqlx::query("SELECT role FROM user_roles WHERE user_id = $1 ORDER BY role")
        .bind(user_id)
        .fetch_all(exec)
        .await?;
    rows.iter()
        .map(|r| r.try_get::<String, _>("role").map_err(AuthError::from))
        .collect()
}

/// The user's effective permissions, read in `tx` (not from the cache): for checks
/// that must hold when the transaction commits (see `admin_reset_mfa`).
pub(crate) async fn permissions_in(
    tx: &mut vaultpay_store::Tx,
    user_id: &str,
) -> Result<BTreeSet<String>, AuthError> {
    let rows = sqlx::query(
        "SELECT rp.permission AS p FROM user_roles ur \
         JOIN role_permissions rp ON rp.role = ur.role WHERE ur.user_id = $1",
    )
    .bind(user_id)
    .fetch_all(&mut **tx)
    .await?;
    rows.iter()
        .map(|r| r.try_get::<String, _>("p").map_err(AuthError::from))
        .collect()
}

impl AuthService {
    /// The user's roles and effective permissions (cached, invalidated on change).
    pub async fn effective(&self, user_id: &str) -> Result<Shared, AuthError> {
        let cache = &self.inner.perms;
        // A node deaf to the bus neither reads nor fills the cache (see
        // `invalidations_heard`).
        let cached = !self.inner.bus.deaf();
        if cached {
            if let Some(e) = cache.get(user_id) {
                return Ok(e);
            }
        }
        let generation = cache.generation.load(Ordering::Acquire);
        let rows = sqlx::query(
            "SELECT ur.role AS role, rp.permission AS p FROM user_roles ur \
             LEFT JOIN role_permissions rp ON rp.role = ur.role WHERE ur.user_id = $1",
        )
        .bind(user_id)
        .fetch_all(self.inner.db.read())
        .await?;
        let mut roles = BTreeSet::new();
        let mut permissions = BTreeSet::new();
        for r in &rows {
            roles.insert(r.try_get::<String, _>("role")?);
            if let Some(p) = r.try_get::<Option<String>, _>("p")? {
                permissions.insert(p);
            }
        }
        let e = Arc::new(Effective {
            roles: roles.into_iter().collect(),
            permissions,
        });
        if cached {
            cache.put(user_id, generation, e.clone());
        }
        Ok(e)
    }

    /// Refuses unless the caller's live permissions include `perm`. A refusal is
    /// recorded in the audit log (`access.denied`, at most
    /// [`DenialLog::PER_ACTOR`](vaultpay_store::audit::DenialLog) a minute per user).
    pub async fn require(&self, ctx: &Ctx, p: &Principal, perm: &str) -> Result<(), AuthError> {
        if self
            .effective(p.user_id())
            .await?
            .permissions
            .contains(perm)
        {
            return Ok(());
        }
        metrics::counter!("auth_permission_refused_total").increment(1);
        self.inner
            .denials
            .record(
                &self.inner.db,
                &ctx.origin(),
                "access.denied",
                p.user_id(),
                perm,
            )
            .await;
        Err(AuthError::Forbidden(perm.to_owned()))
    }

    pub async fn list_roles(&self) -> Result<wire::RoleList, AuthError> {
        let rows = sqlx::query(
            "SELECT r.name AS name, r.description AS description, r.builtin AS builtin, rp.permission AS permission \
             FROM roles r LEFT JOIN role_permissions rp ON rp.role = r.name ORDER BY r.name, rp.permission",
        )
        .fetch_all(self.inner.db.read())
        .await?;
        let mut roles: Vec<wire::Role> = Vec::new();
        for r in rows {
            let name: String = r.try_get("name")?;
            let perm: Option<String> = r.try_get("permission")?;
            if roles.last().is_none_or(|l| l.name != name) {
                roles.push(wire::Role {
                    name,
                    description: r.try_get("description")?,
                    builtin: r.try_get::<i64, _>("builtin")? != 0,
                    permissions: Vec::new(),
                });
            }
            if let (Some(last), Some(p)) = (roles.last_mut(), perm) {
                last.permissions.push(p);
            }
        }
        Ok(wire::RoleList { roles })
    }

    /// Grants `role` to `user_id`. Idempotent; audited; invalidates cached permissions.
    pub async fn grant_role(
        &self,
        ctx: &Ctx,
        actor: &Principal,
        user_id: &str,
        role: &str,
    ) -> Result<wire::User, AuthError> {
        self.change_role(ctx, actor, user_id, role, true).await
    }

    /// Revokes `role` from `user_id`: only by an actor holding every permission of
    /// the role, as for granting it. Audited; invalidates cached permissions.
    pub async fn revoke_role(
        &self,
        ctx: &Ctx,
        actor: &Principal,
        user_id: &str,
        role: &str,
    ) -> Result<wire::User, AuthError> {
        self.change_role(ctx, actor, user_id, role, false).await
    }

    async fn change_role(
        &self,
        ctx: &Ctx,
        actor: &Principal,
        user_id: &str,
        role: &str,
        grant: bool,
    ) -> Result<wire::User, AuthError> {
        self.require_step_up(actor, crate::mfa::StepUpOp::RoleChange)
            .await?;
        let db = &self.inner.db;
        let mut tx = db.begin().await?;
        let exists = sqlx::query("SELECT name FROM roles WHERE name = $1")
            .bind(role)
            .fetch_optional(&mut *tx)
            .await?;
        if exists.is_none() {
            return Err(AuthError::Invalid(
                "role_unknown",
                format!("There is no role `{role}`."),
            ));
        }
        Self::ensure_holds_role(&mut tx, actor, role).await?;
        // The user's row: a reset of their second factors checks their permissions
        // under it, so a role change is ordered before that check or after the reset.
        let user = sqlx::query(&format!(
            "SELECT id FROM users WHERE id = $1{}",
            db.for_no_key_update()
        ))
        .bind(user_id)
        .fetch_optional(&mut *tx)
        .await?;
        if user.is_none() {
            return Err(AuthError::NotFound("user"));
        }
        let changed = if grant {
            let inserted = sqlx::query(
                "INSERT INTO user_roles (user_id, role, granted_at, granted_by) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (user_id, role) DO NOTHING",
            )
            .bind(user_id)
            .bind(role)
            .bind(now_micros())
            .bind(actor.user_id())
            .execute(&mut *tx)
            .await;
            match inserted {
                Ok(r) => r.rows_affected(),
                // the role was deleted meanwhile (PostgreSQL: the foreign key waited
                // for that deletion to commit)
                Err(sqlx::Error::Database(d))
                    if d.kind() == sqlx::error::ErrorKind::ForeignKeyViolation =>
                {
                    return Err(AuthError::Invalid(
                        "role_unknown",
                        format!("There is no role `{role}`."),
                    ));
                }
                Err(e) => return Err(e.into()),
            }
        } else {
            if role == "admin" && user_id == actor.user_id() {
                return Err(AuthError::Invalid(
                    "cannot_revoke_own_admin",
                    "Admins cannot remove their own admin role.".into(),
                ));
            }
            sqlx::query("DELETE FROM user_roles WHERE user_id = $1 AND role = $2")
                .bind(user_id)
                .bind(role)
                .execute(&mut *tx)
                .await?
                .rows_affected()
        };
        if changed > 0 {
            let action = if grant {
                "role.granted"
            } else {
                "role.revoked"
            };
            append(
                db,
                &mut tx,
                &ctx.origin(),
                NewAudit::success(action)
                    .actor(actor.user_id())
                    .resource(user_id)
                    .metadata(serde_json::json!({ "role": role })),
            )
            .await?;
        }
        tx.commit().await?;
        self.invalidate_everywhere(Some(user_id)).await;
        self.user(user_id).await
    }

    /// Lifts a lockout. Audited.
    pub async fn unlock(
        &self,
        ctx: &Ctx,
        actor: &Principal,
        user_id: &str,
    ) -> Result<wire::User, AuthError> {
        let db = &self.inner.db;
        let mut tx = db.begin().await?;
        let n = sqlx::query("UPDATE users SET locked_until = NULL, failed_logins = 0, updated_at = $1 WHERE id = $2")
            .bind(now_micros())
            .bind(user_id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if n == 0 {
            return Err(AuthError::NotFound("user"));
        }
        append(
            db,
            &mut tx,
            &ctx.origin(),
            NewAudit::success("account.unlocked")
                .actor(actor.user_id())
                .resource(user_id),
        )
        .await?;
        tx.commit().await?;
        self.user(user_id).await
    }
}
