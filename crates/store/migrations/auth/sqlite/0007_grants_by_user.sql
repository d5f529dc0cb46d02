-- A user's outstanding OAuth grants, found by user: revoking a user's sessions (a
-- password reset or change, "log out everywhere", "this wasn't me") also ends the
-- authorization codes and device approvals not yet exchanged for one.
CREATE INDEX oauth_codes_user ON oauth_codes (user_id);
CREATE INDEX oauth_device_codes_user ON oauth_device_codes (user_id);
