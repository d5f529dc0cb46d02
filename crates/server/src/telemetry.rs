//! Logs (JSON by default, with the request id of the enclosing request on every line)
//! and the Prometheus recorder.

use crate::config::{Config, LogFormat};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;
use tracing_subscriber::EnvFilter;

pub fn init_logging(cfg: &Config) {
    let filter = EnvFilter::try_from_env("VAULTPAY_LOG")
        .unwrap_or_else(|_| EnvFilter::new(format!("{},sqlx=warn,hyper=warn", cfg.log_level)));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match cfg.log_format {
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
        LogFormat::Pretty => builder.try_init(),
    };
}

static PROMETHEUS: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// The process-wide Prometheus recorder (installed once).
pub fn prometheus() -> Option<&'static PrometheusHandle> {
    PROMETHEUS
        .get_or_init(|| {
            let buckets = [
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ];
            PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &buckets)
                .ok()?
                .install_recorder()
                .ok()
                .inspect(|_| describe())
        })
        .as_ref()
}

/// Every metric this server records, with its `# HELP` text (the labels each takes in
/// brackets). A metric missing here is served without one: `platform` tests that
/// none is.
const METRICS: &[(&str, &str)] = &[
    (
        "http_requests_total",
        "HTTP requests answered [method, route, status]",
    ),
    (
        "http_request_duration_seconds",
        "HTTP request latency in seconds [method, route, status]",
    ),
    (
        "rate_limited_total",
        "Requests refused by a rate limit with 429 [scope]",
    ),
    (
        "auth_logins_total",
        "Sign-ins by outcome [outcome: success, failure, locked, held, mfa_required]",
    ),
    (
        "auth_tokens_issued_total",
        "Tokens issued [kind: access, refresh, oauth_access, id]",
    ),
    (
        "auth_refresh_reuse_detected_total",
        "Spent refresh tokens presented again (each revoked its session)",
    ),
    (
        "auth_refresh_group_size",
        "Refresh rotations committed together in one transaction",
    ),
    ("auth_mfa_failures_total", "Wrong second-factor codes"),
    (
        "auth_step_up_required_total",
        "Operations refused until the user proves a second factor again [op]",
    ),
    (
        "auth_permission_refused_total",
        "Uses of a staff permission by a user without it",
    ),
    (
        "auth_oauth_client_auth_failures_total",
        "OAuth client authentications that failed",
    ),
    (
        "auth_oauth_code_reuse_total",
        "OAuth authorization codes presented a second time (their tokens were revoked)",
    ),
    (
        "ledger_transfers_total",
        "Transfers committed [kind: transfer, hold, deposit, withdrawal]",
    ),
    (
        "ledger_failed_transfers_total",
        "Transfers refused, recorded in failed_transfers [reason]",
    ),
    (
        "ledger_group_commit_size",
        "Ledger operations committed together in one transaction",
    ),
    (
        "ledger_holds_expired_total",
        "Holds voided by the server at their timeout",
    ),
    (
        "ledger_hold_expiry_failures_total",
        "Hold expiry runs that failed (retried on the next run)",
    ),
    (
        "ledger_outbox_publish_failures_total",
        "Outbox relay runs whose publishing failed (retried)",
    ),
    (
        "ledger_outbox_events_truncated_total",
        "Outbox events published without their full payload (over the size limit)",
    ),
    (
        "ledger_permission_refused_total",
        "Uses of a staff permission by a user without it (ledger)",
    ),
    (
        "ledger_role_revoked_total",
        "Staff operations refused because AuthShield no longer grants the token's role",
    ),
    (
        "ledger_session_revoked_total",
        "Sensitive operations refused because the session has ended",
    ),
    (
        "ledger_step_up_required_total",
        "Sensitive operations refused until the user proves a second factor again",
    ),
    (
        "ledger_untrusted_network_total",
        "Sensitive operations refused from a network the user has not trusted",
    ),
    (
        "ledger_posting_clock_behind_total",
        "Postings dated at their account's last posting time because the clock went back",
    ),
];

fn describe() {
    for (name, help) in METRICS {
        if name.ends_with("_seconds") || name.ends_with("_size") {
            metrics::describe_histogram!(*name, *help);
        } else {
            metrics::describe_counter!(*name, *help);
        }
    }
}
