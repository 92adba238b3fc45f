# GPU check of the CUDA paths: inference, the smoke pipeline on cuda, benchmarks (data: scripts/make_data_subset.py --out .gpucheck/data).
set -x
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import torch,timm,torchvision,diffusers,pytorch_grad_cam,sklearn,pandas; print(torch.__version__, torchvision.__version__, timm.__version__, diffusers.__version__, torch.cuda.is_available())"
S=samples/synthetic_dcgan_malignant_0.png
timeout 120 python3 inference.py --image $S --device cuda --output $OUT/inf_cuda.json --gradcam $OUT/gradcam_cuda.png
timeout 120 python3 inference.py --image $S --device cpu --output $OUT/inf_cpu.json --quiet
timeout 120 python3 inference.py --folder samples --device auto --csv $OUT/folder_auto.csv --quiet
timeout 330 python3 scripts/run_pipeline.py --preset smoke --work-dir /tmp/smoke --data-root .gpucheck/data --device cuda
ls /tmp/smoke/results/*; cat /tmp/smoke/results/models_evaluation/grid_metrics.csv | head -5
timeout 90 python3 scripts/benchmark_training.py --device cuda --img-size 224 --batch-size 64 --warmup 3 --steps 20 --manifest /tmp/smoke/data/manifests/full.csv --note "H100 device check" --out $OUT/training_throughput_h100.csv
timeout 60 python3 scripts/benchmark_inference.py --device cuda --manifest /tmp/smoke/data/manifests/full.csv --n 160 --backends onnx
timeout 90 python3 scripts/benchmark_generators.py --preset full --device cuda --train-steps 10
