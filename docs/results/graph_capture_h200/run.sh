# Device driver: 3 sequential processes (auto cold cache, torch, auto warm cache), then 3 concurrent auto ones.
# usage (device): source scripts/gpu/unpack.sh >/dev/null 2>&1; bash docs/results/graph_capture_h200/run.sh
D=docs/results/graph_capture_h200
S=$SECONDS
echo "cache files at start: triton $(find ~/.triton/cache -type f 2>/dev/null | wc -l), tilelang $(find ~/.tilelang -type f 2>/dev/null | wc -l)"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; nproc
for v in auto:1:160 torch:1:100 auto:2:100; do
  IFS=: read c n lim <<< "$v"
  HD_SHORT_CONV=$c timeout $lim python $D/steps.py ${c}_$n $OUT/${c}_$n.json > $OUT/${c}_$n.log 2>&1
  echo "rc $?"; grep -E "^${c}_$n " $OUT/${c}_$n.log; echo "elapsed $((SECONDS-S)) s"
done
left=$((350 - (SECONDS - S)))
if (( left > 100 )); then
  for k in 1 2 3; do HD_SHORT_CONV=auto timeout $left python $D/steps.py conc3_$k $OUT/conc3_$k.json > $OUT/conc3_$k.log 2>&1 & done
  wait; grep -hE "^conc3_" $OUT/conc3_*.log; echo "elapsed $((SECONDS-S)) s"
else echo "skipped the concurrent run: $left s left"; fi
