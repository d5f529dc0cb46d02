#!/usr/bin/env bash
# The test command (README): every crate, every feature, one integration binary per crate.
#
# PostgreSQL and Redis variants run when VAULTPAY_TEST_PG_URL / VAULTPAY_TEST_REDIS_URL
# are set (.ci/run sets both and starts the services); a set variable whose service is
# unreachable fails the run. The SMTP test talks to a real SMTP server (Python aiosmtpd),
# installed here when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c 'import aiosmtpd' 2>/dev/null; then
  echo "installing aiosmtpd (the SMTP server the mail tests send to)"
  python3 -m pip install --quiet --disable-pip-version-check aiosmtpd
fi
exec cargo test --workspace --all-features "$@"
