"""Step 6: calibrate the VAE's anomaly threshold on the `calib` split and write it into the VAE's sidecar.

    # CPU: about a minute for the 800 calib images at 128 px
    python scripts/06_calibrate.py                                   # runs/vae/best.safetensors, original.csv
    python scripts/06_calibrate.py --vae runs/vae/best.safetensors --rule youden --out results/vae_calibration
    # one GPU: add --device cuda. Several GPUs: nothing here is worth spreading.

The step is anomaly_detection/calibrate.py under its pipeline number, with the same flags (--help lists them);
its defaults already read step 5's VAE and write results/vae_calibration/.
"""
from __future__ import annotations

from anomaly_detection.calibrate import main

if __name__ == "__main__":
    main()
