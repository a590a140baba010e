#!/usr/bin/env bash
# Multi-node GPU training under SLURM: one process per node, jax.distributed across nodes.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/slurm_gpu.sh --config CONFIG --workdir DIR --nodes N --gpus-per-node G
                           [--partition P] [--time HH:MM:SS] [--account A] [--dry-run]
                           [-- extra main.py flags]
  The job requeues itself on preemption (SIGTERM saves a checkpoint; the rerun resumes).
  --dry-run prints the sbatch script instead of submitting it.
USAGE
}

config= workdir= nodes= gpn= partition= time_limit=48:00:00 account= dry=0 extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --config) config=$2; shift 2;;
    --workdir) workdir=$2; shift 2;;
    --nodes) nodes=$2; shift 2;;
    --gpus-per-node) gpn=$2; shift 2;;
    --partition) partition=$2; shift 2;;
    --time) time_limit=$2; shift 2;;
    --account) account=$2; shift 2;;
    --dry-run) dry=1; shift;;
    -h|--help) usage; exit 0;;
    --) shift; extra=("$@"); break;;
    *) echo "error: unknown argument $1" >&2; usage >&2; exit 2;;
  esac
done
for v in config workdir nodes gpn; do
  if [[ -z "${!v}" ]]; then echo "error: --${v/gpn/gpus-per-node} is required" >&2; usage >&2; exit 2; fi
done
for v in nodes gpn; do
  [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || { echo "error: --${v/gpn/gpus-per-node} must be a positive integer" >&2; exit 2; }
done

script=$(cat <<SBATCH
#!/usr/bin/env bash
#SBATCH --job-name=diffusion_jax
#SBATCH --nodes=$nodes
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=$gpn
#SBATCH --time=$time_limit
#SBATCH --requeue
#SBATCH --signal=B:TERM@120
${partition:+#SBATCH --partition=$partition}
${account:+#SBATCH --account=$account}
set -euo pipefail
export DIFFUSION_JAX_DISTRIBUTED=1  # jax.distributed reads the SLURM environment
srun python3 -m diffusion_jax.main --mode=train --config=$config --workdir=$workdir ${extra[*]:-}
SBATCH
)
if [[ $dry == 1 ]]; then echo "$script"; else echo "$script" | sbatch; fi
