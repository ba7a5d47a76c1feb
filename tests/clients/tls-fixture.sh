#!/usr/bin/env bash
# Make a fresh test PKI for herald's TLS client tests in DIR (created if missing):
#
#   ca.pem, ca.key                 a self-signed CA (basicConstraints critical CA:TRUE)
#   localhost.pem, localhost.key   leaf for DNS:localhost, IP:127.0.0.1  (the default pair)
#   other.pem, other.key           leaf for DNS:other.test               (a second pair, for SNI)
#   reloaded.pem, reloaded.key     leaf for DNS:localhost, IP:127.0.0.1 with another subject,
#                                  serial and key (what the SIGHUP reload test swaps in)
#   serials.env                    LOCALHOST_SERIAL=, OTHER_SERIAL=, RELOADED_SERIAL= (hex, upper case)
#
# Every run makes new keys and random serials, so nothing is reused between runs. Leaves
# are EC P-256, valid for two days from now, with serverAuth EKU, SKI/AKI, so strict
# verifiers (Chromium, Python's VERIFY_X509_STRICT) accept them.
#
#   tests/clients/tls-fixture.sh DIR
set -euo pipefail

DIR="${1:?usage: $0 DIR}"
mkdir -p "$DIR"
cd "$DIR"
command -v openssl >/dev/null 2>&1 || { echo "tls-fixture: openssl not found (scripts/install-test-deps.sh installs it)" >&2; exit 1; }

tag="$$-$(date +%s)"
# A random positive 96-bit serial, upper-case hex without a leading zero (as Python and
# openssl print it).
serial() { openssl rand -hex 12 | tr a-f A-F | sed 's/^./7/'; }

openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout ca.key -out ca.pem -days 3 -set_serial "0x$(serial)" \
    -subj "/O=herald tests/CN=herald test CA $tag" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -addext "subjectKeyIdentifier=hash" 2>/dev/null

# leaf NAME CN SAN -> NAME.pem NAME.key; echoes the serial
leaf() {
    local name="$1" cn="$2" san="$3" s
    s="$(serial)"
    cat >"$name.ext" <<EOF
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=$san
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid:always
EOF
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -keyout "$name.key" -out "$name.csr" -subj "/O=herald tests/CN=$cn" 2>/dev/null
    openssl x509 -req -in "$name.csr" -CA ca.pem -CAkey ca.key -set_serial "0x$s" \
        -days 2 -sha256 -extfile "$name.ext" -out "$name.pem" 2>/dev/null
    rm -f "$name.csr" "$name.ext"
    echo "$s"
}

ls_serial="$(leaf localhost "herald test localhost $tag" "DNS:localhost,IP:127.0.0.1")"
ot_serial="$(leaf other "herald test other.test $tag" "DNS:other.test")"
rl_serial="$(leaf reloaded "herald test localhost reloaded $tag" "DNS:localhost,IP:127.0.0.1")"
chmod 600 ./*.key
{
    echo "LOCALHOST_SERIAL=$ls_serial"
    echo "OTHER_SERIAL=$ot_serial"
    echo "RELOADED_SERIAL=$rl_serial"
} >serials.env
# Self-check: every leaf verifies against the CA.
openssl verify -CAfile ca.pem localhost.pem other.pem reloaded.pem >/dev/null
