#!/usr/bin/env bash
# Train the bundled demo checkpoints (issue 8) on the GPU with the Triton kernels: the byte-level MemMamba and its
# plain-Mamba twin, the same data and schedule, TRAIN_SECONDS each (default 140 s); then passkey accuracy of both at
# 1k..64k and memory fidelity (Triton step path vs the torch reference) of both.
# Returns $OUT/demo-checkpoints.tar (ckpt/demo-memmamba, ckpt/demo-mamba: config.json + model.safetensors; the train
# logs; passkey.json; fidelity-*.json) and $OUT/train-demo.png. The lead unpacks ckpt/* into memmamba_deploy/assets/.
# Needs ~6 minutes: run it alone with a longer limit, e.g. bash scripts/gpu_check.sh --only train-demo --timeout 600
# A CPU dry run of this script (tiny model, seconds): OUT=/tmp/o DEVICE=cpu KERNELS=torch TRAIN_SECONDS=10
#   LENGTHS=256,512 SAMPLES=2 TRAIN_ARGS="--preset tiny --curriculum 128x4" bash scripts/gpu_stages/50-train-demo.sh
set -uo pipefail
RUN=${RUN_DIR:-runs/train-demo}
SECONDS_EACH=${TRAIN_SECONDS:-140}
DEVICE=${DEVICE:-cuda}
KERNELS=${KERNELS:-triton}
LENGTHS=${LENGTHS:-1k,4k,16k,64k}
SAMPLES=${SAMPLES:-10}
TRAIN_ARGS=${TRAIN_ARGS:-}
export KERNELS
rm -rf "$RUN"; mkdir -p "$RUN/ckpt"
pack() {
  local files; files=$(cd "$RUN" && ls -d ckpt *.json */train_log.jsonl */summary.json 2>/dev/null)
  [ -n "$files" ] && tar -cf "$OUT/demo-checkpoints.tar" -C "$RUN" $files
}
trap pack EXIT

[ "$DEVICE" = cpu ] || python3 -c "
import torch, sys
from memmamba_deploy.models.train import _triton_available
if not torch.cuda.is_available(): sys.exit('@@ train-demo: no CUDA GPU')
if not _triton_available(): sys.exit('@@ train-demo: the Triton kernels (models/ops/triton TRITON_OPS) do not import')
" || exit 1

status=0
for model in demo-memmamba demo-mamba; do
  flag=""; [ "$model" = demo-mamba ] && flag="--no-memory"
  # fp32 (TF32 matmuls): the kernels' fp32 path is the one every backend is checked against
  if python3 -m memmamba_deploy.models.train --out "$RUN/$model" $flag --kernels "$KERNELS" --device "$DEVICE" \
       --dtype fp32 --steps 4000 --max-seconds "$SECONDS_EACH" --save-every 500 --log-every 20 $TRAIN_ARGS \
       > "$RUN/$model.stdout"; then
    cp -r "$RUN/$model/model" "$RUN/ckpt/$model"
  else
    echo "@@ train-demo: training $model FAILED (see gpu_check.log)"; status=1
  fi
done
[ $status = 0 ] || exit 1
pack

memdeploy eval passkey "$RUN/ckpt/demo-memmamba" "$RUN/ckpt/demo-mamba" --lengths "$LENGTHS" --samples "$SAMPLES" \
  --batch 5 --device "$DEVICE" --kernels "$KERNELS" --json "$RUN/passkey.json" \
  || { echo "@@ passkey eval FAILED"; status=1; }
for model in demo-memmamba demo-mamba; do
  memdeploy fidelity "$RUN/ckpt/$model" --device "$DEVICE" --kernels "$KERNELS" --samples 8 --length 256 \
    --json "$RUN/fidelity-$model.json" || { echo "@@ fidelity $model: outside tolerance or FAILED"; status=1; }
done

python3 - "$RUN" <<'PY'
import json, os, sys
from pathlib import Path
run, out = Path(sys.argv[1]), Path(os.environ["OUT"])
rows = []
for model in ("demo-memmamba", "demo-mamba"):
    s = json.loads((run / model / "summary.json").read_text())
    f = s["final"]
    size = (run / "ckpt" / model / "model.safetensors").stat().st_size / 2**20
    print(f"@@ {model}: {s['steps']} steps in {s['elapsed_s']:.0f} s, {s['parameters']/1e6:.2f}M params "
          f"({size:.1f} MB), loss {f.get('loss', float('nan')):.3f}, "
          f"answer acc {f.get('answer_acc', float('nan')):.2f}")
    rows.append({"stage": "train-demo", "model": model, **{k: s[k] for k in ("steps", "elapsed_s", "parameters")},
                 "final": f})
    fid = run / f"fidelity-{model}.json"
    if fid.is_file():
        r = json.loads(fid.read_text())
        e, c = r["reference"]["etmf"], r["reference"]["eclmf"]
        g5 = "n/a" if c["5"] is None else f"{c['5']:.3f}"
        print(f"@@ {model} fidelity: ETMF {e['0']:.3f} (Δ8 {e['8']:.3f}), ECLMF G2 {c['2']:.3f} G5 {g5}; "
              f"{os.environ['KERNELS']} step vs torch forward: max |ΔETMF| "
              f"{max(v for v in r['etmf_diff'].values() if v is not None):.1e}, insertion flips "
              f"{'n/a' if r['insertion_flips'] is None else r['insertion_flips']}, "
              f"{'ok' if r['ok'] else 'FAIL'}")
        rows.append({"stage": "train-demo", "model": model, "fidelity": r})
pk = run / "passkey.json"
if pk.is_file():
    data = json.loads(pk.read_text())
    for run_ in data["runs"]:
        name = Path(run_["path"]).name
        accs = ", ".join(f"{r['length']} tokens {r['accuracy']:.2f}" for r in run_["results"])
        print(f"@@ passkey {name}: {accs}")
        keep = ("length", "accuracy", "digit_accuracy", "samples", "seconds")
        rows.append({"stage": "train-demo", "model": name,
                     "passkey": [{k: r[k] for k in keep} for r in run_["results"]]})
with open(out / "results.jsonl", "a") as fh:
    for r in rows:
        fh.write(json.dumps(r) + "\n")
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
for model in ("demo-memmamba", "demo-mamba"):
    log = [json.loads(x) for x in (run / model / "train_log.jsonl").read_text().splitlines()]
    a.plot([r["step"] for r in log], [r["lm_loss"] for r in log], label=model)
if pk.is_file():
    for run_ in data["runs"]:
        b.plot([r["length"] for r in run_["results"]], [r["accuracy"] for r in run_["results"]], "o-",
               label=Path(run_["path"]).name)
a.set(xlabel="step", ylabel="weighted next-byte loss", title="training"); a.legend()
b.set(xscale="log", xlabel="prompt length (tokens)", ylabel="passkey accuracy", ylim=(-0.05, 1.05),
      title=f"passkey retrieval (trained on <= {s['max_train_length']} tokens)"); b.legend()
fig.tight_layout(); fig.savefig(out / "train-demo.png", dpi=110)
PY
exit $status
