//! Rows as stored, the caller as the ledger sees it, and conversions to wire types.

use sqlx::any::AnyRow;
use sqlx::Row;
use vaultpay_core::time::rfc3339;
use vaultpay_proto::ledger as wire;

/// The authenticated caller, with the ledger's static reading of their roles.
#[derive(Debug, Clone)]
pub struct Actor {
    pub user_id: String,
    pub roles: Vec<String>,
    /// The bearer token, for introspection of sensitive operations.
    pub token: String,
    pub client_ip: Option<std::net::IpAddr>,
    /// `acr` and `auth_time` (seconds) of the token, for step-up (RFC 9470).
    pub acr: Option<String>,
    pub auth_time: i64,
    /// The token's session (`sid`); empty for a token without one.
    pub session_id: String,
}

impl Actor {
    pub fn new(user_id: impl Into<String>, roles: Vec<String>, token: impl Into<String>) -> Self {
        Self {
            user_id: user_id.into(),
            roles,
            token: token.into(),
            client_ip: None,
            acr: None,
            auth_time: 0,
            session_id: String::new(),
        }
    }

    /// The caller a verified token names; `None` for a token AuthShield issued to an
    /// OAuth client without the `api` scope, which acts on nothing here (as on
    /// AuthShield's own API).
    pub fn from_principal(
        p: &vaultpay_web::Principal,
        client_ip: Option<std::net::IpAddr>,
    ) -> Option<Self> {
        if !p.may_use_api() {
            return None;
        }
        let c = &p.claims;
        // A token issued to an OAuth client acts as a customer at most: staff powers
        // (treasury moves, freezes, reading every account) are not delegated to
        // third-party applications, whatever scope the user granted one.
        let roles = if c.client_id.is_some() {
            c.roles
                .iter()
                .filter(|r| r.as_str() == "customer")
                .cloned()
                .collect()
        } else {
            c.roles.clone()
        };
        Some(Self {
            user_id: p.user_id().to_owned(),
            roles,
            token: p.token.clone(),
            client_ip,
            acr: c.acr.clone(),
            auth_time: c.auth_time,
            session_id: c.sid.clone(),
        })
    }

    /// What the money this caller moves is counted under between live-session checks
    /// (see `Ledger::live_check_due`): the session, or the caller without one.
    pub(crate) fn session_key(&self) -> &str {
        if self.session_id.is_empty() {
            &self.user_id
        } else {
            &self.session_id
        }
    }

    pub(crate) fn has(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }

    /// May open and use wallets of their own (customer, admin).
    pub fn can_own(&self) -> bool {
        self.has("customer") || self.has("admin")
    }

    /// May read any account and transfer ([`STAFF_READERS`]).
    pub fn can_read_any(&self) -> bool {
        STAFF_READERS.iter().any(|r| self.has(r))
    }

    /// Treasury (deposits, withdrawals) and account management (freeze, close).
    pub fn is_admin(&self) -> bool {
        self.has("admin")
    }

    /// Failed transfers and the ledger audit log ([`AUDITORS`]).
    pub fn can_audit(&self) -> bool {
        AUDITORS.iter().any(|r| self.has(r))
    }
}

/// The roles that read any customer's accounts and transfers (confirmed live with
/// AuthShield for each read of someone else's: `Ledger::readable_account`).
pub(crate) const STAFF_READERS: &[&str] = &["support", "compliance", "admin"];

/// The roles that read failed transfers and the ledger's audit log.
pub(crate) const AUDITORS: &[&str] = &["compliance", "admin"];

pub(crate) const ACCOUNT_COLS: &str =
    "id, number, owner_id, kind, name, currency, status, balance, held, posting_seq, created_at, updated_at, last_posted_at";

#[derive(Debug, Clone)]
pub(crate) struct AccountRow {
    pub id: String,
    pub number: String,
    pub owner_id: Option<String>,
    pub kind: String,
    pub name: String,
    pub currency: String,
    pub status: String,
    pub balance: i64,
    pub held: i64,
    pub posting_seq: i64,
    pub created_at: i64,
    pub updated_at: i64,
    /// `created_at` of the account's last posting (0 before the first): see
    /// [`AccountRow::posting_time`].
    pub last_posted_at: i64,
}

impl AccountRow {
    /// The time of a new posting on this account, recorded as its last: `now`, or the
    /// time of its previous posting should the clock have gone back since. So an
    /// account's postings are in time order as they are in sequence order, and the
    /// history's time windows are found by binary search over the sequence
    /// (`query::history`) instead of through an index on time.
    pub fn posting_time(&mut self, now: i64) -> i64 {
        if now < self.last_posted_at {
            clock_behind(self.last_posted_at - now);
        }
        self.last_posted_at = self.last_posted_at.max(now);
        self.last_posted_at
    }

    pub fn from_row(r: &AnyRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            id: r.try_get("id")?,
            number: r.try_get("number")?,
            owner_id: r.try_get("owner_id")?,
            kind: r.try_get("kind")?,
            name: r.try_get("name")?,
            currency: r.try_get("currency")?,
            status: r.try_get("status")?,
            balance: r.try_get("balance")?,
            held: r.try_get("held")?,
            posting_seq: r.try_get("posting_seq")?,
            created_at: r.try_get("created_at")?,
            updated_at: r.try_get("updated_at")?,
            last_posted_at: r.try_get("last_posted_at")?,
        })
    }

    pub fn owned_by(&self, actor: &Actor) -> bool {
        self.owner_id.as_deref() == Some(actor.user_id.as_str())
    }

    pub fn visible_to(&self, actor: &Actor) -> bool {
        self.owned_by(actor) || actor.can_read_any()
    }

    pub fn is_settlement(&self) -> bool {
        self.kind == "settlement"
    }

    pub fn available(&self) -> i64 {
        self.balance.saturating_sub(self.held)
    }

    pub fn to_wire(&self, viewer: &Actor) -> wire::Account {
        let number = if self.owned_by(viewer) {
            self.number.clone()
        } else {
            vaultpay_core::account_number::mask(&self.number)
        };
        wire::Account {
            id: self.id.clone(),
            number,
            owner_id: self.owner_id.clone(),
            kind: match self.kind.as_str() {
                "savings" => wire::AccountKind::Savings,
                "current" => wire::AccountKind::Current,
                _ => wire::AccountKind::Settlement,
            },
            name: self.name.clone(),
            currency: self.currency.clone(),
            status: match self.status.as_str() {
                "active" => wire::AccountStatus::Active,
                "frozen" => wire::AccountStatus::Frozen,
                _ => wire::AccountStatus::Closed,
            },
            balance: self.balance,
            available_balance: self.available(),
            created_at: rfc3339(self.created_at),
            updated_at: rfc3339(self.updated_at),
        }
    }
}

pub(crate) const TRANSFER_COLS: &str =
    "id, kind, from_account_id, to_account_id, amount, captured, currency, \
     description, status, expires_at, initiated_by, batch_id, created_at, updated_at";

/// The columns a posting is inserted with (bound by `group::bind_posting`).
pub(crate) const POSTING_COLS: &str =
    "id, transfer_id, account_id, account_seq, amount, currency, balance_after, created_at";

#[derive(Debug, Clone)]
pub(crate) struct TransferRow {
    pub id: String,
    pub kind: String,
    pub from_account_id: String,
    pub to_account_id: String,
    pub amount: i64,
    pub captured: i64,
    pub currency: String,
    pub description: String,
    pub status: String,
    pub expires_at: Option<i64>,
    pub initiated_by: String,
    pub batch_id: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
}

pub(crate) fn kind_wire(kind: &str) -> wire::TransferKind {
    match kind {
        "deposit" => wire::TransferKind::Deposit,
        "withdrawal" => wire::TransferKind::Withdrawal,
        "hold" => wire::TransferKind::Hold,
        _ => wire::TransferKind::Transfer,
    }
}

impl TransferRow {
    /// A new posted transfer of `amount` as `req` asks, initiated by `actor` at `now`
    /// (a hold is this with its kind, status and expiry changed before it is written).
    pub fn posted(
        actor: &crate::model::Actor,
        req: &wire::TransferRequest,
        amount: i64,
        batch_id: Option<&str>,
        now: i64,
    ) -> Self {
        Self {
            id: crate::ids::new_id(),
            kind: "transfer".to_owned(),
            from_account_id: req.from_account_id.clone(),
            to_account_id: req.to_account_id.clone(),
            amount,
            captured: 0,
            currency: req.currency.clone(),
            description: req.description.clone(),
            status: "posted".to_owned(),
            expires_at: None,
            initiated_by: actor.user_id.clone(),
            batch_id: batch_id.map(str::to_owned),
            created_at: now,
            updated_at: now,
        }
    }

    pub fn from_row(r: &AnyRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            id: r.try_get("id")?,
            kind: r.try_get("kind")?,
            from_account_id: r.try_get("from_account_id")?,
            to_account_id: r.try_get("to_account_id")?,
            amount: r.try_get("amount")?,
            captured: r.try_get("captured")?,
            currency: r.try_get("currency")?,
            description: r.try_get("description")?,
            status: r.try_get("status")?,
            expires_at: r.try_get("expires_at")?,
            initiated_by: r.try_get("initiated_by")?,
            batch_id: r.try_get("batch_id")?,
            created_at: r.try_get("created_at")?,
            updated_at: r.try_get("updated_at")?,
        })
    }

    pub fn remaining(&self) -> i64 {
        self.amount - self.captured
    }

    pub fn to_wire(&self) -> wire::Transfer {
        wire::Transfer {
            id: self.id.clone(),
            kind: kind_wire(&self.kind),
            from_account_id: self.from_account_id.clone(),
            to_account_id: self.to_account_id.clone(),
            amount: self.amount,
            currency: self.currency.clone(),
            description: self.description.clone(),
            status: match self.status.as_str() {
                "pending" => wire::TransferStatus::Pending,
                "voided" => wire::TransferStatus::Voided,
                "expired" => wire::TransferStatus::Expired,
                _ => wire::TransferStatus::Posted,
            },
            pending: self.kind == "hold",
            captured_amount: if self.kind == "hold" {
                self.captured
            } else {
                self.amount
            },
            expires_at: self.expires_at.map(rfc3339),
            created_at: rfc3339(self.created_at),
            updated_at: rfc3339(self.updated_at),
        }
    }
}

/// A posting took its account's last posting time because the clock is behind it (the
/// clock was stepped back, or an earlier posting was written by a clock running fast:
/// then the account's postings carry that future time until the clock catches up).
/// Counted in `ledger_posting_clock_behind_total`; logged at most once a minute.
fn clock_behind(by_micros: i64) {
    use std::sync::atomic::{AtomicI64, Ordering};
    static LAST_WARNED: AtomicI64 = AtomicI64::new(i64::MIN);
    metrics::counter!("ledger_posting_clock_behind_total").increment(1);
    let now = vaultpay_core::time::now_micros();
    let last = LAST_WARNED.load(Ordering::Relaxed);
    if now.saturating_sub(last) >= 60_000_000
        && LAST_WARNED
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        tracing::warn!(
            behind_ms = by_micros / 1_000,
            "the clock is behind an account's last posting time; new postings take that time so that its history stays in time order"
        );
    }
}
