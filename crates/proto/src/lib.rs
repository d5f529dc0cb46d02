//! Wire types of the VaultPay HTTP API: requests, responses and the RFC 9457 problem
//! document, with OpenAPI schemas. Shared by the services, the client and the CLI.
//!
//! Request types refuse unknown fields, so a typo in a field name is an error, not a
//! silently ignored value.

/// `Debug` for a request type that carries secrets: the named fields are shown, the
/// others printed as `"**redacted**"`, so a request logged by mistake leaks nothing.
macro_rules! debug_redacted {
    ($t:ident { $($shown:ident),* } hides { $($hidden:ident),* }) => {
        impl std::fmt::Debug for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct(stringify!($t))
                    $(.field(stringify!($shown), &self.$shown))*
                    $(.field(stringify!($hidden), &"**redacted**"))*
                    .finish()
            }
        }
    };
}

pub mod auth;
pub mod iptrust;
pub mod ledger;
pub mod mfa;
mod problem;

pub use problem::{Problem, PROBLEM_CONTENT_TYPE};
