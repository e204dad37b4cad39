#!/usr/bin/env bash
# POP3conneX connector vs fetchmail: messages per second fetched from the same Dovecot upstream,
# loopback only, with TLS certificate verification on for both.
#
#   bench/connector.sh                 # or: PHASES=connector bench/run.sh
#
# Knobs (environment): CONN_ACCOUNTS=20 CONN_MSGS=100 CONN_SINGLE_MSGS=1000 CONN_ROUNDS=5
#   CONN_SIZES="3000 6000 12000 24000 48000 96000" (message i has size number i mod 6)
#   CONN_CONFIGS="seq par4 single" CONN_PAR=4 CONN_SIDES="pop3connex fetchmail-unix fetchmail" WAIT_QUIET=0 WORK=bench/work/connector OUT=docs/BENCHMARKS.md
#
# Configurations, each timed for every side in every round (order reversed in even rounds):
#   seq     CONN_ACCOUNTS mailboxes x CONN_MSGS messages; one mailbox at a time on every side
#           (POP3conneX [connector] max_concurrent = 1; one fetchmail process, which polls in sequence)
#   par4    the same mailboxes, CONN_PAR at a time on every side (max_concurrent = CONN_PAR;
#           CONN_PAR fetchmail processes, each with its own rcfile holding a share of the mailboxes)
#   single  one mailbox x CONN_SINGLE_MSGS messages
# Upstream: a private Dovecot (POP3 with implicit TLS, certificate from a test CA made here,
# passwd-file with SHA512-CRYPT, auth_mechanisms = plain), filled over its LMTP before every timed
# fetch with the same deterministic corpus for every side. POP3conneX delivers into its own store
# (`connector run-once`); fetchmail delivers over LMTP into a second private Dovecot (the sink),
# as side "fetchmail-unix" over the sink's LMTP UNIX socket and as side "fetchmail" over TCP
# (127.0.0.1/PORT).
# Every fetch is verified: upstream empty afterwards, every local mailbox grew by exactly what was
# upstream, POP3conneX reports no duplicate, quarantined, skipped or deferred message.
# Only the "## Connector" section of OUT is replaced. Needs root (Dovecot, apt-get if missing).
set -euo pipefail

# One brace group: bash parses all of it before running, so editing the file mid-run is safe.
{
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
T_START=$(date +%s)
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"

CONN_ACCOUNTS=${CONN_ACCOUNTS:-20}
CONN_MSGS=${CONN_MSGS:-100}
CONN_SINGLE_MSGS=${CONN_SINGLE_MSGS:-1000}
CONN_ROUNDS=${CONN_ROUNDS:-5}
CONN_SIZES=${CONN_SIZES:-3000 6000 12000 24000 48000 96000}
CONN_CONFIGS=${CONN_CONFIGS:-seq par4 single}
CONN_PAR=${CONN_PAR:-4}
CONN_SIDES=${CONN_SIDES:-pop3connex fetchmail-unix fetchmail}
WORK=${WORK:-$ROOT/bench/work/connector}
OUT=${OUT:-$ROOT/docs/BENCHMARKS.md}
CMDLINE=${CMDLINE:-bench/connector.sh}

UP_POP3S=${UP_POP3S:-29995}
UP_LMTP=${UP_LMTP:-29024}
SINK_LMTP=${SINK_LMTP:-29124}

BENCH=$ROOT/target/release/pop3connex-bench
PX=$ROOT/target/release/pop3connex
UP=$WORK/upstream
SINK=$WORK/sink
PXD=$WORK/pop3connex
FM=$WORK/fetchmail
RES=$WORK/results
TSV=$RES/connector.tsv

[[ $(id -u) == 0 ]] || die "run as root (private Dovecot instances, apt-get)"
[[ $CONN_ACCOUNTS -ge $CONN_PAR && $CONN_PAR -ge 1 && $CONN_MSGS -ge 1 && $CONN_SINGLE_MSGS -ge 1 ]] ||
    die "bad CONN_ACCOUNTS/CONN_PAR/CONN_MSGS/CONN_SINGLE_MSGS"

UP_PID=""
SINK_PID=""
cleanup() {
    stop_dovecot_master "$UP_PID"
    stop_dovecot_master "$SINK_PID"
    UP_PID="" SINK_PID=""
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log "preflight"
ensure_packages dovecot-core dovecot-pop3d dovecot-lmtpd fetchmail openssl
assert_ports_free "$UP_POP3S" "$UP_LMTP" "$SINK_LMTP"
wait_quiet

log "building (release)"
cd "$ROOT"
cargo build --release -p pop3connex -p pop3connex-bench 2>&1 | tail -n 3 >&2
[[ -x $PX && -x $BENCH ]] || die "release binaries missing"

rm -rf "$WORK"
mkdir -p "$WORK" "$RES" "$WORK/accounts" "$WORK/secrets"
chmod 755 "$WORK"
chmod 700 "$WORK/secrets"
: >"$TSV"

log "TLS: test CA + leaf certificate (localhost, 127.0.0.1)"
TLS=$WORK/tls
make_test_pki "$TLS"

# Upstream mailboxes: up0001.. (seq, par4) and solo (single). Local users on the POP3conneX side
# (lu*, lsolo) and on the fetchmail side (dst*, dsolo) map 1:1 to them.
gen_accounts up "$CONN_ACCOUNTS" 4 >"$WORK/accounts/up.txt"
printf 'solo:pw-%s\n' "$(openssl rand -hex 10)" >>"$WORK/accounts/up.txt"
MULTI=$(head -n "$CONN_ACCOUNTS" "$WORK/accounts/up.txt" | cut -d: -f1 | tr '\n' ' ')
local_of() { if [[ $1 == solo ]]; then echo "$2solo"; else echo "$2${1#up}"; fi; } # upstream prefix
cut -d: -f1 "$WORK/accounts/up.txt" | while read -r u; do printf '%s:pw-%s\n' "$(local_of "$u" dst)" "$(openssl rand -hex 10)"; done >"$WORK/accounts/sink.txt"
cut -d: -f1 "$WORK/accounts/up.txt" | while read -r u; do printf '%s:pw-%s\n' "$(local_of "$u" lu)" "$(openssl rand -hex 10)"; done >"$WORK/accounts/px.txt"
chmod 600 "$WORK"/accounts/*

# ---------------------------------------------------------------------------------------------
write_dovecot_conf() { # dir instance_name accounts_file
    local d=$1
    mkdir -p "$d/run" "$d/state" "$d/log" "$d/mail"
    chown nobody:nogroup "$d/mail"
    dovecot_passwd "$3" "$d/mail" >"$d/passwd"
    chown root:dovecot "$d/passwd"
    chmod 640 "$d/passwd"
    cat >"$d/dovecot.conf" <<EOF
# Generated by bench/connector.sh: private Dovecot instance, loopback only. Built-in defaults
# otherwise (mail_fsync = optimized: fsync before a delivery is acknowledged).
base_dir = $d/run
state_dir = $d/state
instance_name = $2
listen = 127.0.0.1
log_path = $d/log/dovecot.log
auth_username_format = %Ln
passdb {
  driver = passwd-file
  args = scheme=SHA512-CRYPT username_format=%n $d/passwd
}
userdb {
  driver = passwd-file
  args = username_format=%n $d/passwd
}
mail_location = maildir:~/Maildir
first_valid_uid = 500
EOF
}

log "dovecot: upstream instance (POP3S :$UP_POP3S, LMTP :$UP_LMTP for filling)"
write_dovecot_conf "$UP" conn-upstream "$WORK/accounts/up.txt"
cat >>"$UP/dovecot.conf" <<EOF
protocols = pop3 lmtp
ssl = required
ssl_cert = <$TLS/cert.pem
ssl_key = <$TLS/key.pem
disable_plaintext_auth = yes
auth_mechanisms = plain
service pop3-login {
  inet_listener pop3 {
    port = 0
  }
  inet_listener pop3s {
    address = 127.0.0.1
    port = $UP_POP3S
    ssl = yes
  }
}
service lmtp {
  inet_listener lmtp {
    address = 127.0.0.1
    port = $UP_LMTP
  }
}
EOF
log "dovecot: sink instance for fetchmail (LMTP :$SINK_LMTP)"
write_dovecot_conf "$SINK" conn-sink "$WORK/accounts/sink.txt"
cat >>"$SINK/dovecot.conf" <<EOF
protocols = lmtp
ssl = no
service lmtp {
  inet_listener lmtp {
    address = 127.0.0.1
    port = $SINK_LMTP
  }
}
EOF
for d in "$UP" "$SINK"; do
    doveconf -c "$d/dovecot.conf" -n >"$d/doveconf-n.txt" 2>"$d/doveconf.err" || {
        cat "$d/doveconf.err" >&2
        die "dovecot config $d invalid"
    }
done
UP_PID=$(start_dovecot_instance "$UP/dovecot.conf" "$UP/run" "$UP_POP3S")
SINK_PID=$(start_dovecot_instance "$SINK/dovecot.conf" "$SINK/run" "$SINK_LMTP")
log "dovecot: upstream pid $UP_PID, sink pid $SINK_PID"

# name messages vsize, one line per user of a Dovecot instance (INBOX).
dv_status() { # dir
    doveadm -c "$1/dovecot.conf" -f tab mailbox status -A 'messages vsize' INBOX 2>>"$1/doveadm.err" |
        awk -F'\t' 'NR > 1 { print $1, $3, $4 }'
}

# ---------------------------------------------------------------------------------------------
log "pop3connex: init, $(wc -l <"$WORK/accounts/px.txt") local users, $(wc -l <"$WORK/accounts/up.txt") connector accounts"
"$PX" init --data-dir "$PXD" --hostname localhost >"$WORK/pop3connex-init.log" 2>&1 || {
    cat "$WORK/pop3connex-init.log" >&2
    die "pop3connex init failed"
}
MAX_PER_RUN=$((CONN_MSGS > CONN_SINGLE_MSGS ? CONN_MSGS : CONN_SINGLE_MSGS))
write_px_config() { # file max_concurrent
    {
        cat <<EOF
# Generated by bench/connector.sh. Connector defaults except max_concurrent and, per account,
# delete = "after-delivery" and max_messages_per_run (>= the mailbox size, so one run empties it).
[server]
hostname = "localhost"

[store]
backend = "sqlite"
path = "pop3connex.db"
master_key = "file:master.key"

[tls]
certificate = "$TLS/cert.pem"
private_key = "file:$TLS/key.pem"

[log]
format = "human"
level = "warn"

[connector]
enabled = false
max_concurrent = $2
EOF
        local name pw
        while IFS=: read -r name pw; do
            printf '%s\n' "$pw" >"$WORK/secrets/$name"
            chmod 600 "$WORK/secrets/$name"
            cat <<EOF

[[connector.accounts]]
name = "$name"
host = "localhost"
port = $UP_POP3S
tls = "implicit"
ca_file = "$TLS/ca.pem"
user = "$name"
password = "file:$WORK/secrets/$name"
delete = "after-delivery"
max_messages_per_run = $MAX_PER_RUN
route = { deliver_to = { local = "$(local_of "$name" lu)" } }
EOF
        done <"$WORK/accounts/up.txt"
    } >"$1"
}
write_px_config "$PXD/connector-c1.toml" 1
write_px_config "$PXD/connector-c$CONN_PAR.toml" "$CONN_PAR"
"$PX" --config "$PXD/connector-c1.toml" config check >/dev/null || die "pop3connex config check failed"
while IFS=: read -r name pw; do
    printf '%s\n' "$pw" | "$PX" --config "$PXD/connector-c1.toml" user add "$name" --password-stdin >/dev/null 2>>"$WORK/useradd.err" ||
        die "pop3connex user add $name failed: $(tail -n 2 "$WORK/useradd.err")"
done <"$WORK/accounts/px.txt"
px_status() { "$PX" --config "$PXD/connector-c1.toml" user list | awk 'NR > 1 { print $1, $2 }'; }

# ---------------------------------------------------------------------------------------------
# fetchmail: one rcfile per process. Verification on: ssl + sslcertck + sslcertfile (the test CA
# only), name checked against "localhost" (the poll name; it resolves to 127.0.0.1 only).
write_rcfile() { # file smtphost upstream_user...
    local f=$1 smtphost=$2 u pw
    shift 2
    {
        printf 'set no syslog\nset no bouncemail\n\n'
        printf 'poll localhost protocol POP3 service %s timeout 60\n' "$UP_POP3S"
        for u in "$@"; do
            pw=$(awk -F: -v u="$u" '$1 == u { sub(/^[^:]*:/, ""); print }' "$WORK/accounts/up.txt")
            printf '  user "%s" there with password "%s" is "%s" here\n' "$u" "$pw" "$(local_of "$u" dst)"
            printf '    ssl sslcertck sslcertfile "%s"\n' "$TLS/ca.pem"
            printf '    fetchall nokeep\n'
            printf '    lmtp smtphost "%s" smtpaddress localhost\n' "$smtphost"
        done
    } >"$f"
    chmod 600 "$f"
}
# fetchmail (TCP): smtphost 127.0.0.1/PORT; fetchmail-unix: the sink's LMTP UNIX socket.
[[ -S $SINK/run/lmtp ]] || die "no LMTP UNIX socket $SINK/run/lmtp"
read -r -a MULTI_ARR <<<"$MULTI"
for side in fetchmail fetchmail-unix; do
    dir=$FM/$side
    mkdir -p "$dir"
    chmod 700 "$FM" "$dir"
    host=127.0.0.1/$SINK_LMTP
    [[ $side == fetchmail-unix ]] && host=$SINK/run/lmtp
    # shellcheck disable=SC2086
    write_rcfile "$dir/seq.rc" "$host" $MULTI
    for ((p = 0; p < CONN_PAR; p++)); do
        slice=()
        for ((i = p; i < CONN_ACCOUNTS; i += CONN_PAR)); do slice+=("${MULTI_ARR[$i]}"); done
        write_rcfile "$dir/par$CONN_PAR-$p.rc" "$host" "${slice[@]}"
    done
    write_rcfile "$dir/single.rc" "$host" solo
done
FETCHMAIL_VER=$(fetchmail --version 2>/dev/null | head -n 1 || true)

# ---------------------------------------------------------------------------------------------
# Corpus of COUNT messages for round SEED: message i has size number (i mod #SIZES) of CONN_SIZES,
# text/plain from `pop3connex-bench corpus` (deterministic; Message-IDs unique per round).
read -r -a SIZES_ARR <<<"$CONN_SIZES"
NS=${#SIZES_ARR[@]}
make_corpus() { # dir count seed
    local dir=$1 count=$2 seed=$3 b n j
    rm -rf "$dir" "$dir.tmp"
    mkdir -p "$dir"
    for ((b = 0; b < NS; b++)); do
        n=$(((count - b + NS - 1) / NS))
        ((n > 0)) || continue
        "$BENCH" corpus --out "$dir.tmp" --count "$n" --size "${SIZES_ARR[$b]}" --seed $((seed * 100 + b)) >/dev/null 2>&1 ||
            die "corpus generation failed"
        for ((j = 0; j < n; j++)); do
            mv "$dir.tmp/$(printf 'msg-%05d.eml' "$j")" "$dir/$(printf 'msg-%05d.eml' $((j * NS + b)))"
        done
        rm -rf "$dir.tmp"
    done
}

# Fills the upstream mailboxes USERS with every message of CORPUS (each user gets each file once),
# then checks that each holds exactly that many messages and the others are empty. Prints the
# total POP3 size (vsize, octets as RETR sends them).
fill_upstream() { # corpus users...
    local corpus=$1 files rc="$WORK/fill.rcpt"
    shift
    files=$(find "$corpus" -name '*.eml' | wc -l)
    printf '%s@localhost\n' "$@" >"$rc"
    "$BENCH" lmtp --addr "127.0.0.1:$UP_LMTP" --recipients-file "$rc" --corpus "$corpus" \
        --count $((files * $#)) --concurrency 4 --msgs-per-conn 100 --max-duration 600 \
        >"$WORK/fill.out" 2>"$WORK/fill.err" || { tail -n 5 "$WORK/fill.err" >&2; die "upstream fill failed"; }
    grep -q '^RESULT .* errors=0 ' "$WORK/fill.out" || die "upstream fill had errors: $(cat "$WORK/fill.out")"
    dv_status "$UP" >"$WORK/up.status"
    awk -v want="$files" -v users=" $* " '
        { expect = (index(users, " " $1 " ") ? want : 0); if ($2 != expect) { print "upstream " $1 " holds " $2 " messages, expected " expect > "/dev/stderr"; bad = 1 } }
        expect { octets += $3; n++ }
        END { if (bad || n != split(users, x, " ")) exit 1; print octets }' "$WORK/up.status" ||
        die "upstream mailboxes not as expected after the fill"
}

assert_upstream_empty() {
    dv_status "$UP" >"$WORK/up.status"
    awk '$2 != 0 { print "upstream " $1 " still holds " $2 " messages" > "/dev/stderr"; bad = 1 } END { exit bad }' "$WORK/up.status" ||
        die "upstream not empty after the fetch"
}

# before after users_prefix_map per_user -> checks that every local mailbox of USERS grew by PER.
assert_grew() { # before_file after_file per_user local_prefix users...
    local before=$1 after=$2 per=$3 prefix=$4
    shift 4
    local want
    want=$(for u in "$@"; do local_of "$u" "$prefix"; done | tr '\n' ' ')
    awk -v per="$per" -v want=" $want " '
        NR == FNR { b[$1] = $2; next }
        index(want, " " $1 " ") { n++; d = $2 - b[$1]; if (d != per) { print $1 " grew by " d ", expected " per > "/dev/stderr"; bad = 1 } }
        END { exit (bad || n != split(want, x, " ")) }' "$before" "$after"
}

cpu_busy_s() { awk -v hz="$(getconf CLK_TCK)" '/^cpu / { printf "%.2f\n", ($2 + $3 + $4 + $7 + $8 + $9) / hz }' /proc/stat; }
tree_cpu() { "$BENCH" proc --pid "$1" | sed -n 's/.* cpu_s=\([^ ]*\).*/\1/p'; }
now() { date +%s.%N; }

# Runs one timed fetch and records a line in TSV:
# tag side messages octets wall_s client_cpu_s upstream_cpu_s sink_cpu_s machine_busy_s
TIMEFORMAT='TIME %3R %3U %3S'
timed_fetch() { # tag side config expected_msgs octets users...
    local tag=$1 side=$2 cfg=$3 expect=$4 octets=$5
    shift 5
    local out=$RES/$tag.$side.out err=$RES/$tag.$side.err tf=$RES/$tag.$side.time
    local up0 up1 sk0 sk1 busy0 busy1 before=$WORK/before.$side after=$WORK/after.$side
    if [[ $side == pop3connex ]]; then px_status >"$before"; else dv_status "$SINK" | awk '{ print $1, $2 }' >"$before"; fi
    sync
    up0=$(tree_cpu "$UP_PID")
    sk0=$(tree_cpu "$SINK_PID")
    busy0=$(cpu_busy_s)
    if [[ $side == pop3connex ]]; then
        local conf=$PXD/connector-c1.toml
        [[ $cfg == par* ]] && conf=$PXD/connector-c$CONN_PAR.toml
        { time "$PX" --config "$conf" connector run-once "$@" >"$out" 2>"$err"; } 2>"$tf" ||
            { tail -n 5 "$err" >&2; die "$tag: pop3connex connector run-once failed"; }
    else
        local rcs=("$FM/$side/$cfg.rc")
        [[ $cfg == par* ]] && rcs=("$FM/$side/$cfg"-*.rc)
        { time (
            pids=() rc=0
            for f in "${rcs[@]}"; do
                mkdir -p "$f.home"
                FETCHMAILHOME=$f.home fetchmail -f "$f" --nosyslog --pidfile "$f.home/fetchmail.pid" >"$f.out" 2>&1 &
                pids+=($!)
            done
            for p in "${pids[@]}"; do wait "$p" || rc=$?; done
            exit "$rc"
        ); } 2>"$tf" || {
            cat "${rcs[@]/%/.out}" >"$out"
            tail -n 20 "$out" >&2
            die "$tag: fetchmail failed"
        }
        cat "${rcs[@]/%/.out}" >"$out"
    fi
    busy1=$(cpu_busy_s)
    up1=$(tree_cpu "$UP_PID")
    sk1=$(tree_cpu "$SINK_PID")
    # Verification: upstream empty, every local mailbox grew by its upstream count.
    assert_upstream_empty
    local per=$((expect / $#))
    if [[ $side == pop3connex ]]; then
        px_status >"$after"
        assert_grew "$before" "$after" "$per" lu "$@" || die "$tag: POP3conneX local mailboxes not as expected"
        awk -v want="$expect" '
            { for (i = 1; i <= NF; i++) { split($i, p, "="); if (p[1] != "account") s[p[1]] += p[2] } n++ }
            END {
                if (s["fetched"] != want || s["delivered"] != want || s["deleted"] != want || s["duplicates"] + s["quarantined"] + s["skipped"] + s["deferred"] + s["forwarded"] != 0) {
                    print "run-once counters: fetched=" s["fetched"] " delivered=" s["delivered"] " deleted=" s["deleted"] " duplicates=" s["duplicates"] " quarantined=" s["quarantined"] " skipped=" s["skipped"] " deferred=" s["deferred"] > "/dev/stderr"; exit 1 }
                print s["octets"] }' "$out" >"$RES/$tag.$side.octets" || die "$tag: run-once counters not as expected"
        [[ $(cat "$RES/$tag.$side.octets") == "$octets" ]] ||
            log "note: run-once counted $(cat "$RES/$tag.$side.octets") octets, upstream vsize was $octets"
    else
        dv_status "$SINK" | awk '{ print $1, $2 }' >"$after"
        assert_grew "$before" "$after" "$per" dst "$@" || die "$tag: fetchmail sink mailboxes not as expected"
    fi
    local wall ucpu scpu
    read -r _ wall ucpu scpu < <(grep '^TIME ' "$tf" | tail -n 1)
    printf '%s\t%s\tmessages=%s octets=%s wall_s=%s client_cpu_s=%s upstream_cpu_s=%s sink_cpu_s=%s machine_busy_s=%s accounts=%s\n' \
        "$tag" "$side" "$expect" "$octets" "$wall" \
        "$(awk -v a="$ucpu" -v b="$scpu" 'BEGIN { printf "%.3f", a + b }')" \
        "$(awk -v a="$up0" -v b="$up1" 'BEGIN { printf "%.2f", b - a }')" \
        "$(awk -v a="$sk0" -v b="$sk1" 'BEGIN { printf "%.2f", b - a }')" \
        "$(awk -v a="$busy0" -v b="$busy1" 'BEGIN { printf "%.2f", b - a }')" "$#" >>"$TSV"
    log "$tag $side: $expect messages in $wall s = $(awk -v n="$expect" -v w="$wall" 'BEGIN { printf "%.1f", n / w }') msg/s (client CPU $(awk -v a="$ucpu" -v b="$scpu" 'BEGIN { printf "%.2f", a + b }') s)"
}

# ---------------------------------------------------------------------------------------------
log "rounds: $CONN_ROUNDS x configs ($CONN_CONFIGS) x sides, order alternating per round"
for ((r = 1; r <= CONN_ROUNDS; r++)); do
    make_corpus "$WORK/corpus-multi" "$CONN_MSGS" "$r"
    make_corpus "$WORK/corpus-single" "$CONN_SINGLE_MSGS" $((1000 + r))
    sides=$CONN_SIDES
    ((r % 2 == 0)) && sides=$(tr ' ' '\n' <<<"$CONN_SIDES" | tac | tr '\n' ' ')
    for cfg in $CONN_CONFIGS; do
        case $cfg in
        seq | par*) corpus=$WORK/corpus-multi users=$MULTI n=$((CONN_ACCOUNTS * CONN_MSGS)) ;;
        single) corpus=$WORK/corpus-single users=solo n=$CONN_SINGLE_MSGS ;;
        *) die "unknown configuration $cfg" ;;
        esac
        [[ $cfg == par* && $cfg != "par$CONN_PAR" ]] && die "configuration $cfg: set CONN_PAR=${cfg#par}"
        for side in $sides; do
            # shellcheck disable=SC2086
            octets=$(fill_upstream "$corpus" $users)
            # shellcheck disable=SC2086
            timed_fetch "$cfg.r$r" "$side" "$cfg" "$n" "$octets" $users
        done
    done
done

cleanup
BG_AFTER=$(busy_pct 5)
T_END=$(date +%s)
log "measurements done (background CPU busy after: $BG_AFTER%); writing the Connector section of $OUT"
export ROOT WORK RES TSV OUT CMDLINE CONN_ACCOUNTS CONN_MSGS CONN_SINGLE_MSGS CONN_ROUNDS CONN_SIZES CONN_CONFIGS CONN_PAR \
    BG_BEFORE BG_AFTER FETCHMAIL_VER
export ELAPSED=$((T_END - T_RUN)) WAITED=$((T_RUN - T_START)) GENERATED_AT=$(date -u +'%Y-%m-%d %H:%M UTC')
GIT_REV=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo "uncommitted tree")
if [[ -n $(git -C "$ROOT" status --porcelain 2>/dev/null | head -n 1) ]]; then GIT_REV="$GIT_REV (with uncommitted changes)"; fi
# The knobs of this run, so that bench/connector-report.sh can be re-run by hand on its results.
for v in CMDLINE CONN_ACCOUNTS CONN_MSGS CONN_SINGLE_MSGS CONN_ROUNDS CONN_SIZES CONN_CONFIGS CONN_PAR \
    BG_BEFORE BG_AFTER FETCHMAIL_VER ELAPSED WAITED GENERATED_AT GIT_REV; do
    printf '%s=%q\n' "$v" "${!v}"
done >"$RES/report.env"
{ "$ROOT/bench/connector-report.sh"; echo; } >"$WORK/connector-section.md"
splice_section "$OUT" Connector "$WORK/connector-section.md"
log "total $((T_END - T_START)) s"
exit 0
}
