#!/usr/bin/env bash
# `retrack verify` on the shipped MNIST models: the pretrained model, the retrained model and every
# method of the options study (seed 0), each with relearning. Resumable: a finished unlearning run
# or verdict is kept. One job at a time, one torch thread per process unless THREADS says otherwise.
#   bash scripts/verify_study.sh tshirt|boot|bag   (env: RUNS=runs/verify-study, ONLY="retrack siss": these
#   methods only, PHASE=unlearn: make the unlearned models only, PHASE=verify: verify only the models
#   already made, RELATED=1: relearn with the calibration images of the class added to the remain set
#   (--relearn-with, a relearning attack with related data) into RUNS/NAME-related, RELEARN_LR=2e-4:
#   relearning at this learning rate instead, into RUNS/NAME[-related]-lr2e-4, RELEARN_STEPS=50,
#   HELDOUT=200 held-out images, THREADS=1)
# Relearning runs at the pretrained model's own training settings (its provenance.json: lr 1e-3,
# batch 128), a relearning attack, not a gentle fine-tune. The stopping rule's row stops on the
# calibration images, disjoint from the held-out images the verdict compares with.
set -euo pipefail
name=${1:?tshirt, boot or bag (once its weights are built)}
runs=${RUNS:-runs/verify-study}
py=${PYTHON:-python}
export OMP_NUM_THREADS=${THREADS:-1}
data=$runs/data
[ -f "$data/${name}_calibration.npz" ] || "$py" scripts/heldout_sets.py --out "$data" --num "${HELDOUT:-200}"
recipes=src/retrack/recipes/mnist_$name
P=$recipes/model
R=$recipes/retrained
D=$data/mnist_$name.npz
F=@$data/mnist_${name}_forget.txt
H=$data/${name}_heldout.npz
out=$runs/$name
models=$out/models
mkdir -p "$models"
C=$data/${name}_calibration.npz
common=(--pretrained "$P" --data "$D" --forget "$F" --heldout "$H" --auc-heldout "$data/digits_heldout.npz"
        --reference-model "$R" --quiet --relearn-steps "${RELEARN_STEPS:-50}" --eval-every 10
        --relearn-settings training)
phase=${PHASE:-both}
if [ -n "${RELATED:-}" ]; then
  common+=(--relearn-with "$C")
  out=$out-related
fi
if [ -n "${RELEARN_LR:-}" ]; then
  common+=(--relearn-lr "$RELEARN_LR")
  out=$out-lr$RELEARN_LR
fi
verify() {  # label model [flags]
  local label=$1 model=$2; shift 2
  [ "$phase" != unlearn ] || return 0
  [ -f "$out/$label/verdict.json" ] && return
  echo "== verify $label ($(date -u +%T))"
  "$py" -m retrack verify --model "$model" "${common[@]}" --out "$out/$label" "$@"
}
verify pretrained "$P"
verify retrained "$R" --relearn-reference false
while IFS='|' read -r label flags; do
  [ -n "$label" ] || continue
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $label "* ]]; then continue; fi
  model=$models/$label
  flags=${flags//CALIBRATION/$C}
  if [ ! -f "$model/retrack_run.json" ]; then
    [ "$phase" != verify ] || continue
    echo "== unlearn $label ($(date -u +%T))"
    # shellcheck disable=SC2086
    "$py" -m retrack unlearn --model "$P" --data "$D" --forget "$F" --out "$model" --seed 0 --quiet --overwrite $flags
  fi
  verify "$label" "$model" --relearn-reference false
done <<'METHODS'
vanilla|--method vanilla
retrack|--method retrack --k 10 --lam 0.005
siss|--method siss --lam 0.5 --s 5.0
neggrad|--method neggrad
erasediff|--method erasediff --eta 0.001
retrack-surgery|--method retrack --k 10 --lam 0.005 --surgery
retrack-t-min-10|--method retrack --k 10 --lam 0.005 --forget-t-min 10
retrack-surgery-t-min-10|--method retrack --k 10 --lam 0.005 --surgery --forget-t-min 10
retrack-min-snr|--method retrack --k 10 --lam 0.005 --forget-weighting min-snr --snr-gamma 5.0
retrack-auto|--method retrack --k 10 --lam auto --lam-ratio 1.0
retrack-min-snr-100-steps|--method retrack --k 10 --lam 0.005 --forget-weighting min-snr --snr-gamma 5.0 --steps 100
retrack-stop|--method retrack --k 10 --lam 0.005 --stop-heldout CALIBRATION --steps 100
retrack-distill-1|--method retrack --k 10 --lam 0.005 --distill 1.0
retrack-saliency-0.5|--method retrack --k 10 --lam 0.005 --saliency 0.5
retrack-surgery-t-min-10-distill-1|--method retrack --k 10 --lam 0.005 --surgery --forget-t-min 10 --distill 1.0
retrack-k-all|--method retrack --k all --lam 0.005
retrack-nash|--method retrack --k 10 --lam 0.005 --balance nash
METHODS
echo "== done $name ($(date -u +%T))"
