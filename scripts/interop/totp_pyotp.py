#!/usr/bin/env python3
"""TOTP interop check against pyotp (an independent implementation).

Reads JSON from stdin: {"secret": "<base32>", "uri": "<otpauth uri>", "times": [unix secs...]}
Writes JSON to stdout: {"codes": [...6-digit codes at each time...],
                        "uri": {"secret", "issuer", "name", "digits", "interval"},
                        "now": {"time": t, "code": c}}
Exits non-zero (with a message) when pyotp is missing: the Rust test that runs this
must fail, not skip.
"""
import json
import sys
import time

try:
    import pyotp
except ImportError:
    sys.stderr.write("pyotp is not installed (scripts/test.sh installs it)\n")
    sys.exit(3)

req = json.load(sys.stdin)
totp = pyotp.TOTP(req["secret"])
codes = [totp.at(t) for t in req["times"]]
parsed = pyotp.parse_uri(req["uri"])
now = int(time.time())
out = {
    "codes": codes,
    "uri": {
        "secret": parsed.secret,
        "issuer": parsed.issuer,
        "name": parsed.name,
        "digits": parsed.digits,
        "interval": parsed.interval,
    },
    "now": {"time": now, "code": totp.at(now)},
}
json.dump(out, sys.stdout)
