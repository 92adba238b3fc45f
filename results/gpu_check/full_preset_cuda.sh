# The `full` preset's classifier and VAE recipes on CUDA, every architecture, on the small subset; report with Grad-CAM.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
W=/tmp/w
python3 scripts/01_prepare_data.py --data-root .gpucheck/data --out $W/manifests/original.csv | tail -1
time timeout 300 python3 scripts/04_train_classifiers.py --preset full --configs original --manifest-dir $W/manifests --runs-dir $W/runs --results $W/results/models_evaluation/grid_evaluation.csv --device cuda --no-progress 2>&1 | grep -v Warning
time timeout 60 python3 scripts/05_train_vae.py --preset full --manifest $W/manifests/original.csv --out $W/vae --device cuda --no-progress 2>&1 | tail -4
time timeout 120 python3 scripts/08_report.py --results-dir $W/results --runs-dir $W/runs --gradcam-per-group 2 --n-boot 200 --device cuda 2>&1 | tail -12
ls $W/results/gradcam_outputs
cp $W/results/models_evaluation/grid_report.md $OUT/ 2>/dev/null
cp $W/results/gradcam_outputs/swin_original_s0_ham10000_test.png $W/results/gradcam_outputs/vit_original_s0_ham10000_test.png $OUT/ 2>/dev/null
