#!/bin/bash
# The worker's step time with and without `--serve` and one viewer reading every frame (README,
# "Run folders and serving"): three alternated pairs of 300-step default runs.
# Prints each run's wall time and mean step time over steps 21-300.
B=${B:-target/release/moppa}
W=${W:-$(mktemp -d)}
for i in 1 2 3; do
  for mode in plain served; do
    d=$W/$mode-$i; rm -rf $d
    if [ $mode = plain ]; then
      /usr/bin/time -f "%e" -o $W/t $B train --steps 300 --eval-every 1000 --threads 2 --plain --out $d >/dev/null 2>$W/err
    else
      ( /usr/bin/time -f "%e" -o $W/t $B train --steps 300 --eval-every 1000 --threads 2 --plain --out $d --serve 127.0.0.1:7979 --token tok >/dev/null 2>$W/err ) &
      until grep -q "serving on" $W/err 2>/dev/null; do sleep 0.05; done
      python3 "$(dirname "$0")/viewer.py" 127.0.0.1:7979 tok > "$W/viewer-$i.json"
      wait
    fi
    python3 - $d $mode $(cat $W/t) <<'PY'
import json,sys
d,mode,wall=sys.argv[1],sys.argv[2],float(sys.argv[3])
recs=[json.loads(l) for l in open(d+'/metrics.jsonl')]
pr=[r for r in recs if r['kind']=='progress']
# step time from the progress timestamps (steps 21..300: after warm-up)
t=[r['time_s'] for r in pr]
st=(t[-1]-t[19])/(len(t)-20)
print(f"{mode} wall {wall:.1f} s, step {1000*st:.1f} ms (steps 21-300)")
PY
  done
done
