# Sourced by examples/<scale>/run.sh: the stages of the recipe, in order, for one scale.
# Needs NPROC and STAGES set; the stages whose names are in $STAGES run, each with
# examples/<scale>/<stage>.yaml (fine-tuning stages through finetune_vlm.py) and the
# key=value overrides given to run.sh.

# The project's environment, unless one is active (run.sh has cd'ed to the repository root).
if [[ -z "${VIRTUAL_ENV:-}" && -f .venv/bin/activate ]]; then
  source .venv/bin/activate
fi

TRAINING_STAGES="text image_text image_text_rewarmup image_text_scratch finetune
  ablation_projector_linear ablation_projector_linear_finetune
  ablation_unfrozen_encoder ablation_unfrozen_encoder_finetune"

stage() {   # stage NAME COMMAND...: run COMMAND when NAME is in $STAGES
  local name=$1
  shift
  [[ " $STAGES " == *" $name "* ]] || return 0
  echo "=== stage $name: $*"
  local start=$SECONDS
  "$@"
  echo "=== stage $name done in $((SECONDS - start)) s"
}

run_training_stages() {   # run_training_stages SCALE [key=value ...]
  local scale=$1
  shift
  local name entry
  for name in $TRAINING_STAGES; do
    entry=pretrain_vlm.py
    [[ $name == *finetune ]] && entry=finetune_vlm.py
    stage "$name" torchrun --standalone --nproc_per_node "$NPROC" "$entry" \
      "examples/$scale/$name.yaml" "$@"
  done
}
