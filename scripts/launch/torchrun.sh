#!/usr/bin/env bash
# Launch foundation-train with torchrun: one node or several (run this script on every node).
#
#   scripts/launch/torchrun.sh                                 # 2 CPU processes, DDP, demo recipe
#   NPROC=8 scripts/launch/torchrun.sh trainer=gpu strategy=deepspeed_stage_2 experiment=pretrain_demo
#   NNODES=4 NODE_RANK=$i MASTER_ADDR=node0 NPROC=8 scripts/launch/torchrun.sh trainer=gpu ...
#
# torchrun starts the processes itself (Lightning sees the torchelastic environment and does
# not spawn more). All ranks must share one Hydra run directory: RUN_DIR is passed to every
# process explicitly (a timestamp per process would split the run). auto_resume=true: a run
# launched again with the same RUN_DIR, or restarted by torchrun after a rank died
# (MAX_RESTARTS), continues from $RUN_DIR/checkpoints/last.ckpt.
set -euo pipefail
NPROC=${NPROC:-2}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
RUN_DIR=${RUN_DIR:-outputs/train/torchrun-$(date +%Y%m%d-%H%M%S)}
STRATEGY=${STRATEGY:-ddp}
MAX_RESTARTS=${MAX_RESTARTS:-0}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

exec torchrun \
  --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$NPROC" \
  --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" --max-restarts="$MAX_RESTARTS" \
  -m foundation.train.cli \
  strategy="$STRATEGY" trainer.devices="$NPROC" trainer.num_nodes="$NNODES" \
  hydra.run.dir="$RUN_DIR" auto_resume=true "$@"
