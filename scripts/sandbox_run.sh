#!/usr/bin/env bash
# Run a command under the restrictions Grand Challenge enforces on an algorithm job, without Docker.
#
# What the command gets (compare `docker run` in test.sh and section 5 of the DRAGON reference):
#   - a non-root user: as root, the throwaway system user $SANDBOX_USER (created with useradd
#     when missing), with no capabilities and no_new_privs; as a non-root caller, its own uid
#     inside a user namespace
#   - no network: a fresh network namespace that has only its own loopback interface
#   - the input as a read-only copy (bind-mounted read-only in a private mount namespace)
#   - an empty output directory, copied out to --output afterwards (like a docker volume)
#   - an empty private TMPDIR and HOME; a private 128 MiB /dev/shm
#   - RLIMIT_DATA (the platform's memory limit), RLIMIT_NPROC (as --pids-limit) and, when asked,
#     a wall-clock timeout
#   - a clean environment (env -i plus a short list, see below), its own PID namespace
#
# Usage:
#   scripts/sandbox_run.sh [options] -- COMMAND [ARG...]
# Options:
#   --input DIR        job input folder; copied, mounted read-only, reachable as {input}
#   --output DIR       where the command's output lands; the command writes to {output}
#                      (an empty directory), whose content is copied into DIR afterwards
#   --memory SIZE      RLIMIT_DATA, bytes or with k/m/g/t suffix (binary)  [$SANDBOX_MEMORY or 15g]
#   --pids N           RLIMIT_NPROC of the sandbox user (root callers only) [$SANDBOX_PIDS or 256]
#   --timeout SECONDS  kill the command after that long, 0 = never        [$SANDBOX_TIMEOUT or 0]
#   --env NAME=VALUE   add a variable to the command's environment (repeatable)
#   --expose PATH      make PATH reachable for the sandbox user (repeatable); see below
#   --chdir DIR        working directory of the command                   [current directory]
# In ARGs, {input}, {output} and {tmp} are replaced by the sandbox paths; the command also sees
# them as $SANDBOX_INPUT, $SANDBOX_OUTPUT and $TMPDIR.
#
# The command's environment is: PATH, HOME, TMPDIR/TMP/TEMP, USER/LOGNAME, LANG (C.UTF-8),
# PYTHONDONTWRITEBYTECODE=1, PYTHONUNBUFFERED=1, SANDBOX_INPUT, SANDBOX_OUTPUT, those of
# LC_ALL TZ OPENBLAS_CORETYPE OPENBLAS_L2_SIZE CUDA_VISIBLE_DEVICES NVIDIA_VISIBLE_DEVICES
# OMP_NUM_THREADS that are set, the names listed in $SANDBOX_PASS_ENV, and --env ones.
#
# Reachability (root callers): the command runs as another user, so every path it needs must
# be searchable for that user. When a directory on the way is not (say /root, mode 700, holding
# a pyenv interpreter, or a pytest tmp_path under /tmp/pytest-of-root), the directory is masked
# with an empty tmpfs inside the sandbox and only the needed child is bound back into it, so the
# rest stays hidden. This is done for the command, the working directory, every ARG that names an
# existing path, and every --expose PATH. The files themselves must be readable by others.
#
# Environment: SANDBOX_USER (default dragon-sandbox), SANDBOX_MEMORY, SANDBOX_PIDS,
# SANDBOX_TIMEOUT, SANDBOX_PASS_ENV, SANDBOX_SCRATCH_BASE (default /tmp), SANDBOX_KEEP=1 keeps
# the scratch directory for inspection.
#
# Exit status: the command's (124 on timeout, 128+N when killed by signal N); 125 when the
# sandbox itself cannot be set up. Needs util-linux (unshare, setpriv, prlimit) and either root
# or unprivileged user namespaces.
set -euo pipefail

die() {
    echo "sandbox_run: $*" >&2
    exit 125
}

# ---------------------------------------------------------------- inside the namespaces
# Runs as (possibly namespaced) root in the new mount, network and PID namespaces. State comes
# in through _SBX_* variables; the positional arguments are the command.
as_sandbox_user() {
    setpriv --reuid="${_SBX_UID}" --regid="${_SBX_GID}" --clear-groups -- "$@"
}

declare -A masked=()
mask_count=0

# Make one absolute path reachable for the sandbox user (root mode only), walking it as written.
expose_path() {
    local target="$1" parent comp cur="" hold
    local -a parts
    IFS=/ read -r -a parts <<<"${target#/}"
    for comp in "${parts[@]}"; do
        [[ -n "${comp}" ]] || continue
        parent="${cur:-/}"
        cur="${cur}/${comp}"
        if [[ -n "${masked[${parent}]:-}" ]]; then
            hold="${masked[${parent}]}"
        elif as_sandbox_user test -x "${parent}"; then
            continue
        else
            # Keep the real directory reachable for root under the scratch dir, then cover it.
            mask_count=$((mask_count + 1))
            hold="${_SBX_SCRATCH}/.hold/${mask_count}"
            mkdir -p "${hold}"
            mount --bind "${parent}" "${hold}"
            mount -t tmpfs -o mode=0755,size=1m,nosuid,nodev tmpfs "${parent}"
            masked["${parent}"]="${hold}"
        fi
        if [[ ! -e "${cur}" && ! -L "${cur}" ]]; then
            if [[ -L "${hold}/${comp}" ]]; then
                ln -s -- "$(readlink -- "${hold}/${comp}")" "${cur}"
            elif [[ -d "${hold}/${comp}" ]]; then
                mkdir "${cur}"
                mount --bind "${hold}/${comp}" "${cur}"
            else
                : >"${cur}"
                mount --bind "${hold}/${comp}" "${cur}"
            fi
        fi
    done
}

# Both spellings of an existing path: as written (symbolic links kept) and fully resolved.
wanted=()
want_path() {
    local p="$1"
    [[ "${p}" == /* ]] || p="${_SBX_CHDIR}/${p}"
    [[ -e "${p}" ]] || return 0
    wanted+=("$(realpath -s -- "${p}")" "$(readlink -f -- "${p}")")
}

inner_main() {
    local scratch="${_SBX_SCRATCH}"

    # Loopback up, as in a container started with --network=none. Nothing else exists here.
    if command -v ip >/dev/null 2>&1; then
        ip link set lo up 2>/dev/null || true
    fi

    # The input copy becomes read-only for everyone, root included.
    mount --bind "${scratch}/input" "${scratch}/input"
    mount -o remount,bind,ro "${scratch}/input"

    # A private /dev/shm of the platform's size (--shm-size=128m).
    mount -t tmpfs -o size=128m,mode=1777,nosuid,nodev tmpfs /dev/shm 2>/dev/null || true

    local -a drop
    if [[ "${_SBX_MODE}" == root ]]; then
        # Resolve every path first: masking a directory hides what its links point into.
        local p
        want_path "${_SBX_CHDIR}"
        want_path "$1"
        for p in "${@:2}"; do
            if [[ -n "${p}" && "${p}" != -* ]]; then
                want_path "${p}"
            fi
        done
        if [[ -n "${_SBX_EXPOSE:-}" ]]; then
            local -a extra
            mapfile -t extra <<<"${_SBX_EXPOSE}"
            for p in "${extra[@]}"; do
                if [[ -n "${p}" ]]; then
                    want_path "${p}"
                fi
            done
        fi
        for p in "${wanted[@]}"; do
            expose_path "${p}"
        done
        as_sandbox_user test -x "${_SBX_CHDIR}" ||
            die "the sandbox user cannot enter ${_SBX_CHDIR} (make it readable by others)"
        as_sandbox_user test -x "$1" ||
            die "the sandbox user cannot execute $1 (make it readable/executable by others)"
        drop=(setpriv --reuid="${_SBX_UID}" --regid="${_SBX_GID}" --clear-groups
            --inh-caps=-all --bounding-set=-all --no-new-privs --)
    else
        # Non-root caller: we are root only inside our own user namespace. A nested user
        # namespace maps the caller's own uid back, and its exec drops every capability.
        drop=(unshare --user --map-user="${_SBX_UID}" --map-group="${_SBX_GID}" --
            setpriv --no-new-privs --)
    fi

    local -a limits=(prlimit --data="${_SBX_MEMORY}")
    if [[ -n "${_SBX_PIDS:-}" ]]; then
        limits+=(--nproc="${_SBX_PIDS}")
    fi
    limits+=(--)

    # timeout is also the PID 1 of the namespace: unlike a bare command there (which ignores
    # SIGTERM without a handler of its own), it passes SIGTERM/SIGINT on to the command and sends
    # SIGKILL 10 s later. A duration of 0 never times out.
    local -a timer=(timeout --kill-after=10 "${_SBX_TIMEOUT}")

    local -a envv=()
    mapfile -t envv <<<"${_SBX_ENV}"

    cd "${_SBX_CHDIR}"
    exec "${timer[@]}" "${limits[@]}" "${drop[@]}" env -i "${envv[@]}" "$@"
}

if [[ "${1:-}" == "--_inner" ]]; then
    shift
    inner_main "$@"
fi

# ---------------------------------------------------------------- outside: parse, prepare, run
usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
}

to_bytes() {
    local v="${1,,}" n mult=1
    v="${v%ib}"
    v="${v%b}"
    case "${v}" in
        *k) n="${v%k}" mult=1024 ;;
        *m) n="${v%m}" mult=$((1024 ** 2)) ;;
        *g) n="${v%g}" mult=$((1024 ** 3)) ;;
        *t) n="${v%t}" mult=$((1024 ** 4)) ;;
        *) n="${v}" ;;
    esac
    [[ "${n}" =~ ^[0-9]+$ ]] || die "not a size: $1"
    echo $((n * mult))
}

input=""
output=""
memory="${SANDBOX_MEMORY:-15g}"
pids="${SANDBOX_PIDS:-256}"
timeout_s="${SANDBOX_TIMEOUT:-0}"
chdir="${PWD}"
extra_env=()
expose=()

while [[ $# -gt 0 ]]; do
    case "$1" in
        --input) input="${2:?--input needs a directory}"; shift 2 ;;
        --output) output="${2:?--output needs a directory}"; shift 2 ;;
        --memory) memory="${2:?--memory needs a size}"; shift 2 ;;
        --pids) pids="${2:?--pids needs a number}"; shift 2 ;;
        --timeout) timeout_s="${2:?--timeout needs seconds}"; shift 2 ;;
        --env) extra_env+=("${2:?--env needs NAME=VALUE}"); shift 2 ;;
        --expose) expose+=("${2:?--expose needs a path}"); shift 2 ;;
        --chdir) chdir="${2:?--chdir needs a directory}"; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        --) shift; break ;;
        *) die "unknown option $1 (the command goes after --; see --help)" ;;
    esac
done
[[ $# -gt 0 ]] || die "no command given (usage: sandbox_run.sh [options] -- COMMAND [ARG...])"
[[ "${timeout_s}" =~ ^[0-9]+$ ]] || die "--timeout must be whole seconds"
[[ "${pids}" =~ ^[0-9]+$ ]] || die "--pids must be a number"
memory_bytes="$(to_bytes "${memory}")"
[[ -d "${chdir}" ]] || die "no such directory: ${chdir}"
chdir="$(cd "${chdir}" && pwd -P)"
for tool in unshare setpriv prlimit; do
    command -v "${tool}" >/dev/null 2>&1 || die "${tool} (util-linux) is required"
done
if [[ -n "${input}" && ! -d "${input}" ]]; then
    die "input is not a directory: ${input}"
fi

# Resolve the command to an absolute path now: the sandbox's PATH is a plain system one.
cmd="$1"
shift
if [[ "${cmd}" == */* ]]; then
    [[ "${cmd}" == /* ]] || cmd="${chdir}/${cmd}"
else
    resolved="$(command -v -- "${cmd}" 2>/dev/null)" || die "command not found: ${cmd}"
    cmd="${resolved}"
fi
[[ -x "${cmd}" ]] || die "not executable: ${cmd}"

if [[ ${EUID} -eq 0 ]]; then
    mode=root
    sandbox_user="${SANDBOX_USER:-dragon-sandbox}"
    if ! id -u "${sandbox_user}" >/dev/null 2>&1; then
        useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin \
            --user-group "${sandbox_user}" >/dev/null 2>&1 ||
            die "cannot create the sandbox user ${sandbox_user} (useradd failed)"
    fi
    sb_uid="$(id -u "${sandbox_user}")"
    sb_gid="$(id -g "${sandbox_user}")"
    [[ "${sb_uid}" -ne 0 ]] || die "SANDBOX_USER must not be root"
else
    mode=user
    sandbox_user="$(id -un 2>/dev/null || echo "uid$(id -u)")"
    sb_uid="$(id -u)"
    sb_gid="$(id -g)"
    # RLIMIT_NPROC counts every process of the uid, the caller's own shell included: only for a
    # dedicated user is it a fair --pids-limit. Applied here only when asked for explicitly.
    [[ -n "${SANDBOX_PIDS:-}" ]] || pids=""
fi

scratch="$(mktemp -d "${SANDBOX_SCRATCH_BASE:-/tmp}/sandbox.XXXXXX")"
# shellcheck disable=SC2329  # called by the EXIT trap
cleanup() {
    if [[ "${SANDBOX_KEEP:-0}" == 1 ]]; then
        echo "sandbox_run: scratch kept at ${scratch}" >&2
    else
        rm -rf "${scratch}"
    fi
}
trap cleanup EXIT
chmod 0755 "${scratch}"
mkdir "${scratch}/input" "${scratch}/output" "${scratch}/tmp" "${scratch}/home"
if [[ -n "${input}" ]]; then
    cp -R -- "${input}/." "${scratch}/input/"
fi
chmod -R u+rwX,go+rX,go-w "${scratch}/input"
chmod 0755 "${scratch}/output"
chmod 0700 "${scratch}/tmp" "${scratch}/home"
if [[ "${mode}" == root ]]; then
    chown "${sb_uid}:${sb_gid}" "${scratch}/output" "${scratch}/tmp" "${scratch}/home"
fi

# Substitute the placeholders.
args=()
for a in "$@"; do
    a="${a//\{input\}/${scratch}/input}"
    a="${a//\{output\}/${scratch}/output}"
    a="${a//\{tmp\}/${scratch}/tmp}"
    args+=("${a}")
done

env_lines=(
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    "HOME=${scratch}/home"
    "TMPDIR=${scratch}/tmp" "TMP=${scratch}/tmp" "TEMP=${scratch}/tmp"
    "USER=${sandbox_user}" "LOGNAME=${sandbox_user}"
    "LANG=C.UTF-8"
    "PYTHONDONTWRITEBYTECODE=1" "PYTHONUNBUFFERED=1"
    "SANDBOX_INPUT=${scratch}/input" "SANDBOX_OUTPUT=${scratch}/output"
)
read -r -a pass_names <<<"LC_ALL TZ OPENBLAS_CORETYPE OPENBLAS_L2_SIZE CUDA_VISIBLE_DEVICES NVIDIA_VISIBLE_DEVICES OMP_NUM_THREADS ${SANDBOX_PASS_ENV:-}"
for name in "${pass_names[@]}"; do
    if [[ -n "${!name+x}" ]]; then
        env_lines+=("${name}=${!name}")
    fi
done
for kv in "${extra_env[@]}"; do
    [[ "${kv}" == *=* ]] || die "--env wants NAME=VALUE, got ${kv}"
    env_lines+=("${kv}")
done

export _SBX_MODE="${mode}" _SBX_SCRATCH="${scratch}" _SBX_UID="${sb_uid}" _SBX_GID="${sb_gid}"
export _SBX_MEMORY="${memory_bytes}" _SBX_PIDS="${pids}" _SBX_TIMEOUT="${timeout_s}"
export _SBX_CHDIR="${chdir}"
_SBX_ENV="$(printf '%s\n' "${env_lines[@]}")"
_SBX_EXPOSE="$(printf '%s\n' "${expose[@]}")"
export _SBX_ENV _SBX_EXPOSE

ns=(unshare --mount --propagation private --net --pid --fork --kill-child --mount-proc)
if [[ "${mode}" == user ]]; then
    ns=(unshare --user --map-root-user --mount --propagation private --net --pid --fork
        --kill-child --mount-proc)
fi

self="$(readlink -f -- "${BASH_SOURCE[0]}")"
# In the background so that a signal to this script is handled at once: unshare itself ignores
# SIGINT/SIGTERM while it waits, but kills its child (the whole PID namespace) when it dies.
"${ns[@]}" -- bash "${self}" --_inner "${cmd}" "${args[@]}" <&0 &
child=$!
interrupted=0
# shellcheck disable=SC2329  # called by the traps below
on_signal() {
    interrupted="$1"
    kill -KILL "${child}" 2>/dev/null || true
}
trap 'on_signal 130' INT
trap 'on_signal 143' TERM
trap 'on_signal 129' HUP
rc=0
wait "${child}" || rc=$?
while kill -0 "${child}" 2>/dev/null; do
    rc=0
    wait "${child}" || rc=$?
done
if [[ ${interrupted} -ne 0 ]]; then
    echo "sandbox_run: interrupted; the sandbox was killed" >&2
    exit "${interrupted}"
fi

if [[ -n "${output}" ]]; then
    mkdir -p -- "${output}"
    cp -R -- "${scratch}/output/." "${output}/"
fi
exit "${rc}"
