# Shell helpers shared by bench/run.sh and bench/connector.sh (sourced, not run).
# The caller sets T_START (epoch seconds) before sourcing and runs with `set -euo pipefail`.

log() { printf '[%4ss] %s\n' "$(($(date +%s) - T_START))" "$*" >&2; }
die() { log "FATAL: $*"; exit 1; }

# Installs Debian packages that are missing (apt-get), without letting their maintainer scripts
# start system-wide daemons (Dovecot on 0.0.0.0:110/995 and the like).
ensure_packages() { # package...
    local missing=() p
    for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    log "installing ${missing[*]} (apt-get)"
    local policy_created=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        policy_created=1
    fi
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"
    [[ $policy_created == 1 ]] && rm -f /usr/sbin/policy-rc.d
    return 0
}

assert_ports_free() { # port...
    local port
    for port in "$@"; do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then die "port $port already in use"; fi
    done
}

# Share of the machine's CPU that is busy while this script does nothing (other users' work).
busy_pct() { # seconds
    local a b
    a=$(awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9 }' /proc/stat)
    sleep "$1"
    b=$(awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9 }' /proc/stat)
    awk -v a="$a" -v b="$b" 'BEGIN { split(a, x, " "); split(b, y, " "); d = y[2] - x[2]; printf "%.1f\n", (d > 0 ? 100 * (y[1] - x[1]) / d : 0) }'
}

# WAIT_QUIET=SECS: on a shared machine, wait up to SECS for other work to stop first.
# Sets BG_BEFORE (busy % before the run) and T_RUN (start of the benchmark proper).
wait_quiet() {
    BG_BEFORE=$(busy_pct 5)
    while awk -v l="$BG_BEFORE" 'BEGIN { exit !(l > 5) }' && (($(date +%s) - T_START < ${WAIT_QUIET:-0})); do
        log "waiting for a quiet machine (background CPU busy: $BG_BEFORE%)"
        sleep 25
        BG_BEFORE=$(busy_pct 5)
    done
    log "background CPU busy before start: $BG_BEFORE%"
    T_RUN=$(date +%s) # after any WAIT_QUIET wait: the report states the benchmark's own duration
    if awk -v l="$BG_BEFORE" 'BEGIN { exit !(l > 5) }'; then
        log "WARNING: other work is using $BG_BEFORE% of the CPU: results will be skewed"
    fi
}

# One ECDSA P-256 CA and one ECDSA P-256 leaf (localhost, 127.0.0.1, ::1) in DIR:
# ca.pem (trust anchor), cert.pem + key.pem (server).
make_test_pki() { # dir
    mkdir -p "$1"
    (
        cd "$1"
        openssl ecparam -name prime256v1 -genkey -noout -out ca-key.pem 2>/dev/null
        openssl req -x509 -new -key ca-key.pem -sha256 -days 30 -subj "/CN=pop3bench CA" \
            -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
            -out ca.pem 2>/dev/null
        openssl ecparam -name prime256v1 -genkey -noout -out leaf.pem 2>/dev/null
        openssl pkcs8 -topk8 -nocrypt -in leaf.pem -out key.pem
        openssl req -new -key key.pem -subj "/CN=localhost" -out leaf.csr 2>/dev/null
        printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1\n' >leaf.ext
        openssl x509 -req -in leaf.csr -CA ca.pem -CAkey ca-key.pem -CAcreateserial -days 30 -sha256 \
            -extfile leaf.ext -out cert.pem 2>/dev/null
        chmod 600 key.pem ca-key.pem leaf.pem
    )
}

gen_accounts() { # prefix count width -> name:password lines (random 20-hex-digit passwords)
    openssl rand -hex $((10 * $2)) | fold -w 20 |
        awk -v p="$1" -v w="$3" '{ printf "%s" "%0" w "d" ":pw-%s\n", p, NR, $0 }'
}

# Dovecot passwd-file lines for name:password lines: {SHA512-CRYPT} (glibc $6$, 5000 rounds, from
# openssl passwd -6), uid nobody, home MAILDIR/NAME.
dovecot_passwd() { # accounts_file mail_dir
    paste -d: <(cut -d: -f1 "$1") <(cut -d: -f2- "$1" | openssl passwd -6 -stdin | sed 's/^/{SHA512-CRYPT}/') |
        awk -F: -v uid="$(id -u nobody)" -v gid="$(getent group nogroup | cut -d: -f3)" -v mail="$2" \
            '{ printf "%s:%s:%s:%s::%s/%s::\n", $1, $2, uid, gid, mail, $1 }'
}

# Starts a private Dovecot (`dovecot -c CONF`) and waits until PORT accepts connections.
# Prints the master's PID.
start_dovecot_instance() { # conf base_dir port
    dovecot -c "$1"
    local _
    for _ in $(seq 100); do
        [[ -s $2/master.pid ]] && (exec 3<>"/dev/tcp/127.0.0.1/$3") 2>/dev/null && break
        sleep 0.1
    done
    [[ -s $2/master.pid ]] || die "dovecot ($1) did not start"
    kill -0 "$(cat "$2/master.pid")" || die "dovecot ($1) did not start"
    (exec 3<>"/dev/tcp/127.0.0.1/$3") 2>/dev/null || die "dovecot ($1) not listening on $3"
    cat "$2/master.pid"
}

# Stops a Dovecot master (it stops its own children) by PID: TERM, then KILL after 20 s.
stop_dovecot_master() { # pid (may be empty)
    [[ -n $1 ]] && kill -0 "$1" 2>/dev/null || return 0
    kill -TERM "$1" 2>/dev/null || true
    local _
    for _ in $(seq 100); do kill -0 "$1" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$1" 2>/dev/null || true
}

# Replaces the section of the Markdown report OUT that starts with a "## HEADING..." line (up to
# the next "## " line) by the contents of SECTION_FILE; a report without that section gets it
# before "## Machine and versions", or at the end.
splice_section() { # out heading section_file
    touch "$1"
    awk -v sec="$3" -v head="## $2" '
        index($0, head) == 1 { skip = 1; if (!done) { while ((getline l < sec) > 0) print l; done = 1 }; next }
        skip && /^## / { skip = 0 }
        !skip && /^## Machine and versions/ && !done { while ((getline l < sec) > 0) print l; done = 1 }
        !skip { print }
        END { if (!done) while ((getline l < sec) > 0) print l }' "$1" >"$1.new"
    mv "$1.new" "$1"
}

# Prints the section of OUT that starts with a "## HEADING..." line (nothing if there is none),
# followed by one blank line, for splice_section.
extract_section() { # out heading
    [[ -f $1 ]] || return 0
    awk -v head="## $2" '
        index($0, head) == 1 { p = 1; print; next }
        p && /^## / { exit }
        p { print }' "$1" | sed -e :a -e '/^\n*$/{$d;N;ba' -e '}'
}
