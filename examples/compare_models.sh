#!/usr/bin/env bash
# The built-in models against the published methods of ../shared/data/peer_results, with the nine metrics of
# the cddfuse protocol (spec §8): on the 25 TNO pairs, never used in training, and on the 15 MSRS pairs that
# `tdfusion train --val-every 4` holds out (every 4th pair sorted by name). Further models to compare are
# given as LABEL=WEIGHTS.pth (e.g. a ReFusion trained with the fixed loss). Writes OUT/{tno,msrs}.{md,json} and
# a chart of the default model and the published methods, OUT/{tno,msrs}.png.
#
#   examples/compare_models.sh OUT [LABEL=WEIGHTS.pth ...]
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
tdfusion=$repo/build/examples/tdfusion
data=$repo/../shared/data
out=${1:?usage: examples/compare_models.sh OUT [LABEL=WEIGHTS.pth ...]}
shift
if [[ ! -d $data/tno || ! -d $data/msrs ]]; then
  echo "skipped: the data sets of $data are absent"
  exit 0
fi
models=("tdfusion-refusion=--model refusion" "tdfusion-light=--model light")
for extra in "$@"; do models+=("${extra%%=*}=--weights ${extra#*=}"); done

# The held-out MSRS pairs and the published fusions of them, as links.
msrs=$out/msrs-held-out
rm -rf "$msrs"
mapfile -t stems < <(find "$data/msrs/ir" -maxdepth 1 -name '*.png' -printf '%f\n' | sort | awk 'NR % 4 == 0')
for folder in ir vi; do
  mkdir -p "$msrs/$folder"
  for stem in "${stems[@]}"; do ln -s "$data/msrs/$folder/$stem" "$msrs/$folder/$stem"; done
done
for peer in "$data"/peer_results/*/msrs; do
  compgen -G "$peer/*.png" >/dev/null || continue  # PIAFusion_official: a few triplets in fused/, ir/, vi/
  name=$(basename "$(dirname "$peer")")
  mkdir -p "$msrs/peers/$name"
  for stem in "${stems[@]}"; do ln -s "$peer/$stem" "$msrs/peers/$name/$stem"; done
done

for set in tno msrs; do
  if [[ $set == tno ]]; then sources=$data/tno peers=("$data"/peer_results/*/tno); caption="TNO"
  else sources=$msrs peers=("$msrs"/peers/*); caption="MSRS (held-out pairs)"; fi
  ours=() published=()
  for model in "${models[@]}"; do
    label=${model%%=*}
    # shellcheck disable=SC2086
    "$tdfusion" fuse --ir "$sources/ir" --vi "$sources/vi" --out "$out/$set/$label" ${model#*=} >/dev/null
    ours+=(--fused "$label=$out/$set/$label")
  done
  for peer in "${peers[@]}"; do
    compgen -G "$peer/*.png" >/dev/null || continue
    name=$(basename "$peer")
    [[ $name == "$set" ]] && name=$(basename "$(dirname "$peer")")
    published+=(--fused "$name=$peer")
  done
  "$tdfusion" eval --ir "$sources/ir" --vi "$sources/vi" "${ours[@]}" "${published[@]}" --protocol cddfuse \
    --dataset "$caption" --markdown "$out/$set.md" --json "$out/$set.json" >/dev/null
  # The chart: the default model against the published methods (its palette has ten colours).
  "$tdfusion" eval --ir "$sources/ir" --vi "$sources/vi" "${ours[@]:0:2}" "${published[@]}" --protocol cddfuse \
    --dataset "$caption" --chart "$out/$set.png" >/dev/null
  echo "wrote $out/$set.md, $set.json and $set.png"
done
