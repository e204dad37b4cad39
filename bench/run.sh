#!/usr/bin/env bash
# POP3conneX vs Dovecot 2.3 load benchmark, on this machine, loopback only.
#
#   bench/run.sh                      # full run (PHASES="main auth": < 15 min + the auth phases), writes docs/BENCHMARKS.md
#   PHASES=auth bench/run.sh          # authentication phases only (< 10 min), rewrites only their section
#   PHASES=connector bench/run.sh     # connector vs fetchmail (bench/connector.sh), rewrites only its section
#   PHASES=telemetry bench/run.sh     # POP3conneX with every telemetry consumer on vs off (~10 min),
#                                     # rewrites only the "Telemetry overhead" section
#   bench/memory.sh                   # memory figures ("Memory after load", kept by the runs above)
#   SERVERS=dovecot bench/run.sh      # harness check against Dovecot alone (report in bench/work)
#
# Knobs (environment): USERS=200 MSGS=20 SIZE=4400 DURATION=20 WARMUP=2 ROUNDS=2
#   CONCURRENCIES="8 32" LOGIN_CONCURRENCY=8 IDLE_SESSIONS=2000 IDLE_MSGS=2
#   LMTP_COUNT=3000 LMTP_CONCURRENCY=8 LMTP_PER_CONN=100 LMTP_SINKS=100
#   ARGON2=1 ARGON2_METRICS="sessions-8 sessions-32" (add "logins" for Argon2id TLS logins too)
#   ARGON2_CACHED_METRICS="sessions-8" (Argon2id with POP3conneX's default credential cache; "" = skip)
#   SERVERS="pop3connex dovecot" WORK=bench/work OUT=docs/BENCHMARKS.md
#   PHASES="main auth": "main" = the sessions/logins/LMTP/idle/Argon2id measurements above;
#     "auth" = authentication phases (SCRAM-SHA-256 logins, Argon2id PLAIN logins cold/warm, Dovecot
#     SHA512-CRYPT logins, brute-force flood cost). PHASES=auth alone takes < 10 min, uses
#     IDLE_SESSIONS=10 unless set, and only replaces the "Authentication" section of OUT.
#   SCRAM_USERS=50 FLOOD_CONCURRENCY=8 ATTACK_ATTEMPTS=10000 ATTACK_CONCURRENCY=64 ATTACK_PER_CONN=50
#   ATTACK_SOURCE=127.0.0.2 (attacker's loopback address: not allowlisted in POP3conneX)
#   WAIT_QUIET=0 (seconds to wait for other work on the machine to stop before starting)
#   TEL_ROUNDS=3 TEL_LMTP_COUNT=10000 (telemetry phase: off/on pairs, order alternating per round)
#
# Everything listens on 127.0.0.1 only; every load step is bounded in time. Needs root (installs
# Dovecot with apt-get if missing, starts a private Dovecot instance, raises RLIMIT_NOFILE).
set -euo pipefail

# The whole script is one brace group: bash parses it completely before running any of it, so
# editing this file during a run cannot break the run.
{
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PHASES=${PHASES:-main auth}
has_phase() { [[ " $PHASES " == *" $1 "* ]]; }
# PHASES=connector: only the connector benchmark (bench/connector.sh, its own knobs and section).
if [[ $PHASES == connector ]]; then exec "$ROOT/bench/connector.sh"; fi
# PHASES=telemetry: POP3conneX alone, its telemetry off and on (Dovecot is not involved).
if [[ $PHASES == telemetry ]]; then SERVERS=pop3connex; fi
TEL_ROUNDS=${TEL_ROUNDS:-3}
TEL_LMTP_COUNT=${TEL_LMTP_COUNT:-10000}
TEL_SYSLOG=${TEL_SYSLOG:-28514}
TEL_WEBHOOK=${TEL_WEBHOOK:-28443}
TEL_METRICS=${TEL_METRICS:-28465}
TELEMETRY=""
has_phase main || IDLE_SESSIONS=${IDLE_SESSIONS:-10}
SCRAM_USERS=${SCRAM_USERS:-50}
FLOOD_CONCURRENCY=${FLOOD_CONCURRENCY:-8}
ATTACK_ATTEMPTS=${ATTACK_ATTEMPTS:-10000}
ATTACK_CONCURRENCY=${ATTACK_CONCURRENCY:-64}
ATTACK_PER_CONN=${ATTACK_PER_CONN:-50}
ATTACK_SOURCE=${ATTACK_SOURCE:-127.0.0.2}
USERS=${USERS:-200}
MSGS=${MSGS:-20}
SIZE=${SIZE:-4400}
DURATION=${DURATION:-20}
WARMUP=${WARMUP:-2}
ROUNDS=${ROUNDS:-2}
CONCURRENCIES=${CONCURRENCIES:-8 32}
LOGIN_CONCURRENCY=${LOGIN_CONCURRENCY:-8}
IDLE_SESSIONS=${IDLE_SESSIONS:-2000}
IDLE_MSGS=${IDLE_MSGS:-2}
LMTP_COUNT=${LMTP_COUNT:-3000}
LMTP_CONCURRENCY=${LMTP_CONCURRENCY:-8}
LMTP_PER_CONN=${LMTP_PER_CONN:-100}
LMTP_SINKS=${LMTP_SINKS:-100}
ARGON2=${ARGON2:-1}
ARGON2_METRICS=${ARGON2_METRICS:-$(for c in $CONCURRENCIES; do printf 'sessions-%s ' "$c"; done)}
ARGON2_CACHED_METRICS=${ARGON2_CACHED_METRICS-sessions-8}
SERVERS=${SERVERS:-pop3connex dovecot}
WORK=${WORK:-$ROOT/bench/work}
OUT=${OUT:-$ROOT/docs/BENCHMARKS.md}

# Loopback ports (fixed, so that the configs are readable).
DV_POP3S=${DV_POP3S:-27995}
DV_LMTP=${DV_LMTP:-27024}
PX_POP3S=${PX_POP3S:-28995}
PX_STARTTLS=${PX_STARTTLS:-28110}
PX_LMTP=${PX_LMTP:-28024}

BENCH=$ROOT/target/release/pop3connex-bench
PX=$ROOT/target/release/pop3connex
DV=$WORK/dovecot
PXD=$WORK/pop3connex
RES=$WORK/results
CMDLINE="$(printf '%q ' "$0" "$@")"
T_START=$(date +%s)
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"
has_server() { [[ " $SERVERS " == *" $1 "* ]]; }

[[ $(id -u) == 0 ]] || die "run as root (Dovecot setup, RLIMIT_NOFILE)"
[[ $IDLE_SESSIONS -ge 1 && $USERS -ge 1 && $MSGS -ge 1 ]] || die "bad USERS/MSGS/IDLE_SESSIONS"

# ---------------------------------------------------------------------------------------------
# Cleanup: stop what this script started, by PID.
PX_PID=""
DV_PID=""
IDLE_PID=""
ATTACK_PID=""
stop_pop3connex() {
    if [[ -n $PX_PID ]] && kill -0 "$PX_PID" 2>/dev/null; then
        kill -TERM "$PX_PID" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$PX_PID" 2>/dev/null || break; sleep 0.2; done
        kill -KILL "$PX_PID" 2>/dev/null || true
        wait "$PX_PID" 2>/dev/null || true
    fi
    PX_PID=""
}
stop_dovecot() {
    stop_dovecot_master "$DV_PID"
    DV_PID=""
}
cleanup() {
    [[ -n $IDLE_PID ]] && kill -TERM "$IDLE_PID" 2>/dev/null || true
    [[ -n $ATTACK_PID ]] && kill -TERM "$ATTACK_PID" 2>/dev/null || true
    stop_pop3connex
    stop_dovecot
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------------------------------------
log "preflight"
ulimit -Hn 65536 2>/dev/null || true
ulimit -n "$(ulimit -Hn)"
[[ $(ulimit -n) -ge $((IDLE_SESSIONS * 2 + 1000)) ]] || die "RLIMIT_NOFILE $(ulimit -n) too low"

ensure_packages dovecot-core dovecot-pop3d dovecot-lmtpd openssl
command -v openssl >/dev/null || die "openssl missing"

assert_ports_free $DV_POP3S $DV_LMTP $PX_POP3S $PX_STARTTLS $PX_LMTP

wait_quiet

log "building (release)"
cd "$ROOT"
if has_server pop3connex; then
    cargo build --release -p pop3connex-bench -p pop3connex 2>&1 | tail -n 3 >&2
    [[ -x $PX ]] || die "$PX missing"
else
    cargo build --release -p pop3connex-bench 2>&1 | tail -n 3 >&2
fi

rm -rf "$WORK"
mkdir -p "$WORK" "$RES"
chmod 755 "$WORK"

# ---------------------------------------------------------------------------------------------
log "TLS: one ECDSA P-256 CA and one ECDSA P-256 leaf (localhost, 127.0.0.1) for both servers"
TLS=$WORK/tls
make_test_pki "$TLS"

log "accounts: $USERS corpus users, $IDLE_SESSIONS idle users, $LMTP_SINKS LMTP sink users"
mkdir -p "$WORK/accounts"
gen_accounts user "$USERS" 4 >"$WORK/accounts/users.txt"
gen_accounts idle "$IDLE_SESSIONS" 5 >"$WORK/accounts/idle.txt"
gen_accounts sink "$LMTP_SINKS" 3 >"$WORK/accounts/sinks.txt"
cat "$WORK"/accounts/{users,idle,sinks}.txt >"$WORK/accounts/all.txt"
# SCRAM-SHA-256 users (auth phase): Dovecot stores {SCRAM-SHA-256} hashes for them.
if has_phase auth; then gen_accounts scram "$SCRAM_USERS" 3 >"$WORK/accounts/scram.txt"; else : >"$WORK/accounts/scram.txt"; fi
rcpts() { cut -d: -f1 "$1" | sed 's/$/@localhost/'; }
rcpts "$WORK/accounts/users.txt" >"$WORK/accounts/users.rcpt"
rcpts "$WORK/accounts/idle.txt" >"$WORK/accounts/idle.rcpt"
rcpts "$WORK/accounts/sinks.txt" >"$WORK/accounts/sinks.rcpt"
chmod 600 "$WORK"/accounts/*

log "corpus: $MSGS messages of $SIZE octets"
"$BENCH" corpus --out "$WORK/corpus" --count "$MSGS" --size "$SIZE" >/dev/null
mkdir -p "$WORK/corpus-idle"
for ((i = 0; i < IDLE_MSGS; i++)); do cp "$WORK/corpus/$(printf 'msg-%05d.eml' "$((i % MSGS))")" "$WORK/corpus-idle/$(printf 'msg-%05d.eml' "$i")"; done

# Largest batch size from this list that divides the number of idle users: one LMTP
# transaction then delivers the same message to K users.
IDLE_K=1
for k in 50 40 25 20 10 8 5 4 2; do
    if ((IDLE_SESSIONS % k == 0)); then IDLE_K=$k; break; fi
done

LIMIT=$((IDLE_SESSIONS + 500))

# ---------------------------------------------------------------------------------------------
DV_MECHS=plain
has_phase auth && DV_MECHS="plain scram-sha-256" # Dovecot >= 2.3.? (2.3.19 has it)
setup_dovecot() {
    log "dovecot: configuring private instance in $DV"
    mkdir -p "$DV/run" "$DV/state" "$DV/log" "$DV/mail"
    chown nobody:nogroup "$DV/mail"
    # name:{SHA512-CRYPT}hash:uid:gid:gecos:home:shell:extra
    dovecot_passwd "$WORK/accounts/all.txt" "$DV/mail" >"$DV/passwd"
    # SCRAM users: {SCRAM-SHA-256} (doveadm pw, 4096 PBKDF2 iterations, same as POP3conneX).
    local name pw
    while IFS=: read -r name pw; do
        printf '%s:%s:%s:%s::%s/%s::\n' "$name" "$(doveadm pw -s SCRAM-SHA-256 -p "$pw")" \
            "$(id -u nobody)" "$(getent group nogroup | cut -d: -f3)" "$DV/mail" "$name"
    done <"$WORK/accounts/scram.txt" >>"$DV/passwd"
    chown root:dovecot "$DV/passwd"
    chmod 640 "$DV/passwd"
    cat >"$DV/dovecot.conf" <<EOF
# Generated by bench/run.sh: private Dovecot instance for the benchmark, loopback only.
# Only what is needed differs from the Debian defaults: paths, listeners, TLS files, accounts,
# and the limits that allow $IDLE_SESSIONS+ concurrent sessions. Login processes run in the
# default high-security mode (one pop3-login process per connection, service_count = 1), one
# pop3 process per session, auth cache off (default), mail_fsync = optimized (default).
base_dir = $DV/run
state_dir = $DV/state
instance_name = pop3bench
protocols = pop3 lmtp
listen = 127.0.0.1
log_path = $DV/log/dovecot.log

ssl = required
ssl_cert = <$TLS/cert.pem
ssl_key = <$TLS/key.pem

disable_plaintext_auth = yes
auth_mechanisms = $DV_MECHS
auth_username_format = %Ln
passdb {
  driver = passwd-file
  args = scheme=SHA512-CRYPT username_format=%n $DV/passwd
}
userdb {
  driver = passwd-file
  args = username_format=%n $DV/passwd
}
mail_location = maildir:~/Maildir
first_valid_uid = 500

mail_max_userip_connections = $LIMIT
default_client_limit = $((LIMIT * 3))
default_vsz_limit = 256M

service pop3-login {
  inet_listener pop3 {
    port = 0
  }
  inet_listener pop3s {
    address = 127.0.0.1
    port = $DV_POP3S
    ssl = yes
  }
  process_limit = $LIMIT
}
service pop3 {
  process_limit = $LIMIT
}
service lmtp {
  inet_listener lmtp {
    address = 127.0.0.1
    port = $DV_LMTP
  }
}
EOF
    doveconf -c "$DV/dovecot.conf" -n >"$DV/doveconf-n.txt" 2>"$DV/doveconf.err" || {
        cat "$DV/doveconf.err" >&2
        die "dovecot config invalid"
    }
}

start_dovecot() {
    DV_PID=$(start_dovecot_instance "$DV/dovecot.conf" "$DV/run" "$DV_POP3S")
    (exec 3<>"/dev/tcp/127.0.0.1/$DV_LMTP") 2>/dev/null || die "dovecot LMTP not listening"
    log "dovecot: master pid $DV_PID"
}

# ---------------------------------------------------------------------------------------------
px() { "$PX" --config "$PXD/pop3connex.toml" "$@"; }

write_px_config() { # scheme credential_cache_secs
    cat >"$PXD/pop3connex.toml" <<EOF
# Generated by bench/run.sh. Same certificate and key files as the Dovecot instance.
[server]
hostname = "localhost"

[store]
backend = "sqlite"
path = "pop3connex.db"
master_key = "file:master.key"

[tls]
certificate = "$TLS/cert.pem"
private_key = "file:$TLS/key.pem"

[pop3]
implicit_tls = ["127.0.0.1:$PX_POP3S"]
starttls = ["127.0.0.1:$PX_STARTTLS"]
max_connections = $LIMIT
max_connections_per_ip = $LIMIT
plaintext_auth_networks = []
preauth_timeout_secs = 60
idle_timeout_secs = 600

[lmtp]
listen = ["127.0.0.1:$PX_LMTP"]
max_message_size = 26214400

[auth]
password_scheme = "$1"
# 0 = every login verifies the password hash, like Dovecot with its default auth_cache_size = 0.
credential_cache_secs = $2

[log]
format = "human"
level = "info"

# The load generator is many clients behind one address (like a load balancer or NAT): without
# this, the default flood protection bans 127.0.0.1 after 300 connections in a minute.
# Allowlisted addresses are still counted, just never banned.
[abuse]
allowlist = ["127.0.0.1/32"]
EOF
    case $TELEMETRY in
    off) # Every telemetry consumer off: no event store, no anomaly rules, no sinks, no metrics.
        printf '\n[log.store]\nenabled = false\n\n[anomaly]\nenabled = false\n' >>"$PXD/pop3connex.toml" ;;
    on) # Every consumer on: event store and anomaly rules (the defaults), an ECS JSON file, RFC 5425
        # syslog over verified TLS and a signed webhook to loopback receivers, and the metrics endpoint.
        cat >>"$PXD/pop3connex.toml" <<EOF

[[log.sink]]
type = "json"
path = "$PXD/events.json"

[[log.sink]]
type = "syslog"
transport = "tls"
address = "127.0.0.1:$TEL_SYSLOG"
ca_file = "$TLS/ca.pem"
server_name = "localhost"

[[alerts.webhook]]
url = "https://127.0.0.1:$TEL_WEBHOOK/hook"
secret = "file:$PXD/webhook.secret"
ca_file = "$TLS/ca.pem"

[metrics]
listen = ["127.0.0.1:$TEL_METRICS"]
EOF
        ;;
    esac
}

setup_pop3connex() {
    log "pop3connex: init + config in $PXD"
    "$PX" init --data-dir "$PXD" --hostname localhost >"$PXD.init.log" 2>&1 || {
        cat "$PXD.init.log" >&2
        die "pop3connex init failed"
    }
    write_px_config sha512-crypt 0
    px config check || die "pop3connex config check failed"
    log "pop3connex: adding $(cat "$WORK/accounts/all.txt" "$WORK/accounts/scram.txt" | wc -l) users (sha512-crypt; all get SCRAM keys)"
    local name pw
    while IFS=: read -r name pw; do
        printf '%s\n' "$pw" | px user add "$name" --password-stdin >/dev/null 2>>"$PXD/useradd.err" ||
            die "pop3connex user add $name failed: $(tail -n 2 "$PXD/useradd.err")"
    done < <(cat "$WORK/accounts/all.txt" "$WORK/accounts/scram.txt")
}

start_pop3connex() {
    # Started directly (not through a function or subshell) so that $! is the server itself.
    "$PX" --config "$PXD/pop3connex.toml" serve >>"$PXD/serve.log" 2>&1 &
    PX_PID=$!
    for _ in $(seq 150); do
        (exec 3<>"/dev/tcp/127.0.0.1/$PX_POP3S") 2>/dev/null &&
            (exec 3<>"/dev/tcp/127.0.0.1/$PX_LMTP") 2>/dev/null && break
        kill -0 "$PX_PID" 2>/dev/null || { tail -n 20 "$PXD/serve.log" >&2; die "pop3connex serve exited"; }
        sleep 0.1
    done
    (exec 3<>"/dev/tcp/127.0.0.1/$PX_POP3S") 2>/dev/null || die "pop3connex not listening on $PX_POP3S"
    log "pop3connex: serve pid $PX_PID"
}

# ---------------------------------------------------------------------------------------------
pop3s_port() { if [[ $1 == dovecot ]]; then echo "$DV_POP3S"; else echo "$PX_POP3S"; fi; }
lmtp_port() { if [[ $1 == dovecot ]]; then echo "$DV_LMTP"; else echo "$PX_LMTP"; fi; }
server_pid() { if [[ $1 == dovecot ]]; then echo "$DV_PID"; else echo "$PX_PID"; fi; }

# run_bench SERVER TAG -- bench args...: runs the load tool, keeps its RESULT line.
run_bench() {
    local server=$1 tag=$2
    shift 3
    local out=$RES/$tag.$server.out err=$RES/$tag.$server.err
    "$BENCH" "$@" --server-pid "$(server_pid "$server")" >"$out" 2>"$err" || {
        tail -n 20 "$err" >&2
        die "$tag on $server failed"
    }
    local line
    line=$(grep '^RESULT ' "$out" | tail -n 1)
    [[ -n $line ]] || die "$tag on $server: no RESULT"
    printf '%s\t%s\t%s\n' "$tag" "$server" "$line" >>"$RES/results.tsv"
    log "$tag $server: $(field rate "$line")$(field pss_per_session_kib "$line") errors=$(field errors "$line")"
    grep -q 'error x' "$err" && sed -n 's/^/    /p' "$err" | grep 'error x' | head -n 5 >&2
    return 0
}
field() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<<"$2"; }

load_corpus() { # server
    local s=$1 port
    port=$(lmtp_port "$s")
    log "$s: delivering corpus over LMTP ($((USERS * MSGS)) + $((IDLE_SESSIONS * IDLE_MSGS)) deliveries)"
    run_bench "$s" load-users -- lmtp --addr "127.0.0.1:$port" --recipients-file "$WORK/accounts/users.rcpt" \
        --corpus "$WORK/corpus" --count $((USERS * MSGS)) --concurrency 4 --max-duration 300
    run_bench "$s" load-idle -- lmtp --addr "127.0.0.1:$port" --recipients-file "$WORK/accounts/idle.rcpt" \
        --corpus "$WORK/corpus-idle" --rcpts-per-msg "$IDLE_K" \
        --count $((IDLE_SESSIONS * IDLE_MSGS / IDLE_K)) --concurrency 4 --max-duration 300
    for tag in load-users load-idle; do
        [[ $(field errors "$(grep "^$tag	$s	" "$RES/results.tsv")") == 0 ]] || die "$s: corpus delivery errors"
    done
    log "$s: priming + verifying every mailbox (one full session per user)"
    run_bench "$s" verify-users -- pop3s-sessions --addr "127.0.0.1:$(pop3s_port "$s")" --ca "$TLS/ca.pem" \
        --users-file "$WORK/accounts/users.txt" --concurrency 8 --once --expect-messages "$MSGS"
    run_bench "$s" verify-idle -- pop3s-sessions --addr "127.0.0.1:$(pop3s_port "$s")" --ca "$TLS/ca.pem" \
        --users-file "$WORK/accounts/idle.txt" --concurrency 8 --once --expect-messages "$IDLE_MSGS"
    for tag in verify-users verify-idle; do
        [[ $(field errors "$(grep "^$tag	$s	" "$RES/results.tsv")") == 0 ]] || die "$s: mailbox verification errors"
    done
}

# One measurement of one metric on one server.
# Result tags are "${TAG_PREFIX}METRIC.rROUND".
TAG_PREFIX=""
USERS_FILE=$WORK/accounts/users.txt
measure() { # metric server round
    local m=$1 s=$2 r=$3 addr tag=$TAG_PREFIX$1.r$3
    addr=127.0.0.1:$(pop3s_port "$s")
    case $m in
    sessions-*)
        run_bench "$s" "$tag" -- pop3s-sessions --addr "$addr" --ca "$TLS/ca.pem" \
            --users-file "$USERS_FILE" --concurrency "${m#sessions-}" \
            --duration "$DURATION" --warmup "$WARMUP" --expect-messages "$MSGS"
        ;;
    logins)
        run_bench "$s" "$tag" -- logins --addr "$addr" --ca "$TLS/ca.pem" \
            --users-file "$USERS_FILE" --concurrency "$LOGIN_CONCURRENCY" \
            --duration "$DURATION" --warmup "$WARMUP"
        ;;
    lmtp)
        run_bench "$s" "$tag" -- lmtp --addr "127.0.0.1:$(lmtp_port "$s")" \
            --recipients-file "$WORK/accounts/sinks.rcpt" --corpus "$WORK/corpus" --count "$LMTP_COUNT" \
            --concurrency "$LMTP_CONCURRENCY" --msgs-per-conn "$LMTP_PER_CONN" --max-duration 120
        ;;
    idle)
        measure_idle "$s" "$r"
        ;;
    esac
}

measure_idle() { # server round
    local s=$1 r=$2 out=$RES/idle.r$2.$1.out err=$RES/idle.r$2.$1.err line
    # Fresh server for every idle measurement: a long-running single process keeps the heap it
    # grew during earlier load (and the previous idle round) and would show almost no growth.
    # A few logins after the restart put lazily initialised state into the baseline.
    if [[ $s == dovecot ]]; then stop_dovecot; start_dovecot; else stop_pop3connex; start_pop3connex; fi
    "$BENCH" logins --addr "127.0.0.1:$(pop3s_port "$s")" --ca "$TLS/ca.pem" \
        --users-file "$WORK/accounts/users.txt" --concurrency 8 --once >/dev/null 2>"$err.warm" ||
        die "idle warm-up logins on $s failed"
    sleep 2
    : >"$out"
    "$BENCH" idle --addr "127.0.0.1:$(pop3s_port "$s")" --ca "$TLS/ca.pem" \
        --users-file "$WORK/accounts/idle.txt" --sessions "$IDLE_SESSIONS" --connect-concurrency 16 \
        --settle 3 --hold 240 --timeout 60 --server-pid "$(server_pid "$s")" >"$out" 2>"$err" &
    IDLE_PID=$!
    for _ in $(seq 2400); do
        grep -qs '^RESULT ' "$out" && break
        kill -0 "$IDLE_PID" 2>/dev/null || break
        sleep 0.1
    done
    line=$(grep '^RESULT ' "$out" | tail -n 1 || true)
    kill -TERM "$IDLE_PID" 2>/dev/null || true
    wait "$IDLE_PID" || true
    IDLE_PID=""
    [[ -n $line ]] || { tail -n 20 "$err" >&2; die "idle on $s: no RESULT"; }
    printf '%s\t%s\t%s\n' "idle.r$r" "$s" "$line" >>"$RES/results.tsv"
    log "idle.r$r $s: sessions=$(field sessions "$line") failed=$(field failed "$line") pss/session=$(field pss_per_session_kib "$line") KiB rss/session=$(field rss_per_session_kib "$line") KiB"
    grep 'error x' "$err" | head -n 5 >&2 || true
    # Let the server reap the closed sessions before the next measurement.
    sleep 3
}

# ---------------------------------------------------------------------------------------------
if has_server dovecot; then
    setup_dovecot
    start_dovecot
    load_corpus dovecot
fi
if has_server pop3connex; then
    mkdir -p "$PXD"
    setup_pop3connex
    start_pop3connex
    load_corpus pop3connex
fi

# ---------------------------------------------------------------------------------------------
# Auth phase, part 1 (before any Argon2id change, so POP3conneX still has the SHA512-CRYPT users).
attack_bg() { # server round: brute-force attacker from $ATTACK_SOURCE in the background
    local s=$1 r=$2
    "$BENCH" attack --addr "127.0.0.1:$(pop3s_port "$s")" --ca "$TLS/ca.pem" --source "$ATTACK_SOURCE" \
        --users-file "$WORK/accounts/sinks.txt" --auth user --attempts "$ATTACK_ATTEMPTS" \
        --concurrency "$ATTACK_CONCURRENCY" --per-conn "$ATTACK_PER_CONN" --timeout 10 \
        --max-duration $((WARMUP + DURATION + 3)) >"$RES/auth-attacker.r$r.$s.out" 2>"$RES/auth-attacker.r$r.$s.err" &
    ATTACK_PID=$!
}
attack_end() { # server round
    local s=$1 r=$2 line
    wait "$ATTACK_PID" || log "attacker on $s exited with an error: $(tail -n 3 "$RES/auth-attacker.r$r.$s.err")"
    ATTACK_PID=""
    line=$(grep '^RESULT ' "$RES/auth-attacker.r$r.$s.out" | tail -n 1 || true)
    [[ -n $line ]] || die "attacker on $s: no RESULT"
    printf '%s\t%s\t%s\n' "auth-attacker.r$r" "$s" "$line" >>"$RES/results.tsv"
    log "auth-attacker.r$r $s: attempts=$(field attempts "$line") answered=$(field answered "$line") refused_conns=$(field conns_refused "$line") dropped=$(field conns_dropped "$line") accepted=$(field accepted "$line")"
    grep 'attacker error' "$RES/auth-attacker.r$r.$s.err" | head -n 4 >&2 || true
}
auth_phase_sha() {
    local s r addr
    for ((r = 1; r <= ROUNDS; r++)); do
        for s in $SERVERS; do
            addr=127.0.0.1:$(pop3s_port "$s")
            run_bench "$s" "auth-scram.r$r" -- logins --addr "$addr" --ca "$TLS/ca.pem" \
                --users-file "$WORK/accounts/scram.txt" --mech scram-sha-256 --concurrency "$LOGIN_CONCURRENCY" \
                --duration "$DURATION" --warmup "$WARMUP"
        done
    done
    if has_server dovecot; then
        for ((r = 1; r <= ROUNDS; r++)); do
            run_bench dovecot "auth-plain-sha512.r$r" -- logins --addr "127.0.0.1:$DV_POP3S" --ca "$TLS/ca.pem" \
                --users-file "$WORK/accounts/users.txt" --auth plain --concurrency "$LOGIN_CONCURRENCY" \
                --duration "$DURATION" --warmup "$WARMUP"
        done
    fi
    for ((r = 1; r <= ROUNDS; r++)); do
        for s in $SERVERS; do
            # Fresh server per flood round: no ban, failure counter or auth penalty left from an
            # earlier round (POP3conneX keeps bans in its store, so remove the attacker's ban first).
            if [[ $s == pop3connex ]]; then
                stop_pop3connex
                px ban remove "$ATTACK_SOURCE" >/dev/null 2>&1 || px ban remove "$ATTACK_SOURCE/32" >/dev/null 2>&1 || true
                start_pop3connex
            else
                stop_dovecot
                start_dovecot
            fi
            TAG_PREFIX=auth-flood-base- measure "sessions-$FLOOD_CONCURRENCY" "$s" "$r"
            attack_bg "$s" "$r"
            sleep 1
            TAG_PREFIX=auth-flood-attack- measure "sessions-$FLOOD_CONCURRENCY" "$s" "$r"
            attack_end "$s" "$r"
        done
    done
}

# Auth phase, part 2: POP3conneX PLAIN logins at its production Argon2id parameters.
auth_phase_argon2() {
    local name pw r
    stop_pop3connex
    write_px_config argon2id 0
    px config check || die "pop3connex config check failed (argon2id)"
    if [[ ! -s $WORK/accounts/users-argon2.txt ]]; then
        log "pop3connex: new passwords for the $USERS corpus users, hashed with argon2id"
        gen_accounts user "$USERS" 4 >"$WORK/accounts/users-argon2.txt"
        chmod 600 "$WORK/accounts/users-argon2.txt"
        while IFS=: read -r name pw; do
            printf '%s\n' "$pw" | px user passwd "$name" --password-stdin >/dev/null 2>>"$PXD/passwd.err" ||
                die "pop3connex user passwd $name failed: $(tail -n 2 "$PXD/passwd.err")"
        done <"$WORK/accounts/users-argon2.txt"
    fi
    log "pop3connex: argon2id PLAIN logins, credential_cache_secs = 0 (cold)"
    start_pop3connex
    for ((r = 1; r <= ROUNDS; r++)); do
        run_bench pop3connex "auth-argon2-cold.r$r" -- logins --addr "127.0.0.1:$PX_POP3S" --ca "$TLS/ca.pem" \
            --users-file "$WORK/accounts/users-argon2.txt" --auth plain --concurrency "$LOGIN_CONCURRENCY" \
            --duration "$DURATION" --warmup "$WARMUP"
    done
    log "pop3connex: argon2id PLAIN logins, credential_cache_secs = 300 (default), warm"
    stop_pop3connex
    write_px_config argon2id 300
    start_pop3connex
    run_bench pop3connex auth-argon2-warmup -- logins --addr "127.0.0.1:$PX_POP3S" --ca "$TLS/ca.pem" \
        --users-file "$WORK/accounts/users-argon2.txt" --auth plain --concurrency "$LOGIN_CONCURRENCY" --once
    for ((r = 1; r <= ROUNDS; r++)); do
        run_bench pop3connex "auth-argon2-warm.r$r" -- logins --addr "127.0.0.1:$PX_POP3S" --ca "$TLS/ca.pem" \
            --users-file "$WORK/accounts/users-argon2.txt" --auth plain --concurrency "$LOGIN_CONCURRENCY" \
            --duration "$DURATION" --warmup "$WARMUP"
    done
}

if has_phase main; then
METRICS=""
for c in $CONCURRENCIES; do METRICS+="sessions-$c "; done
METRICS+="logins lmtp idle"
for m in $METRICS; do
    for ((r = 1; r <= ROUNDS; r++)); do
        for s in $SERVERS; do measure "$m" "$s" "$r"; done
    done
done
fi

has_phase auth && auth_phase_sha

if has_phase main && has_server pop3connex && [[ $ARGON2 == 1 ]]; then
    # The password history policy refuses re-setting the same password: new passwords.
    log "pop3connex: new passwords for the $USERS corpus users, hashed with the default scheme (argon2id)"
    stop_pop3connex
    write_px_config argon2id 0
    px config check || die "pop3connex config check failed (argon2id)"
    gen_accounts user "$USERS" 4 >"$WORK/accounts/users-argon2.txt"
    chmod 600 "$WORK/accounts/users-argon2.txt"
    while IFS=: read -r name pw; do
        printf '%s\n' "$pw" | px user passwd "$name" --password-stdin >/dev/null 2>>"$PXD/passwd.err" ||
            die "pop3connex user passwd $name failed: $(tail -n 2 "$PXD/passwd.err")"
    done <"$WORK/accounts/users-argon2.txt"
    USERS_FILE=$WORK/accounts/users-argon2.txt
    start_pop3connex
    for m in $ARGON2_METRICS; do
        for ((r = 1; r <= ROUNDS; r++)); do
            TAG_PREFIX=argon2- measure "$m" pop3connex "$r"
        done
    done
    if [[ -n $ARGON2_CACHED_METRICS ]]; then
        log "pop3connex: argon2id with the default verified-credential cache"
        stop_pop3connex
        write_px_config argon2id 300
        start_pop3connex
        for m in $ARGON2_CACHED_METRICS; do
            for ((r = 1; r <= ROUNDS; r++)); do
                TAG_PREFIX=argon2cache- measure "$m" pop3connex "$r"
            done
        done
    fi
    USERS_FILE=$WORK/accounts/users.txt
fi

if has_phase auth && has_server pop3connex; then auth_phase_argon2; fi

# Telemetry phase: the same POP3S sessions and LMTP deliveries with every telemetry consumer off,
# then on (the order alternates per round), the server restarted for each; a scraper reads
# /metrics every 5 s while telemetry is on, as Prometheus would.
telemetry_phase() {
    local r mode scraper rx
    head -c 32 /dev/urandom | base64 >"$PXD/webhook.secret"
    chmod 600 "$PXD/webhook.secret"
    python3 "$ROOT/bench/telemetry-receivers.py" "$TLS/cert.pem" "$TLS/key.pem" "$TEL_SYSLOG" "$TEL_WEBHOOK" \
        >"$RES/telemetry-receivers.out" 2>&1 &
    rx=$!
    sleep 1
    for ((r = 1; r <= TEL_ROUNDS; r++)); do
        for mode in $(if ((r % 2)); then echo off on; else echo on off; fi); do
            stop_pop3connex
            TELEMETRY=$mode write_px_config sha512-crypt 0
            px config check >/dev/null || die "pop3connex config check failed (telemetry $mode)"
            start_pop3connex
            scraper=""
            if [[ $mode == on ]]; then
                (while sleep 5; do curl -fsS "http://127.0.0.1:$TEL_METRICS/metrics" >/dev/null || true; done) &
                scraper=$!
            fi
            TAG_PREFIX=tel-$mode- measure sessions-8 pop3connex "$r"
            LMTP_COUNT=$TEL_LMTP_COUNT TAG_PREFIX=tel-$mode- measure lmtp pop3connex "$r"
            [[ -z $scraper ]] || { kill "$scraper" 2>/dev/null; wait "$scraper" 2>/dev/null || true; }
        done
    done
    stop_pop3connex
    kill -TERM "$rx" 2>/dev/null || true
    wait "$rx" 2>/dev/null || true
    log "receivers: $(grep RECEIVERS "$RES/telemetry-receivers.out" || echo 'no counts')"
    log "events in the JSON sink: $(wc -l <"$PXD/events.json" 2>/dev/null || echo 0)"
}
if has_phase telemetry; then telemetry_phase; fi

cleanup
BG_AFTER=$(busy_pct 5)
log "measurements done (background CPU busy after: $BG_AFTER%); writing report"
T_END=$(date +%s)
export ROOT WORK RES OUT SERVERS USERS MSGS SIZE DURATION WARMUP ROUNDS CONCURRENCIES LOGIN_CONCURRENCY \
    IDLE_SESSIONS IDLE_MSGS LMTP_COUNT LMTP_CONCURRENCY LMTP_PER_CONN LMTP_SINKS ARGON2 ARGON2_METRICS ARGON2_CACHED_METRICS CMDLINE \
    BG_BEFORE BG_AFTER PHASES SCRAM_USERS FLOOD_CONCURRENCY ATTACK_ATTEMPTS ATTACK_CONCURRENCY ATTACK_PER_CONN \
    ATTACK_SOURCE
export ELAPSED=$((T_END - T_RUN)) WAITED=$((T_RUN - T_START))
if [[ $PHASES == telemetry ]]; then
    TEL_ROUNDS=$TEL_ROUNDS TEL_LMTP_COUNT=$TEL_LMTP_COUNT python3 "$ROOT/bench/telemetry-report.py" \
        "$RES/results.tsv" "$RES/telemetry-receivers.out" >"$WORK/telemetry-section.md"
    splice_section "$OUT" "Telemetry overhead" "$WORK/telemetry-section.md"
    log "wrote the Telemetry overhead section of $OUT"
    log "total $((T_END - T_START)) s"
    exit 0
fi
if [[ " $SERVERS " == *" pop3connex "* && " $SERVERS " == *" dovecot "* ]] && ! has_phase main; then
    # Only the auth phases ran: replace (or add) the Authentication section of OUT, keep the rest.
    AUTH_ONLY=1 "$ROOT/bench/report.sh" >"$WORK/auth-section.md"
    splice_section "$OUT" Authentication "$WORK/auth-section.md"
    log "wrote the Authentication section of $OUT"
elif [[ " $SERVERS " == *" pop3connex "* && " $SERVERS " == *" dovecot "* ]]; then
    # The connector section comes from bench/connector.sh and the memory section from
    # bench/memory.sh: keep the ones already in OUT.
    extract_section "$OUT" Connector >"$WORK/connector-section.md"
    extract_section "$OUT" Memory >"$WORK/memory-section.md"
    "$ROOT/bench/report.sh" >"$OUT"
    for sec in Connector Memory; do
        f="$WORK/$(tr '[:upper:]' '[:lower:]' <<<"$sec")-section.md"
        if [[ -s $f ]]; then
            printf '\n' >>"$f"
            splice_section "$OUT" "$sec" "$f"
        fi
    done
    log "wrote $OUT"
else
    "$ROOT/bench/report.sh" >"$WORK/BENCHMARKS-partial.md"
    log "wrote $WORK/BENCHMARKS-partial.md (partial run: docs/BENCHMARKS.md left alone)"
fi
log "total $((T_END - T_START)) s"
if has_phase connector; then
    log "connector phase: bench/connector.sh"
    WORK=$WORK/connector OUT=$OUT "$ROOT/bench/connector.sh"
fi
exit 0
}
