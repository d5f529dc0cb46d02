-- What a user has begun but not finished, found by user: revoking a user's sessions (a
-- password reset or change, "log out everywhere", "this wasn't me") also ends the
-- authorization codes and device approvals not yet exchanged, the signed-in OAuth
-- authorization requests and the login tickets waiting for a second factor.
CREATE INDEX oauth_codes_user ON oauth_codes (user_id);
CREATE INDEX oauth_device_codes_user ON oauth_device_codes (user_id);
CREATE INDEX oauth_requests_user ON oauth_requests (user_id);
CREATE INDEX mfa_tickets_user ON mfa_tickets (user_id);
