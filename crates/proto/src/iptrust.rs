//! Wire types of AuthShield's IP trust (held logins, trusted networks) and custom roles.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `202` answer of a login (correct password) from a network the user has not
/// confirmed: a one-time link was emailed; finish with `POST /v1/auth/login/complete`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LoginHeld {
    /// `ip_confirmation_required`.
    pub status: String,
    /// Opaque, single use, bound to the device and network of the held login.
    pub login_ticket: String,
}

#[derive(Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginCompleteRequest {
    pub login_ticket: String,
    /// The `device.id` the held login was made with.
    pub device_id: String,
}

debug_redacted!(LoginCompleteRequest { device_id } hides { login_ticket });

/// A network a user trusts: the exact address, or its configured prefix.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TrustedNetwork {
    pub id: String,
    /// CIDR, e.g. `203.0.113.0/24` or `2001:db8:1:2::/64`.
    pub network: String,
    pub created_at: String,
    pub last_used_at: String,
    /// Sliding: pushed forward when the network is used.
    pub expires_at: String,
    /// True when the address of this request is in it.
    pub current: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TrustedNetworkList {
    pub networks: Vec<TrustedNetwork>,
}

/// A sign-in provider identity linked to the caller's account.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LinkedIdentity {
    /// The provider's configured name (`[auth.oauth.upstream.<name>]`).
    pub provider: String,
    /// The address the provider gave when it was linked.
    pub email: Option<String>,
    pub linked_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LinkedIdentityList {
    pub identities: Vec<LinkedIdentity>,
}

/// `POST /v1/admin/roles`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateRoleRequest {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Each must be one of the known permissions (`GET /v1/admin/roles` lists them per role).
    pub permissions: Vec<String>,
}
