# Training and generator throughput on one GPU (random images: no data needed).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
N="one H100 (device check; torch and timm are that machine's, not the pinned ones); random uint8 images"
timeout 200 python3 scripts/benchmark_training.py --device cuda --synthetic --img-size 224 --batch-size 64 --warmup 3 --steps 20 --note "$N" --out $OUT/training_throughput_h100_224.csv
timeout 200 python3 scripts/benchmark_training.py --device cuda --synthetic --img-size 128 --batch-size 32 --warmup 3 --steps 20 --note "$N" --out $OUT/training_throughput_h100_128.csv
timeout 150 python3 scripts/benchmark_generators.py --preset full --device cuda --train-steps 10 --sample-batch 64 2>&1 | tee $OUT/generators_h100.txt
