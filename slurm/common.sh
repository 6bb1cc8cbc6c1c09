# Shared by slurm/train.sbatch and slurm/train_srun.sbatch (sourced, not run): where the
# code is, the environment hook, the run dir named from the job, and the requeue logic.

# The batch script runs from a copy in SLURM's spool: find the checkout from where
# sbatch was called, or PRETRAIN_HOME.
PRETRAIN_HOME=${PRETRAIN_HOME:-$SLURM_SUBMIT_DIR}
cd "$PRETRAIN_HOME" || { echo "PRETRAIN_HOME=$PRETRAIN_HOME is not a directory" >&2; exit 2; }

# Environment hook: a file of shell lines (module load ..., source venv/bin/activate),
# else the checkout's .venv when there is one.
if [[ -n "${PRETRAIN_ENV_SETUP:-}" ]]; then
    # shellcheck disable=SC1090
    source "$PRETRAIN_ENV_SETUP" || { echo "PRETRAIN_ENV_SETUP=$PRETRAIN_ENV_SETUP failed" >&2; exit 2; }
elif [[ -f .venv/bin/activate ]]; then
    source .venv/bin/activate
fi
PYTHON=${PYTHON:-python}

# One run dir per job, named from the job: a requeued job (same id) finds its
# checkpoints there and resumes. Array jobs (sweeps) use <array id>_<task id>. A
# hydra.run.dir=... among the overrides wins (the scripts pass it on once, as RUN_DIR).
JOB_TAG=${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}}
JOB_TAG=${JOB_TAG:-$SLURM_JOB_ID}
RUN_DIR=${RUN_DIR:-${RUNS_ROOT:-runs}/${SLURM_JOB_NAME}-${JOB_TAG}}
_overrides=()
for _arg in "$@"; do
    case "$_arg" in
        hydra.run.dir=*|+hydra.run.dir=*|++hydra.run.dir=*) RUN_DIR=${_arg#*hydra.run.dir=} ;;
        *) _overrides+=("$_arg") ;;
    esac
done
set -- "${_overrides[@]}"  # the script's overrides, without hydra.run.dir
mkdir -p "$RUN_DIR"
# The first node hosts the rendezvous; the port is derived from the job id so that
# jobs sharing a node do not collide.
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 10000))}  # below the ephemeral range
export MASTER_PORT
# shellcheck source=slurm/net.sh
source "$PRETRAIN_HOME/slurm/net.sh"
default_gloo_ifname

echo "pretrain: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST, run dir $RUN_DIR"

# SLURM's --signal=B:USR1@<secs> (or `scancel --signal=USR1 --batch`) reaches only this
# shell. Forward it to the job's steps: every trainer process gets it, saves a
# checkpoint at the next step boundary and exits 3 (torchrun agents ignore it).
PREEMPT_REQUESTED=0
forward_usr1() {
    PREEMPT_REQUESTED=1
    echo "pretrain: SIGUSR1 received, forwarding to the job steps"
    scancel --signal=USR1 "$SLURM_JOB_ID"
}

# Run "$@" (the srun line) in the background so the trap can fire while it runs, then
# requeue when the trainer stopped for preemption. Exits with the step's code.
run_and_requeue() {
    trap forward_usr1 USR1
    "$@" &
    local pid=$! rc
    while true; do
        wait "$pid"
        rc=$?
        kill -0 "$pid" 2>/dev/null || break  # wait returned because of the trap: go on
    done
    trap - USR1
    # Requeue when this attempt's trainer says it stopped for preemption (status.json
    # names the attempt: a previous attempt's, or another job's on the same run dir, does
    # not count), or when this script forwarded the warning and a complete checkpoint
    # exists (the ranks may have been killed before rank 0 wrote its status). Never after
    # exit 2 (a config error, or a run dir that another job holds) nor after the run
    # diverged (exit 5, status "diverged": the same config would diverge again).
    local attempt="${SLURM_JOB_ID}.${SLURM_RESTART_COUNT:-0}"
    if (( rc != 2 && rc != 5 )) && ! grep -q '"status": *"diverged"' "$RUN_DIR/status.json" 2>/dev/null \
        && { { grep -q '"status": *"preempted"' "$RUN_DIR/status.json" 2>/dev/null \
            && grep -q "\"slurm_attempt\": *\"$attempt\"" "$RUN_DIR/status.json"; } \
        || { (( PREEMPT_REQUESTED )) && compgen -G "$RUN_DIR/checkpoints/step-*/meta.json" >/dev/null; }; }; then
        if (( ${SLURM_RESTART_COUNT:-0} < ${MAX_REQUEUES:-20} )); then
            echo "pretrain: checkpoint saved after preemption; requeueing job $SLURM_JOB_ID"
            scontrol requeue "$SLURM_JOB_ID"
            exit 0
        fi
        echo "pretrain: preempted, but MAX_REQUEUES=${MAX_REQUEUES:-20} reached; not requeueing" >&2
    fi
    exit "$rc"
}
