#!/usr/bin/env bash
# Pack what the GPU machine lacks for `python -m benchmarks.gpu` into .device/ (git-ignored) and print the one device
# call that runs it. One call carries at most 64 MiB (the working tree, shared/ and the carried .device/ together):
#   .device/site-py312.tar.xz  Ray, optuna, grad-cam, FastAPI, ... (../shared/tools/device/pack.sh; about 42 MB;
#                              built once, --rebuild builds it again)
#   .device/run.sh             unpacks the bundle on the machine and runs a command (../shared/tools/device/run.sh)
#   .device/data/fullres/      7 of the 21 600x450 JPEGs (every third): what the servers are sent
#   .device/data/ham10000/     metadata.csv and as many of the real images (a seeded random draw, so every class keeps
#                              its share) as fit beside the rest; the benchmark repeats them to 20,000 rows
# usage: bash benchmarks/gpu_pack.sh [--dry-run] [--rebuild]
#   --dry-run writes nothing: it reports what would travel and exits 1 if that is over the limit.
set -euo pipefail
cd "$(dirname "$0")/.."
dry=0 rebuild=0
for arg in "$@"; do
  case $arg in
    --dry-run) dry=1 ;;
    --rebuild) rebuild=1 ;;
    *) echo "usage: bash benchmarks/gpu_pack.sh [--dry-run] [--rebuild]" >&2; exit 2 ;;
  esac
done
LIMIT=$((64 * 1024 * 1024))
MARGIN=$((2 * 1024 * 1024))  # headroom: files written here between packing and the call
BUNDLE_ESTIMATE=42000000    # the bundle's size as last built, for a dry run before it exists
tools=../shared/tools/device data=../shared/data out=.device
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
for need in "$tools/pack.sh" "$tools/run.sh" "$data/ham10000/metadata.csv" "$data/ham10000-fullres/images"; do
  [ -e "$need" ] || { echo "gpu_pack: $need not found" >&2; exit 2; }
done
git check-ignore -q "$out/" || { echo "gpu_pack: $out/ is not git-ignored (add it to .gitignore)" >&2; exit 2; }

# what travels besides .device/: tracked and untracked-not-ignored files, and shared/ where the checkout has one
tree=$(git ls-files -co --exclude-standard -z | { xargs -0 stat -L -c %s 2>/dev/null || true; } |  # deleted: absent
       awk '{ s += $1 } END { print s + 0 }')
[ -d shared ] && tree=$((tree + $(du -sbL shared | cut -f1)))
if [ "$rebuild" = 1 ] || [ ! -s "$out/site-py312.tar.xz" ]; then
  if [ "$dry" = 1 ]; then
    bundle=$BUNDLE_ESTIMATE; bundle_note="not built yet: estimated"
  else
    mkdir -p "$out" && "$tools/pack.sh" "$out" >&2
    bundle=$(stat -c %s "$out/site-py312.tar.xz"); bundle_note="built"
  fi
else
  bundle=$(stat -c %s "$out/site-py312.tar.xz"); bundle_note="built earlier (--rebuild to redo)"
fi
jpegs=$(ls "$data"/ham10000-fullres/images/*.jpg | awk 'NR % 3 == 1')
fullres=$(echo "$jpegs" | xargs du -cbL | tail -1 | cut -f1)
runsh=$(stat -c %s "$tools/run.sh")
budget=$((LIMIT - MARGIN - tree - bundle - fullres - runsh))

# the images: a seeded random draw of metadata rows whose files fit the budget (minus their metadata lines)
images=$(python3 - "$data/ham10000" "$out/data/ham10000" "$budget" "$dry" <<'EOF'
import csv, os, random, shutil, sys
from pathlib import Path
source, dest, budget, dry = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
with open(source / "metadata.csv", newline="") as f:
    rows = list(csv.DictReader(f))
files = {p.stem: p for p in (source / "images").glob("*.jpg")}
rows = [r for r in rows if r["image_id"] in files]
random.Random(0).shuffle(rows)
chosen, used = [], 0
for row in rows:
    size = files[row["image_id"]].stat().st_size + 80  # the file and its metadata line
    if used + size > budget:
        break
    chosen.append(row)
    used += size
if not dry and chosen:
    shutil.rmtree(dest, ignore_errors=True)
    (dest / "images").mkdir(parents=True)
    for row in chosen:
        shutil.copyfile(files[row["image_id"]], dest / "images" / f"{row['image_id']}.jpg")
    with open(dest / "metadata.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(chosen[0]))
        writer.writeheader()
        writer.writerows(chosen)
print(len(chosen), used, len(rows))
EOF
)
read -r count image_bytes available <<<"$images"
if [ "$dry" = 0 ]; then
  cp "$tools/run.sh" "$out/run.sh"
  rm -rf "$out/data/fullres" && mkdir -p "$out/data/fullres" && echo "$jpegs" | xargs cp -t "$out/data/fullres/"
fi
total=$((tree + bundle + fullres + runsh + image_bytes))
echo "working tree:     $(mib "$tree")"
echo "bundle:           $(mib "$bundle") ($bundle_note)"
echo "600x450 JPEGs:    $(mib "$fullres")"
echo "HAM10000 images:  $(mib "$image_bytes") ($count of $available; repeated to 20,000 rows on the machine)"
echo "total:            $(mib "$total") of $(mib "$LIMIT") (headroom kept: $(mib "$MARGIN"))"
if [ "$count" -lt 1000 ] || [ "$total" -gt $((LIMIT - MARGIN)) ]; then
  echo "gpu_pack: does not fit: the working tree and bundle leave room for $count images (want at least 1000)" >&2
  exit 1
fi
[ "$dry" = 1 ] && echo "dry run: nothing written"
cat <<'EOF'
device call (run tool): carry [".device"], timeout_s 600, command:
bash .device/run.sh .device -- bash -c 'PYTHONUNBUFFERED=1 python3 -m benchmarks.gpu --data .device/data/ham10000 --fullres .device/data/fullres --out $OUT 2>&1 | tee $OUT/gpu.log'
then copy the returned gpu-<device>.json into benchmarks/results/.
EOF
