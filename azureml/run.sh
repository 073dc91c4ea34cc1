#!/usr/bin/env bash
# What an AzureML job runs (azureml/pipeline-job.yml, azureml/train-distributed.yml), in the uploaded
# repository: check out the commit, pull the DVC outputs, `dvc exp run` with the overrides, push.
#
#   bash azureml/run.sh --commit <sha> --name <exp> --out <folder> [--overrides "k=v k=v" | none]
#                       [--register-model true|false] [--distributed]
#
# Storage: the compute's managed identity. DefaultAzureCredential finds a user-assigned identity by
# AZURE_CLIENT_ID, which AzureML exposes as DEFAULT_IDENTITY_CLIENT_ID; AZURE_TOKEN_CREDENTIALS=prod keeps
# the credential chain to environment / workload / managed identity (no developer-tool logins to wait for).
#
# Results: the data and models go to the DVC remote (pcb-aoi-remote push: checked, bounded waits); the
# commit holding dvc.lock, params.yaml and reports/ is saved as <out>/result.bundle on branch
# azureml/<name>, so locally:  git fetch result.bundle azureml/<name>:azureml/<name> && git checkout azureml/<name> && pcb-aoi-remote pull
#
# Tracking: AzureML sets MLFLOW_TRACKING_URI and MLFLOW_RUN_ID; train and evaluate log into the job's run.
# --register-model true: after the push, models/model.e2e.onnx becomes a version of the registry's `pcb-aoi`
# model, tagged with the result commit, the data md5s of its dvc.lock and the test metrics (azureml/register.py).
#
# --distributed (AzureML `distribution: type: pytorch`, one process per node): the train stage runs under
# torchrun across all nodes (PCB_AOI_TORCHRUN, read by src/stages/train.py), one process per GPU. Node 0
# runs the whole experiment and pushes; the other nodes prepare the same data (deterministic stages, or
# pulled) and run only the train stage's command as torchrun workers.
set -euo pipefail

commit="" name="" out="" overrides="none" distributed=0 register=false
while [ $# -gt 0 ]; do
  case "$1" in
    --commit) commit=$2; shift 2 ;;
    --name) name=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --overrides) overrides=$2; shift 2 ;;
    --register-model) register=$(echo "$2" | tr '[:upper:]' '[:lower:]'); shift 2 ;;
    --distributed) distributed=1; shift ;;
    *) echo "error: run.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -n "$commit" ] && [ -n "$name" ] && [ -n "$out" ] || { echo "error: run.sh: --commit, --name and --out are required" >&2; exit 2; }
case "$register" in true|false) ;; *) echo "error: run.sh: --register-model: true or false, got $register" >&2; exit 2 ;; esac
[ -d .git ] || { echo "error: run.sh: $(pwd) has no .git: submit with code: .. from a git checkout (azureml/submit.py)" >&2; exit 2; }

export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" DVC_NO_ANALYTICS=1 NO_ALBUMENTATIONS_UPDATE=1
export AZURE_TOKEN_CREDENTIALS="${AZURE_TOKEN_CREDENTIALS:-prod}"
if [ -z "${AZURE_CLIENT_ID:-}" ] && [ -n "${DEFAULT_IDENTITY_CLIENT_ID:-}" ]; then
  export AZURE_CLIENT_ID="$DEFAULT_IDENTITY_CLIENT_ID"
fi
git config user.name >/dev/null || git config user.name "AzureML job"
git config user.email >/dev/null || git config user.email "azureml@localhost"
git config core.fileMode false   # the uploaded snapshot does not keep file modes

git checkout --quiet --detach "$commit"
if [ -n "$(git status --porcelain --untracked-files=no)" ]; then
  echo "error: run.sh: the uploaded files differ from commit $commit:" >&2; git status --short >&2; exit 2
fi
sets=()
if [ "$overrides" != none ]; then for kv in $overrides; do sets+=(-S "$kv"); done; fi

python -m pcb_aoi.remote pull -- --allow-missing   # what this commit already has; the rest is reproduced

node_rank=0
if [ "$distributed" = 1 ]; then
  node_rank=${NODE_RANK:-0}
  nodes=${AZUREML_NODE_COUNT:-${WORLD_SIZE:-1}}   # process_count_per_instance: 1 -> AzureML's world = nodes
  gpus=$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")
  export PCB_AOI_TORCHRUN="--nnodes $nodes --node-rank $node_rank --nproc-per-node $gpus --master-addr $MASTER_ADDR --master-port $MASTER_PORT"
  unset WORLD_SIZE RANK LOCAL_RANK   # AzureML's per-node values; torchrun sets each process's own
  if [ "$node_rank" != 0 ]; then
    dvc exp run "${sets[@]}" augment   # same params.yaml and data as node 0
    train_cmd=$(python -c "import yaml; print(yaml.safe_load(open('dvc.yaml'))['stages']['train']['cmd'])")
    eval "$train_cmd"                  # a torchrun worker node: rank 0 (on node 0) writes the model
    exit 0
  fi
fi

dvc exp run -n "$name" "${sets[@]}"
python -m pcb_aoi.remote push
dvc exp branch "$name" "azureml/$name"
if [ "$register" = true ]; then
  python azureml/register.py --commit "$(git rev-parse "azureml/$name")"   # the workspace: the job's own
fi
mkdir -p "$out"
git bundle create "$out/result.bundle" "$commit..azureml/$name"   # needs the base commit, which you have
cp -r reports "$out/reports"
python - "$out/summary.json" "$commit" "$name" <<'EOF'
import json, subprocess, sys
out, commit, name = sys.argv[1:]
result = subprocess.run(["git", "rev-parse", f"azureml/{name}"], capture_output=True, text=True).stdout.strip()
json.dump({"base_commit": commit, "result_commit": result, "branch": f"azureml/{name}",
           "metrics": json.load(open("reports/metrics.json"))}, open(out, "w"), indent=2)
EOF
echo "done: branch azureml/$name in $out/result.bundle; outputs pushed to the DVC remote"
