//! `vaultpay ledger verify`: checks every invariant of the ledger and names each
//! violation. Run it on a quiescent database (or accept that a concurrent writer may
//! show up as a transient violation between two reads).

use crate::error::LedgerError;
use sqlx::Row;
use vaultpay_store::audit::{verify_chain, ChainReport};
use vaultpay_store::Db;

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Violation {
    /// Stable name of the invariant, e.g. `balance_equals_postings`.
    pub invariant: &'static str,
    pub detail: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct VerifyReport {
    pub accounts: i64,
    pub transfers: i64,
    pub postings: i64,
    pub audit_entries: u64,
    pub violations: Vec<Violation>,
}

impl VerifyReport {
    pub fn is_consistent(&self) -> bool {
        self.violations.is_empty()
    }
}

impl std::fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{} accounts, {} transfers, {} postings, {} audit entries",
            self.accounts, self.transfers, self.postings, self.audit_entries
        )?;
        if self.violations.is_empty() {
            return writeln!(f, "ledger consistent");
        }
        for v in &self.violations {
            writeln!(f, "VIOLATION {}: {}", v.invariant, v.detail)?;
        }
        Ok(())
    }
}

/// (invariant, query returning rows with a `detail` text column for each violation).
const CHECKS: &[(&str, &str)] = &[
    (
        "transfer_postings_sum_to_zero",
        "SELECT transfer_id AS detail FROM postings GROUP BY transfer_id HAVING SUM(amount) <> 0",
    ),
    (
        "balance_equals_postings",
        "SELECT a.id AS detail FROM accounts a LEFT JOIN postings p ON p.account_id = a.id \
         GROUP BY a.id, a.balance HAVING a.balance <> COALESCE(SUM(p.amount), 0)",
    ),
    ("currency_sums_to_zero", "SELECT currency AS detail FROM accounts GROUP BY currency HAVING SUM(balance) <> 0"),
    (
        "posting_currency_matches_account",
        "SELECT p.id AS detail FROM postings p JOIN accounts a ON a.id = p.account_id WHERE p.currency <> a.currency",
    ),
    (
        // Every posting's running balance (what history and statements show) is the
        // sum of its account's postings up to it, its sequence numbers run 1..n with
        // no gap, and the account's row agrees with the last one.
        "running_balance_matches",
        "SELECT x.account_id AS detail FROM (SELECT account_id, account_seq, balance_after, \
         SUM(amount) OVER (PARTITION BY account_id ORDER BY account_seq ROWS UNBOUNDED PRECEDING) AS run, \
         ROW_NUMBER() OVER (PARTITION BY account_id ORDER BY account_seq) AS n FROM postings) x \
         WHERE x.run <> x.balance_after OR x.account_seq <> x.n \
         UNION SELECT a.id AS detail FROM accounts a WHERE a.posting_seq <> (SELECT COUNT(*) FROM postings p WHERE p.account_id = a.id) \
         OR (a.posting_seq > 0 AND a.balance <> COALESCE((SELECT p.balance_after FROM postings p WHERE p.account_id = a.id AND p.account_seq = a.posting_seq), a.balance + 1))",
    ),
    (
        // History time windows are sequence ranges found by binary search
        // (`query::history`): each account's postings must be in time order, and its
        // `last_posted_at` the time of its last one.
        "posting_times_ordered",
        "SELECT DISTINCT p.account_id AS detail FROM postings p JOIN postings q \
         ON q.account_id = p.account_id AND q.account_seq = p.account_seq + 1 WHERE q.created_at < p.created_at \
         UNION SELECT a.id AS detail FROM accounts a WHERE a.last_posted_at <> \
         COALESCE((SELECT p.created_at FROM postings p WHERE p.account_id = a.id AND p.account_seq = a.posting_seq), 0)",
    ),
    (
        "transfer_moved_its_amount",
        "SELECT t.id AS detail FROM transfers t LEFT JOIN postings p ON p.transfer_id = t.id AND p.amount > 0 \
         GROUP BY t.id, t.kind, t.amount, t.captured \
         HAVING COALESCE(SUM(p.amount), 0) <> (CASE WHEN t.kind = 'hold' THEN t.captured ELSE t.amount END)",
    ),
    (
        "hold_not_negative_or_over_captured",
        "SELECT id AS detail FROM transfers WHERE captured < 0 OR captured > amount OR amount <= 0 \
         OR (kind = 'hold' AND status = 'posted' AND captured <> amount) OR (kind <> 'hold' AND (captured <> 0 OR status <> 'posted'))",
    ),
    (
        "held_equals_pending_holds",
        "SELECT a.id AS detail FROM accounts a LEFT JOIN (SELECT t.from_account_id AS account_id, SUM(t.amount - t.captured) AS pending \
         FROM transfers t WHERE t.kind = 'hold' AND t.status = 'pending' GROUP BY t.from_account_id) h ON h.account_id = a.id \
         WHERE a.held < 0 OR a.held <> COALESCE(h.pending, 0)",
    ),
    (
        "wallet_not_overdrawn",
        "SELECT id AS detail FROM accounts WHERE kind <> 'settlement' AND (balance < 0 OR balance - held < 0)",
    ),
    ("closed_account_empty", "SELECT id AS detail FROM accounts WHERE status = 'closed' AND (balance <> 0 OR held <> 0)"),
    (
        // Every posting belongs to a transfer, and every transfer and posting to
        // accounts that exist. The foreign keys say so as rows are written; a restore,
        // a replica or a session that bypassed them would not, and an orphaned pair of
        // postings sums to zero, so no check above would see it.
        "references_exist",
        "SELECT p.id AS detail FROM postings p LEFT JOIN transfers t ON t.id = p.transfer_id WHERE t.id IS NULL \
         UNION SELECT p.id AS detail FROM postings p LEFT JOIN accounts a ON a.id = p.account_id WHERE a.id IS NULL \
         UNION SELECT t.id AS detail FROM transfers t LEFT JOIN accounts a ON a.id = t.from_account_id WHERE a.id IS NULL \
         UNION SELECT t.id AS detail FROM transfers t LEFT JOIN accounts a ON a.id = t.to_account_id WHERE a.id IS NULL",
    ),
    (
        // Every posting is on its transfer's payer (the debit) or payee (the credit),
        // in its transfer's currency. A posting moved to a third account sums, balances
        // and references as well as the right one would; only this sees it.
        "postings_follow_their_transfer",
        "SELECT p.id AS detail FROM postings p JOIN transfers t ON t.id = p.transfer_id \
         WHERE p.currency <> t.currency OR (p.amount < 0 AND p.account_id <> t.from_account_id) \
         OR (p.amount > 0 AND p.account_id <> t.to_account_id)",
    ),
];

/// Checks every invariant; `Ok(report)` lists the violations (empty = consistent).
pub async fn verify(db: &Db) -> Result<VerifyReport, LedgerError> {
    let mut report = VerifyReport::default();
    let counts = sqlx::query(
        "SELECT (SELECT COUNT(*) FROM accounts) AS a, (SELECT COUNT(*) FROM transfers) AS t, (SELECT COUNT(*) FROM postings) AS p",
    )
    .fetch_one(db.read())
    .await?;
    report.accounts = counts.try_get("a")?;
    report.transfers = counts.try_get("t")?;
    report.postings = counts.try_get("p")?;
    for (invariant, sql) in CHECKS {
        let rows = sqlx::query(sql).fetch_all(db.read()).await?;
        for r in rows.iter().take(100) {
            report.violations.push(Violation {
                invariant,
                detail: r.try_get("detail")?,
            });
        }
        if rows.len() > 100 {
            report.violations.push(Violation {
                invariant,
                detail: format!("… and {} more", rows.len() - 100),
            });
        }
    }
    match verify_chain(db).await? {
        ChainReport::Intact { entries } => report.audit_entries = entries,
        ChainReport::Broken { checked, link } => {
            report.audit_entries = checked;
            report.violations.push(Violation {
                invariant: "audit_chain_intact",
                detail: format!("{link:?}"),
            });
        }
    }
    Ok(report)
}
